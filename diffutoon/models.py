"""Where the models come from and how they load, for the `diffutoon` command and the web app alike: the reference
models' Hub ids, the checks that every source exists (a path, or a Hub id that is cached or downloadable), loading the
pipeline with its LoRAs and textual inversions, and the one-line errors when something cannot load.

    sources, embeddings = _model_sources(args)    # args: the model options of `diffutoon render` / `diffutoon ui`
    _check_sources(sources)                        # CLIError naming the model, before any download
    pipe, detector = _load_pipeline(args, *_torch_setup(args))
"""

import contextlib
import re
import sys
from pathlib import Path

# Hub ids of the reference models (SPEC.md section 1-2). The base is any SD1.5 checkpoint; the paper used
# an anime one (AingDiffusion v12, not on the Hub): pass yours with --base (Hub id, folder, or one file).
DEFAULT_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_MOTION_ADAPTER = "guoyww/animatediff-motion-adapter-v1-5-2"
DEFAULT_LINEART = "lllyasviel/control_v11p_sd15_lineart"
DEFAULT_TILE = "lllyasviel/control_v11f1e_sd15_tile"
DEFAULT_SOFTEDGE = "lllyasviel/control_v11p_sd15_softedge"
DEFAULT_DEPTH = "lllyasviel/control_v11f1p_sd15_depth"
DEFAULT_ANNOTATORS = "lllyasviel/Annotators"  # controlnet-aux LineartDetector weights
# the reference's negative prompt is this A1111 embedding alone (10 vectors); repo/file form, see _hub_file
DEFAULT_NEGATIVE_TOKEN = "verybadimagenegative_v1.3"
DEFAULT_NEGATIVE_EMBEDDING = "gemasai/verybadimagenegative_v1.3/verybadimagenegative_v1.3.pt"
DEFAULT_PROMPT = "best quality, perfect anime illustration, light"


class CLIError(Exception):
    """An error whose message is shown to the user as one line (exit status 2)."""


def _hub_file(source):
    """Split "owner/repo/path/file.ext" into ("owner/repo", "path/file.ext"); anything else is (source, None)."""
    parts = source.split("/")
    if not Path(source).exists() and len(parts) >= 3 and "." in parts[-1]:
        return "/".join(parts[:2]), "/".join(parts[2:])
    return source, None


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_WEIGHTS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def _check_sources(sources):
    """Before loading anything: every source is an existing path or a Hub id, and a Hub id that is not
    cached needs a reachable Hub (else one line naming it, instead of minutes of retries)."""
    for option, source in sources:
        repo, weight_name = _hub_file(source)
        looks_like_path = source.startswith((".", "/", "~")) or (source.endswith(_WEIGHTS) and not weight_name)
        if not _is_local(source) and (looks_like_path or not _HUB_ID.fullmatch(repo)):
            raise CLIError(f"{option} {source}: no such file or folder (and not a Hub id like owner/name)")
    missing = _uncached(sources)
    if missing and not _hub_reachable():
        raise _missing_error(missing)


def _hub_reachable(timeout=5):
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def _is_local(source):
    return Path(source).expanduser().exists()


def _uncached(sources):
    """Those Hub sources (option, id) that have no snapshot in the local Hugging Face cache."""
    from huggingface_hub import snapshot_download

    missing = []
    for option, source in sources:
        if not source or _is_local(source):
            continue
        repo, _ = _hub_file(source)
        try:
            snapshot_download(repo, local_files_only=True)
        except Exception:
            missing.append((option, repo))
    return missing


def _load_error(e, sources):
    """Turn a loading failure into one line naming the model to fetch, when a model is missing locally."""
    missing = _uncached(sources)
    if missing:
        return _missing_error(missing)
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return CLIError(f"could not load the models: {type(e).__name__}: {first}")


def _missing_error(missing):
    option, repo = missing[0]
    more = f" (also not cached: {', '.join(r for _, r in missing[1:])})" if len(missing) > 1 else ""
    return CLIError(f"model {repo!r} ({option}) is not in the local Hugging Face cache and could not be "
                    f"downloaded (Hub unreachable or offline, wrong id, or gated): fetch it with `hf download {repo}` "
                    f"(or huggingface-cli download {repo}) where there is internet, or pass a local path with "
                    f"{option}, then rerun{more}")


def _spec(text, default):
    source, _, extra = text.rpartition("@") if "@" in text else (text, "", "")
    return source, extra or default


def _embedding(text):
    """"SOURCE[@TOKEN]" -> (source, token); the token defaults to the file's stem, as in A1111."""
    source, token = _spec(text, "")
    return source, token or Path(_hub_file(source)[1] or source).stem


