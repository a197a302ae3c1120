"""Issue 18: every exact memory saving as a switch, the estimator, and the memory plan (tiny models, CPU)."""

import numpy as np
import pytest
import torch
from conftest import make_video

from diffutoon import memory
from pipeline_diffutoon import per_frame_motion_groupnorm

SIZE = 32


def render(pipe, video, **kwargs):
    lineart = make_video(len(video), SIZE, seed=5)
    args = dict(prompt="a girl", negative_prompt="ugly", conditioning_frames=[lineart, None], num_inference_steps=2,
                context_length=8, context_stride=4, generator=torch.Generator().manual_seed(0), output_type="np")
    return pipe(video=video, **{**args, **kwargs}).frames


def assert_close(a, b, tol=1e-5):
    """Equal within float32 rounding, relative to the largest value."""
    a, b = torch.as_tensor(np.asarray(a)).double(), torch.as_tensor(np.asarray(b)).double()
    assert (a - b).abs().max().item() <= tol * b.abs().max().item()


def test_forward_chunking_gives_the_same_frames_in_every_transformer_block(tiny_pipe):
    video = make_video(10, SIZE)
    keys = list(tiny_pipe.unet.state_dict())
    plain = render(tiny_pipe, video, output_type="latent")
    tiny_pipe.enable_forward_chunking(7)  # not a divisor of any token count: diffusers' own chunking would refuse
    try:
        chunked = [name for model in (tiny_pipe.unet, *tiny_pipe.controlnets) for name, m in model.named_modules()
                   if isinstance(m, memory.ChunkedFeedForward)]
        assert any("motion_modules" in n for n in chunked) and any("attentions" in n for n in chunked)
        assert sum(isinstance(m, memory.ChunkedFeedForward) for m in tiny_pipe.controlnets[0].modules()) > 0
        assert list(tiny_pipe.unet.state_dict()) == keys  # same parameters, same state dict
        out = render(tiny_pipe, video, output_type="latent")
    finally:
        tiny_pipe.disable_forward_chunking()
    assert not any(isinstance(m, memory.ChunkedFeedForward) for m in tiny_pipe.unet.modules())
    assert_close(out, plain)


def test_memory_efficient_attention_covers_every_component():
    from diffusers.models.attention_processor import Attention

    from attention_processors import MemoryEfficientAttnProcessor
    from diffutoon.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0, edit=True)
    pipe.enable_memory_efficient_attention()
    for name in ("unet", "controlnet", "edit_controlnet", "vae"):
        layers = [m for m in getattr(pipe, name).modules() if isinstance(m, Attention)]
        assert layers and all(isinstance(m.processor, MemoryEfficientAttnProcessor) for m in layers), name


def test_estimate_equals_the_measured_allocation_of_the_same_window(tiny_pipe):
    """The meta-device count against the same calls run for real on the CPU (live tensor bytes)."""
    for frames, branches in ((8, 2), (4, 1)):
        estimate = memory.window_bytes(tiny_pipe.unet, tiny_pipe.controlnets, SIZE, SIZE, frames, branches,
                                       motion_context=per_frame_motion_groupnorm)
        measured = memory.window_trace(tiny_pipe.unet, tiny_pipe.controlnets, SIZE, SIZE, frames, branches,
                                       motion_context=per_frame_motion_groupnorm)
        assert abs(estimate - measured) <= 0.15 * measured
    # the savings lower the estimate
    full = memory.estimate_memory(tiny_pipe, SIZE, SIZE, memory_efficient_attention=False)
    saved = memory.estimate_memory(tiny_pipe, SIZE, SIZE, batch_cfg=False, memory_efficient_attention=True,
                                   decode_chunk_size=1)
    assert saved["window"] < full["window"] and saved["decode"] < full["decode"]
    assert full["weights"] == sum(p.numel() * p.element_size() for m in ("unet", "controlnet", "vae", "text_encoder")
                                  for p in [*getattr(tiny_pipe, m).parameters(), *getattr(tiny_pipe, m).buffers()])


def test_plan_forced_by_a_small_budget_gives_the_unplanned_frames(tiny_pipe):
    video = make_video(10, SIZE)
    smallest = memory.estimate_memory(tiny_pipe, SIZE, SIZE, context_length=8, batch_cfg=False,
                                      memory_efficient_attention=True, decode_chunk_size=1,
                                      motion_context=per_frame_motion_groupnorm)
    budget = f"{smallest['total'] + 1000}B"
    plan = tiny_pipe.plan_memory(SIZE, SIZE, context_length=8, memory_budget=budget)
    assert plan.estimate <= smallest["total"] + 1000 and plan.decode_chunk_size < 8 and len(plan.enabled) >= 3
    assert str(plan).startswith(f"{SIZE}x{SIZE}, ") and str(plan).endswith("MB estimated")
    progress = []
    planned = render(tiny_pipe, video, memory_budget=budget, progress_callback=progress.append)
    assert progress[-1]["memory_plan"] == str(plan)
    assert getattr(tiny_pipe, "_memory_efficient_snapshot", None) is None  # the plan's switches are undone
    unplanned = render(tiny_pipe, video, memory_plan=None)
    assert_close(planned, unplanned)
    assert render(tiny_pipe, video[:2], context_length=2, context_stride=1, memory_plan="auto") is not None  # CPU: off


