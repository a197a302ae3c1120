"""Deflickering metrics without model weights (FASTBLEND.md, "Measuring deflickering")."""

import cv2
import numpy as np


def _flow(a, b):
    """DIS optical flow (medium preset) from grey frame a to b: a(x) ~ b(x + flow(x))."""
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    return dis.calc(a, b, None)


def _sample(img, flow):
    h, w = flow.shape[:2]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(img, gx + flow[..., 0], gy + flow[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def warping_error(frames, guide_frames):
    """Warping error (Lai et al. 2018): flow on the GUIDE; frame t warped onto t+1 by the backward
    flow; pixels with |fw + bw|^2 > 0.01 (|fw|^2 + |bw|^2) + 0.5 are occluded; MSE (0..255 scale,
    channels averaged) over non-occluded pixels, averaged over consecutive pairs."""
    frames = [np.asarray(f, dtype=np.float32) for f in frames]
    grey = [cv2.cvtColor(np.asarray(g, dtype=np.uint8), cv2.COLOR_RGB2GRAY) for g in guide_frames]
    errors = []
    for t in range(len(frames) - 1):
        bw = _flow(grey[t + 1], grey[t])  # from t+1 back to t
        fw = _flow(grey[t], grey[t + 1])
        fw_at = _sample(fw, bw)  # forward flow read where each pixel of t+1 came from
        occluded = ((fw_at + bw) ** 2).sum(2) > 0.01 * ((fw_at ** 2).sum(2) + (bw ** 2).sum(2)) + 0.5
        warped = _sample(frames[t], bw)
        sq = ((frames[t + 1] - warped) ** 2).mean(2)
        valid = ~occluded
        errors.append(float(sq[valid].mean()) if valid.any() else 0.0)
    return float(np.mean(errors))


def psnr(a, b):
    """PSNR in dB between two uint8 videos (or frames), 0..255 scale."""
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def sharpness(frames):
    """Mean variance of the Laplacian of the grey frames (blending trades flicker for blur)."""
    grey = [cv2.cvtColor(np.asarray(f, dtype=np.uint8), cv2.COLOR_RGB2GRAY) for f in frames]
    return float(np.mean([cv2.Laplacian(g, cv2.CV_64F).var() for g in grey]))


def flickering_footage(n, size, seed=0):
    """Guide: a real photograph panned and zoomed over n frames. Style: a fixed colour transform of
    it (clean) and the same with per-frame random gain, offset and noise (the flicker)."""
    from skimage import data  # a real photograph (scikit-image ships it)

    photo = data.astronaut()
    frames = []
    for t in range(n):
        s = (1.0 + 0.01 * t) * size / 256  # zoom in 1% per frame on a 256-pixel view
        cx, cy = 240 + 2.5 * t, 220 + 1.5 * t  # pan right and down
        M = np.array([[s, 0, size / 2 - cx * s], [0, s, size / 2 - cy * s]])
        frames.append(cv2.warpAffine(photo, M, (size, size), flags=cv2.INTER_AREA))
    guide = np.stack(frames)
    mix = np.array([[0.6, 0.3, 0.1], [0.1, 0.5, 0.4], [0.3, 0.1, 0.6]])
    clean = np.clip(guide.astype(np.float64) @ mix.T * 1.1 + 10, 0, 255)
    rng = np.random.default_rng(seed)
    gain = rng.uniform(0.7, 1.3, (n, 1, 1, 1))
    offset = rng.uniform(-30, 30, (n, 1, 1, 1))
    noisy = clean * gain + offset + rng.normal(0, 4, clean.shape)
    return guide, clean.astype(np.uint8), np.clip(noisy, 0, 255).astype(np.uint8)
