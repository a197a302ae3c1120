"""Work per output frame of Diffutoon, counted with torch's FLOP counter on the meta device (issue 11).

The real SD1.5 UNet + AnimateDiff v2 motion modules, ControlNet v1.1 and SD VAE are built from their
configurations (written below, no weights) on the meta device: no memory, no compute, a few seconds.
Each part is counted on its own, per frame and per CFG branch:

    U(f)   the UNet with motion modules on one window of f frames (its window-independent prefix split out:
           conv_in, down_blocks[0].resnets[0] and down_blocks[0].attentions[0], everything before the first
           motion module)
    C      one ControlNet on one frame
    E(f)   the editing branch's UNet (no motion modules, joint cross-frame self-attention) on a window of f
    VAE    encode / decode of one frame

and the schedules are composed from them for a video of N frames with windows w = [l, r) of f_w frames
(paper eq. 2) and B = 2 CFG branches, per denoising step:

    reference (every window runs everything; CFG as two sweeps) = B sum_w (U(f_w) + K C f_w)
    ours, reuse off (both branches in one batch)                = the same
    ours, reuse on  = B sum_w (U(f_w) - f_w (P_in + P_1)) + B N (P_in + P_1) + B N K C     (main pass)
                    = B sum_w E(f_w) + B N K C                                              (editing branch)
    floor (issue)   = B sum_w U(f_w) + B N K C   (UNet once per window a frame is in, ControlNets once per frame)

with K ControlNets, P_in = conv_in and P_1 = first ResNet + first transformer, per frame and branch (the pipeline
computes the prefix through the UNet's own forward, both branches batched, stopped after the first transformer). A render adds T steps and the VAE: main pass T S + N decode, editing branch T S + N (encode +
decode). Per output frame = divided by N.

Then, for honesty, the schedule the pipeline really runs is counted: the real denoiser with tiny models
(diffutoon.tiny), forward hooks counting the frames each module sees per step and the FLOP counter on the
whole step, compared with the same formulas fed with the tiny models' part costs.

    python bench/bench_flops.py                        # 512 / 1024 / 1536, N = 1000, tables in markdown
    python bench/bench_flops.py --sizes 1536 --frames 1000 --json flops.json
    python bench/bench_flops.py --no-measure           # skip the tiny real-denoiser check
"""

import argparse
import contextlib
import json
import os
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# -----------------------------------------------------------------------------------------------------------------
# The real configurations (the Hub's config.json files, written out: no download)

SD15_UNET = dict(  # stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True,
    freq_shift=0, downsample_padding=1, mid_block_scale_factor=1, norm_eps=1e-5, center_input_sample=False)
ANIMATEDIFF_V2 = dict(  # guoyww/animatediff-motion-adapter-v1-5-2, config.json
    block_out_channels=(320, 640, 1280, 1280), motion_layers_per_block=2, motion_mid_block_layers_per_block=1,
    motion_num_attention_heads=8, motion_norm_num_groups=32, motion_max_seq_length=32, use_motion_mid_block=True,
    conv_in_channels=None)
CONTROLNET_V11 = dict(  # lllyasviel/control_v11p_sd15_lineart (tile, softedge, depth: the same architecture)
    in_channels=4, conditioning_channels=3, conditioning_embedding_out_channels=(16, 32, 96, 256),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    norm_num_groups=32, norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
    mid_block_scale_factor=1, only_cross_attention=False, use_linear_projection=False, upcast_attention=False,
    controlnet_conditioning_channel_order="rgb")
