"""Public API: smooth_video and interpolate_video (uint8 frames or PIL images in, the same form out)."""

import numpy as np
import torch
from tqdm.auto import tqdm

from . import modes
from .patchmatch import MatchConfig, patch_match, pyramid_sizes

MODES = ("fast", "balanced", "accurate")


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _as_arrays(frames, name):
    """frames: uint8 array (N, H, W, 3), or a sequence of uint8 (H, W, 3) arrays / PIL images.
    Returns (list of views, kind) without copying arrays."""
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4:
            raise ValueError(f"{name}: expected an (N, H, W, 3) array, got shape {frames.shape}")
        arrays, kind = list(frames), "ndarray"
    else:
        arrays, kind = [], "list"
        for f in frames:
            if hasattr(f, "convert") and hasattr(f, "size"):  # PIL image
                arrays.append(np.asarray(f.convert("RGB")))
                kind = "pil"
            else:
                arrays.append(np.asarray(f))
    if not arrays:
        raise ValueError(f"{name}: no frames")
    for i, a in enumerate(arrays):
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
            raise ValueError(f"{name}[{i}]: expected uint8 (H, W, 3), got {a.dtype} {a.shape}")
        if a.shape != arrays[0].shape:
            raise ValueError(f"{name}[{i}] is {a.shape[:2]}, {name}[0] is {arrays[0].shape[:2]}: sizes differ")
    return arrays, kind


def _output_buffer(out, n, shape):
    """Where the finished frames go: the caller's `out` (checked), or a list."""
    if out is None:
        return [None] * n
    if getattr(out, "dtype", None) != np.uint8 or tuple(getattr(out, "shape", ())) != (n, *shape):
        raise ValueError(
            f"out must be a uint8 array of shape {(n, *shape)}, got {getattr(out, 'dtype', type(out).__name__)} "
            f"{tuple(getattr(out, 'shape', ()))}"
        )
    return out


def _as_output(frames, kind, out):
    if out is not None:
        if hasattr(out, "flush"):  # numpy memmap
            out.flush()
        return out
    if kind == "ndarray":
        return np.stack(frames)
    if kind == "pil":
        from PIL import Image

        return [Image.fromarray(f) for f in frames]
    return frames


def _positive_int(value, name, minimum=1):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _config(minimum_patch_size, num_iter, guide_weight, initialize, tracking_window_size, cost, shape):
    _positive_int(minimum_patch_size, "minimum_patch_size")
    if minimum_patch_size % 2 == 0:
        raise ValueError(f"minimum_patch_size must be odd, got {minimum_patch_size}")
    _positive_int(num_iter, "num_iter")
    _positive_int(tracking_window_size, "tracking_window_size", 0)
    if not guide_weight >= 0:
        raise ValueError(f"guide_weight must be >= 0, got {guide_weight!r}")
    if initialize not in ("identity", "random"):
        raise ValueError(f"initialize must be 'identity' or 'random', got {initialize!r}")
    cfg = MatchConfig(
        minimum_patch_size=minimum_patch_size, num_iter=num_iter, guide_weight=float(guide_weight),
        initialize=initialize, tracking_window_size=tracking_window_size, cost=cost,
    )
    pyramid_sizes(shape[0], shape[1], cfg.max_patch_size)  # raises before any work if too small
    return cfg


class _Matcher:
    """Runs PatchMatch batches on one device with one seeded generator; counts matches."""

    def __init__(self, cfg, device, seed, bar):
        self.cfg, self.device, self.bar = cfg, device, bar
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(seed)

    def __call__(self, items):
        sg, tg, ss = (torch.stack(x) for x in zip(*items))
        _, out = patch_match(sg, tg, ss, self.cfg, self.gen)
        if self.bar is not None:
            self.bar.update(len(items))
        return list(out)


