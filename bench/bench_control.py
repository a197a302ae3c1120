"""Extra cost of directing the look (issue 19): one row per feature, printed as a Markdown table.

    python bench/bench_control.py                 # keyframes at 256x256, scene detection on 30 s of 640x360
    python bench/bench_control.py --size 512 --seconds 60 --device cuda

- keyframes: FastBlend's interpolation (`interpolate_video`, default options: patches 23..15, 5 iterations) of two
  keyframes over a clip, seconds per frame; beside it the editing branch's FastBlend (`smooth_video`, fast mode,
  window 60) per frame on the same clip, in the same run.
- scene detection: `diffutoon.scenes.detect_cuts` over a synthetic clip with hard cuts, written with
  imageio-ffmpeg's ffmpeg, read back a chunk of frames at a time: seconds per minute of video, with and without
  decoding (decoding alone beside it).
Other issue-19 rows (style image, prompt schedules) may be added as functions returning (feature, cost, note).
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch


def clip(n, height, width, cuts=(), seed=0):
    """Slowly moving colour patterns, a new pattern after each cut: uint8 (n, H, W, 3)."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    frames, shot = [], 0
    for t in range(n):
        shot += t in cuts
        phase = 0.02 * t + 1.7 * shot + seed
        r = np.sin(6 * x + phase + shot) * 0.5 + 0.5
        g = np.cos((5 + 3 * shot) * y - phase) * 0.5 + 0.5
        b = np.sin(4 * (x + y) + 2 * phase) * 0.5 + 0.5
        frames.append(np.stack([r, g, b], -1) if shot % 2 == 0 else 1 - np.stack([g, b, r], -1))
    return (np.stack(frames) * 255).round().astype(np.uint8)


def bench_keyframes(args):
    from fastblend import interpolate_video, smooth_video

    video = clip(args.frames, args.size, args.size)
    painted = {0: 255 - video[0], args.frames - 1: np.roll(video[-1], 7, axis=1)}
    t = time.perf_counter()
    interpolate_video(video, painted, device=args.device, progress=False)
    keyframes = (time.perf_counter() - t) / args.frames
    t = time.perf_counter()
    smooth_video(video, video, mode="fast", window_size=60, device=args.device, progress=False)
    editing = (time.perf_counter() - t) / args.frames
    return ("keyframes: FastBlend interpolation", f"{keyframes:.3f} s/frame",
            f"{args.frames} frames {args.size}x{args.size} on {args.device}; the editing branch's FastBlend (fast, "
            f"window 60) on the same clip: {editing:.3f} s/frame ({keyframes / editing:.2f}x)")


def bench_scenes(args):
    from diffutoon import scenes
    from diffutoon import video as vio

    fps, n = 24, int(args.seconds * 24)
    cuts = sorted({n // 3, n // 2, 3 * n // 4})
    frames = clip(n, 360, 640, cuts)
    with tempfile.TemporaryDirectory() as tmp:
        path = vio.write_video(os.path.join(tmp, "cuts.mp4"), list(frames), fps, progress=False)
        source = vio.VideoClip(path)
        t = time.perf_counter()
        for s in range(0, n, 16):
            source.read(s, s + 16)
        decode = time.perf_counter() - t
        t = time.perf_counter()
        found = scenes.detect_cuts(source.read, n)
        with_decode = time.perf_counter() - t
    t = time.perf_counter()
    scenes.detect_cuts(lambda s, e: frames[s:e], n)
    alone = time.perf_counter() - t
    per_minute = 60 / args.seconds
    return ("scene detection (auto)", f"{with_decode * per_minute:.1f} s per minute of video",
            f"640x360 at {fps} fps, {args.seconds:g} s, cuts at {cuts}, found {found}; detection alone "
            f"{alone * per_minute:.1f} s/min, decoding alone {decode * per_minute:.1f} s/min")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="keyframe clip side (default 256)")
    parser.add_argument("--frames", type=int, default=16, help="keyframe clip frames (default 16)")
    parser.add_argument("--seconds", type=float, default=30, help="scene-detection clip length (default 30)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} CPU thread(s), device {args.device}")
    print("| feature | extra cost | measured on |\n|---|---|---|")
    for bench in (bench_keyframes, bench_scenes):
        print("| {} | {} | {} |".format(*bench(args)), flush=True)


if __name__ == "__main__":
    main()
