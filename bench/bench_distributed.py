"""One video over several processes (issue 12): speed-up vs processes on this CPU (gloo) and bytes moved per step,
and a model of what it buys on 8 GPUs and on 4 nodes x 8 GPUs.

    python bench/bench_distributed.py --frames 48 --size 128 --steps 3     # 1 process vs 2, tiny models, gloo
    python bench/bench_distributed.py --model                              # the 1,000-frame 1536x1536 model only

Measured: the same render (tiny architectures at --channels, CFG 7, windows 16/8, given condition frames) in one
process with 1 and with 2 torch threads, and in 2 processes of 1 thread each, forked from this one and joined in a
gloo process group; the pipeline call's wall time (after a warm-up call), the frames compared bit for bit, and the
tensor bytes each process received per denoising step (counted by diffutoon.distributed.Group).
"""

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The model's inputs. FLOPs: issue 11's counts (torch's FLOP counter, SD1.5 + AnimateDiff v2 + ControlNet v1.1),
# TFLOP per frame and CFG branch at 1536x1536; the VAE decoder's from bench/RESULTS.md (issue 3).
UNET_TFLOP, CONTROLNET_TFLOP, VAE_DECODE_TFLOP = 18.8, 6.07, 15.0
PEAK_TFLOPS, UTILISATION = 989.0, 0.40  # H100 SXM dense fp16 peak; issue 11's target fraction of it in the UNet
NVLINK_GBS, IB_GBS = 450.0, 50.0  # per GPU and direction: NVLink 4 (H100), one 400 Gb/s InfiniBand port per GPU
HOP_LATENCY_S = {"nvlink": 20e-6, "ib": 50e-6}  # one send/recv of the chain, besides its bytes
HOST_S_PER_FRAME = 0.6e-3  # host work per latent frame per step (scheduler step, assembly copies): measured below


def render_kwargs(frames: int, size: int, steps: int):
    import numpy as np
    import torch

    video = np.random.default_rng(0).integers(0, 256, (frames, size, size, 3), dtype=np.uint8)
    lineart = np.random.default_rng(1).integers(0, 256, (frames, size, size, 3), dtype=np.uint8)
    return dict(video=video, prompt="a girl dancing", negative_prompt="bad", num_inference_steps=steps,
                conditioning_frames=[lineart, None], output_type="np", generator=torch.Generator().manual_seed(0))


def timed_render(pipe, frames, size, steps):
    import numpy as np
    import torch.distributed as dist

    import pipeline_diffutoon

    pipe(**render_kwargs(frames, size, 1))  # warm-up: allocator, first calls, the process group's first messages
    groups, made = [], pipeline_diffutoon.process_group
    pipeline_diffutoon.process_group = lambda d: groups.append(made(d)) or groups[-1]
    try:
        steps_bytes = []
        if dist.is_initialized():
            from diffutoon.distributed import Group

            denoise = Group.denoise

            def counted(self, *args, **kwargs):  # bytes received by one denoising step
                before = self.bytes_received
                out = denoise(self, *args, **kwargs)
                steps_bytes.append(self.bytes_received - before)
                return out

            Group.denoise = counted
            dist.barrier()
        start, cpu = time.perf_counter(), time.process_time()
        out = pipe(**render_kwargs(frames, size, steps)).frames
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        pipeline_diffutoon.process_group = made
    total = groups[-1].bytes_received if groups and groups[-1] else 0
    return {"seconds": seconds, "cpu": cpu, "frames": None if out is None else np.asarray(out[0]),
            "step_bytes": max(steps_bytes, default=0), "call_bytes": total}


def _worker(rank, world, init, queue, pipe, args):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    queue.put((rank, timed_render(pipe, args.frames, args.size, args.steps)))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def measure(args):
    import numpy as np
    import torch

    from diffutoon.tiny import build_tiny_pipeline
    from pipeline_diffutoon import sliding_windows

    pipe = build_tiny_pipeline(seed=0, channels=tuple(args.channels), text_dim=args.channels[0])
    pipe.set_progress_bar_config(disable=True)
    windows = sliding_windows(args.frames, 16, 8)
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        best = min((timed_render(pipe, args.frames, args.size, args.steps) for _ in range(args.repeat)),
                   key=lambda r: r["seconds"])
        rows.append((f"1 process, {threads} thread{'s' * (threads > 1)}", best, None))
    torch.set_num_threads(1)
    for world in args.procs:
        runs = []
        for _ in range(args.repeat):
            queue, ctx = multiprocessing.get_context("fork").SimpleQueue(), multiprocessing.get_context("fork")
            init = tempfile.mktemp(prefix="bench-rendezvous-")
            procs = [ctx.Process(target=_worker, args=(r, world, init, queue, pipe, args)) for r in range(world)]
            for p in procs:
                p.start()
            results = dict(queue.get() for _ in procs)
            for p in procs:
                p.join()
            runs.append(results)
        best = min(runs, key=lambda r: r[0]["seconds"])
        rows.append((f"{world} processes, 1 thread each", best[0], best))
    reference = rows[0][1]
    print(f"\n{args.frames} frames of {args.size}x{args.size} ({args.size // 8}x{args.size // 8} latents), "
          f"{len(windows)} windows of 16 (stride 8), {args.steps} steps, UNet/ControlNet channels {args.channels}; "
          f"best of {args.repeat}\n")
    print("| run | wall s | wall speed-up | CPU s of the busiest process | CPU speed-up (one free core per process) | "
          "frames equal to 1 process | bytes received per step (each process) | bytes per call (each process) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, result, every in rows:
        equal = np.array_equal(result["frames"], reference["frames"])
        cpu = result["cpu"] if every is None else max(r["cpu"] for r in every.values())
        per_step = "-" if every is None else " / ".join(f"{every[r]['step_bytes']:,}" for r in sorted(every))
        per_call = "-" if every is None else " / ".join(f"{every[r]['call_bytes']:,}" for r in sorted(every))
        print(f"| {name} | {result['seconds']:.2f} | {reference['seconds'] / result['seconds']:.2f}x | {cpu:.2f} | "
              f"{reference['cpu'] / cpu:.2f}x | {'yes' if equal else 'no'} | {per_step} | {per_call} |")
    frame_bytes = 4 * (args.size // 8) ** 2 * 4
    print(f"\none latent frame's noise prediction: {frame_bytes:,} bytes; the whole prediction: "
          f"{frame_bytes * args.frames:,} bytes")


def host_cost(frames: int = 64, latent: int = 192) -> float:
    """Seconds per latent frame of the host work every process does each step whatever the number of processes, as
    the pipeline does it in memory: a zeroed accumulator and a new latent array per step, the gathered prediction
    written into the accumulator, the reference DDIM step of the whole video."""
    import numpy as np
    import torch

    from diffutoon.render_folder import HostFrames
    from diffutoon.scheduling import DiffutoonDDIMScheduler

    torch.set_num_threads(1)
    scheduler = DiffutoonDDIMScheduler()
    scheduler.set_timesteps(10)
    shape = (frames, 4, latent, latent)
    latents = HostFrames(np.random.default_rng(0).standard_normal(shape, np.float32))
    gathered = np.random.default_rng(1).standard_normal(shape, np.float32)
    best = float("inf")
    for t in scheduler.timesteps[:3]:
        start = time.perf_counter()
        noise, out = HostFrames(np.zeros(shape, np.float32)), HostFrames(np.empty(shape, np.float32))
        noise.write(0, gathered)  # the all_gather's result into the accumulator
        step = scheduler.step_function(t)
        for s in range(0, frames, 64):
            out.write(s, step(torch.from_numpy(noise.read(s, s + 64)), torch.from_numpy(latents.read(s, s + 64))).numpy())
        best = min(best, time.perf_counter() - start)
    return best / frames


def model(host_s_per_frame: float = HOST_S_PER_FRAME, frames: int = 1000, size: int = 1536, steps: int = 10):
    """Expected step time, speed-up and efficiency on K GPUs, from FLOP counts and link bandwidths."""
    from diffutoon.distributed import shares
    from pipeline_diffutoon import sliding_windows

    windows = sliding_windows(frames, 16, 8)
    latent_frame = 4 * (size // 8) ** 2 * 4  # bytes of one frame's float32 noise prediction
    tflops = PEAK_TFLOPS * UTILISATION

    def rank_tflop(share, previous_end):
        """One step of one rank: the UNet on every window frame, the ControlNets once per frame of its canonical
        chunks (from the chunk its first window starts in: the frames it shares with the previous rank again)."""
        unet = sum(e - s for s, e in share) * 2 * UNET_TFLOP
        first = max((e for _, e in windows if e <= share[0][0]), default=0)
        return unet + (share[-1][1] - first) * 2 * 2 * CONTROLNET_TFLOP

    one = rank_tflop(windows, 0)
    print(f"\n{frames} frames at {size}x{size}: {len(windows)} windows of 16 (stride 8), {steps} steps, CFG (2 branches), "
          f"2 ControlNets computed once per frame (issue 11); UNet {UNET_TFLOP} and ControlNet {CONTROLNET_TFLOP} TFLOP "
          f"per frame and branch; {tflops:.0f} TFLOP/s achieved per GPU ({UTILISATION:.0%} of {PEAK_TFLOPS:.0f}); "
          f"one step = {one / 1000:.1f} PFLOP; full-length prediction {latent_frame * frames / 1e6:.0f} MB\n")
    print("| GPUs | links | windows on the busiest rank | busiest rank TFLOP/step | compute s/step | exchange s/step "
          "(bytes received per rank) | host s/step | step s | render min (10 steps + decode) | speed-up | efficiency |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    base = None
    for gpus, link in ((1, "-"), (8, "nvlink"), (32, "ib"), (len(windows), "ib"), (2 * len(windows), "ib")):
        split = shares(windows, gpus)
        busy = [share for share in split if share]
        work = max(rank_tflop(share, 0) for share in busy)
        owned = [(share[0][0], nxt[0][0] if nxt else frames) for share, nxt in zip(busy, busy[1:] + [None])]
        payload = max(b - a for a, b in owned) * latent_frame  # all_gather pads to the largest share
        received = (gpus - 1) * payload
        chain = [busy[i][-1][1] - busy[i + 1][0][0] for i in range(len(busy) - 1)]  # shared frames, hop by hop
        if gpus == 1:
            exchange = 0.0
        else:
            bandwidth = (NVLINK_GBS if link == "nvlink" else IB_GBS) * 1e9
            exchange = received / bandwidth + sum(c * latent_frame / bandwidth + HOP_LATENCY_S[link] for c in chain)
        compute, host = work / tflops, host_s_per_frame * frames
        step = compute + exchange + host
        decode = frames * VAE_DECODE_TFLOP / tflops / len(busy)
        render = (steps * step + decode) / 60
        base = base or render
        print(f"| {gpus} | {link} | {max(len(s) for s in busy)} | {work:,.0f} | {compute:.2f} | {exchange * 1e3:.1f} ms "
              f"({received / 1e6:,.0f} MB) | {host:.2f} | {step:.2f} | {render:.1f} | {base / render:.1f}x | "
              f"{base / render / gpus:.0%} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=72, help="72: 8 windows of 16 (stride 8)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--channels", type=int, nargs=2, default=[64, 128])
    parser.add_argument("--procs", type=int, nargs="+", default=[2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="torch threads of the one-process rows")
    parser.add_argument("--repeat", type=int, default=2, help="runs per row; the fastest is reported")
    parser.add_argument("--model", action="store_true", help="only the 8 / 32 GPU model")
    args = parser.parse_args()
    if not args.model:
        measure(args)
    host = host_cost()
    print(f"\nhost work per step (every process, whatever their number): {host * 1e3:.2f} ms per 192x192 latent frame")
    model(host)


if __name__ == "__main__":
    main()
