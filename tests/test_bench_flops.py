"""bench/bench_flops.py: the schedule formulas against a frame-by-frame count, and against the real denoiser."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import bench_flops  # noqa: E402


def fake_costs(edit=False, lengths=range(1, 17)):
    """Part costs with U(f) = 100 f + f^2 (window-dependent), prefix 3 + 5 per frame, ControlNet 7 per frame."""
    unet = {f: dict(total=100 * f + f * f, conv_in=3, first=5) for f in lengths}
    return dict(size=64, edit=edit, unet=unet, controlnet=dict(total=7), vae=dict(encode=11, decode=13))


def brute_force(num_frames, d, s, branches, k, schedule, edit):
    """Per-frame accounting of one step: each window's UNet; each frame's ControlNets and prefix once (reuse) or
    once per window that covers it."""
    windows = bench_flops.sliding_windows(num_frames, d, s)
    total = 0
    for start, end in windows:
        f = end - start
        total += branches * (100 * f + f * f)
        if schedule == "reference":
            total += branches * k * 7 * f
        elif not edit:
            total -= branches * f * (3 + 5)  # the prefix leaves the window call ...
    if schedule == "reuse":
        for frame in range(num_frames):  # ... and runs once per frame and branch
            total += branches * k * 7 + (0 if edit else branches * (3 + 5))
    return total


@pytest.mark.parametrize("num_frames,d,s", [(16, 16, 8), (17, 16, 8), (30, 16, 8), (40, 16, 15), (9, 8, 4), (5, 8, 4)])
@pytest.mark.parametrize("edit", [False, True])
def test_schedule_formula_equals_frame_by_frame_count(num_frames, d, s, edit):
    windows = bench_flops.sliding_windows(num_frames, d, s)
    costs = fake_costs(edit)
    for schedule in ("reference", "reuse"):
        got = bench_flops.step_flops(costs, windows, num_frames, 2, 2, schedule)
        assert got == brute_force(num_frames, d, s, 2, 2, schedule, edit), schedule
    assert bench_flops.step_flops(costs, windows, num_frames, 2, 2, "no_reuse") == \
        bench_flops.step_flops(costs, windows, num_frames, 2, 2, "reference")
    counts = bench_flops.frame_counts(windows, num_frames, 2, "reuse", edit=edit)
    assert counts["controlnet"] == 2 * num_frames  # each frame once per step and branch


def test_real_configurations_give_the_issues_figures():
    """The counter on the meta device reproduces issue 11's per-frame figures at 512x512 (1.11 and 0.28 TFLOP)."""
    models = bench_flops.build_models("meta")
    unet = bench_flops.unet_window_flops(models["unet"], 16, 512, 512)
    net = bench_flops.controlnet_frame_flops(models["controlnet"], 512, 512)
    assert round(unet["total"] / 16 / 1e12, 2) == 1.11
    assert round(net["total"] / 1e12, 2) == 0.28
    assert 0 < unet["conv_in"] < unet["first"] < unet["total"] / 16


def test_measured_schedule_equals_the_model():
    """The real denoiser (tiny models) runs the modelled schedule: frames per module and FLOPs per step. With a
    pipeline that takes reuse_across_windows this covers reuse on and off."""
    checks = bench_flops.check_schedule(num_frames=20, size=32, steps=2, edit=False)
    assert checks and all(c["match"] for c in checks), checks
