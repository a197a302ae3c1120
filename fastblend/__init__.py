"""FastBlend in PyTorch: patch-based video deflickering and keyframe interpolation, CPU or GPU.

A reimplementation of FastBlend (Duan et al. 2023, arXiv 2311.09265) with no cupy: the guided
pyramid PatchMatch, the blend modes "fast" (Fenwick tree), "balanced" and "accurate", and keyframe
interpolation. Frames stream through: only O(window) float frames are alive at once.

Example (runs as is; one to two minutes on a 2-core CPU, pass num_threads=1 on a busy machine)::

    import numpy as np
    from skimage import data
    from fastblend import smooth_video, interpolate_video

    rng = np.random.default_rng(0)
    photo = data.astronaut()[::4, ::4]                                    # 128 x 128
    guide = np.stack([np.roll(photo, 2 * t, axis=1) for t in range(12)])  # a slow pan
    gain = rng.uniform(0.8, 1.2, (12, 1, 1, 1))
    style = np.clip(guide * gain, 0, 255).astype(np.uint8)               # flickering "style"
    smooth = smooth_video(style, guide, mode="fast", window_size=5)       # (12, 128, 128, 3) uint8
    tween = interpolate_video(guide, {0: style[0], 11: style[11]})       # from two keyframes

Command line: ``python -m fastblend --help``.
"""

from .api import default_device, interpolate_video, smooth_video
from .kernels import pairwise_patch_error, patch_error, remap
from .metrics import psnr, sharpness, warping_error
from .patchmatch import MatchConfig, patch_match

__all__ = [
    "smooth_video", "interpolate_video", "default_device", "patch_match", "MatchConfig",
    "patch_error", "remap", "pairwise_patch_error", "warping_error", "psnr", "sharpness",
]
