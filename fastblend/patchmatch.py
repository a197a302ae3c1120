"""Guided pyramid PatchMatch (FASTBLEND.md, "PatchMatch schedule").

`patch_match(source_guide, target_guide, source_style, config, generator)` matches every pixel of
each target guide frame to a pixel of its source frame and returns the NNFs and the source style
remapped onto the target. Images are (B, H, W, 3) float32 tensors (0..255) on one device.

Cost kinds: "style" (blend modes: guide SSD * guide_weight + SSD to the style remapped once per
iteration, fused into one 6-channel SSD), "mean_style" (accurate mode: the style target is the
batch mean of the candidate's remap) and "pairwise" (interpolation: batch holds pairs (2k, 2k+1)
matched onto the same target; the style term compares the two sources' patches).
"""

import math
import sys
from dataclasses import dataclass

import numpy as np
import torch

from .kernels import _flat_top_left, _patch_rows, _patch_view, _pixel_grid, _ssd_rows, pad_images, remap, with_count_channel


@dataclass
class MatchConfig:
    minimum_patch_size: int = 5
    num_iter: int = 5
    guide_weight: float = 10.0
    random_search_steps: int = 3
    random_search_range: int = 4
    initialize: str = "identity"
    tracking_window_size: int = 0
    cost: str = "style"  # "style" | "mean_style" | "pairwise"

    @property
    def patch_sizes(self):
        return [self.minimum_patch_size + 2 * i for i in range(self.num_iter)][::-1]

    @property
    def max_patch_size(self):
        return self.minimum_patch_size + 2 * (self.num_iter - 1)


def pyramid_sizes(height, width, max_patch_size):
    """Level sizes, coarsest first: levels = int(log2(min(H, W) / max_p)), level l is H // 2^(L-1-l)."""
    levels = int(math.log2(min(height, width) / max_patch_size))
    if levels < 1:  # the reference crashes here (no level at all)
        raise ValueError(
            f"frames of {height}x{width} are too small for one pyramid level with patches up to "
            f"{max_patch_size} pixels: min(height, width) must be >= 2 * {max_patch_size} = "
            f"{2 * max_patch_size}; use larger frames or a smaller minimum_patch_size / num_iter"
        )
    return [(height >> (levels - 1 - l), width >> (levels - 1 - l)) for l in range(levels)]


def _area_taps(n_in, n_out):
    """INTER_AREA weights along one axis as OpenCV computes them: output cell i covers the source
    span [i*s, i*s + s), s = n_in / n_out, and each source pixel weighs its overlap with the span
    divided by the span's length (overlaps of 1e-3 or less dropped, weights rounded to float32).
    Returns (taps, n_out) source indices (increasing along taps) and their weights (0: no tap)."""
    s = 1 / (n_out / n_in)
    lo = torch.arange(n_out, dtype=torch.float64) * s
    hi, cell = lo + s, (n_in - lo).clamp(max=s)
    first = lo.floor().long()
    idx = first + torch.arange(int((hi.ceil().long() - first).max())).view(-1, 1)
    j = idx.double()
    overlap = torch.minimum(hi, j + 1) - torch.maximum(lo, j)
    weight = torch.where((overlap > 1e-3) & (idx < n_in), overlap / cell, 0).float()
    return idx.clamp(max=n_in - 1), weight


def _area_axis(x, dim, n_out):
    """Weighted sums along `dim`, accumulated tap by tap in float32 as OpenCV does."""
    idx, weight = _area_taps(x.shape[dim], n_out)
    shape = [1] * x.dim()
    shape[dim] = n_out
    out = 0
    for i, w in zip(idx.to(x.device), weight.to(x.device, x.dtype)):
        out = out + x.index_select(dim, i).mul_(w.view(shape))
    return out


