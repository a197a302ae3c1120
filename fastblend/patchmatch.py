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
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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


def resize_area(x, size):
    """Area (box) downsampling of (B, H, W, C) on its device."""
    if tuple(x.shape[1:3]) == tuple(size):
        return x
    y = F.interpolate(x.permute(0, 3, 1, 2), size=size, mode="area")
    return y.permute(0, 2, 3, 1).contiguous()


def clamp_nnf(nnf, height, width):
    """Clamp match coordinates into the image (after every candidate step)."""
    nnf[..., 0].clamp_(0, height - 1)
    nnf[..., 1].clamp_(0, width - 1)
    return nnf


def identity_nnf(batch, height, width, device):
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
        # pairwise: guide_weight * E_P(guide) + pair style error, the same for both members
        e = self._guide_ssd(nnf, sel, self.tgt) * self.cfg.guide_weight
        if sel is None:
            sel = torch.arange(self.B * self.H * self.W, device=nnf.device)
        hw = self.H * self.W
        partner = sel + torch.where((sel // hw) % 2 == 0, hw, -hw)
        return e + _ssd_rows(self.rows_style, self._idx(nnf, sel), self.rows_style, self._idx(nnf, partner))

    def update(self, nnf, err, cand):
        """Keep a candidate only where its cost is strictly lower. Pixels whose candidate equals the
        current match are skipped: equal cost never wins (not in mean_style, whose target moves)."""
        cand = clamp_nnf(cand, self.H, self.W)
        if self.cfg.cost == "mean_style":
            sel = None
        else:
            changed = (cand != nnf).any(3)
            if self.cfg.cost == "pairwise":  # a pair's cost depends on both members' candidates
                both = changed[0::2] | changed[1::2]
                changed = torch.stack([both, both], 1).view_as(changed)
            sel = changed.view(-1).nonzero().squeeze(1)
            if sel.numel() == 0:
                return
            if 2 * sel.numel() > changed.numel():  # mostly changed: one in-place pass beats two gathers
                sel = None
        # the candidate field at unchanged pixels equals nnf, so mean_style sees the full candidate
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
