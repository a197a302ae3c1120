"""LoRA and textual inversion on the pipeline with motion modules (issue 6, part 5): peft LoRAs in diffusers and
kohya format, adapter weights, fuse/unfuse, and A1111 multi-vector embeddings in the negative prompt.

Every expectation is computed by hand from the files' tensors (W + scale * up @ down; embedding rows swapped in
under the text encoder), never by the diffusers loader under test.
"""

import pytest
import torch
from conftest import make_video
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from diffutoon.tiny import build_tiny_pipeline
from pipeline_diffutoon import DEFAULT_NEGATIVE_PROMPT, DiffutoonPipeline

FRAMES, SIZE = 3, 32
RANK, ALPHA = 4, 2.0  # kohya scale alpha / rank = 0.5: a wrong scale cannot hide behind 1.0
NUM_VECTORS = 10  # verybadimagenegative_v1.3 has 10




def render(pipe, **kwargs):
    """One CFG step on 3 frames in one window, user-given conditions, fixed noise, latents out (no VAE rounding)."""
    args = dict(video=make_video(FRAMES, SIZE), prompt="a girl dancing", negative_prompt="bad", num_inference_steps=1,
                conditioning_frames=[make_video(FRAMES, SIZE, seed=3), None], context_length=4, context_stride=2,
                generator=torch.Generator().manual_seed(0), output_type="latent")
    args.update(kwargs)
    return pipe(**args).frames


def assert_close_rel(actual, expected, tol=1e-5):
    """max |actual - expected| <= tol * max |expected| (fp32 rounding amplified by DDIM from t=999 with CFG 7)."""
    err, scale = (actual - expected).abs().max().item(), expected.abs().max().item()
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol} x {scale:.3g}"


def assert_differs(a, b, min_rel=1e-2):
    """The change must be far above rounding, or a no-op loader would pass the equality checks."""
    assert (a - b).abs().max().item() > min_rel * b.abs().max().item()


def fresh_pipeline():
    """Same weights as the session's `tiny_pipe` (seed 0), safe to mutate."""
    pipe = build_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def spatial_unet_targets(unet):
    """The linear layers an SD1.5 LoRA trains: the spatial transformers, never the motion modules."""
    return [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and ".attentions." in n]


def text_encoder_targets(text_encoder):
    return [n for n, m in text_encoder.named_modules() if isinstance(m, torch.nn.Linear)]


def merge_by_hand(pipe, lora, scale):
    """W <- W + scale * up @ down for every (down, up) of `lora` = {"unet"|"text_encoder": {module: (down, up)}}."""
    with torch.no_grad():
        for component, layers in lora.items():
            model = getattr(pipe, component)
            for name, (down, up) in layers.items():
                model.get_submodule(name).weight += scale * up @ down


def is_lora(module):
    return isinstance(module, LoraLayer)


@pytest.fixture(scope="module")
def base_latents(tiny_pipe):
    return render(tiny_pipe)


@pytest.fixture(scope="module")
def diffusers_lora(tmp_path_factory):
    """A LoRA made the way diffusers' SD1.5 training scripts make one: peft adapters (random non-zero B) on the
    attention projections of the UNet and CLIP, saved with `save_lora_weights`, alpha in the adapter metadata.
    Returns (file, {component: {module: (down, up)}})."""
    pipe = fresh_pipeline()
    torch.manual_seed(1)
    # the scripts' target names; they also match the motion modules' attention, which a 2D UNet does not have
    configs = {"unet": LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=False,
                                  target_modules=["to_k", "to_q", "to_v", "to_out.0"]),
               "text_encoder": LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=False,
                                          target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])}
    spatial_attention = {n for n in spatial_unet_targets(pipe.unet) if n.endswith(("to_k", "to_q", "to_v", "to_out.0"))}
    pipe.unet.add_adapter(configs["unet"])
    # transformers 5.24's `add_adapter` demands peft >= 0.22; peft's own injection is what it wraps
    inject_adapter_in_model(configs["text_encoder"], pipe.text_encoder)
    states = {component: get_peft_model_state_dict(getattr(pipe, component)) for component in configs}
    # a LoRA trained on the SD1.5 UNet has no motion-module weights
    states["unet"] = {k: v for k, v in states["unet"].items() if "motion_modules" not in k}
    layers = {}
    for component, state in states.items():
        names = {k.rsplit(".lora_", 1)[0] for k in state}
        layers[component] = {n: (state[f"{n}.lora_A.weight"].clone(), state[f"{n}.lora_B.weight"].clone()) for n in names}
    assert set(layers["unet"]) == spatial_attention
    folder = tmp_path_factory.mktemp("diffusers_lora")
    DiffutoonPipeline.save_lora_weights(
        folder, unet_lora_layers=states["unet"], text_encoder_lora_layers=states["text_encoder"],
        unet_lora_adapter_metadata=configs["unet"].to_dict(),
        text_encoder_lora_adapter_metadata=configs["text_encoder"].to_dict())
    return folder / "pytorch_lora_weights.safetensors", layers


