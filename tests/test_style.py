"""A style image (issue 19, section 2): diffusers' IP-Adapter, loaded offline from files in the real layout."""

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import make_video
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from test_prompts import N, SIZE, call, refused_before_models

from attention_processors import CrossFrameAttnProcessor, MemoryEfficientAttnProcessor
from diffutoon.render_folder import RenderFolderError
from diffutoon.tiny import build_tiny_pipeline, save_tiny_ip_adapter, tiny_depth_detector

STYLE = PIL.Image.fromarray(make_video(1, 40, seed=5)[0])  # not the video's size: the feature extractor resizes it


@pytest.fixture(scope="module")
def ip_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ip-adapter")
    unet = build_tiny_pipeline().unet
    return folder, {name: save_tiny_ip_adapter(folder, unet, weight_name=name)
                    for name in ("ip-adapter_sd15.safetensors", "ip-adapter_sd15.bin")}


@pytest.fixture(scope="module")
def styled(ip_files):
    """A tiny pipeline with the IP-Adapter loaded through diffusers' `load_ip_adapter`, and its plain render."""
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    plain = call(pipe)
    pipe.load_ip_adapter(str(ip_files[0]), subfolder="models", weight_name="ip-adapter_sd15.safetensors")
    return pipe, plain, call(pipe, ip_adapter_image=STYLE)


def test_the_real_file_layouts_load_and_off_on_and_scales_behave(styled, ip_files):
    pipe, plain, styled_render = styled
    from safetensors.torch import load_file

    state = load_file(ip_files[1]["ip-adapter_sd15.safetensors"])
    processors = [p for p in pipe.unet.attn_processors.values() if isinstance(p, IPAdapterAttnProcessor2_0)]
    assert len(processors) == 6 and len(state) == 4 + 2 * 6  # image_proj.{proj,norm}.*, to_k_ip + to_v_ip of 6 layers
    assert torch.equal(processors[0].to_k_ip[0].weight, state["ip_adapter.1.to_k_ip.weight"])
    assert pipe.image_encoder is not None and pipe.feature_extractor is not None
    other = build_tiny_pipeline()  # the .bin layout (nested dicts) loads the same weights
    other.load_ip_adapter(str(ip_files[0]), subfolder="models", weight_name="ip-adapter_sd15.bin")
    assert torch.equal(other.unet.encoder_hid_proj.image_projection_layers[0].image_embeds.weight,
                       state["image_proj.proj.weight"])

    assert not torch.equal(styled_render, plain)  # on changes the render
    try:
        pipe.set_ip_adapter_scale(0.0)  # off by scale: the plain render
        torch.testing.assert_close(call(pipe, ip_adapter_image=STYLE), plain, rtol=0, atol=1e-5)
        pipe.set_ip_adapter_scale({"up": {"block_1": [0.0, 1.0, 0.0]}})  # per block, as diffusers' InstantStyle
        scales = {name: p.scale[0] for name, p in pipe.unet.attn_processors.items() if hasattr(p, "to_k_ip")}
        assert [name for name, s in scales.items() if s] == ["up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor"]
        per_block = call(pipe, ip_adapter_image=STYLE)
        assert not torch.equal(per_block, plain) and not torch.equal(per_block, styled_render)
    finally:
        pipe.set_ip_adapter_scale(1.0)
    embeds = pipe.prepare_ip_adapter_image_embeds(STYLE, None, "cpu", 1, True)  # given embeddings: the same render
    assert torch.equal(call(pipe, ip_adapter_image_embeds=embeds), styled_render)
    other.unload_ip_adapter()  # unloaded: exactly the pipeline without one
    other.set_progress_bar_config(disable=True)
    assert torch.equal(call(other), plain)