def _area_integer(x, ky, kx):
    """OpenCV's INTER_AREA path for integer factors: the ky*kx pixels of a cell summed in row-major
    order, four at a time, then times 1/(ky*kx)."""
    parts = [x[:, i // kx :: ky, i % kx :: kx] for i in range(ky * kx)]
    n4 = len(parts) // 4 * 4
    total = 0
    for g in range(0, n4, 4):
        total = total + (((parts[g] + parts[g + 1]) + parts[g + 2]) + parts[g + 3])
    for part in parts[n4:]:
        total = total + part
    return total * float(np.float32(1) / np.float32(len(parts)))


def resize_area(x, size):
    """Area downsampling of (B, H, W, C) float32 on its device, equal bit for bit to OpenCV's
    cv2.resize(..., interpolation=cv2.INTER_AREA) on each float32 image (what the reference
    runs on the CPU): integer factors through OpenCV's box-sum path, other factors through its
    fractional weights, columns first, then rows."""
    (H, W), (h, w) = x.shape[1:3], size
    if (H, W) == (h, w):
        return x
    if h > H or w > W:
        raise ValueError(f"resize_area only downsamples, got {H}x{W} -> {h}x{w}")
    sy, sx = 1 / (h / H), 1 / (w / W)
    if abs(sy - round(sy)) < sys.float_info.epsilon and abs(sx - round(sx)) < sys.float_info.epsilon:
        return _area_integer(x, round(sy), round(sx)).contiguous()
    return _area_axis(_area_axis(x, 2, w), 1, h).contiguous()


def clamp_nnf(nnf, height, width):
    """Clamp match coordinates into the image (after every candidate step)."""
    nnf[..., 0].clamp_(0, height - 1)
    nnf[..., 1].clamp_(0, width - 1)
    return nnf


def identity_nnf(batch, height, width, device):
    """The identity match. (The reference's is int64 on Linux, which its int32 kernels misread for the
    whole coarsest level: a bug, not kept; see bench/RESULTS.md, notes on the reference.)"""
    b, y, x = _pixel_grid(batch, height, width, device)
    return torch.stack([y, x], dim=3).contiguous()


def upsample_nnf(nnf, height, width):
    """Child (2y+a, 2x+b) -> (2 f_y + a, 2 f_x + b). When the new size is 2h+1 (odd), the last
    row/column takes its parent's last match moved by 2 (the rule extended one pixel), then clamp."""
    h, w = nnf.shape[1:3]
    ys = torch.arange(height, device=nnf.device)
    xs = torch.arange(width, device=nnf.device)
    py, px = (ys // 2).clamp(max=h - 1), (xs // 2).clamp(max=w - 1)
    parent = nnf[:, py][:, :, px]  # (B, height, width, 2)
    off = torch.stack(torch.broadcast_tensors((ys - 2 * py).view(-1, 1), (xs - 2 * px).view(1, -1)), 2)
    return clamp_nnf(parent * 2 + off, height, width).contiguous()


def neighbour_step(nnf, d):
    """Propagation candidate from one of the 4 neighbours: the field shifted by one pixel, the
    coordinate moved by one, edges replicated. d: 0 from above, 1 from left, 2 from below, 3 from right."""
    if d == 0:
        cand = torch.cat([nnf[:, :1], nnf[:, :-1]], 1)
    elif d == 1:
        cand = torch.cat([nnf[:, :, :1], nnf[:, :, :-1]], 2)
    elif d == 2:
        cand = torch.cat([nnf[:, 1:], nnf[:, -1:]], 1)
    else:
        cand = torch.cat([nnf[:, :, 1:], nnf[:, :, -1:]], 2)
    cand[..., d % 2] += 1 if d < 2 else -1
    return cand


def track_step(nnf, d, pairwise):
    """Tracking candidate: the NNF of the batch member d places away (ends replicated); for pairs,
    within the a-members and within the b-members."""
    if pairwise:
        out = torch.empty_like(nnf)
        out[0::2], out[1::2] = track_step(nnf[0::2], d, False), track_step(nnf[1::2], d, False)
        return out
    n = nnf.shape[0]
    idx = (torch.arange(n, device=nnf.device) + d).clamp(0, n - 1)
    return nnf[idx]


class _Level:
    """One pyramid level: padded images and the cost of candidate NNFs (explicit state, no RNG)."""

    def __init__(self, sg, tg, ss, cfg):
        self.cfg = cfg
        self.B, self.H, self.W = sg.shape[:3]
        self.pad = cfg.max_patch_size // 2
        wg = math.sqrt(cfg.guide_weight)  # fused SSD: guide scaled by sqrt(guide_weight)
        self.style = pad_images(ss, self.pad)
        self.table = with_count_channel(self.style, self.pad)
        if cfg.cost == "pairwise":
            self.src = pad_images(sg, self.pad)
            self.tgt_guide = pad_images(tg, self.pad)
        else:
            self.src = torch.cat([pad_images(sg * wg, self.pad), self.style], 3)
            self.tgt_guide = pad_images(tg * wg, self.pad)
        self.Hp, self.Wp = self.src.shape[1:3]
        b, y, x = _pixel_grid(self.B, self.H, self.W, sg.device)
        self.b, self.y, self.x = b.reshape(-1), y.reshape(-1), x.reshape(-1)

    def set_patch(self, p, nnf):
        """Start of an iteration: the patch size and the style remapped once (FASTBLEND.md)."""
        self.p, self.r = p, p // 2
        self.rows_src = _patch_rows(self.src, p)
        if self.cfg.cost == "style":
            self.tgt = torch.cat([self.tgt_guide, remap(self.style, nnf, p, self.pad, self.table)], 3)
        elif self.cfg.cost == "pairwise":
            self.tgt = self.tgt_guide
            self.rows_style = _patch_rows(self.style, p)

    def _idx(self, nnf, sel):
        f = nnf.view(-1, 2) if sel is None else nnf.view(-1, 2)[sel]
        b = self.b if sel is None else self.b[sel]
        return _flat_top_left(b, f[:, 0], f[:, 1], self.Hp, self.Wp, self.pad, self.r)

    def _guide_ssd(self, nnf, sel, tgt):
        """SSD against the target image: in place for all pixels, gathered for a subset."""
        if sel is None:
            return _ssd_rows(self.rows_src, self._idx(nnf, None), _patch_view(tgt, self.p, self.pad, self.H, self.W), None)
        t = _flat_top_left(self.b[sel], self.y[sel], self.x[sel], self.Hp, self.Wp, self.pad, self.r)
        return _ssd_rows(self.rows_src, self._idx(nnf, sel), _patch_rows(tgt, self.p), t)

    def cost(self, nnf, sel):
        """Matching cost of `nnf` at the flat pixel indices `sel` (all pixels when sel is None)."""
        if self.cfg.cost == "mean_style":  # style target = batch mean of this candidate's remap
            hat = remap(self.style, nnf, self.p, self.pad, self.table).mean(0, keepdim=True)
            return self._guide_ssd(nnf, sel, torch.cat([self.tgt_guide, hat.expand_as(self.style)], 3))
        if self.cfg.cost == "style":  # fused 6-channel SSD: guide * sqrt(w) and style
            return self._guide_ssd(nnf, sel, self.tgt)
        # pairwise (all pixels): guide_weight * E_P(guide) + the pair's style error, shared by both
        e = self._guide_ssd(nnf, None, self.tgt).view(self.B // 2, 2, -1) * self.cfg.guide_weight
        f = self._idx(nnf, None).view(self.B // 2, 2, -1)
        pair = _ssd_rows(self.rows_style, f[:, 0].reshape(-1), self.rows_style, f[:, 1].reshape(-1))
        return (e + pair.view(self.B // 2, 1, -1)).view(-1)

    def update(self, nnf, err, cand):
        """Keep a candidate only where its cost is strictly lower. With the style cost, pixels whose
        candidate equals their match are skipped: their stored error is their exact cost, and equal
        cost never wins. The other costs re-score every pixel, as the reference does: the mean-style
        target moves with the candidate field, and a pair's stored error goes stale when one member
        takes its candidate and the other keeps its match (re-scoring then can lower it)."""
        cand = clamp_nnf(cand, self.H, self.W)
        sel = None
        if self.cfg.cost == "style":
            changed = (cand != nnf).any(3).view(-1)
            sel = changed.nonzero().squeeze(1)
            if sel.numel() == 0:
                return
            if 2 * sel.numel() > changed.numel():  # mostly changed: one in-place pass beats two gathers
                sel = None
        e = self.cost(cand, sel)
        if sel is None:
            sel = torch.arange(e.numel(), device=e.device)
        better = e < err.view(-1)[sel]
        win = sel[better]
        nnf.view(-1, 2)[win] = cand.view(-1, 2)[win]
        err.view(-1)[win] = e[better]


def _iterate(level, nnf, cfg, gen):
    """One PatchMatch iteration: propagation (random order), random search, tracking."""
    err = level.cost(nnf, None).view(level.B, level.H, level.W)
    for d in torch.randperm(4, generator=gen, device=gen.device).tolist():
        level.update(nnf, err, neighbour_step(nnf, d))
    rng = cfg.random_search_range
    for _ in range(cfg.random_search_steps):
        step = torch.randint(-rng, rng + 1, nnf.shape, generator=gen, device=gen.device).to(nnf.device)
        level.update(nnf, err, nnf + step)
    for d in range(1, cfg.tracking_window_size + 1):
        level.update(nnf, err, track_step(nnf, d, cfg.cost == "pairwise"))
        level.update(nnf, err, track_step(nnf, -d, cfg.cost == "pairwise"))


def patch_match(source_guide, target_guide, source_style, cfg, gen):
    """Pyramid PatchMatch. Inputs (B, H, W, 3) float32 on one device; gen: a seeded torch.Generator
    on that device. Returns (nnf (B, H, W, 2) int64, remapped style (B, H, W, 3) float32)."""
    B, H, W = source_guide.shape[:3]
    sizes = pyramid_sizes(H, W, cfg.max_patch_size)
    for li, (h, w) in enumerate(sizes):
        if li == 0 and cfg.initialize == "identity":
            nnf = identity_nnf(B, h, w, source_guide.device)
        elif li == 0:  # "random"
            ys = torch.randint(0, h, (B, h, w), generator=gen, device=gen.device)
            xs = torch.randint(0, w, (B, h, w), generator=gen, device=gen.device)
            nnf = torch.stack([ys, xs], 3).to(source_guide.device)
        else:
            nnf = upsample_nnf(nnf, h, w)
        level = _Level(*(resize_area(x, (h, w)) for x in (source_guide, target_guide, source_style)), cfg)
        for p in cfg.patch_sizes:
            level.set_patch(p, nnf)
            _iterate(level, nnf, cfg, gen)
    pad = level.pad
    out = remap(level.style, nnf, cfg.minimum_patch_size, pad, level.table)
    return nnf, out[:, pad : pad + H, pad : pad + W]
