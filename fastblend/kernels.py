"""The three FastBlend kernels (FASTBLEND.md, "Kernels"), vectorised in PyTorch.

Layout: images are channel-last float32 tensors (B, H, W, C), zero-padded by `pad` pixels on each
side (pad >= patch_size // 2); an NNF is an int64 tensor (B, H, W, 2) holding, for every pixel of
the target, the ABSOLUTE (row, col) of its match in the unpadded source.

Speed comes from one trick: in a contiguous padded image, the P pixels of one patch row are P*C
contiguous floats, so `_patch_rows` views the image as "one row per pixel, P patch rows of P*C
floats each" without copying, and a whole patch is fetched with one `index_select` row. Pixels are
processed in chunks so the gathered patches stay in cache.
"""

import torch

_CHUNK_FLOATS = {"cpu": 1 << 20, "cuda": 1 << 26}  # floats per gather buffer: cache-sized on CPU


def pad_images(x, pad):
    """Zero-pad (B, H, W, C) by `pad` pixels on both spatial sides (contiguous result)."""
    return torch.nn.functional.pad(x, (0, 0, pad, pad, pad, pad)).contiguous()


def _patch_rows(xp, p):
    """Copy-free view (n, p, p*C) of a contiguous padded image: row i is the p x p patch whose
    top-left pixel is flat pixel i of xp (flat over batch, rows and columns)."""
    B, Hp, Wp, C = xp.shape
    n = B * Hp * Wp - (p - 1) * (Wp + 1)  # last pixel whose patch ends inside the buffer
    return xp.reshape(-1).as_strided((n, p, p * C), (C, Wp * C, 1))


def _flat_top_left(b, y, x, Hp, Wp, pad, r):
    """Flat index (into the padded batch) of the top-left pixel of the patch centred on (y, x)."""
    return (b * Hp + y + (pad - r)) * Wp + x + (pad - r)


