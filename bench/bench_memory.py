"""The memory plan (issue 18): which exact savings fit which card, what they cost, and how good the estimate is.

1. Size x budget (no accelerator needed): the real SD1.5 UNet + AnimateDiff v2 motion modules + 2 ControlNets v1.1
   + SD VAE + CLIP text encoder, fp16, windows of 16 with the paper's batched CFG and the reuse cache: the fastest
   plan `diffutoon.memory.plan_memory` finds for 512 / 1024 / 1536 in budgets of 4-24 GB (the issue's goals: 1536
   in 12 GB, 1024 in 8 GB, 512 in 4 GB), against the call as set up (memory-efficient attention counted as flash:
   output only); the bytes it moves between host and device per window (`memory.transfer_bytes`) at
   `memory.PCIE_BYTES_PER_S`, against the window's FLOPs at an assumed throughput; planning time cold (an empty
   estimate cache: set DIFFUTOON_CACHE to a new folder) and warm.
2. Time cost of each saving against none, measured on the CPU on one window (bench_gpu's `--config tiny` models,
   float32): the FLOPs are the same by construction (the same ops on the same tokens); what is slower is one CFG
   branch per call (every weight read twice, half the batch per kernel) and feed-forward chunks (more, smaller
   matmuls). A CPU's ratios are not a GPU's: bench_gpu.py measures them there.
3. The estimate (meta device, stand-in kernels) against the bytes the same calls allocate for real on the CPU
   (live tensor storages, counted by a TorchDispatchMode), tiny and mid-size models.
4. `--cold [ROOT ...]`: a cold plan for each goal, each in a new process with an empty estimate cache (the import
   timed apart; the meta copies' construction and every trace included, the loaded models' not), and one window
   trace; for this checkout and each ROOT (another checkout, e.g. main, as the baseline), interleaved, median of
   `--repeats`.

    python bench/bench_memory.py                  # all three, ~2-4 min on a busy 2-core CPU
    python bench/bench_memory.py --skip-timing    # tables 1 and 3 only
    python bench/bench_memory.py --cold /work/main --repeats 3   # table 4 only, against another checkout
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_gpu  # noqa: E402
from diffutoon import memory  # noqa: E402
from pipeline_diffutoon import per_frame_motion_groupnorm  # noqa: E402

GB = 1e9
GOALS = [(1536, "12GB"), (1024, "8GB"), (512, "4GB")]


def meta_pipeline(dtype=torch.float16):
    """What the estimator reads of a pipeline, with the real SD1.5 configurations on the meta device."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    unet, nets = bench_gpu.build("real", "meta", dtype)
    with torch.device("meta"):
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=512).to(dtype)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, max_position_embeddings=77)).to(dtype)
    return SimpleNamespace(unet=unet, controlnets=nets, edit_controlnets=[], vae=vae, text_encoder=text,
                           vae_scale_factor=8, _execution_device=torch.device("meta"))


# TFLOP per frame and CFG branch (bench/RESULTS.md "Work per frame", bench/bench_flops.py): UNet with motion modules
# in a window of 16, one ControlNet. A window with reuse runs the UNet on its 16 frames and the ControlNets on its 8
# new frames, both CFG branches.
UNET_TFLOP = {512: 1.11, 1024: 5.9, 1536: 18.8}
CONTROLNET_TFLOP = {512: 0.283, 1024: 1.72, 1536: 6.07}
SUSTAINED_TFLOPS = 20.0  # assumed fp16 throughput of a 12-16 GB card (RTX 4070 / 3080 class at ~40 % of its peak)
BUDGETS = ("4GB", "8GB", "12GB", "16GB", "24GB")