def test_nothing_fits_names_the_largest_size_before_reading_a_frame(tiny_pipe):
    class Unreadable:
        shape = (10, 128, 128, 3)

        def read(self, start, end):
            raise AssertionError("a frame was read")

    every_saving = dict(context_length=8, batch_cfg=False, memory_efficient_attention=True, decode_chunk_size=1,
                        forward_chunk_size=1024, motion_context=per_frame_motion_groupnorm, reuse_across_windows=False,
                        placement="call")
    small, large = (memory.estimate_memory(tiny_pipe, s, s, **every_saving)["total"] for s in (64, 128))
    assert small < large
    with pytest.raises(ValueError, match="largest size that fits is 64x64"):
        tiny_pipe(video=Unreadable(), prompt="a girl", height=128, width=128, context_length=8, context_stride=4,
                  memory_budget=f"{(small + large) // 2}B")


def test_host_cache_and_model_placement_give_the_unplanned_frames(tiny_pipe):
    """The reuse cache in host memory, each model on the device only for its stage / its call: the same bits (on a
    GPU the weights and cached frames move between host and device; here the moves are tracked by name)."""
    video = make_video(10, SIZE)
    unplanned = render(tiny_pipe, video, memory_plan=None)
    nets = {"controlnet.0", "controlnet.1"}
    for placement, reuse in (("stage", "host"), ("nets", True), ("call", True)):
        plan = memory.MemoryPlan(SIZE, SIZE, 10**9, "given", reuse_across_windows=reuse, placement=placement)
        planned = render(tiny_pipe, video, memory_plan=plan)
        assert np.array_equal(planned, unplanned), placement
        log = tiny_pipe._placement_log
        assert {name for name, _ in log} == {"text_encoder", "unet", "vae", *nets}
        for name, on_device in log:  # what shares the device with the model called
            allowed = {"unet", *nets} if placement == "stage" and name in {"unet", *nets} else {name}
            allowed = {"unet", name} if placement == "nets" and name in nets else allowed
            assert name in on_device <= allowed, log
        assert (placement == "stage") == (("unet", {"unet", *nets}) in log)
        assert not any(hasattr(m, "_hf_hook") for m in memory.placed_models(tiny_pipe).values())  # hooks removed
        assert all(cache.host == (reuse == "host") for cache in tiny_pipe._last_reuse.caches.values())
    assert len([n for n, _ in log if n == "unet"]) > 2  # "call": the UNet comes back after the ControlNets, per window


def test_plan_replaces_diffusers_model_cpu_offload_for_the_call_and_puts_it_back():
    """Weights larger than the card: diffusers' enable_model_cpu_offload, then the plan's own placement per call."""
    from diffutoon.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    video = make_video(6, SIZE)
    kwargs = dict(context_length=4, context_stride=2, output_type="latent")
    unplanned = render(pipe, video, memory_plan=None, **kwargs)
    pipe.enable_model_cpu_offload(device="cpu")
    hooks = len(pipe._all_hooks)
    assert memory.placements(pipe) == ("stage", "nets", "call")
    assert memory.plan_memory(pipe, SIZE, SIZE, context_length=4, memory_budget="1GB").placement == "stage"
    plan = memory.MemoryPlan(SIZE, SIZE, 10**9, "given", placement="nets", reuse_across_windows="host")
    assert torch.equal(render(pipe, video, memory_plan=plan, **kwargs), unplanned)
    assert pipe._placement_log and len(pipe._all_hooks) == hooks and hasattr(pipe.unet, "_hf_hook")


