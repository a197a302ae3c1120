"""Reuse across windows (issue 11): per-frame work computed once per step and CFG branch, same result."""

import numpy as np
import pytest
import torch
from conftest import make_video
from test_editing import EDIT_KWARGS
from test_pipeline import SIZE, assert_close_rel, run

from diffutoon.reuse import window_chunks
from diffutoon.tiny import build_tiny_pipeline, tiny_lineart_detector
from pipeline_diffutoon import HostFrames, sliding_windows

# (frames, window, stride): overlap by one frame, by many, a short last window, one window only
LAYOUTS = [(10, 4, 3), (9, 6, 1), (11, 4, 2), (5, 8, 4)]


@pytest.mark.parametrize("n, length, stride", LAYOUTS)
def test_reuse_on_and_off_give_the_same_latents(tiny_pipe, n, length, stride):
    video = make_video(n, SIZE)
    on = run(tiny_pipe, video, context_length=length, context_stride=stride)
    off = run(tiny_pipe, video, context_length=length, context_stride=stride, reuse_across_windows=False)
    assert_close_rel(on, off, tol=1e-5)  # batch sizes differ, so float rounding does (measured ~1e-7 relative)


def test_reuse_on_and_off_with_two_cfg_sweeps_and_without_guidance(tiny_pipe):
    video = make_video(9, SIZE)
    for extra in (dict(batch_cfg=False), dict(guidance_scale=1.0)):
        on = run(tiny_pipe, video, context_length=4, context_stride=2, **extra)
        off = run(tiny_pipe, video, context_length=4, context_stride=2, reuse_across_windows=False, **extra)
        assert_close_rel(on, off)


def count_frames(pipe, n, **kwargs):
    """Frames each ControlNet and the UNet's conv_in see per render, and the reuse cache's peak size."""
    seen = {"controlnet": [0] * len(pipe.controlnets), "conv_in": 0, "unet": 0}

    def add(i):
        def hook(module, args):
            seen["controlnet"][i] += args[0].shape[0]
        return hook

    hooks = [net.register_forward_pre_hook(add(i)) for i, net in enumerate(pipe.controlnets)]
    hooks.append(pipe.unet.conv_in.register_forward_pre_hook(
        lambda m, a: seen.__setitem__("conv_in", seen["conv_in"] + a[0].shape[0])))
    try:
        run(pipe, make_video(n, SIZE), **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return seen, pipe._last_reuse


@pytest.mark.parametrize("batch_cfg", [True, False])
def test_each_controlnet_and_the_unet_prefix_see_each_frame_once_per_step_and_branch(tiny_pipe, batch_cfg):
    n, length, stride, steps = 13, 4, 2, 2
    seen, reuse = count_frames(tiny_pipe, n, context_length=length, context_stride=stride, batch_cfg=batch_cfg)
    assert seen["controlnet"] == [steps * 2 * n] * 2  # 2 CFG branches
    assert seen["conv_in"] == steps * 2 * n  # the prefix is computed once; the window calls take it from the cache
    assert 0 < reuse.peak_frames <= length  # never more than one window of frames held
    windows = sliding_windows(n, length, stride)
    off, _ = count_frames(tiny_pipe, n, context_length=length, context_stride=stride, batch_cfg=batch_cfg,
                          reuse_across_windows=False)
    assert off["controlnet"] == [steps * 2 * sum(e - s for s, e in windows)] * 2  # the reference: per window


def test_canonical_chunks_make_a_windows_prediction_independent_of_the_windows_run_before_it(tiny_pipe):
    """What lets several processes split the windows and still agree bit for bit (issue 12)."""
    n = 12
    assert window_chunks(sliding_windows(n, 4, 2)) == [(0, 4), (4, 6), (6, 8), (8, 10), (10, 12)]
    pipe = tiny_pipe
    from pipeline_diffutoon import DiffutoonConditions

    video = make_video(n, SIZE)
    frames = HostFrames(video)
    embeds = pipe.encode_prompt("a girl", "cpu", 1), pipe.encode_prompt("bad", "cpu", 1)
    cond = DiffutoonConditions(embeds[0], embeds[1], [frames, frames], [0.5, 0.5], sliding_windows(n, 4, 2))
    latents = HostFrames(torch.randn(n, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(2)).numpy())
    t = torch.tensor(500)
    with torch.no_grad():
        everything = {(s, e): p for s, e, p in pipe.iter_window_predictions(latents, t, cond)}
        later = {(s, e): p for s, e, p in pipe.iter_window_predictions(latents, t, cond, cond.windows[2:])}
    for window, prediction in later.items():
        assert torch.equal(prediction, everything[window]), window


def test_editing_branch_reuses_its_controlnets_and_gives_the_same_colours():
    pipe = build_tiny_pipeline(seed=0, edit=True)
    pipe.set_progress_bar_config(disable=True)
    video = make_video(7, SIZE)
    seen = [0, 0]
    hooks = [net.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, seen[i] + a[0].shape[0]))
             for i, net in enumerate(pipe.edit_controlnets)]
    settings = dict(EDIT_KWARGS, fastblend=False, generator=torch.Generator().manual_seed(0))
    try:
        on = pipe.make_color_video(video, "orange dress", "bad", **settings)
    finally:
        for hook in hooks:
            hook.remove()
    assert pipe._last_reuse.caches.keys() == {("controlnet", "cfg")}  # cross-frame attention: no UNet prefix
    settings["generator"] = torch.Generator().manual_seed(0)
    off = pipe.make_color_video(video, "orange dress", "bad", reuse_across_windows=False, **settings)
    assert seen == [2 * 2 * 7] * 2  # steps x CFG branches x frames: once per frame
    assert np.abs(on.astype(int) - off.astype(int)).max() <= 1  # uint8 colours, rounding at most one level


def test_main_pass_with_annotator_and_reuse_matches_reuse_off(tiny_pipe):
    video = make_video(9, SIZE)
    kwargs = dict(conditioning_frames=None, lineart_detector=tiny_lineart_detector(), context_length=4,
                  context_stride=2)
    assert_close_rel(run(tiny_pipe, video, **kwargs), run(tiny_pipe, video, reuse_across_windows=False, **kwargs))