SD_VAE = dict(  # stable-diffusion-v1-5, vae/config.json
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu", sample_size=512, scaling_factor=0.18215)
TEXT_TOKENS = 77  # one 77-token chunk (the textual-inversion negative prompt included)

# Issue 11's quoted figures, TFLOP per frame: UNet with motion modules, one ControlNet
ISSUE_FIGURES = {512: (1.11, 0.28), 1024: (5.90, 1.72), 1536: (18.8, 6.07)}

# The paper's settings (SPEC.md)
MAIN = dict(context_length=16, context_stride=8, steps=10, branches=2, controlnets=2)
EDIT = dict(size=512, context_length=8, context_stride=4, steps=20, branches=2, controlnets=2)  # 20 * 0.9 -> 20 timesteps


def build_models(device="meta", dtype=torch.float32):
    """The real-size UNet + motion modules, one ControlNet and the VAE, random (or no) weights on `device`."""
    from diffusers import AutoencoderKL, ControlNetModel, MotionAdapter, UNet2DConditionModel, UNetMotionModel

    with torch.device(device):
        unet2d = UNet2DConditionModel(**SD15_UNET)
        adapter = MotionAdapter(**ANIMATEDIFF_V2)
        unet = UNetMotionModel.from_unet2d(unet2d, adapter, load_weights=False)
        controlnet = ControlNetModel(**CONTROLNET_V11)
        vae = AutoencoderKL(**SD_VAE)
    del unet2d, adapter
    cast = lambda m: (m if dtype == torch.float32 else m.to(dtype)).eval()
    return dict(unet=cast(unet), controlnet=cast(controlnet), vae=cast(vae))


# -----------------------------------------------------------------------------------------------------------------
# Counting

def flop_counter():
    """torch's FlopCounterMode (a multiply-add = 2 FLOPs; matmuls, convolutions and attention's two matmuls;
    norms, softmax and elementwise ops are not counted), taught the CPU flash-attention op so that real CPU runs
    count attention like meta and CUDA runs do."""
    cpu_sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    formula = lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)  # as for the CUDA kernels
    return FlopCounterMode(display=False, custom_mapping={cpu_sdpa: formula})


def by_module(counter):
    """{module path: FLOPs} of a finished count (paths start with the root module's class name)."""
    return {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}


def attention_flops(counter):
    """FLOPs of attention alone: batched matmuls (QK^T and PV; diffusers' linears are mm/addmm)."""
    ops = counter.get_flop_counts().get("Global", {})
    return sum(v for op, v in ops.items() if "bmm" in str(op) or "attention" in str(op))


def _like(model):
    p = next(model.parameters())
    return dict(device=p.device, dtype=p.dtype)