def _chunk(device, row_floats):
    return max(1, _CHUNK_FLOATS.get(torch.device(device).type, 1 << 24) // row_floats)


def _ssd_rows(rows_a, idx_a, rows_b, idx_b):
    """sum of squared differences between patch rows_a[idx_a[k]] and rows_b[idx_b[k]], per k.
    rows_b may instead be a (B, H, W, p, p*C) view of the target patches (idx_b None): every pixel
    in order, read in place without a gather."""
    n = idx_a.numel()
    out = torch.empty(n, dtype=rows_a.dtype, device=rows_a.device)
    k = rows_a.shape[1] * rows_a.shape[2]
    step = _chunk(rows_a.device, k)
    if idx_b is None:  # (start, end, target slice): chunks of whole image rows inside one frame
        B, H, W = rows_b.shape[:3]
        rows = max(1, min(H, step // W))
        chunks = [((b * H + y) * W, (b * H + min(y + rows, H)) * W, rows_b[b, y : y + rows])
                  for b in range(B) for y in range(0, H, rows)]
        step = rows * W
    else:
        chunks = [(i, min(i + step, n), None) for i in range(0, n, step)]
    buf_a = torch.empty((min(step, n),) + rows_a.shape[1:], dtype=rows_a.dtype, device=rows_a.device)
    buf_b = torch.empty_like(buf_a) if idx_b is not None else None
    for i, j, tgt in chunks:
        a = torch.index_select(rows_a, 0, idx_a[i:j], out=buf_a[: j - i])
        if tgt is None:
            tgt = torch.index_select(rows_b, 0, idx_b[i:j], out=buf_b[: j - i])
        a.view(tgt.shape).sub_(tgt)
        # ||a - b||^2 through the fused norm reduction (sqrt then square: ~1 ulp)
        torch.linalg.vector_norm(a.view(j - i, k), dim=1, out=out[i:j])
    return out.square_()


def _patch_view(xp, p, pad, H, W):
    """Copy-free view (B, H, W, p, p*C) of the p x p patches centred on each image pixel of the
    padded image xp."""
    B, Hp, Wp, C = xp.shape
    o = pad - p // 2
    s = (Hp * Wp * C, Wp * C, C, Wp * C, 1)
    return xp[:, o:, o:].as_strided((B, H, W, p, p * C), s)


def _pixel_grid(B, H, W, device):
    """(b, y, x) int64 index tensors of shape (B, H, W)."""
    b = torch.arange(B, device=device).view(B, 1, 1).expand(B, H, W)
    y = torch.arange(H, device=device).view(1, H, 1).expand(B, H, W)
    x = torch.arange(W, device=device).view(1, 1, W).expand(B, H, W)
    return b, y, x


def patch_error(source, nnf, target, patch_size, pad):
    """E_P(S, f, T)(x) = sum_d sum_c (T(x+d) - S(f(x)+d))^2 over the P x P offsets d, on the
    zero-padded images, not divided by the patch area. source/target: padded (B, H+2pad, W+2pad, C);
    nnf: (B, H, W, 2). Returns (B, H, W)."""
    B, H, W, _ = nnf.shape
    Hp, Wp = source.shape[1:3]
    r = patch_size // 2
    b, y, x = _pixel_grid(B, H, W, nnf.device)
    src = _flat_top_left(b, nnf[..., 0], nnf[..., 1], Hp, Wp, pad, r).reshape(-1)
    rows_s = _patch_rows(source.contiguous(), patch_size)
    view_t = _patch_view(target.contiguous(), patch_size, pad, H, W)
    return _ssd_rows(rows_s, src, view_t, None).view(B, H, W)


def pairwise_patch_error(source_a, nnf_a, source_b, nnf_b, patch_size, pad):
    """sum_d sum_c (S_a(f_a(x)+d) - S_b(f_b(x)+d))^2 (interpolation's style term). Padded sources,
    NNFs (B, H, W, 2). Returns (B, H, W)."""
    B, H, W, _ = nnf_a.shape
    Hp, Wp = source_a.shape[1:3]
    r = patch_size // 2
    b = _pixel_grid(B, H, W, nnf_a.device)[0]
    ia = _flat_top_left(b, nnf_a[..., 0], nnf_a[..., 1], Hp, Wp, pad, r).reshape(-1)
    ib = _flat_top_left(b, nnf_b[..., 0], nnf_b[..., 1], Hp, Wp, pad, r).reshape(-1)
    rows_a = _patch_rows(source_a.contiguous(), patch_size)
    rows_b = _patch_rows(source_b.contiguous(), patch_size)
    return _ssd_rows(rows_a, ia, rows_b, ib).view(B, H, W)


def with_count_channel(source, pad):
    """Append a channel that is 1 inside the image and 0 in the padding, then a block of all-zero
    pixels (the sink for votes from outside the image, wide enough for any offset d). Returns the
    flat (B*Hp*Wp + sink block, C+1) table."""
    B, Hp, Wp, C = source.shape
    ones = torch.zeros(B, Hp, Wp, 1, dtype=source.dtype, device=source.device)
    ones[:, pad : Hp - pad, pad : Wp - pad] = 1
    table = torch.cat([source, ones], dim=3).reshape(-1, C + 1)
    return torch.cat([table, table.new_zeros(2 * pad * (Wp + 1) + 1, C + 1)])


def remap(source, nnf, patch_size, pad, table=None):
    """Patch voting: out(x) = mean over valid d of S(f(x+d) - d); d is valid when x+d is inside the
    image and f(x+d) - d is inside the image (d = 0 always is). source: padded (B, Hp, Wp, C);
    nnf: (B, H, W, 2). Returns a padded (B, Hp, Wp, C) image with a zero border, like the
    reference's target buffer. `table` is `with_count_channel(source, pad)`, reusable across calls."""
    B, H, W, _ = nnf.shape
    Hp, Wp, C = source.shape[1:]
    p, r = patch_size, patch_size // 2
    table = with_count_channel(source, pad) if table is None else table
    sink = B * Hp * Wp + pad * (Wp + 1)  # centre of the zero block: sink - d stays inside it
    # centre[b, y, x] = flat padded index of f(y, x); the sink outside the image (r-pixel frame)
    b = _pixel_grid(B, H, W, nnf.device)[0]
    centre = torch.full((B, H + 2 * r, W + 2 * r), sink, dtype=torch.int64, device=nnf.device)
    centre[:, r : r + H, r : r + W] = (b * Hp + nnf[..., 0] + pad) * Wp + nnf[..., 1] + pad
    # view (B, H, W, p, p): [b, y, x, i, j] = centre at (y + i - r, x + j - r), i.e. f(x + d)
    s = centre.stride()
    win = centre.as_strided((B, H, W, p, p), (s[0], s[1], s[2], s[1], s[2]))
    dy = torch.arange(-r, r + 1, device=nnf.device)
    minus_d = -(dy.view(p, 1) * Wp + dy.view(1, p))  # flat offset of -d
    out = torch.zeros(B, Hp, Wp, C, dtype=source.dtype, device=source.device)
    rows_per = max(1, min(H, _chunk(source.device, p * p * (C + 1)) // W))
    idx = torch.empty(rows_per, W, p, p, dtype=torch.int64, device=nnf.device)
    buf = torch.empty(rows_per * W * p * p, C + 1, dtype=source.dtype, device=source.device)
    acc = torch.empty(rows_per * W, C + 1, dtype=source.dtype, device=source.device)
    for bi in range(B):
        for y0 in range(0, H, rows_per):
            y1 = min(y0 + rows_per, H)
            n = (y1 - y0) * W
            i = torch.add(win[bi, y0:y1], minus_d, out=idx[: y1 - y0])  # source pixel f(x+d) - d
            g = torch.index_select(table, 0, i.view(-1), out=buf[: n * p * p])
            a = torch.sum(g.view(n, p * p, C + 1), 1, out=acc[:n])  # summed votes and their count
            out[bi, pad + y0 : pad + y1, pad : pad + W] = (a[:, :C] / a[:, C:]).view(y1 - y0, W, C)
    return out