def test_encoded_once_and_every_unet_call_gets_it_with_and_without_reuse(styled):
    pipe, _, styled_render = styled
    encoded, unet_calls = [], []
    hooks = [pipe.image_encoder.register_forward_pre_hook(lambda *a: encoded.append(1)),
             pipe.unet.register_forward_pre_hook(lambda m, a, kw: unet_calls.append(kw.get("added_cond_kwargs")),
                                                 with_kwargs=True)]
    try:
        without_reuse = call(pipe, ip_adapter_image=STYLE, reuse_across_windows=False)
    finally:
        for h in hooks:
            h.remove()
    # reuse across windows computes the UNet's first transformer (IP-Adapter layers) once per frame: the same render
    torch.testing.assert_close(without_reuse, styled_render, rtol=0, atol=1e-5 * styled_render.abs().max().item())
    assert len(encoded) == 1  # once per call (the negative: zeros, diffusers' `encode_image`)
    assert unet_calls and all(kw is not None and kw["image_embeds"][0].shape[0] == 2 for kw in unet_calls)


BAD_STYLE = [
    (dict(), "An IP-Adapter is loaded: pass `ip_adapter_image`"),
    (dict(ip_adapter_image=STYLE, ip_adapter_image_embeds=[torch.zeros(2, 1, 16)]), "either `ip_adapter_image` or"),
    (dict(ip_adapter_image=[STYLE, STYLE]), "one image .* per IP-Adapter: got 2 for 1"),
    (dict(ip_adapter_image_embeds=[torch.zeros(1, 1, 16)]), "first dimension of 2"),
    (dict(ip_adapter_image_embeds=torch.zeros(2, 1, 16)), "must be a list of 1 tensor"),
]


@pytest.mark.parametrize("kwargs,message", BAD_STYLE)
def test_bad_style_inputs_raise_before_any_model_runs(styled, tiny_pipe, kwargs, message):
    pipe = styled[0]
    refused_before_models(pipe, (pipe.unet, pipe.image_encoder), message, **kwargs)
    with pytest.raises(ValueError, match="A style image needs an IP-Adapter: pipe.load_ip_adapter"):
        call(tiny_pipe, ip_adapter_image=STYLE)


def test_style_resumes_bit_identically_and_is_part_of_the_identity(styled, tmp_path):
    pipe, _, styled_render = styled

    def stop(progress):
        if progress.get("step") == 1 and progress.get("window") == 1:
            pipe._interrupt = True

    folder = tmp_path / "r"
    assert call(pipe, ip_adapter_image=STYLE, render_dir=folder, progress_callback=stop) is None
    with pytest.raises(RenderFolderError, match="holds a different render.*style"):
        call(pipe, ip_adapter_image=STYLE.rotate(90), render_dir=folder)
    try:
        pipe.set_ip_adapter_scale(0.5)
        with pytest.raises(RenderFolderError, match="holds a different render.*style"):
            call(pipe, ip_adapter_image=STYLE, render_dir=folder)
    finally:
        pipe.set_ip_adapter_scale(1.0)
    assert torch.equal(call(pipe, ip_adapter_image=STYLE, render_dir=folder), styled_render)


def _two_processes(rank, pipe):
    return call(pipe, ip_adapter_image=STYLE)


def test_two_processes_render_a_style_as_one(styled, tmp_path):
    from test_distributed import spawn

    pipe, _, styled_render = styled
    results, errors, codes = spawn(2, tmp_path, _two_processes, pipe)
    assert not errors and codes == [0, 0]
    assert torch.equal(results[0], styled_render) and torch.equal(results[1], styled_render)


