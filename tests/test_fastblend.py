"""fastblend: kernels against a loop-by-loop transcription of the reference kernels, PatchMatch,
the Fenwick-tree bookkeeping, the modes, deflickering on a real photograph, interpolation, errors.

Small frames (64 x 64) and few frames keep the whole file near a minute on 2 CPU cores; torch runs
single-threaded here (restored afterwards) because oversubscribed OpenMP threads on a shared
2-core machine are several times slower than one thread.
"""

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from fastblend import interpolate_video, psnr, sharpness, smooth_video, warping_error
from fastblend.metrics import flickering_footage
from fastblend import modes
from fastblend.kernels import pad_images, pairwise_patch_error, patch_error, remap
from fastblend.patchmatch import MatchConfig, patch_match

skimage_data = pytest.importorskip("skimage.data")




# ---------- literal transcriptions of the reference CUDA kernels (one thread = one pixel) ----------


def loop_patch_error(source, nnf, target, p, pad):
    """patch_error.cu: e = sum over px, py in [-r, r] and c of (target(x+p) - source(f(x)+p))^2."""
    B, H, W = nnf.shape[:3]
    r = (p - 1) // 2
    err = np.zeros((B, H, W))
    for z in range(B):
        for x in range(H):
            for y in range(W):
                x_, y_ = nnf[z, x, y]
                e = 0.0
                for px in range(-r, r + 1):
                    for py in range(-r, r + 1):
                        for c in range(source.shape[3]):
                            diff = float(target[z, x + pad + px, y + pad + py, c]) - float(source[z, x_ + pad + px, y_ + pad + py, c])
                            e += diff * diff
                err[z, x, y] = e
    return err


def loop_pairwise_error(source_a, nnf_a, source_b, nnf_b, p, pad):
    B, H, W = nnf_a.shape[:3]
    r = (p - 1) // 2
    err = np.zeros((B, H, W))
    for z in range(B):
        for x in range(H):
            for y in range(W):
                xa, ya = nnf_a[z, x, y]
                xb, yb = nnf_b[z, x, y]
                e = 0.0
                for px in range(-r, r + 1):
                    for py in range(-r, r + 1):
                        diff = source_a[z, xa + pad + px, ya + pad + py].astype(np.float64) - source_b[z, xb + pad + px, yb + pad + py]
                        e += float((diff * diff).sum())
                err[z, x, y] = e
    return err


def loop_remap(source, nnf, p, pad):
    """remap.cu: target(x) = mean over valid p of source(f(x+p) - p), zero outside the image."""
    B, H, W = nnf.shape[:3]
    r = (p - 1) // 2
    target = np.zeros(source.shape, dtype=np.float64)
    for z in range(B):
        for x in range(H):
            for y in range(W):
                num = 0
                for px in range(max(-x, -r), min(H - 1 - x, r) + 1):
                    for py in range(max(-y, -r), min(W - 1 - y, r) + 1):
                        x_ = nnf[z, x + px, y + py, 0] - px
                        y_ = nnf[z, x + px, y + py, 1] - py
                        if x_ < 0 or y_ < 0 or x_ >= H or y_ >= W:
                            continue
                        num += 1
                        target[z, x + pad, y + pad] += source[z, x_ + pad, y_ + pad]
                target[z, x + pad, y + pad] /= num
    return target


def random_case(seed, B, H, W, C, integer=False):
    rng = np.random.default_rng(seed)
    img = lambda: rng.integers(0, 256, (B, H, W, C)).astype(np.float32) if integer else rng.uniform(0, 255, (B, H, W, C)).astype(np.float32)
    nnf = np.stack([rng.integers(0, H, (B, H, W)), rng.integers(0, W, (B, H, W))], 3)
    return img(), img(), nnf


SHAPES = [(3, (1, 7, 11, 3)), (5, (2, 9, 6, 6)), (7, (1, 13, 10, 3)), (9, (2, 5, 12, 3)), (11, (1, 8, 9, 6)), (13, (1, 11, 7, 3))]


