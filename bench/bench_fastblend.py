"""FastBlend benchmark: kernel and match throughput against a plain baseline, fast-mode memory, and
the warping-error table on a real photograph panned and zoomed.

    python bench/bench_fastblend.py --threads 1   # everything (about 6 minutes on a busy 2-core CPU)
    python bench/bench_fastblend.py --quick    # smaller clips

The baseline is the loop-by-loop transcription of the reference kernels vectorised only over pixels:
one gather per patch offset (P^2 gathers of C floats per evaluation), evaluating every pixel. It
runs inside the same PatchMatch driver (monkeypatched in), so the ratio is the kernels' gain plus,
for the style cost, the driver's skipping of unchanged candidates, which the baseline kernels do not
exploit. `--part resize` compares the pyramid downsampling with cv2 INTER_AREA (what the reference
runs), `--part balanced` measures the reference's balanced-mode bug (last neighbour left out).
"""

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

import fastblend.patchmatch as pm
from fastblend import interpolate_video, psnr, sharpness, smooth_video, warping_error
from fastblend.kernels import pad_images, patch_error, remap
from fastblend.metrics import flickering_footage
from fastblend.patchmatch import MatchConfig, patch_match


# ---------------- baseline kernels: one gather per patch offset ----------------


def _pixel_table(v):
    """The whole padded image behind a row view / patch view, as (pixels, C)."""
    C = v.stride(0) if v.dim() == 3 else v.stride(2)
    n = v.untyped_storage().nbytes() // v.element_size()
    return torch.as_strided(v, (n // C, C), (C, 1), storage_offset=0)


def baseline_ssd_rows(rows_a, idx_a, rows_b, idx_b):
    """Same contract as fastblend.kernels._ssd_rows, computed offset by offset."""
    p, C = rows_a.shape[1], rows_a.stride(0)
    wp = rows_a.stride(1) // C
    ta = _pixel_table(rows_a)
    if idx_b is None:  # patch view (B, H, W, p, p*C): top-left pixel index of every pixel
        B, H, W = rows_b.shape[:3]
        s = [x // C for x in rows_b.stride()[:3]]
        b, y, x = torch.meshgrid(torch.arange(B), torch.arange(H), torch.arange(W), indexing="ij")
        idx_b = (rows_b.storage_offset() // C + b * s[0] + y * s[1] + x * s[2]).reshape(-1)
    tb = _pixel_table(rows_b)
    err = torch.zeros(idx_a.numel())
    for dy in range(p):
        for dx in range(p):
            off = dy * wp + dx
            d = ta[idx_a + off] - tb[idx_b + off]
            err += (d * d).sum(1)
    return err


def baseline_remap(source, nnf, patch_size, pad, table=None):
    """Same contract as fastblend.kernels.remap, computed offset by offset."""
    B, H, W, _ = nnf.shape
    Hp, Wp, C = source.shape[1:]
    r = patch_size // 2
    flat = source.reshape(-1, C)
    acc = torch.zeros(B, H, W, C)
    num = torch.zeros(B, H, W, 1)
    b = torch.arange(B).view(B, 1, 1)
    ys, xs = torch.arange(H).view(1, H, 1), torch.arange(W).view(1, 1, W)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            yn, xn = (ys + dy).clamp(0, H - 1), (xs + dx).clamp(0, W - 1)
            f = nnf[b, yn, xn]  # f(x + d) (clamped where x + d is outside; masked below)
            sy, sx = f[..., 0] - dy, f[..., 1] - dx
            ok = (ys + dy >= 0) & (ys + dy < H) & (xs + dx >= 0) & (xs + dx < W) & (sy >= 0) & (sy < H) & (sx >= 0) & (sx < W)
            idx = (b * Hp + sy.clamp(0, H - 1) + pad) * Wp + sx.clamp(0, W - 1) + pad
            okf = ok.unsqueeze(3).float()
            acc += flat[idx.reshape(-1)].view(B, H, W, C) * okf
            num += okf
    out = torch.zeros_like(source)
    out[:, pad : pad + H, pad : pad + W] = acc / num
    return out


class baseline_kernels:
    def __enter__(self):
        self.saved = pm._ssd_rows, pm.remap
        pm._ssd_rows, pm.remap = baseline_ssd_rows, baseline_remap

    def __exit__(self, *a):
        pm._ssd_rows, pm.remap = self.saved


# ---------------- footage ----------------


def timed(fn, repeat=1):
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


# ---------------- sections ----------------


def bench_kernels(sizes):
    print("\n### Kernel evaluations (one frame, patch 13, 6-channel SSD / 3-channel remap), ms")
    print("| size | patch error: ours | baseline | ratio | remap: ours | baseline | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for s in sizes:
        g = torch.Generator().manual_seed(0)
        src = pad_images(torch.rand(1, s, s, 6, generator=g) * 255, 6)
        tgt = pad_images(torch.rand(1, s, s, 6, generator=g) * 255, 6)
        nnf = torch.stack([torch.randint(0, s, (1, s, s), generator=g), torch.randint(0, s, (1, s, s), generator=g)], 3)
        ours_e = timed(lambda: patch_error(src, nnf, tgt, 13, 6), 3)
        with baseline_kernels():
            base_e = timed(lambda: pm._ssd_rows(*_rows_for(src, nnf, tgt)), 1)
        st = src[..., :3].contiguous()
        ours_r = timed(lambda: remap(st, nnf, 13, 6), 3)
        base_r = timed(lambda: baseline_remap(st, nnf, 13, 6), 1)
        print(f"| {s}x{s} | {ours_e*1e3:.0f} | {base_e*1e3:.0f} | {base_e/ours_e:.1f}x | {ours_r*1e3:.0f} | {base_r*1e3:.0f} | {base_r/ours_r:.1f}x |")


def _rows_for(src, nnf, tgt):
    from fastblend.kernels import _flat_top_left, _patch_rows, _patch_view, _pixel_grid

    B, H, W = nnf.shape[:3]
    b = _pixel_grid(B, H, W, "cpu")[0]
    idx = _flat_top_left(b, nnf[..., 0], nnf[..., 1], src.shape[1], src.shape[2], 6, 6).reshape(-1)
    return _patch_rows(src, 13), idx, _patch_view(tgt, 13, 6, H, W), None


def bench_matches(sizes, batch, baseline_sizes):
    print(f"\n### PatchMatch throughput (defaults: patches 13..5, 5 iterations, pyramid), batch {batch}, matches/s")
    print("| size | cost (modes) | ours | baseline | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for s in sizes:
        guide, _, style = flickering_footage(batch + 1, s)
        f = lambda a: torch.from_numpy(np.ascontiguousarray(a)).float()
        sg, tg, ss = f(guide[:batch]), f(guide[1 : batch + 1]), f(style[:batch])
        for cost, label in [("style", "fast, balanced"), ("mean_style", "accurate"), ("pairwise", "interpolate (min patch 15)")]:
            cfg = MatchConfig(cost=cost, minimum_patch_size=15 if cost == "pairwise" else 5)
            run = lambda: patch_match(sg, tg, ss, cfg, torch.Generator().manual_seed(0))
            t = timed(run)
            base = "-"
            ratio = "-"
            if s in baseline_sizes:
                with baseline_kernels():
                    tb = time.perf_counter()
                    run()
                    tb = time.perf_counter() - tb
                base, ratio = f"{batch / tb:.3f}", f"{tb / t:.1f}x"
            print(f"| {s}x{s} | {cost} ({label}) | {batch / t:.3f} | {base} | {ratio} |", flush=True)


_PEAK = """
def reset_peak():  # VmHWM (peak RSS) restarts from the current RSS
    open("/proc/self/clear_refs", "w").write("5")
def peak_growth(rss0):
    status = open("/proc/self/status").read()
    hwm = int(status.split("VmHWM:")[1].split()[0])
    return (hwm - rss0) / 1024
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
"""


def bench_memory(n, size, window, batch):
    """Peak RSS growth in fresh processes (glibc told to return freed blocks at once, so RSS tracks
    live memory): (a) the fast mode's streaming bookkeeping on n frames with the matcher replaced by
    the identity (nodes, window sums, outputs), (b) PatchMatch's working set for one batch."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = _PEAK + f"""
import sys, numpy as np, torch
sys.path.insert(0, {root!r})
from fastblend import modes
frames = np.random.default_rng(0).integers(0, 256, ({n}, {size}, {size}, 3), dtype=np.uint8)
load = lambda i: torch.from_numpy(frames[i]).float()
out = [None] * {n}
rss0 = rss(); reset_peak()
for t, img in modes.fast(load, load, {n}, {window}, {batch}, lambda items: [s.clone() for _, _, s in items]):
    out[t] = img.clamp(0, 255).to(torch.uint8).numpy()
print(peak_growth(rss0))
"""
    code2 = _PEAK + f"""
import sys, torch
sys.path.insert(0, {root!r})
from fastblend.patchmatch import MatchConfig, patch_match
x = torch.rand(3, {batch}, {size}, {size}, 3).mul_(255)
rss0 = rss(); reset_peak()
patch_match(x[0], x[1], x[2], MatchConfig(), torch.Generator().manual_seed(0))
print(peak_growth(rss0))
"""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    run = lambda c: float(subprocess.run([sys.executable, "-c", c], capture_output=True, text=True, check=True, env=env).stdout)
    book, match = run(code), run(code2)
    frame = size * size * 3 * 4 / 2**20
    print(f"\n### Fast mode memory, {n} frames {size}x{size}, W={window}, batch {batch}")
    print(f"- reference: about 2N float32 frames = {2 * n * frame:.0f} MiB (plus the N input frames)")
    print(f"- ours, streaming Fenwick bookkeeping (identity matcher): peak +{book:.0f} MiB = {book / frame:.0f} float frames, "
          f"of which the {n} uint8 output frames are {n * frame / 4:.0f} MiB")
    print(f"- ours, PatchMatch working set of one batch of {batch}: peak +{match:.0f} MiB")
    return book


def bench_modes(n, size, window, accurate_n, accurate_window):
    guide, clean, style = flickering_footage(n, size)
    rows = [("guide", guide, None), ("clean style", clean, None), ("input (flicker)", style, None),
            (f"input (flicker), first {accurate_n} frames", style[:accurate_n], None)]
    for mode in ["fast", "balanced", "accurate"]:
        k, w = (accurate_n, accurate_window) if mode == "accurate" else (n, window)
        t0 = time.perf_counter()
        out = smooth_video(style[:k], guide[:k], mode=mode, window_size=w, progress=False)
        rows.append((f"{mode} W={w}" + (f" (first {k} frames)" if k < n else ""), out, time.perf_counter() - t0))
    print(f"\n### Warping error, {n} frames {size}x{size} (astronaut panned + zoomed; style = colour transform, "
          f"per-frame gain U(0.7,1.3), offset U(-30,30), noise sd 4)")
    print("| video | warping error | PSNR to clean style (dB) | sharpness (var. Laplacian) | time (s) |")
    print("| --- | --- | --- | --- | --- |")
    for name, v, t in rows:
        k = len(v)
        print(f"| {name} | {warping_error(v, guide[:k]):.1f} | {psnr(v, clean[:k]):.2f} | {sharpness(v):.0f} | {'-' if t is None else f'{t:.1f}'} |")
    t0 = time.perf_counter()
    out = interpolate_video(guide[:12], {0: clean[0], 11: clean[11]}, progress=False)
    t = time.perf_counter() - t0
    print(f"\nInterpolation from keyframes 0 and 11 (12 frames): warping error {warping_error(out, guide[:12]):.1f} "
          f"(clean style {warping_error(clean[:12], guide[:12]):.1f}), PSNR to clean style per frame "
          f"{np.round([psnr(o, c) for o, c in zip(out, clean)], 1).tolist()}, {t:.1f} s")


def bench_resize():
    """Largest |difference| to cv2.resize(INTER_AREA) on float32 frames, per pyramid level: ours,
    and F.interpolate(mode="area") (adaptive average pooling, what this package used before)."""
    import cv2
    import torch.nn.functional as F

    from fastblend.patchmatch import pyramid_sizes, resize_area

    print("\n### Pyramid downsampling vs cv2 INTER_AREA (float32, 0..255), max |diff|: ours / F.interpolate area")
    print("| frame | level | smooth | noise (integer) | noise (real) |")
    print("| --- | --- | --- | --- | --- |")
    rng = np.random.default_rng(0)
    for H, W in [(1080, 1920), (1079, 1917), (512, 512), (720, 1280), (67, 67)]:
        yy, xx = np.mgrid[:H, :W]
        smooth = np.stack([127 + 120 * np.sin(yy / 7 + c) * np.cos(xx / 5) for c in range(3)], 2)
        images = np.stack([smooth, rng.integers(0, 256, (H, W, 3)), rng.uniform(0, 255, (H, W, 3))]).astype(np.float32)
        x = torch.from_numpy(images)
        for h, w in pyramid_sizes(H, W, 5 if H < 100 else 13)[:-1]:
            want = np.stack([cv2.resize(i, (w, h), interpolation=cv2.INTER_AREA) for i in images])
            ours = np.abs(resize_area(x, (h, w)).numpy() - want).reshape(3, -1).max(1)
            area = F.interpolate(x.permute(0, 3, 1, 2), size=(h, w), mode="area").permute(0, 2, 3, 1).numpy()
            old = np.abs(area - want).reshape(3, -1).max(1)
            print(f"| {H}x{W} | {h}x{w} | " + " | ".join(f"{a:.3g} / {b:.3g}" for a, b in zip(ours, old)) + " |")


def bench_balanced_bug(n, size, window):
    """The reference's balanced runner keeps a running mean per target and writes the mean from
    before it adds the last neighbour. Same remapped frames (real PatchMatch, recorded), both
    outputs: ours (the full mean) and the reference's (uint8, clip then truncate)."""
    from fastblend import modes
    from fastblend.api import _config, _Matcher, _to_uint8

    guide, _, style = flickering_footage(n, size)
    matcher = _Matcher(_config(5, 5, 10.0, "identity", 0, "style", style[0].shape), "cpu", 0, None)
    recorded = []

    def match(items):
        recorded.extend(matcher(items))
        return recorded[-len(items):]

    load = lambda a: (lambda i: torch.from_numpy(a[i]).float())
    ours = {t: _to_uint8(img) for t, img in modes.balanced(load(guide), load(style), n, window, 8, match)}
    results, state, theirs = iter(r.numpy() for r in recorded), {}, {}
    for t in range(n):  # our task order equals the reference's: target, then source
        for s in range(max(t - window, 0), min(t + window + 1, n)):
            if s != t:
                frame, weight = state.get(t, (style[t], 1))
                state[t] = (frame * (weight / (weight + 1)) + next(results) / (weight + 1), weight + 1)
                if weight + 1 == min(n, t + window + 1) - max(0, t - window):
                    theirs[t] = frame.clip(0, 255).astype(np.uint8)
    d = np.stack([np.abs(theirs[t].astype(int) - ours[t]) for t in range(n)])
    print(f"\n### Reference's balanced-mode bug, {n} frames {size}x{size}, W={window}: its output vs the full window mean")
    print(f"max {d.max()} grey levels, mean {d.mean():.2f}, 99th percentile {np.percentile(d, 99):.0f}; "
          f"per-frame max {[int(m) for m in d.reshape(n, -1).max(1)]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--part", choices=["all", "kernels", "matches", "memory", "modes", "resize", "balanced"], default="all")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} threads, {os.cpu_count()} CPUs, no GPU")
    sizes = [256] if a.quick else [256, 512]
    part = lambda name: a.part in ("all", name)
    if part("kernels"):
        bench_kernels(sizes)
    if part("matches"):
        bench_matches(sizes, batch=2, baseline_sizes=[256])  # a 512 baseline match takes minutes here
    if part("memory"):
        bench_memory(100, 256, 15, 8)
        bench_memory(400, 256, 15, 8)  # the same bookkeeping peak (O(W)) plus the uint8 outputs
    if part("resize"):
        bench_resize()
    if part("balanced"):
        bench_balanced_bug(12, 64, 3) if a.quick else bench_balanced_bug(24, 96, 3)
    if part("modes"):
        if a.quick:
            bench_modes(12, 64, 3, 6, 2)
        else:
            bench_modes(24, 96, 6, 8, 3)


if __name__ == "__main__":
    main()
