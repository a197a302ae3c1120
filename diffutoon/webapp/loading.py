"""The models of the web app: loaded once (through `diffutoon.models`, as `diffutoon render` loads them), one
pipeline per accelerator, or the tiny random-weight demo models; what the pipeline's __call__ offers; and the
pipeline's arguments for a render's options (the same mapping as `diffutoon render`)."""

from __future__ import annotations

import argparse
import inspect
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .. import cli
from .. import models as M
from .. import video as vio

# ---------------------------------------------------------------------------------------------- models
class _NullWriter:
    """Where the pipeline's tqdm bars print in the app: nowhere (their counts are read, not their text)."""

    def write(self, s):
        return len(s)

    def flush(self):
        pass


@dataclass
class Slot:
    """One accelerator: its pipeline (shared by every user, one render at a time) and its annotators."""

    device: str
    pipe: object
    detector: object = None
    edit_detectors: dict | None = None
    job: object = None


@dataclass
class Models:
    kind: str  # "demo" (tiny random weights) or "real"
    slots: list
    has_edit: bool
    summary: str  # one line: what runs where
    reason: str = ""  # why the demo models (page banner)
    accelerator: bool = False
    base_loras: tuple = ((), ())  # adapters loaded at start (--lora): names, weights
    ip_adapter: str | None = None  # the style image's IP-Adapter (as --ip-adapter names it), None: no style image

    @property
    def is_demo(self):
        return self.kind == "demo"


def _devices(spec):
    import torch

    if spec in (None, "", "auto"):
        return ["cuda" if torch.cuda.is_available() else "cpu"]
    return [d.strip() for d in str(spec).split(",") if d.strip()]


def _explicit_models(args):
    defaults = {"base": M.DEFAULT_BASE, "motion_adapter": M.DEFAULT_MOTION_ADAPTER,
                "lineart_controlnet": M.DEFAULT_LINEART, "tile_controlnet": M.DEFAULT_TILE,
                "softedge_controlnet": M.DEFAULT_SOFTEDGE, "depth_controlnet": M.DEFAULT_DEPTH,
                "annotators": M.DEFAULT_ANNOTATORS}
    return (any(getattr(args, k, v) != v for k, v in defaults.items())
            or bool(getattr(args, "lora", None)) or bool(getattr(args, "textual_inversion", None)))


def _loading_args(args, edit):
    """The namespace cli's loading helpers expect: the default negative embedding, and the editing ControlNets."""
    ns = argparse.Namespace(**vars(args))
    ns.negative_prompt = M.DEFAULT_NEGATIVE_TOKEN
    ns.edit_prompt = "edit" if edit else None
    for name, default in (("lora", []), ("textual_inversion", [])):
        if getattr(ns, name, None) is None:
            setattr(ns, name, default)
    return ns


def _configure(pipe):
    # the bars stay enabled (their counts are the fallback's progress) but print nowhere, refreshed at every item
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(file=_NullWriter(), mininterval=0, miniters=1, disable=False)
    return pipe


