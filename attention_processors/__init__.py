"""Cross-frame and memory-efficient attention for diffusers models (Diffutoon, paper 3.2 and 3.3).

Usable on its own with any diffusers UNet / pipeline. Runnable example (tiny random UNet, CPU):

>>> import torch
>>> from diffusers import UNet2DConditionModel
>>> from attention_processors import cross_frame_attention, memory_efficient_attention
>>> unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
...     block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
...     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, norm_num_groups=32).eval()
>>> x, t, text = torch.randn(2 * 4, 4, 8, 8), torch.tensor(10), torch.randn(2 * 4, 7, 32)  # CFG x 4 frames
>>> with torch.no_grad(), memory_efficient_attention(unet, backend="chunked", chunk_size=64):
...     with cross_frame_attention(unet, mode="joint") as state:
...         state.num_frames = 4  # the batch is 2 groups (negative, positive) of 4 frames each
...         y = unet(x, t, encoder_hidden_states=text).sample
>>> y.shape  # outside the blocks the UNet has its own processors back
torch.Size([8, 4, 8, 8])

Public API:
- CrossFrameAttnProcessor(mode="joint"|"first"|"first_prev", state=None, backend=None, chunk_size=None)
- CrossFrameState(num_frames=None, mode="joint")
- install_cross_frame_attention(unet, mode="joint", num_frames=None, backend="inherit", chunk_size=None)
  -> (state, previous)
- cross_frame_attention(unet, mode="joint", num_frames=None, backend="inherit", chunk_size=None)  # yields state
- MemoryEfficientAttnProcessor(backend="auto", chunk_size=None)
- enable_memory_efficient_attention(module_or_pipeline, backend="auto", chunk_size=None) -> previous
- memory_efficient_attention(module_or_pipeline, backend="auto", chunk_size=None)  # yields previous
- restore_attn_processors(module_or_pipeline, previous)
- attention(q, k, v, attn_mask=None, is_causal=False, scale=None, backend="auto", chunk_size=None)  # the kernel
backends: "auto" (SDPA flash/efficient kernel, else exact query-chunked), "native" (SDPA kernels only),
"chunked", and the optional packages "flash" (flash-attn), "xformers", "sage" (sageattention).
"""

from .install import (
    AttnSnapshot,
    cross_frame_attention,
    enable_memory_efficient_attention,
    install_cross_frame_attention,
    memory_efficient_attention,
    restore_attn_processors,
)
from .kernels import BACKENDS, attention, chunked_attention, native_attention
from .processors import CROSS_FRAME_MODES, CrossFrameAttnProcessor, CrossFrameState, MemoryEfficientAttnProcessor

__all__ = [
    "AttnSnapshot",
    "BACKENDS",
    "CROSS_FRAME_MODES",
    "CrossFrameAttnProcessor",
    "CrossFrameState",
    "MemoryEfficientAttnProcessor",
    "attention",
    "chunked_attention",
    "cross_frame_attention",
    "enable_memory_efficient_attention",
    "install_cross_frame_attention",
    "memory_efficient_attention",
    "native_attention",
    "restore_attn_processors",
]
