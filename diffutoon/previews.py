"""Live previews (issue 17): after every denoising step, the current estimate of the clean video, decoded cheaply.

The estimate x0 is the scheduler's (`pred_original_sample`, LCM's `denoised`) or, for the reference DDIM, computed from
the step's noise prediction: x0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t). It is decoded with a diffusers
`AutoencoderTiny` (TAESD, `madebyollin/taesd`) when one is given, else by the usual fixed linear map of SD1.5's 4
latent channels to RGB, and written atomically as a strip of a few frames into the render folder
(`previews/latest.png`) and, when asked, to a file of your own (an image: the strip; a video: every frame).
Previews only read the sampler's tensors: the result is the same with them on or off.

Only the standard library, numpy, torch and diffusers are imported at load time: the module ships beside the pipeline.
"""

from __future__ import annotations

import io
import logging
import os
import re
from pathlib import Path

import numpy as np
import torch

# SD1.5 latent channels -> RGB in [-1, 1] (A1111's "Approx cheap" preview factors), rows: channels
LATENT_RGB = torch.tensor([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264],
                           [-0.184, -0.271, -0.473]])
STRIP_FRAMES = 8  # frames in the strip, evenly spread over the video
STRIP_HEIGHT = 128  # the strip's frames are at most this tall (latent size for the linear map at 1024x1024)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
VIDEOS = (".mp4", ".mov", ".m4v", ".mkv", ".gif")
MARK = "Diffutoon live preview"  # in every preview file (EXIF, GIF or container comment): previews replace only their own
EXIF_DESCRIPTION = 0x010E  # EXIF ImageDescription, where an image preview carries MARK