@pytest.fixture(scope="module")
def kohya_lora(tmp_path_factory, tiny_pipe):
    """A kohya-ss (sd-scripts) SD1.5 LoRA: `lora_unet_<diffusers module, _ for .>` and `lora_te_text_model_...`
    keys with lora_down / lora_up / alpha. Returns (file, {component: {module: (down, up)}})."""
    gen = torch.Generator().manual_seed(2)
    layers, state = {}, {}
    for component, prefix, names in (
            ("unet", "lora_unet_", spatial_unet_targets(tiny_pipe.unet)),
            # sd-scripts names CLIP modules with transformers 4's `text_model.` wrapper
            ("text_encoder", "lora_te_text_model_", text_encoder_targets(tiny_pipe.text_encoder))):
        layers[component] = {}
        for name in names:
            out_features, in_features = getattr(tiny_pipe, component).get_submodule(name).weight.shape
            down = torch.randn(RANK, in_features, generator=gen) / in_features**0.5
            up = torch.randn(out_features, RANK, generator=gen) / RANK**0.5
            key = prefix + name.replace(".", "_")
            state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(ALPHA)})
            layers[component][name] = (down, up)
    path = tmp_path_factory.mktemp("kohya_lora") / "toon_kohya.safetensors"
    save_file(state, str(path))
    return path, layers


@pytest.fixture(scope="module")
def hand_merged():
    """Renders of pipelines whose weights were merged by hand, cached by (lora id, scale)."""
    cache = {}

    def get(lora, scale):
        key = (id(lora), scale)
        if key not in cache:
            pipe = fresh_pipeline()
            merge_by_hand(pipe, lora, scale)
            cache[key] = render(pipe)
        return cache[key]

    return get


# ---------------------------------------------------------------------------------------------------------------
# LoRA


def test_diffusers_lora_adapter_weights_match_hand_merge(diffusers_lora, base_latents, hand_merged):
    path, lora = diffusers_lora
    pipe = fresh_pipeline()
    pipe.load_lora_weights(str(path), adapter_name="toon")

    # the adapters sit exactly on the LoRA's modules: spatial UNet layers and the CLIP layers, no motion module
    unet_lora = {n for n, m in pipe.unet.named_modules() if is_lora(m)}
    assert unet_lora == set(lora["unet"]) and not any("motion_modules" in n for n in unet_lora)
    assert {n for n, m in pipe.text_encoder.named_modules() if is_lora(m)} == set(lora["text_encoder"])

    pipe.set_adapters(["toon"], [0.5])
    half = render(pipe)
    assert_differs(half, base_latents)
    assert_close_rel(half, hand_merged(lora, 0.5 * ALPHA / RANK))  # weight times alpha / r from the metadata

    pipe.set_adapters(["toon"], [0.0])
    assert_close_rel(render(pipe), base_latents, tol=1e-6)  # weight 0 is the base model


