"""Painted keyframes (issue 19): frames the user repainted, propagated over the video as the tile ControlNet's input.

`pipe(video, keyframes={0: "first.png", 120: painted})` runs FastBlend's interpolation mode (fastblend/, the
original's `interpolate_video`) guided by the source frames at the render's size: each frame between two keyframes
blends the two, each frame before the first / after the last keyframe is matched from the nearest one alone, and
every keyframe index holds its keyframe exactly. The result is the colour video, the slot the paper's editing branch
fills: the main pass then draws the lines from the video and the colours from the painting. With scene cuts the
propagation runs per shot (never across a cut); a shot with no keyframe keeps the video itself, as without keyframes.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
from pathlib import Path

import numpy as np
import PIL.Image

from . import scenes
from .distributed import broadcast_frames, process_rank
from .render_folder import CHUNK

# FastBlend options a caller may set (keyframe_kwargs); the rest of interpolate_video's arguments are ours
OPTIONS = ("batch_size", "minimum_patch_size", "num_iter", "guide_weight", "initialize", "tracking_window_size", "seed",
           "num_threads")


def _image(value, name: str) -> np.ndarray:
    """A keyframe as uint8 RGB (H, W, 3): a path, a PIL image, or an array / tensor (H, W, 3) uint8 or [0, 1] floats."""
    if isinstance(value, (str, os.PathLike)):
        if not Path(value).is_file():
            raise ValueError(f"{name}: no such image file {value}.")
        try:
            with PIL.Image.open(value) as image:
                return np.asarray(image.convert("RGB"))
        except OSError as e:
            raise ValueError(f"{name}: {value} is not an image PIL can read ({e}).") from None
    if isinstance(value, PIL.Image.Image):
        return np.asarray(value.convert("RGB"))
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
        array = array.transpose(1, 2, 0)  # (3, H, W)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"{name} has shape {array.shape}: pass an RGB image (H, W, 3), a PIL image or a file path.")
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError(f"{name} holds floats outside [0, 1]: pass uint8 pixels or divide by 255.")
        return (array * 255).round().astype(np.uint8)
    if array.min() < 0 or array.max() > 255:
        raise ValueError(f"{name} holds integers outside [0, 255]: pass uint8 pixels.")
    return array.astype(np.uint8)


def _same_aspect(h: int, w: int, ref_h: int, ref_w: int) -> bool:
    """The aspect ratios agree to within a pixel of the width."""
    return abs(w - h * ref_w / ref_h) <= 1


def check_options(options: dict | None, height: int, width: int) -> dict:
    """keyframe_kwargs: known FastBlend options, and frames big enough for its patch pyramid (else one ValueError)."""
    fastblend = importlib.import_module("fastblend")
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"keyframe_kwargs has unknown settings {unknown}: use {', '.join(OPTIONS)} (FastBlend's "
                         "interpolate_video options).")
    defaults = {k: p.default for k, p in inspect.signature(fastblend.interpolate_video).parameters.items()}
    patch, iters = options.get("minimum_patch_size", defaults["minimum_patch_size"]), options.get("num_iter", defaults["num_iter"])
    try:
        importlib.import_module("fastblend.patchmatch").pyramid_sizes(height, width, patch + 2 * (iters - 1))
    except ValueError as e:
        raise ValueError(f"keyframes: {e} (keyframe_kwargs).") from None
    return options


def load(keyframes, num_frames: int, video_size: tuple[int, int], height: int, width: int, resize) -> dict:
    """{frame index: uint8 (height, width, 3)}: each keyframe read, checked and resized as the video's frames are
    (`resize(frames (n, 3, H, W) uint8 tensor, height, width)`: centre crop to the render's aspect, then resize).

    A keyframe must have the video's aspect ratio (any resolution: painted on an exported frame) or the render's;
    an index must lie in the video's frames. Errors name the keyframe and what to change."""
    import torch

    if not isinstance(keyframes, dict) or not keyframes:
        raise ValueError("keyframes must be a non-empty dict {frame index: image (PIL, array or file path)}.")
    bad = [k for k in keyframes if isinstance(k, bool) or not isinstance(k, (int, np.integer))]
    if bad:
        raise ValueError(f"keyframes' keys must be frame indices (ints), got {bad!r}.")
    outside = sorted(int(k) for k in keyframes if not 0 <= k < num_frames)
    if outside:
        raise ValueError(f"keyframes at frames {outside} lie outside the video's {num_frames} frames (0..{num_frames - 1}): "
                         "index the frames of the video you pass (after any frame selection).")
    video_h, video_w = video_size
    out = {}
    for k in sorted(keyframes, key=int):
        name = f"keyframe {int(k)}"
        image = _image(keyframes[k], name)
        h, w = image.shape[:2]
        if (h, w) != (height, width):
            if not (_same_aspect(h, w, video_h, video_w) or _same_aspect(h, w, height, width)):
                raise ValueError(f"{name} is {w}x{h}, but the video is {video_w}x{video_h} and the render {width}x{height}: "
                                 "paint on a frame of the video (its aspect ratio, any resolution) or of the render.")
            image = resize(torch.from_numpy(np.array(image)).permute(2, 0, 1)[None], height, width)
            image = image[0].permute(1, 2, 0).numpy()
        out[int(k)] = np.ascontiguousarray(image)
    return out


def identity(keyframes: dict) -> dict:
    """What the render folder records: each keyframe's index and a hash of its pixels (as rendered)."""
    return {str(k): hashlib.sha256(f"{v.shape}".encode() + v.tobytes()).hexdigest()[:16] for k, v in keyframes.items()}


def _array(frames, writable: bool = False) -> np.ndarray:
    """A frame array's frames as one numpy array (memory-mapped for one in the render folder)."""
    return frames.array if hasattr(frames, "array") else np.load(frames.path, mmap_mode="r+" if writable else "r")


def propagate(run, source, keyframes: dict, height: int, width: int, cuts=None, options: dict | None = None,
              device=None, progress: bool = True):
    """The colour video (N, height, width, 3) of `run` (pipeline_diffutoon's render state): `keyframes` (from `load`)
    propagated by FastBlend's interpolation over each shot, guided by the video at the render's size, each keyframe
    index holding its keyframe. Made once: a resumed render reads it back. FastBlend's matches share one random
    stream, so rank 0 alone runs it and the others receive the frames."""
    n = len(source)
    colors = run.frames("keyframes/colors", (n, height, width, 3), np.uint8)[0]
    if not run.stage_done("keyframes") and not process_rank(run.group):
        interpolate = importlib.import_module("fastblend").interpolate_video
        guide, written = run.frames("keyframes/guide", (n, height, width, 3), np.uint8)  # the video at the render's size
        for chunk, start in enumerate(range(0, n, CHUNK)):
            if not written.done(chunk):
                guide.write(start, source.resized(start, start + CHUNK, height, width).permute(0, 2, 3, 1).numpy())
                written.mark(chunk)
        g, c = _array(guide), _array(colors, writable=True)
        for start, end in scenes.shots(n, cuts):  # never across a cut
            run.report(stage="keyframes", done=start, total=n)
            keys = {k - start: v for k, v in keyframes.items() if start <= k < end}
            if keys:
                interpolate(g[start:end], keys, out=c[start:end], device=device, progress=progress, **(options or {}))
            else:  # no keyframe in this shot: the video itself, the tile input without keyframes
                colors.write(start, g[start:end])
            for k, v in keys.items():  # the painted frames themselves, not FastBlend's match of them
                colors.write(start + k, v[None])
        colors.flush()
        run.report(stage="keyframes", done=n, total=n)
    run.finish_stage("keyframes")
    return broadcast_frames(run.group, colors, "sharing the keyframes' colour video")


# ------------------------------------------------------------------------------------------------------------------
# The CLI: --keyframe 120=frame120.png, --keyframe 4.5s=x.png


def parse_cli(text: str):
    """"POSITION=IMAGE" -> ((unit, value), Path): a source frame number ("120") or a time in seconds ("4.5s")."""
    position, sep, path = text.partition("=")
    try:
        if not sep or not path:
            raise ValueError
        value = ("s", float(position[:-1])) if position.endswith("s") else ("f", int(position))
    except ValueError:
        raise ValueError(f"--keyframe {text}: expected FRAME=IMAGE or SECONDSs=IMAGE, e.g. 120=frame120.png or "
                         "4.5s=frame.png") from None
    if value[1] < 0:
        raise ValueError(f"--keyframe {text}: the position must be >= 0")
    if not Path(path).is_file():
        raise ValueError(f"--keyframe {text}: no such image file {path}")
    return value, Path(path)


def select(text: str, position, fps: float, indices: list[int]) -> int:
    """The index in the selected frames `indices` (source frame numbers) of a --keyframe position. A time goes to the
    nearest selected frame; a frame number must be one of them."""
    unit, value = position
    frame = int(round(value * fps)) if unit == "s" else value
    if not indices[0] <= frame <= indices[-1]:
        raise ValueError(f"--keyframe {text}: frame {frame} is outside the rendered frames {indices[0]}..{indices[-1]} "
                         "(see --start/--end/--max-frames)")
    nearest = min(range(len(indices)), key=lambda i: abs(indices[i] - frame))
    if unit == "f" and indices[nearest] != frame:
        lower = max(i for i in indices if i < frame)
        raise ValueError(f"--keyframe {text}: frame {frame} is not rendered (--every-nth): use frame {lower} or "
                         f"{lower + indices[1] - indices[0]}")
    return nearest
