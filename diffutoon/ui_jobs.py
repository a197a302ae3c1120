"""The web app's engine, without Gradio (the tests drive it directly): the models, loaded once and shared; a queue
with one worker per accelerator; one folder per browser session and per job, so that a restarted app resumes the
jobs it had not finished; the pipeline's own progress; previews of the condition frames; and the checks of
`diffutoon render` with its one-line messages.

Integration points with the pipeline's long-render API (CONTRACT.md), each used only when the pipeline has it:

    PipelineFeatures.of(pipe)   which of render_dir / progress_callback / output_path (+ diffutoon.video.VideoClip)
                                the pipeline offers, read from inspect.signature(pipe.__call__)
    ProgressAdapter.callback    progress_callback=: the contract's progress dict, shown as is
    ProgressAdapter.on_step_end, ProgressAdapter.tracking_bars
                                the fallback: callback_on_step_end + the totals and counts of the pipeline's own tqdm bars
    JobManager._call_pipeline   render_dir=, output_path=, fps=, video=VideoClip(...) when available, else frames
    read_condition_previews     <render_dir>/conditions/<i>-<kind>.npy + .done, <render_dir>/edit/colors.npy
    JobManager.cancel           pipe._interrupt = True from the request's thread: stops at the next window
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import html
import inspect
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import cli
from . import video as vio

TERMINAL = ("done", "failed", "cancelled")
ACTIVE = ("queued", "running", "cancelling")
_WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_TOKEN = re.compile(r"[A-Za-z0-9_-]{32,64}")
_JOB_ID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")

# the options of `diffutoon render` as the page names them: messages shown in the page use the page's words
PAGE_LABELS = {
    "--start": "Start", "--end": "End", "--every-nth": "Every n-th frame", "--max-frames": "Max frames",
    "--prompt": "Prompt", "--negative-prompt": "Negative prompt", "--edit-prompt": "Editing prompt",
    "--edit-steps": "Editing steps", "--edit-height": "Editing size", "--edit-width": "Editing size",
    "--height": "Height", "--width": "Width", "--resize": "Shape", "--short-side": "Width/Height",
    "--steps": "Steps", "--guidance-scale": "Guidance", "--context-length": "Window length",
    "--context-stride": "Window stride", "--lineart-scale": "Lineart strength", "--tile-scale": "Colour strength",
    "--seed": "Seed", "--lora": "LoRA", "--textual-inversion": "Textual inversion",
}

STAGE_WORDS = {
    "queued": "Waiting in line", "reading": "Reading the video", "conditions": "Making the condition frames",
    "edit": "Editing branch: drawing the colour video", "fastblend": "Editing branch: smoothing the colour video",
    "denoising": "Drawing", "decoding": "Decoding the frames", "writing": "Writing the video", "done": "Done",
    "interrupted": "Cancelled",
}
# share of the whole render each stage stands for (an overall bar that only moves forward)
_STAGE_SHARE = {"reading": 0.02, "conditions": 0.06, "edit": 0.2, "fastblend": 0.04, "denoising": 0.58,
                "decoding": 0.06, "writing": 0.04}
_STAGE_ORDER = ["reading", "conditions", "edit", "fastblend", "denoising", "decoding", "writing"]
CONDITION_LABELS = {"lineart": "Lineart", "tile": "Colour", "softedge": "Soft edges", "depth": "Depth"}
COLOR_CAPTION = "Colour (edited)"  # the editing branch's colour video, the tile ControlNet's input


class UIError(Exception):
    """A problem with the user's input or settings; the message is one line, shown in the page as is."""


class _Cancelled(Exception):
    """Raised inside the pipeline's progress bar (fallback mode) to stop at the next window."""


# ---------------------------------------------------------------------------------------------- messages
def page_message(text, paths=None):
    """A CLI message in the page's words: option names become the page's labels, server paths the file's name.

    >>> page_message("argument --context-stride: must be >= 1, got 0")
    'Window stride: must be >= 1, got 0'
    >>> page_message("empty frame range: start=9, end=8; change --start/--end")
    'empty frame range: start=9, end=8; change Start/End'
    """
    text = " ".join(str(text).split())
    text = re.sub(r"argument (--[\w-]+)(?:/-\w)?:", lambda m: PAGE_LABELS.get(m[1], m[1]) + ":", text)
    text = re.sub(r"(?:-o/)?--[a-z][\w-]*", lambda m: PAGE_LABELS.get(m[0], m[0]), text)
    for path, name in (paths or {}).items():
        text = text.replace(str(path), name)
    return text


def one_line(e, paths=None):
    """The line `diffutoon render` prints after "error: " for this exception, in the page's words."""
    return page_message(cli._one_line(e), paths)


