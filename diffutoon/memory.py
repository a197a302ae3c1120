"""Accelerator memory (issue 18): chunked feed-forward, a peak-memory estimator, and the memory plan.

Every saving here is exact (the same result within float rounding): memory-efficient attention, feed-forward on a
chunk of tokens at a time, one CFG branch per UNet call, fewer frames per VAE call, each model on the accelerator only
for its stage (text, windows, VAE), the reuse cache in host memory, and as the slow last resort each model on the
accelerator only for its call (model CPU offload). The estimator runs the models' own forward on the META device
(built from the loaded models' configs, no weights) and counts the bytes of the live tensors, as the accelerator's
allocator would hold them; `plan_memory` picks the fastest combination whose estimate fits a budget.

Only stdlib, torch and diffusers are imported: the module ships beside the pipeline file.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import gc
import hashlib
import itertools
import json
import os
import re
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.modeling_utils import no_init_weights
from diffusers.utils import logging

GB = 1e9
MARGIN = 0.75e9  # default budget = free memory minus this (allocator slack, cuBLAS/cuDNN workspaces, the CUDA context)
FF_CHUNKS = (None, 16384, 4096, 1024)  # feed-forward tokens per call the plan tries, fastest first
DECODE_CHUNKS = (8, 4, 2, 1)  # frames per VAE call the plan tries (never more than the call's decode_chunk_size)
# Relative time of each saving, an estimate for ordering the plans (FLOPs are the same): more kernel launches on
# smaller matrices; the second CFG branch re-reads every weight. bench/bench_memory.py measures them on CPU.
FF_COST = {None: 1.0, 16384: 1.005, 4096: 1.02, 1024: 1.06}
SERIAL_CFG_COST = 1.08
# Without the reuse cache every window recomputes its frames' ControlNets and UNet prefix: 1 / 0.773 the work at
# 1536x1536 (bench/RESULTS.md, "Work per frame"); the cache of a window of 16 frames x 2 branches is ~8 GB in fp16 there.
NO_REUSE_COST = 1.29
# The reuse cache in host memory: per window, the window's cached frames come in and the new chunk's go out over PCIe
# (~8 + 4 GB at 1536x1536, 16 frames x 2 branches, fp16: ~1 s at 12 GB/s against ~40 s of work per window on a
# 12-16 GB card; bench/RESULTS.md). Models on the device only for their stage: the weights move a few times a render.
HOST_CACHE_COST = 1.04
STAGE_COST = 1.001
# The ControlNets on the device only for their call: their weights (0.7 GB each in fp16) move in and out per window
# and CFG branch group (~6 GB per window with 2 ControlNets and one branch per call: ~0.5 s at 12 GB/s).
NETS_COST = 1.1
# Each model on the device only for its call (model CPU offload): the UNet's weights move too (~16 GB per window).
# Priced above every other combination: the plan picks it only when nothing else fits.
CALL_COST = 1.5
# Where the weights live: all on the device; each model only for its stage; the ControlNets only for their call;
# each model only for its call.
PLACEMENTS = ("all", "stage", "nets", "call")
PCIE_BYTES_PER_S = 12e9  # host <-> device rate the time estimates assume: PCIe 4.0 x16 from pageable host memory


# ---------------------------------------------------------------------------------------------------------------
# 1. Feed-forward in chunks of tokens


class ChunkedFeedForward(FeedForward):
    """diffusers' `FeedForward` on at most `chunk_size` tokens at a time: it works per token, so the result is the
    same, and its 4x-wide (GEGLU: 8x) intermediate is held for one chunk only. The class of an existing module is
    swapped (same parameters, same state dict); unlike diffusers' `set_chunk_feed_forward` the token count need not
    be a multiple of the chunk, and every batch element's tokens count together."""

    chunk_size: int = 4096

    def forward(self, hidden_states, *args, **kwargs):
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        if flat.shape[0] <= self.chunk_size:
            return super().forward(hidden_states, *args, **kwargs)
        out = torch.cat([super(ChunkedFeedForward, self).forward(part) for part in flat.split(self.chunk_size)])
        return out.reshape(*hidden_states.shape[:-1], out.shape[-1])


def set_forward_chunking(module: torch.nn.Module, chunk_size: int | None) -> int:
    """Chunk (`chunk_size` tokens) or unchunk (None) every feed-forward of a model: the UNet's spatial transformers,
    its motion modules' and a ControlNet's. Returns how many feed-forwards were changed."""
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}.")
    changed = 0
    for layer in module.modules():
        if type(layer) is FeedForward and chunk_size:
            layer.__class__ = ChunkedFeedForward
        elif type(layer) is ChunkedFeedForward and not chunk_size:
            layer.__class__ = FeedForward
            layer.__dict__.pop("chunk_size", None)
        else:
            if type(layer) is ChunkedFeedForward:
                layer.chunk_size = chunk_size
            continue
        if chunk_size:
            layer.chunk_size = chunk_size
        changed += 1
    return changed


def forward_chunk_size(module: torch.nn.Module) -> int | None:
    """The chunk size `set_forward_chunking` gave the model's feed-forwards, or None."""
    return next((m.chunk_size for m in module.modules() if type(m) is ChunkedFeedForward), None)


# ---------------------------------------------------------------------------------------------------------------
# 2. The estimator: live tensor bytes of the models' forward on the meta device


class LiveTensorBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak of the bytes held by live tensor storages created inside the mode (views and in-place ops are free).

    `replay`: a functional op on meta tensors whose signature was seen before (`_META_OPS`) gets empty outputs of the
    recorded shapes, strides and dtypes instead of running its (Python) meta function again: the same storages of the
    same sizes, counted and freed as before."""

    def __init__(self, replay: bool | None = None):
        super().__init__()
        self.live = self.peak = 0
        self.refs = {}  # id of each live storage counted -> a weak reference whose callback uncounts it
        self.replay = REPLAY if replay is None else replay

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        replayable, new, several = _OPS.get(func) or _OPS.setdefault(func, _op_kind(func))
        key = _signature(func, args, kwargs) if replayable and self.replay else None
        outs = _META_OPS.get(key) if key is not None else None
        if outs:
            out = tuple([_rebuilt(entry, args, kwargs) for entry in outs])
            out = out if several else out[0]
        else:
            out = func(*args, **(kwargs or {}))
            if key is not None and outs is None:
                if len(_META_OPS) > 500_000:  # a long-lived process that planned hundreds of sizes: start again
                    _META_OPS.clear()
                _META_OPS[key] = _replayable(args, kwargs, out)
                if not _META_OPS[key]:  # not worth a key again
                    _OPS[func] = (False, new, several)
        for fresh, o in zip(new, out if isinstance(out, (tuple, list)) else (out,)):
            if fresh and isinstance(o, torch.Tensor):
                storage = o.untyped_storage()
                name = id(storage)
                if name in self.refs:
                    continue
                n = storage.nbytes()
                self.live += n
                if self.live > self.peak:
                    self.peak = self.live
                self.refs[name] = weakref.ref(storage, functools.partial(self._free, n, name))
        return out

    def _free(self, n, name, _):
        self.live -= n
        del self.refs[name]


REPLAY = True  # replay meta ops by signature (`_META_OPS`); tests compare against False
# Meta ops replayed by signature: (op, the arguments with each tensor as its shape, stride, offset, dtype) -> the
# outputs' (shape, stride, dtype[, input whose storage it is, offset]), or False where `_rebuilt` would not give
# the same. The UNet repeats the same ops on the same shapes (identical blocks, ControlNets shaped like its down path),
# and the traces of one plan share most of them. Per process; a meta function depends on nothing else.
_META_OPS: dict = {}
_OPS: dict = {}  # op -> (replayable: returns only new tensors, which returns are new storages, several returns)


def _op_kind(func) -> tuple:
    returns = func._schema.returns
    new = tuple(r.alias_info is None for r in returns)
    replayable = bool(returns) and all(new) and all(isinstance(r.type, torch._C.TensorType) for r in returns)
    return replayable, new, len(returns) > 1


def _signature(func, args, kwargs):
    """The replay key of an op call, or None where a tensor is off the meta device or an argument is unhashable."""
    try:
        key = func, tuple([_described(a) for a in args]), _described(tuple(kwargs.items())) if kwargs else ()
        hash(key)
        return key
    except (_NotMeta, TypeError):
        return None


class _NotMeta(Exception):
    pass


def _described(value):
    kind = type(value)
    if kind is torch.Tensor or kind is torch.nn.Parameter:
        if not value.is_meta:
            raise _NotMeta
        return value.shape, value.stride(), value.storage_offset(), value.dtype
    if kind is tuple or kind is list:
        return kind, tuple([_described(v) for v in value])
    if isinstance(value, torch.Tensor):  # a subclass
        raise _NotMeta
    return kind, value  # the type too: 1 == 1.0 == True, but they promote differently


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _replayable(args, kwargs, out):
    """How to rebuild the op's outputs from its inputs (`_rebuilt`), if what that builds is what it returned (same
    shape, strides, offset, dtype, storage: a new one of the same size or the same input's), else False."""
    outs = out if isinstance(out, tuple) else (out,)
    inputs = {id(t.untyped_storage()): i for i, t in enumerate(_tensors((args, kwargs)))}
    recorded, storages = [], set()
    for o in outs:
        if type(o) is not torch.Tensor or not o.is_meta or o.is_conj() or o.is_neg() or o.layout != torch.strided:
            return False
        storage = id(o.untyped_storage())
        if storage in storages:
            return False
        storages.add(storage)
        entry = (o.shape, o.stride(), o.dtype) + ((inputs[storage], o.storage_offset()) if storage in inputs else ())
        again = _rebuilt(entry, args, kwargs)
        same = (again.shape, again.stride(), again.storage_offset(), again.dtype, again._is_view()) == (
            o.shape, o.stride(), o.storage_offset(), o.dtype, o._is_view())
        if not same or again.untyped_storage().nbytes() != o.untyped_storage().nbytes() or (
                storage in inputs and id(again.untyped_storage()) != storage):
            return False
        recorded.append(entry)
    return tuple(recorded)


def _rebuilt(entry, args, kwargs):
    """An op's output again: a new empty tensor, or (`_unsafe_view`) one on the storage of input tensor `i`."""
    shape, stride, dtype, *alias = entry
    if not alias:
        return torch.empty_strided(shape, stride, dtype=dtype, device="meta")
    i, offset = alias
    source = next(itertools.islice(_tensors((args, kwargs)), i, None))
    return torch.empty(0, dtype=dtype, device="meta").set_(source.untyped_storage(), offset, shape, stride)


_CONFIG_KEYS = weakref.WeakKeyDictionary()  # a model's configuration as text, made once (a plan asks ~100 times)


def _config_key(model) -> str:
    if model not in _CONFIG_KEYS:
        config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
        _CONFIG_KEYS[model] = type(model).__name__ + json.dumps(config, sort_keys=True, default=str)
    return _CONFIG_KEYS[model]


@functools.lru_cache(maxsize=16)
def _meta_model(cls, config_key: str, dtype: torch.dtype, motion: bool = True):
    """A weightless copy of a model on the meta device, from its config (built once per config)."""
    config = json.loads(config_key[len(cls.__name__):])
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # from_config's notes on dtypes: these copies have no weights to keep in float32
    try:
        collecting = gc.isenabled()
        gc.disable()  # ~1500 modules: the collector would walk every object of the process (most of the time here)
        with torch.device("meta"), no_init_weights():  # meta tensors hold no values to initialise
            model = cls.from_config(config).to(dtype).eval()
    finally:
        logging.set_verbosity(verbosity)
        if collecting:
            gc.enable()
    if not motion:  # the editing branch runs the UNet without its motion modules
        for block in [*model.down_blocks, *model.up_blocks, model.mid_block]:
            if hasattr(block, "motion_modules"):
                block.motion_modules = torch.nn.ModuleList([_Identity() for _ in block.motion_modules])
    return model


def _dtype(model) -> torch.dtype:
    """The model's dtype, as its first parameter's (diffusers' `model.dtype` walks every module)."""
    return next(model.parameters()).dtype


def meta_copy(model, dtype=None, motion: bool = True):
    return _meta_model(type(model), _config_key(model), dtype or model.dtype, motion)


