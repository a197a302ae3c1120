"""How long a render will take here: its work in FLOPs, counted with torch's FLOP counter on the meta device (the
pipeline's own UNet, ControlNet and VAE rebuilt from their configs: no memory, no compute; as bench/bench_flops.py
counts them), divided by this device's rate, measured once on a small real forward of the same UNet.

    est = Estimator(pipe, device)      # measures the rate (a fraction of a second with the demo models)
    est.seconds(frames=48, height=512, width=512, steps=10, context_length=16, context_stride=8)
"""

from __future__ import annotations

import sys
import threading
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

TEXT_TOKENS = 77
CFG_BRANCHES = 2  # guidance > 1: the prompt and the negative prompt


def _meta(module):
    """The module rebuilt from its config on the meta device (shapes only)."""
    with torch.device("meta"):
        return type(module).from_config(module.config).eval()


def _count(fn):
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def unet_flops(unet, frames, height, width):
    """One CFG branch of the UNet (with its motion modules) on a window of `frames` frames."""
    x = torch.zeros(1, unet.config.in_channels, frames, height // 8, width // 8, device=unet.device)
    text = torch.zeros(frames, TEXT_TOKENS, unet.config.cross_attention_dim, device=unet.device)  # as the pipeline
    return _count(lambda: unet(x, torch.tensor(999, device=unet.device), encoder_hidden_states=text))


def controlnet_flops(net, height, width):
    """One ControlNet on one frame."""
    x = torch.zeros(1, net.config.in_channels, height // 8, width // 8, device="meta")
    text = torch.zeros(1, TEXT_TOKENS, net.config.cross_attention_dim, device="meta")
    cond = torch.zeros(1, 3, height, width, device="meta")
    return _count(lambda: net(x, torch.tensor(999, device="meta"), encoder_hidden_states=text, controlnet_cond=cond,
                              return_dict=False))


def decode_flops(vae, height, width):
    """The VAE decoding one frame."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    z = torch.zeros(1, vae.config.latent_channels, height // factor, width // factor, device="meta")
    return _count(lambda: vae.decode(z))


class Estimator:
    """FLOPs of a render from the pipeline's parts, and seconds from the measured rate (None where unknown)."""

    def __init__(self, pipe, device="cpu"):
        self.pipe, self.device = pipe, str(device)
        self._cache, self._lock = {}, threading.Lock()
        try:
            self._unet = _meta(pipe.unet)
            nets = getattr(pipe.controlnet, "nets", None) or [pipe.controlnet]
            self._nets = [_meta(n) for n in nets]
            self._vae = _meta(pipe.vae)
            self.rate = self._measure_rate()
        except Exception:  # a pipeline without these parts (a stand-in): no estimate
            self.rate = None

    def _cached(self, key, fn):
        with self._lock:
            if key not in self._cache:
                self._cache[key] = fn()
            return self._cache[key]

    def _measure_rate(self, frames=2, size=64):
        """FLOP/s of this device on a small real forward of the UNet (the second of two runs: no warm-up)."""
        unet = self.pipe.unet
        p = next(unet.parameters())
        x = torch.zeros(1, unet.config.in_channels, frames, size // 8, size // 8, device=p.device, dtype=p.dtype)
        text = torch.zeros(frames, TEXT_TOKENS, unet.config.cross_attention_dim, device=p.device, dtype=p.dtype)
        seconds = None
        with torch.no_grad():
            for _ in range(2):
                t = time.perf_counter()
                unet(x, torch.tensor(999, device=p.device), encoder_hidden_states=text)
                if p.device.type == "cuda":
                    torch.cuda.synchronize(p.device)
                seconds = time.perf_counter() - t
        return unet_flops(self._unet, frames, size, size) / max(seconds, 1e-6)

    def _per_pixels(self, key, count):
        """FLOPs(h, w) = a P + b P^2 in the pixels P = h w (convolutions and cross-attention grow with P, spatial
        self-attention with P^2): a and b from exact counts at 64x64 and 128x128, so that a 2048x2048 estimate
        costs no 2048x2048 count."""
        def fit():
            p1, p2 = 64 * 64, 128 * 128
            f1, f2 = count(64, 64), count(128, 128)
            b = (f2 / p2 - f1 / p1) / (p2 - p1)
            return f1 / p1 - b * p1, b
        return self._cached(key, fit)

    def flops(self, frames, height, width, steps, context_length, context_stride):
        """The main pass: every window through the UNet and every frame through the ControlNets, per step and CFG
        branch, then every frame decoded (reuse across windows makes the real count smaller: an upper bound)."""
        module = sys.modules.get(type(self.pipe).__module__)
        windows = module.sliding_windows(frames, context_length, context_stride)
        pixels = height * width

        def at(key, count):
            a, b = self._per_pixels(key, count)
            return a * pixels + b * pixels ** 2

        unet = sum(at(("unet", r - l), lambda h, w, f=r - l: unet_flops(self._unet, f, h, w)) for l, r in windows)
        nets = sum(at(("net", i), lambda h, w, n=n: controlnet_flops(n, h, w)) for i, n in enumerate(self._nets))
        decode = at(("vae",), lambda h, w: decode_flops(self._vae, h, w))
        return steps * CFG_BRANCHES * (unet + frames * nets) + frames * decode

    def seconds(self, frames, height, width, steps, context_length, context_stride):
        if not self.rate:
            return None
        try:
            return self.flops(frames, height, width, steps, context_length, context_stride) / self.rate
        except Exception:
            return None
