"""Attention processors for diffusers' `Attention` layers: memory-efficient and cross-frame.

Both run the body of diffusers' `AttnProcessor2_0` (norms, projections, residual, rescale) and differ only
in the attention call, so swapping them in changes nothing but the kernel (or, for cross-frame, which
tokens a query sees).
"""

from dataclasses import dataclass

import torch

from .kernels import attention, check_backend

CROSS_FRAME_MODES = ("joint", "first", "first_prev")


class _ProcessorBase:
    """The AttnProcessor2_0 body; subclasses implement `attend(attn, q, k, v, mask, is_self)` on (B, H, S, D)."""

    _attention_backend = None  # set by `model.set_attention_backend(...)`; when set it wins, via dispatch_attention_fn
    _parallel_config = None  # read by diffusers' set_attention_backend

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:  # the VAE's attention sees (B, C, H, W)
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        is_self = encoder_hidden_states is None
        batch_size, sequence_length, _ = hidden_states.shape if is_self else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if is_self:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = self.attend(attn, query, key, value, attention_mask, is_self)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def kernel(self, attn, q, k, v, mask):
        """One attention call on (B, H, S, D) with this processor's backend."""
        if self._attention_backend is not None or self.backend is None:
            from diffusers.models.attention_dispatch import dispatch_attention_fn

            out = dispatch_attention_fn(  # honours set_attention_backend / the attention_backend context
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=attn.scale,
                backend=self._attention_backend,
            )
            return out.transpose(1, 2)
        return attention(q, k, v, attn_mask=mask, scale=attn.scale, backend=self.backend, chunk_size=self.chunk_size)


class MemoryEfficientAttnProcessor(_ProcessorBase):
    """Drop-in for `AttnProcessor2_0` whose attention never builds the full score matrix.

    backend: "auto" | "native" | "chunked" | "flash" | "xformers" | "sage" (see `kernels.py`).
    chunk_size: query rows per step of the chunked kernel (default 1024).
    """

    def __init__(self, backend="auto", chunk_size=None):
        check_backend(backend, chunk_size)
        self.backend, self.chunk_size = backend, chunk_size

    def attend(self, attn, q, k, v, mask, is_self):
        return self.kernel(attn, q, k, v, mask)

    def __repr__(self):
        return f"MemoryEfficientAttnProcessor(backend={self.backend!r}, chunk_size={self.chunk_size})"


@dataclass
class CrossFrameState:
    """Shared by every processor of one install: set `num_frames` before each UNet call.

    num_frames: frames per video in the current call; the batch is groups x num_frames with each group's
    frames contiguous (e.g. [neg f0..fN-1, pos f0..fN-1] under CFG). None: the whole batch is one group.
    """

    num_frames: int | None = None
    mode: str = "joint"


class CrossFrameAttnProcessor(_ProcessorBase):
    """Self-attention across the frames of a video; cross-attention (to text) stays per frame.

    mode="joint": the tokens of all frames of a group form one sequence (Diffutoon's editing branch).
    mode="first": every frame attends to the first frame only (Text2Video-Zero).
    mode="first_prev": every frame attends to the first and its previous frame; frame 0 to itself
        (Tune-A-Video / Rerender-a-video sparse-causal attention).
    state: a `CrossFrameState` shared with the caller, who sets `state.num_frames` (diffusers drops unknown
        `cross_attention_kwargs`, so the frame count travels this way).
    backend: None calls diffusers' `dispatch_attention_fn`, so `set_attention_backend` is honoured; a
        backend name ("auto", "chunked", ...) uses the memory-efficient kernels instead.
    """

    def __init__(self, mode="joint", state=None, backend=None, chunk_size=None):
        if mode not in CROSS_FRAME_MODES:
            raise ValueError(f"unknown cross-frame mode {mode!r}; use one of {CROSS_FRAME_MODES}")
        if backend is not None:
            check_backend(backend, chunk_size)
        self.mode = mode
        self.state = state if state is not None else CrossFrameState(mode=mode)
        self.backend, self.chunk_size = backend, chunk_size

    def __repr__(self):
        return f"CrossFrameAttnProcessor(mode={self.mode!r}, num_frames={self.state.num_frames}, backend={self.backend!r})"

    def attend(self, attn, q, k, v, mask, is_self):
        if not is_self:  # cross-attention to the text: per frame, unchanged
            return self.kernel(attn, q, k, v, mask)
        if mask is not None:
            raise ValueError("CrossFrameAttnProcessor does not take a self-attention mask; call the UNet without attention_mask")
        B, H, N, D = q.shape
        F = self.state.num_frames or B
        if B % F:
            raise ValueError(
                f"batch {B} is not a multiple of state.num_frames={F}; set state.num_frames to the frames per video "
                "in this call (the batch must be groups x num_frames), or None to attend across the whole batch"
            )
        G = B // F

        def frames_to_tokens(t):  # (G*F, H, N, D) -> (G, H, F*N, D)
            return t.reshape(G, F, H, t.shape[2], t.shape[3]).transpose(1, 2).reshape(G, H, F * t.shape[2], t.shape[3])

        if self.mode == "joint":
            out = self.kernel(attn, frames_to_tokens(q), frames_to_tokens(k), frames_to_tokens(v), None)
            return out.reshape(G, H, F, N, -1).transpose(1, 2).reshape(B, H, N, -1)
        if self.mode == "first":  # all queries of a group share frame 0's keys: no copy of k, v
            k0, v0 = (t.reshape(G, F, H, N, t.shape[-1])[:, 0] for t in (k, v))
            out = self.kernel(attn, frames_to_tokens(q), k0, v0, None)
            return out.reshape(G, H, F, N, -1).transpose(1, 2).reshape(B, H, N, -1)
        # first_prev: keys of frame i = [frame 0, frame max(i-1, 0)]
        prev = [0] + list(range(F - 1))

        def first_and_prev(t):
            t = t.reshape(G, F, H, N, t.shape[-1])
            return torch.cat([t[:, [0] * F], t[:, prev]], dim=3).reshape(B, H, 2 * N, t.shape[-1])

        return self.kernel(attn, q, first_and_prev(k), first_and_prev(v), None)
