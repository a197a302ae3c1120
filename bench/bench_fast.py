"""Paper mode vs fast mode (AnimateDiff-Lightning 4 steps), in one run on the same clip and machine (issue 17):
denoiser evaluations per output frame (forward hooks count the frames each UNet and ControlNet call sees), wall time
per output frame, the previews' cost per step, the quality report of both renders, and the full-size SD1.5 work per
output frame from bench/bench_flops.py's meta-device counts.

Components: the tiny architectures at a not-trivial width (UNet/ControlNet channels 64/128, CLIP width 64), 128x128
frames (16x16 latents), windows of 16 with stride 8, user-given condition frames (no annotator), reuse across windows
on (the default). The tiny weights are random: the speed is what matters here, the quality numbers mean nothing.

    python bench/bench_fast.py                  # 48 frames
    python bench/bench_fast.py --frames 16 --size 64 --no-flops
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODES = {"paper": dict(fast_mode=None), "lightning-4": dict(fast_mode="lightning-4")}


def frames_in(x):
    """Frames in a UNet input (B, C, F, h, w) or a ControlNet input (B F, C, h, w)."""
    return x.shape[0] * x.shape[2] if x.ndim == 5 else x.shape[0]


def render(pipe, video, lineart, mode, preview=None):
    import numpy as np
    import torch

    counts, stamps = {"unet": 0, "controlnet": 0}, []
    hooks = [pipe.unet.register_forward_pre_hook(lambda m, a, kw: counts.__setitem__("unet", counts["unet"] + frames_in(
        a[0] if a else kw["sample"])), with_kwargs=True)]
    for net in pipe.controlnets:
        hooks.append(net.register_forward_pre_hook(lambda m, a, kw: counts.__setitem__(
            "controlnet", counts["controlnet"] + frames_in(a[0] if a else kw["sample"])), with_kwargs=True))
    start = time.perf_counter()
    out = pipe(video=video, prompt="a girl dancing", negative_prompt="bad", conditioning_frames=[lineart, None],
               context_length=16, context_stride=8, output_type="np", generator=torch.Generator().manual_seed(0),
               callback_on_step_end=lambda p, i, t, d: stamps.append(time.perf_counter()) or {},
               progress_callback=lambda progress: None, preview=preview, **MODES[mode])
    total = time.perf_counter() - start
    for h in hooks:
        h.remove()
    n = len(video)
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return dict(mode=mode, steps=len(stamps), unet=counts["unet"] / n, controlnet=counts["controlnet"] / n,
                s_per_frame=total / n, denoise_s_per_frame=(stamps[-1] - start) / n,
                s_per_step=sum(steps) / max(len(steps), 1), report=out.report, frames=np.asarray(out.frames[0]))


def preview_cost(pipe, video, lineart, tmp):
    """Seconds per `Previewer.publish` (the default strip, linear colour map) against seconds per step."""
    from diffutoon import previews

    spent, publish = [], previews.Previewer.publish

    def timed(self, *args):
        t = time.perf_counter()
        publish(self, *args)
        spent.append(time.perf_counter() - t)

    previews.Previewer.publish = timed
    try:
        row = render(pipe, video, lineart, "paper", preview=os.path.join(tmp, "preview.png"))
    finally:
        previews.Previewer.publish = publish
    return sum(spent) / len(spent), row["s_per_step"]


def full_size_flops(size: int, num_frames: int) -> dict:
    """TFLOP per output frame of the full-size models (meta device): paper mode (10 steps, 2 CFG branches) and
    Lightning-4 (4 steps, 1 branch), reuse on, 2 ControlNets, plus the VAE decode."""
    import bench_flops as bf

    models = bf.build_models()
    windows = bf.sliding_windows(num_frames, 16, 8)
    costs = bf.part_costs(models["unet"], models["controlnet"], models["vae"], size, [e - s for s, e in windows])
    out = {}
    for mode, steps, branches in (("paper", 10, 2), ("lightning-4", 4, 1)):
        step = bf.step_flops(costs, windows, num_frames, 2, branches, "reuse")
        out[mode] = (steps * step + num_frames * costs["vae"]["decode"]) / num_frames / 1e12
    return out


def fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-flops", action="store_true", help="skip the full-size meta-device counts")
    args = parser.parse_args()

    import tempfile

    import numpy as np
    import torch

    from diffutoon.tiny import tiny_components
    from pipeline_diffutoon import DiffutoonDDIMScheduler, DiffutoonPipeline

    torch.set_num_threads(args.threads)
    pipe = DiffutoonPipeline(scheduler=DiffutoonDDIMScheduler(), **tiny_components(seed=0, channels=(64, 128), text_dim=64))
    pipe.set_progress_bar_config(disable=True)
    from diffutoon.video import demo_frames

    video = demo_frames(args.frames, args.size, args.size)  # a real photograph with camera motion
    lineart = np.ascontiguousarray(255 - video)  # any fixed condition: both modes get the same
    render(pipe, video[:16], lineart[:16], "lightning-4")  # warm-up
    rows = [render(pipe, video, lineart, mode) for mode in MODES]
    with tempfile.TemporaryDirectory() as tmp:
        publish_s, step_s = preview_cost(pipe, video, lineart, tmp)

    paper, fast = rows
    print(f"\n{args.frames} frames of {args.size}x{args.size}, windows 16/8, tiny UNet (64/128 ch), "
          f"{torch.get_num_threads()} CPU threads, {os.cpu_count()} cores")
    print("| mode | steps | UNet frame-evaluations / frame | ControlNet frame-evaluations / frame | s / frame (whole call) "
          "| s / frame (denoising) | warping error | seam score | pixel MAE |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        q = r["report"]
        print(f"| {r['mode']} | {r['steps']} | {r['unet']:.1f} | {r['controlnet']:.1f} | {r['s_per_frame']:.3f} | "
              f"{r['denoise_s_per_frame']:.3f} | {fmt(q['warping_error'], '.1f')} | {fmt(q['seam_score'], '.3f')} | "
              f"{fmt(q['pixel_mae'], '.1f')} |")
    evals = lambda r: r["unet"] + r["controlnet"]  # noqa: E731
    print(f"\nratios paper / lightning-4: UNet {paper['unet'] / fast['unet']:.2f}x, ControlNet "
          f"{paper['controlnet'] / fast['controlnet']:.2f}x, UNet + ControlNet {evals(paper) / evals(fast):.2f}x; "
          f"wall time {paper['s_per_frame'] / fast['s_per_frame']:.2f}x (whole call), "
          f"{paper['denoise_s_per_frame'] / fast['denoise_s_per_frame']:.2f}x (denoising)")
    print(f"previews: {publish_s * 1e3:.1f} ms per step (strip of {min(8, args.frames)} frames, linear colour map) = "
          f"{100 * publish_s / step_s:.2f} % of a paper-mode step ({step_s:.2f} s)")
    if not args.no_flops:
        sys.path.insert(0, os.path.join(ROOT, "bench"))
        for size in (512, 1024):
            f = full_size_flops(size, 1000)
            print(f"full-size SD1.5 + AnimateDiff + 2 ControlNets at {size}x{size}, 1000 frames, reuse on: "
                  f"{f['paper']:.1f} TFLOP per output frame (paper) vs {f['lightning-4']:.1f} (lightning-4): "
                  f"{f['paper'] / f['lightning-4']:.2f}x")


if __name__ == "__main__":
    main()
