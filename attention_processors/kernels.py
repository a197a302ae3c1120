"""Exact attention kernels that never hold the full (queries x keys) score matrix.

Layout everywhere in this file: (batch, heads, tokens, head_dim), as in `F.scaled_dot_product_attention`.

- `native`: PyTorch SDPA restricted to its memory-efficient kernels (flash / memory-efficient / cuDNN on
  CUDA, the flash CPU kernel on CPU); raises when none of them accepts the inputs.
- `chunked`: query-chunked exact attention in plain PyTorch; at most `chunk_size` query rows (over batch,
  heads and tokens) are scored at once, so memory is chunk_size x key_tokens, linear in tokens.
- `auto`: `native` where one of its kernels applies, `chunked` otherwise.
- `flash`, `xformers`, `sage`: the optional packages, through diffusers' `dispatch_attention_fn`.
"""

import importlib.util
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("auto", "native", "chunked", "flash", "xformers", "sage")
OPTIONAL_BACKENDS = {  # backend name -> (python module, pip package)
    "flash": ("flash_attn", "flash-attn"),
    "xformers": ("xformers", "xformers"),
    "sage": ("sageattention", "sageattention"),
}
DEFAULT_CHUNK_SIZE = 1024  # query rows per step: 1024 x 36,864 keys x 4 bytes = 151 MB of scores

_native_rejected = set()  # input signatures SDPA's efficient kernels refused once; skip the retry


def check_backend(backend, chunk_size=None):
    """Validate a backend name (and chunk size) early, with the fix in the message."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; use one of {BACKENDS} ('auto' is the safe default)")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int (query rows per step), got {chunk_size!r}")
    if backend in OPTIONAL_BACKENDS:
        module, package = OPTIONAL_BACKENDS[backend]
        if importlib.util.find_spec(module) is None:
            raise ValueError(
                f"attention backend {backend!r} needs the `{package}` package, which is not installed: "
                f"`pip install {package}`, or use backend='auto' (PyTorch's built-in flash / memory-efficient kernels)"
            )
        from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

        try:  # diffusers also checks the version it needs
            _check_attention_backend_requirements(AttentionBackendName(backend))
        except RuntimeError as e:
            raise ValueError(f"attention backend {backend!r} is not usable: {e} Or use backend='auto'.") from None


def attention(q, k, v, attn_mask=None, is_causal=False, scale=None, dropout_p=0.0, backend="auto", chunk_size=None):
    """Exact softmax(q k^T * scale + mask) v with a memory-efficient kernel. q, k, v: (B, H, S, D).

    attn_mask: bool (True = attend) or additive float, broadcastable to (B, H, Sq, Sk).
    is_causal: top-left aligned causal mask, as in SDPA. Returns (B, H, Sq, Dv).
    """
    chunk_size = chunk_size or DEFAULT_CHUNK_SIZE
    if backend == "chunked":
        return chunked_attention(q, k, v, attn_mask, is_causal, scale, dropout_p, chunk_size)
    if backend in ("auto", "native"):
        sig = (q.device.type, q.dtype, q.shape[-1], v.shape[-1], attn_mask is not None, is_causal, dropout_p > 0)
        if backend == "auto" and sig in _native_rejected:
            return chunked_attention(q, k, v, attn_mask, is_causal, scale, dropout_p, chunk_size)
        try:
            return native_attention(q, k, v, attn_mask, is_causal, scale, dropout_p)
        except RuntimeError as e:
            if backend == "native":
                raise ValueError(
                    f"no memory-efficient SDPA kernel accepts these inputs ({e}); use backend='auto' to fall back "
                    "to exact query-chunked attention"
                ) from None
            _native_rejected.add(sig)
            return chunked_attention(q, k, v, attn_mask, is_causal, scale, dropout_p, chunk_size)
    # optional packages: diffusers' dispatcher wants (B, S, H, D)
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    out = dispatch_attention_fn(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, dropout_p=dropout_p,
        is_causal=is_causal, scale=scale, backend=backend,
    )
    return out.transpose(1, 2)


def native_attention(q, k, v, attn_mask=None, is_causal=False, scale=None, dropout_p=0.0):
    """SDPA limited to kernels that do not build the score matrix; RuntimeError when none applies."""
    if q.device.type == "cuda":
        kernels = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    else:
        kernels = [SDPBackend.FLASH_ATTENTION]  # the flash CPU kernel (also the only one on CPU besides MATH)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(q.dtype)  # SDPA wants a bool or a same-dtype mask
    with warnings.catch_warnings():  # SDPA warns per refused kernel before it raises; we report once
        warnings.simplefilter("ignore")
        with sdpa_kernel(kernels):
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
            )


def chunked_attention(q, k, v, attn_mask=None, is_causal=False, scale=None, dropout_p=0.0, chunk_size=None):
    """Exact attention, `chunk_size` query rows at a time (rows counted over batch x heads x tokens)."""
    if dropout_p > 0:
        raise ValueError("chunked attention does not implement dropout; call model.eval() (inference needs none)")
    chunk_size = chunk_size or DEFAULT_CHUNK_SIZE
    B, H, Sq, D = q.shape
    Hk, Sk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    if Hk != H:  # grouped-query attention: share each key/value head
        k, v = k.repeat_interleave(H // Hk, dim=1), v.repeat_interleave(H // Hk, dim=1)
    k, v = k.expand(B, H, Sk, D), v.expand(B, H, Sk, Dv)  # a batch-1 key/value may serve every query batch
    scale = D**-0.5 if scale is None else scale
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype  # softmax in fp32 for half inputs
    qf, kf, vf = (t.reshape(B * H, t.shape[2], t.shape[3]) for t in (q, k, v))  # copies only if not viewable
    mask = None if attn_mask is None else attn_mask.expand(B, H, Sq, Sk)  # a view: nothing materialised
    out = torch.empty(B * H, Sq, Dv, dtype=q.dtype, device=q.device)
    q_step = min(Sq, chunk_size)
    bh_step = max(1, chunk_size // Sq)  # short sequences (motion modules): many heads per step
    for b0 in range(0, B * H, bh_step):
        b1 = min(B * H, b0 + bh_step)
        kc, vc = kf[b0:b1].to(acc), vf[b0:b1].to(acc)
        for i0 in range(0, Sq, q_step):
            i1 = min(Sq, i0 + q_step)
            s = torch.bmm(qf[b0:b1, i0:i1].to(acc), kc.transpose(1, 2)).mul_(scale)  # (bh, rows, Sk)
            if mask is not None:
                idx = torch.arange(b0, b1, device=q.device)
                m = mask[idx // H, idx % H, i0:i1]  # gathers only this chunk's rows
                s = s.masked_fill_(~m, float("-inf")) if m.dtype == torch.bool else s.add_(m.to(acc))
            if is_causal:  # top-left aligned, as SDPA
                rows = torch.arange(i0, i1, device=q.device)[:, None]
                s = s.masked_fill_(rows < torch.arange(Sk, device=q.device)[None, :], float("-inf"))
            out[b0:b1, i0:i1] = torch.bmm(s.softmax(dim=-1), vc).to(q.dtype)
            del s
    return out.view(B, H, Sq, Dv)