def _model_sources(args):
    """[(option, source)] of every model the render loads, and the embeddings as [(source, token)]."""
    sources = [("--base", args.base), ("--motion-adapter", args.motion_adapter),
               ("--lineart-controlnet", args.lineart_controlnet), ("--tile-controlnet", args.tile_controlnet),
               ("--annotators", args.annotators)]
    embeddings = [_embedding(t) for t in args.textual_inversion]
    if DEFAULT_NEGATIVE_TOKEN in (args.negative_prompt or "") and DEFAULT_NEGATIVE_TOKEN not in [t for _, t in embeddings]:
        embeddings.append(_embedding(DEFAULT_NEGATIVE_EMBEDDING))  # else the keyword is silently mere words
    sources += [("--textual-inversion", source) for source, _ in embeddings]
    for text in args.lora:
        try:
            float(_spec(text, "1.0")[1])
        except ValueError:
            raise CLIError(f"--lora {text}: the scale after @ must be a number, e.g. {_spec(text, '')[0]}@0.8")
        sources.append(("--lora", _spec(text, "")[0]))
    if args.edit_prompt:
        sources += [("--softedge-controlnet", args.softedge_controlnet), ("--depth-controlnet", args.depth_controlnet)]
    return sources, embeddings


def _load_pipeline(args, device, dtype):
    sources, embeddings = _model_sources(args)
    module = _import_pipeline()
    kw = {"edit_controlnets": [args.softedge_controlnet, args.depth_controlnet]} if args.edit_prompt else {}
    try:
        pipe = module.DiffutoonPipeline.from_models(args.base, args.motion_adapter,
                                                    controlnets=[args.lineart_controlnet, args.tile_controlnet],
                                                    torch_dtype=dtype, **kw)
        for source, token in embeddings:
            repo, weight_name = _hub_file(source)
            with _naming("--textual-inversion", source, "a textual inversion"):
                pipe.load_textual_inversion(repo, token=token, **({"weight_name": weight_name} if weight_name else {}))
        _load_loras(pipe, args.lora)
        _import_style().load_style_adapter(pipe, args)  # --style-image: the IP-Adapter of --ip-adapter
        pipe.enable_memory_efficient_attention()  # exact; what lets 1536x1536 frames fit (paper 3.3)
        from controlnet_aux import LineartDetector

        detector = LineartDetector.from_pretrained(args.annotators)
    except CLIError:
        raise
    except Exception as e:
        raise _load_error(e, sources) from e
    return pipe.to(device), detector.to(device) if hasattr(detector, "to") else detector


def _load_loras(pipe, loras):
    if not loras:
        return
    if not hasattr(pipe, "load_lora_weights"):
        raise CLIError("this pipeline cannot load LoRAs (no load_lora_weights); drop --lora")
    names, scales = [], []
    for i, text in enumerate(loras):
        source, scale = _spec(text, "1.0")
        scales.append(float(scale))  # checked in _model_sources
        repo, weight_name = _hub_file(source)
        names.append(f"lora{i}")
        with _naming("--lora", source, "a LoRA"):
            pipe.load_lora_weights(repo, adapter_name=names[-1], **({"weight_name": weight_name} if weight_name else {}))
    pipe.set_adapters(names, adapter_weights=scales)


@contextlib.contextmanager
def _naming(option, source, what):
    """A file the user named that fails to load: say which option and file, not only the library's error."""
    try:
        yield
    except Exception as e:
        if _uncached([(option, source)]):
            raise  # not downloaded: _load_error says how to fetch it
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CLIError(f"{option} {source}: could not load it as {what} ({type(e).__name__}: {first})") from e



# ---------------------------------------------------------------------------------------------- limits, devices
def _check_model_limits(args):
    """--context-length against the motion modules' positions and --clip-skip against the text encoder's layers, read
    from the models' config files: wrong values fail here, not after minutes of loading."""
    from diffusers import MotionAdapter
    from transformers import AutoConfig

    try:
        limit = MotionAdapter.load_config(args.motion_adapter).get("motion_max_seq_length", 32)
    except Exception:  # unreadable here: loading reports it with the model's name
        limit = None
    if limit is not None and args.context_length > limit:
        raise CLIError(f"--context-length {args.context_length} exceeds the motion modules' limit of {limit} frames "
                       f"({args.motion_adapter}): use --context-length {limit} or less")
    try:
        layers = AutoConfig.from_pretrained(args.base, subfolder="text_encoder").num_hidden_layers
    except Exception:  # a single-file checkpoint: the pipeline checks clip_skip before any model runs
        layers = None
    if layers is not None and args.clip_skip >= layers:
        raise CLIError(f"--clip-skip {args.clip_skip} is not below the text encoder's {layers} layers ({args.base}): "
                       f"use --clip-skip {layers - 1} or less (1 is A1111's 'clip skip 2')")


def _torch_setup(args):
    import torch

    device = _check_device(args.device)
    dtype = args.dtype
    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    return device, getattr(torch, dtype)


def _check_device(device):
    """--device as torch names it ("auto" resolved), or one line saying why it cannot be used here."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {device}: not a device name; use auto, cpu, cuda, cuda:1 or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(kind.type, False):
        raise CLIError(f"--device {device}: no {kind.type} device here; use --device auto or cpu")
    if kind.type == "cuda" and kind.index is not None and kind.index >= torch.cuda.device_count():
        raise CLIError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _import_pipeline():
    try:
        import pipeline_diffutoon
    except ImportError:
        # a source checkout that is not pip-installed: the module sits beside the package
        sys.path.append(str(Path(__file__).resolve().parents[1]))
        import pipeline_diffutoon
    return pipeline_diffutoon


def _import_style():
    from . import style  # torch: imported once a render starts, not for --help

    return style