@pytest.mark.parametrize("p, shape", SHAPES)
def test_patch_error_matches_loop_reference(p, shape):
    src, tgt, nnf = random_case(p, *shape)
    pad = p // 2 + 1  # a level's pad is max_patch_size // 2, larger than this patch's radius
    sp, tp = pad_images(torch.from_numpy(src), pad), pad_images(torch.from_numpy(tgt), pad)
    ours = patch_error(sp, torch.from_numpy(nnf), tp, p, pad).numpy()
    ref = loop_patch_error(sp.numpy(), nnf, tp.numpy(), p, pad)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("p, shape", SHAPES)
def test_pairwise_patch_error_matches_loop_reference(p, shape):
    a, b, nnf_a = random_case(p + 100, *shape)
    nnf_b = random_case(p + 200, *shape)[2]
    pad = p // 2
    ap, bp = pad_images(torch.from_numpy(a), pad), pad_images(torch.from_numpy(b), pad)
    ours = pairwise_patch_error(ap, torch.from_numpy(nnf_a), bp, torch.from_numpy(nnf_b), p, pad).numpy()
    ref = loop_pairwise_error(ap.numpy(), nnf_a, bp.numpy(), nnf_b, p, pad)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("p, shape", SHAPES)
def test_remap_matches_loop_reference(p, shape):
    # integer-valued pixels: every vote sum is exact in float32, so both sides must agree bit for bit
    src, _, nnf = random_case(p + 300, *shape, integer=True)
    pad = p // 2 + 2
    sp = pad_images(torch.from_numpy(src), pad)
    ours = remap(sp, torch.from_numpy(nnf), p, pad).numpy()
    ref = loop_remap(sp.numpy(), nnf, p, pad).astype(np.float32)
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)
    # real-valued pixels: the same up to float32 summation order
    src = random_case(p + 400, *shape)[0]
    sp = pad_images(torch.from_numpy(src), pad)
    np.testing.assert_allclose(remap(sp, torch.from_numpy(nnf), p, pad).numpy(), loop_remap(sp.numpy(), nnf, p, pad), rtol=1e-5, atol=1e-4)


def test_remap_identity_nnf_is_exact_copy():
    # integer pixel values (uint8 frames): the vote sum n * v is exact, so n * v / n == v
    src = random_case(7, 2, 12, 10, 3, integer=True)[0]
    yy, xx = np.meshgrid(np.arange(12), np.arange(10), indexing="ij")
    nnf = np.broadcast_to(np.stack([yy, xx], 2), (2, 12, 10, 2)).copy()
    out = remap(pad_images(torch.from_numpy(src), 3), torch.from_numpy(nnf), 5, 3)[:, 3:-3, 3:-3]
    np.testing.assert_array_equal(out.numpy(), src)


# ---------- PatchMatch ----------


def textured(size, seed=0):
    """A real photograph crop (with its own texture) resized to size x size."""
    photo = skimage_data.astronaut()[40:360, 120:440]
    return cv2.resize(photo, (size, size), interpolation=cv2.INTER_AREA)


def translated(dy, dx, size=64):
    big = textured(size + 16)
    src = big[8 : 8 + size, 8 : 8 + size]
    tgt = big[8 + dy : 8 + size + dy, 8 + dx : 8 + size + dx]  # tgt(x) = src(x + (dy, dx))
    return src, tgt


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_patch_match_recovers_translation(seed):
    """An even shift is exact at the coarse level (half the shift) and the pyramid's upsampling
    rule carries it to full resolution, so every pixel away from the borders must be exact."""
    dy, dx = 4, -6
    src, tgt = translated(dy, dx)
    f = lambda a: torch.from_numpy(np.ascontiguousarray(a)).float()[None]
    nnf, out = patch_match(f(src), f(tgt), f(src), MatchConfig(), torch.Generator().manual_seed(seed))
    nnf = nnf[0].numpy()
    yy, xx = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    m = 10  # away from the borders: the shift plus the largest patch radius
    inner = (slice(m, 64 - m), slice(m, 64 - m))
    assert (nnf[..., 0][inner] == yy[inner] + dy).all()
    assert (nnf[..., 1][inner] == xx[inner] + dx).all()
    # the remapped style is the target exactly where every vote (radius 2) comes from that region
    core = (slice(m + 2, 62 - m), slice(m + 2, 62 - m))
    np.testing.assert_array_equal(out[0].numpy()[core], tgt[core].astype(np.float32))


