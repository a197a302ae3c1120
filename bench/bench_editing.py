"""Edited render (editing branch + FastBlend + main pass) vs the main pass alone: time split and peak host memory.

Each measurement runs in its own process so that peak RSS is its own. Tiny components at a not-trivial width
(UNet/ControlNet channels 64/128), main pass at --size, editing branch at --size / 2 (the paper: 1536 vs 512),
SPEC's defaults otherwise, with --steps main / 2 x --steps editing steps.

    python bench/bench_editing.py --frames 24 --size 128 --steps 3
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def measure(kind: str, num_frames: int, size: int, steps: int) -> dict:
    import numpy as np
    import PIL.Image
    import psutil
    import torch

    from diffutoon.tiny import tiny_components, tiny_depth_detector, tiny_lineart_detector, tiny_softedge_detector
    from fastblend import smooth_video
    from pipeline_diffutoon import FASTBLEND_DEFAULTS, DiffutoonDDIMScheduler, DiffutoonPipeline

    torch.set_num_threads(2)
    pipe = DiffutoonPipeline(scheduler=DiffutoonDDIMScheduler(),
                             **tiny_components(seed=0, channels=(64, 128), text_dim=64, edit=True))
    pipe.set_progress_bar_config(disable=True)
    y, x = np.mgrid[0:size, 0:size] / size
    video = np.stack([np.stack([np.sin(6 * x + t / 4), np.cos(5 * y - t / 4), np.sin(4 * (x + y))], -1) * 127 + 128
                      for t in range(num_frames)]).astype(np.uint8)
    edit = dict(height=size // 2, width=size // 2, num_inference_steps=2 * steps,
                detectors={"softedge": tiny_softedge_detector(), "depth": tiny_depth_detector})
    main = dict(prompt="anime", negative_prompt="bad", num_inference_steps=steps, lineart_detector=tiny_lineart_detector(),
                output_type="np", generator=torch.Generator().manual_seed(0))
    base = psutil.Process().memory_info().rss
    times = {}
    start = time.perf_counter()
    if kind == "main":
        pipe(video=video, **main)
        times["main pass"] = time.perf_counter() - start
    elif kind == "edited":
        pipe(video=video, edit_prompt="orange dress, night", edit_kwargs=edit, **main)
        times["whole edited call"] = time.perf_counter() - start
    else:  # the same work in its three parts, timed one by one
        raw = pipe.make_color_video(video, "orange dress, night", "bad", fastblend=False, **edit)
        times["editing branch (diffusion)"] = time.perf_counter() - start
        t = time.perf_counter()
        half = (size // 2, size // 2)  # the branch's frames: the video at its resolution
        guide = np.stack([np.asarray(PIL.Image.fromarray(f).resize(half, PIL.Image.LANCZOS)) for f in video])
        colors = smooth_video(raw, guide, progress=False, **{**FASTBLEND_DEFAULTS, "device": "cpu"})
        times["FastBlend"] = time.perf_counter() - t
        t = time.perf_counter()
        pipe(video=video, color_video=colors, **main)
        times["main pass"] = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(kind=kind, times=times, peak_rss_mb=peak / 2**20, call_delta_mb=(peak - base) / 2**20)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.frames, args.size, args.steps)))
        return
    rows = {}
    for kind in ("main", "edited", "split"):
        out = subprocess.run([sys.executable, __file__, "--one", kind, "--frames", str(args.frames), "--size",
                              str(args.size), "--steps", str(args.steps)], capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{kind} failed")
        rows[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        print(rows[kind], flush=True)
    split = rows["split"]["times"]
    total = sum(split.values())
    print(f"\n{args.frames} frames, main {args.size}px / {args.steps} steps, editing {args.size // 2}px / "
          f"{2 * args.steps} steps, tiny UNet (64/128 ch), 2 CPU threads")
    print("| part | seconds | share |\n|---|---|---|")
    for part, seconds in split.items():
        print(f"| {part} | {seconds:.1f} | {seconds / total:.0%} |")
    m, e = rows["main"], rows["edited"]
    print("\n| call | peak RSS MB | growth during the call MB |\n|---|---|---|")
    print(f"| main pass alone | {m['peak_rss_mb']:.0f} | {m['call_delta_mb']:.0f} |")
    print(f"| edited (branch + FastBlend + main) | {e['peak_rss_mb']:.0f} | {e['call_delta_mb']:.0f} |")
    print(f"\npeak ratio edited / main: {e['peak_rss_mb'] / m['peak_rss_mb']:.3f} "
          f"(growth ratio {e['call_delta_mb'] / max(m['call_delta_mb'], 1):.2f})")


if __name__ == "__main__":
    main()