def test_text_encoder_lora_reaches_encode_prompt(diffusers_lora, tiny_pipe):
    """`encode_prompt` calls the CLIP model itself (own clip skip): the peft layers inside it must still act."""
    path, lora = diffusers_lora
    pipe = fresh_pipeline()
    pipe.load_lora_weights(str(path), adapter_name="toon")
    merged = fresh_pipeline()
    merge_by_hand(merged, {"text_encoder": lora["text_encoder"]}, ALPHA / RANK)
    for clip_skip in (1, None):
        with torch.no_grad():
            ours = pipe.encode_prompt("a girl dancing", "cpu", clip_skip)
            expected = merged.encode_prompt("a girl dancing", "cpu", clip_skip)
            base = tiny_pipe.encode_prompt("a girl dancing", "cpu", clip_skip)
        assert_differs(ours, base)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_fuse_and_unfuse_lora(diffusers_lora, base_latents, hand_merged):
    path, lora = diffusers_lora
    pipe = fresh_pipeline()
    pipe.load_lora_weights(str(path), adapter_name="toon")
    components = ("unet", "text_encoder")
    base_weights = {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items() if "lora_" not in k}
                    for c in components}

    pipe.fuse_lora(lora_scale=0.5)
    for c in components:  # the deltas are now inside the base weights of both models
        name = next(iter(lora[c]))
        assert not torch.equal(getattr(pipe, c).get_submodule(name).base_layer.weight,
                               base_weights[c][f"{name}.base_layer.weight"])
    assert_close_rel(render(pipe), hand_merged(lora, 0.5 * ALPHA / RANK))  # fused = the adapter at weight 0.5

    pipe.unfuse_lora()
    for c in components:
        for key, value in getattr(pipe, c).state_dict().items():
            if "lora_" not in key:
                torch.testing.assert_close(value, base_weights[c][key], rtol=0, atol=1e-6)
    pipe.unload_lora_weights()
    assert not any(is_lora(m) for m in [*pipe.unet.modules(), *pipe.text_encoder.modules()])
    assert_close_rel(render(pipe), base_latents)  # weights back to 1e-6, amplified by the sampler


def test_kohya_lora_unet_and_text_encoder(kohya_lora, base_latents, hand_merged):
    path, lora = kohya_lora
    pipe = fresh_pipeline()
    motion_before = {k: v.clone() for k, v in pipe.unet.state_dict().items() if "motion_modules" in k}
    pipe.load_lora_weights(str(path), adapter_name="kohya")

    # every kohya module found its layer (UNet and the flattened transformers-5 CLIP), motion modules untouched
    assert {n for n, m in pipe.unet.named_modules() if is_lora(m)} == set(lora["unet"])
    assert {n for n, m in pipe.text_encoder.named_modules() if is_lora(m)} == set(lora["text_encoder"])
    motion_after = {k: v for k, v in pipe.unet.state_dict().items() if "motion_modules" in k}
    assert motion_after.keys() == motion_before.keys()
    assert all(torch.equal(motion_after[k], v) for k, v in motion_before.items())

    full = render(pipe)
    assert_differs(full, base_latents)
    assert_close_rel(full, hand_merged(lora, ALPHA / RANK))  # kohya's scale is alpha / rank


def test_two_adapters_combine_linearly(kohya_lora, diffusers_lora, base_latents):
    """set_adapters with two names adds both deltas, each with its own weight (they share many layers)."""
    pipe = fresh_pipeline()
    pipe.load_lora_weights(str(kohya_lora[0]), adapter_name="kohya")
    pipe.load_lora_weights(str(diffusers_lora[0]), adapter_name="toon")
    pipe.set_adapters(["kohya", "toon"], [0.5, 1.0])
    merged = fresh_pipeline()
    merge_by_hand(merged, kohya_lora[1], 0.5 * ALPHA / RANK)
    merge_by_hand(merged, diffusers_lora[1], ALPHA / RANK)
    assert_close_rel(render(pipe), render(merged))


def test_cross_attention_scale_applies_to_text_encoder_lora(kohya_lora, base_latents):
    """As in diffusers' SD pipelines, `cross_attention_kwargs={"scale": s}` scales the UNet AND text encoder LoRA."""
    pipe = fresh_pipeline()
    pipe.load_lora_weights(str(kohya_lora[0]), adapter_name="kohya")
    assert_close_rel(render(pipe, cross_attention_kwargs={"scale": 0.0}), base_latents, tol=1e-6)


def test_kohya_lora_per_module_alphas(kohya_lora):
    """A kohya file may give each module its own alpha; each layer must then scale by its own alpha / rank."""
    _, lora = kohya_lora
    state, expected = {}, {}
    for component, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_text_model_")):
        for i, (name, (down, up)) in enumerate(list(lora[component].items())[:4]):
            key, alpha = prefix + name.replace(".", "_"), float(1 + i)  # 1, 2, 3, 4: no majority to fall back on
            state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)})
            expected[component, name] = alpha / RANK * up @ down
    pipe = fresh_pipeline()
    pipe.load_lora_weights(state, adapter_name="kohya")
    for (component, name), delta in expected.items():
        layer = getattr(pipe, component).get_submodule(name)
        x = torch.randn(2, layer.in_features)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ delta.T, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Textual inversion (A1111 embeddings)