@pytest.mark.parametrize("size", [(10, 12), (11, 13)])
def test_upsample_nnf_rule(size):
    """Child (2y+a, 2x+b) -> (2 f_y + a, 2 f_x + b) (the reference's intended rule); an odd new size
    takes the last parent with offset 2; clamped into the new image. Checked pixel by pixel."""
    from fastblend.patchmatch import upsample_nnf

    H, W = size
    h, w = H // 2, W // 2
    rng = np.random.default_rng(1)
    f = np.stack([rng.integers(0, h, (2, h, w)), rng.integers(0, w, (2, h, w))], 3)
    got = upsample_nnf(torch.from_numpy(f), H, W).numpy()
    for b in range(2):
        for y in range(H):
            for x in range(W):
                py, px = min(y // 2, h - 1), min(x // 2, w - 1)
                want = (min(2 * f[b, py, px, 0] + y - 2 * py, H - 1), min(2 * f[b, py, px, 1] + x - 2 * px, W - 1))
                assert tuple(got[b, y, x]) == want


def test_patch_match_odd_translation_nearly_everywhere():
    """An odd shift is half a pixel off at the coarse level, so the full-resolution level must fix
    every pixel by itself, and the reference schedule (one iteration per patch size, propagation one
    pixel per step, 3 random tries) leaves a few small islands unconverged: >= 99% exact inside."""
    dy, dx = 3, -5
    src, tgt = translated(dy, dx)
    f = lambda a: torch.from_numpy(np.ascontiguousarray(a)).float()[None]
    nnf = patch_match(f(src), f(tgt), f(src), MatchConfig(), torch.Generator().manual_seed(0))[0][0].numpy()
    yy, xx = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    ok = (nnf[..., 0] == yy + dy) & (nnf[..., 1] == xx + dx)
    assert ok[10:54, 10:54].mean() >= 0.99


def test_patch_match_is_seeded():
    a, b = textured(64), np.roll(textured(64), 3, axis=1)
    f = lambda x: torch.from_numpy(np.ascontiguousarray(x)).float()[None]
    run = lambda: patch_match(f(a), f(b), f(a), MatchConfig(), torch.Generator().manual_seed(5))[0]
    assert torch.equal(run(), run())


# ---------- the reference's PatchMatch driver, transcribed (PatchMatcher.estimate_nnf, one level) ----------


def ref_patch_error(source, nnf, target, p, pad):
    """patch_error.cu vectorised over pixels: every pixel scored, offsets summed in kernel order."""
    B, H, W = nnf.shape[:3]
    b, x, y = np.ogrid[:B, :H, :W]
    e = np.zeros((B, H, W))
    for px in range(-(p // 2), p // 2 + 1):
        for py in range(-(p // 2), p // 2 + 1):
            d = target[b, x + pad + px, y + pad + py] - source[b, nnf[..., 0] + pad + px, nnf[..., 1] + pad + py]
            e += (d * d).sum(-1)
    return e


def ref_pairwise_error(source_a, nnf_a, source_b, nnf_b, p, pad):
    """pairwise_patch_error.cu vectorised over pixels."""
    b = np.arange(nnf_a.shape[0])[:, None, None]
    e = np.zeros(nnf_a.shape[:3])
    for px in range(-(p // 2), p // 2 + 1):
        for py in range(-(p // 2), p // 2 + 1):
            d = (source_a[b, nnf_a[..., 0] + pad + px, nnf_a[..., 1] + pad + py]
                 - source_b[b, nnf_b[..., 0] + pad + px, nnf_b[..., 1] + pad + py])
            e += (d * d).sum(-1)
    return e


def ref_level_pairwise(sg, tg, ss, nnf, cfg, gen):
    """The reference's one-level PatchMatch with use_pairwise_patch_error: per patch size, the error
    of every pixel; propagation in random order, random search, tracking; each `update` scores EVERY
    pixel's candidate (guide error * guide_weight + the pair's style error, repeated for both
    members) and keeps it where strictly lower. Random draws in the same order as ours."""
    B, H, W = nnf.shape[:3]
    pad = cfg.max_patch_size // 2
    sg, tg, ss = (np.pad(a, ((0, 0), (pad, pad), (pad, pad), (0, 0))) for a in (sg, tg, ss))
    nnf = nnf.copy()
    clamp = lambda f: np.stack([f[..., 0].clip(0, H - 1), f[..., 1].clip(0, W - 1)], 3)
    shift = lambda f, d: f[np.clip(np.arange(f.shape[0]) + d, 0, f.shape[0] - 1)]
    for p in cfg.patch_sizes:
        def error(f):
            pair = ref_pairwise_error(ss[0::2], f[0::2], ss[1::2], f[1::2], p, pad).repeat(2, axis=0)
            return ref_patch_error(sg, f, tg, p, pad) * cfg.guide_weight + pair

        def update(cand):
            e = error(cand)
            better = e < err
            nnf[better], err[better] = cand[better], e[better]

        err = error(nnf)
        for d in torch.randperm(4, generator=gen).tolist():  # neighbour steps, edges replicated
            axis, n = 1 + d % 2, nnf.shape[1 + d % 2]
            keep = [0] + list(range(n - 1)) if d < 2 else list(range(1, n)) + [n - 1]
            cand = np.take(nnf, keep, axis=axis)
            cand[..., d % 2] += 1 if d < 2 else -1
            update(clamp(cand))
        for _ in range(cfg.random_search_steps):
            r = cfg.random_search_range
            update(clamp(nnf + torch.randint(-r, r + 1, nnf.shape, generator=gen).numpy()))
        for d in range(1, cfg.tracking_window_size + 1):
            for dd in (d, -d):
                cand = np.empty_like(nnf)
                cand[0::2], cand[1::2] = shift(nnf[0::2], dd), shift(nnf[1::2], dd)
                update(cand)
    return nnf


def test_pairwise_driver_matches_reference_transcription():
    """Interpolation's pairwise cost: a pair member may take its candidate while the other keeps its
    match, so a stored error can be stale; the reference re-scores every pixel at every update and
    so can lower it. Ours must give the same NNFs (float64 on both sides: no rounding ties; before
    the fix, 1 to 39 of 2304 pixels differed per case)."""
    from fastblend.patchmatch import _iterate, _Level

    src, tgt, nnf = random_case(5, 1, 9, 10, 3)  # the vectorised transcriptions equal the loop ones
    sp, tp = (np.pad(a.astype(np.float64), ((0, 0), (3, 3), (3, 3), (0, 0))) for a in (src, tgt))
    np.testing.assert_allclose(ref_patch_error(sp, nnf, tp, 5, 3), loop_patch_error(sp, nnf, tp, 5, 3), rtol=1e-12)
    nnf_b = random_case(6, 1, 9, 10, 3)[2]
    np.testing.assert_allclose(ref_pairwise_error(sp, nnf, tp, nnf_b, 7, 3), loop_pairwise_error(sp, nnf, tp, nnf_b, 7, 3), rtol=1e-12)

    cfg = MatchConfig(minimum_patch_size=5, num_iter=3, cost="pairwise", tracking_window_size=1)
    B, H, W = 4, 24, 24  # two pairs
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[:H, :W]
        base = np.stack([100 + 80 * np.sin(yy / 4 + c + seed) * np.cos(xx / 3) for c in range(3)], 2)
        sg, tg = (base + rng.normal(0, 10, (B, H, W, 3)) for _ in range(2))
        ss = base[::-1] + rng.normal(0, 30, (B, H, W, 3))
        nnf0 = np.stack([rng.integers(0, H, (B, H, W)), rng.integers(0, W, (B, H, W))], 3)
        want = ref_level_pairwise(sg, tg, ss, nnf0, cfg, torch.Generator().manual_seed(seed))
        level = _Level(*(torch.from_numpy(np.ascontiguousarray(a)) for a in (sg, tg, ss)), cfg)
        nnf, gen = torch.from_numpy(nnf0.copy()), torch.Generator().manual_seed(seed)
        for p in cfg.patch_sizes:
            level.set_patch(p, nnf)
            _iterate(level, nnf, cfg, gen)
        wrong = int((nnf.numpy() != want).any(3).sum())
        assert wrong == 0, f"seed {seed}: {wrong} of {B * H * W} matches differ from the reference driver"


@pytest.mark.parametrize("H, W", [(67, 67), (33, 90), (221, 130), (1080 // 8 + 1, 64), (64, 96)])
def test_pyramid_downsampling_equals_opencv_inter_area(H, W):
    """The reference resizes every level from the full frame with cv2.resize(INTER_AREA) on float32
    images; ours must give the same floats bit for bit at every pyramid size (fractional factors such
    as 67 -> 33, integer factors, mixed), on smooth and noisy, integer- and real-valued content."""
    from fastblend.patchmatch import pyramid_sizes, resize_area

    rng = np.random.default_rng(H * W)
    yy, xx = np.mgrid[:H, :W]
    smooth = np.stack([127 + 120 * np.sin(yy / 7 + c) * np.cos(xx / 5) for c in range(3)], 2)
    images = np.stack([smooth, rng.integers(0, 256, (H, W, 3)), rng.uniform(0, 255, (H, W, 3))]).astype(np.float32)
    sizes = pyramid_sizes(H, W, 5) + [(H // 3, W // 3), (H // 2, W), (H - 1, W - 1)]
    for h, w in sizes:
        want = np.stack([cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA) for img in images])
        got = resize_area(torch.from_numpy(images), (h, w)).numpy()
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want, err_msg=f"{H}x{W} -> {h}x{w}")


# ---------- Fenwick-tree bookkeeping with an exact stand-in for matching ----------


def test_fast_mode_tree_is_the_window_mean_when_remap_is_identity():
    """With matching replaced by the identity (the style returned as is), every node is the exact
    mean of its frames, so the fast mode must equal the plain mean over [t-W, t+W] for every t,
    and it must run exactly the number of matches it announces."""
    rng = np.random.default_rng(0)
    for n, window in [(1, 3), (2, 1), (7, 2), (23, 5), (40, 15)]:
        style = rng.uniform(0, 255, (n, 2, 3, 3))
        calls = []

        def match(items):
            calls.append(len(items))
            return [s.clone() for _, _, s in items]

        load = lambda i: torch.from_numpy(style[i])
        got = dict(modes.fast(load, load, n, window, 4, match))
        for t in range(n):
            want = style[max(t - window, 0) : t + window + 1].mean(0)
            np.testing.assert_allclose(got[t].numpy(), want, rtol=1e-9, atol=1e-9)
        assert sum(calls) == modes.fast_match_count(n, window)
        assert all(c <= 4 for c in calls)


def test_balanced_mode_is_the_full_window_mean():
    """Balanced mode's output is the mean of style_t and every other window frame remapped onto t.
    The reference keeps a running mean per target and saves the mean from BEFORE it adds the last
    neighbour (a bug); transcribed here to measure what that fix changes. With remapping replaced by
    the identity, ours must equal the full mean, and the reference's saved frame must differ by many
    grey levels on flickering footage (measured with real PatchMatch in bench/RESULTS.md)."""
    n, window = 12, 3
    style = flickering_footage(n, 32)[2]
    calls = []

    def match(items):
        calls.append([s.clone() for _, _, s in items])
        return calls[-1]

    load = lambda i: torch.from_numpy(style[i]).double()
    ours = {t: img.numpy() for t, img in modes.balanced(load, load, n, window, 5, match)}
    # the reference's runner over the same results in the same task order (target, then source)
    results = iter(img.numpy() for out in calls for img in out)
    state, saved = {}, {}
    for t in range(n):
        for s in range(t - window, t + window + 1):
            if 0 <= s < n and s != t:
                frame, weight = state.get(t, (style[t], 1))
                state[t] = (frame * (weight / (weight + 1)) + next(results) / (weight + 1), weight + 1)
                if weight + 1 == min(n, t + window + 1) - max(0, t - window):
                    saved[t] = frame  # the reference writes this: the mean before the last neighbour
    for t in range(n):
        full = style[max(t - window, 0) : t + window + 1].astype(np.float64).mean(0)
        np.testing.assert_allclose(ours[t], full, rtol=0, atol=1e-9)
        np.testing.assert_allclose(state[t][0], full, rtol=0, atol=1e-9)  # its running mean is right...
    off = np.stack([np.abs(saved[t].clip(0, 255).astype(np.uint8).astype(int) - ours[t].astype(np.uint8)) for t in range(n)])
    print(f"\nreference's balanced output vs the full mean (identity remap, W={window}): max {off.max()} levels, mean {off.mean():.2f}")
    assert off.max() >= 10  # ...but what it saves is not

def test_tree_query_covers_window_exactly():
    for lo, hi in [(0, 0), (0, 10), (3, 17), (20, 35), (5, 5)]:
        covered = []
        for j, level in modes.tree_query(lo, hi):
            assert (j + 1) % (1 << level) == 0  # the low `level` bits of j are all 1
            covered += list(range(j - (1 << level) + 1, j + 1))
        assert sorted(covered) == list(range(lo, hi + 1))


# ---------- real footage: a photograph panned and zoomed ----------


@pytest.fixture(scope="module")
def footage():
    return flickering_footage(24, 64)


def test_deflicker_real_footage(footage):
    guide, clean, style = footage
    out = smooth_video(style, guide, mode="fast", window_size=6, progress=False)
    assert out.shape == style.shape and out.dtype == np.uint8
    we = {name: warping_error(v, guide) for name, v in [("guide", guide), ("clean", clean), ("input", style), ("output", out)]}
    fid = {"input": psnr(style, clean), "output": psnr(out, clean)}
    print(f"\nwarping error {we}; PSNR to clean style {fid}; sharpness clean {sharpness(clean):.0f} output {sharpness(out):.0f}")
    assert we["output"] * 10 <= we["input"]
    assert fid["output"] >= fid["input"] + 3  # closer to the clean style than the flickering input


def test_fast_mode_close_to_balanced(footage):
    """Fast remaps each Fenwick node's BLENDED image onto t as one image instead of every frame
    separately: that second patch vote smooths a little more, and the random candidates differ.
    Measured: 1.95 grey levels mean |diff|, 36.4 dB. Tolerance: <= 3 grey levels on average and
    >= 33 dB between the two, and at least 10 dB closer to each other than to the flickering input
    (a wrong tree weight or a missing node costs far more than that)."""
    guide, clean, style = (x[:10] for x in footage)
    fast = smooth_video(style, guide, mode="fast", window_size=3, progress=False)
    balanced = smooth_video(style, guide, mode="balanced", window_size=3, progress=False)
    diff = np.abs(fast.astype(np.float64) - balanced).mean()
    print(f"\nfast vs balanced: mean |diff| {diff:.3f}, PSNR {psnr(fast, balanced):.2f} dB; balanced vs input {psnr(balanced, style):.2f} dB")
    assert diff <= 3
    assert psnr(fast, balanced) >= 33
    assert psnr(fast, balanced) >= psnr(balanced, style) + 10


def test_accurate_mode_deflickers(footage):
    guide, clean, style = (x[:6] for x in footage)
    out = smooth_video(style, guide, mode="accurate", window_size=2, batch_size=5, progress=False)
    assert warping_error(out, guide) * 3 <= warping_error(style, guide)
    assert psnr(out, clean) >= psnr(style, clean) + 3


def test_interpolation_between_two_keyframes(footage):
    guide, clean, _ = (x[:10] for x in footage)
    out = interpolate_video(guide, {0: clean[0], 9: clean[9]}, progress=False)
    # keyframes reproduced: the last exactly (matched from itself, zero cost can't be beaten), the
    # first nearly (its pair's style term may move a few low-texture pixels)
    np.testing.assert_array_equal(out[9], clean[9])
    assert psnr(out[0], clean[0]) >= 40
    # in between: each frame close to the true style of that frame, far closer than a cross-fade
    scores = [psnr(out[m], clean[m]) for m in range(10)]
    fade = [psnr(np.clip(clean[0] * (1 - m / 9) + clean[9] * (m / 9), 0, 255).astype(np.uint8), clean[m]) for m in range(10)]
    print(f"\ninterpolation PSNR per frame {np.round(scores, 1)}; cross-fade {np.round(fade, 1)}")
    assert min(scores) >= 20
    assert np.mean(scores[1:9]) >= np.mean(fade[1:9]) + 5
    # smooth motion: no more flicker than the true style video has
    assert warping_error(out, guide) <= 1.5 * warping_error(clean[:10], guide)


def test_single_keyframe_interpolation(footage):
    guide, clean, _ = (x[:4] for x in footage)
    out = interpolate_video(list(guide), [clean[1]], keyframe_indices=[1], minimum_patch_size=7, progress=False)
    assert isinstance(out, list) and len(out) == 4
    np.testing.assert_array_equal(out[1], clean[1])
    assert min(psnr(out[m], clean[m]) for m in range(4)) >= 22


# ---------- API forms and bad input ----------


SMALL = dict(window_size=1, minimum_patch_size=3, num_iter=2, progress=False)  # max patch 5: 32 px gives 2 levels


def test_output_form_follows_input_and_is_seeded():
    from PIL import Image

    guide, _, style = flickering_footage(3, 32)
    arr = smooth_video(style, guide, **SMALL)
    assert isinstance(arr, np.ndarray) and arr.shape == (3, 32, 32, 3) and arr.dtype == np.uint8
    pil = smooth_video([Image.fromarray(s) for s in style], [Image.fromarray(g) for g in guide], **SMALL)
    assert isinstance(pil, list) and all(isinstance(p, Image.Image) for p in pil)
    np.testing.assert_array_equal(np.stack([np.asarray(p) for p in pil]), arr)  # same seed, same result
    before = torch.get_num_threads()
    lst = smooth_video(list(style), list(guide), **SMALL, num_threads=2)
    assert torch.get_num_threads() == before  # the thread count is restored
    assert isinstance(lst, list) and all(isinstance(f, np.ndarray) for f in lst)


def test_bad_input_raises_clear_errors():
    g = np.zeros((4, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="4 style frames but 3 guide"):
        smooth_video(g, g[:3], **SMALL)
    with pytest.raises(ValueError, match="sizes differ"):
        smooth_video([g[0], g[1][:, :16]], [g[0], g[1]], **SMALL)
    with pytest.raises(ValueError, match="style frames are"):
        smooth_video(g[:, :, :30], g, **SMALL)
    with pytest.raises(ValueError, match="window_size"):
        smooth_video(g, g, **{**SMALL, "window_size": 0})
    with pytest.raises(ValueError, match="too small for one pyramid level"):
        smooth_video(g[:, :20, :20], g[:, :20, :20], mode="fast")  # 20 < 2 * 13: no level
    with pytest.raises(ValueError, match="odd"):
        smooth_video(g, g, **{**SMALL, "minimum_patch_size": 4})
    with pytest.raises(ValueError, match="mode"):
        smooth_video(g, g, **{**SMALL, "mode": "turbo"})
    with pytest.raises(ValueError, match="uint8"):
        smooth_video(g.astype(np.float32), g, **SMALL)
    with pytest.raises(ValueError, match="out of range"):
        interpolate_video(g, {4: g[0]}, minimum_patch_size=3, num_iter=2, progress=False)
    with pytest.raises(ValueError, match="out of range"):
        interpolate_video(g, [g[0]], keyframe_indices=[-1], minimum_patch_size=3, num_iter=2, progress=False)
    with pytest.raises(ValueError, match="too small"):
        interpolate_video(np.zeros((4, 40, 40, 3), np.uint8), {0: np.zeros((40, 40, 3), np.uint8)}, progress=False)  # 40 < 2 * 23



def test_out_array_receives_the_same_frames(tmp_path):
    """out= (e.g. a memmap): the same frames as the normal return value, written into the caller's
    array, which is returned; memmapped inputs give the same result as in-memory ones."""
    guide, _, style = flickering_footage(3, 32)
    want = smooth_video(style, guide, **SMALL)
    out = np.zeros_like(style)
    assert smooth_video(style, guide, **SMALL, out=out) is out
    np.testing.assert_array_equal(out, want)
    for name, frames in [("guide", guide), ("style", style)]:
        np.save(tmp_path / f"{name}.npy", frames)
    mapped = [np.load(tmp_path / f"{name}.npy", mmap_mode="r") for name in ("style", "guide")]
    out = np.lib.format.open_memmap(tmp_path / "out.npy", mode="w+", dtype=np.uint8, shape=style.shape)
    assert smooth_video(*mapped, **SMALL, out=out) is out
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), want)
    keys = {0: style[0], 2: style[2]}
    kw = dict(minimum_patch_size=3, num_iter=2, progress=False)
    out = np.zeros_like(guide)
    np.testing.assert_array_equal(interpolate_video(guide, keys, **kw, out=out), interpolate_video(guide, keys, **kw))
    with pytest.raises(ValueError, match="out must be a uint8 array of shape"):
        smooth_video(style, guide, **SMALL, out=np.zeros((3, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="out must be a uint8 array of shape"):
        smooth_video(style, guide, **SMALL, out=np.zeros((2, 32, 32, 3), np.uint8))


def test_out_array_keeps_memory_flat_in_the_video_length(tmp_path, monkeypatch):
    """Memmapped inputs read frame by frame and out= written frame by frame: the heap's peak must
    not grow with the number of frames. Live heap = glibc's mallinfo2 (torch's and numpy's CPU
    buffers come from malloc), sampled at every match and every frame written; PatchMatch replaced
    by the identity so only the streaming machinery runs. Control: without out= the outputs are
    kept (N uint8 frames), which this measurement must see."""
    import ctypes
    import ctypes.util
    import fastblend.api as api

    class MallInfo2(ctypes.Structure):
        _fields_ = [(f, ctypes.c_size_t) for f in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    libc.mallinfo2.restype = MallInfo2
    peak = [0]

    def live():  # bytes malloc has handed out and not got back: arena chunks + mmapped blocks
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd

    def sample():
        peak[0] = max(peak[0], live())

    def identity_match(sg, tg, ss, cfg, gen):
        sample()
        return None, ss.clone()

    class Writer:  # an array-like out that samples the heap at every frame written
        def __init__(self, array):
            self.array, self.shape, self.dtype = array, array.shape, array.dtype

        def __setitem__(self, i, frame):
            sample()
            self.array[i] = frame

    monkeypatch.setattr(api, "patch_match", identity_match)
    size, frame = 64, 64 * 64 * 3 * 4  # bytes of one float frame
    kw = dict(window_size=2, batch_size=4, minimum_patch_size=3, num_iter=2, progress=False)

    def growth(n, mode, use_out):
        path = tmp_path / f"in-{n}.npy"
        if not path.exists():
            a = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
            a[:] = np.random.default_rng(n).integers(0, 256, a.shape, dtype=np.uint8)
            a.flush()
            del a
        video = np.load(path, mmap_mode="r")
        out = Writer(np.lib.format.open_memmap(tmp_path / "out.npy", mode="w+", dtype=np.uint8, shape=video.shape)) if use_out else None
        peak[0] = base = live()
        result = smooth_video(video, video, mode=mode, **kw, out=out)
        sample()
        del result
        return (peak[0] - base) / frame

    flat = {}
    for mode in ("fast", "balanced"):
        short, flat[mode] = growth(100, mode, True), growth(400, mode, True)
        print(f"\n{mode}: heap peak growth with out= {short:.1f} float frames at 100 frames, {flat[mode]:.1f} at 400")
        assert flat[mode] - short < 10  # flat in the length (400 float frames would be 400)
        assert flat[mode] < 100
    kept = growth(400, "fast", False)
    print(f"fast without out=: {kept:.1f} float frames at 400 frames")
    assert kept - flat["fast"] > 50  # the N uint8 outputs (400 frames = 100 float frames) are seen

def test_command_line_on_frame_folders(tmp_path):
    from PIL import Image

    guide, _, style = flickering_footage(3, 32)
    for name, frames in [("guide", guide), ("style", style)]:
        (tmp_path / name).mkdir()
        for i, f in enumerate(frames):
            Image.fromarray(f).save(tmp_path / name / f"{i:05d}.png")
    cmd = [sys.executable, "-m", "fastblend", "blend", "--guide", str(tmp_path / "guide"), "--style", str(tmp_path / "style"),
           "--output", str(tmp_path / "out"), "--window", "1", "--minimum-patch-size", "3", "--num-iter", "2", "--device", "cpu"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=root)
    out = np.stack([np.asarray(Image.open(tmp_path / "out" / f"{i:05d}.png")) for i in range(3)])
    np.testing.assert_array_equal(out, smooth_video(style, guide, **SMALL))
    bad = subprocess.run(cmd[:-4] + ["--window", "0"], capture_output=True, text=True, env=env, cwd=root)
    assert bad.returncode == 2 and "window_size" in bad.stderr
