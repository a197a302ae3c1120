"""The main toon-shading pass (issue 2): the paper's equations, the denoiser, loading, placement, bad input."""

import functools
import math
import os

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import make_video, save_sd15_folder

from diffutoon.scheduling import DiffutoonDDIMScheduler, diffutoon_timesteps
from diffutoon.tiny import build_tiny_pipeline, tiny_components, tiny_lineart_detector
from pipeline_diffutoon import (
    DiffutoonPipeline,
    _PerFrameGroupNorm,
    per_frame_motion_groupnorm,
    sliding_windows,
    unet_motion_from_unet2d,
    window_blend_weights,
    window_weights,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32


def assert_close_rel(actual, expected, tol=1e-5):
    """max |actual - expected| <= tol * max |expected|: fp32 rounding relative to the latents' scale (DDIM from
    t=999 with CFG 7 multiplies a noise prediction's rounding by ~50 on its way into the latents)."""
    err, scale = (actual - expected).abs().max().item(), expected.abs().max().item()
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol} x {scale:.3g}"


def run(pipe, video, **kwargs):
    """A quick render with user-given conditions (no annotator) and fixed noise."""
    n = len(video)
    args = dict(video=video, prompt="a girl dancing", negative_prompt="bad", num_inference_steps=2,
                conditioning_frames=[make_video(n, SIZE, seed=3), None], context_length=4, context_stride=2,
                generator=torch.Generator().manual_seed(0), output_type="latent")
    args.update(kwargs)
    return pipe(**args).frames


# ---------------------------------------------------------------------------------------------------------------
# Equations against SPEC's worked examples and independent formulas


def test_sliding_windows_spec_examples():
    assert sliding_windows(30, 16, 8) == [(0, 16), (8, 24), (16, 30)]
    assert sliding_windows(16, 16, 8) == [(0, 16)]  # N <= d: one window
    assert sliding_windows(5, 16, 8) == [(0, 5)]
    assert sliding_windows(24, 16, 8) == [(0, 16), (8, 24)]  # stops after the first window that reaches N
    assert sliding_windows(25, 16, 8) == [(0, 16), (8, 24), (16, 25)]  # short last window, not shifted back
    assert sliding_windows(10, 4, 3) == [(0, 4), (3, 7), (6, 10)]


def test_window_weights_spec_formula():
    for start, end in [(0, 16), (8, 24), (16, 30), (3, 4), (0, 2), (5, 12)]:
        expected = [max(1 - abs(i - (start + end - 1) / 2) / ((end - start - 1 + 0.01) / 2), 0.01)
                    for i in range(start, end)]
        assert window_weights(start, end).tolist() == pytest.approx(expected, rel=1e-6)
    w = window_weights(0, 16)
    assert w[0] == pytest.approx(0.01) and w[-1] == pytest.approx(0.01)
    assert w.max().item() == pytest.approx(0.9334, abs=1e-4)


def test_blend_weights_are_a_partition_of_unity_and_exact_for_single_cover():
    windows = sliding_windows(30, 16, 8)
    total = torch.zeros(30)
    for (start, end), w in zip(windows, window_blend_weights(windows, 30)):
        total[start:end] += w
    torch.testing.assert_close(total, torch.ones(30))
    single = window_blend_weights([(0, 7)], 7)[0]
    assert torch.equal(single, torch.ones(7))  # exactly that window's prediction


def test_timesteps_spec_examples():
    assert diffutoon_timesteps(10) == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    steps = diffutoon_timesteps(20, 0.9)
    assert steps[:2] == [899, 852] and steps[-2:] == [47, 0] and len(steps) == 20
    assert diffutoon_timesteps(1) == [999]


