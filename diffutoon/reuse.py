"""Reuse across windows (issue 11): what no window changes is computed once per step and CFG branch.

A frame's ControlNet residuals depend only on its latent, the timestep, the branch's text embedding, its condition
frame and the scales: ControlNets have no temporal layers. The UNet's layers before its first motion module
(`conv_in`, the first ResNet and the first spatial transformer) likewise. With the paper's windows (16, stride 8)
every frame is in two windows, so without reuse both are computed twice per step.

Frames are computed in canonical chunks, chunk j being the frames window j adds to window j - 1, whichever windows
a process runs: a frame's results then have the same bits on one process or many (batch sizes change rounding).
Each frame's results are kept until no later window needs them, so at most about one window is held.

Only torch is imported here: the module ships beside the pipeline file.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable

import torch


def window_chunks(windows: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The canonical chunks of sorted, contiguous windows: chunk j = the frames window j adds to the ones before.

    >>> window_chunks([(0, 16), (8, 24), (16, 30)])
    [(0, 16), (16, 24), (24, 30)]
    """
    chunks, covered = [], 0
    for start, end in windows:
        if end > covered:
            chunks.append((max(start, covered), end))
            covered = end
    return chunks


class FrameCache:
    """Per-frame results of one step, computed a canonical chunk at a time on demand.

    `compute(start, end)` returns a list of tensors whose first dimension is (branches x frames), branch-major, as
    the models take them; `get(start, end)` returns the same layout for any range of frames. `host`: the frames are
    kept in host memory and copied to the accelerator per call (the same bits; issue 18's memory plan).
    """

    def __init__(self, chunks: list[tuple[int, int]], compute: Callable, branches: int, host: bool = False):
        self.chunks, self.compute, self.branches, self.host = chunks, compute, branches, host
        self.device = None  # where `compute` puts its results, and `get` returns them
        self.frames: dict[int, list[torch.Tensor]] = {}
        self.computed: set[tuple[int, int]] = set()
        self.peak_frames = 0  # the most frames held at once (tests assert it stays about one window)

    def get(self, start: int, end: int) -> list[torch.Tensor]:
        for chunk in self.chunks:
            if chunk[0] < end and start < chunk[1] and chunk not in self.computed:
                self._fill(*chunk)
        parts = [self.frames[i] for i in range(start, end)]
        if not self.host:
            return [torch.stack([frame[k] for frame in parts], dim=1).flatten(0, 1) for k in range(len(parts[0]))]
        out = []  # each frame copied into its place on the accelerator: no stacked copy in host memory
        for k in range(len(parts[0])):
            first = parts[0][k]
            stacked = torch.empty((first.shape[0], len(parts), *first.shape[1:]), dtype=first.dtype, device=self.device)
            for i, frame in enumerate(parts):
                stacked[:, i].copy_(frame[k])
            out.append(stacked.flatten(0, 1))
        return out

    def _fill(self, start: int, end: int):
        self.computed.add((start, end))
        outputs = [t.unflatten(0, (self.branches, end - start)) for t in self.compute(start, end)]
        self.device = outputs[0].device
        for i in range(end - start):  # a copy per frame, so evicting a frame frees it
            self.frames[start + i] = [t[:, i].to("cpu", copy=True) if self.host else t[:, i].clone() for t in outputs]
        self.peak_frames = max(self.peak_frames, len(self.frames))

    def release_before(self, frame: int):
        """Drop the results of frames no later window covers."""
        for i in [i for i in self.frames if i < frame]:
            del self.frames[i]


class WindowReuse:
    """The caches of one denoising step: per CFG branch group ("cfg" both batched, "neg", "pos", "single"), the
    summed ControlNet residuals and, where the UNet allows it, its window-independent prefix."""

    def __init__(self, windows: list[tuple[int, int]], controlnet: Callable, prefix: Callable | None,
                 host: bool = False):
        """`controlnet(key, start, end)` -> [down residuals..., mid residual]; `prefix(key, start, end)` ->
        [conv_in output, first transformer output], both (branches x frames, ...) on the accelerator. `host`: the
        caches in host memory (`FrameCache`)."""
        self.chunks = window_chunks(windows)
        self._controlnet, self._prefix, self.host = controlnet, prefix, host
        self.caches: dict[tuple[str, str], FrameCache] = {}

    def _cache(self, what: str, key: str, branches: int) -> FrameCache:
        if (what, key) not in self.caches:
            compute = self._controlnet if what == "controlnet" else self._prefix
            self.caches[what, key] = FrameCache(self.chunks, lambda s, e: compute(key, s, e), branches, self.host)
        return self.caches[what, key]

    def controlnet_residuals(self, key: str, branches: int, start: int, end: int):
        """(down residuals, mid residual) of frames [start, end), as one multi-ControlNet call returns them."""
        *down, mid = self._cache("controlnet", key, branches).get(start, end)
        return down, mid

    def unet_prefix(self, unet, key: str, branches: int, start: int, end: int):
        """A context in which `unet` takes its first layers' outputs for frames [start, end) from the cache."""
        if self._prefix is None:
            return nullcontext()
        conv, attention = self._cache("prefix", key, branches).get(start, end)
        return injected_prefix(unet, conv, attention)

    def release_before(self, frame: int):
        for cache in self.caches.values():
            cache.release_before(frame)

    @property
    def peak_frames(self) -> int:
        return max((cache.peak_frames for cache in self.caches.values()), default=0)


# ---------------------------------------------------------------------------------------------------------------
# The UNet's window-independent prefix: conv_in -> down_blocks[0].resnets[0] -> down_blocks[0].attentions[0]


def has_prefix(unet) -> bool:
    """True when the UNet's first block starts with a ResNet, a spatial transformer, then a motion module."""
    block = unet.down_blocks[0] if hasattr(unet, "down_blocks") else None
    return all(len(getattr(block, name, None) or []) > 0 for name in ("resnets", "attentions", "motion_modules"))


class _PrefixDone(Exception):
    pass


def compute_prefix(unet, *args, **kwargs) -> list[torch.Tensor]:
    """Run `unet(*args, **kwargs)` only up to its first transformer: [conv_in output, first transformer output].

    It goes through the UNet's own forward (time embedding, reshapes, offloading hooks) and stops there."""
    block, outputs = unet.down_blocks[0], []

    def keep(module, inputs, output):
        outputs.append(output[0] if isinstance(output, tuple) else output)

    def stop(module, inputs, output):
        keep(module, inputs, output)
        raise _PrefixDone

    hooks = [unet.conv_in.register_forward_hook(keep), block.attentions[0].register_forward_hook(stop)]
    try:
        unet(*args, **kwargs)
    except _PrefixDone:
        pass
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


class _Output(torch.nn.Module):
    """Stands in for a layer: returns a precomputed output, whatever it is given."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value

    def forward(self, *args, **kwargs):
        return self.value


class _PassThrough(torch.nn.Module):
    """Stands in for the first transformer, whose output the ResNet's stand-in already returns."""

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,)


@contextmanager
def injected_prefix(unet, conv_out: torch.Tensor, attention_out: torch.Tensor):
    """Swap the UNet's first layers for their precomputed outputs for a block of code (one window's call)."""
    block = unet.down_blocks[0]
    saved = unet.conv_in, block.resnets[0], block.attentions[0]
    unet.conv_in, block.resnets[0], block.attentions[0] = _Output(conv_out), _Output(attention_out), _PassThrough()
    try:
        yield
    finally:
        unet.conv_in, block.resnets[0], block.attentions[0] = saved