def size_budget_table():
    pipe = meta_pipeline()
    lines = ["| size | budget | fastest plan that fits (the plan line's savings) | estimated GB (peak stage) | "
             "main window: weights + activations GB | VAE decode GB | host<->device per window GB (s) | "
             "est. time vs unconstrained | planning s (cold / warm) |", "|---|---|---|---|---|---|---|---|---|"]
    for size in (1536, 1024, 512):
        setup = memory.estimate_memory(pipe, size, size, memory_efficient_attention=True,
                                       motion_context=per_frame_motion_groupnorm)
        window_tflop = 2 * (16 * UNET_TFLOP[size] + 2 * 8 * CONTROLNET_TFLOP[size])
        compute_s = window_tflop / SUSTAINED_TFLOPS
        lines.append(f"| {size}x{size} | unconstrained | as set up (batched CFG, reuse, decode 8; memory-efficient "
                     f"attention) | {setup['total'] / GB:.1f} | {setup['weights'] / GB:.1f} + {setup['window'] / GB:.1f} "
                     f"| {setup['decode'] / GB:.1f} | 0 | 1 (a window: {window_tflop:.0f} TFLOP, {compute_s:.1f} s at "
                     f"{SUSTAINED_TFLOPS:.0f} TFLOP/s) | |")
        for budget in BUDGETS:
            if memory.parse_bytes(budget) >= setup["total"]:
                continue
            start = time.time()
            try:
                plan = memory.plan_memory(pipe, size, size, memory_budget=budget,
                                          motion_context=per_frame_motion_groupnorm)
            except ValueError as error:
                largest = re.search(r"largest size that fits is (\S+)", str(error))
                lines.append(f"| {size}x{size} | {budget} | nothing fits (the error names the largest size that "
                             f"does: {largest.group(1) if largest else 'none'}) |||||||")
                continue
            cold = time.time() - start
            start = time.time()
            memory.plan_memory(pipe, size, size, memory_budget=budget, motion_context=per_frame_motion_groupnorm)
            warm = time.time() - start
            moved = memory.transfer_bytes(pipe, plan)
            moved_s = moved / memory.PCIE_BYTES_PER_S
            kernels = memory.FF_COST[plan.forward_chunk_size] * (1 if plan.batch_cfg else memory.SERIAL_CFG_COST)
            p = plan.parts
            lines.append(f"| {size}x{size} | {budget} | {', '.join(plan.enabled) or '-'} | {plan.estimate / GB:.1f} | "
                         f"{p['weights'] / GB:.1f} + {p['window'] / GB:.1f} | {p['decode'] / GB:.1f} | "
                         f"{moved / GB:.1f} ({moved_s:.2f}) | {kernels * (1 + moved_s / compute_s):.2f} | "
                         f"{cold:.2f} / {warm:.2f} |")
            print(f"plan: {plan}", flush=True)
    return "\n".join(lines)