def test_scheduler_step_by_hand():
    betas = np.linspace(0.00085, 0.012, 1000, dtype=np.float64)
    alpha_bar = np.cumprod(1 - betas)
    scheduler = DiffutoonDDIMScheduler()
    scheduler.set_timesteps(10)
    x, eps = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, 4, 3, 3, dtype=torch.float64)
    for t, t_next in [(999, 888), (888, 777)]:
        a, ap = alpha_bar[t], alpha_bar[t_next]
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)  # eq. 8 written through x0
        expected = math.sqrt(ap) * x0 + math.sqrt(1 - ap) * eps
        x = scheduler.step(eps, t, x).prev_sample
        torch.testing.assert_close(x, expected, rtol=1e-12, atol=1e-12)
    scheduler.set_timesteps(2)  # last step goes to alpha-bar = 1: x0 itself
    scheduler.step(eps, 999, x)
    out = scheduler.step(eps, 0, x).prev_sample
    torch.testing.assert_close(out, (x - math.sqrt(1 - alpha_bar[0]) * eps) / math.sqrt(alpha_bar[0]))
    scaled = DiffutoonDDIMScheduler(beta_schedule="scaled_linear")
    expected = np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)
    np.testing.assert_allclose(scaled.alphas_cumprod.numpy(), expected, rtol=1e-12)


def test_spec_dpmsolver_matches_our_ddim():
    """SPEC: first-order DPM-Solver++ given the reference list reproduces the reference DDIM (about 1e-5)."""
    from diffusers import DPMSolverMultistepScheduler

    ours, theirs = DiffutoonDDIMScheduler(), DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="linear", solver_order=1,
        algorithm_type="dpmsolver++", final_sigmas_type="zero")
    ours.set_timesteps(10)
    theirs.set_timesteps(timesteps=diffutoon_timesteps(10))
    gen = torch.Generator().manual_seed(0)
    x = y = torch.randn(1, 4, 8, 8, generator=gen)
    for t in ours.timesteps:
        eps = torch.randn(1, 4, 8, 8, generator=gen)
        x, y = ours.step(eps, t, x).prev_sample, theirs.step(eps, t, y).prev_sample
    torch.testing.assert_close(x, y, rtol=2e-5, atol=2e-4)


def test_add_noise_is_the_img2img_start():
    scheduler = DiffutoonDDIMScheduler()
    x0, noise = torch.randn(1, 4, 2, 3, 3), torch.randn(1, 4, 2, 3, 3)
    a = float(scheduler.alphas_cumprod[899])
    torch.testing.assert_close(scheduler.add_noise(x0, noise, torch.tensor([899])),
                               math.sqrt(a) * x0 + math.sqrt(1 - a) * noise)


# ---------------------------------------------------------------------------------------------------------------
# Model plumbing


def test_per_frame_groupnorm_equals_a_per_frame_reference():
    norm = torch.nn.GroupNorm(4, 8, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 8, 5, 3, 3) * torch.linspace(0.5, 3, 5).view(1, 1, 5, 1, 1)  # frames of different scale
    expected = torch.stack([norm(x[:, :, f]) for f in range(5)], dim=2)
    norm.__class__ = _PerFrameGroupNorm
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-6)
    norm.__class__ = torch.nn.GroupNorm
    assert not torch.allclose(norm(x), expected, atol=1e-3)  # diffusers' statistics span all frames


def test_per_frame_groupnorm_switch_changes_output_and_restores(tiny_pipe, video):
    classes = lambda: {type(m) for m in tiny_pipe.unet.modules() if isinstance(m, torch.nn.GroupNorm)}
    before = classes()
    with per_frame_motion_groupnorm(tiny_pipe.unet):
        assert _PerFrameGroupNorm in classes()
    assert classes() == before
    a = run(tiny_pipe, video[:5], motion_groupnorm="per_frame", num_inference_steps=1)
    b = run(tiny_pipe, video[:5], motion_groupnorm="diffusers", num_inference_steps=1)
    assert (a - b).abs().max() > 1e-4


def test_motion_unet_shares_weights_and_matches_diffusers_copy():
    from diffusers import UNetMotionModel

    parts = tiny_components(seed=1)
    unet2d, adapter = parts["unet"], parts["motion_adapter"]
    ours = unet_motion_from_unet2d(unet2d, adapter)
    theirs = UNetMotionModel.from_unet2d(unet2d, adapter).eval()
    storage = {p.data_ptr() for p in [*unet2d.parameters(), *adapter.parameters()]}
    assert all(p.data_ptr() in storage for p in ours.parameters())  # no second copy of any weight
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    x, emb = torch.randn(1, 4, 3, 4, 4), torch.randn(3, 77, 32)
    torch.testing.assert_close(ours(x, 500, emb).sample, theirs(x, 500, emb).sample, rtol=0, atol=0)