def _duration(seconds):
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min" + (f" {seconds % 60:02d} s" if seconds % 60 else "")
    return f"{seconds // 3600} h" + (f" {seconds % 3600 // 60:02d} min" if seconds % 3600 // 60 else "")


def _megabytes(n):
    return f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{n / 2**10:.0f} kB"


def safe_name(name, default="video.mp4"):
    """A file name without folders or odd characters (uploads keep their name inside their job folder)."""
    name = Path(str(name)).name
    name = re.sub(r"[^\w .()+-]+", "_", name).strip(" ._") or default
    return name[-120:]


# ---------------------------------------------------------------------------------------------- settings
@dataclass
class Settings:
    """Everything the page asks for, in the page's units (seconds for the part of the video)."""

    start: float = 0.0
    end: float | None = None  # None or 0: to the end
    every_nth: int = 1
    prompt: str = cli.DEFAULT_PROMPT
    negative_prompt: str = ""
    edit_prompt: str = ""
    edit_steps: int = 20
    edit_size: int = 512
    width: int = 512
    height: int = 512
    shape: str = "crop"  # crop | pad | short_side (short side = min(width, height))
    steps: int = 10
    guidance_scale: float = 7.0
    context_length: int = 16
    context_stride: int = 8
    lineart_scale: float = 0.5
    tile_scale: float = 0.5
    seed: int = 0
    lora_scale: float = 1.0

    def argv(self, input_path):
        """The `diffutoon render` command line these settings stand for (options as --name=value, so that a
        prompt starting with "-" stays a prompt)."""
        def num(x):
            if isinstance(x, float) and x.is_integer():
                x = int(x)
            return repr(x) if isinstance(x, float) else str(x)

        argv = ["render", str(input_path), f"--start={num(self.start or 0)}s", f"--every-nth={num(self.every_nth)}"]
        if self.end:
            argv.append(f"--end={num(self.end)}s")
        argv += [f"--prompt={self.prompt}", f"--negative-prompt={self.negative_prompt}"]
        if (self.edit_prompt or "").strip():
            argv += [f"--edit-prompt={self.edit_prompt.strip()}", f"--edit-steps={num(self.edit_steps)}",
                     f"--edit-height={num(self.edit_size)}", f"--edit-width={num(self.edit_size)}"]
        argv += [f"--height={num(self.height)}", f"--width={num(self.width)}", f"--resize={self.shape}",
                 f"--short-side={num(min(self.width, self.height))}", f"--steps={num(self.steps)}",
                 f"--guidance-scale={num(self.guidance_scale)}", f"--context-length={num(self.context_length)}",
                 f"--context-stride={num(self.context_stride)}", f"--lineart-scale={num(self.lineart_scale)}",
                 f"--tile-scale={num(self.tile_scale)}", f"--seed={num(self.seed)}"]
        return argv


def parse_render_args(argv):
    """argv -> the Namespace `diffutoon render` would use, through the CLI's own parser and option types; a bad
    value raises UIError with the CLI's message in the page's words."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))

    def error(message):
        raise UIError(page_message(message))

    for p in (parser, *sub.choices.values()):
        p.error = error
    return parser.parse_args(argv)


def open_input(args, name):
    """cli._open_input (frame range, first and last frames decoded), its errors in the page's words."""
    try:
        return cli._open_input(args)
    except (cli.CLIError, vio.VideoError, OSError) as e:
        raise UIError(one_line(e, {args.input: name})) from e


# ---------------------------------------------------------------------------------------------- limits, defaults
@dataclass
class Limits:
    max_upload_mb: float = 500
    max_seconds: float = 600
    max_frames: int = 600

    def check_size(self, path, name):
        size = os.path.getsize(path)
        if size > self.max_upload_mb * 2**20:
            raise UIError(f"{name} is {_megabytes(size)}; this app takes videos up to {self.max_upload_mb:g} MB: "
                          "shorten or compress it first")

    def check_length(self, reader, name):
        if reader.duration > self.max_seconds:
            raise UIError(f"{name} is {_duration(reader.duration)} long; this app takes videos up to "
                          f"{_duration(self.max_seconds)}: cut it shorter first")

    def check_frames(self, n):
        if n > self.max_frames:
            raise UIError(f"the selected part has {n} frames; this app renders at most {self.max_frames} frames at a "
                          "time: choose a shorter part with Start and End, or keep every n-th frame")


def page_defaults(kind, accelerator):
    """Settings the page starts with: tiny sizes for the demo models, small ones on a CPU, the paper's on a GPU."""
    if kind == "demo":
        return Settings(width=64, height=64, steps=2, context_length=8, context_stride=4, edit_size=64, edit_steps=2,
                        negative_prompt="")
    if accelerator:  # SPEC: 1536x1536, 10 steps, windows 16/8; editing branch 512x512, 20 steps
        return Settings(width=1536, height=1536, steps=10, edit_size=512, edit_steps=20,
                        negative_prompt=cli.DEFAULT_NEGATIVE_TOKEN)
    return Settings(width=384, height=384, steps=6, edit_size=384, edit_steps=10,
                    negative_prompt=cli.DEFAULT_NEGATIVE_TOKEN)


def default_limits(kind, accelerator, args=None):
    frames = 120 if kind == "demo" else 600 if accelerator else 48
    limits = Limits(max_frames=frames)
    for name in ("max_upload_mb", "max_seconds", "max_frames"):
        if args is not None and getattr(args, name, None) is not None:
            setattr(limits, name, getattr(args, name))
    return limits


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

    @property
    def is_demo(self):
        return self.kind == "demo"


def _devices(spec):
    import torch

    if spec in (None, "", "auto"):
        return ["cuda" if torch.cuda.is_available() else "cpu"]
    return [d.strip() for d in str(spec).split(",") if d.strip()]


def _explicit_models(args):
    defaults = {"base": cli.DEFAULT_BASE, "motion_adapter": cli.DEFAULT_MOTION_ADAPTER,
                "lineart_controlnet": cli.DEFAULT_LINEART, "tile_controlnet": cli.DEFAULT_TILE,
                "softedge_controlnet": cli.DEFAULT_SOFTEDGE, "depth_controlnet": cli.DEFAULT_DEPTH,
                "annotators": cli.DEFAULT_ANNOTATORS}
    return (any(getattr(args, k, v) != v for k, v in defaults.items())
            or bool(getattr(args, "lora", None)) or bool(getattr(args, "textual_inversion", None)))


def _loading_args(args, edit):
    """The namespace cli's loading helpers expect: the default negative embedding, and the editing ControlNets."""
    ns = argparse.Namespace(**vars(args))
    ns.negative_prompt = cli.DEFAULT_NEGATIVE_TOKEN
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
        missing = cli._uncached(cli._model_sources(_loading_args(args, edit=False))[0])
        if missing:
            option, repo = missing[0]
            reason = (f"the real models are not on this computer (first missing: {repo}, {option}), and the app "
                      "downloads gigabytes of models only when asked to: start it with `diffutoon ui --base "
                      "<an SD1.5 checkpoint>` (Hub id, folder or .safetensors file)")
    if reason:
        return _load_tiny(devices, reason, log)

    edit_sources = [("--softedge-controlnet", args.softedge_controlnet), ("--depth-controlnet", args.depth_controlnet)]
    main_args = _loading_args(args, edit=False)
    cli._check_sources(cli._model_sources(main_args)[0])  # CLIError, one line, before any download
    try:
        cli._check_sources(edit_sources)
        edit = True
    except cli.CLIError as e:
        edit = False
        log(f"the editing branch is off: {e}")
    slots = []
    for device in devices:
        device, dtype = cli._torch_setup(argparse.Namespace(device=device, dtype=getattr(args, "dtype", "auto")))
        log(f"loading models on {device} ({str(dtype).replace('torch.', '')})...")
        pipe, detector = cli._load_pipeline(_loading_args(args, edit), device, dtype)
        slots.append(Slot(device, _configure(pipe), detector))
    names = [f"lora{i}" for i in range(len(args.lora or []))]
    weights = [float(cli._spec(t, "1.0")[1]) for t in (args.lora or [])]
    summary = (f"{args.base} with AnimateDiff ({args.motion_adapter}), lineart + tile ControlNets"
               f"{' (+ softedge + depth for editing)' if edit else ''}, on {', '.join(s.device for s in slots)}")
    return Models("real", slots, edit, summary, accelerator=accelerator, base_loras=(tuple(names), tuple(weights)))


def _load_tiny(devices, reason, log):
    from . import tiny

    cli._import_pipeline()  # a source checkout's pipeline_diffutoon.py on the path
    slots = []
    for device in devices:
        log(f"building the tiny demo models on {device}...")
        pipe = tiny.build_tiny_pipeline(seed=0, edit=True).to(device)  # float32, as `diffutoon demo`
        edit_detectors = {"softedge": tiny.tiny_softedge_detector(), "depth": tiny.tiny_depth_detector}
        slots.append(Slot(device, _configure(pipe), tiny.tiny_lineart_detector(), edit_detectors))
    summary = f"tiny random-weight demo models on {', '.join(devices)}"
    return Models("demo", slots, True, summary, reason=reason,
                  accelerator=any(not d.startswith("cpu") for d in devices))


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


def pipeline_kwargs(args, height, width, detector, edit_extra=None):
    """The pipeline's arguments for these options: the same mapping as cli._run_pipeline (a test compares them)."""
    import torch

    kwargs = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, height=height, width=width,
                  num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                  context_length=args.context_length, context_stride=args.context_stride,
                  controlnet_conditioning_scale=[args.lineart_scale, args.tile_scale], clip_skip=args.clip_skip,
                  strength=args.strength, generator=torch.Generator("cpu").manual_seed(args.seed), output_type="pil",
                  decode_chunk_size=args.decode_chunk_size, lineart_detector=detector)
    if args.edit_prompt:
        kwargs["edit_prompt"] = args.edit_prompt
        kwargs["edit_kwargs"] = dict(height=args.edit_height, width=args.edit_width,
                                     num_inference_steps=args.edit_steps, strength=args.edit_strength,
                                     **(edit_extra or {}))
    return kwargs


