"""attention_processors: cross-frame and memory-efficient attention (issue 3). Tiny random models, CPU, offline."""

import importlib.util

import pytest
import torch
from diffusers import AutoencoderKL, ControlNetModel, MotionAdapter, UNet2DConditionModel, UNetMotionModel
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import attention_processors.kernels as kernels
from attention_processors import (
    CrossFrameAttnProcessor,
    CrossFrameState,
    MemoryEfficientAttnProcessor,
    attention,
    chunked_attention,
    cross_frame_attention,
    enable_memory_efficient_attention,
    install_cross_frame_attention,
    memory_efficient_attention,
    restore_attn_processors,
)

TOL = dict(atol=1e-5, rtol=1e-5)




# ----- tiny components -----


def randomize_zeros(model, seed=1):
    """Zero-initialised layers (ControlNet zero-convs, motion proj_out) would hide every attention difference."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if not p.detach().abs().sum():
            p.data = torch.randn(p.shape, generator=g) * 0.05
    return model.eval()


def tiny_unet():
    torch.manual_seed(0)
    return randomize_zeros(UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=32, attention_head_dim=4,
    ))


def tiny_motion_unet():
    torch.manual_seed(0)
    adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1, motion_norm_num_groups=2,
                            motion_num_attention_heads=2, motion_max_seq_length=8)
    return randomize_zeros(UNetMotionModel.from_unet2d(tiny_unet(), adapter))


def tiny_controlnet(seed=0):
    torch.manual_seed(seed)
    return randomize_zeros(ControlNetModel(
        in_channels=4, layers_per_block=1, block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        cross_attention_dim=32, norm_num_groups=32, attention_head_dim=4, conditioning_embedding_out_channels=(16, 32),
    ), seed + 1)


def tiny_vae():
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64), latent_channels=4, norm_num_groups=32,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2).eval()


def tiny_tokenizer():
    """The offline CLIP tokenizer recipe: printable characters and their end-of-word forms, no merges."""
    chars = [chr(c) for c in range(33, 127)]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_text_encoder():
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=200, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                         max_position_embeddings=77, bos_token_id=188, eos_token_id=189, pad_token_id=189)
    return CLIPTextModel(cfg).eval()


def count(module, cls):
    return sum(isinstance(m.processor, cls) for m in module.modules() if isinstance(m, Attention))


@pytest.fixture
def chunk_calls(monkeypatch):
    """Counts calls of the chunked kernel, so a test knows the new processors really ran."""
    calls = []
    original = kernels.chunked_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, "chunked_attention", spy)
    return calls


def reference_attention(q, k, v, mask=None, scale=None):
    """softmax(q k^T s + mask) v written out, (..., S, D)."""
    s = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    return s.softmax(-1) @ v


def test_docstring_example_runs():
    import doctest

    import attention_processors

    result = doctest.testmod(attention_processors)
    assert result.attempted > 0 and result.failed == 0


# ----- the kernels -----


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_kernel_is_exact(chunk):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 8, generator=g) for _ in range(3))
    v = torch.randn(2, 3, 37, 5, generator=g)  # value dim may differ from the query dim
    bool_mask = torch.rand(2, 1, 37, 37, generator=g) > 0.3
    bool_mask[..., 0] = True  # no fully masked row
    float_mask = torch.randn(1, 3, 1, 37, generator=g)
    causal = torch.ones(37, 37, dtype=torch.bool).tril()
    torch.testing.assert_close(chunked_attention(q, k, v, chunk_size=chunk), reference_attention(q, k, v), **TOL)
    torch.testing.assert_close(chunked_attention(q, k, v, bool_mask, chunk_size=chunk), reference_attention(q, k, v, bool_mask), **TOL)
    torch.testing.assert_close(chunked_attention(q, k, v, float_mask, chunk_size=chunk), reference_attention(q, k, v, float_mask), **TOL)
    torch.testing.assert_close(chunked_attention(q, k, v, is_causal=True, chunk_size=chunk), reference_attention(q, k, v, causal), **TOL)
    torch.testing.assert_close(chunked_attention(q, k, v, scale=0.3, chunk_size=chunk), reference_attention(q, k, v, scale=0.3), **TOL)
    # cross-attention shapes: 37 queries, 11 keys; grouped-query: 1 key head for 3 query heads
    k2, v2 = torch.randn(2, 1, 11, 8, generator=g), torch.randn(2, 1, 11, 8, generator=g)
    torch.testing.assert_close(chunked_attention(q, k2, v2, chunk_size=chunk), reference_attention(q, k2, v2), **TOL)


def test_auto_falls_back_to_chunked_and_native_says_why(chunk_calls):
    q = torch.randn(1, 2, 16, 8)
    k = torch.randn(1, 2, 16, 8)
    v = torch.randn(1, 2, 16, 4)  # a value head dim unlike the query's: no SDPA flash kernel takes it
    with pytest.raises(ValueError, match="backend='auto'"):
        attention(q, k, v, backend="native")
    torch.testing.assert_close(attention(q, k, v, backend="auto"), reference_attention(q, k, v), **TOL)
    assert len(chunk_calls) == 1
    attention(q, k, k, backend="auto")  # the flash CPU kernel takes this one: no chunked call
    assert len(chunk_calls) == 1


def test_backend_errors_name_the_fix():
    with pytest.raises(ValueError, match="use one of"):
        MemoryEfficientAttnProcessor(backend="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        enable_memory_efficient_attention(tiny_vae(), backend="chunked", chunk_size=0)
    missing = [b for b, (m, _) in kernels.OPTIONAL_BACKENDS.items() if importlib.util.find_spec(m) is None]
    if not missing:
        pytest.skip("flash-attn, xformers and sageattention are all installed")
    for backend in missing:
        with pytest.raises(ValueError, match="pip install"):
            enable_memory_efficient_attention(tiny_vae(), backend=backend)


# ----- cross-frame attention on one Attention layer, against hand computations -----


def layer_and_input(G=2, F=3, N=5, seed=0):
    torch.manual_seed(seed)
    attn = Attention(query_dim=16, heads=2, dim_head=8, bias=True).eval()
    return attn, torch.randn(G * F, N, 16)


def heads(attn, x, w):  # (B, N, C) -> (B, H, N, D) through projection w
    return w(x).view(x.shape[0], x.shape[1], attn.heads, -1).transpose(1, 2)


def unheads(attn, o):  # (B, H, N, D) -> output projection
    return attn.to_out[0](o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1))


def hand_cross_frame(attn, x, G, F, mode):
    q, k, v = heads(attn, x, attn.to_q), heads(attn, x, attn.to_k), heads(attn, x, attn.to_v)
    out = torch.empty_like(q)
    for g in range(G):
        for f in range(F):
            i = g * F + f
            if mode == "joint":
                keys = [g * F + j for j in range(F)]
            elif mode == "first":
                keys = [g * F]
            else:
                keys = [g * F, g * F + max(f - 1, 0)]
            kk = torch.cat([k[j] for j in keys], dim=1)  # (H, len(keys) * N, D)
            vv = torch.cat([v[j] for j in keys], dim=1)
            out[i] = reference_attention(q[i], kk, vv)
    return unheads(attn, out)


@pytest.mark.parametrize("backend", [None, "auto", "chunked"])
@pytest.mark.parametrize("mode", ["joint", "first", "first_prev"])
def test_cross_frame_matches_hand_computation(mode, backend):
    G, F = 2, 3
    attn, x = layer_and_input(G, F)
    attn.set_processor(CrossFrameAttnProcessor(mode, CrossFrameState(num_frames=F), backend=backend, chunk_size=4))
    with torch.no_grad():
        torch.testing.assert_close(attn(x), hand_cross_frame(attn, x, G, F, mode), **TOL)
        attn.set_processor(AttnProcessor2_0())
        plain = attn(x)
    assert (hand_cross_frame(attn, x, G, F, mode) - plain).abs().max() > 1e-3  # the test can tell the two apart


@pytest.mark.parametrize("mode", ["joint", "first", "first_prev"])
def test_one_frame_is_ordinary_attention(mode):
    attn, x = layer_and_input(G=6, F=1)
    with torch.no_grad():
        plain = attn(x)
        attn.set_processor(CrossFrameAttnProcessor(mode, CrossFrameState(num_frames=1)))
        torch.testing.assert_close(attn(x), plain, atol=1e-6, rtol=1e-6)


def test_cross_attention_to_text_stays_per_frame():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8).eval()
    x, text = torch.randn(6, 5, 16), torch.randn(6, 4, 12)
    with torch.no_grad():
        plain = attn(x, encoder_hidden_states=text)
        attn.set_processor(CrossFrameAttnProcessor("joint", CrossFrameState(num_frames=3)))
        torch.testing.assert_close(attn(x, encoder_hidden_states=text), plain, atol=1e-6, rtol=1e-6)


def test_num_frames_none_is_one_group_and_bad_counts_raise():
    attn, x = layer_and_input(G=1, F=6)
    state = CrossFrameState(num_frames=None)
    attn.set_processor(CrossFrameAttnProcessor("joint", state))
    with torch.no_grad():
        whole = attn(x)
        state.num_frames = 6
        torch.testing.assert_close(attn(x), whole, atol=0, rtol=0)
        state.num_frames = 4
        with pytest.raises(ValueError, match="multiple of state.num_frames"):
            attn(x)
    with pytest.raises(ValueError, match="use one of"):
        CrossFrameAttnProcessor("all")


# ----- cross-frame attention in a UNet -----


def unet_inputs(G=2, F=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(G * F, 4, 8, 8, generator=g), torch.tensor(500), torch.randn(G * F, 7, 32, generator=g)


def test_installs_only_on_spatial_self_attention():
    unet = tiny_motion_unet()
    state, previous = install_cross_frame_attention(unet, num_frames=4)
    spatial = {n for n, m in unet.named_modules() if isinstance(m, Attention) and ".attentions." in n and n.endswith("attn1")}
    installed = {n for n, m in unet.named_modules() if isinstance(m, Attention) and isinstance(m.processor, CrossFrameAttnProcessor)}
    assert installed == spatial == set(previous) and len(spatial) == 4  # down 1, mid 1, up 2
    assert all(m.processor.state is state for n, m in unet.named_modules() if n in installed)
    assert count(unet, AttnProcessor2_0) > 0  # motion modules and attn2 untouched
    restore_attn_processors(unet, previous)
    assert count(unet, CrossFrameAttnProcessor) == 0


@pytest.mark.parametrize("backend", [None, "chunked"])
@pytest.mark.parametrize("mode", ["joint", "first", "first_prev"])
def test_unet_cross_frame_off_gives_identical_output(mode, backend):
    unet = tiny_unet()
    x, t, text = unet_inputs()
    with torch.no_grad():
        before = unet(x, t, text).sample
        with cross_frame_attention(unet, mode=mode, num_frames=3, backend=backend):
            during = unet(x, t, text).sample
        after = unet(x, t, text).sample
    assert torch.equal(after, before)
    assert (during - before).abs().max() > 1e-4  # and it did change something while on


def test_unet_joint_is_equivariant_to_frame_permutation_and_stays_in_its_group():
    unet = tiny_unet()
    x, t, text = unet_inputs(G=2, F=4)
    perm = torch.tensor([2, 0, 3, 1, 4 + 1, 4 + 3, 4 + 0, 4 + 2])  # permute frames inside each CFG group
    with torch.no_grad(), cross_frame_attention(unet, num_frames=4):
        out = unet(x, t, text).sample
        torch.testing.assert_close(unet(x[perm], t, text[perm]).sample, out[perm], **TOL)
        x2 = x.clone()
        x2[4:] = torch.randn_like(x2[4:])  # change only group 1: group 0 must not notice
        out2 = unet(x2, t, text).sample
    assert torch.equal(out2[:4], out[:4]) or (out2[:4] - out[:4]).abs().max() < 1e-6
    assert (out2[4:] - out[4:]).abs().max() > 1e-3


def test_set_attention_backend_is_honoured(monkeypatch):
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend)
    calls = []
    math = _AttentionBackendRegistry._backends[AttentionBackendName._NATIVE_MATH]

    def spy(**kwargs):
        calls.append(kwargs["query"].shape)
        return math(**kwargs)

    monkeypatch.setitem(_AttentionBackendRegistry._backends, AttentionBackendName._NATIVE_MATH, spy)
    unet = tiny_unet()
    x, t, text = unet_inputs()
    with torch.no_grad(), cross_frame_attention(unet, num_frames=3):
        unet.set_attention_backend("_native_math")
        unet(x, t, text)
    # only the 4 spatial self-attentions are cross-frame processors; each sees 2 groups of 3 frames x 8x8 tokens
    assert len(calls) == 4 and calls[0][:2] == (2, 3 * 64)


# ----- memory-efficient attention on every component type -----


def run_text(te, masked=False):
    ids = torch.randint(0, 188, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # the second prompt is padded
    return te(ids, attention_mask=mask if masked else None).last_hidden_state


def run_unet(unet):
    return unet(*unet_inputs()).sample


def run_motion(unet):
    g = torch.Generator().manual_seed(0)
    text = torch.randn(2, 7, 32, generator=g).repeat_interleave(3, dim=0)  # UNetMotionModel wants it per frame
    return unet(torch.randn(2, 4, 3, 8, 8, generator=g), torch.tensor(500), text).sample


def run_controlnet(cn):
    g = torch.Generator().manual_seed(0)
    x, t, text = unet_inputs()
    down, mid = cn(x, t, text, controlnet_cond=torch.rand(6, 3, 16, 16, generator=g), conditioning_scale=[0.5, 0.7]
                   if isinstance(cn, MultiControlNetModel) else 0.5, return_dict=False)
    return torch.cat([d.flatten() for d in down] + [mid.flatten()])


def run_vae(vae):
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = vae.encode(x).latent_dist.mean
    return torch.cat([z.flatten(), vae.decode(z).sample.flatten()])


COMPONENTS = {
    "text_encoder": (tiny_text_encoder, run_text),
    "text_encoder_padded": (tiny_text_encoder, lambda te: run_text(te, masked=True)),
    "unet": (tiny_unet, run_unet),
    "motion_unet": (tiny_motion_unet, run_motion),
    "controlnet": (tiny_controlnet, run_controlnet),
    "multi_controlnet": (lambda: MultiControlNetModel([tiny_controlnet(0), tiny_controlnet(2)]), run_controlnet),
    "vae": (tiny_vae, run_vae),
}


@pytest.mark.parametrize("backend", ["auto", "native", "chunked"])
@pytest.mark.parametrize("component", list(COMPONENTS))
def test_memory_efficient_equals_default_and_off_is_identical(component, backend, chunk_calls):
    build, run = COMPONENTS[component]
    model = build()
    with torch.no_grad():
        before = run(model)
        with memory_efficient_attention(model, backend=backend, chunk_size=7) as previous:
            assert len(previous) > 0
            if component.startswith("text"):
                assert model.config._attn_implementation == f"memory_efficient_{backend}_7"
            else:
                assert count(model, MemoryEfficientAttnProcessor) == len(previous) == sum(isinstance(m, Attention) for m in model.modules())
            during = run(model)
        after = run(model)
    torch.testing.assert_close(during, before, **TOL)
    assert torch.equal(after, before)
    assert (len(chunk_calls) > 0) == (backend == "chunked")  # the chosen kernel really ran (CPU: flash otherwise)


@pytest.mark.parametrize("component", ["text_encoder_padded", "unet", "vae"])
def test_memory_efficient_equals_the_naive_processors(component):
    """Also against the score-matrix paths (diffusers' AttnProcessor, transformers' eager)."""
    build, run = COMPONENTS[component]
    model = build()
    with torch.no_grad():
        if component.startswith("text"):
            model.set_attn_implementation("eager")
        else:
            model.set_attn_processor(AttnProcessor())
        naive = run(model)
        with memory_efficient_attention(model, backend="chunked", chunk_size=5):
            torch.testing.assert_close(run(model), naive, **TOL)
        assert torch.equal(run(model), naive)


def test_motion_modules_and_spatial_layers_all_covered():
    unet = tiny_motion_unet()
    previous = enable_memory_efficient_attention(unet)
    motion = [n for n in previous if ".motion_modules." in n]
    spatial = [n for n in previous if ".attentions." in n]
    assert motion and spatial and len(previous) == sum(isinstance(m, Attention) for m in unet.modules())


def test_memory_efficient_keeps_cross_frame_and_restores_both():
    unet = tiny_unet()
    x, t, text = unet_inputs()
    with torch.no_grad():
        before = unet(x, t, text).sample
        with cross_frame_attention(unet, num_frames=3) as state:
            joint = unet(x, t, text).sample
            with memory_efficient_attention(unet, backend="chunked", chunk_size=16):
                crossframe = [m.processor for m in unet.modules() if isinstance(m, Attention) and isinstance(m.processor, CrossFrameAttnProcessor)]
                assert len(crossframe) == 4 and all(p.backend == "chunked" and p.state is state for p in crossframe)
                torch.testing.assert_close(unet(x, t, text).sample, joint, **TOL)
            assert torch.equal(unet(x, t, text).sample, joint)
        # the other order: cross-frame installed over memory-efficient processors inherits their kernel
        with memory_efficient_attention(unet, backend="chunked"), cross_frame_attention(unet, num_frames=3):
            assert {m.processor.backend for m in unet.modules() if isinstance(m, Attention)} == {"chunked"}
            torch.testing.assert_close(unet(x, t, text).sample, joint, **TOL)
        assert torch.equal(unet(x, t, text).sample, before)


# ----- a whole pipeline -----


def tiny_pipeline():
    from diffusers import AnimateDiffControlNetPipeline, DDIMScheduler

    torch.manual_seed(0)
    adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1, motion_norm_num_groups=2,
                            motion_num_attention_heads=2, motion_max_seq_length=8)
    randomize_zeros(adapter)
    return AnimateDiffControlNetPipeline(
        vae=tiny_vae(), text_encoder=tiny_text_encoder(), tokenizer=tiny_tokenizer(), unet=tiny_unet(),
        motion_adapter=adapter, controlnet=MultiControlNetModel([tiny_controlnet(0), tiny_controlnet(2)]),
        scheduler=DDIMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=False),
    )


def run_pipeline(pipe):
    from PIL import Image

    frames = [Image.new("RGB", (16, 16), (40 * i, 90, 200 - 40 * i)) for i in range(3)]
    return pipe("a cat", negative_prompt="blurry", num_frames=3, height=16, width=16, num_inference_steps=2,
                conditioning_frames=[frames, frames], controlnet_conditioning_scale=[0.5, 0.5],
                generator=torch.Generator().manual_seed(0), output_type="pt").frames


def test_pipeline_install_run_restore_is_identical_to_never_installed(chunk_calls):
    pipe, untouched = tiny_pipeline(), tiny_pipeline()
    previous = enable_memory_efficient_attention(pipe, backend="chunked", chunk_size=32)
    components = {key.split(".")[0] for key in previous}
    assert components == {"text_encoder", "unet", "controlnet", "vae", "motion_adapter"}
    state, cross_previous = install_cross_frame_attention(pipe.unet, mode="joint", num_frames=3)
    with torch.no_grad():
        during = run_pipeline(pipe)
        restore_attn_processors(pipe.unet, cross_previous)
        restore_attn_processors(pipe, previous)
        after, reference = run_pipeline(pipe), run_pipeline(untouched)
    assert len(chunk_calls) > 0 and torch.isfinite(during).all()
    assert torch.equal(after, reference)
    assert (during - reference).abs().max() > 1e-4  # cross-frame attention did act while installed