def latent_to_rgb(latents: torch.Tensor) -> torch.Tensor:
    """(n, 4, h, w) latents (scaled by the VAE's factor, as the sampler holds them) -> uint8 (n, h, w, 3)."""
    rgb = torch.einsum("nchw,cr->nhwr", latents.float(), LATENT_RGB)
    return ((rgb + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)


def ddim_x0(scheduler, t, sample: torch.Tensor, noise_pred: torch.Tensor) -> torch.Tensor:
    """The clean estimate of an epsilon-prediction scheduler from its cumulative alphas: (x - sqrt(1-ab) eps) / sqrt(ab)."""
    alpha_bar = float(scheduler.alphas_cumprod[int(t)])
    return (sample.double() - (1 - alpha_bar) ** 0.5 * noise_pred.double()).div(alpha_bar**0.5).float()


def strip_indices(num_frames: int, count: int = STRIP_FRAMES) -> list[int]:
    return sorted({int(round(i)) for i in np.linspace(0, num_frames - 1, min(count, num_frames))})


class Previewer:
    """Publishes a preview after each step: into `folder/previews/latest.png` (the render folder) and `path` (yours);
    `report(**fields)` hears of each (`preview`: the file just written, `preview_step`). Disabled (`enabled` False)
    when there is nowhere to write."""

    def __init__(self, folder, path=None, vae=None, report=None, fps: float | None = None):
        self.folder = None if folder is None else Path(folder) / "previews"
        self.path = None if path is None else Path(path)
        self.vae, self.report, self.fps = vae, report, fps or 8.0
        self.enabled = self.folder is not None or self.path is not None
        self.check(path)

    @staticmethod
    def check(preview, output_path=None, input_path=None):
        """One ValueError before any model runs for a `preview` that is not None, a bool or an image/video path, or
        that would be written over (or into) the render's output or its input video."""
        if preview is None or isinstance(preview, bool):
            return
        if not isinstance(preview, (str, os.PathLike)) or Path(preview).suffix.lower() not in IMAGE_SUFFIXES + VIDEOS:
            raise ValueError(f"preview must be None, True, False or a path ending in {', '.join(IMAGE_SUFFIXES + VIDEOS)}; "
                             f"got {preview!r}.")
        where = Path(os.path.realpath(preview))
        for name, path in (("output_path", output_path), ("input video", input_path)):
            taken = None if path is None else Path(os.path.realpath(path))
            if taken is not None and (where == taken or taken in where.parents):  # the output's file or PNG folder
                raise ValueError(f"preview {preview} is (in) the render's {name} {path}: write previews elsewhere.")
        if os.path.lexists(where) and not is_preview(where):
            raise ValueError(f"preview {preview} exists and is not a live preview this project wrote: pass another "
                             "path, or move that file away (a preview replaces only an earlier preview).")

    def wants_all_frames(self) -> bool:
        return self.path is not None and self.path.suffix.lower() not in IMAGE_SUFFIXES

    def frames_needed(self, num_frames: int) -> list[int]:
        return list(range(num_frames)) if self.wants_all_frames() else strip_indices(num_frames)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """uint8 (n, H, W, 3): TAESD when given (a few frames at a time), else the linear map at latent size."""
        if self.vae is None:
            return latent_to_rgb(latents).numpy()
        param = next(self.vae.parameters())
        out = []
        for i in range(0, len(latents), 8):
            z = latents[i : i + 8].to(param.device, param.dtype) / self.vae.config.scaling_factor  # 1.0 for TAESD
            out.append((self.vae.decode(z).sample.float().clamp(-1, 1) * 127.5 + 127.5).round().byte().cpu())
        return torch.cat(out).permute(0, 2, 3, 1).numpy()

    def publish(self, step: int, steps: int, x0, indices: list[int]):
        """Decode x0 (n, 4, h, w) of frames `indices` (or a function giving it) and write the preview files
        (atomically). A preview that fails is a warning, never the render's end: previews then stop."""
        if not self.enabled:
            return
        try:
            self._publish(step, steps, x0() if callable(x0) else x0, indices)
        except Exception as error:  # noqa: BLE001 (an operational extra: the render goes on)
            self.enabled = False
            logging.getLogger(__name__).warning(f"previews stopped: {type(error).__name__}: {error}")

    def _publish(self, step: int, steps: int, x0: torch.Tensor, indices: list[int]):
        frames = self.decode(x0)
        strip_at = [indices.index(i) for i in strip_indices(max(indices) + 1)] if self.wants_all_frames() else None
        strip = _strip(frames if strip_at is None else frames[strip_at])
        written = None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            written = _write_image(self.folder / "latest.png", strip)
        if self.path is not None:
            if self.path.suffix.lower() in IMAGE_SUFFIXES:
                written = _write_image(self.path, strip)
            else:
                written = _write_video(self.path, frames, self.fps)
        if self.report is not None and written is not None:
            self.report(preview=str(written), preview_step=step + 1, preview_steps=steps)


def _strip(frames: np.ndarray) -> np.ndarray:
    """The frames side by side, each at most STRIP_HEIGHT tall."""
    import PIL.Image

    h, w = frames.shape[1:3]
    if h > STRIP_HEIGHT:
        size = (max(1, round(w * STRIP_HEIGHT / h)), STRIP_HEIGHT)
        frames = np.stack([np.asarray(PIL.Image.fromarray(f).resize(size, PIL.Image.BILINEAR)) for f in frames])
    return np.concatenate(list(frames), axis=1)


def _atomic(path: Path, data: bytes):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)  # readers see the old preview or the new one, never half of one
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def is_preview(path) -> bool:
    """Whether the file at `path` is a preview written by `Previewer` (it carries `MARK`)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        if path.suffix.lower() in IMAGE_SUFFIXES + (".gif",):
            import PIL.Image

            with PIL.Image.open(path) as image:
                return image.getexif().get(EXIF_DESCRIPTION) == MARK or image.info.get("comment") == MARK.encode()
        import importlib

        info = importlib.import_module("diffutoon.video")._ffmpeg_info(path)
        return re.search(rf"^\s*comment\s*:\s*{MARK}\s*$", info, re.MULTILINE | re.IGNORECASE) is not None
    except Exception:  # noqa: BLE001 (unreadable: not ours)
        return False


def _write_image(path: Path, image: np.ndarray) -> Path:
    import PIL.Image

    buffer = io.BytesIO()
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG")
    exif = PIL.Image.Exif()
    exif[EXIF_DESCRIPTION] = MARK
    PIL.Image.fromarray(image).save(buffer, format=fmt, exif=exif.tobytes())
    _atomic(path, buffer.getvalue())
    return path


def _write_video(path: Path, frames: np.ndarray, fps: float) -> Path:
    """Every frame of the estimate, as a video (even sizes for H.264; written beside, then renamed into place)."""
    import importlib

    h, w = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2
    frames = frames[:, :h, :w]
    if path.suffix.lower() == ".gif":
        import PIL.Image

        buffer = io.BytesIO()
        images = [PIL.Image.fromarray(f) for f in frames]
        images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=1000 / fps, loop=0,
                       comment=MARK)
        _atomic(path, buffer.getvalue())
        return path
    vio = importlib.import_module("diffutoon.video")  # ffmpeg writer, project install only
    vio.write_video(path, iter([frames]), fps, overwrite=True, progress=False, total=len(frames), comment=MARK)
    return path