def test_placement_and_host_cache_lower_the_estimate(tiny_pipe):
    kwargs = dict(context_length=8, motion_context=per_frame_motion_groupnorm)
    parts = {p: memory.estimate_memory(tiny_pipe, SIZE, SIZE, placement=p, **kwargs) for p in memory.PLACEMENTS}
    weights = memory.weight_bytes
    unet, nets, vae = tiny_pipe.unet, tiny_pipe.controlnets, tiny_pipe.vae
    assert parts["all"]["weights"] == weights(unet, *nets, vae, tiny_pipe.text_encoder)
    largest = max(weights(m) for m in nets)
    assert memory.stage_weights(tiny_pipe, "stage")["window"] == (weights(unet, *nets),) * 2
    assert memory.stage_weights(tiny_pipe, "nets")["window"] == (weights(unet) + largest, weights(unet))
    assert memory.stage_weights(tiny_pipe, "call")["window"] == (largest, weights(unet))
    phases = memory.window_phase_bytes(unet, nets, SIZE, SIZE, 8, 2, memory_efficient=False, reuse_branches=2,
                                       motion_context=per_frame_motion_groupnorm)
    for p in memory.PLACEMENTS:  # each stage's weights + its activations; the text stage's are not counted
        w = memory.stage_weights(tiny_pipe, p)
        assert parts[p]["total"] == max(w["text"], w["window"][0] + phases[0], w["window"][1] + phases[1],
                                        w["vae"] + parts[p]["decode"])
    assert parts["all"]["total"] > parts["stage"]["total"] > parts["call"]["total"]
    cache = {r: memory.estimate_memory(tiny_pipe, SIZE, SIZE, reuse_across_windows=r, **kwargs)["window"]
             for r in (True, "host", False)}
    assert cache[False] <= cache["host"] < cache[True]


def test_memory_budget_strings():
    assert memory.parse_bytes("12GB") == 12 * 10**9 and memory.parse_bytes("1.5 GiB") == int(1.5 * 2**30)
    assert memory.parse_bytes("500mb") == 500 * 10**6 and memory.parse_bytes(2**30) == 2**30
    for bad in ("12", "twelve GB", 12):
        with pytest.raises(ValueError, match="12GB|unit"):
            memory.parse_bytes(bad)


def test_cli_max_vram(capsys):
    from diffutoon.cli import _memory_kwargs, build_parser

    args = build_parser().parse_args(["render", "in.mp4", "--max-vram", "12GB"])
    kwargs = _memory_kwargs(args)
    assert kwargs["memory_budget"] == "12GB"
    kwargs["progress_callback"]({"memory_plan": "512x512, 12.0 GB budget: no saving needed: 5.1 GB estimated"})
    kwargs["progress_callback"]({"memory_plan": "512x512, 12.0 GB budget: no saving needed: 5.1 GB estimated"})
    assert capsys.readouterr().out.count("memory plan: 512x512") == 1
    with pytest.raises(SystemExit):
        build_parser().parse_args(["render", "in.mp4", "--max-vram", "12"])
    assert "--max-vram '12': write a size with a unit" in capsys.readouterr().err


def test_fast_cold_trace_equals_the_plain_trace_byte_for_byte(tiny_pipe, monkeypatch):
    """The cold plan's speed-ups (meta ops and attention stand-ins replayed by signature; one trace for both attentions
    and every feed-forward chunk, the kernels side by side) against the plain trace: each variant alone, every meta op
    run."""
    monkeypatch.setattr(memory, "_META_OPS", {})  # a cold process
    monkeypatch.setattr(memory, "_KERNELS", {})
    nets = [memory.meta_copy(n) for n in tiny_pipe.controlnets]
    unet, edit_unet = memory.meta_copy(tiny_pipe.unet), memory.meta_copy(tiny_pipe.unet, motion=False)
    variants = [(True, None), (True, 7), (False, 256)]  # 7: not a divisor of any token count
    for models, size, frames, branches, context, joint in (
            ((unet, nets), 64, 8, 2, per_frame_motion_groupnorm, None),
            ((edit_unet, nets[:1]), 64, 4, 2, None, 4)):  # the editing branch: no motion modules, joint attention
        args = (size, size, frames, branches, context, 8, 77, joint)
        fast = [memory._window_variants(*models, variants, *args) for _ in range(2)]  # recorded, then replayed
        with monkeypatch.context() as plain:
            plain.setattr(memory, "REPLAY", False)
            expected = {v: memory.window_phases(*models, *args[:4], *v, *args[4:]) for v in variants}
        assert fast[0] == fast[1] == expected
        assert len(set(expected.values())) == len(variants)  # the variants differ: one trace answers for each
    assert sum(bool(outs) for outs in memory._META_OPS.values()) > 100  # ops were replayed, not run
    assert sum(bool(done) for done in memory._KERNELS.values()) > 4  # and attention stand-ins
    vae = memory.meta_copy(tiny_pipe.vae)
    for size, frames, memeff, encode in ((64, 3, False, False), (32, 2, True, True), (64, 1, True, False)):
        fast = [memory._vae_trace(vae, size, size, frames, memeff, encode) for _ in range(2)]
        with monkeypatch.context() as plain:
            plain.setattr(memory, "REPLAY", False)
            assert fast == [memory._vae_trace(vae, size, size, frames, memeff, encode)] * 2