def embedding_vectors(pipe, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(NUM_VECTORS, pipe.text_encoder.config.hidden_size, generator=gen)


def write_embedding(folder, vectors, kind):
    """The files A1111 writes: a torch-pickled dict with `string_to_param["*"]`, or safetensors `emb_params`."""
    if kind == "pt":
        path = folder / "verybadimagenegative_v1.3.pt"
        # A1111 saves the trained vectors as they were in training: a Parameter that requires grad
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(vectors.clone())},
                    "name": "verybadimagenegative_v1.3", "step": 1500, "sd_checkpoint": "0" * 8,
                    "sd_checkpoint_name": "anything"}, path)
    else:
        path = folder / "verybadimagenegative_v1.3.safetensors"
        save_file({"emb_params": vectors.clone()}, str(path))
    return path


def encode_with_vectors(pipe, vectors, clip_skip=1):
    """The keyword's encoding by hand: [BOS, n placeholder tokens, EOS, padding] through the text encoder with the
    placeholders' token embeddings replaced by the file's vectors; clip skip 1 = penultimate layer + final norm."""
    tok = pipe.tokenizer
    n = len(vectors)
    ids = torch.tensor([[tok.bos_token_id] + [tok.convert_tokens_to_ids("a")] * n + [tok.eos_token_id]
                        + [tok.pad_token_id] * (tok.model_max_length - 2 - n)])

    def swap(module, args, output):
        output = output.clone()
        output[0, 1 : n + 1] = vectors
        return output

    handle = pipe.text_encoder.get_input_embeddings().register_forward_hook(swap)
    try:
        with torch.no_grad():
            out = pipe.text_encoder(ids, output_hidden_states=True)
    finally:
        handle.remove()
    hidden = out.hidden_states[-(clip_skip + 1)] if clip_skip else out.last_hidden_state
    return pipe.text_encoder.final_layer_norm(hidden) if clip_skip else hidden


@pytest.mark.parametrize("kind", ["pt", "safetensors"])
def test_a1111_embedding_expands_to_all_vectors(kind, tmp_path):
    pipe = fresh_pipeline()
    vectors = embedding_vectors(pipe)
    pipe.load_textual_inversion(str(write_embedding(tmp_path, vectors, kind)), token=DEFAULT_NEGATIVE_PROMPT)

    # the keyword becomes NUM_VECTORS tokens, in order, each a new vocabulary entry
    converted = pipe.maybe_convert_prompt(DEFAULT_NEGATIVE_PROMPT, pipe.tokenizer)
    ids = pipe.tokenizer(converted, add_special_tokens=False).input_ids
    expected_tokens = [DEFAULT_NEGATIVE_PROMPT] + [f"{DEFAULT_NEGATIVE_PROMPT}_{i}" for i in range(1, NUM_VECTORS)]
    assert pipe.tokenizer.convert_ids_to_tokens(ids) == expected_tokens
    rows = pipe.text_encoder.get_input_embeddings().weight[ids]
    torch.testing.assert_close(rows, vectors, rtol=0, atol=0)  # the file's vectors, exactly

    # the pipeline's own encoder expands it (maybe_convert_prompt) and equals the hand-made encoding
    with torch.no_grad():
        ours = pipe.encode_prompt(DEFAULT_NEGATIVE_PROMPT, "cpu", clip_skip=1)
    torch.testing.assert_close(ours, encode_with_vectors(pipe, vectors), rtol=1e-5, atol=1e-5)


def test_default_negative_textual_inversion_flow(tmp_path, monkeypatch):
    """negative_prompt="verybadimagenegative_v1.3" (SPEC 1) renders as if its 10 vectors were fed by hand."""
    pipe = fresh_pipeline()
    vectors = embedding_vectors(pipe)
    pipe.load_textual_inversion(str(write_embedding(tmp_path, vectors, "pt")), token=DEFAULT_NEGATIVE_PROMPT)

    with_keyword = render(pipe, negative_prompt=DEFAULT_NEGATIVE_PROMPT)
    assert_differs(with_keyword, render(pipe, negative_prompt=""))

    # the same render with the negative embedding computed by hand and handed over in place of the empty prompt
    manual = encode_with_vectors(pipe, vectors)
    original = pipe.encode_prompt
    monkeypatch.setattr(pipe, "encode_prompt",
                        lambda prompt, *args, **kwargs: manual if prompt == "" else original(prompt, *args, **kwargs))
    assert_close_rel(render(pipe, negative_prompt=""), with_keyword)