def timing_table(size=256, frames=16, repeats=2):
    """CPU seconds of one window (ControlNets + UNet) with each saving, against none."""
    unet, nets = bench_gpu.build("tiny", "cpu", torch.float32)
    inputs = bench_gpu.make_inputs(unet, size, frames, 2, torch.device("cpu"), torch.float32)
    tokens = 2 * frames * (size // 8) ** 2
    variants = [("none (batched CFG)", None, False), ("feed-forward in chunks of 4096 tokens", 4096, False),
                ("feed-forward in chunks of 1024 tokens", 1024, False), ("one CFG branch per call", None, True),
                ("one CFG branch per call + chunks of 4096", 4096, True)]
    rows, base, reference = [], None, None
    for name, ff, serial in variants:
        for model in (unet, *nets):
            memory.set_forward_chunking(model, ff)
        groups = [(0, 1), (1, 2)] if serial else [(0, 2)]
        best, out = float("inf"), None
        with torch.no_grad(), per_frame_motion_groupnorm(unet):
            for _ in range(repeats):
                start = time.perf_counter()
                outs = []
                for b0, b1 in groups:
                    lat, emb = inputs["latents"][b0:b1], inputs["embeds"][b0 * frames:b1 * frames]
                    down, mid = bench_gpu.run_controlnets(nets, lat, inputs["t"], emb,
                                                          inputs["images"][b0 * frames:b1 * frames])
                    outs.append(bench_gpu.run_unet(unet, lat, inputs["t"], emb, down, mid))
                best, out = min(best, time.perf_counter() - start), torch.cat(outs)
        base = base or best
        reference = out if reference is None else reference
        rows.append(f"| {name} | {best:.2f} | {best / base:.2f} | {bench_gpu.rel_rms(out, reference):.1e} |")
        print(rows[-1], flush=True)
    for model in (unet, *nets):
        memory.set_forward_chunking(model, None)
    return (f"CPU, bench_gpu tiny config, {size}x{size}, a window of {frames} frames x 2 CFG branches "
            f"({tokens} tokens in the first level), float32, best of {repeats}:\n\n"
            "| saving | s per window | time vs none | output vs none (rel. rms) |\n|---|---|---|---|\n" + "\n".join(rows))


def estimate_vs_measured(rows=4):
    """The meta-device estimate against the same window run for real on the CPU."""
    lines = ["| models | size | frames x branches | feed-forward chunk | estimated MB | measured MB (CPU) | "
             "estimated / measured |", "|---|---|---|---|---|---|---|"]
    mid = dict(block_out_channels=(64, 128, 256, 256), norm_num_groups=32, cross_attention_dim=256, layers_per_block=2)
    for kind, size, frames, branches, ff in (("tiny", 128, 16, 2, None), ("tiny", 256, 8, 2, 4096),
                                             ("mid", 128, 8, 1, None), ("mid", 128, 8, 1, 1024))[:rows]:
        if kind == "mid":
            unet, nets = build_mid(mid)
        else:
            unet, nets = bench_gpu.build("tiny", "cpu", torch.float32)
        estimate = memory.window_bytes(unet, nets, size, size, frames, branches, ff_chunk=ff,
                                       motion_context=per_frame_motion_groupnorm)
        for model in (unet, *nets):
            memory.set_forward_chunking(model, ff)
        measured = memory.window_trace(unet, nets, size, size, frames, branches,
                                       motion_context=per_frame_motion_groupnorm)
        lines.append(f"| {kind} | {size}x{size} | {frames} x {branches} | {ff or '-'} | {estimate / 1e6:.1f} | "
                     f"{measured / 1e6:.1f} | {estimate / measured:.3f} |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def build_mid(narrow):
    """The SD1.5 block layout at about a fifth of its width, two layers per block, one ControlNet, on the CPU."""
    from diffusers import ControlNetModel, MotionAdapter, UNet2DConditionModel, UNetMotionModel

    unet_cfg, adapter_cfg, net_cfg = bench_gpu.configs("real")
    unet_cfg, net_cfg = dict(unet_cfg, **narrow), dict(net_cfg, **narrow)
    adapter_cfg = dict(adapter_cfg, block_out_channels=narrow["block_out_channels"], motion_norm_num_groups=32,
                       motion_layers_per_block=2)
    torch.manual_seed(0)
    unet = UNetMotionModel.from_unet2d(UNet2DConditionModel(**unet_cfg), MotionAdapter(**adapter_cfg)).eval()
    return unet, [ControlNetModel(**net_cfg).eval()]


# One cold measurement in a new process: python -c COLD ROOT SIZE BUDGET (a plan) or ROOT SIZE trace (one window
# trace: 16 frames x 1 branch, memory-efficient attention, on fresh meta copies). Prints: import s, seconds, bytes.
COLD = """
import os, sys, time
root, size, what = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sys.path[:0] = [os.path.join(root, "bench"), root]
start = time.perf_counter()
import bench_memory
from diffutoon import memory
from pipeline_diffutoon import per_frame_motion_groupnorm
imported = time.perf_counter() - start
pipe = bench_memory.meta_pipeline()  # the loaded models: not timed
start = time.perf_counter()
if what == "trace":
    unet, nets = memory.meta_copy(pipe.unet), [memory.meta_copy(n) for n in pipe.controlnets]
    start = time.perf_counter()
    result = memory.window_phases(unet, nets, size, size, 16, 1, True, None, per_frame_motion_groupnorm)
else:
    result = memory.plan_memory(pipe, size, size, memory_budget=what, motion_context=per_frame_motion_groupnorm).estimate
print(imported, time.perf_counter() - start, result)
"""


def cold_planning(roots, repeats=3):
    """Seconds of a cold plan per goal (and of one window trace) for each checkout in `roots`, new processes."""
    runs = [(size, budget) for size, budget in GOALS] + [(1024, "trace")]
    times = {(run, root): [] for run in runs for root in roots}
    results, imports = {}, {root: [] for root in roots}
    for _ in range(repeats):
        for run in runs:
            for root in roots:  # interleaved: the machine's load changes alike for each
                with tempfile.TemporaryDirectory() as cache:
                    env = dict(os.environ, DIFFUTOON_CACHE=cache, PYTHONPATH=root, OMP_NUM_THREADS="1",
                               TRANSFORMERS_VERBOSITY="error")
                    out = subprocess.run([sys.executable, "-c", COLD, root, str(run[0]), run[1]], env=env, cwd=root,
                                         capture_output=True, text=True, check=True).stdout.split()
                imports[root].append(float(out[0]))
                times[run, root].append(float(out[1]))
                results.setdefault(run, {})[root] = " ".join(out[2:])
    lines = [f"| size | budget | {' | '.join(f'{r} cold s' for r in roots)} |"
             f"{''.join(f' {roots[0]} vs {r} |' for r in roots[1:])} same estimate |",
             "|---" * (3 + 2 * len(roots) - 1) + "|"]
    for run in runs:
        medians = [statistics.median(times[run, root]) for root in roots]
        label = ("one window trace", "16 frames x 1 branch") if run[1] == "trace" else (f"{run[0]}x{run[0]}", run[1])
        lines.append(f"| {label[0]} | {label[1]} | {' | '.join(f'{m:.2f}' for m in medians)} |"
                     f"{''.join(f' {medians[0] / m:.2f} |' for m in medians[1:])} "
                     f"{'yes' if len(set(results[run].values())) == 1 else results[run]} |")
        print(lines[-1], flush=True)
    return (f"median of {repeats}, each in a new process on an empty cache; import (not included): "
            + ", ".join(f"{r} {statistics.median(imports[r]):.1f} s" for r in roots) + "\n\n" + "\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--check-rows", type=int, default=4, help="rows of table 3 (2: the tiny models only)")
    parser.add_argument("--cold", nargs="*", metavar="ROOT", help="table 4 only: cold planning time, this checkout "
                        "and each ROOT (another checkout, the baseline)")
    parser.add_argument("--repeats", type=int, default=3, help="table 4: new processes per goal and checkout")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    if args.cold is not None:
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        print("4. Cold planning time:\n\n" + cold_planning([here, *args.cold], args.repeats), flush=True)
        return
    print("1. Size x budget, fp16, windows of 16 (estimated):\n\n" + size_budget_table() + "\n", flush=True)
    if not args.skip_timing:
        print("2. Time cost of the savings (measured):\n\n" + timing_table() + "\n", flush=True)
    print("3. Estimate vs measured allocation:\n\n" + estimate_vs_measured(args.check_rows), flush=True)


if __name__ == "__main__":
    main()
