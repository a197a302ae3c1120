"""Main pass (with and without reuse across windows) vs diffusers' FreeNoise: largest UNet call, peak host memory and
seconds per denoising step.

Each (pipeline, N) runs in its own process so that peak RSS is its own. Components: the tiny architectures at
a not-trivial width (UNet/ControlNet channels 64/128, CLIP width 64), 128x128 frames (16x16 latents), 2 steps.

    python bench/bench_pipeline.py            # N = 16, 48, 96
    python bench/bench_pipeline.py --frames 16 --size 64
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
    import psutil
    import PIL.Image
    import torch

    from diffutoon.tiny import tiny_components
    from pipeline_diffutoon import DiffutoonDDIMScheduler, DiffutoonPipeline

    torch.set_num_threads(2)
    parts = tiny_components(seed=0, channels=(64, 128), text_dim=64)
    pipe = DiffutoonPipeline(scheduler=DiffutoonDDIMScheduler(), **parts)
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (num_frames, size, size, 3), dtype=np.uint8)
    lineart = rng.integers(0, 256, (num_frames, size, size, 3), dtype=np.uint8)
    biggest, stamps = [0], []
    pipe.unet.register_forward_pre_hook(lambda m, a: biggest.__setitem__(0, max(biggest[0], a[0].shape[0] * a[0].shape[2])))

    def tick(p, i, t, tensors):
        stamps.append(time.perf_counter())
        return {}

    common = dict(prompt="a girl", negative_prompt="bad", num_inference_steps=steps, guidance_scale=7.0,
                  controlnet_conditioning_scale=[0.5, 0.5], output_type="latent", callback_on_step_end=tick,
                  generator=torch.Generator().manual_seed(0))
    base_rss = psutil.Process().memory_info().rss
    start = time.perf_counter()
    if kind.startswith("diffutoon"):
        pipe.set_progress_bar_config(disable=True)
        pipe(video=video, conditioning_frames=[lineart, None], context_length=16, context_stride=8,
             reuse_across_windows=kind == "diffutoon", **common)
    else:
        from diffusers import AnimateDiffVideoToVideoControlNetPipeline

        ref = AnimateDiffVideoToVideoControlNetPipeline(
            vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet, motion_adapter=parts["motion_adapter"],
            controlnet=pipe.controlnet, scheduler=DiffutoonDDIMScheduler())
        ref.set_progress_bar_config(disable=True)
        ref.enable_free_noise(context_length=16, context_stride=8)
        pil = lambda frames: [PIL.Image.fromarray(f) for f in frames]
        ref(video=pil(video), conditioning_frames=[pil(lineart), pil(video)], strength=1.0, height=size, width=size,
            **common)
    times = [b - a for a, b in zip([start, *stamps], stamps)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(kind=kind, frames=num_frames, max_unet_frames=biggest[0], s_per_step=sum(times[1:]) / max(len(times) - 1, 1),
                first_step_s=times[0], peak_rss_mb=peak / 2**20, call_delta_mb=(peak - base_rss) / 2**20)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 48, 96])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: one measurement in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.size, args.steps)))
        return
    rows = []
    for n in args.frames:
        for kind in ("diffutoon", "diffutoon-no-reuse", "freenoise"):
            out = subprocess.run([sys.executable, __file__, "--one", kind, str(n), "--size", str(args.size),
                                  "--steps", str(args.steps)], capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                print(out.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"{kind} N={n} failed")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    print(f"\n{args.size}x{args.size}, {args.steps} steps, context 16/8, CFG 7, tiny UNet (64/128 ch); s/step excludes step 1")
    print("| N | ours: max UNet frames | FreeNoise: max UNet frames | ours s/step (reuse) | ours s/step (no reuse) | "
          "FreeNoise s/step | FN / ours (reuse) | no reuse / reuse | ours peak RSS MB (call delta) | "
          "FreeNoise peak RSS MB (call delta) | call-delta ratio (FN/ours) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for ours, plain, fn in zip(rows[::3], rows[1::3], rows[2::3]):
        print(f"| {ours['frames']} | {ours['max_unet_frames']} | {fn['max_unet_frames']} | {ours['s_per_step']:.2f} | "
              f"{plain['s_per_step']:.2f} | {fn['s_per_step']:.2f} | {fn['s_per_step'] / ours['s_per_step']:.2f} | "
              f"{plain['s_per_step'] / ours['s_per_step']:.2f} | {ours['peak_rss_mb']:.0f} ({ours['call_delta_mb']:.0f}) | "
              f"{fn['peak_rss_mb']:.0f} ({fn['call_delta_mb']:.0f}) | {fn['call_delta_mb'] / max(ours['call_delta_mb'], 1):.2f} |")


if __name__ == "__main__":
    main()