def load_models(args, log=None):
    """Load the models once, one pipeline per accelerator in --device (comma-separated).

    --demo-models, or no model option given and the default models not in the local Hugging Face cache: the
    tiny random-weight models (the page says so and why). A model option given (--base ...): the real models,
    downloaded if needed, or a CLIError with the CLI's message, as `diffutoon render` does."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    devices = _devices(getattr(args, "device", "auto"))
    accelerator = any(not d.startswith("cpu") for d in devices)
    reason = ""
    if getattr(args, "demo_models", False):
        reason = "the app was started with --demo-models"
    elif not _explicit_models(args):
        missing = M._uncached(M._model_sources(_loading_args(args, edit=False))[0])
        if missing:
            option, repo = missing[0]
            reason = (f"the real models are not on this computer (first missing: {repo}, {option}), and the app "
                      "downloads gigabytes of models only when asked to: start it with `diffutoon ui --base "
                      "<an SD1.5 checkpoint>` (Hub id, folder or .safetensors file)")
    if reason:
        return _load_tiny(devices, reason, log)

    edit_sources = [("--softedge-controlnet", args.softedge_controlnet), ("--depth-controlnet", args.depth_controlnet)]
    main_args = _loading_args(args, edit=False)
    M._check_sources(M._model_sources(main_args)[0])  # CLIError, one line, before any download
    try:
        M._check_sources(edit_sources)
        edit = True
    except M.CLIError as e:
        edit = False
        log(f"the editing branch is off: {e}")
    slots = []
    for device in devices:
        device, dtype = M._torch_setup(argparse.Namespace(device=device, dtype=getattr(args, "dtype", "auto")))
        log(f"loading models on {device} ({str(dtype).replace('torch.', '')})...")
        pipe, detector = M._load_pipeline(_loading_args(args, edit), device, dtype)
        slots.append(Slot(device, _configure(pipe), detector))
    names = [f"lora{i}" for i in range(len(args.lora or []))]
    weights = [float(M._spec(t, "1.0")[1]) for t in (args.lora or [])]
    summary = (f"{args.base} with AnimateDiff ({args.motion_adapter}), lineart + tile ControlNets"
               f"{' (+ softedge + depth for editing)' if edit else ''}, on {', '.join(s.device for s in slots)}")
    return Models("real", slots, edit, summary, accelerator=accelerator, base_loras=(tuple(names), tuple(weights)),
                  ip_adapter=_ip_adapter(args, log))


def _ip_adapter(args, log):
    """--ip-adapter, or the CLI's default when it is in the local cache (loaded for a render with a style image)."""
    from ..style import DEFAULT_IP_ADAPTER

    if getattr(args, "ip_adapter", None):
        return args.ip_adapter
    if M._uncached([("--ip-adapter", DEFAULT_IP_ADAPTER[0])]):
        log(f"no style image: {DEFAULT_IP_ADAPTER[0]} is not cached (start with --ip-adapter to name one)")
        return None
    return DEFAULT_IP_ADAPTER[0]


def _load_tiny(devices, reason, log):
    from .. import tiny

    M._import_pipeline()  # a source checkout's pipeline_diffutoon.py on the path
    slots = []
    for device in devices:
        log(f"building the tiny demo models on {device}...")
        pipe = tiny.build_tiny_pipeline(seed=0, edit=True).to(device)  # float32, as `diffutoon demo`
        edit_detectors = {"softedge": tiny.tiny_softedge_detector(), "depth": tiny.tiny_depth_detector}
        slots.append(Slot(device, _configure(pipe), tiny.tiny_lineart_detector(), edit_detectors))
    summary = f"tiny random-weight demo models on {', '.join(devices)}"
    # a tiny random IP-Adapter in h94/IP-Adapter's layout, so that the style image works with the demo models too
    folder = Path(tempfile.mkdtemp(prefix="diffutoon-ui-ip-adapter-"))
    ip_adapter = str(tiny.save_tiny_ip_adapter(folder, slots[0].pipe.unet))
    return Models("demo", slots, True, summary, reason=reason,
                  accelerator=any(not d.startswith("cpu") for d in devices), ip_adapter=ip_adapter)


# ---------------------------------------------------------------------------------------------- pipeline features
@dataclass
class PipelineFeatures:
    """What the pipeline's __call__ accepts beyond today's arguments (CONTRACT.md's long-render API)."""

    progress_callback: bool
    render_dir: bool
    output_path: bool
    video_clip: bool  # diffutoon.video.VideoClip exists (lazy input, audio span for output_path)
    params: frozenset

    @classmethod
    def of(cls, pipe):
        params = frozenset(inspect.signature(type(pipe).__call__).parameters)
        return cls("progress_callback" in params, "render_dir" in params, "output_path" in params,
                   hasattr(vio, "VideoClip"), params)

    @property
    def streams_output(self):
        return self.output_path and self.video_clip

    @property
    def resumable(self):
        return self.render_dir


def pipeline_kwargs(args, pipe, video, detector, edit_extra=None):
    """The pipeline's arguments for these options on `video`: `diffutoon render`'s own mapping (cli._pipeline_kwargs:
    the options of every feature, the prompts at times against the clip's source frames)."""
    return cli._pipeline_kwargs(args, pipe, video, detector, edit_extra)


def _windows(pipe, num_frames, length, stride):
    """Number of sliding windows per step, from the pipeline module's own `sliding_windows`."""
    fn = getattr(sys.modules.get(type(pipe).__module__), "sliding_windows", None)
    try:
        return len(fn(num_frames, length, stride)) if fn else None
    except Exception:
        return None
