"""Install the processors on the right layers of a model or pipeline, and restore the previous ones exactly."""

import logging
import sys
from contextlib import contextmanager

import torch.nn as nn

from .kernels import DEFAULT_CHUNK_SIZE, attention, check_backend
from .processors import CrossFrameAttnProcessor, CrossFrameState, MemoryEfficientAttnProcessor

logger = logging.getLogger(__name__)

# diffusers processors whose maths MemoryEfficientAttnProcessor reproduces (AttnProcessor2_0's body)
_REPLACEABLE = ("AttnProcessor", "AttnProcessor2_0", "SlicedAttnProcessor", "XFormersAttnProcessor",
                "AttnProcessorNPU", "MemoryEfficientAttnProcessor")


class AttnSnapshot(dict):
    """What `restore_attn_processors` needs: path -> previous processor, or -> previous transformers
    `attn_implementation` (paths relative to the object that was passed in, components first for pipelines)."""


def _components(obj):
    """name -> nn.Module: the module itself (name ""), or every nn.Module a pipeline holds."""
    if isinstance(obj, nn.Module):
        return {"": obj}
    comps = {k: v for k, v in sorted(vars(obj).items()) if isinstance(v, nn.Module)}
    if not comps:
        raise ValueError(f"expected a torch module or a pipeline holding modules, got {type(obj).__name__}")
    return comps


def _join(comp, path):
    return f"{comp}.{path}" if comp and path else comp or path


def _resolve(obj, key):
    comps = _components(obj)
    if key in comps:
        return comps[key]
    for comp, module in comps.items():
        if comp == "" or key.startswith(comp + "."):
            try:
                return module.get_submodule(key[len(comp) + 1 :] if comp else key)
            except AttributeError:
                pass
    raise ValueError(f"cannot find {key!r} in {type(obj).__name__}: restore with the object the state was taken from")


def _is_transformers_model(module):
    return "transformers" in sys.modules and isinstance(module, sys.modules["transformers"].PreTrainedModel)


def _attention_layers(module, prefix=""):
    """(path, layer) for every diffusers attention layer (anything with set_processor/processor)."""
    for name, m in module.named_modules():
        if hasattr(m, "set_processor") and hasattr(m, "processor"):
            yield _join(prefix, name), m


def restore_attn_processors(obj, previous):
    """Put back exactly what `enable_memory_efficient_attention` / `install_cross_frame_attention` replaced."""
    for key, value in previous.items():
        target = _resolve(obj, key)
        if isinstance(value, _AttnImplementation):
            target.set_attn_implementation(value.name)
        else:
            target.set_processor(value)


# ----- cross-frame attention (UNet spatial self-attention only) -----