@torch.no_grad()
def unet_window_flops(unet, frames, height, width, edit=False):
    """One CFG branch of the UNet on a window of `frames` frames: total FLOPs, the window-independent prefix per
    frame (conv_in; first ResNet + first transformer) and the attention part. `edit`: the editing branch's UNet
    (motion modules swapped out, joint cross-frame attention in the spatial self-attention)."""
    from attention_processors import cross_frame_attention
    from pipeline_diffutoon import without_motion_modules

    kw = _like(unet)
    x = torch.zeros(1, unet.config.in_channels, frames, height // 8, width // 8, **kw)
    text = torch.zeros(frames, TEXT_TOKENS, unet.config.cross_attention_dim, **kw)
    counter = flop_counter()
    with contextlib.ExitStack() as stack:
        if edit:
            stack.enter_context(without_motion_modules(unet))
            stack.enter_context(cross_frame_attention(unet, mode="joint")).num_frames = frames
        with counter:
            unet(x, torch.tensor(999, device=kw["device"]), encoder_hidden_states=text)
    parts, root = by_module(counter), type(unet).__name__
    first = parts.get(f"{root}.down_blocks.0.resnets.0", 0) + parts.get(f"{root}.down_blocks.0.attentions.0", 0)
    return dict(total=counter.get_total_flops(), conv_in=parts.get(f"{root}.conv_in", 0) / frames,
                first=first / frames, attention=attention_flops(counter))


@torch.no_grad()
def controlnet_frame_flops(net, height, width):
    """One ControlNet on one frame (its condition image at full resolution)."""
    kw = _like(net)
    counter = flop_counter()
    with counter:
        net(torch.zeros(1, net.config.in_channels, height // 8, width // 8, **kw), torch.tensor(999, device=kw["device"]),
            encoder_hidden_states=torch.zeros(1, TEXT_TOKENS, net.config.cross_attention_dim, **kw),
            controlnet_cond=torch.zeros(1, 3, height, width, **kw), return_dict=False)
    return dict(total=counter.get_total_flops(), attention=attention_flops(counter))


@torch.no_grad()
def vae_frame_flops(vae, height, width):
    """VAE encode (posterior mean) and decode of one frame."""
    kw = _like(vae)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    enc, dec = flop_counter(), flop_counter()
    with enc:
        vae.encode(torch.zeros(1, 3, height, width, **kw)).latent_dist.mean
    with dec:
        vae.decode(torch.zeros(1, vae.config.latent_channels, height // factor, width // factor, **kw))
    return dict(encode=enc.get_total_flops(), decode=dec.get_total_flops())


def part_costs(unet, controlnet, vae, size, window_lengths, edit=False):
    """Everything the schedules need at one frame size: U(f) (or E(f)) for each window length, C, the VAE."""
    return dict(size=size, edit=edit,
                unet={f: unet_window_flops(unet, f, size, size, edit=edit) for f in sorted(set(window_lengths))},
                controlnet=controlnet_frame_flops(controlnet, size, size), vae=vae_frame_flops(vae, size, size))


# -----------------------------------------------------------------------------------------------------------------
# Schedules

def sliding_windows(num_frames, context_length, context_stride):
    from pipeline_diffutoon import sliding_windows as windows  # the pipeline's own eq. 2

    return windows(num_frames, context_length, context_stride)


def step_flops(costs, windows, num_frames, controlnets, branches, schedule):
    """FLOPs of one denoising step over the whole video. schedule: "reference", "no_reuse", "reuse", "floor"."""
    unet, c = costs["unet"], costs["controlnet"]["total"]
    per_window = sum(branches * (unet[e - s]["total"] + controlnets * c * (e - s)) for s, e in windows)
    if schedule in ("reference", "no_reuse"):
        return per_window
    floor = sum(branches * unet[e - s]["total"] for s, e in windows) + branches * num_frames * controlnets * c
    if schedule == "floor" or costs["edit"]:  # editing branch: only the ControlNets are reused
        return floor
    prefix = lambda f: unet[f]["conv_in"] + unet[f]["first"]
    saved = sum(branches * (e - s) * prefix(e - s) for s, e in windows)
    f0 = windows[0][1] - windows[0][0]
    return floor - saved + branches * num_frames * prefix(f0)


def frame_counts(windows, num_frames, branches, schedule, edit=False):
    """Frames each module sees per step (what the hooks count) under a schedule: "no_reuse" or "reuse"."""
    window_frames = branches * sum(e - s for s, e in windows)
    counts = dict(controlnet=window_frames, unet=window_frames, conv_in=window_frames, resnet0=window_frames,
                  attention0=window_frames)
    if not edit:
        counts["motion0"] = window_frames
    if schedule == "reuse":
        counts["controlnet"] = branches * num_frames
        if not edit:
            counts.update(conv_in=branches * num_frames, resnet0=branches * num_frames, attention0=branches * num_frames)
    return counts


def render_table(costs, num_frames, settings):
    """Rows of TFLOP per output frame (per step and per render) for each schedule, plus the VAE."""
    windows = sliding_windows(num_frames, settings["context_length"], settings["context_stride"])
    steps, branches, k = settings["steps"], settings["branches"], settings["controlnets"]
    vae = costs["vae"]["decode"] + (costs["vae"]["encode"] if costs["edit"] else 0)
    rows = {}
    for schedule in ("reference", "no_reuse", "reuse", "floor"):
        step = step_flops(costs, windows, num_frames, k, branches, schedule)
        rows[schedule] = dict(step=step / num_frames, render=(steps * step + num_frames * vae) / num_frames)
    rows["vae"] = dict(step=0.0, render=vae)
    return dict(size=costs["size"], edit=costs["edit"], frames=num_frames, windows=len(windows),
                coverage=sum(e - s for s, e in windows) / num_frames, rows=rows)


# -----------------------------------------------------------------------------------------------------------------
# The schedule the pipeline runs, measured with tiny models

def _frames_in(args, kwargs):
    """Frames in a module's input: (B, C, F, h, w) for the motion UNet, (B*F, ...) otherwise."""
    names = ("sample", "hidden_states", "input_tensor", "input")  # what diffusers' blocks pass by keyword
    x = args[0] if args else next((kwargs[n] for n in names if n in kwargs), None)
    if x is None:
        x = next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
    return x.shape[0] * x.shape[2] if x.ndim == 5 else x.shape[0]


def _accepts(fn, name):
    import inspect

    return name in inspect.signature(fn).parameters


@torch.no_grad()
def measure_schedule(num_frames=28, size=64, steps=3, edit=False, reuse=None, seed=0):
    """Run the real denoiser (main pass or editing branch) with tiny models; return per-step frame counts of
    each watched module and per-step FLOPs (steps 2.. only: step 1's count would include the text encoder),
    and the tiny models' part costs so the model can be evaluated on the same configuration."""
    import numpy as np

    from diffutoon.tiny import build_tiny_pipeline
    from pipeline_diffutoon import DiffutoonDDIMScheduler

    pipe = build_tiny_pipeline(seed=seed, edit=True)
    pipe.set_progress_bar_config(disable=True)
    nets = pipe.edit_controlnets if edit else pipe.controlnets
    unet = pipe.unet
    # "unet": whole forwards, counted at its last layer (the reused prefix runs a forward that stops early)
    watched = dict(controlnet=nets, unet=[unet.conv_out], conv_in=[unet.conv_in], resnet0=[unet.down_blocks[0].resnets[0]],
                   attention0=[unet.down_blocks[0].attentions[0]])
    if not edit:
        watched["motion0"] = [unet.down_blocks[0].motion_modules[0]]
    seen = {name: 0 for name in watched}
    handles = []
    for name, modules in watched.items():
        for module in modules:
            def hook(module, args, kwargs, name=name):
                seen[name] += _frames_in(args, kwargs)
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    counter, marks = flop_counter(), []
    mark = lambda: marks.append((counter.get_total_flops(), dict(seen)))
    rng = np.random.default_rng(seed)
    video = rng.integers(0, 256, (num_frames, size, size, 3), dtype=np.uint8)
    conds = [rng.integers(0, 256, (num_frames, size, size, 3), dtype=np.uint8) for _ in nets]
    kwargs = {} if reuse is None else dict(reuse_across_windows=reuse)
    generator = torch.Generator().manual_seed(seed)
    with counter:
        if edit:
            scheduler = DiffutoonDDIMScheduler(beta_schedule="scaled_linear")
            step = scheduler.step
            scheduler.step = lambda *a, **k: (mark(), step(*a, **k))[1]
            pipe.make_color_video(video, "a girl, night", "bad", height=size, width=size, num_inference_steps=steps,
                                  conditioning_frames=conds, fastblend=False, generator=generator,
                                  scheduler=scheduler, **kwargs)
            settings = dict(EDIT, size=size, steps=steps)
        else:
            pipe(video=video, prompt="a girl", negative_prompt="bad", num_inference_steps=steps, output_type="latent",
                 conditioning_frames=conds, generator=generator, callback_on_step_end=lambda *a: mark() or {}, **kwargs)
            settings = dict(MAIN, steps=steps)
    for h in handles:
        h.remove()
    per_step = [dict(flops=b[0] - a[0], frames={k: b[1][k] - a[1][k] for k in seen}) for a, b in zip(marks, marks[1:])]
    windows = sliding_windows(num_frames, settings["context_length"], settings["context_stride"])
    costs = part_costs(unet, nets[0], pipe.vae, size, [e - s for s, e in windows], edit=edit)
    return dict(per_step=per_step, costs=costs, windows=windows, settings=settings, frames=num_frames)


def check_schedule(num_frames=28, size=64, steps=3, edit=False):
    """Measured vs modelled frame counts and FLOPs per step, for reuse off and (if the pipeline takes the keyword)
    on. Returns a list of result dicts; prints one line each."""
    from pipeline_diffutoon import DiffutoonPipeline

    fn = DiffutoonPipeline.make_color_video if edit else DiffutoonPipeline.__call__
    has_keyword = _accepts(fn, "reuse_across_windows")
    where = "editing branch" if edit else "main pass"
    if not has_keyword:
        print(f"[{where}] the pipeline does not take reuse_across_windows yet: the measured schedule with reuse is "
              f"unavailable (the tables use the model); measuring today's schedule (every window runs everything).")
    results = []
    for reuse in ((False, True) if has_keyword else (None,)):
        run = measure_schedule(num_frames, size, steps, edit=edit, reuse=reuse)
        schedule = "reuse" if reuse else "no_reuse"
        branches, k = run["settings"]["branches"], run["settings"]["controlnets"]
        want_frames = frame_counts(run["windows"], num_frames, branches, schedule, edit=edit)
        want_frames["controlnet"] *= k  # the hooks sum over the ControlNets
        want_flops = step_flops(run["costs"], run["windows"], num_frames, k, branches, schedule)
        for i, step in enumerate(run["per_step"], start=2):
            rel = abs(step["flops"] - want_flops) / want_flops
            ok = step["frames"] == want_frames and rel < 1e-3
            results.append(dict(pass_=where, reuse=reuse, step=i, frames=step["frames"], model_frames=want_frames,
                                flops=step["flops"], model_flops=want_flops, flops_rel_diff=rel, match=ok))
            print(f"[{where}] reuse_across_windows={reuse if reuse is not None else '(no keyword)'} step {i}: "
                  f"frames per module measured {step['frames']} model {want_frames}; "
                  f"FLOPs measured {step['flops']:.4g} model {want_flops:.4g} (rel. diff {rel:.1e}): "
                  f"{'MATCH' if ok else 'MISMATCH'}")
    return results


# -----------------------------------------------------------------------------------------------------------------
# Report

def tf(x):
    return f"{x / 1e12:.3g}"


def parts_markdown(main_costs, edit_costs):
    lines = ["| frame | UNet+motion, window 16 (per frame) | of which prefix (conv_in + 1st ResNet + 1st transformer) "
             "| of which attention | ControlNet | issue: UNet / ControlNet | VAE encode | VAE decode |",
             "|---|---|---|---|---|---|---|---|"]
    for c in main_costs:
        u = c["unet"][MAIN["context_length"]]
        f = MAIN["context_length"]
        issue = ISSUE_FIGURES.get(c["size"])
        lines.append(f"| {c['size']}x{c['size']} | {tf(u['total'] / f)} | {tf(u['conv_in'] + u['first'])} "
                     f"({100 * (u['conv_in'] + u['first']) * f / u['total']:.1f} %) | {tf(u['attention'] / f)} "
                     f"({100 * u['attention'] / u['total']:.0f} %) | {tf(c['controlnet']['total'])} | "
                     f"{'%s / %s' % issue if issue else '-'} | {tf(c['vae']['encode'])} | {tf(c['vae']['decode'])} |")
    for c in edit_costs:
        f = EDIT["context_length"]
        u = c["unet"][f]
        lines.append(f"| {c['size']}x{c['size']} editing UNet (no motion, cross-frame), window {f} | {tf(u['total'] / f)} | "
                     f"{tf(u['conv_in'] + u['first'])} (not reusable: cross-frame) | {tf(u['attention'] / f)} "
                     f"({100 * u['attention'] / u['total']:.0f} %) | {tf(c['controlnet']['total'])} | - | "
                     f"{tf(c['vae']['encode'])} | {tf(c['vae']['decode'])} |")
    return "\n".join(lines)


NAMES = dict(reference="(a) reference: every window runs everything, CFG as two sweeps",
             no_reuse="(b) ours, reuse_across_windows=False (batched CFG)",
             reuse="(b) ours, reuse_across_windows=True",
             floor="(c) floor: the UNet once per window a frame is in, ControlNets once per frame",
             vae="VAE (decode; editing: encode + decode)")


def schedule_markdown(tables):
    lines = ["| pass | frame | schedule | TFLOP per output frame per step | TFLOP per output frame per render | "
             "x reference (step) | x reference (render) |", "|---|---|---|---|---|---|---|"]
    for t in tables:
        ref = t["rows"]["reference"]
        name = "editing" if t["edit"] else "main"
        for key, row in t["rows"].items():
            ratio_step = f"{row['step'] / ref['step']:.3f}" if key != "vae" else "-"
            lines.append(f"| {name} | {t['size']} | {NAMES[key]} | {tf(row['step']) if key != 'vae' else '-'} | "
                         f"{tf(row['render'])} | {ratio_step} | {row['render'] / ref['render']:.3f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 1536], help="main-pass frame sizes (px)")
    parser.add_argument("--frames", type=int, default=1000, help="video length N for the schedules")
    parser.add_argument("--edit-size", type=int, default=EDIT["size"], help="editing-branch frame size (px)")
    parser.add_argument("--goal", type=float, default=0.78, help="goal: ours with reuse / reference at the largest size")
    parser.add_argument("--no-measure", action="store_true", help="skip the tiny real-denoiser schedule check")
    parser.add_argument("--measure-frames", type=int, default=28, help="frames of the tiny measured run")
    parser.add_argument("--json", help="also write everything as JSON to this path")
    args = parser.parse_args(argv)

    start = time.time()
    models = build_models("meta")
    main_costs = [part_costs(models["unet"], models["controlnet"], models["vae"], size,
                             [e - s for s, e in sliding_windows(args.frames, MAIN["context_length"], MAIN["context_stride"])])
                  for size in args.sizes]
    edit_costs = [part_costs(models["unet"], models["controlnet"], models["vae"], args.edit_size,
                             [e - s for s, e in sliding_windows(args.frames, EDIT["context_length"], EDIT["context_stride"])],
                             edit=True)]
    tables = [render_table(c, args.frames, MAIN) for c in main_costs] + [render_table(c, args.frames, EDIT) for c in edit_costs]
    print(f"counted on the meta device in {time.time() - start:.1f} s (torch {torch.__version__})\n")

    windows = tables[0]["windows"]
    print(f"Per-part costs, TFLOP per frame and CFG branch (FlopCounterMode: multiply-add = 2 FLOPs, attention = its "
          f"two matmuls, norms/softmax/elementwise not counted):\n")
    print(parts_markdown(main_costs, edit_costs))
    print(f"\nSchedules for N = {args.frames} frames. Main pass: windows {MAIN['context_length']}/{MAIN['context_stride']} "
          f"({windows} windows, each frame in {tables[0]['coverage']:.3f} windows on average), CFG 2 branches, "
          f"{MAIN['steps']} steps, 2 ControlNets, render = steps + VAE decode. Editing branch: "
          f"{args.edit_size}x{args.edit_size}, windows {EDIT['context_length']}/{EDIT['context_stride']} "
          f"({tables[-1]['windows']} windows, coverage {tables[-1]['coverage']:.3f}), {EDIT['steps']} timesteps, "
          f"2 ControlNets, render = steps + VAE encode + decode.\n")
    print(schedule_markdown(tables))

    largest = max(tables[:-1], key=lambda t: t["size"])
    step_ratio = largest["rows"]["reuse"]["step"] / largest["rows"]["reference"]["step"]
    render_ratio = largest["rows"]["reuse"]["render"] / largest["rows"]["reference"]["render"]
    reached = step_ratio <= args.goal and render_ratio <= args.goal
    print(f"\nGoal: ours with reuse <= {args.goal}x the reference per output frame at {largest['size']}x{largest['size']} "
          f"(N = {args.frames}): {step_ratio:.3f}x per denoising step ({100 * (args.goal - step_ratio):+.1f} points of "
          f"margin), {render_ratio:.3f}x per render with the VAE decode ({100 * (args.goal - render_ratio):+.1f} points): "
          f"{'REACHED' if reached else 'NOT reached'}.")
    lengths = [16, 24, 32, 64, 128, 1000, 10000]
    ratios, big = [], next(c for c in main_costs if c["size"] == largest["size"])
    for n in lengths:
        w = sliding_windows(n, MAIN["context_length"], MAIN["context_stride"])
        c = part_costs(models["unet"], models["controlnet"], models["vae"], largest["size"], [e - s for s, e in w]) \
            if any(e - s not in big["unet"] for s, e in w) else big
        ratios.append(step_flops(c, w, n, MAIN["controlnets"], MAIN["branches"], "reuse")
                      / step_flops(c, w, n, MAIN["controlnets"], MAIN["branches"], "reference"))
    print(f"Ours with reuse / reference per denoising step at {largest['size']}x{largest['size']} by video length N: "
          + ", ".join(f"N={n}: {r:.3f}" for n, r in zip(lengths, ratios))
          + " (one window, N <= 16, reuses nothing; the ratio falls towards its limit as the overlap covers every frame twice).")
    shortest = {}  # the shortest video (whole windows only: N = d + k s) that meets the goal, per step and per render
    for n in range(MAIN["context_length"], 20001, MAIN["context_stride"]):
        w = sliding_windows(n, MAIN["context_length"], MAIN["context_stride"])
        ref, ours = (step_flops(big, w, n, MAIN["controlnets"], MAIN["branches"], k) for k in ("reference", "reuse"))
        vae = n * big["vae"]["decode"]
        for key, r in (("step", ours / ref), ("render", (MAIN["steps"] * ours + vae) / (MAIN["steps"] * ref + vae))):
            if key not in shortest and r <= args.goal:
                shortest[key] = n
    print(f"Shortest video meeting the goal at {largest['size']}x{largest['size']}: N >= {shortest.get('step', '> 20000')} "
          f"per denoising step, N >= {shortest.get('render', '> 20000')} per render (VAE decode included).")

    checks = []
    if not args.no_measure:
        print("\nMeasured schedule (real denoiser, tiny models, hooks + FLOP counter, steps 2..):")
        checks = check_schedule(args.measure_frames, edit=False) + check_schedule(args.measure_frames, edit=True)
        print("measured schedule equals the model: " + ("YES" if all(c["match"] for c in checks) else "NO"))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(main=main_costs, edit=edit_costs, tables=tables, goal=args.goal, step_ratio=step_ratio,
                           render_ratio=render_ratio, reached=reached, checks=checks), fh, indent=1, default=str)
    print(f"\ntotal {time.time() - start:.1f} s")
    return dict(main=main_costs, edit=edit_costs, tables=tables, step_ratio=step_ratio, render_ratio=render_ratio,
                reached=reached, checks=checks)


if __name__ == "__main__":
    main()