def test_memory_efficient_and_cross_frame_processors_coexist_with_the_ip_adapter(ip_files):
    pipe = build_tiny_pipeline(edit=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(ip_files[0]), subfolder="models", weight_name="ip-adapter_sd15.safetensors")
    expected = call(pipe, ip_adapter_image=STYLE)
    pipe.unload_ip_adapter()
    pipe.enable_memory_efficient_attention(backend="chunked", chunk_size=7)  # then load: the settings are kept
    pipe.load_ip_adapter(str(ip_files[0]), subfolder="models", weight_name="ip-adapter_sd15.safetensors")
    kinds = {}
    for name, p in pipe.unet.attn_processors.items():
        kinds.setdefault(type(p).__name__, set()).add("attn2" in name and "motion" not in name)
    assert kinds == {"IPAdapterAttnProcessor2_0": {True}, "MemoryEfficientAttnProcessor": {False}}
    assert all(p.chunk_size == 7 for p in pipe.unet.attn_processors.values() if isinstance(p, MemoryEfficientAttnProcessor))
    torch.testing.assert_close(call(pipe, ip_adapter_image=STYLE), expected, rtol=1e-4, atol=1e-4)
    # no guidance in the call, guidance in the editing branch: one row of embeddings has no negative for its negative side
    with pytest.raises(ValueError, match="negative and positive, stacked, with guidance in the editing branch"):
        call(pipe, ip_adapter_image_embeds=[torch.zeros(1, 1, 16)], guidance_scale=1.0, edit_prompt="orange dress",
             edit_kwargs=dict(height=SIZE, width=SIZE, num_inference_steps=1, context_length=4, context_stride=2))
    pipe.disable_memory_efficient_attention()  # the IP-Adapter stays
    assert sum(isinstance(p, IPAdapterAttnProcessor2_0) for p in pipe.unet.attn_processors.values()) == 6

    # the editing branch: cross-frame self-attention beside the IP-Adapter's cross-attention, the same image embeds
    seen, encoded = [], []
    encoder_hook = pipe.image_encoder.register_forward_pre_hook(lambda *a: encoded.append(1))
    hook = pipe.unet.register_forward_pre_hook(
        lambda m, a, kw: seen.append((kw["added_cond_kwargs"]["image_embeds"][0],
                                      {type(p).__name__ for p in m.attn_processors.values()})), with_kwargs=True)
    edit = dict(edit_prompt="orange dress", edit_kwargs=dict(
        height=SIZE, width=SIZE, num_inference_steps=1, context_length=4, context_stride=2, fastblend=False,
        conditioning_frames=[make_video(N, SIZE, seed=4), make_video(N, SIZE, seed=5)],
        detectors={"depth": tiny_depth_detector}))
    try:
        call(pipe, ip_adapter_image=STYLE, **edit)
    finally:
        hook.remove()
        encoder_hook.remove()
    assert len(encoded) == 1  # once for both passes
    assert {CrossFrameAttnProcessor.__name__, "IPAdapterAttnProcessor2_0"} <= seen[0][1]  # the editing branch first
    assert all(torch.equal(embeds, seen[0][0]) for embeds, _ in seen)


def test_cli_style_image_loads_the_ip_adapter_and_reaches_the_pipeline(ip_files, tmp_path, capfd):
    from diffutoon import cli
    from diffutoon.style import DEFAULT_IP_ADAPTER, ip_adapter_source

    STYLE.save(tmp_path / "style.png")
    weights = ip_files[1]["ip-adapter_sd15.safetensors"]
    args = cli.build_parser().parse_args(["render", "in.mp4", "--style-image", str(tmp_path / "style.png"),
                                          "--style-scale", "0.3", "--ip-adapter", str(weights)])
    pipe = build_tiny_pipeline()
    cli._import_style().load_style_adapter(pipe, args)  # the CLI's one call at model loading
    assert [p.scale for p in pipe.unet.attn_processors.values() if hasattr(p, "to_k_ip")] == [[0.3]] * 6
    seen = {}

    class Pipe:
        def __call__(self, **kwargs):
            seen.update(kwargs)

    cli._run_pipeline(args, Pipe(), np.zeros((2, 8, 8, 3), np.uint8), None)
    assert np.array_equal(np.asarray(seen["ip_adapter_image"]), np.asarray(STYLE))
    assert ip_adapter_source(None) == DEFAULT_IP_ADAPTER == ("h94/IP-Adapter", "models", "ip-adapter_sd15.bin")
    assert ip_adapter_source("h94/IP-Adapter/models/ip-adapter-plus_sd15.bin") == (
        "h94/IP-Adapter", "models", "ip-adapter-plus_sd15.bin")
    (tmp_path / "bad.png").write_text("not an image")
    assert cli.main(["render", "in.mp4", "--style-image", str(tmp_path / "bad.png")]) == 2
    assert "cannot read" in capfd.readouterr().err
