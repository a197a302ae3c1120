"""The editing branch (issue 5): a prompt-edited colour video feeding the main pass's tile ControlNet."""

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import make_video

from diffutoon.tiny import (
    build_tiny_pipeline,
    tiny_components,
    tiny_depth_detector,
    tiny_lineart_detector,
    tiny_softedge_detector,
)
from pipeline_diffutoon import FASTBLEND_DEFAULTS, DiffutoonDDIMScheduler, DiffutoonPipeline, without_motion_modules

N, SIZE, EDIT = 6, 32, 32
EDIT_KWARGS = dict(height=EDIT, width=EDIT, num_inference_steps=2, context_length=4, context_stride=2,
                   detectors={"softedge": tiny_softedge_detector(), "depth": tiny_depth_detector})


@pytest.fixture(scope="module")
def edit_pipe():
    pipe = build_tiny_pipeline(seed=0, edit=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe, video, **kwargs):
    args = dict(video=video, prompt="anime girl", negative_prompt="bad", num_inference_steps=2, context_length=4,
                context_stride=2, lineart_detector=tiny_lineart_detector(), output_type="np",
                latents=torch.randn(1, 4, N, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(1)),
                generator=torch.Generator().manual_seed(0))
    args.update(kwargs)
    return pipe(**args)


def motion_modules(unet):
    return [m for block in [*unet.down_blocks, *unet.up_blocks, unet.mid_block] for m in block.motion_modules]


def test_branch_end_to_end_with_hand_off_and_isolation(edit_pipe):
    """Cross-frame attention and no motion modules in the branch; the reverse in the main pass; one UNet;
    the tile ControlNet gets the resized colour video and lineart the original's."""
    pipe, video = edit_pipe, make_video(N, SIZE)
    events, motion_calls, conds = [], [0], {"tile": [], "lineart": []}
    attn1 = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1

    def before(module, args):
        events.append([type(attn1.processor).__name__, motion_calls[0], module.conv_in.weight.data_ptr()])

    def after(module, args, output):
        events[-1][1] = motion_calls[0] - events[-1][1]  # motion modules run inside this UNet call

    hooks = [pipe.unet.register_forward_pre_hook(before), pipe.unet.register_forward_hook(after)]
    hooks += [m.register_forward_pre_hook(lambda *a: motion_calls.__setitem__(0, motion_calls[0] + 1))
              for m in motion_modules(pipe.unet)]
    for name, net in zip(["lineart", "tile"], pipe.controlnets):
        hooks.append(net.register_forward_pre_hook(
            lambda m, a, kw, name=name: conds[name].append(kw["controlnet_cond"].clone()), with_kwargs=True))
    try:
        # the reference's schedule: every window one UNet call (reuse across windows: tests/test_reuse.py)
        out = render(pipe, video, edit_prompt="orange dress, night", reuse_across_windows=False,
                     edit_kwargs=dict(EDIT_KWARGS, reuse_across_windows=False))
    finally:
        for h in hooks:
            h.remove()
    branch = [e for e in events if e[0] == "CrossFrameAttnProcessor"]
    main = [e for e in events if e[0] != "CrossFrameAttnProcessor"]
    assert len(branch) == 2 * 2 and len(main) == 2 * 2  # steps x windows each; cross-frame only in the branch
    assert all(e[1] == 0 for e in branch)  # no motion module ran in the branch
    assert all(e[1] == len(motion_modules(pipe.unet)) for e in main)  # every one ran in the main pass
    assert len({e[2] for e in events}) == 1  # the same UNet weights (same storage) in both passes
    assert type(attn1.processor).__name__ != "CrossFrameAttnProcessor"  # restored afterwards

    colors = out.color_frames
    assert colors.shape == (N, EDIT, EDIT, 3) and colors.dtype == np.uint8
    resized = np.stack([np.asarray(PIL.Image.fromarray(c).resize((SIZE, SIZE), PIL.Image.LANCZOS)) for c in colors])
    first_window = torch.from_numpy(resized[:4]).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(conds["tile"][0], first_window.repeat(2, 1, 1, 1))  # both CFG branches
    lineart = pipe.annotate(torch.from_numpy(video).permute(0, 3, 1, 2), "lineart", tiny_lineart_detector())
    torch.testing.assert_close(conds["lineart"][0], (lineart[:4].float() / 255).repeat(2, 1, 1, 1))


def test_color_video_skips_the_branch_and_matches(edit_pipe):
    video = make_video(N, SIZE)
    edited = render(edit_pipe, video, edit_prompt="blue sky", edit_kwargs=EDIT_KWARGS)
    calls = []
    hooks = [net.register_forward_pre_hook(lambda *a: calls.append(1)) for net in edit_pipe.edit_controlnets]
    try:
        given = render(edit_pipe, video, color_video=edited.color_frames)
    finally:
        for h in hooks:
            h.remove()
    assert calls == [] and given.color_frames is None
    np.testing.assert_array_equal(given.frames, edited.frames)
    plain = render(edit_pipe, video)  # the tile ControlNet on the video itself
    assert np.abs(plain.frames - edited.frames).max() > 1e-3


def test_edit_prompt_changes_the_color_video(edit_pipe):
    video = make_video(N, SIZE)
    a = edit_pipe.make_color_video(video, "orange dress", "bad", generator=torch.Generator().manual_seed(0), **EDIT_KWARGS)
    b = edit_pipe.make_color_video(video, "green hair", "bad", generator=torch.Generator().manual_seed(0), **EDIT_KWARGS)
    assert np.abs(a.astype(int) - b.astype(int)).max() > 0