def test_clip_skip_and_long_prompts_against_manual_encoding(tiny_pipe):
    enc, tok = tiny_pipe.text_encoder, tiny_pipe.tokenizer
    ids = tok("a girl", padding="max_length", max_length=77, return_tensors="pt").input_ids
    hidden = enc(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(tiny_pipe.encode_prompt("a girl", "cpu", clip_skip=1), enc.final_layer_norm(hidden[-2]))
    torch.testing.assert_close(tiny_pipe.encode_prompt("a girl", "cpu", clip_skip=None), enc(ids)[0])
    long = " ".join(["x"] * 80)  # 80 one-character words: two chunks of 75 tokens
    embeds = tiny_pipe.encode_prompt(long, "cpu", clip_skip=None)
    assert embeds.shape == (1, 154, 32)
    first = tok(" ".join(["x"] * 75), padding="max_length", max_length=77, return_tensors="pt").input_ids
    torch.testing.assert_close(embeds[:, :77], enc(first)[0])


def test_textual_inversion_in_the_negative_prompt(video):
    pipe = build_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    pipe.load_textual_inversion(vectors, token="badneg")  # a 3-vector embedding
    ids = pipe.tokenizer(pipe.maybe_convert_prompt("badneg", pipe.tokenizer)).input_ids
    assert len(ids) == 2 + 3  # the keyword expands to all its vectors
    table = pipe.text_encoder.get_input_embeddings().weight
    torch.testing.assert_close(table[ids[1:4]], vectors)
    a = run(pipe, video[:4], negative_prompt="badneg", num_inference_steps=1)
    b = run(pipe, video[:4], negative_prompt="bad", num_inference_steps=1)
    assert (a - b).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------------------------
# The denoiser


def test_one_window_equals_diffusers_animatediff_controlnet(tiny_pipe):
    """Our plumbing = diffusers' AnimateDiffControlNetPipeline when one window covers the video."""
    from diffusers import AnimateDiffControlNetPipeline

    n = 6
    video, lineart = make_video(n, SIZE), make_video(n, SIZE, seed=5)
    latents = torch.randn(1, 4, n, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(3))
    seen = {}

    def grab(name):
        def callback(pipe, i, t, tensors):
            seen[name] = tensors["latents"].detach().cpu().clone()
            return tensors
        return callback

    common = dict(negative_prompt="ugly", num_inference_steps=2, guidance_scale=7.0, output_type="np",
                  controlnet_conditioning_scale=[0.5, 0.5], latents=latents.clone())
    ours = tiny_pipe(video=video, prompt="a girl", conditioning_frames=[lineart, None], context_length=16,
                     context_stride=8, clip_skip=None, motion_groupnorm="diffusers",
                     callback_on_step_end=grab("ours"), **common).frames[0]
    ref = AnimateDiffControlNetPipeline(vae=tiny_pipe.vae, text_encoder=tiny_pipe.text_encoder,
                                        tokenizer=tiny_pipe.tokenizer, unet=tiny_pipe.unet, motion_adapter=None,
                                        controlnet=tiny_pipe.controlnet, scheduler=DiffutoonDDIMScheduler())
    ref.set_progress_bar_config(disable=True)
    pil = lambda frames: [PIL.Image.fromarray(f) for f in frames]
    theirs = ref(prompt="a girl", num_frames=n, height=SIZE, width=SIZE, conditioning_frames=[pil(lineart), pil(video)],
                 callback_on_step_end=grab("theirs"), **common).frames[0]
    torch.testing.assert_close(seen["ours"], seen["theirs"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def _reference_render(pipe, control, prompt, negative_prompt, latents, steps, guidance, length, stride, scales):
    """An independent, plain re-computation: loop over windows, each CFG branch on its own, weighted mean, step."""
    x = latents.clone()
    n = x.shape[2]
    windows = []
    for start in range(0, n, stride):
        windows.append((start, min(start + length, n)))
        if start + length >= n:
            break
    alpha_bar = np.cumprod(1 - np.linspace(0.00085, 0.012, 1000, dtype=np.float64))
    timesteps = [round(999 - k * 999 / (steps - 1)) for k in range(steps)]
    embeds = [pipe.encode_prompt(p, "cpu", clip_skip=1) for p in (negative_prompt, prompt)]
    for k, t in enumerate(timesteps):
        acc, weight = torch.zeros_like(x), torch.zeros(n)
        for l, r in windows:
            preds = []
            for emb in embeds:
                f = r - l
                e = emb.repeat(f, 1, 1)
                flat = x[0, :, l:r].transpose(0, 1)
                down = mid = None
                for net, frames, scale in zip(pipe.controlnets, control, scales):
                    image = torch.from_numpy(frames[l:r]).permute(0, 3, 1, 2).float() / 255
                    d, m = net(flat, t, encoder_hidden_states=e, controlnet_cond=image, conditioning_scale=scale,
                               return_dict=False)
                    down = d if down is None else [a + b for a, b in zip(down, d)]
                    mid = m if mid is None else mid + m
                preds.append(pipe.unet(x[:, :, l:r], t, encoder_hidden_states=e, down_block_additional_residuals=down,
                                       mid_block_additional_residual=mid).sample)
            guided = preds[0] + guidance * (preds[1] - preds[0])
            w = torch.tensor([max(1 - abs(i - (l + r - 1) / 2) / ((r - l - 1 + 0.01) / 2), 0.01) for i in range(l, r)])
            acc[:, :, l:r] += w.view(1, 1, -1, 1, 1) * guided
            weight[l:r] += w
        eps = acc / weight.view(1, 1, -1, 1, 1)
        a = alpha_bar[t]
        ap = alpha_bar[timesteps[k + 1]] if k + 1 < len(timesteps) else 1.0
        x = math.sqrt(ap) * (x - math.sqrt(1 - a) * eps) / math.sqrt(a) + math.sqrt(1 - ap) * eps
    return x


def test_several_windows_equal_an_independent_recomputation(tiny_pipe):
    n = 9
    video, lineart = make_video(n, SIZE), make_video(n, SIZE, seed=5)
    latents = torch.randn(1, 4, n, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(4))
    args = dict(prompt="a girl", negative_prompt="ugly", latents=latents, steps=3, guidance=7.0, length=4, stride=3,
                scales=[0.5, 0.8])
    with torch.no_grad(), per_frame_motion_groupnorm(tiny_pipe.unet, False):
        expected = _reference_render(tiny_pipe, [lineart, video], **args)
    out = tiny_pipe(video=video, prompt="a girl", negative_prompt="ugly", conditioning_frames=[lineart, None],
                    latents=latents.clone(), num_inference_steps=3, guidance_scale=7.0, context_length=4,
                    context_stride=3, controlnet_conditioning_scale=[0.5, 0.8], motion_groupnorm="diffusers",
                    output_type="latent").frames
    assert sliding_windows(n, 4, 3) == [(0, 4), (3, 7), (6, 9)]  # three windows, a short tail
    assert_close_rel(out, expected)


def test_batched_cfg_equals_two_sweeps(tiny_pipe, video):
    batched = run(tiny_pipe, video[:7], batch_cfg=True)
    separate = run(tiny_pipe, video[:7], batch_cfg=False)
    assert_close_rel(batched, separate)


def test_models_never_see_more_than_one_window(tiny_pipe):
    n, length = 11, 4
    seen = {"unet": [], "controlnet": [], "vae_decode": [], "vae_encode": []}
    hooks = [tiny_pipe.unet.register_forward_pre_hook(lambda m, a: seen["unet"].append(a[0].shape[0] * a[0].shape[2])),
             tiny_pipe.vae.decoder.register_forward_pre_hook(lambda m, a: seen["vae_decode"].append(a[0].shape[0])),
             tiny_pipe.vae.encoder.register_forward_pre_hook(lambda m, a: seen["vae_encode"].append(a[0].shape[0]))]
    hooks += [net.register_forward_pre_hook(lambda m, a: seen["controlnet"].append(a[0].shape[0]))
              for net in tiny_pipe.controlnets]
    try:
        run(tiny_pipe, make_video(n, SIZE), context_length=length, context_stride=2, output_type="np",
            decode_chunk_size=3, strength=0.7, reuse_across_windows=False)  # the reference's schedule: tests/test_reuse.py
    finally:
        for h in hooks:
            h.remove()
    assert max(seen["unet"]) == 2 * length  # both CFG branches of one window
    assert max(seen["controlnet"]) == 2 * length
    assert max(seen["vae_decode"]) <= 3 and max(seen["vae_encode"]) <= 3
    assert len(seen["unet"]) == 2 * len(sliding_windows(n, length, 2))  # 2 steps x windows


def test_strength_starts_from_the_noised_video(tiny_pipe, video):
    seen = []
    hook = tiny_pipe.unet.register_forward_pre_hook(lambda m, a: seen.append((int(a[1]), a[0][:1].clone())))
    try:
        run(tiny_pipe, video[:4], strength=0.5, num_inference_steps=3, reuse_across_windows=False)  # one call a step
    finally:
        hook.remove()
    assert [t for t, _ in seen] == [499, 250, 0]
    # x = sqrt(ab) x0 + sqrt(1 - ab) noise at t = 499, x0 the VAE posterior mean times 0.18215 (SPEC 1)
    pixels = torch.from_numpy(video[:4]).permute(0, 3, 1, 2).float() / 127.5 - 1
    x0 = (tiny_pipe.vae.encode(pixels).latent_dist.mean * tiny_pipe.vae.config.scaling_factor).transpose(0, 1)[None]
    noise = torch.randn(1, 4, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
    a = float(np.cumprod(1 - np.linspace(0.00085, 0.012, 1000, dtype=np.float64))[499])
    torch.testing.assert_close(seen[0][1], math.sqrt(a) * x0 + math.sqrt(1 - a) * noise, rtol=1e-5, atol=1e-5)


def test_edit_controlnets_loaded_but_unused_change_nothing(video):
    pipe = build_tiny_pipeline(edit=True)
    pipe.set_progress_bar_config(disable=True)
    with_edit_nets = run(pipe, video[:5])
    pipe.register_modules(edit_controlnet=None)
    torch.testing.assert_close(run(pipe, video[:5]), with_edit_nets, rtol=0, atol=0)


def test_other_schedulers_work(video):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    for scheduler in (DDIMScheduler(beta_schedule="linear"), EulerDiscreteScheduler()):
        pipe.scheduler = scheduler
        out = run(pipe, video[:5], output_type="np", strength=0.6, num_inference_steps=3)[0]
        assert out.shape == (5, SIZE, SIZE, 3) and np.isfinite(out).all()
    with pytest.raises(ValueError, match="keeps no step"):  # diffusers' convention: int(3 x 0.2) = 0 steps
        run(pipe, video[:5], strength=0.2, num_inference_steps=3)


def test_output_types_and_callback(tiny_pipe, video):
    steps = []

    def callback(pipe, i, t, tensors):
        steps.append((i, int(t), tuple(tensors["latents"].shape), tuple(tensors["prompt_embeds"].shape)))
        return {}

    pil = run(tiny_pipe, video[:3], output_type="pil", callback_on_step_end=callback,
              callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    assert len(pil) == 1 and len(pil[0]) == 3 and pil[0][0].size == (SIZE, SIZE)
    assert steps == [(0, 999, (1, 4, 3, 4, 4), (1, 77, 32)), (1, 0, (1, 4, 3, 4, 4), (1, 77, 32))]
    arr = run(tiny_pipe, video[:3], output_type="np")
    assert arr.shape == (1, 3, SIZE, SIZE, 3) and 0 <= arr.min() and arr.max() <= 1
    np.testing.assert_allclose(np.asarray(pil[0][1]) / 255, arr[0, 1], atol=1 / 255 + 1e-6)
    pt = run(tiny_pipe, video[:3], output_type="pt")
    assert pt.shape == (1, 3, 3, SIZE, SIZE)
    latents = run(tiny_pipe, video[:3], output_type="latent")
    assert latents.shape == (1, 4, 3, SIZE // 8, SIZE // 8)


def test_video_formats_and_default_lineart_are_equivalent(tiny_pipe):
    frames = make_video(3, 64)
    detector = tiny_lineart_detector()
    common = dict(prompt="a", num_inference_steps=1, context_length=4, context_stride=2, output_type="latent",
                  lineart_detector=detector)
    as_array = tiny_pipe(video=frames, generator=torch.Generator().manual_seed(0), **common).frames
    as_pil = tiny_pipe(video=[PIL.Image.fromarray(f) for f in frames], generator=torch.Generator().manual_seed(0),
                       **common).frames
    as_float = tiny_pipe(video=torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255,
                         generator=torch.Generator().manual_seed(0), **common).frames
    torch.testing.assert_close(as_array, as_pil, rtol=0, atol=0)
    torch.testing.assert_close(as_array, as_float, rtol=0, atol=0)
    # the default lineart condition is the detector's output at the frame resolution
    lineart = tiny_pipe.annotate(torch.from_numpy(frames).permute(0, 3, 1, 2), "lineart", detector)
    given = tiny_pipe(video=frames, conditioning_frames=[lineart.permute(0, 2, 3, 1).numpy(), None],
                      generator=torch.Generator().manual_seed(0), **common).frames
    torch.testing.assert_close(as_array, given, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Loading


def test_save_reload_and_custom_pipeline_loading(tmp_path, tiny_pipe, video):
    from diffusers import DiffusionPipeline

    folder = tmp_path / "tiny"
    tiny_pipe.save_pretrained(folder)
    expected = run(tiny_pipe, video[:5])
    direct = DiffutoonPipeline.from_pretrained(folder)
    custom = DiffusionPipeline.from_pretrained(folder, custom_pipeline=os.path.join(ROOT, "pipeline_diffutoon.py"),
                                               trust_remote_code=True)
    assert type(custom).__name__ == "DiffutoonPipeline"
    for pipe in (direct, custom):
        pipe.set_progress_bar_config(disable=True)
        assert type(pipe.scheduler).__name__ == "DiffutoonDDIMScheduler"
        torch.testing.assert_close(run(pipe, video[:5]), expected, rtol=0, atol=0)


def test_loading_from_a_base_folder_with_adapter_and_controlnets(tmp_path, video):
    """The real-usage path: an SD1.5 folder (2D UNet) + MotionAdapter + ControlNets given at load time."""
    from diffusers import PNDMScheduler

    parts = tiny_components(seed=2)
    base = tmp_path / "sd15"
    for name in ("vae", "text_encoder", "tokenizer", "unet"):
        parts[name].save_pretrained(base / name)
    PNDMScheduler().save_pretrained(base / "scheduler")
    (base / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",'
                                           '"vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],'
                                           '"tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],'
                                           '"scheduler": ["diffusers", "PNDMScheduler"], "safety_checker": [null, null],'
                                           '"feature_extractor": [null, null]}')
    parts["motion_adapter"].save_pretrained(tmp_path / "adapter")
    for i, net in enumerate(parts["controlnet"]):
        net.save_pretrained(tmp_path / f"cn{i}")
    pipe = DiffutoonPipeline.from_models(str(base), motion_adapter=str(tmp_path / "adapter"),
                                         controlnets=[str(tmp_path / "cn0"), str(tmp_path / "cn1")])
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.unet).__name__ == "UNetMotionModel" and pipe.motion_adapter is None
    assert type(pipe.scheduler).__name__ == "DiffutoonDDIMScheduler"
    reference = DiffutoonPipeline(scheduler=DiffutoonDDIMScheduler(), **tiny_components(seed=2))
    reference.set_progress_bar_config(disable=True)
    torch.testing.assert_close(run(pipe, video[:4]), run(reference, video[:4]), rtol=0, atol=0)


def test_the_reference_sampler_on_every_loading_path_unless_chosen(tmp_path, video):
    """Issue 9.1: a checkpoint's own scheduler (SD1.5: PNDM) is not used; a scheduler passed or assigned is."""
    from diffusers import ControlNetModel, DiffusionPipeline, EulerDiscreteScheduler, MotionAdapter, PNDMScheduler

    sd15 = save_sd15_folder(tmp_path, tiny_components(seed=2))
    parts = dict(motion_adapter=MotionAdapter.from_pretrained(tmp_path / "adapter"),
                 controlnet=[ControlNetModel.from_pretrained(tmp_path / f"cn{i}") for i in range(2)])
    custom = dict(custom_pipeline=os.path.join(ROOT, "pipeline_diffutoon.py"), trust_remote_code=True)

    def timesteps_run(pipe):
        seen = []
        pipe.set_progress_bar_config(disable=True)
        run(pipe, video[:2], num_inference_steps=4, callback_on_step_end=lambda p, i, t, d: seen.append(int(t)) or {})
        return seen

    reference = [999, 666, 333, 0]
    assert diffutoon_timesteps(4) == reference
    assert timesteps_run(DiffusionPipeline.from_pretrained(sd15, **custom, **parts)) == reference  # README's recipe
    direct = DiffutoonPipeline.from_pretrained(sd15, **parts)
    assert timesteps_run(direct) == reference
    assert type(DiffutoonPipeline(**tiny_components(seed=2)).scheduler).__name__ == "DiffutoonDDIMScheduler"

    # chosen on purpose: passed at load time (either way), assigned later, or saved with a Diffutoon pipeline
    pndm = PNDMScheduler.from_pretrained(sd15, subfolder="scheduler")
    pndm.set_timesteps(4)
    pndm_timesteps = pndm.timesteps.tolist()
    assert pndm_timesteps != reference
    passed = DiffusionPipeline.from_pretrained(sd15, scheduler=PNDMScheduler.from_pretrained(sd15, subfolder="scheduler"),
                                               **custom, **parts)
    assert timesteps_run(passed) == pndm_timesteps
    euler = DiffutoonPipeline.from_pretrained(sd15, scheduler=EulerDiscreteScheduler(), **parts)
    assert type(euler.scheduler) is EulerDiscreteScheduler
    direct.scheduler = PNDMScheduler.from_pretrained(sd15, subfolder="scheduler")
    assert timesteps_run(direct) == pndm_timesteps
    direct.save_pretrained(tmp_path / "saved")
    assert type(DiffutoonPipeline.from_pretrained(tmp_path / "saved").scheduler) is PNDMScheduler


def test_diffusers_callback_conventions_cfg_cutoff(tiny_pipe, video):
    """Issue 9.3: diffusers' `SDCFGCutoffCallback` (a `PipelineCallback`, passed alone) drops the negative branch after
    its step; the pipeline has diffusers' call-state properties."""
    from diffusers.callbacks import MultiPipelineCallbacks, SDCFGCutoffCallback

    batches = []
    hook = tiny_pipe.unet.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
    run = functools.partial(globals()["run"], reuse_across_windows=False)  # one UNet call per window and step
    try:
        plain = run(tiny_pipe, video[:3], num_inference_steps=3)  # 3 frames: one window per step
        assert batches == [2, 2, 2] and tiny_pipe.guidance_scale == 7.0 and tiny_pipe.do_classifier_free_guidance
        batches.clear()
        cutoff = SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=0)
        cut = run(tiny_pipe, video[:3], num_inference_steps=3, callback_on_step_end=cutoff)
        assert batches == [2, 1, 1]  # both branches at step 0, the positive one alone after the cut-off
        assert tiny_pipe.guidance_scale == 0.0 and not tiny_pipe.do_classifier_free_guidance
        assert tiny_pipe.num_timesteps == 3 and not tiny_pipe.interrupt
        assert (cut - plain).abs().max() > 1e-3
        cutoff = SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=0)
        reused = globals()["run"](tiny_pipe, video[:3], num_inference_steps=3, callback_on_step_end=cutoff)
        assert_close_rel(reused, cut)  # reuse across windows follows the branches each step has
        batches.clear()
        multi = MultiPipelineCallbacks([SDCFGCutoffCallback(cutoff_step_ratio=0.5)])  # int(3 x 0.5) = step 1
        run(tiny_pipe, video[:3], num_inference_steps=3, callback_on_step_end=multi)
        assert batches == [2, 2, 1]
    finally:
        hook.remove()

    def raise_guidance(pipe, i, t, tensors):  # diffusers' PipelineTesterMixin.test_callback_cfg
        pipe._guidance_scale += 1.0
        return tensors

    raised = run(tiny_pipe, video[:3], num_inference_steps=3, callback_on_step_end=raise_guidance)
    assert tiny_pipe.guidance_scale == 7.0 + tiny_pipe.num_timesteps
    assert (raised - plain).abs().max() > 1e-3  # the raised guidance was used from step 1 on


def test_frames_in_every_documented_layout_are_the_same_video(tiny_pipe):
    """A list of (3, H, W) uint8 tensors (the docstring's tensor layout, one frame each) is the video, not a
    mis-permuted one; so are lists of (H, W, 3) arrays, channels-first arrays, floats in [0, 1], other integer types."""
    frames = make_video(3, SIZE)
    expected = run(tiny_pipe, frames, num_inference_steps=1)
    chw = [torch.from_numpy(f).permute(2, 0, 1) for f in frames]
    for video in (chw, list(frames), torch.stack(chw).float() / 255, frames.astype(np.int64), [f / 255 for f in chw],
                  frames.transpose(0, 3, 1, 2)):
        torch.testing.assert_close(run(tiny_pipe, video, num_inference_steps=1), expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a ValueError naming the fix, before any model runs


BAD_INPUTS = [
    (dict(video=[]), "empty"),
    (dict(video=np.zeros((0, 32, 32, 3), np.uint8)), "N >= 1"),
    (dict(video=[PIL.Image.new("RGB", (32, 32)), PIL.Image.new("RGB", (40, 32))]), "same size"),
    (dict(height=36), "multiples of 8"),
    (dict(width=30), "multiples of 8"),
    (dict(conditioning_frames=[make_video(3, 32), None]), "one condition frame per video frame"),
    (dict(conditioning_frames=[None]), "one entry"),
    (dict(context_stride=0), "context_stride"),
    (dict(context_stride=4, context_length=4), "context_stride"),
    (dict(context_length=40, context_stride=8), "positional limit"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(strength=0.0), "strength"),
    (dict(strength=1.5), "strength"),
    (dict(prompt=["a", "b"]), "one string"),
    (dict(negative_prompt=["a", "b"]), "one string"),
    (dict(controlnet_conditioning_scale=[0.5]), "per ControlNet|ControlNets"),
    (dict(output_type="gif"), "output_type"),
    (dict(motion_groupnorm="batch"), "motion_groupnorm"),
    # issue 9.4
    (dict(video=make_video(5, 32).astype(np.float32)), r"floats in \[0, 255\].*pass uint8 frames, or divide by 255"),
    (dict(video=np.full((5, 32, 32, 3), np.nan, np.float32)), "NaN"),
    (dict(conditioning_frames=[make_video(5, 32) * 1.0, None]), "`conditioning_frames` for 'lineart' holds floats"),
    (dict(guidance_scale=-1.0), "guidance_scale must be a number in"),
    (dict(clip_skip=3), r"clip_skip must be in \[0, 2\] \(the text encoder has 3 layers"),
    (dict(decode_chunk_size=0), "decode_chunk_size must be >= 1"),
    (dict(video=make_video(5, 32)[..., 0]), r"shape \(5, 32, 32\), which looks like grayscale frames"),
    (dict(video=[make_video(1, 32)[0], make_video(1, 40)[0]]), r"same size, got frames of shapes \[\(32, 32, 3\), \(40, 40, 3\)\]"),
    (dict(color_video=make_video(5, 32) * 2.0), "color_video` holds floats"),
]


@pytest.mark.parametrize("kwargs,message", BAD_INPUTS)
def test_bad_input_raises_before_any_model_runs(tiny_pipe, kwargs, message):
    calls = []
    modules = [tiny_pipe.unet, tiny_pipe.vae.encoder, tiny_pipe.vae.decoder, tiny_pipe.text_encoder, *tiny_pipe.controlnets]
    hooks = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in modules]
    args = dict(video=make_video(5, 32), prompt="a", conditioning_frames=[make_video(5, 32), None],
                num_inference_steps=1, lineart_detector=lambda image, **kw: calls.append(1))
    args.update(kwargs)
    try:
        with pytest.raises(ValueError, match=message):
            tiny_pipe(**args)
    finally:
        for h in hooks:
            h.remove()
    assert calls == []


def test_memory_efficient_attention_on_is_exact_and_off_is_identical(video):
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    before = run(pipe, video[:5], output_type="np")
    pipe.enable_memory_efficient_attention(backend="chunked", chunk_size=16)
    processors = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
    assert processors == {"MemoryEfficientAttnProcessor"}
    on = run(pipe, video[:5], output_type="np")
    pipe.disable_memory_efficient_attention()
    off = run(pipe, video[:5], output_type="np")
    np.testing.assert_array_equal(off, before)  # off gives identical output
    np.testing.assert_allclose(on, before, atol=1e-5)  # exact attention, another summation order


def test_model_cpu_offload_gives_the_same_output(video):
    """The accelerate hooks of `enable_model_cpu_offload` (exercised with the CPU as the 'accelerator')."""
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    before = run(pipe, video[:5], output_type="np")
    pipe.enable_model_cpu_offload(device="cpu")
    assert len(pipe._all_hooks) >= 4  # text encoder -> unet -> vae chain, ControlNets hooked on their own
    np.testing.assert_array_equal(run(pipe, video[:5], output_type="np"), before)