class _Identity(torch.nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextmanager
def _meta_kernels(memory_efficient: bool, ff_chunk: int | None, joint_frames: int | None = None, variants=None,
                  mem=None):
    """Attention and feed-forward as the accelerator runs them, without their cost on meta tensors.

    Attention: a flash / memory-efficient kernel allocates its output only; the plain path the score matrix and
    its softmax. `joint_frames`: the editing branch's cross-frame attention (self-attention over all frames of a
    group: q, k, v copied into one sequence). Feed-forward in chunks: the outputs of all chunks but the last, one
    chunk's intermediates, then the concatenation, in a fixed number of meta ops whatever the chunk count.
    `variants` (several (memory_efficient, ff_chunk), with `mem` the trace's meter): every variant's kernels in one
    trace (`_Alternatives`, yielded); else None."""
    sdpa, ff_forward = torch.nn.functional.scaled_dot_product_attention, FeedForward.forward

    def attention_for(memory_efficient):
        def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
            shape = q.shape
            joint = joint_frames and q.shape[-2] == k.shape[-2] and q.shape[0] % joint_frames == 0
            if joint:  # (G F, H, N, D) -> (G, H, F N, D): a copy of each
                q, k, v = (t.reshape(-1, joint_frames, *t.shape[1:]).transpose(1, 2).reshape(
                    t.shape[0] // joint_frames, t.shape[1], -1, t.shape[-1]) for t in (q, k, v))
            if memory_efficient:
                out = q.new_empty(q.shape[:-1] + v.shape[-1:])
            else:
                out = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
            if joint:
                out = out.reshape(-1, shape[1], joint_frames, shape[2], out.shape[-1]).transpose(1, 2).reshape(
                    *shape[:-1], out.shape[-1])
            return out
        return attention

    def chunked_for(ff_chunk):
        def chunked(self, hidden_states, *args, **kwargs):
            flat = hidden_states.reshape(-1, hidden_states.shape[-1])
            if not ff_chunk or flat.shape[0] <= ff_chunk:
                return ff_forward(self, hidden_states)
            done = flat.new_empty(flat.shape[0] - ff_chunk, self.net[-1].out_features)  # the chunks' outputs so far
            last = ff_forward(self, flat[:ff_chunk])
            out = torch.cat([done, last])
            del done, last
            return out.reshape(*hidden_states.shape[:-1], out.shape[-1])
        return chunked

    def remembered(kernel, tag):
        """The attention stand-in by its inputs' signature: its peak above the live bytes at the call and its output
        (new, checked), which is all it does to the meter (the same ops on the same shapes; it reads nothing else)."""
        if mem is None or not mem.replay:
            return kernel

        def attention(q, k, v, *args, **kwargs):
            try:
                key = (tag, joint_frames, _described(q), _described(k), _described(v))
            except _NotMeta:
                return kernel(q, k, v, *args, **kwargs)
            done, live, peak = _KERNELS.get(key), mem.live, mem.peak
            if done:
                (shape, stride, dtype), above = done
                out = q.new_empty_strided(shape, stride, dtype=dtype)  # counted as the kernel's output was
                mem.peak = max(mem.peak, live + above)
                return out
            mem.peak = live
            out = kernel(q, k, v, *args, **kwargs)
            if done is None:
                rebuilt = _replayable((q, k, v), {}, out)
                fresh = rebuilt and len(rebuilt[0]) == 3 and mem.live - live == out.untyped_storage().nbytes()
                _KERNELS[key] = (rebuilt[0], mem.peak - live) if fresh else False
            mem.peak = max(peak, mem.peak)
            return out
        return attention

    alternatives = None
    if variants is None or len(variants) == 1:
        memory_efficient, ff_chunk = variants[0] if variants else (memory_efficient, ff_chunk)
        attention, chunked = remembered(attention_for(memory_efficient), memory_efficient), chunked_for(ff_chunk)
    else:
        alternatives = _Alternatives(mem, variants)
        attentions = {m: (remembered(attention_for(m), m), [v for v in variants if v[0] == m]) for m, _ in variants}
        chunks = {ff: chunked_for(ff) for _, ff in variants}

        def attention(*args, **kwargs):
            return alternatives.run(attentions.values(), *args, **kwargs)

        def chunked(self, hidden_states, *args, **kwargs):
            tokens = hidden_states.numel() // hidden_states.shape[-1]
            same = {}  # variants by the chunk that changes anything here
            for v in variants:
                same.setdefault(v[1] if v[1] and tokens > v[1] else None, []).append(v)
            return alternatives.run([(chunks[ff], vs) for ff, vs in same.items()], self, hidden_states)

    torch.nn.functional.scaled_dot_product_attention = attention
    FeedForward.forward = chunked
    try:
        yield alternatives
    finally:
        torch.nn.functional.scaled_dot_product_attention, FeedForward.forward = sdpa, ff_forward


_KERNELS: dict = {}  # the attention stand-in by (variant, inputs): (its output, its peak above the live bytes)


class _NotShared(Exception):
    """Variants that one trace cannot serve exactly: each is traced alone."""


class _Alternatives:
    """Several variants of the stand-in kernels in one trace. At each kernel call every variant's kernel runs on the
    same inputs in turn, from the same live bytes (the previous one's output freed first): the peak each reaches is
    kept per variant (`peaks`), the trace's meter sees none of them, and the last one's output goes on. Exact when
    every variant's kernel leaves the same thing behind (one new output, same shape, strides, dtype, bytes), checked
    at each call: then the live bytes outside the kernels are the same for every variant, and a variant's peak is the
    larger of the meter's and its kernels'."""

    def __init__(self, mem, variants):
        self.mem, self.peaks, self.running = mem, dict.fromkeys(variants, 0), False

    def run(self, kernels, *args, **kwargs):
        mem = self.mem
        if self.running:
            raise _NotShared("nested kernels")
        self.running, peak, live, left = True, mem.peak, mem.live, None
        out = None
        for kernel, variants in kernels:
            out = None  # the previous variant's output
            if mem.live != live:
                raise _NotShared("a kernel left more than its output")
            mem.peak = live
            out = kernel(*args, **kwargs)
            nbytes = out.untyped_storage().nbytes()
            described = (out.shape, out.stride(), out.storage_offset(), out.dtype, nbytes)
            if mem.live - live != nbytes or left not in (None, described):
                raise _NotShared("the variants' kernels leave different outputs")
            left = described
            for v in variants:
                self.peaks[v] = max(self.peaks[v], mem.peak)
        mem.peak, self.running = peak, False
        return out

    def phase(self) -> dict:
        """Each variant's peak so far (the meter's and its kernels'); the next phase starts from the live bytes."""
        peaks = {v: max(self.mem.peak, p) for v, p in self.peaks.items()}
        self.peaks = dict.fromkeys(self.peaks, 0)
        self.mem.peak = self.mem.live
        return peaks


_PEAKS: dict = {}  # traced peaks by (configs, shapes, switches): a plan re-asks the same questions
# ... and keeps them on disk, so that a new process plans a size it has seen in milliseconds. The key includes this
# file's text and the torch / diffusers versions: any change to the estimator or the kernels' meta functions is new.


def _cache_file() -> str:
    """$DIFFUTOON_CACHE (default $XDG_CACHE_HOME/diffutoon or ~/.cache/diffutoon) / memory-estimates.json."""
    root = os.environ.get("DIFFUTOON_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "diffutoon")
    return os.path.join(root, "memory-estimates.json")


@functools.lru_cache(maxsize=1)
def _code_version() -> str:
    import diffusers

    with open(__file__, "rb") as f:
        return hashlib.sha1(f.read() + torch.__version__.encode() + diffusers.__version__.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _disk() -> dict:
    try:
        with open(_cache_file()) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _disk_name(key) -> str:
    return hashlib.sha1(repr((_code_version(), key)).encode()).hexdigest()


def _cached(key, compute):
    """`key`'s value: in memory, on disk, or `compute()`d (a value, or a dict of values by key that includes `key`'s:
    one trace may answer several keys)."""
    if key not in _PEAKS:
        value = _disk().get(_disk_name(key))
        if value is None:
            values = compute()
            values = values if isinstance(values, dict) else {key: values}
            _disk().update({_disk_name(k): v for k, v in values.items()})
            _save(_disk())
            value = values[key]
        _PEAKS[key] = tuple(value) if isinstance(value, list) else value
    return _PEAKS[key]


def _save(entries: dict):
    """Write the disk cache durably (temporary file, fsync, rename); a cache that cannot be written is skipped."""
    path = _cache_file()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "w") as f:
            json.dump(entries, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError:
        pass


def window_bytes(unet, nets, height: int, width: int, frames: int, branches: int, *, memory_efficient: bool = True,
                 ff_chunk: int | None = None, reuse_branches: int = 0, motion_context=None, vae_scale_factor: int = 8,
                 text_tokens: int = 77, joint_frames: int | None = None, motion: bool = True,
                 host_cache: bool = False) -> int:
    """Peak activation bytes of one window: the ControlNets on `branches` x `frames` frames (their residuals summed
    as they come), then the UNet (motion modules included unless `motion=False`) with those residuals held.
    `reuse_branches` > 0: the reuse cache (diffutoon/reuse.py) holds that many branches' per-frame residuals and UNet
    prefixes for the window's frames beside the copies the call gets; with `host_cache` the cache is in host memory
    and the device holds the call's copies only (the UNet's first transformer output besides what it computes
    itself). Weights are not counted."""
    return max(window_phase_bytes(unet, nets, height, width, frames, branches, memory_efficient=memory_efficient,
                                  ff_chunk=ff_chunk, reuse_branches=reuse_branches, motion_context=motion_context,
                                  vae_scale_factor=vae_scale_factor, text_tokens=text_tokens,
                                  joint_frames=joint_frames, motion=motion, host_cache=host_cache))


def window_phase_bytes(unet, nets, height: int, width: int, frames: int, branches: int, *, memory_efficient=True,
                       ff_chunk=None, reuse_branches=0, motion_context=None, vae_scale_factor=8, text_tokens=77,
                       joint_frames=None, motion=True, host_cache=False) -> tuple:
    """`window_bytes` as (peak while the ControlNets run, peak while the UNet runs): their weights may differ."""
    controlnets, unet_peak, per_frame = _traced_window(unet, nets, height, width, frames, branches, memory_efficient,
                                                       ff_chunk, motion_context, vae_scale_factor, text_tokens,
                                                       joint_frames, motion)
    held = 0
    if reuse_branches:  # the editing branch (no motion modules, joint attention) caches its ControlNets only
        prefix = unet.config.block_out_channels[0] * (height // vae_scale_factor) * (width // vae_scale_factor) * motion
        held = (branches * frames * prefix if host_cache else reuse_branches * frames * (per_frame + 2 * prefix))
        held *= _dtype(unet).itemsize
    return controlnets, unet_peak + held


def cached_frame_bytes(unet, nets, height: int, width: int, vae_scale_factor: int = 8) -> int:
    """Bytes the reuse cache holds per frame and CFG branch: the summed ControlNet residuals, the UNet's prefix."""
    per_frame = _traced_window(unet, nets, height, width, 1, 1, True, None, None, vae_scale_factor, 77, None, True)[2]
    prefix = 2 * unet.config.block_out_channels[0] * (height // vae_scale_factor) * (width // vae_scale_factor)
    return (per_frame + prefix) * _dtype(unet).itemsize


def _traced_window(unet, nets, height, width, frames, branches, memory_efficient, ff_chunk, motion_context,
                   vae_scale_factor, text_tokens, joint_frames, motion):
    """`window_phases` on meta copies, cached. A trace answers for both attentions and every feed-forward chunk size
    the plan tries at once (`_window_variants`): a plan traces each shape once."""
    tokens = branches * frames * (height // vae_scale_factor) * (width // vae_scale_factor)
    chunk = lambda ff: None if ff and ff >= tokens else ff  # noqa: E731  (a chunk of every token changes nothing)
    variants = sorted({(m, chunk(ff)) for m in (True, False) for ff in (*FF_CHUNKS, ff_chunk)},
                      key=lambda v: (v[0], v[1] or 0))

    def key(variant):
        return ("window", _config_key(unet), tuple(_config_key(n) for n in nets), height, width, frames, branches,
                *variant, getattr(motion_context, "__name__", None), vae_scale_factor, text_tokens, joint_frames,
                motion, _dtype(unet))

    def trace():
        models = meta_copy(unet, motion=motion), [meta_copy(n) for n in nets]
        args = (height, width, frames, branches, motion_context, vae_scale_factor, text_tokens, joint_frames)
        try:
            peaks = _window_variants(*models, variants, *args)
        except _NotShared:  # each variant alone
            peaks = {v: _window_variants(*models, [v], *args)[v] for v in variants}
        return {key(v): p for v, p in peaks.items()}

    return _cached(key((memory_efficient, chunk(ff_chunk))), trace)


@torch.no_grad()
def window_phases(unet, nets, height, width, frames, branches, memory_efficient=True, ff_chunk=None,
                  motion_context=None, scale=8, text_tokens=77, joint_frames=None):
    """(peak bytes while the ControlNets run, peak while the UNet runs with their residuals held, elements of one
    frame's residuals of one branch): what any reuse cache adds is held through the UNet phase only, so one trace
    serves every reuse mode. On meta models the kernels are stand-ins (`_meta_kernels`); on real models (any device)
    the same calls run for real: what bench/bench_memory.py measures the estimate against."""
    variant = (memory_efficient, ff_chunk)
    return _window_variants(unet, nets, [variant], height, width, frames, branches, motion_context, scale,
                            text_tokens, joint_frames)[variant]


@torch.no_grad()
def _window_variants(unet, nets, variants, height, width, frames, branches, motion_context=None, scale=8,
                     text_tokens=77, joint_frames=None) -> dict:
    """`window_phases` for several (memory_efficient, ff_chunk) on meta models in one trace (`_Alternatives`), by
    variant; raises `_NotShared` where one trace cannot serve them all exactly."""
    dtype, meta = unet.dtype, unet.device
    h, w, c = height // scale, width // scale, unet.config.in_channels
    t = torch.tensor(999, device=meta)
    context = motion_context(unet) if motion_context is not None else nullcontext()
    mem = LiveTensorBytes()
    if meta.type == "meta":
        kernels = _meta_kernels(None, None, joint_frames, variants, mem)
    elif len(variants) == 1:  # the models' own kernels, as set up
        kernels = nullcontext()
    else:
        raise ValueError("several variants need meta models")
    per_frame = 0
    with kernels as alternatives, context, mem:
        latents = torch.empty(branches, c, frames, h, w, device=meta, dtype=dtype)
        embeds = torch.empty(branches * frames, text_tokens, unet.config.cross_attention_dim, device=meta, dtype=dtype)
        x = latents.transpose(1, 2).reshape(branches * frames, c, h, w)
        down, mid = None, None
        for net in nets:
            image = torch.empty(branches * frames, 3, height, width, device=meta, dtype=dtype)
            d, m = net(x, t, encoder_hidden_states=embeds, controlnet_cond=image, conditioning_scale=0.5,
                       return_dict=False)
            down = d if down is None else [p.add_(q) for p, q in zip(down, d)]  # as the pipeline sums them
            mid = m if mid is None else mid.add_(m)
            del image, d, m
        del x
        if down is not None:
            per_frame = (sum(r.numel() for r in down) + mid.numel()) // (branches * frames)
        if alternatives is None:
            controlnets, mem.peak = dict.fromkeys(variants, mem.peak), mem.live
        else:
            controlnets = alternatives.phase()
        unet(latents, t, encoder_hidden_states=embeds, down_block_additional_residuals=down,
             mid_block_additional_residual=mid)
        unet_peak = dict.fromkeys(variants, mem.peak) if alternatives is None else alternatives.phase()
    return {v: (controlnets[v], unet_peak[v], per_frame) for v in variants}


def window_trace(unet, nets, height, width, frames, branches, memory_efficient=True, ff_chunk=None, motion_context=None, scale=8, text_tokens=77, joint_frames=None):
    """`window_bytes`'s count without its cache, by `window_phases` on the models as given (meta or real)."""
    controlnets, unet_peak, _ = window_phases(unet, nets, height, width, frames, branches, memory_efficient, ff_chunk,
                                              motion_context, scale, text_tokens, joint_frames)
    return max(controlnets, unet_peak)


def vae_bytes(vae, height: int, width: int, frames: int, *, memory_efficient: bool = True, encode: bool = False) -> int:
    """Peak activation bytes of one VAE call on `frames` frames: decode (latents -> pixels) or encode."""
    key = ("vae", _config_key(vae), height, width, frames, memory_efficient, encode, _dtype(vae))
    return _cached(key, lambda: _vae_trace(meta_copy(vae), height, width, frames, memory_efficient, encode))


@torch.no_grad()
def _vae_trace(vae, height, width, frames, memory_efficient, encode):
    meta, scale = torch.device("meta"), 2 ** (len(vae.config.block_out_channels) - 1)
    mem = LiveTensorBytes()
    with _meta_kernels(memory_efficient, None, mem=mem), mem:
        if encode:
            vae.encode(torch.empty(frames, 3, height, width, device=meta, dtype=vae.dtype)).latent_dist.mean.float()
        else:
            z = torch.empty(frames, vae.config.latent_channels, height // scale, width // scale, device=meta,
                            dtype=vae.dtype)
            vae.decode(z).sample.float()  # the pipeline casts the decoded frames to float32 on the device
    return mem.peak


def weight_bytes(*modules) -> int:
    """Bytes of the parameters and buffers of `modules` (each counted once)."""
    seen, total = set(), 0
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            if t.data_ptr() not in seen or t.device.type == "meta":
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def _size(n: int) -> str:
    return f"{n / GB:.1f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def parse_bytes(value) -> int:
    """'12GB', '12 GiB', '500MB' or a number of bytes -> bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 2**20:
            raise ValueError(f"memory_budget={value!r} is a number of bytes, which is too small: write it with a unit, "
                             f"e.g. '{value:g}GB'.")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b)\s*", str(value), re.IGNORECASE)
    if not match:
        raise ValueError(f"memory_budget={value!r}: write a size with a unit, e.g. '12GB' or '11.5GiB'.")
    unit = match.group(2).lower().rstrip("b")
    base = 1024 if unit.endswith("i") else 1000
    return int(float(match.group(1)) * base ** ("kmgt".index(unit[0]) + 1 if unit else 0))


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, Windows, musl)
        return None


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 128 * 1024  # glibc's default: larger buffers get their own mapping, unmapped when freed


@functools.lru_cache(maxsize=1)
def steady_host_memory() -> bool:
    """Fix glibc's mmap threshold at its default, 128 KiB, for the rest of the process (once; not if the user set
    MALLOC_MMAP_THRESHOLD_). glibc otherwise raises it after each large free, up to 32 MiB: from then on frame- and
    window-sized buffers come from the heap, whose freed gaps stay resident. Fixed, each such buffer is mapped and
    unmapped whole: a render's anonymous host memory is ~50 MB lower at 256x256 and steadier from run to run
    (bench/RESULTS.md, "Host memory"), for ~1.23-1.28x the time of a render that runs on the CPU (each large activation
    then faults fresh pages in); next to an accelerator's work the host's buffers cost nothing measurable. The pipeline
    calls it before every render on an accelerator. Process-wide, like every malloc setting; returns whether it was
    set (False without glibc)."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def trim_host_memory(steady: bool = False):
    """Give the C allocator's free pages back to the OS (glibc's `malloc_trim`), before a render and once per window
    or chunk (`steady`: with the mmap threshold fixed first, `steady_host_memory`): host memory flat over a long
    render (bench/bench_longrender.py). It moves no data; a no-op without glibc."""
    if steady:
        steady_host_memory()
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


# ---------------------------------------------------------------------------------------------------------------
# 3. Where the weights live: all on the accelerator, each model only for its stage, or only for its call


def placed_models(pipe) -> dict:
    """The models whose place the plan manages, by name: "text_encoder", "image_encoder", "vae", "unet",
    "controlnet.<i>", "edit_controlnet.<i>"."""
    models = {name: getattr(pipe, name, None) for name in ("text_encoder", "image_encoder", "vae", "unet")}
    models.update({f"controlnet.{i}": net for i, net in enumerate(pipe.controlnets)})
    models.update({f"edit_controlnet.{i}": net for i, net in enumerate(pipe.edit_controlnets)})
    return {name: m for name, m in models.items() if isinstance(m, torch.nn.Module)}


def companions(name: str, names, placement: str) -> set:
    """The models that may stay on the accelerator while `name` runs. "stage": the UNet with the ControlNets of the
    pass running (a window calls them all), every other model alone; "nets": a ControlNet with the UNet, the UNet
    alone; "call": each model alone."""
    if placement == "call" or not name.startswith(("unet", "controlnet", "edit_controlnet")):
        return {name}
    if placement == "nets":
        return {"unet", name}
    branch = [n for n in names if n.startswith("edit_controlnet" if name.startswith("edit") else "controlnet")]
    if name == "unet":  # the pass's ControlNets ran first (or were evicted by them): keep whichever are there
        branch = [n for n in names if "controlnet" in n]
    return {"unet", name, *branch}


def _device_of(module) -> torch.device:
    return next(iter([*module.parameters(), *module.buffers()]), torch.empty(0)).device


@contextmanager
def placed(pipe, placement: str):
    """Run `pipe` with its models on the accelerator only for their stage or call (`placement` "stage", "nets" /
    "call", see `companions`; "all": as they are). accelerate hooks, as diffusers' `enable_model_cpu_offload` installs them, move a model to
    the execution device before its call and the models it must not share the device with to the CPU; on exit every
    model goes back where it was (and diffusers' model CPU offload, if it was on, is put back). The weights are only
    moved, so the result is the same. `pipe._placement_log` holds (model called, models on the device) of the last
    moves."""
    if placement == "all":
        yield
        return
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    device = pipe._execution_device
    offload = getattr(pipe, "_offload_device", None) if getattr(pipe, "_all_hooks", None) else None
    if offload is not None:  # diffusers' model CPU offload: these hooks replace it for the call
        pipe.remove_all_hooks()
    models = placed_models(pipe)
    before = {name: _device_of(m) for name, m in models.items()}
    on_device = {name for name, d in before.items() if d == device}
    log = pipe._placement_log = collections.deque(maxlen=256)  # the last moves (tests read them)

    class OnDevice(ModelHook):
        def __init__(self, name):
            super().__init__()
            self.name, self.execution_device = name, device  # `_execution_device` reads execution_device

        def pre_forward(self, module, *args, **kwargs):
            if self.name not in on_device or on_device - companions(self.name, models, placement):
                for other in sorted(on_device - companions(self.name, models, placement)):
                    models[other].to("cpu")
                    on_device.discard(other)
                module.to(device)
                on_device.add(self.name)
                log.append((self.name, frozenset(on_device)))
            return args, kwargs

    for name, module in models.items():
        add_hook_to_module(module, OnDevice(name))
    try:
        yield
    finally:
        for name, module in models.items():
            remove_hook_from_module(module)
            module.to(before[name])
        if offload is not None:
            pipe.enable_model_cpu_offload(device=offload)


def placements(pipe) -> tuple:
    """The placements the plan may choose: all, or with diffusers' model CPU offload on all but "all" (its hooks are
    replaced for the call); with other accelerate hooks (sequential offload) the models stay as they are set."""
    if getattr(pipe, "_all_hooks", None):
        return PLACEMENTS[1:]
    if any(hasattr(m, "_hf_hook") for m in placed_models(pipe).values()):
        return ("all",)
    return PLACEMENTS


# ---------------------------------------------------------------------------------------------------------------
# 4. The plan


@dataclass
class MemoryPlan:
    """The exact savings one render runs with, and the estimate that chose them. `str(plan)` is one line."""

    height: int
    width: int
    budget: int  # bytes the render may use, weights included
    budget_source: str  # "free" (the device's free memory minus a margin) or "given"
    batch_cfg: bool = True
    reuse_across_windows: bool | str = True  # "host": the reuse cache in host memory
    forward_chunk_size: int | None = None
    memory_efficient_attention: bool = False
    decode_chunk_size: int = 8
    estimate: int = 0  # bytes: the largest of each stage's resident weights + its peak activations
    parts: dict = field(default_factory=dict)  # bytes: weights (main windows), window, decode, encode, edit ...
    enabled: tuple = ()  # what the plan changes from the call as given, in words
    relative_time: float = 1.0  # estimated time against the call as given (FLOPs are the same)
    placement: str = "all"  # "all" on the device, "stage" / "nets" / "call": see `companions`

    def __str__(self):
        budget = f"{_size(self.budget)} {'free' if self.budget_source == 'free' else 'budget'}"
        what = ", ".join(self.enabled) or "no saving needed"
        return f"{self.width}x{self.height}, {budget}: {what}: {_size(self.estimate)} estimated"

    def edit_settings(self, settings: dict) -> dict:
        """The editing branch's settings with the plan's VAE chunk and reuse cache."""
        if not settings:
            return settings
        return {**settings, "decode_chunk_size": min(settings.get("decode_chunk_size", 8), self.decode_chunk_size),
                "reuse_across_windows": settings.get("reuse_across_windows", True) and self.reuse_across_windows}

    def apply(self, pipe):
        """A context in which `pipe` runs with the plan's attention, feed-forward and placement (restored on exit)."""
        return _applied(pipe, self)


@contextmanager
def _applied(pipe, plan):
    components = [pipe.unet, *pipe.controlnets, *pipe.edit_controlnets]
    chunks = [forward_chunk_size(m) for m in components]
    attention = plan.memory_efficient_attention and getattr(pipe, "_memory_efficient_snapshot", None) is None
    if attention:
        try:
            pipe.enable_memory_efficient_attention()
        except ImportError:  # a Hub folder without the project's processors: diffusers' SDPA picks flash on CUDA
            attention = False
    if plan.forward_chunk_size:
        for m in components:
            set_forward_chunking(m, plan.forward_chunk_size)
    try:
        with placed(pipe, plan.placement):
            yield plan
    finally:
        for m, chunk in zip(components, chunks):
            set_forward_chunking(m, chunk)
        if attention:
            pipe.disable_memory_efficient_attention()


def _has_memory_efficient_attention(pipe) -> bool:
    return getattr(pipe, "_memory_efficient_snapshot", None) is not None


def estimate_memory(pipe, height, width, context_length=16, batch_cfg=True, guidance_scale=7.0, forward_chunk_size=None,
                    memory_efficient_attention=None, decode_chunk_size=8, reuse_across_windows=True, strength=1.0,
                    edit_settings=None, motion_context=None, placement="all", weights=None) -> dict:
    """Peak bytes of each stage of a render with these switches: {"weights" (resident during the main windows),
    "window", "decode", "encode", "edit window", "edit decode" (activations), "total" (the largest of each stage's
    resident weights + activations)}. `memory_efficient_attention` None: as installed; `reuse_across_windows`
    True, "host" or False; `placement` one of `PLACEMENTS` (see `placed`); `weights`: `stage_weights`'s, if known."""
    memeff = _has_memory_efficient_attention(pipe) if memory_efficient_attention is None else memory_efficient_attention
    cfg = 2 if guidance_scale > 1 else 1
    branches = cfg if batch_cfg else 1
    scale = pipe.vae_scale_factor
    weights = weights or stage_weights(pipe, placement)
    parts = {"weights": max(weights["window"])}
    phases = {}
    phases["window"] = window_phase_bytes(pipe.unet, pipe.controlnets, height, width, context_length, branches,
                                   memory_efficient=memeff, ff_chunk=forward_chunk_size,
                                   reuse_branches=cfg if reuse_across_windows else 0, motion_context=motion_context,
                                   vae_scale_factor=scale, host_cache=reuse_across_windows == "host")
    parts["window"] = max(phases["window"])
    parts["decode"] = vae_bytes(pipe.vae, height, width, decode_chunk_size, memory_efficient=memeff)
    if strength < 1:
        parts["encode"] = vae_bytes(pipe.vae, height, width, decode_chunk_size, memory_efficient=memeff, encode=True)
    if edit_settings:
        e = edit_settings
        edit_cfg = 2 if e.get("guidance_scale", 7.0) > 1 else 1
        edit_chunk = min(decode_chunk_size, e.get("decode_chunk_size", 8))
        reuse = e.get("reuse_across_windows", True) and reuse_across_windows
        phases["edit window"] = window_phase_bytes(pipe.unet, pipe.edit_controlnets, e["height"], e["width"],
                                            e["context_length"], edit_cfg if batch_cfg else 1, memory_efficient=memeff,
                                            ff_chunk=forward_chunk_size, vae_scale_factor=scale, motion=False,
                                            reuse_branches=edit_cfg if reuse else 0, host_cache=reuse == "host",
                                            joint_frames=e["context_length"] if e.get("cross_frame_mode", "joint") == "joint" else None)
        parts["edit window"] = max(phases["edit window"])
        parts["edit decode"] = vae_bytes(pipe.vae, e["height"], e["width"], edit_chunk, memory_efficient=memeff)
    stages = [weights["text"]] + [w + a for k, pair in phases.items() for w, a in zip(weights[k], pair)]
    parts["total"] = max(stages + [weights["vae"] + v for k, v in parts.items() if "decode" in k or k == "encode"])
    return parts


def stage_weights(pipe, placement: str = "all", models: dict | None = None) -> dict:
    """Bytes of the weights on the accelerator during each stage: "text", "vae", and for "window" and "edit window"
    a pair (while the ControlNets run, while the UNet runs). `models`: each placed model's `weight_bytes`, if known."""
    if placement == "all":
        every = resident_weights(pipe)
        return {"text": every, "window": (every, every), "edit window": (every, every), "vae": every}
    models = models or {name: weight_bytes(m) for name, m in placed_models(pipe).items()}
    unet, stages = models["unet"], {}
    for stage, branch in (("window", "controlnet"), ("edit window", "edit_")):
        nets = [size for n, size in models.items() if n.startswith(branch)] or [0]
        stages[stage] = {"stage": (unet + sum(nets),) * 2, "nets": (unet + max(nets), unet),
                         "call": (max(nets), unet)}[placement]
    text = max(models.get("text_encoder", 0), models.get("image_encoder", 0))
    return {"text": text, "vae": models["vae"], **stages}


def resident_weights(pipe) -> int:
    """Bytes of the weights the accelerator holds during a render: every model's, or with diffusers' model CPU
    offload the largest of the UNet + ControlNets, the VAE and the text encoder (one model at a time)."""
    main = [pipe.unet, *pipe.controlnets, *pipe.edit_controlnets]
    if getattr(pipe, "_offload_device", None) is not None and getattr(pipe, "_all_hooks", None):
        return max(weight_bytes(*main), weight_bytes(pipe.vae), weight_bytes(pipe.text_encoder))
    return weight_bytes(*placed_models(pipe).values())


def transfer_bytes(pipe, plan, context_length=16, context_stride=8, guidance_scale=7.0) -> int:
    """Bytes moved between host and accelerator per window of the main pass (both directions) by `plan`'s reuse
    cache in host memory (the window's cached frames in, the new frames' out) and its placement (each ControlNet,
    or each ControlNet and the UNet, in and out per CFG branch group); models on the device per stage move a few
    times per render only."""
    cfg = 2 if guidance_scale > 1 else 1
    groups = 1 if plan.batch_cfg else cfg
    moved = 0
    if plan.reuse_across_windows == "host":
        frame = cached_frame_bytes(pipe.unet, pipe.controlnets, plan.height, plan.width, pipe.vae_scale_factor)
        moved += cfg * (context_length + context_stride) * frame
    if plan.placement in ("nets", "call"):
        moved += 2 * groups * weight_bytes(*pipe.controlnets, *([pipe.unet] if plan.placement == "call" else []))
    return moved


def default_budget(device) -> int:
    """The accelerator's free memory minus a margin."""
    free, _ = torch.cuda.mem_get_info(device)
    return free - MARGIN


def _cost(option) -> float:
    _, ff, serial, reuse, placement = option
    return (FF_COST[ff] * (SERIAL_CFG_COST if serial else 1.0) * {True: 1.0, "host": HOST_CACHE_COST, False: NO_REUSE_COST}[reuse]
            * {"all": 1.0, "stage": STAGE_COST, "nets": NETS_COST, "call": CALL_COST}[placement])


def _in_words(option, had, decode, decode_chunk_size, strength) -> list:
    memeff, ff, serial, reuse, placement = option
    had_memeff, had_chunk, had_reuse, had_placement = had
    return ((["memory-efficient attention"] if memeff and not had_memeff else []) +
            (["one CFG branch per call"] if serial else []) +
            ([f"feed-forward in chunks of {ff} tokens"] if ff and ff != had_chunk else []) +
            (["reuse cache in host memory"] if reuse == "host" else []) +
            (["no reuse across windows"] if had_reuse and not reuse else []) +
            (["each model on the GPU only for its stage"] if placement == "stage" and had_placement != "stage" else []) +
            (["the ControlNets on the GPU only for their call"] if placement == "nets" else []) +
            (["last resort, slower: model CPU offload (each model on the GPU only for its call)"]
             if placement == "call" else []) +
            ([f"VAE {'encode and ' if strength < 1 else ''}decode {decode} frame{'s' if decode > 1 else ''} at a time"]
             if decode != decode_chunk_size else []))


def plan_memory(pipe, height, width, context_length=16, batch_cfg=True, guidance_scale=7.0, decode_chunk_size=8,
                reuse_across_windows=True, strength=1.0, edit_settings=None, memory_budget=None, motion_context=None,
                device=None) -> MemoryPlan:
    """The fastest combination of exact savings whose estimate fits the budget; ValueError if none does, naming the
    largest size (same aspect ratio) that fits. Never changes the window length, a setting of the result."""
    device = torch.device(device or pipe._execution_device)
    if memory_budget is None:
        if device.type != "cuda":
            raise ValueError("memory_budget is needed off CUDA (e.g. '12GB'): there is no free memory to ask.")
        resident = sum(weight_bytes(m) for m in placed_models(pipe).values() if _device_of(m) == device)
        budget, source = default_budget(device) + resident, "free"
    else:
        budget, source = parse_bytes(memory_budget), "given"
    common = dict(context_length=context_length, guidance_scale=guidance_scale, strength=strength,
                  edit_settings=edit_settings, motion_context=motion_context)
    had_memeff, cfg, had_chunk = _has_memory_efficient_attention(pipe), guidance_scale > 1, forward_chunk_size(pipe.unet)
    where = placements(pipe)
    tokens = 2 * context_length * (height // pipe.vae_scale_factor) * (width // pipe.vae_scale_factor)
    chunks = [ff for ff in FF_CHUNKS if not ff or ff < tokens]  # a chunk holding every token changes nothing
    reuses = (True, "host", False) if reuse_across_windows else (False,)
    serials = (False, True) if batch_cfg and cfg else (False,)
    options = [(had_memeff, None, False, bool(reuse_across_windows), where[0])] + sorted(  # as set up first
        ((True, ff, serial, reuse, place) for ff in chunks for serial in serials for reuse in reuses for place in where),
        key=_cost)

    sizes = {name: weight_bytes(m) for name, m in placed_models(pipe).items()}  # each model's, once
    weights = {place: stage_weights(pipe, place, sizes) for place in where}  # once: the estimates only add them up

    def settings(option):
        memeff, ff, serial, reuse, place = option
        return dict(common, batch_cfg=batch_cfg and not serial, forward_chunk_size=ff or had_chunk,
                    memory_efficient_attention=memeff, reuse_across_windows=reuse, placement=place,
                    weights=weights[place])

    least = settings((True, chunks[-1], bool(serials[-1]), False, where[-1]))
    if estimate_memory(pipe, height, width, decode_chunk_size=1, **least)["total"] > budget:  # not with every saving
        raise ValueError(_nothing_fits(pipe, height, width, budget, source, dict(least, decode_chunk_size=1)))
    @functools.lru_cache(maxsize=None)
    def fits(option) -> bool:  # with one frame per VAE call
        return estimate_memory(pipe, height, width, decode_chunk_size=1, **settings(option))["total"] <= budget

    for option in options:
        # the same with the smallest feed-forward chunk is a lower bound: one trace rules out every chunk size
        if not fits(option[:1] + (chunks[-1],) + option[2:]) or not fits(option):
            continue
        decode = next(d for d in sorted({d for d in DECODE_CHUNKS if d < decode_chunk_size} | {decode_chunk_size},
                                        reverse=True)
                      if estimate_memory(pipe, height, width, decode_chunk_size=d, **settings(option))["total"] <= budget)
        parts = estimate_memory(pipe, height, width, decode_chunk_size=decode, **settings(option))
        memeff, ff, serial, reuse, place = option
        words = _in_words(option, (had_memeff, had_chunk, reuse_across_windows, where[0]), decode, decode_chunk_size,
                          strength)
        return MemoryPlan(height, width, budget, source, batch_cfg and not serial,
                          reuse if reuse_across_windows else False, ff or had_chunk, memeff, decode, parts["total"],
                          parts, tuple(words), _cost((memeff, ff if ff != had_chunk else None, serial, reuse, place)),
                          place)
    raise AssertionError("the plan with every saving fits, so one of the options does")


def _scaled(height, width, s):
    return max(64, 64 * round(height * s / 64)), max(64, 64 * round(width * s / 64))


def _nothing_fits(pipe, height, width, budget, source, smallest) -> str:
    """The error when no plan fits: the largest size of the same aspect ratio (multiples of 64) that does."""
    fits = lambda s: estimate_memory(pipe, *_scaled(height, width, s), **smallest)["total"] <= budget  # noqa: E731
    low, high = 0.0, 1.0
    for _ in range(7):
        mid = (low + high) / 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    best = "{1}x{0}".format(*_scaled(height, width, low)) if low and fits(low) else None
    least = estimate_memory(pipe, height, width, **smallest)
    where = "free on the device" if source == "free" else "in memory_budget"
    advice = (f"the largest size that fits is {best} (pass height/width)" if best else
              "not even the smallest size fits")
    return (f"{width}x{height} needs about {_size(least['total'])} with every saving, model CPU offload included "
            f"(weights on the device {_size(least['weights'])}), more than the {_size(budget)} {where}: {advice}; "
            "or lower context_length.")