def test_fastblend_smooths_the_decoded_frames_guided_by_the_originals(edit_pipe):
    from fastblend import smooth_video

    video = make_video(N, SIZE)
    raw = edit_pipe.make_color_video(video, "night", generator=torch.Generator().manual_seed(0), fastblend=False,
                                     **EDIT_KWARGS)
    smoothed = edit_pipe.make_color_video(video, "night", generator=torch.Generator().manual_seed(0), **EDIT_KWARGS)
    expected = smooth_video(raw, video, progress=False, **{**FASTBLEND_DEFAULTS, "device": "cpu"})
    np.testing.assert_array_equal(smoothed, expected)
    assert FASTBLEND_DEFAULTS["mode"] == "fast" and FASTBLEND_DEFAULTS["window_size"] == 60


def test_branch_starts_from_one_noise_sample_at_strength_0_9(edit_pipe):
    """img2img at 0.9 (first timestep 899) from ONE noise sample repeated over the frames (SPEC 2)."""
    video = make_video(N, SIZE)
    seen = []
    hook = edit_pipe.unet.register_forward_pre_hook(lambda m, a: seen.append((int(a[1]), a[0].clone())))
    try:
        edit_pipe.make_color_video(video, "night", generator=torch.Generator().manual_seed(0), fastblend=False,
                                   **EDIT_KWARGS)
    finally:
        hook.remove()
    assert [t for t, _ in seen[::2]] == [899, 0]  # two windows per step
    noise = torch.randn(1, 4, 1, EDIT // 8, EDIT // 8, generator=torch.Generator().manual_seed(0))
    x0 = edit_pipe.encode_video(torch.from_numpy(video).permute(0, 3, 1, 2))
    scaled = np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)[899]  # scaled_linear betas
    expected = (np.sqrt(scaled) * x0 + np.sqrt(1 - scaled) * noise)[:, :, :4]
    torch.testing.assert_close(seen[0][1][0:1], expected, rtol=1e-5, atol=1e-5)  # negative branch, window 0


def test_unet_without_motion_modules_is_the_2d_unet():
    parts = tiny_components(seed=3)
    unet2d = parts["unet"]
    pipe = DiffutoonPipeline(scheduler=DiffutoonDDIMScheduler(), **parts)
    x, emb = torch.randn(1, 4, 3, 4, 4), torch.randn(3, 77, 32)
    with torch.no_grad(), without_motion_modules(pipe.unet):
        ours = pipe.unet(x, 300, emb).sample
    expected = unet2d(x[0].transpose(0, 1), 300, emb).sample.transpose(0, 1)[None]
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert (pipe.unet(x, 300, emb).sample - ours).abs().max() > 1e-4  # motion modules back


def test_editing_errors_before_any_model_runs(tiny_pipe, edit_pipe):
    video = make_video(N, SIZE)
    with pytest.raises(ValueError, match="edit_controlnets"):
        tiny_pipe(video=video, prompt="a", edit_prompt="night")  # no editing ControlNets loaded
    with pytest.raises(ValueError, match="unknown settings"):
        edit_pipe(video=video, prompt="a", edit_prompt="night", edit_kwargs={"steps": 3})
    with pytest.raises(ValueError, match="one per frame"):
        edit_pipe(video=video, prompt="a", color_video=video[:3])
    with pytest.raises(ValueError, match="multiples of 8"):
        edit_pipe(video=video, prompt="a", edit_prompt="night", edit_kwargs={"height": 30})
    with pytest.raises(ValueError, match="either"):
        edit_pipe(video=video, prompt="a", edit_prompt="night", color_video=video)


def test_cross_attention_kwargs_reach_the_editing_branch(edit_pipe, monkeypatch):
    """LoRA scales (`cross_attention_kwargs={"scale": s}`) apply to both passes unless `edit_kwargs` sets its own."""
    seen = []

    class Stop(Exception):
        pass

    def edit_pass(self, run, source, edit_prompt, negative_prompt, generator, **settings):
        seen.append(settings["cross_attention_kwargs"])
        raise Stop

    monkeypatch.setattr(type(edit_pipe), "_edit_pass", edit_pass)
    for edit_kwargs, expected in [(EDIT_KWARGS, {"scale": 0.3}),
                                  (dict(EDIT_KWARGS, cross_attention_kwargs={"scale": 0.9}), {"scale": 0.9})]:
        with pytest.raises(Stop):
            render(edit_pipe, make_video(N, SIZE), edit_prompt="blue sky", edit_kwargs=edit_kwargs,
                   cross_attention_kwargs={"scale": 0.3})
    assert seen == [{"scale": 0.3}, {"scale": 0.9}]


@pytest.mark.parametrize("key", ["ip_adapter_image", "ip_adapter_image_embeds"])
def test_a_style_in_edit_kwargs_is_refused_before_any_model_runs(job_pipe, monkeypatch, key):
    from render_job import job

    def no_models(*args, **kwargs):
        raise AssertionError("a model ran")

    monkeypatch.setattr(job_pipe, "prepare_control_frames", no_models)
    kwargs = job(edit=True)
    kwargs["edit_kwargs"][key] = PIL.Image.new("RGB", (8, 8)) if key == "ip_adapter_image" else [torch.zeros(2, 1, 16)]
    # it was ignored beside the call's style image, or an AttributeError inside the branch without an IP-Adapter
    with pytest.raises(ValueError, match="the style image of both passes"):
        job_pipe(**kwargs)