def _windows(pipe, num_frames, length, stride):
    """Number of sliding windows per step, from the pipeline module's own `sliding_windows`."""
    fn = getattr(sys.modules.get(type(pipe).__module__), "sliding_windows", None)
    try:
        return len(fn(num_frames, length, stride)) if fn else None
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------- previews
def thumbnail(frame, max_side=256):
    import cv2

    frame = np.ascontiguousarray(np.asarray(frame)[..., :3], dtype=np.uint8)
    h, w = frame.shape[:2]
    scale = max_side / max(h, w)
    if scale < 1:
        frame = cv2.resize(frame, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return frame


def _done_chunks(path):
    try:
        data = path.read_bytes()
    except OSError:
        return 0
    n = 0
    for b in data:  # one byte per 16-frame chunk: 1 (or "1") once written; the written prefix is what is shown
        if b not in (1, ord("1")):
            break
        n += 1
    return n


def read_condition_previews(render_dir, chunk=16):
    """{name: (thumbnail, caption)} of the condition frames written so far in a render folder (CONTRACT.md):
    the last frame of the completed chunks of each <i>-<kind>.npy, and the editing branch's colour video."""
    render_dir = Path(render_dir)
    out = {}
    for folder, prefix in ((render_dir / "edit" / "conditions", "Edit: "), (render_dir / "conditions", "")):
        for npy in sorted(folder.glob("*.npy")) if folder.is_dir() else []:
            kind = npy.stem.partition("-")[2] or npy.stem
            chunks = _done_chunks(npy.with_suffix(".done"))
            if not chunks:
                continue
            try:
                frames = np.load(npy, mmap_mode="r")
                last = min(chunks * chunk, len(frames)) - 1
                image = thumbnail(frames[last])
            except Exception:  # being written: next time
                continue
            out[prefix + kind] = (image, f"{prefix}{CONDITION_LABELS.get(kind, kind)} {last + 1}/{len(frames)}")
    colors = render_dir / "edit" / "colors.npy"
    if colors.is_file():
        try:
            frames = np.load(colors, mmap_mode="r")
            out["colors"] = (thumbnail(frames[len(frames) // 2]), COLOR_CAPTION)
        except Exception:
            pass
    return out


class _RecordingDetector:
    """Wraps an annotator (PIL -> PIL): each frame it makes becomes the latest preview of its kind."""

    def __init__(self, detector, kind, adapter):
        self._detector, self._kind, self._adapter = detector, kind, adapter
        self.count = 0

    def __call__(self, image, *args, **kwargs):
        result = self._detector(image, *args, **kwargs)
        self.count += 1
        self._adapter.set_preview(self._kind, np.asarray(result.convert("RGB")),
                                  f"{CONDITION_LABELS.get(self._kind, self._kind)} {self.count}/{self._adapter.frames}")
        return result

    def __getattr__(self, name):
        return getattr(self._detector, name)


# ---------------------------------------------------------------------------------------------- progress
_BAR_STAGES = (("editing branch", "edit"), ("denoising", "denoising"), ("decoding", "decoding"),
               ("lineart", "conditions"), ("softedge", "conditions"), ("depth", "conditions"))


class ProgressAdapter:
    """The progress of one render as the contract's dict, from the pipeline's `progress_callback` when it has
    one, else from `callback_on_step_end` and the pipeline's own tqdm bars (totals and counts). Never a timer."""

    def __init__(self, job, pipe, notify, frames, windows=None, edit_windows=None, render_dir=None):
        self.job, self.pipe, self.notify = job, pipe, notify
        self.frames, self.windows, self.edit_windows = frames, windows, edit_windows
        self.render_dir = render_dir
        self.started_at = time.time()
        self.steps_done = 0
        self._main_seen = False
        self._stage_started = {}

    # -- the common sink
    def emit(self, progress):
        now = time.time()
        d = {"stage": "reading", "pass": "main", "step": 0, "steps": 0, "window": 0, "windows": 0, "done": 0,
             "total": 0, "frames": self.frames, "started_at": self.started_at, "updated_at": now,
             "eta_seconds": None}
        d.update(progress)
        job = self.job
        if job.cancel_requested:
            self.pipe._interrupt = True  # also after the pipeline reset the flag at the start of its call
        job.progress = d
        job.events += 1
        job.fraction = max(job.fraction, overall_fraction(d, bool(job.settings.get("edit_prompt"))))
        self.notify(job)

    def stage(self, stage, done=0, total=0, **extra):
        self.emit({"stage": stage, "done": done, "total": total, **extra})

    # -- the long-render API
    def callback(self, progress):
        """progress_callback=: the pipeline's dict as is; condition previews from its render folder."""
        self.emit(dict(progress))
        if self.render_dir is not None and progress.get("stage") in ("conditions", "edit", "fastblend", "denoising"):
            for name, (image, caption) in read_condition_previews(self.render_dir).items():
                self.job.set_preview(name, image, caption)

    # -- the fallback
    def on_step_end(self, pipe, i, t, tensors):
        """callback_on_step_end= of the main pass: completed steps (the bar gives the window within a step)."""
        self.steps_done = i + 1
        if self.job.cancel_requested:
            pipe._interrupt = True
        return {}

    @contextlib.contextmanager
    def tracking_bars(self):
        """Watch the pipeline's own progress bars (its `_bar` factory) for the duration of one call."""
        pipe = self.pipe
        original = getattr(type(pipe), "_bar", None)
        if original is None:
            yield
            return

        def tracked(this, iterable=None, total=None, desc=None):
            bar = original(this, iterable, total=total, desc=desc)
            self._watch_bar(bar, desc or "")
            return bar

        pipe._bar = tracked.__get__(pipe)
        try:
            yield
        finally:
            pipe.__dict__.pop("_bar", None)

    def _watch_bar(self, bar, desc):
        stage = next((s for key, s in _BAR_STAGES if desc.startswith(key)), None)
        if stage is None:
            return
        # the editing branch runs first (softedge, depth, its steps, decoding, FastBlend), then the main pass
        # (lineart, denoising, decoding)
        if desc.startswith(("lineart", "denoising")):
            self._main_seen = True
        pass_ = "main" if self._main_seen or not self.job.settings.get("edit_prompt") else "edit"
        original_update = bar.update

        def update(n=1):
            result = original_update(n)
            self._from_bar(bar, stage, pass_)
            if self.job.cancel_requested:
                raise _Cancelled()  # the next window (or frame) does not start
            return result

        bar.update = update
        self._from_bar(bar, stage, pass_)

    def _from_bar(self, bar, stage, pass_):
        n, total = int(bar.n), int(bar.total or 0)
        d = {"stage": stage, "pass": pass_, "done": n, "total": total}
        windows = self.edit_windows if stage == "edit" else self.windows
        if stage in ("edit", "denoising") and windows:
            d.update(step=n // windows, steps=total // windows, window=n % windows, windows=windows)
            if stage == "denoising":
                d["step"] = max(d["step"], min(self.steps_done, d["steps"]))
        started = self._stage_started.setdefault((stage, pass_), bar.start_t)
        if stage in ("denoising", "decoding") and pass_ == "main" and n:
            d["eta_seconds"] = (time.time() - started) / n * (total - n)
        if stage == "decoding" and pass_ == "edit" and n >= total:
            d.update(stage="fastblend", done=0, total=0)  # what the editing branch does next, off the bars
        self.emit(d)

    # -- previews
    def set_preview(self, kind, image, caption):
        self.job.set_preview(kind, thumbnail(image), caption)

    def recording(self, detector, kind="lineart"):
        return _RecordingDetector(detector, kind, self) if detector is not None else None


def overall_fraction(d, edit):
    """The share of the whole render done at this progress dict (stages weighted by _STAGE_SHARE)."""
    stage = d.get("stage")
    if stage == "done":
        return 1.0
    if stage not in _STAGE_SHARE:
        return 0.0
    stages = [s for s in _STAGE_ORDER if edit or s not in ("edit", "fastblend")]
    if stage in ("conditions",) and d.get("pass") == "edit" and edit:
        stage = "edit"  # the editing branch's own conditions: counted with it
    shares = [_STAGE_SHARE[s] for s in stages]
    i = stages.index(stage) if stage in stages else 0
    total = d.get("total") or 0
    inner = min(1.0, (d.get("done") or 0) / total) if total else 0.0
    return (sum(shares[:i]) + shares[i] * inner) / sum(shares)


# ---------------------------------------------------------------------------------------------- jobs
_PERSISTED = ("id", "session", "input_name", "settings", "loras", "embeddings", "status", "created", "started",
              "finished", "message", "output", "progress", "note", "resumable", "attempts")


@dataclass
class Job:
    id: str
    session: str
    dir: Path
    input_name: str
    settings: dict
    loras: list = field(default_factory=list)  # file names under loras/
    embeddings: list = field(default_factory=list)  # [file name under embeddings/, token]
    status: str = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    message: str = ""
    output: str | None = None  # file name in dir
    progress: dict = field(default_factory=dict)
    note: str = ""
    resumable: bool = False
    attempts: int = 0
    # runtime only
    version: int = 0
    events: int = 0
    fraction: float = 0.0
    cancel_requested: bool = False
    previews: dict = field(default_factory=dict)
    preview_version: int = 0

    @property
    def input_path(self):
        return self.dir / self.input_name

    @property
    def output_path(self):
        return self.dir / self.output if self.output else None

    @property
    def render_dir(self):
        return self.dir / "render"

    def settings_obj(self):
        return Settings(**self.settings)

    def set_preview(self, name, image, caption):
        self.previews[name] = (image, caption)
        self.preview_version += 1

    def save(self):
        data = {k: getattr(self, k) for k in _PERSISTED}
        tmp = self.dir / f".job.json.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / "job.json")

    @classmethod
    def load(cls, folder):
        data = json.loads((Path(folder) / "job.json").read_text())
        return cls(dir=Path(folder), **{k: data[k] for k in _PERSISTED if k in data})


@dataclass
class VideoInfo:
    name: str
    fps: float
    num_frames: int
    width: int
    height: int
    has_audio: bool
    size: int

    @property
    def duration(self):
        return self.num_frames / self.fps

    def describe(self):
        return (f"{self.name}: {self.duration:.1f} s, {self.fps:g} fps, {self.num_frames} frames, "
                f"{self.width}x{self.height}, {'with' if self.has_audio else 'no'} sound, {_megabytes(self.size)}")

    def selection(self, start=0.0, end=None, every_nth=1):
        """Frames selected by Start/End (seconds) and every n-th, as `diffutoon render` selects them."""
        first = int(round((start or 0) * self.fps))
        stop = self.num_frames if not end else min(int(round(end * self.fps)), self.num_frames)
        n = max(0, -(-(stop - first) // max(1, int(every_nth or 1))))
        return n


class JobManager:
    """Jobs of every session: checks, queue, workers (one per accelerator), persistence and resumption."""

    def __init__(self, models, data_dir, limits=None, defaults=None, keep_days=7.0, log=None):
        self.models = models
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.limits = limits or default_limits(models.kind, models.accelerator)
        self.defaults = defaults or page_defaults(models.kind, models.accelerator)
        self.keep_days = keep_days
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "sessions").mkdir(exist_ok=True)
        self.secret = self._secret("secret")  # private: session folders are hashes of it and the browser's key
        self.browser_key = self._secret("browser-key")  # sent to every browser (gr.BrowserState's encryption)
        self._cond = threading.Condition()
        self._jobs = {}
        self._pending = []
        self._threads = []
        self._stopping = False
        self._serve_dir = Path(tempfile.mkdtemp(prefix="diffutoon-ui-serve-"))
        self._demo_lock = threading.Lock()
        self.observers = []  # fn(job) after every progress event, in the worker's thread (logs, tests)

    @property
    def resumable(self):
        """Whether the pipeline keeps a render's state in its folder (render_dir) and so can continue one."""
        return PipelineFeatures.of(self.models.slots[0].pipe).resumable

    # -- lifecycle
    def start(self):
        self._prune()
        self.recover()
        for slot in self.models.slots:
            t = threading.Thread(target=self._worker, args=(slot,), name=f"diffutoon-render-{slot.device}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, timeout=5):
        with self._cond:
            self._stopping = True
            for slot in self.models.slots:
                if slot.job is not None:  # back in line at the next start; its render folder resumes it
                    slot.pipe._interrupt = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)
        shutil.rmtree(self._serve_dir, ignore_errors=True)

    def _secret(self, name):
        """A random value kept in the data folder, so that sessions survive a restart of the app."""
        path = self.data_dir / name
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32))
        return path.read_text().strip()

    # -- sessions
    @staticmethod
    def new_token():
        return secrets.token_urlsafe(32)

    def check_token(self, token):
        """The browser's session token, or a new one where it has none (or not one of ours)."""
        return token if isinstance(token, str) and _TOKEN.fullmatch(token) else self.new_token()

    def session_id(self, token):
        import hashlib

        if not (isinstance(token, str) and _TOKEN.fullmatch(token)):
            raise UIError("this page has no session; reload it")
        return hashlib.sha256(f"{self.secret}:{token}".encode()).hexdigest()[:32]

    def session_dir(self, token):
        return self.data_dir / "sessions" / self.session_id(token)

    def job(self, token, job_id):
        """The job if this session made it, else None: a session never sees another's jobs."""
        if not job_id or not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
            return None
        sid = self.session_id(token)
        with self._cond:
            job = self._jobs.get(job_id)
        if job is None:
            folder = self.data_dir / "sessions" / sid / job_id
            if (folder / "job.json").is_file():
                job = self._register(Job.load(folder))
        return job if job is not None and job.session == sid else None

    def jobs(self, token):
        sid = self.session_id(token)
        folder = self.data_dir / "sessions" / sid
        for sub in sorted(folder.iterdir()) if folder.is_dir() else []:
            if (sub / "job.json").is_file():
                self.job(token, sub.name)
        with self._cond:
            return sorted((j for j in self._jobs.values() if j.session == sid), key=lambda j: j.created)

    def latest(self, token):
        jobs = self.jobs(token)
        return jobs[-1] if jobs else None

    def _register(self, job):
        with self._cond:
            return self._jobs.setdefault(job.id, job)

    # -- inspection and submission
    def inspect(self, path, name=None):
        """Size, length and format checks of an upload, its first and last frames decoded: VideoInfo or UIError."""
        if not path:
            raise UIError("upload a video, or press \u201cUse the demo clip\u201d")
        path = Path(path)
        name = safe_name(name or path.name)
        self.limits.check_size(path, name)
        try:
            reader = vio.VideoReader(path)
            reader.read([0, reader.num_frames - 1])
        except (vio.VideoError, OSError) as e:
            raise UIError(one_line(e, {path: name})) from e
        self.limits.check_length(reader, name)
        return VideoInfo(name, reader.fps, reader.num_frames, reader.width, reader.height, reader.has_audio,
                         path.stat().st_size)

    def check(self, input_path, name, settings):
        """The checks of `diffutoon render`, with its messages: (args, reader, indices, (height, width))."""
        input_path = Path(input_path)
        self.limits.check_size(input_path, name)
        args = parse_render_args(settings.argv(input_path))
        reader, indices = open_input(args, name)
        self.limits.check_length(reader, name)
        self.limits.check_frames(len(indices))
        try:
            size = cli._check_sizes(args, reader)
        except (cli.CLIError, ValueError) as e:
            raise UIError(one_line(e)) from e
        if args.edit_prompt and not self.models.has_edit:
            raise UIError("the editing prompt needs the editing ControlNets (softedge, depth), which this app could "
                          "not load: leave Editing prompt empty")
        return args, reader, indices, size

    def submit(self, token, upload, settings, loras=(), embeddings=()):
        """Check a render request and queue it as a job of this session; UIError with a one-line message."""
        sid = self.session_id(token)
        if not upload:
            raise UIError("upload a video, or press \u201cUse the demo clip\u201d")
        upload = Path(upload)
        name = safe_name(upload.name)
        files = [("LoRA", Path(p)) for p in loras or []] + [("Textual inversion", Path(p)) for p in embeddings or []]
        for what, path in files:
            if path.suffix.lower() not in _WEIGHT_SUFFIXES:
                raise UIError(f"{what} {safe_name(path.name)}: not a weights file ({', '.join(_WEIGHT_SUFFIXES)})")
        self.check(upload, name, settings)
        with self._cond:
            active = [j for j in self._jobs.values() if j.session == sid and j.status in ACTIVE]
        if active:
            raise UIError("you already have a render in line or running: wait for it, or cancel it first")
        job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        folder = self.data_dir / "sessions" / sid / job_id
        (folder / "loras").mkdir(parents=True)
        (folder / "embeddings").mkdir()
        _link_or_copy(upload, folder / name)
        lora_names, embedding_names = [], []
        for what, path in files:
            sub, names = ("loras", lora_names) if what == "LoRA" else ("embeddings", embedding_names)
            target = folder / sub / f"{len(names)}-{safe_name(path.name, 'weights.safetensors')}"
            _link_or_copy(path, target)
            names.append(target.name)
        job = Job(job_id, sid, folder, name, asdict(settings), lora_names,
                  [[n, safe_name(Path(n).stem.partition("-")[2] or "embedding")] for n in embedding_names],
                  resumable=self.resumable)
        job.save()
        self._register(job)
        self._enqueue(job)
        return job

    def _enqueue(self, job, note=""):
        with self._cond:
            job.status, job.note, job.cancel_requested = "queued", note, False
            job.progress, job.message, job.fraction = {}, "", 0.0
            job.previews = {}
            job.preview_version += 1
            self._pending.append(job)
            job.save()
            self._changed_locked(job, everyone=True)
            self._cond.notify_all()

    def place(self, job):
        """(place in line from 1, renders running now), or (0, running) once it runs."""
        with self._cond:
            running = sum(1 for s in self.models.slots if s.job is not None)
            return (self._pending.index(job) + 1 if job in self._pending else 0), running

    def cancel(self, token, job_id):
        """Stop a job: out of the line if waiting, else at the pipeline's next window (its folder is kept)."""
        job = self.job(token, job_id)
        if job is None:
            raise UIError("no such render in this session")
        with self._cond:
            if job in self._pending:
                self._pending.remove(job)
                job.status, job.message = "cancelled", "Cancelled before it started."
                job.finished = time.time()
                job.save()
                self._changed_locked(job, everyone=True)
                return job
            if job.status in ("running", "cancelling"):
                job.cancel_requested = True
                job.status = "cancelling"
                for slot in self.models.slots:
                    if slot.job is job:
                        slot.pipe._interrupt = True  # diffusers' flag: the pipeline stops at its next window
                self._changed_locked(job)
        return job

    def resume(self, token, job_id):
        """Queue a cancelled or failed job again: with a render folder it continues where it stopped."""
        job = self.job(token, job_id)
        if job is None:
            raise UIError("no such render in this session")
        if job.status not in ("cancelled", "failed"):
            raise UIError("this render is not stopped")
        sid = self.session_id(token)
        with self._cond:
            if any(j.session == sid and j.status in ACTIVE for j in self._jobs.values()):
                raise UIError("you already have a render in line or running: wait for it, or cancel it first")
        if not job.input_path.is_file():
            raise UIError("the video of this render is gone: upload it again")
        self._enqueue(job, note="resumed" if job.resumable else "started again")
        return job

    def recover(self):
        """At start: queue again the jobs a previous run of the app left waiting or running."""
        found = []
        for folder in (self.data_dir / "sessions").glob("*/*/"):
            try:
                job = Job.load(folder)
            except (OSError, ValueError, TypeError):
                continue
            if job.status in ACTIVE:
                found.append(job)
        for job in sorted(found, key=lambda j: j.created):
            if job.status == "cancelling":
                job.status, job.message = "cancelled", "Cancelled."
                job.save()
                self._register(job)
                continue
            job.resumable = self.resumable
            self._register(job)
            self._enqueue(job, note="resumed after a restart of the app" if job.resumable
                          else "started again after a restart of the app")
            self.log(f"queued again after a restart: {job.id}")
        return found

    def _prune(self, every=3600):
        """Remove finished jobs older than keep_days (their folders, uploads and results): at start, then at most
        once an hour after a render."""
        if time.time() - getattr(self, "_pruned_at", 0) < every:
            return
        self._pruned_at = time.time()
        limit = time.time() - self.keep_days * 86400
        for folder in (self.data_dir / "sessions").glob("*/*/"):
            try:
                job = Job.load(folder)
            except (OSError, ValueError, TypeError):
                continue
            if job.status in TERMINAL and (job.finished or job.created) < limit:
                shutil.rmtree(folder, ignore_errors=True)

    # -- change notification (watchers compare versions)
    def _changed_locked(self, job, everyone=False):
        job.version += 1
        if everyone:  # places in line moved
            for other in self._pending:
                other.version += 1
        self._cond.notify_all()

    def _touch(self, job):
        with self._cond:
            self._changed_locked(job)
        for fn in list(self.observers):
            fn(job)

    def wait(self, job, timeout=None):
        """Block until the job has ended (done, failed, cancelled); returns its status."""
        deadline = None if timeout is None else time.time() + timeout
        with self._cond:
            while job.status not in TERMINAL:
                left = None if deadline is None else deadline - time.time()
                if left is not None and left <= 0:
                    raise TimeoutError(f"job {job.id} still {job.status} after {timeout} s")
                self._cond.wait(left)
        return job.status

    # -- files handed to the page
    def serve_copy(self, path, name=None):
        """A copy of `path` for Gradio to serve to this session only: under the system temp folder (Gradio may
        move files from there into its cache, whose URLs carry a hash of the content and a secret seed), never the
        data folder itself, which is not in Gradio's allowed_paths and so never served by its path."""
        path = Path(path)
        self._prune_served()
        target = self._serve_dir / secrets.token_hex(16) / safe_name(name or path.name)
        target.parent.mkdir(parents=True)
        _link_or_copy(path, target)
        return str(target)

    def _prune_served(self, age=3600):
        limit = time.time() - age
        for sub in self._serve_dir.glob("*/") if self._serve_dir.is_dir() else []:
            try:
                if sub.stat().st_mtime < limit:
                    shutil.rmtree(sub, ignore_errors=True)
            except OSError:
                pass

    def demo_clip(self):
        """The bundled demo clip (a photograph with a moving camera and a tone), made on first use."""
        path = self.data_dir / "demo-clip.mp4"
        with self._demo_lock:
            if not path.is_file():
                vio.make_demo_clip(path, num_frames=16, height=128, width=128, fps=8, overwrite=True)
        return path

    # -- the worker
    def _worker(self, slot):
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._pending.pop(0)
                slot.job = job
                job.status, job.started, job.finished = "running", time.time(), None
                job.attempts += 1
                job.save()
                self._changed_locked(job, everyone=True)
            try:
                self._run(slot, job)
                status, message = "done", ""
            except _Cancelled:
                status, message = "cancelled", self._cancel_message(job)
            except UIError as e:
                status, message = "failed", str(e)
            except Exception as e:  # a render that fails never stops the app
                status, message = "failed", one_line(e, {job.input_path: job.input_name, job.dir: "the job's folder"})
                self.log(f"render {job.id} failed: {cli._one_line(e)}")
            finally:
                slot.pipe._interrupt = False
            with self._cond:
                slot.job = None
                if self._stopping and status == "cancelled" and not job.cancel_requested:
                    job.status = "queued"  # the app is stopping: the job is resumed at its next start
                else:
                    job.status, job.message, job.finished = status, message, time.time()
                    if status == "done":
                        job.progress = {**job.progress, "stage": "done", "eta_seconds": 0}
                        job.fraction = 1.0
                job.save()
                self._changed_locked(job, everyone=True)
            self._prune()

    def _cancel_message(self, job):
        p = job.progress or {}
        where = ""
        if p.get("stage") in ("denoising", "edit", "interrupted") and p.get("steps"):
            where = f" at step {min(p.get('step', 0) + 1, p['steps'])} of {p['steps']}"
            if p.get("pass") == "edit":
                where += " of the editing branch"
        if job.resumable:
            return (f"Cancelled{where}. Its render folder is kept: Resume continues from the last completed step.")
        return (f"Cancelled{where}. This version of the pipeline cannot continue a render: Resume starts it again "
                "from the beginning.")

    def _run(self, slot, job):
        pipe = slot.pipe
        settings = job.settings_obj()
        args, reader, indices, (height, width) = self.check(job.input_path, job.input_name, settings)
        features = PipelineFeatures.of(pipe)
        n = len(indices)
        adapter = ProgressAdapter(job, pipe, self._touch, n, _windows(pipe, n, args.context_length, args.context_stride),
                                  _windows(pipe, n, *_edit_window_defaults(pipe)),
                                  job.render_dir if features.render_dir else None)
        if job.cancel_requested:
            raise _Cancelled()
        fps = reader.fps / args.every_nth
        audio = reader.path if reader.has_audio else None
        span = reader.span(indices, args.every_nth)
        out = job.dir / "result.mp4"
        edit_extra = {"detectors": slot.edit_detectors} if slot.edit_detectors else None
        kwargs = pipeline_kwargs(args, height, width, adapter.recording(slot.detector), edit_extra)
        pipe._interrupt = False
        with self._style_files(pipe, job, settings.lora_scale):
            result = self._call_pipeline(pipe, features, adapter, kwargs, reader, indices, args, height, width, out,
                                         fps, job)
        if result is not None:  # frames: write them at the source's timing with its sound
            adapter.stage("writing", 0, 1)
            vio.write_video(out, result, fps, audio_from=audio, audio_span=span, overwrite=True, progress=False)
        if not out.is_file():
            raise UIError("the render finished without writing its video")
        job.output = out.name
        adapter.stage("done", 1, 1)

    def _call_pipeline(self, pipe, features, adapter, kwargs, reader, indices, args, height, width, out, fps, job):
        """One pipeline call; returns uint8 frames to write, or None when the pipeline wrote `out` itself."""
        if features.render_dir:
            kwargs["render_dir"] = str(job.render_dir)
        if features.progress_callback:
            kwargs["progress_callback"] = adapter.callback
        if features.streams_output:  # the pipeline reads, renders and writes (with the source's audio) itself
            out.unlink(missing_ok=True)
            kwargs["video"] = vio.VideoClip(reader.path, indices=indices, height=height, width=width,
                                            policy="crop" if args.resize == "short_side" else args.resize)
            kwargs.update(output_path=str(out), fps=fps)
        else:
            kwargs["video"] = self._read(reader, indices, height, width, args.resize, adapter)
            if not (kwargs["video"].size and len(kwargs["video"])):
                raise UIError("no frames selected")
            if not args.edit_prompt:  # without the editing branch the tile ControlNet sees the video itself
                adapter.set_preview("tile", kwargs["video"][0], "Colour (the video)")
        if not features.progress_callback:
            kwargs["callback_on_step_end"] = adapter.on_step_end
        with adapter.tracking_bars() if not features.progress_callback else contextlib.nullcontext():
            output = pipe(**kwargs)
        if getattr(output, "interrupted", False) or job.cancel_requested or self._stopping:
            raise _Cancelled()  # the render folder stays; diffusers' "decode the last step" result is dropped
        colors = getattr(output, "color_frames", None)
        if colors is not None and len(colors):
            colors = vio.to_uint8(colors)
            adapter.set_preview("colors", colors[len(colors) // 2], COLOR_CAPTION)
        if features.streams_output and getattr(output, "frames", None) is None:
            return None
        return vio.to_uint8(output.frames[0])

    def _read(self, reader, indices, height, width, policy, adapter):
        frames = np.empty((len(indices), height, width, 3), np.uint8)
        i = 0
        adapter.stage("reading", 0, len(indices))
        for chunk in reader.iter_chunks(indices):
            frames[i:i + len(chunk)] = vio.resize_frames(chunk, height, width, policy)
            i += len(chunk)
            adapter.stage("reading", i, len(indices))
            if adapter.job.cancel_requested:
                raise _Cancelled()
        return frames

    @contextlib.contextmanager
    def _style_files(self, pipe, job, scale):
        """The job's LoRAs and textual inversions, loaded for its render only; the shared pipeline is restored after
        (tokenizer and embedding rows exactly, LoRA layers removed or the start-up adapters set back)."""
        loras = [job.dir / "loras" / n for n in job.loras]
        embeddings = [(job.dir / "embeddings" / n, token) for n, token in job.embeddings]
        base_names, base_weights = self.models.base_loras
        saved_tokenizer = copy.deepcopy(pipe.tokenizer) if embeddings else None
        rows = pipe.text_encoder.get_input_embeddings().num_embeddings if embeddings else None
        names = []
        try:
            for path, token in embeddings:
                try:
                    pipe.load_textual_inversion(str(path), token=token)
                except Exception as e:
                    original = path.name.partition("-")[2]
                    raise UIError(f"could not load the textual inversion {original}: "
                                  f"{one_line(e, {path: original})}") from e
            for i, path in enumerate(loras):
                name = f"ui_lora{i}"
                names.append(name)
                try:
                    pipe.load_lora_weights(str(path), adapter_name=name)
                except Exception as e:
                    original = path.name.partition("-")[2]
                    raise UIError(f"could not load the LoRA {original}: {one_line(e, {path: original})}") from e
            if names:
                pipe.set_adapters([*base_names, *names], [*base_weights, *[float(scale)] * len(names)])
            yield
        finally:
            if names:
                if base_names:
                    for name in names:
                        with contextlib.suppress(Exception):
                            pipe.delete_adapters(name)
                    pipe.set_adapters(list(base_names), list(base_weights))
                else:
                    pipe.unload_lora_weights()
            if embeddings:
                pipe.tokenizer = saved_tokenizer
                pipe.text_encoder.resize_token_embeddings(rows)


def _edit_window_defaults(pipe):
    params = inspect.signature(pipe.make_color_video).parameters if hasattr(pipe, "make_color_video") else {}
    length = params["context_length"].default if "context_length" in params else 8
    stride = params["context_stride"].default if "context_stride" in params else 4
    return length, stride


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _place_text(place):
    number, running = place
    ahead = number - 1
    text = f"Waiting in line: you are number {number}. "
    if ahead:
        text += f"{ahead} render{' is' if ahead == 1 else 's are'} ahead of you"
    else:
        text += "Yours is next"
    text += f" ({running} running now; renders run one at a time on each accelerator)."
    return text


def status_html(job, place=(0, 0), escape=html.escape):
    """The progress block of the page: words for people, data-* attributes for scripts and tests."""
    if job is None:
        return ('<div id="dt-progress" data-state="idle"><div class="dt-stage">Upload a video (or use the demo '
                'clip), then press Render.</div></div>')
    p = job.progress or {}
    state = job.status
    stage = p.get("stage") or "reading"
    if state == "queued":
        stage, text = "queued", _place_text(place)
    elif state == "done":
        stage, text = "done", f"Done in {_duration((job.finished or 0) - (job.started or 0))}."
    elif state in ("failed", "cancelled"):
        text = escape(job.message or state)
    else:
        text = STAGE_WORDS.get(stage, stage)
        if p.get("pass") == "edit" and stage == "conditions":
            text = "Editing branch: making its condition frames"
        if stage in ("denoising", "edit") and p.get("steps"):
            text += f": step {min(p.get('step', 0) + 1, p['steps'])} of {p['steps']}"
            if p.get("windows"):
                text += f", window {min(p.get('window', 0) + 1, p['windows'])} of {p['windows']}"
        elif stage in ("reading", "conditions", "decoding") and p.get("total"):
            text += f": {p.get('done', 0)} of {p['total']}"
        eta = p.get("eta_seconds")
        text += f" \u00b7 about {_duration(eta)} left" if eta else " \u00b7 estimating the time left"
        if state == "cancelling":
            text = f"Cancelling at the next window\u2026 ({text})"
    note = f'<div class="dt-note">This render was {escape(job.note)}.</div>' if job.note and state in ACTIVE else ""
    attrs = {"state": state, "stage": stage, "step": p.get("step", 0), "steps": p.get("steps", 0),
             "window": p.get("window", 0), "windows": p.get("windows", 0), "done": p.get("done", 0),
             "total": p.get("total", 0), "events": job.events, "fraction": f"{job.fraction:.4f}", "job": job.id}
    data = " ".join(f'data-{k}="{escape(str(v))}"' for k, v in attrs.items())
    return (f'<div id="dt-progress" {data}><div class="dt-stage">{text}</div>'
            f'<progress value="{job.fraction:.4f}" max="1"></progress>{note}</div>')
