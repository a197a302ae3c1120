"""The accelerator path of the main pass (issue 11): one sliding window of the denoiser, timed and measured.

What runs is the main pass's work for ONE window of 16 frames, as `DiffutoonPipeline._branch_noise_pred` does
it with batched CFG: both ControlNets on 2 x 16 = 32 frames, then the UNet with motion modules (the reference's
per-frame GroupNorm) on (2, 4, 16, h, w) with the summed residuals. Models: the real SD1.5 UNet + AnimateDiff v2
motion modules + 2 ControlNets v1.1 (configurations from bench_flops.py), random weights: speed and memory do
not depend on the weights. `--config tiny` uses the same block types at 1/10 of the width and one layer per block, for CPU smoke runs.

Variants, '+'-joined: `sdpa` (diffusers' AttnProcessor2_0: torch picks the kernel), `memeff` (the project's
exact memory-efficient attention, as `pipe.enable_memory_efficient_attention()`), `cl` (channels-last),
`ff` (feed-forward on at most 32,768 tokens at a time), `serial` (the CFG branches one after the other, as
`batch_cfg=False`: 16 frames per call), `compile` (torch.compile, opt-in: `--compile` adds
`memeff+compile`). Every variant's output is compared with the
first variant's of the same size and dtype (eager).

Per (size, dtype, variant): peak accelerator memory (torch.cuda.max_memory_allocated, weights included), seconds
per window and per frame-step, and achieved TFLOP/s of the UNet, the ControlNets and the whole window against
the FLOPs that bench_flops counts on the meta device, as a fraction of the device's dense fp16/bf16 peak.
Targets printed next to the results: a 1536x1536 window of 16 in <= 16 GB in fp16; >= 40 % of the dense fp16
peak in the UNet.

    python bench/bench_gpu.py --sizes 1024 1536 --out gpu-results          # CUDA; ~4 min on an H100/H200 (estimate)
    python bench/bench_gpu.py --sizes 1024 1536 --dtypes float16 --budget-s 420 --out gpu-memory  # issue 18's check:
        # measured peak next to diffutoon.memory's estimate (goal: within 15 %), s per frame-step, UNet % of fp16 peak
    python bench/bench_gpu.py --sizes 1536 --dtypes float16 --compile --out gpu-compile   # + torch.compile
    python bench/bench_gpu.py --device cpu --config tiny --sizes 64 --dtypes float32 bfloat16 --out /tmp/smoke
    python bench/bench_gpu.py --estimate-memory --sizes 1024 1536    # peak memory counted on meta, no GPU needed
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_flops  # noqa: E402
from diffutoon.memory import set_forward_chunking, window_bytes  # noqa: E402

# dense (no sparsity) fp16/bf16 tensor-core peak, TFLOP/s, by a piece of torch.cuda.get_device_name(); first match wins
PEAK_TFLOPS = [("H200", 989), ("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H800", 989), ("A100", 312),
               ("A800", 312), ("L40S", 362), ("L40", 181), ("L4", 121), ("A10G", 70), ("A10", 125), ("RTX 4090", 165),
               ("V100", 125)]
TARGET_MEMORY_GB, TARGET_UNET_FRACTION = 16.0, 0.40  # issue 11, a 1536x1536 window of 16 in fp16
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}  # rms(variant - eager) / rms(eager)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
GB = 1e9


def configs(kind):
    """(UNet, motion adapter, ControlNet) configurations: the real ones, or the same architecture narrowed."""
    unet, adapter, net = dict(bench_flops.SD15_UNET), dict(bench_flops.ANIMATEDIFF_V2), dict(bench_flops.CONTROLNET_V11)
    if kind == "tiny":  # the real block types and head counts; one layer per block, 32/64/64/64 channels, 32-wide text
        narrow = dict(block_out_channels=(32, 64, 64, 64), norm_num_groups=8, cross_attention_dim=32, layers_per_block=1)
        unet.update(narrow)
        net.update(narrow, conditioning_embedding_out_channels=(8, 8, 16, 16))
        adapter.update(block_out_channels=(32, 64, 64, 64), motion_norm_num_groups=8, motion_layers_per_block=1)
    return unet, adapter, net


def build(kind, device, dtype, controlnets=2, seed=0):
    """UNetMotionModel + `controlnets` ControlNets with random weights, built directly on `device`."""
    from diffusers import ControlNetModel, MotionAdapter, UNet2DConditionModel, UNetMotionModel

    unet_cfg, adapter_cfg, net_cfg = configs(kind)
    with torch.device("meta"):  # only to get the joined configuration
        config = UNetMotionModel.from_unet2d(UNet2DConditionModel(**unet_cfg), MotionAdapter(**adapter_cfg),
                                             load_weights=False).config
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNetMotionModel.from_config(config)
        nets = [ControlNetModel(**net_cfg) for _ in range(controlnets)]
    for net in nets:  # diffusers zero-initialises the residual convs: give them weights so the residuals matter
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            torch.nn.init.normal_(conv.weight, std=conv.weight[0].numel() ** -0.5)
    cast = lambda m: (m if dtype == torch.float32 else m.to(dtype)).eval()
    return cast(unet), [cast(net) for net in nets]


def window_flops(unet, net, size, frames, branches, controlnets):
    """FLOPs of one window (bench_flops' counter on meta copies of the same configurations)."""
    from diffusers import ControlNetModel, UNetMotionModel

    with torch.device("meta"):
        meta_unet, meta_net = UNetMotionModel.from_config(unet.config), ControlNetModel.from_config(net.config)
    u = bench_flops.unet_window_flops(meta_unet, frames, size, size)
    c = bench_flops.controlnet_frame_flops(meta_net, size, size)
    return dict(unet=branches * u["total"], controlnets=branches * frames * controlnets * c["total"],
                prefix_share=(u["conv_in"] + u["first"]) * frames / u["total"])


def peak_tflops(device, override=None):
    if override:
        return override, "given"
    if device.type != "cuda":
        return None, "CPU: no peak table"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS:
        if key in name:
            return value, name
    return None, f"{name}: not in the table (pass --peak-tflops)"


# -----------------------------------------------------------------------------------------------------------------
# One window, as the pipeline runs it

def run_controlnets(nets, latents, t, embeds, images, scale=0.5):
    b, c, f, h, w = latents.shape
    x = latents.transpose(1, 2).reshape(b * f, c, h, w)
    down, mid = None, None
    for net in nets:
        d, m = net(x, t, encoder_hidden_states=embeds, controlnet_cond=images, conditioning_scale=scale, return_dict=False)
        down = d if down is None else [p.add_(q) for p, q in zip(down, d)]  # in place, as the pipeline sums them
        mid = m if mid is None else mid.add_(m)
    return down, mid


def run_unet(unet, latents, t, embeds, down, mid):
    return unet(latents, t, encoder_hidden_states=embeds, down_block_additional_residuals=down,
                mid_block_additional_residual=mid).sample


def make_inputs(unet, size, frames, branches, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = size // 8
    latents = torch.randn(1, 4, frames, h, h, generator=g).expand(branches, -1, -1, -1, -1)  # one latent, 2 branches
    embeds = torch.randn(branches, bench_flops.TEXT_TOKENS, unet.config.cross_attention_dim, generator=g)
    images = torch.rand(frames, 3, size, size, generator=g).repeat(branches, 1, 1, 1)
    return dict(latents=latents.to(device, dtype), t=torch.tensor(999, device=device),
                embeds=embeds.repeat_interleave(frames, dim=0).to(device, dtype), images=images.to(device, dtype))


FF_ROWS = 32768  # the `ff` variant: feed-forward on at most this many tokens at a time (diffutoon.memory)


def set_variant(unet, nets, variant, ff_rows=FF_ROWS, compile_backend="inductor"):
    """Apply a variant to the models in place (attention, memory format, feed-forward chunks); returns the callables
    to run and the memory format of the inputs."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from attention_processors import enable_memory_efficient_attention

    tokens = set(variant.split("+"))
    unknown = tokens - {"sdpa", "memeff", "cl", "ff", "compile", "serial"}
    if unknown or ("sdpa" in tokens) == ("memeff" in tokens):
        raise ValueError(f"variant {variant!r}: one of sdpa / memeff, optionally +cl, +ff, +serial, +compile "
                         f"(unknown {sorted(unknown)})")
    fmt = torch.channels_last if "cl" in tokens else torch.contiguous_format
    for model in (unet, *nets):
        model.set_attn_processor(AttnProcessor2_0())
        if "memeff" in tokens:
            enable_memory_efficient_attention(model)
        set_forward_chunking(model, ff_rows if "ff" in tokens else None)
        model.to(memory_format=fmt)
    if "compile" in tokens:
        compiled = lambda m: torch.compile(m, backend=compile_backend)
        return compiled(unet), [compiled(net) for net in nets], fmt
    return unet, nets, fmt


def rel_rms(a, b):
    a, b = a.float(), b.float()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


@torch.no_grad()
def measure(unet, nets, variant, inputs, warmup, repeats, device, compile_backend="inductor"):
    """Times (first call, ControlNets, UNet) and peak memory of one variant; returns the result and the output.
    `serial` in the variant runs the CFG branches one after the other (the pipeline's batch_cfg=False)."""
    from pipeline_diffutoon import per_frame_motion_groupnorm

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    run_unet_model, run_nets, fmt = set_variant(unet, nets, variant, compile_backend=compile_backend)
    branches, frames = inputs["latents"].shape[0], inputs["latents"].shape[2]
    groups = [(b, b + 1) for b in range(branches)] if "serial" in variant.split("+") else [(0, branches)]
    calls = [(inputs["latents"][b0:b1], inputs["t"], inputs["embeds"][b0 * frames:b1 * frames],
              inputs["images"][b0 * frames:b1 * frames].contiguous(memory_format=fmt)) for b0, b1 in groups]

    def window(times=None):
        outs = []
        for latents, t, embeds, images in calls:
            sync()
            t0 = time.perf_counter()
            down, mid = run_controlnets(run_nets, latents, t, embeds, images)
            sync()
            t1 = time.perf_counter()
            outs.append(run_unet(run_unet_model, latents, t, embeds, down, mid))
            del down, mid
            sync()
            if times is not None:
                times[0] += t1 - t0
                times[1] += time.perf_counter() - t1
        return torch.cat(outs)

    with per_frame_motion_groupnorm(unet):
        sync()
        start = time.perf_counter()
        out = window()  # warm-up; compiles when the variant compiles
        first_s = time.perf_counter() - start
        for _ in range(warmup - 1):
            out = window()
        del out
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) if cuda else 0
        runs = []
        for _ in range(repeats):
            times = [0.0, 0.0]
            out = window(times)
            runs.append(times)
        peak = torch.cuda.max_memory_allocated(device) if cuda else None
    net_s, unet_s = min(runs, key=sum)
    return dict(first_call_s=first_s, controlnets_s=net_s, unet_s=unet_s, peak_bytes=peak, resident_bytes=base), out.float().cpu()


# -----------------------------------------------------------------------------------------------------------------
# Peak memory without an accelerator: tensor bytes counted on the meta device

def estimate_peak(unet, nets, size, frames, branches, ff):
    """Peak bytes of live tensors during one window (weights excluded), as `diffutoon.memory` estimates it on the
    meta device: attention as a flash kernel allocates it (its output only, no score matrix)."""
    from pipeline_diffutoon import per_frame_motion_groupnorm

    return window_bytes(unet, nets, size, size, frames, branches, memory_efficient=True,
                        ff_chunk=FF_ROWS if ff else None, motion_context=per_frame_motion_groupnorm)


def variant_estimate(unet, nets, variant, size, frames, branches):
    """The estimator's peak for what `measure` runs (no reuse cache; `serial`: one branch per call)."""
    tokens = variant.split("+")
    return estimate_peak(unet, nets, size, frames, 1 if "serial" in tokens else branches, "ff" in tokens)


def estimate_memory(kind, sizes, frames, dtype=torch.float16):
    """Table of estimated peaks (GB): batched CFG or one branch at a time, feed-forward chunked or not."""
    unet, nets = build(kind, "meta", dtype)
    weights = sum(t.numel() * t.element_size() for m in (unet, *nets) for t in [*m.parameters(), *m.buffers()])
    lines = ["| size | frames per UNet call | feed-forward | activations GB | with weights GB |", "|---|---|---|---|---|"]
    rows = []
    for size in sizes:
        for branches in (2, 1):
            for ff in (False, True):
                peak = estimate_peak(unet, nets, size, frames, branches, ff)
                rows.append(dict(size=size, branches=branches, ff=ff, activations_gb=peak / GB, total_gb=(peak + weights) / GB))
                lines.append(f"| {size} | {branches * frames} ({'batched CFG' if branches == 2 else 'one branch'}) | "
                             f"{'chunked (ff)' if ff else 'whole'} | {peak / GB:.1f} | {(peak + weights) / GB:.1f} |")
    return rows, "\n".join(lines), weights


# -----------------------------------------------------------------------------------------------------------------
# Report

def summarize(r, flops, peak, frames, coverage):
    """Derived figures of one measured row."""
    window_s = r["controlnets_s"] + r["unet_s"]
    share = flops["prefix_share"]
    row = dict(r, window_s=window_s, s_per_window_frame_step=window_s / frames,
               s_per_output_frame_step_reference=coverage * window_s / frames,
               s_per_output_frame_step_reuse_estimate=(coverage * r["unet_s"] * (1 - share) + r["unet_s"] * share
                                                       + r["controlnets_s"]) / frames,
               unet_tflops=flops["unet"] / r["unet_s"] / 1e12, controlnets_tflops=flops["controlnets"] / r["controlnets_s"] / 1e12,
               window_tflops=(flops["unet"] + flops["controlnets"]) / window_s / 1e12,
               unet_tflop=flops["unet"] / 1e12, controlnets_tflop=flops["controlnets"] / 1e12)
    for part in ("unet", "controlnets", "window"):
        row[f"{part}_fraction_of_peak"] = row[f"{part}_tflops"] / peak if peak else None
    row["peak_gb"] = r["peak_bytes"] / GB if r["peak_bytes"] is not None else None
    return row


def fmt(x, spec=".3g"):
    return "-" if x is None else f"{x:{spec}}"


def markdown(rows, peak_note):
    lines = [f"peak table: {peak_note}", "",
             "| size | dtype | variant | peak GB (weights) | estimated GB (measured / estimated) | window s | s per window frame-step | s per output frame-step, "
             "reference / reuse (est.) | UNet TFLOP/s (% peak) | ControlNets TFLOP/s (% peak) | window TFLOP/s (% peak) "
             "| vs eager (rel. rms) | first call s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['dtype']} | {r['variant']} | {r['error']} ||||||||||")
            continue
        pct = lambda key: f"{r[key + '_tflops']:.3g} ({fmt(r[key + '_fraction_of_peak'] and 100 * r[key + '_fraction_of_peak'], '.0f')} %)"
        ratio = r["peak_gb"] / r["estimate_gb"] if r["peak_gb"] is not None else None
        lines.append(f"| {r['size']} | {r['dtype']} | {r['variant']} | {fmt(r['peak_gb'], '.2f')} ({r['weights_gb']:.3g}) | "
                     f"{r['estimate_gb']:.2f} ({fmt(ratio, '.2f')}) | {r['window_s']:.3g} | {r['s_per_window_frame_step']:.3g} | "
                     f"{r['s_per_output_frame_step_reference']:.3g} / {r['s_per_output_frame_step_reuse_estimate']:.3g} | "
                     f"{pct('unet')} | {pct('controlnets')} | {pct('window')} | {r['rel_rms_vs_eager']:.1e} "
                     f"({'ok' if r['within_tolerance'] else 'OFF'}) | {r['first_call_s']:.3g} |")
    return "\n".join(lines)


def targets(rows):
    """The issue's targets against the fp16 1536x1536 rows (best variant)."""
    fp16 = [r for r in rows if r.get("dtype") == "float16" and r.get("size") == 1536 and "error" not in r]
    if not fp16:
        return "targets (1536x1536 fp16 window of 16): not measured in this run"
    lines = []
    best_mem = min(fp16, key=lambda r: r["peak_gb"] if r["peak_gb"] is not None else float("inf"))
    best_unet = max(fp16, key=lambda r: r["unet_tflops"])
    mem, frac = best_mem["peak_gb"], best_unet["unet_fraction_of_peak"]
    lines.append(f"target: 1536x1536 window of 16 (batched CFG = 32 frames) in <= {TARGET_MEMORY_GB:g} GB fp16: "
                 f"{fmt(mem, '.1f')} GB ({best_mem['variant']}) -> "
                 f"{'MET' if mem is not None and mem <= TARGET_MEMORY_GB else 'NOT MET'}")
    lines.append(f"target: >= {100 * TARGET_UNET_FRACTION:.0f} % of dense fp16 peak in the UNet: "
                 f"{fmt(frac and 100 * frac, '.1f')} % ({best_unet['variant']}, {best_unet['unet_tflops']:.0f} TFLOP/s) -> "
                 f"{'MET' if frac is not None and frac >= TARGET_UNET_FRACTION else 'NOT MET' if frac is not None else 'no peak known'}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", choices=("real", "tiny"), default=None, help="default: real on CUDA, tiny on CPU")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 1536], help="frame sizes (px, multiples of 64)")
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--variants", nargs="+", default=["sdpa", "memeff", "memeff+cl", "memeff+ff", "memeff+ff+serial"],
                        help="'+'-joined: sdpa|memeff [+cl] [+ff] [+serial] [+compile]; the first is the eager reference")
    parser.add_argument("--compile", action="store_true", help="also run memeff+compile (torch.compile; slow first call)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend: inductor, or eager (dynamo tracing only, no code generation)")
    parser.add_argument("--frames", type=int, default=bench_flops.MAIN["context_length"], help="window length")
    parser.add_argument("--branches", type=int, default=2, help="CFG branches batched in the window")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed windows per variant (the fastest is kept)")
    parser.add_argument("--peak-tflops", type=float, help="dense fp16 peak of the device, overriding the table")
    parser.add_argument("--budget-s", type=float, default=420, help="skip what is left after this many seconds")
    parser.add_argument("--estimate-memory", action="store_true",
                        help="no accelerator needed: print the peak memory counted on the meta device (fp16) and exit")
    parser.add_argument("--out", help="folder for results.json and results.md (required unless --estimate-memory)")
    args = parser.parse_args(argv)
    if args.estimate_memory:
        rows, table, weights = estimate_memory(args.config or "real", args.sizes, args.frames)
        print(f"Estimated peak of one window in fp16 ({args.config or 'real'} config, weights {weights / GB:.2f} GB; "
              f"tensor bytes on the meta device, flash-like attention, allocator slack and kernel workspaces not seen):\n")
        print(table)
        return dict(estimate=rows, weights_gb=weights / GB)
    if not args.out:
        parser.error("--out is required")

    start = time.time()
    device = torch.device(args.device)
    kind = args.config or ("real" if device.type == "cuda" else "tiny")
    variants = list(args.variants) + (["memeff+compile"] if args.compile and "memeff+compile" not in args.variants else [])
    peak, peak_note = peak_tflops(device, args.peak_tflops)
    windows = bench_flops.sliding_windows(1000, bench_flops.MAIN["context_length"], bench_flops.MAIN["context_stride"])
    coverage = sum(e - s for s, e in windows) / 1000  # windows a frame is in, on average (N = 1000)
    env = dict(device=str(device), device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               torch=torch.__version__, config=kind, peak_tflops=peak, peak_note=peak_note, frames=args.frames,
               branches=args.branches, coverage=coverage)
    print(f"bench_gpu: {env}", flush=True)
    rows = []
    over = lambda: time.time() - start > args.budget_s
    for dtype_name in args.dtypes:
        if over():
            rows += [dict(size=size, dtype=dtype_name, variant=v, error=f"skipped: past --budget-s {args.budget_s:g}")
                     for size in args.sizes for v in variants]
            continue
        dtype = DTYPES[dtype_name]
        unet, nets = build(kind, device, dtype)
        weights = sum(t.numel() * t.element_size() for m in (unet, *nets) for t in [*m.parameters(), *m.buffers()])
        for size in args.sizes:
            flops = window_flops(unet, nets[0], size, args.frames, args.branches, len(nets))
            inputs = make_inputs(unet, size, args.frames, args.branches, device, dtype)
            eager = None
            for variant in variants:
                row = dict(size=size, dtype=dtype_name, variant=variant, weights_gb=weights / GB)
                if over():
                    rows.append(dict(row, error=f"skipped: past --budget-s {args.budget_s:g}"))
                    continue
                try:
                    result, out = measure(unet, nets, variant, inputs, args.warmup, args.repeats, device,
                                          args.compile_backend)
                except Exception as e:  # out of memory, a kernel refusing a shape: record it, go on with the rest
                    rows.append(dict(row, error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:100]}"))
                    print(f"{size} {dtype_name} {variant}: {rows[-1]['error']}", flush=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                eager = out if eager is None else eager
                err = rel_rms(out, eager)
                estimate = (variant_estimate(unet, nets, variant, size, args.frames, args.branches) + weights) / GB
                row.update(summarize(result, flops, peak if dtype_name != "float32" else None, args.frames, coverage),
                           rel_rms_vs_eager=err, finite=bool(torch.isfinite(out).all()), estimate_gb=estimate,
                           within_tolerance=bool(err <= TOLERANCE[dtype_name] and torch.isfinite(out).all()))
                rows.append(row)
                print(f"{size} {dtype_name} {variant}: window {row['window_s']:.3g} s, UNet {row['unet_tflops']:.3g} "
                      f"TFLOP/s, peak {fmt(row['peak_gb'], '.2f')} GB (estimated {estimate:.2f} GB), vs eager {err:.1e}",
                      flush=True)
                del out
            del inputs
        del unet, nets
        if device.type == "cuda":
            torch.cuda.empty_cache()
    table, goal = markdown(rows, peak_note), targets(rows)
    print("\n" + table + "\n\n" + goal)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(dict(env=env, rows=rows, targets=goal, seconds=time.time() - start), fh, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as fh:
        fh.write(f"bench_gpu on {env['device_name']} (torch {env['torch']}, config {kind})\n\n{table}\n\n{goal}\n")
    print(f"\nwrote {args.out}/results.json and results.md in {time.time() - start:.0f} s")
    return dict(env=env, rows=rows, targets=goal)


if __name__ == "__main__":
    main()