def _spatial_self_attention(unet):
    """attn1 of every BasicTransformerBlock inside a Transformer2DModel: spatial self-attention in the
    down/mid/up blocks; the motion modules (AnimateDiffTransformer3D) and attn2 (text) are left out."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    for name, m in unet.named_modules():
        if isinstance(m, Transformer2DModel):
            for i, block in enumerate(m.transformer_blocks):
                if hasattr(getattr(block, "attn1", None), "set_processor"):
                    yield _join(name, f"transformer_blocks.{i}.attn1"), block.attn1


def install_cross_frame_attention(unet, mode="joint", num_frames=None, backend="inherit", chunk_size=None):
    """Put a `CrossFrameAttnProcessor` on the UNet's spatial self-attention layers.

    backend: "inherit" keeps the memory-efficient kernel of a layer's current processor if it has one (else
    None); None calls diffusers' dispatch_attention_fn (honours set_attention_backend); or a backend name.
    Returns (state, previous): set `state.num_frames` per call; `restore_attn_processors(unet, previous)`.
    """
    if not isinstance(unet, nn.Module) and hasattr(unet, "unet"):
        unet = unet.unet  # a pipeline: its UNet (never the ControlNets)
    layers = list(_spatial_self_attention(unet))
    if not layers:
        raise ValueError(f"no spatial self-attention (Transformer2DModel attn1) in {type(unet).__name__}; pass the UNet")
    state = CrossFrameState(num_frames=num_frames, mode=mode)
    previous = AttnSnapshot()
    for path, layer in layers:
        b, c = backend, chunk_size
        if backend == "inherit":
            current = layer.processor
            b = getattr(current, "backend", None) if isinstance(current, (MemoryEfficientAttnProcessor, CrossFrameAttnProcessor)) else None
            c = chunk_size or getattr(current, "chunk_size", None)
        processor = CrossFrameAttnProcessor(mode=mode, state=state, backend=b, chunk_size=c)
        previous[path] = layer.processor
        layer.set_processor(processor)
    return state, previous


@contextmanager
def cross_frame_attention(unet, mode="joint", num_frames=None, backend="inherit", chunk_size=None):
    """`with cross_frame_attention(unet) as state: state.num_frames = 8; unet(...)`; restored on exit."""
    state, previous = install_cross_frame_attention(unet, mode, num_frames, backend, chunk_size)
    try:
        yield state
    finally:
        restore_attn_processors(unet, previous)


# ----- memory-efficient attention (every component) -----


class _AttnImplementation(str):
    """A transformers `attn_implementation` remembered in a snapshot."""

    @property
    def name(self):
        return str(self)


def _transformers_attention_fn(backend, chunk_size):
    """An `AttentionInterface` function (transformers' signature) that runs our kernels."""

    def memory_efficient_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                           is_causal=None, **kwargs):
        is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        is_causal = bool(query.shape[2] > 1 and attention_mask is None and is_causal)  # as transformers' sdpa path
        out = attention(query, key, value, attn_mask=attention_mask, is_causal=is_causal, scale=scaling,
                        dropout_p=dropout, backend=backend, chunk_size=chunk_size)
        return out.transpose(1, 2).contiguous(), None

    return memory_efficient_attention_forward


def _register_transformers_attention(backend, chunk_size):
    """Register (once) an attn_implementation name for this backend; its masks are built like sdpa's."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    name = f"memory_efficient_{backend}_{chunk_size or DEFAULT_CHUNK_SIZE}"
    AttentionInterface.register(name, _transformers_attention_fn(backend, chunk_size))
    # without a mask function, transformers silently builds NO mask (the padding mask would be lost)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    return name


def enable_memory_efficient_attention(obj, backend="auto", chunk_size=None):
    """Make every attention of a model or pipeline use an exact memory-efficient kernel.

    Covers diffusers attention layers (UNet incl. motion modules, ControlNets incl. MultiControlNetModel, VAE)
    and transformers text encoders (via a registered attn_implementation). A layer with a
    CrossFrameAttnProcessor keeps cross-frame attention and gets the kernel. Processors of other kinds
    (IP-Adapter, custom) are left as they are, with a warning.
    Returns the previous state for `restore_attn_processors(obj, previous)`.
    """
    check_backend(backend, chunk_size)
    shared = MemoryEfficientAttnProcessor(backend, chunk_size)
    previous, seen, skipped = AttnSnapshot(), set(), set()
    for comp, module in _components(obj).items():
        if id(module) in seen:  # a module held twice: snapshot it once, or restore would re-apply ours
            continue
        if _is_transformers_model(module):
            seen.add(id(module))
            name = _register_transformers_attention(backend, chunk_size)
            before = module.config._attn_implementation
            module.set_attn_implementation(name)
            if module.config._attn_implementation != name:
                logger.warning(f"{type(module).__name__} kept attn_implementation={before!r}: it cannot switch")
            previous[comp] = _AttnImplementation(before)
            continue
        for path, layer in _attention_layers(module, comp):
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            p = layer.processor
            if isinstance(p, CrossFrameAttnProcessor):
                new = CrossFrameAttnProcessor(p.mode, p.state, backend, chunk_size)
            elif type(p).__name__ in _REPLACEABLE:
                new = shared
            else:
                skipped.add(type(p).__name__)
                continue
            previous[path] = p
            layer.set_processor(new)
    if skipped:
        logger.warning(f"memory-efficient attention left these processors as they are: {sorted(skipped)}")
    return previous


@contextmanager
def memory_efficient_attention(obj, backend="auto", chunk_size=None):
    """`with memory_efficient_attention(pipe): pipe(...)`; the previous processors come back on exit."""
    previous = enable_memory_efficient_attention(obj, backend, chunk_size)
    try:
        yield previous
    finally:
        restore_attn_processors(obj, previous)