class _threads:
    """Temporarily set torch's CPU thread count (None: leave it). One thread is often faster on a
    busy machine: the kernels run many short parallel regions that wait for every thread."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.saved = torch.get_num_threads()
        if self.n:
            torch.set_num_threads(_positive_int(self.n, "num_threads"))

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


def _loader(arrays, device):
    """Frame i as a float32 (H, W, 3) tensor on the device, converted when asked for (streaming)."""
    def load(i):
        a = arrays[i]
        return (torch.from_numpy(a) if a.flags.writeable else torch.tensor(a)).to(device=device, dtype=torch.float32)

    return load


def _to_uint8(img):
    return img.clamp(0, 255).to(torch.uint8).cpu().numpy()  # clip then truncate, as the reference


def smooth_video(
    style_frames, guide_frames, mode="fast", window_size=15, batch_size=8, minimum_patch_size=5,
    num_iter=5, guide_weight=10.0, device=None, progress=True, initialize="identity",
    tracking_window_size=0, seed=0, num_threads=None, out=None,
):
    """Deflicker `style_frames` by blending every frame with its neighbours in [t-W, t+W], warped
    onto it by PatchMatch guided by `guide_frames` (FastBlend). Frames: uint8 (N, H, W, 3) array,
    or a list of uint8 (H, W, 3) arrays or PIL images; returns the same form. mode: "fast"
    (Fenwick tree, default), "balanced" or "accurate". tracking_window_size: accurate mode only.
    device: None picks CUDA when present, else CPU. num_threads: torch CPU threads during the call
    (None: unchanged). seed: the PatchMatch random generator's seed (the output is deterministic).
    out: an array-like of shape (N, H, W, 3) uint8 (e.g. a numpy memmap) that receives every frame
    as soon as it is finished, and is returned; then no frame is kept in RAM. Inputs may be numpy
    memmaps too: frames are read one at a time, when a batch needs them."""
    style, kind = _as_arrays(style_frames, "style_frames")
    guide, _ = _as_arrays(guide_frames, "guide_frames")
    if len(style) != len(guide):
        raise ValueError(f"{len(style)} style frames but {len(guide)} guide frames")
    if style[0].shape != guide[0].shape:
        raise ValueError(f"style frames are {style[0].shape[:2]} but guide frames are {guide[0].shape[:2]}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    window = _positive_int(window_size, "window_size")
    batch = _positive_int(batch_size, "batch_size")
    cost = "mean_style" if mode == "accurate" else "style"
    if mode != "accurate" and tracking_window_size:
        raise ValueError("tracking_window_size is used by the accurate mode and interpolation only")
    cfg = _config(minimum_patch_size, num_iter, guide_weight, initialize, tracking_window_size, cost, style[0].shape)
    device = torch.device(device or default_device())
    n = len(style)
    result = _output_buffer(out, n, style[0].shape)
    total = {
        "fast": modes.fast_match_count(n, window),
        "balanced": sum(min(t + window + 1, n) - max(t - window, 0) - 1 for t in range(n)),
        "accurate": sum(min(t + window + 1, n) - max(t - window, 0) for t in range(n)),
    }[mode]
    bar = tqdm(total=total, desc=f"FastBlend {mode}", unit="match") if progress else None
    match = _Matcher(cfg, device, seed, bar)
    run = getattr(modes, mode)
    with torch.inference_mode(), _threads(num_threads):
        for t, img in run(_loader(guide, device), _loader(style, device), n, window, batch, match):
            result[t] = _to_uint8(img)
    if bar is not None:
        bar.close()
    return _as_output(result, kind, out)


def interpolate_video(
    guide_frames, keyframes, keyframe_indices=None, batch_size=8, minimum_patch_size=15, num_iter=5,
    guide_weight=10.0, device=None, progress=True, initialize="identity", tracking_window_size=0, seed=0,
    num_threads=None, out=None,
):
    """Render every guide frame from a few stylised keyframes (FastBlend interpolation).
    keyframes: {frame index: image}, or a sequence of images with `keyframe_indices`. Frames as in
    smooth_video; returns len(guide_frames) frames in the form of guide_frames, or `out` filled with
    them. Other options as in smooth_video."""
    guide, kind = _as_arrays(guide_frames, "guide_frames")
    if isinstance(keyframes, dict):
        if keyframe_indices is not None:
            raise ValueError("give keyframe indices either as dict keys or as keyframe_indices, not both")
        keyframe_indices, keyframes = list(keyframes.keys()), list(keyframes.values())
    if keyframe_indices is None:
        raise ValueError("keyframe_indices is required when keyframes is not a dict")
    keys = [int(k) for k in keyframe_indices]
    style, _ = _as_arrays(keyframes, "keyframes")
    n = len(guide)
    if len(keys) != len(style):
        raise ValueError(f"{len(style)} keyframes but {len(keys)} keyframe indices")
    for k in keys:
        if not 0 <= k < n:
            raise ValueError(f"keyframe index {k} is out of range for {n} guide frames")
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate keyframe indices: {keys}")
    if style[0].shape != guide[0].shape:
        raise ValueError(f"keyframes are {style[0].shape[:2]} but guide frames are {guide[0].shape[:2]}")
    batch = _positive_int(batch_size, "batch_size")
    single = len(keys) == 1
    if tracking_window_size and single and 2 * tracking_window_size >= batch:
        raise ValueError("batch_size must be larger than 2 * tracking_window_size")
    cfg = _config(
        minimum_patch_size, num_iter, guide_weight, initialize, tracking_window_size,
        "style" if single else "pairwise", guide[0].shape,
    )
    device = torch.device(device or default_device())
    result = _output_buffer(out, n, guide[0].shape)
    bar = tqdm(total=n * (1 if single else 2), desc="FastBlend interpolate", unit="match") if progress else None
    match = _Matcher(cfg, device, seed, bar)
    slot = {k: i for i, k in enumerate(keys)}
    load_style = _loader(style, device)
    with torch.inference_mode(), _threads(num_threads):
        stream = modes.interpolate(_loader(guide, device), lambda k: load_style(slot[k]), keys, n, batch, match, match)
        for m, img in stream:
            result[m] = _to_uint8(img)
    if bar is not None:
        bar.close()
    return _as_output(result, kind, out)
