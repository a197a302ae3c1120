# Copyright 2026 The Diffutoon-for-diffusers authors. Apache-2.0.
"""Diffutoon (Duan et al., "Diffutoon: High-Resolution Editable Toon Shading via Diffusion Models", 2024) as a
diffusers community pipeline.

The main toon-shading pass denoises a WHOLE video with sliding windows: in every window the complete
denoiser (ControlNets, UNet and AnimateDiff motion modules, both CFG branches) runs, and the windows' noise
predictions are blended with triangular weights (paper eqs. 2-6). The video's latents and condition frames
stay in host memory; the accelerator only ever holds one window.

Layout (k-diffusion style): `denoise()` is a pure function of (latents, timestep, conditions) that returns the
full-length noise prediction; the sampler loop in `__call__` never knows about windows.
"""

from __future__ import annotations

import dataclasses
import importlib
import functools
import inspect
import math
import numbers
import os
import threading
import weakref
from pathlib import Path
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ControlNetModel, DiffusionPipeline, UNet2DConditionModel, UNetMotionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers import StableDiffusionPipeline
from diffusers.loaders import (FromSingleFileMixin, IPAdapterMixin, StableDiffusionLoraLoaderMixin,
                               TextualInversionLoaderMixin)
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D, MotionAdapter
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.utils import USE_PEFT_BACKEND, BaseOutput, logging, scale_lora_layers, unscale_lora_layers
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

logger = logging.get_logger(__name__)

PROJECT_INSTALL = "run `pip install -e .` in a checkout of Diffutoon for diffusers (see its README)"


def _import(name: str, needed_for: str, install: str = PROJECT_INSTALL):
    """`importlib.import_module(name)`, or ONE ImportError saying what needs the module and how to install it.

    A call, not an import statement: diffusers' `check_imports` reads every import line of a custom pipeline file
    (even inside functions) and tells users to `pip install` each name it cannot import, names that are not this
    project on any package index.
    """
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name is None or not f"{name}.".startswith(f"{error.name}."):
            raise  # a dependency of `name` is missing: its own message names it
        raise ImportError(f"{needed_for} needs `{name}`, which is not installed: {install}.") from None


def _import_names(module: str, *names: str):
    """The objects `names` of the project module `module` (see the import block below)."""
    loaded = _import(module, "The Diffutoon pipeline")
    return tuple(getattr(loaded, name) for name in names)


# >>> main-pass modules >>>
# The project modules the main pass needs (CONTRACT.md's import rule), imported here and nowhere else. They import
# only stdlib, numpy, torch, diffusers, transformers and safetensors. model_card/assemble.py ships a flat copy of each
# module named here beside the Hub folder's pipeline.py and rewrites this block as relative imports of those copies,
# so a user with only diffusers can load that folder. Name each module twice, with the same names in both branches.
try:  # the installed package: one class, whatever loaded this file (saved pipelines name its module)
    DiffutoonDDIMScheduler, ddim_step, diffutoon_timesteps = _import_names(
        "diffutoon.scheduling", "DiffutoonDDIMScheduler", "ddim_step", "diffutoon_timesteps")
    (CHUNK, HostFrames, InMemoryRender, RenderFolder, RenderFolderError, checkpoint_state, file_fingerprint,
     folder_bytes, module_fingerprint, randn_into, restore_state, setting_identity, tensor_fingerprint,
     versions) = _import_names(
        "diffutoon.render_folder", "CHUNK", "HostFrames", "InMemoryRender", "RenderFolder", "RenderFolderError",
        "checkpoint_state", "file_fingerprint", "folder_bytes", "module_fingerprint", "randn_into", "restore_state",
        "setting_identity", "tensor_fingerprint", "versions")
    WindowReuse, compute_prefix, has_prefix = _import_names("diffutoon.reuse", "WindowReuse", "compute_prefix",
                                                            "has_prefix")
    DistributedError, broadcast_frames, map_chunks, open_shared_run, process_group, process_rank = _import_names(
        "diffutoon.distributed", "DistributedError", "broadcast_frames", "map_chunks", "open_shared_run",
        "process_group", "process_rank")
    MemoryPlan, plan_memory, set_forward_chunking, trim_host_memory = _import_names(
        "diffutoon.memory", "MemoryPlan", "plan_memory", "set_forward_chunking", "trim_host_memory")
    fast_settings, load_lcm_lora, load_motion_adapter, model_input, scheduler_step = _import_names(
        "diffutoon.fast", "fast_settings", "load_lcm_lora", "load_motion_adapter", "model_input", "scheduler_step")
    Previewer, ddim_x0 = _import_names("diffutoon.previews", "Previewer", "ddim_x0")
    TextEmbeds, check_text_inputs, encode_pair, frame_embeds, text_inputs, token_rows = _import_names(
        "diffutoon.prompts", "TextEmbeds", "check_text_inputs", "encode_pair", "frame_embeds", "text_inputs",
        "token_rows")
    check_style, memory_efficient_kept, style_embeds, style_identity, window_image_embeds = _import_names(
        "diffutoon.style", "check_style", "memory_efficient_kept", "style_embeds", "style_identity",
        "window_image_embeds")
except ImportError:
    if not __package__:
        raise
    # custom_pipeline=<this file> in a checkout that is not pip-installed: diffusers copied these files beside it
    from .diffutoon.scheduling import DiffutoonDDIMScheduler, ddim_step, diffutoon_timesteps  # noqa: F401
    from .diffutoon.render_folder import (CHUNK, HostFrames, InMemoryRender, RenderFolder,  # noqa: F401
                                          RenderFolderError, checkpoint_state, file_fingerprint, folder_bytes,
                                          module_fingerprint, randn_into, restore_state, setting_identity,
                                          tensor_fingerprint, versions)
    from .diffutoon.reuse import WindowReuse, compute_prefix, has_prefix
    from .diffutoon.distributed import (DistributedError, broadcast_frames, map_chunks,  # noqa: F401
                                        open_shared_run, process_group, process_rank)
    from .diffutoon.memory import MemoryPlan, plan_memory, set_forward_chunking, trim_host_memory
    from .diffutoon.fast import (fast_settings, load_lcm_lora, load_motion_adapter, model_input,  # noqa: F401
                                 scheduler_step)
    from .diffutoon.previews import Previewer, ddim_x0  # noqa: F401
    from .diffutoon.prompts import (TextEmbeds, check_text_inputs, encode_pair, frame_embeds,  # noqa: F401
                                    text_inputs, token_rows)
    from .diffutoon.style import (check_style, memory_efficient_kept, style_embeds, style_identity,  # noqa: F401
                                  window_image_embeds)
# <<< main-pass modules <<<

DEFAULT_PROMPT = "best quality, perfect anime illustration, light"  # SPEC's example adds its subject: "a girl is dancing, smile, solo"
DEFAULT_NEGATIVE_PROMPT = "verybadimagenegative_v1.3"
HUB_MODELS = {
    "base": "stable-diffusion-v1-5/stable-diffusion-v1-5",  # any SD1.5 checkpoint; the paper's is an anime one
    "motion_adapter": "guoyww/animatediff-motion-adapter-v1-5-2",
    "lineart": "lllyasviel/control_v11p_sd15_lineart",
    "tile": "lllyasviel/control_v11f1e_sd15_tile",
    "annotators": "lllyasviel/Annotators",
    "softedge": "lllyasviel/control_v11p_sd15_softedge",
    "depth": "lllyasviel/control_v11f1p_sd15_depth",
}
FASTBLEND_DEFAULTS = dict(mode="fast", window_size=60, batch_size=8, minimum_patch_size=5, num_iter=5, guide_weight=10.0)
ANNOTATORS = {"lineart": "LineartDetector", "softedge": "HEDdetector", "depth": "MidasDetector"}  # controlnet-aux

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers import DiffusionPipeline, ControlNetModel, MotionAdapter
        >>> from diffusers.utils import export_to_video, load_video

        >>> adapter = MotionAdapter.from_pretrained("guoyww/animatediff-motion-adapter-v1-5-2")
        >>> controlnets = [ControlNetModel.from_pretrained("lllyasviel/control_v11p_sd15_lineart"),
        ...                ControlNetModel.from_pretrained("lllyasviel/control_v11f1e_sd15_tile")]
        >>> pipe = DiffusionPipeline.from_pretrained(
        ...     "path/to/an/sd15/anime/checkpoint", motion_adapter=adapter, controlnet=controlnets,
        ...     custom_pipeline="path/to/pipeline_diffutoon.py", trust_remote_code=True,
        ...     dtype=torch.float16,
        ... ).to("cuda")
        >>> pipe.load_textual_inversion("path/to/verybadimagenegative_v1.3.pt", token="verybadimagenegative_v1.3")
        >>> video = load_video("dance.mp4")  # list of PIL images
        >>> frames = pipe(video=video, prompt="best quality, perfect anime illustration, a girl is dancing",
        ...               negative_prompt="verybadimagenegative_v1.3", height=1024, width=1024).frames[0]
        >>> export_to_video(frames, "toon.mp4", fps=30)
        ```
"""


# ----------------------------------------------------------------------------------------------------------------
# The paper's equations, one small function each


def sliding_windows(num_frames: int, context_length: int, context_stride: int) -> list[tuple[int, int]]:
    """Paper eq. 2: half-open windows [l, min(l + d, N)) starting at 0, s, 2s, ...; stop after the first window that
    reaches frame N. The last window may be short and is not shifted back.

    >>> sliding_windows(30, 16, 8)
    [(0, 16), (8, 24), (16, 30)]
    """
    windows = []
    for start in range(0, num_frames, context_stride):
        windows.append((start, min(start + context_length, num_frames)))
        if start + context_length >= num_frames:
            break
    return windows


def shot_windows(num_frames: int, context_length: int, context_stride: int, cuts=None) -> list[tuple[int, int]]:
    """Eq. 2's windows made per shot when the video has scene cuts (the first frame of each new shot), so that no
    window spans a cut; without cuts, `sliding_windows` itself.

    >>> shot_windows(30, 16, 8, [10])
    [(0, 10), (10, 26), (18, 30)]
    """
    bounds = [0, *(cuts or []), num_frames]
    return [(s + a, s + b) for s, e in zip(bounds[:-1], bounds[1:])
            for a, b in sliding_windows(e - s, context_length, context_stride)]


def window_weights(start: int, end: int) -> torch.Tensor:
    """Paper eq. 5 as the reference computes it, for the frames of window [start, end):
    w(i) = max(1 - |i - (l + r - 1) / 2| / ((r - l - 1 + 0.01) / 2), 0.01).
    """
    i = torch.arange(start, end, dtype=torch.float64)
    centre, half_width = (start + end - 1) / 2, (end - start - 1 + 0.01) / 2
    return torch.clamp(1 - (i - centre).abs() / half_width, min=0.01).float()


def window_blend_weights(windows: list[tuple[int, int]], num_frames: int) -> list[torch.Tensor]:
    """Paper eq. 4's coefficients w(l, i, r) / sum over windows w(l', i, r'), one tensor per window.

    Normalising before the sum makes a frame covered by one window get exactly that window's prediction.
    """
    total = torch.zeros(num_frames)
    for start, end in windows:
        total[start:end] += window_weights(start, end)
    return [window_weights(start, end) / total[start:end] for start, end in windows]


def classifier_free_guidance(noise_neg: torch.Tensor, noise_pos: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Paper eq. 6 (as in the reference and diffusers): e = e_neg + g (e_pos - e_neg)."""
    return noise_neg + guidance_scale * (noise_pos - noise_neg)


# ----------------------------------------------------------------------------------------------------------------
# Model plumbing


_CALL_LOCKS, _LOCKS_LOCK = weakref.WeakKeyDictionary(), threading.Lock()


def _one_call_at_a_time(call):
    """A pipeline renders one call at a time: a call swaps modules in place (per-frame GroupNorm, the reused UNet
    prefix), so a second thread's call waits for the first; a call from inside a call (a callback) is refused."""
    @functools.wraps(call)
    def wrapper(self, *args, **kwargs):
        with _LOCKS_LOCK:
            state = _CALL_LOCKS.setdefault(self, {"lock": threading.Lock(), "owner": None})
        if state["owner"] == threading.get_ident():
            raise RuntimeError("this pipeline is already rendering in this thread (a call from a callback?): call it "
                               "again after the render returns, or use a second pipeline object")
        with state["lock"]:
            state["owner"] = threading.get_ident()
            try:
                return call(self, *args, **kwargs)
            finally:
                state["owner"] = None
    return wrapper


class _PerFrameGroupNorm(torch.nn.GroupNorm):
    """GroupNorm over (B, C, F, H, W) with statistics per frame, as AnimateDiff and the reference compute it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            return super().forward(x)
        b, c, f, h, w = x.shape
        y = F.group_norm(x.transpose(1, 2).reshape(b * f, c, h, w), self.num_groups, self.weight, self.bias, self.eps)
        return y.reshape(b, f, c, h, w).transpose(1, 2)


@contextmanager
def per_frame_motion_groupnorm(unet: torch.nn.Module, enabled: bool = True):
    """Make the motion modules' GroupNorm normalise each frame on its own (SPEC "Motion modules") for a block of code.

    diffusers' `AnimateDiffTransformer3D` normalises over all frames of the call; the swap changes only `forward`
    (same parameters, same state dict) and is undone on exit.
    """
    norms = [m.norm for m in unet.modules() if isinstance(m, AnimateDiffTransformer3D)] if enabled else []
    originals = [norm.__class__ for norm in norms]
    for norm in norms:
        norm.__class__ = _PerFrameGroupNorm
    try:
        yield
    finally:
        for norm, cls in zip(norms, originals):
            norm.__class__ = cls


class _SkipMotion(torch.nn.Module):
    """Stands in for a motion module: the frames go through untouched (the UNet acts as the 2D SD UNet)."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextmanager
def without_motion_modules(unet: UNetMotionModel):
    """Run a `UNetMotionModel` as the plain SD UNet (the editing branch, SPEC 2): its motion modules are
    swapped out, not called, for a block of code. Same parameters, no copy."""
    blocks = _motion_blocks(unet)
    saved = [block.motion_modules for block in blocks]
    for block in blocks:
        block.motion_modules = torch.nn.ModuleList([_SkipMotion() for _ in block.motion_modules])
    try:
        yield
    finally:
        for block, modules in zip(blocks, saved):
            block.motion_modules = modules


def _motion_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    blocks = [*model.down_blocks, *model.up_blocks]
    if getattr(model, "mid_block", None) is not None and hasattr(model.mid_block, "motion_modules"):
        blocks.append(model.mid_block)
    return blocks


def unet_motion_from_unet2d(unet: UNet2DConditionModel, motion_adapter: MotionAdapter) -> UNetMotionModel:
    """diffusers' `UNetMotionModel.from_unet2d` without copying: the result shares every tensor with `unet` and
    `motion_adapter`, so a loaded pipeline holds one copy of the UNet weights."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        motion_unet = UNetMotionModel.from_unet2d(unet, motion_adapter, load_weights=False)
    state = dict(unet.state_dict())
    adapter_blocks = _motion_blocks(motion_adapter)
    for target, source in zip(_motion_blocks(motion_unet), adapter_blocks):
        prefix = next(n for n, m in motion_unet.named_modules() if m is target)
        for key, value in source.motion_modules.state_dict().items():
            state[f"{prefix}.motion_modules.{key}"] = value
    missing, unexpected = motion_unet.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:  # an architecture this shortcut does not know: fall back to diffusers' copy
        logger.warning(f"Copying the UNet into UNetMotionModel (missing {missing[:3]}, unexpected {unexpected[:3]}).")
        return UNetMotionModel.from_unet2d(unet, motion_adapter)
    return motion_unet.eval()  # buffers (positional encodings) were built for real: init_empty_weights skips them


def _nets(controlnet) -> list[ControlNetModel]:
    return list(controlnet.nets) if isinstance(controlnet, MultiControlNetModel) else [controlnet]


def _check_values(frames, name: str = "`video`") -> None:
    """Float frames must be finite and in [0, 1], integer ones in [0, 255]; PIL images always are. Cheap enough to run
    on every input before any model does."""
    if isinstance(frames, (list, tuple)):
        for frame in frames:
            _check_values(frame, name)
        return
    if isinstance(frames, PIL.Image.Image) or not isinstance(frames, (np.ndarray, torch.Tensor)):
        return
    frames = torch.as_tensor(frames) if isinstance(frames, np.ndarray) else frames
    if frames.dtype == torch.uint8 or frames.numel() == 0:
        return
    if frames.dtype.is_floating_point and frames.isnan().any():
        raise ValueError(f"{name} contains NaN values: pass finite frames.")
    low, high = frames.min().item(), frames.max().item()
    if frames.dtype.is_floating_point and (low < 0 or high > 1):
        raise ValueError(f"{name} holds floats in [{low:g}, {high:g}], but float frames are read as values in [0, 1]: "
                         "pass uint8 frames, or divide by 255.")
    if not frames.dtype.is_floating_point and (low < 0 or high > 255):
        raise ValueError(f"{name} holds integers in [{low}, {high}]: pass uint8 frames with values in [0, 255].")


def _video_to_uint8(video, name: str = "video") -> torch.Tensor:
    """Frames -> uint8 tensor (N, 3, H, W) on the host. Accepts a list of PIL images, an array or a tensor of frames
    (N, H, W, 3) or (N, 3, H, W), or a list of such frames; uint8, or floats in [0, 1]."""
    if isinstance(video, PIL.Image.Image):
        video = [video]
    if isinstance(video, (list, tuple)):
        if len(video) == 0:
            raise ValueError(f"`{name}` is empty: pass at least one frame.")
        frames = [f if isinstance(f, torch.Tensor) else np.asarray(f.convert("RGB") if isinstance(f, PIL.Image.Image) else f)
                  for f in video]
        shapes = sorted({tuple(f.shape) for f in frames})
        if len(shapes) > 1:
            raise ValueError(f"All frames of `{name}` must have the same size, got frames of shapes {shapes}: resize "
                             "them first.")
        video = torch.stack([torch.as_tensor(f) for f in frames])
    if not isinstance(video, (np.ndarray, torch.Tensor)):
        raise ValueError(f"`{name}` must be a list of PIL images, a uint8 array (N, H, W, 3) or a tensor, got "
                         f"{type(video).__name__}.")
    shape = tuple(video.shape)
    video = torch.from_numpy(np.ascontiguousarray(video)) if isinstance(video, np.ndarray) else video
    if video.ndim == 3 and 3 in (shape[0], shape[-1]):
        video, shape = video[None], (1, *shape)  # one frame
    if video.ndim == 3 or (video.ndim == 4 and 1 in (shape[-1], shape[1])):
        raise ValueError(f"`{name}` has shape {shape}, which looks like grayscale frames: pass RGB frames "
                         f"(N, H, W, 3), e.g. np.repeat(frames[..., None], 3, axis=-1) for (N, H, W) frames.")
    if video.ndim != 4 or shape[0] == 0:
        raise ValueError(f"`{name}` must hold N >= 1 frames as (N, H, W, 3) or (N, 3, H, W), got shape {shape}.")
    if shape[-1] == 3:  # (N, H, W, 3), else (N, 3, H, W)
        video = video.permute(0, 3, 1, 2)
    if video.shape[1] != 3:
        raise ValueError(f"`{name}` frames must be RGB with 3 channels, got shape {shape}"
                         f"{' (RGBA? drop the alpha channel)' if 4 in (shape[1], shape[-1]) else ''}.")
    _check_values(video, f"`{name}`")
    if video.dtype != torch.uint8:
        scale = 255 if video.dtype.is_floating_point else 1
        video = (video.float() * scale).round().to(torch.uint8)
    return video.contiguous().cpu()


def _resize_uint8(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Centre-crop to the target aspect ratio, then resize (the reference's crop_and_resize, PIL Lanczos)."""
    n, _, h, w = frames.shape
    if (h, w) == (height, width):
        return frames
    scale = max(height / h, width / w)
    crop_h, crop_w = round(height / scale), round(width / scale)
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    out = torch.empty((n, 3, height, width), dtype=torch.uint8)
    for i in range(n):
        image = PIL.Image.fromarray(frames[i, :, top : top + crop_h, left : left + crop_w].permute(1, 2, 0).numpy())
        out[i] = torch.from_numpy(np.asarray(image.resize((width, height), PIL.Image.LANCZOS))).permute(2, 0, 1)
    return out


class _VideoSource:
    """The input video, read a range of frames at a time as uint8 (n, 3, H, W) at its own size: frames in memory, a
    video file or `diffutoon.video.VideoClip` decoded lazily, or a frame array (N, H, W, 3) of the render folder."""

    def __init__(self, video):
        self.clip, self.frames = None, None
        if isinstance(video, (str, os.PathLike)):
            video = _import("diffutoon.video", "Reading a video file").VideoClip(video)  # decord + ffmpeg
        if hasattr(video, "read") and hasattr(video, "shape"):  # lazy: read(start, end) -> uint8 (n, H, W, 3)
            self.clip, (self.num_frames, self.height, self.width) = video, video.shape[:3]
        else:
            self.frames = _video_to_uint8(video)
            self.num_frames, _, self.height, self.width = self.frames.shape

    @property
    def shape(self) -> tuple:
        return (self.num_frames, 3, self.height, self.width)

    def __len__(self):
        return self.num_frames

    def read(self, start: int, end: int) -> torch.Tensor:
        if self.frames is not None:
            return self.frames[start:end]
        return torch.from_numpy(np.ascontiguousarray(self.clip.read(start, end))).permute(0, 3, 1, 2).contiguous()

    def resized(self, start: int, end: int, height: int, width: int) -> torch.Tensor:
        return _resize_uint8(self.read(start, end), height, width)

    def identity(self) -> dict:
        """What the render folder compares to refuse resuming on another input."""
        if self.frames is not None:
            return {"frames": tensor_fingerprint(self.frames), "shape": list(self.shape)}
        identity = {"shape": list(self.shape)}
        if getattr(self.clip, "path", None) is not None:
            identity.update(file_fingerprint(self.clip.path))
        if hasattr(self.clip, "selection"):
            identity.update(self.clip.selection())
        return identity


@dataclass
class DiffutoonConditions:
    """Everything the denoiser needs besides latents and timestep, for one video, kept on the host.

    Explicit per-video state: a render can be resumed or split over devices from (latents, timestep, this).
    """

    prompt_embeds: torch.Tensor  # (1, L, D)
    negative_prompt_embeds: torch.Tensor | None  # (1, L, D); None without classifier-free guidance
    control_frames: list  # one uint8 frame array (N, H, W, 3) per ControlNet, in memory or in the render folder
    control_scales: list[float]
    windows: list[tuple[int, int]]  # eq. 2's sliding windows over the video's frames
    guidance_scale: float = 7.0
    batch_cfg: bool = True  # both CFG branches in one UNet batch per window
    cross_attention_kwargs: dict | None = None
    branch: str = "main"  # "main": controlnet; "edit": edit_controlnet (the editing branch)
    cross_frame: Any = None  # the editing branch's `attention_processors.CrossFrameState`, told each window's length
    reuse: bool | str = True  # compute what no window changes once per step and branch (issue 11); "host": cached there
    group: Any = None  # diffutoon.distributed.Group: the windows split over processes (issue 12)
    prompt_frames: tuple | None = None  # prompts over time: the key frames of prompt_embeds (K, L, D); None: (1, L, D)
    negative_prompt_frames: tuple | None = None
    image_embeds: list | None = None  # a style image's embeddings per IP-Adapter, (2, ...) negative + positive, host

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.negative_prompt_embeds is not None


@dataclass
class DiffutoonPipelineOutput(BaseOutput):
    """`frames[0]` is the rendered video (list of PIL images, array (N, H, W, 3) in [0, 1], or tensor
    (N, 3, H, W)); `color_frames` the editing branch's colour video when one was made, else None; `path` the
    output file when the frames were streamed into one (`output_path`)."""

    frames: Any
    color_frames: Any = None
    path: Any = None  # where the frames went when `output_path` was given (then `frames` is None)
    interrupted: bool = False  # stopped by `pipe._interrupt`; the render folder, if any, resumes it
    report: dict | None = None  # the quality report (diffutoon/report.py) when one was made


# ----------------------------------------------------------------------------------------------------------------


class DiffutoonPipeline(
    DiffusionPipeline,
    StableDiffusionMixin,
    TextualInversionLoaderMixin,
    StableDiffusionLoraLoaderMixin,
    FromSingleFileMixin,
    IPAdapterMixin,
):
    r"""Diffutoon's toon shading of a whole video: SD1.5 UNet + AnimateDiff motion modules + ControlNets
    (lineart for outlines, tile for colour), denoised with sliding windows over the whole video.

    Args:
        vae ([`AutoencoderKL`]), text_encoder ([`CLIPTextModel`]), tokenizer ([`CLIPTokenizer`]):
            Stable Diffusion 1.5's.
        unet ([`UNet2DConditionModel`] or [`UNetMotionModel`]): a 2D UNet is joined with `motion_adapter`
            without copying its weights.
        motion_adapter ([`MotionAdapter`], *optional*): AnimateDiff motion modules; not kept once joined.
        controlnet: one [`ControlNetModel`], a list of them, or a [`MultiControlNetModel`].
        scheduler: any diffusers scheduler you choose; None (the default) is [`DiffutoonDDIMScheduler`], the
            reference's DDIM. Built from a checkpoint that is not a saved Diffutoon pipeline (an SD1.5 folder or
            file), the pipeline ignores the checkpoint's own scheduler (see `extract_init_dict`).
        controlnet_conditions (`str`, defaults to `"lineart,tile"`): what each ControlNet is conditioned on when
            `conditioning_frames` does not say: `"lineart"` (controlnet-aux LineartDetector on the video) or
            `"tile"` (the video itself).
        image_encoder ([`CLIPVisionModelWithProjection`], *optional*), feature_extractor ([`CLIPImageProcessor`],
            *optional*): a style image's encoder and preprocessing, set by `load_ip_adapter` (diffusers' IP-Adapter).
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->unet->vae"
    # scheduler: None = the reference DDIM; image_encoder, feature_extractor: a style image (IP-Adapter)
    _optional_components = ["motion_adapter", "edit_controlnet", "scheduler", "image_encoder", "feature_extractor"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel | UNetMotionModel,
        controlnet: ControlNetModel | list[ControlNetModel] | tuple[ControlNetModel] | MultiControlNetModel,
        scheduler=None,
        motion_adapter: MotionAdapter | None = None,
        edit_controlnet: ControlNetModel | list[ControlNetModel] | MultiControlNetModel | None = None,
        controlnet_conditions: str = "lineart,tile",
        edit_controlnet_conditions: str = "softedge,depth",
        motion_adapter_kind: str | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
    ):
        super().__init__()
        if isinstance(unet, UNet2DConditionModel):
            if motion_adapter is None:
                raise ValueError("A 2D `unet` needs a `motion_adapter` (e.g. guoyww/animatediff-motion-adapter-v1-5-2).")
            unet = unet_motion_from_unet2d(unet, motion_adapter)
        if isinstance(controlnet, (list, tuple)):
            controlnet = MultiControlNetModel(list(controlnet))
        if scheduler is None:
            scheduler = DiffutoonDDIMScheduler()
        if isinstance(edit_controlnet, (list, tuple)):
            edit_controlnet = MultiControlNetModel(list(edit_controlnet))
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              controlnet=controlnet, scheduler=scheduler, motion_adapter=None,
                              edit_controlnet=edit_controlnet, image_encoder=image_encoder,
                              feature_extractor=feature_extractor)
        self.register_to_config(controlnet_conditions=controlnet_conditions,
                                edit_controlnet_conditions=edit_controlnet_conditions,
                                motion_adapter_kind=motion_adapter_kind)  # "lightning-4", "animatelcm": fast.py
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) else 8
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor)
        self._annotators = {}

    # ------------------------------------------------------------------------------------------------------------
    # Loading

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """diffusers' loaders (`from_pretrained`, also through `DiffusionPipeline.from_pretrained(...,
        custom_pipeline=...)`, and `from_single_file`) read the components to load from a checkpoint's
        model_index.json here. The scheduler of a checkpoint that is not a saved Diffutoon pipeline (SD1.5 ships
        PNDMScheduler, another sampler) was nobody's choice for this pipeline: it is not loaded, so `__init__` gets
        the `scheduler=` you passed, or None, the reference DDIM. A saved Diffutoon pipeline keeps its scheduler."""
        init_dict, unused_kwargs, hidden_dict = super().extract_init_dict(config_dict, **kwargs)
        name = config_dict.get("_class_name")
        ours = (name[-1] if isinstance(name, (list, tuple)) else name) == cls.__name__
        if not ours and isinstance(init_dict.get("scheduler"), (list, tuple)):
            logger.info(f"Not loading the checkpoint's {init_dict.pop('scheduler')[-1]}: sampling with the `scheduler` "
                        "you pass, else the reference DiffutoonDDIMScheduler.")
        return init_dict, unused_kwargs, hidden_dict

    @classmethod
    def from_models(cls, base: str, motion_adapter: str = HUB_MODELS["motion_adapter"],
                    controlnets: list[str] = (HUB_MODELS["lineart"], HUB_MODELS["tile"]),
                    edit_controlnets: list[str] | None = None, torch_dtype=None, **kwargs):
        """Assemble the pipeline from Hub ids or local paths: an SD1.5 `base` (diffusers folder or a single
        .safetensors/.ckpt file), the motion adapter and the ControlNets (lineart first, tile second by default);
        `edit_controlnets` (softedge, depth: `[HUB_MODELS["softedge"], HUB_MODELS["depth"]]`) enables the editing
        branch. `torch_dtype` defaults to float16 on CUDA, float32 otherwise. `scheduler=` picks another sampler.
        `motion_adapter` may also be an AnimateDiff-Lightning single file or AnimateLCM (folder or Hub id, its LoRA
        fused in): then sample with `fast_mode` (diffutoon/fast.py)."""
        if torch_dtype is None:
            torch_dtype = torch.float16 if torch.cuda.is_available() else torch.float32
        load = dict(dtype=torch_dtype, **{k: kwargs.pop(k) for k in ("cache_dir", "local_files_only", "token", "revision") if k in kwargs})

        def controlnet_from(path):
            if os.path.isfile(path):
                return ControlNetModel.from_single_file(path, **load)
            return ControlNetModel.from_pretrained(path, **load)

        adapter, kind, lcm_lora = load_motion_adapter(motion_adapter, kwargs.pop("motion_adapter_config", None), **load)
        nets = [controlnet_from(path) for path in controlnets]
        parts = dict(motion_adapter=adapter, controlnet=nets, motion_adapter_kind=kind, **kwargs)
        parts.setdefault("scheduler", DiffutoonDDIMScheduler())  # explicit: from_single_file's config may be inferred
        if edit_controlnets:
            parts["edit_controlnet"] = [controlnet_from(path) for path in edit_controlnets]
        loader = cls.from_single_file if os.path.isfile(base) else cls.from_pretrained
        pipe = loader(base, **parts, **load)
        pipe.register_to_config(motion_adapter_kind=kind)
        if lcm_lora is not None:  # AnimateLCM: its spatial LoRA at 0.8, fused (diffutoon/fast.py)
            load_lcm_lora(pipe, lcm_lora)
        return pipe

    # ------------------------------------------------------------------------------------------------------------
    # Opt-in features

    def enable_memory_efficient_attention(self, backend: str = "auto", chunk_size: int | None = None):
        """Exact memory-efficient attention in every component (text encoder, UNet and motion modules,
        ControlNets, VAE), paper 3.3: what lets one 1536x1536 frame fit. `backend`: "auto" (SDPA's flash /
        memory-efficient kernels, else query-chunked), "native", "chunked", "flash", "xformers" or "sage"."""
        processors = _import("attention_processors", "enable_memory_efficient_attention")
        self.disable_memory_efficient_attention()
        self._memory_efficient_snapshot = processors.enable_memory_efficient_attention(self, backend=backend,
                                                                                       chunk_size=chunk_size)
        self._memory_efficient_settings = (backend, chunk_size)  # kept across load_ip_adapter (diffutoon/style.py)

    def disable_memory_efficient_attention(self):
        """Put back exactly the attention processors that were there before `enable_memory_efficient_attention`."""
        snapshot = getattr(self, "_memory_efficient_snapshot", None)
        if snapshot is not None:
            _import("attention_processors", "disable_memory_efficient_attention").restore_attn_processors(self, snapshot)
            self._memory_efficient_snapshot = None

    def enable_forward_chunking(self, chunk_size: int = 4096):
        """Feed-forward on at most `chunk_size` tokens at a time in every transformer block: the UNet's, its motion
        modules' and the ControlNets' (main and editing). Exact (per token); the 4x-wide intermediate is held for one
        chunk only: 6 GB in fp16 for 32 frames at 1536x1536 unchunked. See diffutoon/memory.py."""
        for model in (self.unet, *self.controlnets, *self.edit_controlnets):
            set_forward_chunking(model, chunk_size)

    def disable_forward_chunking(self):
        """Every feed-forward on all its tokens at once again."""
        for model in (self.unet, *self.controlnets, *self.edit_controlnets):
            set_forward_chunking(model, None)

    def plan_memory(self, height: int = 512, width: int = 512, context_length: int = 16, batch_cfg: bool = True,
                    guidance_scale: float = 7.0, decode_chunk_size: int = 8, reuse_across_windows: bool = True,
                    strength: float = 1.0, motion_groupnorm: str = "per_frame", edit_prompt: str | None = None,
                    edit_kwargs: dict | None = None, memory_budget: str | int | None = None) -> MemoryPlan:
        """The fastest exact savings (memory-efficient attention, feed-forward chunks, one CFG branch per call, fewer
        frames per VAE call, each model on the device only for its stage, the reuse cache in host memory, the
        ControlNets on the device only for their call, and as the slow last resort model CPU offload) whose estimated
        peak fits `memory_budget` ("12GB"; default: the CUDA device's free memory minus a margin), for a call with
        these settings. `str(plan)` is one line; `pipe(..., memory_plan=plan)` runs with it. ValueError, naming the
        largest size that fits, if nothing does. See diffutoon/memory.py."""
        edit = None
        if edit_prompt is not None:
            defaults = {k: p.default for k, p in inspect.signature(self.make_color_video).parameters.items()
                        if p.default is not inspect.Parameter.empty}
            edit = {**defaults, **(edit_kwargs or {})}
        return plan_memory(self, height, width, context_length, batch_cfg, guidance_scale, decode_chunk_size,
                           reuse_across_windows, strength, edit, memory_budget,
                           per_frame_motion_groupnorm if motion_groupnorm == "per_frame" else None)

    def _call_plan(self, memory_plan, memory_budget, height, width, context_length, batch_cfg, guidance_scale,
                   decode_chunk_size, reuse_across_windows, strength, motion_groupnorm, edit_settings):
        """`__call__`'s plan: "auto" plans on CUDA (off CUDA only with a budget), None never, a `MemoryPlan` as given."""
        if memory_plan is None or isinstance(memory_plan, MemoryPlan):
            return memory_plan
        if memory_plan != "auto":
            raise ValueError(f"memory_plan must be 'auto', None or a MemoryPlan (pipe.plan_memory), got {memory_plan!r}.")
        if memory_budget is None and self._execution_device.type != "cuda":
            return None
        plan = plan_memory(self, height, width, context_length, batch_cfg, guidance_scale, decode_chunk_size,
                           reuse_across_windows, strength, edit_settings or None, memory_budget,
                           per_frame_motion_groupnorm if motion_groupnorm == "per_frame" else None)
        (logger.warning if plan.enabled else logger.info)(f"memory plan: {plan}")  # shown when it changes something
        return plan

    # ------------------------------------------------------------------------------------------------------------
    # A style image (diffusers' IP-Adapter, diffutoon/style.py)

    encode_image = StableDiffusionPipeline.encode_image
    prepare_ip_adapter_image_embeds = StableDiffusionPipeline.prepare_ip_adapter_image_embeds

    def load_ip_adapter(self, *args, **kwargs):
        """diffusers' `load_ip_adapter` (e.g. `("h94/IP-Adapter", subfolder="models", weight_name="ip-adapter_sd15.bin")`);
        memory-efficient attention, if on, stays on with its settings on the other layers."""
        with memory_efficient_kept(self):
            super().load_ip_adapter(*args, **kwargs)

    def unload_ip_adapter(self):
        """diffusers' `unload_ip_adapter`; memory-efficient attention, if on, stays on with its settings."""
        with memory_efficient_kept(self):
            super().unload_ip_adapter()

    # ------------------------------------------------------------------------------------------------------------
    # Text

    def encode_prompt(self, prompt: str, device: torch.device, clip_skip: int | None = None,
                      long_prompt: str = "chunks") -> torch.Tensor:
        """CLIP text embedding (1, 77 k, D) of one prompt, with textual-inversion keywords expanded.

        `clip_skip=1` takes the penultimate layer, followed by the final layer norm (A1111 "clip skip 2").
        A prompt of more than 75 tokens becomes k rows of 77 tokens, encoded each on its own and concatenated:
        `long_prompt="chunks"` (default, A1111's way) gives every 75 tokens their own BOS/EOS; "reference" (the
        authors' code) pads BOS + tokens + EOS to a multiple of 77 and splits it raw; "truncate" keeps the first 75
        tokens (diffusers' SD pipelines). See `diffutoon.prompts.token_rows`.
        """
        prompt = self.maybe_convert_prompt(prompt, self.tokenizer)
        ids = self.tokenizer(prompt, truncation=False, add_special_tokens=False).input_ids
        input_ids = torch.tensor(token_rows(self.tokenizer, ids, long_prompt), device=device)
        text_model = getattr(self.text_encoder, "text_model", self.text_encoder)  # transformers < 5.6 wraps it
        if clip_skip:
            hidden = self.text_encoder(input_ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
            embeds = text_model.final_layer_norm(hidden)
        else:
            embeds = self.text_encoder(input_ids)[0]
        return embeds.reshape(1, -1, embeds.shape[-1]).to(dtype=self.unet.dtype)

    # ------------------------------------------------------------------------------------------------------------
    # Conditions

    @property
    def controlnets(self) -> list[ControlNetModel]:
        """The main pass's ControlNets, in the order of `controlnet_conditions`."""
        return _nets(self.controlnet)

    @property
    def edit_controlnets(self) -> list[ControlNetModel]:
        """The editing branch's ControlNets (`edit_controlnet_conditions`), or [] when none are loaded."""
        return _nets(self.edit_controlnet) if getattr(self, "edit_controlnet", None) is not None else []

    def load_annotator(self, kind: str):
        """controlnet-aux's detector for `kind` (see `ANNOTATORS`) from lllyasviel/Annotators, loaded once."""
        if kind not in self._annotators:
            controlnet_aux = _import("controlnet_aux", f"The default {kind} condition (pass `conditioning_frames` to "
                                     "skip the annotator)", "pip install controlnet-aux")
            detector = getattr(controlnet_aux, ANNOTATORS[kind]).from_pretrained(HUB_MODELS["annotators"])
            self._annotators[kind] = detector.to(self._execution_device)
        return self._annotators[kind]

    def annotate(self, frames: torch.Tensor, kind: str, detector=None, progress: bool = True) -> torch.Tensor:
        """`kind` condition of uint8 frames (N, 3, H, W) at their own resolution, called as the reference's
        annotator does (detect and output at min(H, W), then resized back)."""
        detector = detector or self.load_annotator(kind)
        n, _, h, w = frames.shape
        resolution = max(min(h, w), 64)  # controlnet-aux rounds sizes to multiples of 64: below 64 it would crash
        out = torch.empty_like(frames)
        for i in self._bar(range(n), desc=kind) if progress else range(n):
            image = PIL.Image.fromarray(frames[i].permute(1, 2, 0).numpy())
            result = detector(image, detect_resolution=resolution, image_resolution=resolution).convert("RGB")
            out[i] = torch.from_numpy(np.array(result.resize((w, h)))).permute(2, 0, 1)
        return out

    def prepare_control_frames(self, run, source: _VideoSource, conditioning_frames, kinds: list[str], height: int,
                               width: int, detectors: dict | None = None, colors=None, branch: str = "main") -> list:
        """uint8 condition frames (N, H, W, 3) per ControlNet: the user's, the video itself for "tile" (`colors`
        instead when given: the editing branch's colour video), or an annotator's output. Made CHUNK frames at a time
        into `run`'s frame arrays (host memory, or the render folder, where chunks written before a crash are kept)."""
        n, prefix = len(source), "" if branch == "main" else f"{branch}/"
        arrays = [run.frames(f"{prefix}conditions/{i}-{kind}", (n, height, width, 3), np.uint8)
                  for i, kind in enumerate(kinds)]
        given = conditioning_frames or [None] * len(kinds)
        colors = None if colors is None else _as_source(colors)
        with self._bar(total=n, desc=f"{branch} conditions ({', '.join(kinds)})") as bar:
            for chunk, start in enumerate(range(0, n, CHUNK)):
                end = min(start + CHUNK, n)
                todo = [i for i, (_, log) in enumerate(arrays) if not log.done(chunk)]
                video = source.resized(start, end, height, width) if todo else None
                for i in todo:
                    if kinds[i] == "tile" and colors is not None:
                        frames = colors.resized(start, end, height, width)
                    elif given[i] is not None:
                        frames = _resize_uint8(_video_to_uint8(given[i][start:end], "conditioning_frames"), height,
                                               width)
                    elif kinds[i] == "tile":
                        frames = video
                    else:
                        frames = self.annotate(video, kinds[i], (detectors or {}).get(kinds[i]), progress=False)
                    arrays[i][0].write(start, frames.permute(0, 2, 3, 1).numpy())
                    arrays[i][1].mark(chunk)
                bar.update(end - start)
                trim_host_memory()  # as after each window: flat host memory
                run.report(stage="conditions", **{"pass": branch}, done=end, total=n, frames=n)
        return [frames for frames, _ in arrays]

    # ------------------------------------------------------------------------------------------------------------
    # The denoiser: a pure function of (latents, timestep, conditions)

    def _latent_window(self, latents, start: int, end: int) -> torch.Tensor:
        """Frames [start, end) of a latent frame array (N, C, h, w) as (1, C, f, h, w) on the execution device."""
        window = torch.from_numpy(np.ascontiguousarray(latents.read(start, end))).transpose(0, 1)[None]
        return window.to(self._execution_device, self.unet.dtype).contiguous()

    def _window_noise_pred(self, latents: torch.Tensor, t, cond: DiffutoonConditions, start: int, end: int,
                           reuse: WindowReuse | None = None) -> torch.Tensor:
        """The whole denoiser on frames [start, end): ControlNets + UNet + motion modules, CFG included (eq. 3, 6).
        `latents` is the window (1, C, F, h, w) on the execution device; returns the guided prediction."""
        if not cond.do_classifier_free_guidance:
            return self._branch_noise_pred(latents, t, cond, start, end, reuse, "single")
        if cond.batch_cfg:
            noise_neg, noise_pos = self._branch_noise_pred(latents.expand(2, -1, -1, -1, -1), t, cond, start, end,
                                                           reuse, "cfg").chunk(2)
        else:
            noise_neg = self._branch_noise_pred(latents, t, cond, start, end, reuse, "neg")
            noise_pos = self._branch_noise_pred(latents, t, cond, start, end, reuse, "pos")
        return classifier_free_guidance(noise_neg, noise_pos, cond.guidance_scale)

    def _controlnet_residuals(self, latents, t, embeds, cond: DiffutoonConditions, start: int, end: int):
        """Sum over ControlNets of scale x residuals for frames [start, end) of B branches: latents (B, C, F, h, w),
        embeds (B F, L, D), each ControlNet with its branch's embedding. Returns (down residuals, mid residual)."""
        device, dtype = latents.device, self.unet.dtype
        b, c, f, h, w = latents.shape
        frames_latents = latents.transpose(1, 2).reshape(b * f, c, h, w)
        nets = self.edit_controlnets if cond.branch == "edit" else self.controlnets
        down, mid = None, None
        for net, frames, scale in zip(nets, cond.control_frames, cond.control_scales):
            image = torch.from_numpy(np.ascontiguousarray(frames.read(start, end))).permute(0, 3, 1, 2).contiguous()
            image = (image.to(device).to(dtype) / 255).repeat(b, 1, 1, 1)
            d, m = net(frames_latents, t, encoder_hidden_states=embeds, controlnet_cond=image,
                       conditioning_scale=scale, return_dict=False)
            down = d if down is None else [x.add_(y) for x, y in zip(down, d)]  # in place: one set fewer held
            mid = m if mid is None else mid.add_(m)
        return down, mid

    @staticmethod
    def _frame_embeds(cond: DiffutoonConditions, key: str, start: int, end: int) -> torch.Tensor:
        """The text embeddings (B F, L, D), branch-major, of frames [start, end) for the CFG branch group `key`
        ("cfg": negative then positive, "neg", "pos", "single"): each frame its own (prompts over time)."""
        positive = frame_embeds(cond.prompt_embeds, cond.prompt_frames, start, end)
        if key in ("single", "pos"):
            return positive
        negative = frame_embeds(cond.negative_prompt_embeds, cond.negative_prompt_frames, start, end)
        return negative if key == "neg" else torch.cat([negative, positive])

    def _branch_noise_pred(self, latents, t, cond, start, end, reuse=None, key="single"):
        """One UNet call on a batch of B windows (B = CFG branches); the ControlNet residuals and the UNet's first
        layers come from `reuse` when given (computed once per frame and step), else are computed here."""
        b, f = latents.shape[0], latents.shape[2]
        embeds = self._frame_embeds(cond, key, start, end).to(latents.device, self.unet.dtype)  # (B F, L, D)
        if cond.cross_frame is not None:
            cond.cross_frame.num_frames = f  # joint attention within each branch's f frames
        if reuse is None:
            down, mid = self._controlnet_residuals(latents, t, embeds, cond, start, end)
            prefix = nullcontext()
        else:
            down, mid = reuse.controlnet_residuals(key, b, start, end)
            prefix = reuse.unet_prefix(self.unet, key, b, start, end)
        with prefix:
            return self.unet(latents, t, encoder_hidden_states=embeds, cross_attention_kwargs=cond.cross_attention_kwargs,
                             down_block_additional_residuals=down, mid_block_additional_residual=mid,
                             added_cond_kwargs=window_image_embeds(cond.image_embeds, key, latents.device,
                                                                   self.unet.dtype)).sample

    def _window_reuse(self, latents, t, cond: DiffutoonConditions) -> WindowReuse:
        """The caches of one step's per-frame work (diffutoon/reuse.py), fed from the full-length latents."""
        def inputs(key, start, end):
            x = self._latent_window(latents, start, end)
            e = self._frame_embeds(cond, key, start, end).to(x.device, self.unet.dtype)  # (B F, L, D)
            return x.expand(e.shape[0] // (end - start), -1, -1, -1, -1), e

        def controlnet(key, start, end):
            x, e = inputs(key, start, end)
            down, mid = self._controlnet_residuals(x, t, e, cond, start, end)
            return [*down, mid]

        def prefix(key, start, end):
            x, e = inputs(key, start, end)
            return compute_prefix(self.unet, x, t, encoder_hidden_states=e,
                                  cross_attention_kwargs=cond.cross_attention_kwargs,
                                  added_cond_kwargs=window_image_embeds(cond.image_embeds, key, x.device, x.dtype))

        # the editing branch's first transformer attends across frames: only its ControlNets are per frame
        window_independent_prefix = cond.cross_frame is None and has_prefix(self.unet)
        return WindowReuse(cond.windows, controlnet, prefix if window_independent_prefix else None,
                           host=cond.reuse == "host")  # the memory plan's reuse cache in host memory

    def iter_window_predictions(self, latents, t, cond: DiffutoonConditions, windows=None):
        """Yield (start, end, weighted prediction) for `windows` (default: all), in order: eq. 4's normalised weight
        times the window's guided noise prediction, float32 (1, C, f, h, w) on the host. Stops early on interrupt.
        `latents` is a frame array (N, C, h, w) (diffutoon/render_folder.py)."""
        weights = dict(zip(cond.windows, window_blend_weights(cond.windows, len(latents))))
        windows = cond.windows if windows is None else list(windows)
        reuse = self._window_reuse(latents, t, cond) if cond.reuse else None
        self._last_reuse = reuse  # tests read how much it held
        for k, (start, end) in enumerate(windows):
            if self.interrupt:
                return
            noise = self._window_noise_pred(self._latent_window(latents, start, end), t, cond, start, end, reuse)
            yield start, end, weights[(start, end)].view(1, 1, -1, 1, 1) * noise.float().cpu()
            if reuse is not None:  # what no later window covers is dropped
                reuse.release_before(windows[k + 1][0] if k + 1 < len(windows) else end)

    def denoise_windows(self, latents, t, cond: DiffutoonConditions, windows=None, out=None, on_window=None):
        """Sum over `windows` (default: all) of their weighted predictions into `out`, a zeroed float32 frame array
        (N, C, h, w) (default: a new one in host memory); None if interrupted before the last window. Summing the
        results of disjoint window sets (e.g. across devices) gives `denoise`."""
        windows = cond.windows if windows is None else list(windows)
        out = HostFrames(np.zeros(latents.shape, np.float32)) if out is None else out
        done = 0
        for start, end, weighted in self.iter_window_predictions(latents, t, cond, windows):
            out.write(start, out.read(start, end) + weighted[0].transpose(0, 1).numpy())
            done += 1
            if on_window is not None:
                on_window()
        return out if done == len(windows) else None

    def denoise(self, latents, t, cond: DiffutoonConditions, out=None, on_window=None):
        """The full-length noise prediction (N, C, h, w) for the whole video at timestep `t` (eqs. 3-7), as a frame
        array; `latents` is one too. None if interrupted. With `cond.group` each process runs its share of the
        windows and every process gets the same prediction, bit-identical to one process (diffutoon/distributed.py)."""
        if cond.group is None:
            return self.denoise_windows(latents, t, cond, out=out, on_window=on_window)
        out = HostFrames(np.zeros(latents.shape, np.float32)) if out is None else out
        predict = lambda windows: self.iter_window_predictions(latents, t, cond, windows)  # noqa: E731
        return cond.group.denoise(predict, cond.windows, out, on_window, lambda: self.interrupt)

    # ------------------------------------------------------------------------------------------------------------
    # VAE

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor, chunk_size: int = 8) -> torch.Tensor:
        """Posterior mean times the scaling factor of uint8 frames (N, 3, H, W) -> (1, 4, N, h, w) on the host."""
        device, dtype = self._execution_device, self.vae.dtype
        out = []
        for i in range(0, frames.shape[0], chunk_size):
            pixels = frames[i : i + chunk_size].to(device).to(dtype) / 127.5 - 1
            out.append(self.vae.encode(pixels).latent_dist.mean.float().cpu() * self.vae.config.scaling_factor)
        return torch.cat(out).transpose(0, 1)[None]

    def _decoded(self, latents, decode_chunk_size: int, output_type: str, desc: str = "decoding", report=None,
                 group=None):
        """Decode a latent frame array (N, C, h, w) a chunk of frames at a time; yields each chunk as `output_type`
        ("np": float (n, H, W, 3) in [0, 1]; "pt": (n, 3, H, W); "uint8": (n, H, W, 3), as diffusers' numpy_to_pil).
        `report(**progress)` hears of each chunk. With a process `group` the chunks are dealt round-robin and rank 0
        alone yields them all, in order."""
        device, dtype, n = self._execution_device, self.vae.dtype, len(latents)

        def decode(i):
            if report is not None:
                report(stage="decoding", done=i, total=n)
            z = torch.from_numpy(np.ascontiguousarray(latents.read(i, i + decode_chunk_size)))
            pixels = self.vae.decode(z.to(device, dtype) / self.vae.config.scaling_factor).sample.float()
            chunk = self.video_processor.postprocess(pixels, output_type="pt" if output_type == "pt" else "np")
            del pixels
            trim_host_memory()  # as after each window: flat host memory
            if output_type == "uint8":
                chunk = (chunk * 255).round().astype(np.uint8)
            return chunk.cpu() if output_type == "pt" else chunk

        chunks = map_chunks(group, "decoding", range(0, n, decode_chunk_size), decode, dst=0)
        for _, chunk in self._bar(chunks, total=-(-n // decode_chunk_size), desc=desc):
            yield chunk

    @torch.no_grad()
    def decode_latents(self, latents, decode_chunk_size: int = 8, output_type: str = "pil", report=None, group=None):
        """Decode latents (1, C, N, h, w), or a latent frame array (N, C, h, w), a chunk of frames at a time into
        `output_type` frames ("pil", "np", "pt", or "uint8": an array (N, H, W, 3), a quarter of "np"). With a process
        `group`, every rank decodes its share and rank 0 gets the frames (the others None)."""
        if isinstance(latents, torch.Tensor):
            latents = HostFrames(latents[0].transpose(0, 1).numpy())
        kind = "uint8" if output_type == "pil" else output_type
        chunks = list(self._decoded(latents, decode_chunk_size, kind, report=report, group=group))
        if not chunks:  # another process (rank 0) has the frames
            return None
        if output_type == "pil":
            return [PIL.Image.fromarray(frame) for chunk in chunks for frame in chunk]
        return torch.cat(chunks) if output_type == "pt" else np.concatenate(chunks)

    # ------------------------------------------------------------------------------------------------------------
    # Checks

    def _check_pass(self, video: torch.Tensor, nets: list, conditions: str, height, width, num_inference_steps,
                    strength, context_length, context_stride, controlnet_conditioning_scale, conditioning_frames,
                    guidance_scale=7.0, clip_skip=None, decode_chunk_size=8, where: str = ""):
        """The checks the main pass and the editing branch share; `conditions` names the config entry of the
        pass's ControlNet kinds, `where` the pass in the messages."""
        n, kinds = video.shape[0], self.config[conditions].split(",")
        if len(kinds) != len(nets):
            raise ValueError(f"{conditions} {self.config[conditions]!r} names {len(kinds)} conditions for {len(nets)} "
                             f"{where}ControlNets: name one per ControlNet.")
        if not all(isinstance(v, numbers.Integral) for v in (height, width)):
            raise ValueError(f"{where}height and width must be whole numbers, got {height!r}x{width!r}.")
        if height % 8 or width % 8 or height <= 0 or width <= 0:
            raise ValueError(f"{where}height and width must be positive multiples of 8, got {height}x{width}: "
                             f"try {max(8, height // 8 * 8)}x{max(8, width // 8 * 8)}.")
        for name, value in (("num_inference_steps", num_inference_steps), ("context_length", context_length),
                            ("context_stride", context_stride), ("decode_chunk_size", decode_chunk_size)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise ValueError(f"{where}{name} must be a whole number, got {value!r}.")
        if num_inference_steps < 1:
            raise ValueError(f"{where}num_inference_steps must be >= 1, got {num_inference_steps}.")
        if not (_finite(strength) and 0 < strength <= 1):
            raise ValueError(f"{where}strength must be in (0, 1] (1 starts from pure noise), got {strength}.")
        if context_stride <= 0 or context_stride >= context_length:
            raise ValueError(f"{where}context_stride must satisfy 0 < context_stride < context_length "
                             f"(got stride {context_stride}, length {context_length}): windows must overlap.")
        if not (_finite(guidance_scale) and 0 <= guidance_scale <= 100):
            raise ValueError(f"{where}guidance_scale must be a number in [0, 100] (<= 1 turns guidance off; the "
                             f"reference uses 7), got {guidance_scale}.")
        layers = self.text_encoder.config.num_hidden_layers
        if clip_skip is not None and not 0 <= clip_skip < layers:
            raise ValueError(f"{where}clip_skip must be in [0, {layers - 1}] (the text encoder has {layers} layers; 1 is "
                             f"A1111's 'clip skip 2'), got {clip_skip}.")
        if decode_chunk_size < 1:
            raise ValueError(f"{where}decode_chunk_size must be >= 1 (frames per VAE call), got {decode_chunk_size}.")
        scales = controlnet_conditioning_scale
        if isinstance(scales, (list, tuple)) and len(scales) != len(nets):
            raise ValueError(f"{where}controlnet_conditioning_scale has {len(scales)} values for {len(nets)} ControlNets.")
        if not all(_finite(v) and abs(v) <= 100 for v in (scales if isinstance(scales, (list, tuple)) else [scales])):
            raise ValueError(f"{where}controlnet_conditioning_scale must be numbers in [-100, 100] (the reference uses "
                             f"0.5), got {scales}.")
        if conditioning_frames is not None:
            if not isinstance(conditioning_frames, (list, tuple)) or len(conditioning_frames) != len(nets):
                raise ValueError(f"{where}conditioning_frames must be a list with one entry (frames or None) per "
                                 f"ControlNet ({len(nets)}), in the order {kinds}.")
            for kind, frames in zip(kinds, conditioning_frames):
                if frames is not None and len(frames) != n:
                    raise ValueError(f"{where}conditioning_frames for '{kind}' has {len(frames)} frames, the video {n}: "
                                     f"pass one condition frame per video frame.")
                _check_values(frames, f"{where}`conditioning_frames` for '{kind}'")

    def check_inputs(self, video: torch.Tensor, prompt, negative_prompt, height, width, num_inference_steps,
                     guidance_scale, context_length, context_stride, controlnet_conditioning_scale,
                     conditioning_frames, strength, output_type, callback_on_step_end_tensor_inputs, latents,
                     clip_skip=None, decode_chunk_size=8):
        """Every cheap check, before any model runs; each error says what to change."""
        n = video.shape[0]
        self._check_pass(video, self.controlnets, "controlnet_conditions", height, width, num_inference_steps, strength,
                         context_length, context_stride, controlnet_conditioning_scale, conditioning_frames,
                         guidance_scale, clip_skip, decode_chunk_size)
        if "strength" not in inspect.signature(self.scheduler.set_timesteps).parameters and \
                int(num_inference_steps * strength) < 1:  # diffusers' img2img convention keeps int(T s) steps
            raise ValueError(f"strength {strength} keeps no step of {num_inference_steps} with "
                             f"{type(self.scheduler).__name__}: raise num_inference_steps or strength.")
        limit = self.unet.config.get("motion_max_seq_length", 32)
        if context_length > limit:
            raise ValueError(f"context_length {context_length} exceeds the motion modules' positional limit of {limit} "
                             f"frames: use context_length <= {limit}.")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}.")
        unknown = set(callback_on_step_end_tensor_inputs or []) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {sorted(unknown)} not in {self._callback_tensor_inputs}.")
        if latents is not None:
            expected = (1, self.unet.config.in_channels, n, height // self.vae_scale_factor, width // self.vae_scale_factor)
            if tuple(latents.shape) != expected:
                raise ValueError(f"latents must have shape {expected} (1, C, frames, h, w), got {tuple(latents.shape)}.")

    # ------------------------------------------------------------------------------------------------------------

    def _bar(self, iterable=None, total=None, desc=None):
        """diffusers' progress bar (honours `set_progress_bar_config`) with a label."""
        from tqdm.auto import tqdm

        config = {"desc": desc, **getattr(self, "_progress_bar_config", {})}
        return tqdm(iterable, total=total, **config)

    # diffusers' call-state properties: set by `__call__`, read at every step, changeable by `callback_on_step_end`

    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self):
        return self._guidance_scale > 1

    @property
    def interrupt(self):
        return getattr(self, "_interrupt", False)

    @property
    def num_timesteps(self):
        return self._num_timesteps

    def _step_conditions(self, cond: DiffutoonConditions) -> DiffutoonConditions:
        """`cond` as the properties stand now: a callback may have changed `_guidance_scale`, and at <= 1 the
        negative branch no longer runs (what diffusers' `SDCFGCutoffCallback` relies on)."""
        negative = cond.negative_prompt_embeds if self.do_classifier_free_guidance else None
        return dataclasses.replace(cond, guidance_scale=self.guidance_scale, negative_prompt_embeds=negative)

    @staticmethod
    def _timesteps(scheduler, num_inference_steps: int, strength: float, device) -> torch.Tensor:
        """The reference list for `DiffutoonDDIMScheduler`; diffusers' img2img convention for other schedulers."""
        if "strength" in inspect.signature(scheduler.set_timesteps).parameters:
            scheduler.set_timesteps(num_inference_steps, strength=strength)
            return scheduler.timesteps
        scheduler.set_timesteps(num_inference_steps, device=device)
        start = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
        timesteps = scheduler.timesteps[start * scheduler.order :]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start * scheduler.order)
        return timesteps

    @_one_call_at_a_time
    @torch.no_grad()
    def __call__(
        self,
        video=None,
        prompt: str | list[str] = DEFAULT_PROMPT,
        negative_prompt: str | list[str] | None = "",
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 10,
        guidance_scale: float = 7.0,
        context_length: int = 16,
        context_stride: int = 8,
        controlnet_conditioning_scale: float | list[float] = 0.5,
        conditioning_frames: list | None = None,
        clip_skip: int | None = 1,
        strength: float = 1.0,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        decode_chunk_size: int = 8,
        lineart_detector=None,
        motion_groupnorm: str = "per_frame",
        batch_cfg: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        edit_prompt: str | None = None,
        color_video=None,
        edit_kwargs: dict | None = None,
        reuse_across_windows: bool = True,
        render_dir: str | os.PathLike | None = None,
        fresh: bool = False,
        keep_render_dir: bool = False,
        output_path: str | os.PathLike | None = None,
        fps: float | None = None,
        progress_callback: Callable[[dict], None] | None = None,
        distributed: bool | None = None,
        overwrite: bool = False,
        memory_plan: str | MemoryPlan | None = "auto",
        memory_budget: str | int | None = None,
        fast_mode: str | None = None,
        preview: bool | str | os.PathLike | None = None,
        preview_vae=None,
        keyframes: dict | None = None,
        keyframe_kwargs: dict | None = None,
        scene_cuts: str | list[int] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        long_prompt: str = "chunks",
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
    ):
        r"""Render `video` in the toon style.

        Args:
            video: the input video: list of PIL images, an array / tensor / list of frames laid out (N, H, W, 3) or
                (N, 3, H, W), uint8 or floats in [0, 1] (a [0, 255] float video is refused: divide by 255); or a
                video file (path, or a `diffutoon.video.VideoClip` selecting and resizing frames), decoded a range
                of frames at a time.
            prompt / negative_prompt: one string each, or a dict {frame_index: prompt} (prompts over time, as
                diffusers' AnimateDiff pipelines take them): each frame's text embedding is interpolated linearly
                between the surrounding key frames (before the first key: the first; after the last: the last), and
                every frame of every window is conditioned on its own. The reference's negative prompt is the textual
                inversion `verybadimagenegative_v1.3` (load it with `load_textual_inversion`).
            height, width: output size (multiples of 8); defaults to the video's. Frames are centre-cropped and resized.
            num_inference_steps (10), guidance_scale (7.0): DDIM steps and CFG scale g of eq. 6.
            context_length (16), context_stride (8): the sliding windows of eq. 2 (window d, stride s).
            controlnet_conditioning_scale (0.5): one value or one per ControlNet.
            conditioning_frames: one entry per ControlNet: frames you computed, or None for the default
                (`controlnet_conditions`: lineart from controlnet-aux's LineartDetector, tile = the video itself).
            clip_skip (1): 1 is the A1111 "clip skip 2" (penultimate CLIP layer + final layer norm); None: last layer.
            strength (1.0): 1 starts from pure noise (the reference); < 1 starts from the noised video (img2img).
            generator, latents: the initial noise, shape (1, 4, N, H/8, W/8), drawn on the host.
            output_type: "pil", "np", "pt" or "latent". return_dict: a `DiffutoonPipelineOutput` or a tuple.
            callback_on_step_end, callback_on_step_end_tensor_inputs: as in diffusers.
            decode_chunk_size (8): frames per VAE decode call.
            lineart_detector: a callable (PIL -> PIL) such as controlnet-aux's `LineartDetector`; loaded lazily if needed.
            motion_groupnorm ("per_frame"): the reference's per-frame GroupNorm in the motion modules, or
                "diffusers" for diffusers' GroupNorm over all frames of a window.
            batch_cfg (True): run both CFG branches in one UNet batch per window (False: half the activation memory).
            cross_attention_kwargs: passed to the UNet's attention processors (e.g. {"scale": 0.7} for LoRA).
            edit_prompt: run the editing branch (`make_color_video`) with this prompt; its colour video replaces the
                tile ControlNet's input and is returned as `color_frames`. Needs `edit_controlnet` loaded.
            color_video: your own colour video (one frame per video frame) for the tile ControlNet instead.
            edit_kwargs: settings of the editing branch over SPEC's defaults (see `make_color_video`).
            reuse_across_windows (True): compute each frame's ControlNet residuals and the UNet's layers before its
                first motion module once per step and CFG branch, and reuse them in every window covering the frame
                (the same result within float rounding, about 0.77x the work at 1536x1536). False: the reference's
                schedule, where every window runs everything.
            render_dir: a folder for the render's state (condition frames, the latents after every step, progress):
                host memory then stays bounded by a window whatever the length, and the same call with the same
                folder resumes after a crash, bit-identical to an uninterrupted render. A folder holding another
                render is refused, naming what differs. Removed once the output is complete.
            fresh (False): start over, wiping what `render_dir` holds. keep_render_dir (False): keep it afterwards.
            output_path: stream the frames into this video file (.mp4, .mov, .m4v, .mkv; written under a temporary
                name and moved into place when complete, replacing what was there) or folder of PNGs, instead of
                returning them; `fps` defaults to the source file's. The source file's audio is kept.
            progress_callback: `fn(progress: dict)` after every window and stage change: stage, pass, step, steps,
                window, windows, done, total, eta_seconds... (the dict `render_dir/progress.json` holds).
            distributed (None): a call made inside an initialised torch.distributed process group of several processes
                (torchrun; every process makes the same call) splits the render over them, bit-identical to one
                process: each runs a share of the windows of every step and of the per-frame work; rank 0 alone owns
                `render_dir` and writes `output_path`, and gets the frames (the others get `frames=None`). False: each
                process renders on its own; True: require a process group. See README "Several GPUs".
            overwrite (False): replace an existing `output_path` (else refused before any work, as the CLI does).
            memory_plan ("auto"): on CUDA, pick the fastest exact savings whose estimated peak fits the device's free
                memory (or `memory_budget`) and log it in one line (progress dict key "memory_plan"); off CUDA only
                with a `memory_budget`. None: run as set up. A `MemoryPlan` (`pipe.plan_memory(...)`): that one.
                Nothing fits: a ValueError naming the largest size that does, before any frame is read.
            memory_budget: the memory the render may use, weights included, e.g. "12GB" (default: the free memory).
            fast_mode (None): few-step sampling with a distilled motion adapter (diffutoon/fast.py, README "Fast
                mode"): "lightning-1/2/4/8" (trailing Euler, guidance 1), "lcm-4/6/8" (LCM), "auto" (the preset of the
                adapter `from_models` loaded) or "off" (sample as asked, whatever the adapter). It sets the scheduler,
                and the steps and guidance left at their defaults. None: a distilled adapter with settings it was not
                made for is refused with one ValueError.
            preview (None): live previews of the clean-video estimate after every step (diffutoon/previews.py): None
                writes `previews/latest.png` into `render_dir` when there is one; False: none; a path (.png/.jpg:
                a strip of frames, .mp4/.gif: every frame) is kept up to date as well (it may replace an earlier
                preview only: a path holding any other file is refused before the render). `progress_callback` hears of
                each: "preview" (the file), "preview_step". Never part of the render's identity or result.
            preview_vae: an `AutoencoderTiny` (TAESD, madebyollin/taesd) for sharper previews; default: a linear map
                of the latent channels to RGB at latent size.
            keyframes: painted frames {frame index: image (PIL, array, or file path)}: FastBlend's interpolation
                propagates them over the video, guided by its frames, into the colour video of the tile ControlNet
                (returned as `color_frames`); each keyframe index gets its keyframe exactly. A keyframe has the
                video's aspect ratio (any resolution) or the render's and is centre-cropped and resized as the frames
                are. Not with `edit_prompt` or `color_video` (they fill the same slot). See diffutoon/keyframes.py.
            keyframe_kwargs: FastBlend `interpolate_video` options for the keyframes (batch_size, minimum_patch_size
                (15), num_iter (5), guide_weight (10), seed...).
            scene_cuts (None): "auto" (PySceneDetect's content detector, run over the frames before any model runs),
                or a list of frame indices, each the first frame of a new shot: every shot is rendered on its own (no
                sliding window spans a cut; FastBlend of the editing branch and of the keyframes runs per shot). The
                cuts used are reported as `progress["scene_cuts"]`. None: one shot (no detection).
            prompt_embeds / negative_prompt_embeds: text embeddings (1, L, D) instead of `prompt` / `negative_prompt`
                (e.g. compel's weighted prompts), diffusers' SD rules: not both a prompt and its embeddings; both
                given: the same shape (with `batch_cfg`). The editing branch uses `negative_prompt_embeds` too.
            long_prompt ("chunks"): how a prompt of more than 75 tokens is encoded. "chunks" (A1111's way): each 75
                tokens get their own BOS/EOS in a row of 77, the rows' encodings concatenated. "reference" (the
                authors' code): BOS + all tokens + EOS padded to a multiple of 77 and split raw, so later rows start
                without BOS. "truncate": the first 75 tokens (diffusers' SD pipelines). Both passes.
            ip_adapter_image / ip_adapter_image_embeds: a style image (one per loaded IP-Adapter) or its embeddings
                (diffusers' layout: a list, one tensor per IP-Adapter, negative and positive stacked with guidance),
                after `load_ip_adapter`; `set_ip_adapter_scale` sets its weight (per block too). Encoded once, used
                by every window of both passes (the editing branch too).

        Setting `pipe._interrupt = True` (from a callback or another thread) stops at the next window. With
        `render_dir`, the call then returns `frames=None, interrupted=True` and the folder resumes it later;
        without, the last completed step is decoded, as in diffusers.

        Examples:
        """
        arguments = dict(locals())  # the call as given: the render folder's identity is made from it
        # 0. The input: frames in memory, or a video file decoded a range of frames at a time
        if video is None:
            raise ValueError("`video` is required: a list of PIL images, a uint8 array (N, H, W, 3) or a video file.")
        source = _as_source(video)
        height, width = source.height if height is None else height, source.width if width is None else width
        if motion_groupnorm not in ("per_frame", "diffusers"):
            raise ValueError(f"motion_groupnorm must be 'per_frame' or 'diffusers', got {motion_groupnorm!r}.")
        if self.scheduler is None:  # e.g. saved and reloaded with optional components None: None is the reference DDIM
            self.scheduler = DiffutoonDDIMScheduler()
        # The sampler: the pipeline's, or a fast preset's with its steps and guidance (diffutoon/fast.py)
        scheduler, num_inference_steps, guidance_scale, generator = fast_settings(
            self.scheduler, self.config.get("motion_adapter_kind"), fast_mode, num_inference_steps, guidance_scale,
            strength, generator)
        # the render's identity: what samples (scheduler, steps, guidance), however it was asked for
        arguments.update(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, _sampler=scheduler)
        Previewer.check(preview, output_path, getattr(source.clip, "path", None))

        # 1. Check inputs before any model runs
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs  # diffusers' callback objects
        self.check_inputs(source, prompt, negative_prompt, height, width, num_inference_steps, guidance_scale,
                          context_length, context_stride, controlnet_conditioning_scale, conditioning_frames, strength,
                          output_type, callback_on_step_end_tensor_inputs, latents, clip_skip, decode_chunk_size)
        check_text_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, long_prompt, len(source),
                          DEFAULT_PROMPT, self.unet.config.cross_attention_dim, guidance_scale > 1, batch_cfg)
        check_style(self, ip_adapter_image, ip_adapter_image_embeds, guidance_scale > 1)
        edit_settings = self._check_edit(source, edit_prompt, color_video, edit_kwargs)
        if edit_settings and ip_adapter_image_embeds is not None and edit_settings["guidance_scale"] > 1:
            check_style(self, None, ip_adapter_image_embeds, True, "the editing branch")  # its negative side too
        fps = self._check_output(output_path, fps, source, overwrite)
        plan = self._call_plan(memory_plan, memory_budget, height, width, context_length, batch_cfg, guidance_scale,
                               decode_chunk_size, reuse_across_windows, strength, motion_groupnorm, edit_settings)
        prompt, negative_prompt = text_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        kinds = self.config.controlnet_conditions.split(",")
        if keyframes is not None:  # painted keyframes: checked and resized now, their pixels in the render's identity
            keyframes, keyframe_kwargs = self._check_keyframes(source, keyframes, keyframe_kwargs, height, width,
                                                               edit_prompt, color_video)
            arguments["keyframes"] = _import("diffutoon.keyframes", "keyframes").identity(keyframes)
        elif keyframe_kwargs:
            raise ValueError("keyframe_kwargs are FastBlend's options for `keyframes`: pass keyframes too, or drop them.")
        scene_cuts = arguments["scene_cuts"] = _scene_cuts(scene_cuts, source, "scene_cuts")  # "auto": detected now
        if edit_settings:  # the editing branch renders the same shots, else its own (edit_kwargs), checked now
            edit_settings["scene_cuts"] = scene_cuts if scene_cuts is not None else _scene_cuts(
                edit_settings["scene_cuts"], source, "edit_kwargs['scene_cuts']")
        self._interrupt = False
        self._guidance_scale = guidance_scale

        # 2. The render's state: in host memory, or a render folder that survives a crash (and resumes this render)
        run = self._open_render(render_dir, fresh, progress_callback, arguments, source, height, width, edit_settings)
        saving = plan.apply(self) if plan is not None else nullcontext()  # attention, feed-forward, model placement
        with run, saving:  # on success the folder goes (unless kept); on an error or an interrupt it stays, resumable
            if plan is not None:  # exact savings: the same frames within float rounding (the identity is the call's)
                decode_chunk_size = min(decode_chunk_size, plan.decode_chunk_size)
                edit_settings = plan.edit_settings(edit_settings)
                run.report(memory_plan=str(plan))
            if scene_cuts is not None:
                run.report(scene_cuts=scene_cuts)
            # 3. The editing branch (optional): a prompt-edited, deflickered colour video for the tile ControlNet;
            # a style image is encoded once for both passes
            image_embeds = style_embeds(self, ip_adapter_image, ip_adapter_image_embeds, self._execution_device)
            if edit_prompt is not None:
                edit_settings["ip_adapter_image_embeds"] = image_embeds
                if (edit_kwargs or {}).get("cross_attention_kwargs") is None:  # LoRA scales: both passes
                    edit_settings["cross_attention_kwargs"] = cross_attention_kwargs
                edit_settings["long_prompt"] = (edit_kwargs or {}).get("long_prompt", long_prompt)
                color_video = self._edit_pass(run, source, edit_prompt, negative_prompt, generator, **edit_settings)
                if color_video is None:
                    return self._interrupted(run, return_dict)
            elif keyframes is not None:  # the painted keyframes propagated by FastBlend, per shot
                color_video = _import("diffutoon.keyframes", "keyframes").propagate(
                    run, source, keyframes, height, width, scene_cuts, keyframe_kwargs, self._execution_device,
                    not getattr(self, "_progress_bar_config", {}).get("disable", False))
            elif color_video is not None:
                color_video = HostFrames(_video_to_uint8(color_video, "color_video").permute(0, 2, 3, 1).numpy())

            # 4. Condition frames, uint8 at the output size, a chunk of frames at a time
            control_frames = self.prepare_control_frames(run, source, conditioning_frames, kinds, height, width,
                                                         {"lineart": lineart_detector}, colors=color_video)

            # 5. Text embeddings (the negative one only with guidance) and the windows
            text = self._encode_pair(prompt, negative_prompt, clip_skip, guidance_scale > 1, batch_cfg,
                                     (cross_attention_kwargs or {}).get("scale"), long_prompt)
            cond = DiffutoonConditions(text.prompt_embeds, text.negative_prompt_embeds, control_frames,
                                       _per_net(controlnet_conditioning_scale, len(kinds)),
                                       shot_windows(len(source), context_length, context_stride, scene_cuts),
                                       guidance_scale, batch_cfg and (plan is None or plan.batch_cfg),
                                       cross_attention_kwargs,
                                       reuse=reuse_across_windows and (plan is None or plan.reuse_across_windows),
                                       group=run.group, prompt_frames=text.prompt_frames,
                                       negative_prompt_frames=text.negative_prompt_frames, image_embeds=image_embeds)

            # 6. Timesteps
            timesteps = self._timesteps(scheduler, num_inference_steps, strength, self._execution_device)
            self._num_timesteps = len(timesteps)

            # 7. Initial latents (pure noise, eq. 1, or the noised video for strength < 1), or the last checkpoint
            latents, first_step = self._initial_latents(run, "main", scheduler, timesteps, source, height, width,
                                                        latents, generator, strength, decode_chunk_size, cond=cond)

            # 8. Denoising loop: the sampler sees only full-length latents and noise predictions
            with per_frame_motion_groupnorm(self.unet, motion_groupnorm == "per_frame"):
                latents, complete = self._sample(run, "main", latents, first_step, timesteps, cond, scheduler,
                                                 "denoising (steps x windows)", callback_on_step_end,
                                                 callback_on_step_end_tensor_inputs, generator,
                                                 self._previewer(run, preview, preview_vae, fps))
            if not complete and render_dir is not None:
                return self._interrupted(run, return_dict)

            # 9. Decode a chunk of frames at a time, into memory or straight into the output file; the quality report
            quality = self._quality_report(run, cond.windows, len(source), output_type, output_path, scene_cuts)
            frames = self._output(run, latents, output_type, output_path, fps, source, decode_chunk_size, overwrite,
                                  quality)
            report = self._publish_report(run, quality)
            run.finish(complete)
        self.maybe_free_model_hooks()
        made = edit_prompt is not None or keyframes is not None
        color_frames = color_video.array if made and isinstance(color_video, HostFrames) else None
        if not return_dict:
            return (frames, color_frames)
        return DiffutoonPipelineOutput(frames=frames, color_frames=color_frames, interrupted=not complete,
                                       path=None if output_path is None else Path(output_path), report=report)

    def _interrupted(self, run, return_dict: bool):
        """What an interrupted call with a render folder returns; the folder holds the last completed step."""
        run.report(stage="interrupted")
        self.maybe_free_model_hooks()
        return DiffutoonPipelineOutput(frames=None, interrupted=True) if return_dict else (None, None)

    def _encode_pair(self, prompt, negative_prompt, clip_skip, do_cfg: bool, batch_cfg: bool = True,
                     lora_scale: float | None = None, long_prompt: str = "chunks") -> TextEmbeds:
        """Host embeddings of the prompt and (with guidance) the negative prompt, padded to one length if batched;
        each a string, a dict {frame: prompt} (prompts over time) or given embeddings (diffutoon/prompts.py).
        `lora_scale` (cross_attention_kwargs["scale"]) scales the text encoder's LoRA, as diffusers' SD pipelines do."""
        device = self._execution_device
        scaled = lora_scale is not None and USE_PEFT_BACKEND
        if scaled:
            scale_lora_layers(self.text_encoder, lora_scale)
        try:
            encode = lambda text, mode: self.encode_prompt(text, device, clip_skip, mode).cpu()  # noqa: E731
            return encode_pair(encode, prompt, negative_prompt, long_prompt, do_cfg, batch_cfg)
        finally:
            if scaled:
                unscale_lora_layers(self.text_encoder, lora_scale)

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=None, **kwargs):
        """diffusers' `load_lora_weights`, with each kohya module's own alpha kept (diffusers 0.42.1 keeps only the
        most common alpha of a file): alpha / rank is folded into lora_up first."""
        source = pretrained_model_name_or_path_or_dict
        if isinstance(source, (str, os.PathLike)) and str(source).endswith(".safetensors") and os.path.isfile(source):
            from safetensors.torch import load_file

            state_dict = load_file(source)
            if any(k.startswith(("lora_unet_", "lora_te")) for k in state_dict):  # kohya; else keep the file's metadata
                source = state_dict
        if isinstance(source, dict):
            source = _fold_kohya_alphas(source)
        return super().load_lora_weights(source, adapter_name=adapter_name, **kwargs)

    # ------------------------------------------------------------------------------------------------------------
    # The render's state and the sampler

    def _open_render(self, render_dir, fresh: bool, progress_callback, arguments: dict, source, height: int,
                     width: int, edit_settings: dict):
        """`InMemoryRender` without a folder; else a `RenderFolder` whose identity (every setting that changes the
        result, the input, the models, the versions) must match the folder's to resume it. Inside a process group
        (`distributed`), every process must be given the same render, and rank 0 alone holds the folder."""
        group = process_group(arguments["distributed"])
        # the allocator's free pages returned before the render, and on an accelerator its mmap threshold fixed
        trim_host_memory(steady=self._execution_device.type != "cpu")  # host memory flat and steady, at no cost there
        if render_dir is None and group is None:
            return InMemoryRender(progress_callback)
        identity = self._render_identity(arguments, source, edit_settings)

        def open_run(persists: bool = True):
            if render_dir is None or not persists:
                return InMemoryRender(progress_callback)
            needed = folder_bytes(len(source), height, width, len(self.controlnets), self.vae_scale_factor,
                                   edit_settings, len(self.edit_controlnets))
            if arguments["keyframes"] is not None:  # painted keyframes: the guide and the colour video
                needed += 2 * len(source) * height * width * 3
            return RenderFolder(render_dir, identity, fresh, progress_callback, needed, keep=arguments["keep_render_dir"])

        if group is None:
            return open_run()
        windows = {"conditions/": shot_windows(len(source), arguments["context_length"], arguments["context_stride"],
                                               arguments.get("scene_cuts"))}
        if edit_settings:  # each process makes the condition frames its windows read
            windows["edit/conditions/"] = shot_windows(len(source), edit_settings["context_length"],
                                                       edit_settings["context_stride"], edit_settings.get("scene_cuts"))
        call = {k: arguments[k] is not None for k in ("render_dir", "output_path")}
        return open_shared_run(group, {**identity, "call": call}, open_run, windows, CHUNK)

    def _render_identity(self, arguments: dict, source, edit_settings: dict) -> dict:
        """Every setting that changes the result, the input, the models, the versions."""
        ignored = ("self", "video", "output_type", "return_dict", "callback_on_step_end", "render_dir", "fresh",
                   "keep_render_dir", "output_path", "fps", "progress_callback", "edit_kwargs", "distributed",
                   "decode_chunk_size", "overwrite", "memory_plan", "memory_budget", "preview",
                   "preview_vae",  # operational: they do not change the frames
                   "fast_mode", "_sampler")  # a preset is its scheduler, steps and guidance, below and above
        settings = {k: setting_identity(v) for k, v in arguments.items() if k not in ignored}
        settings["edit"] = {k: setting_identity(v) for k, v in edit_settings.items() if k not in ignored}
        settings["style"] = style_identity(self, arguments["ip_adapter_image"], arguments["ip_adapter_image_embeds"])
        sampler = arguments.get("_sampler", self.scheduler)  # a fast preset's, or the pipeline's
        settings["scheduler"] = [type(sampler).__name__,
                                 setting_identity({k: v for k, v in sampler.config.items() if k[0] != "_"})]
        settings["pipeline"] = {"controlnet_conditions": self.config.controlnet_conditions,
                                "edit_controlnet_conditions": self.config.edit_controlnet_conditions,
                                "dtype": str(self.unet.dtype), "device": self._execution_device.type,
                                "attention": sorted({type(p).__name__ for p in self.unet.attn_processors.values()})}
        models = {name: module_fingerprint(module) for name, module in self.components.items()
                  if isinstance(module, torch.nn.Module)}
        models["tokenizer"] = len(self.tokenizer)
        return {"settings": settings, "input": source.identity(), "models": models, "versions": versions()}

    def _initial_latents(self, run, name: str, scheduler, timesteps, source, height: int, width: int, latents,
                         generator, strength: float, chunk_size: int, one_sample: bool = False, cond=None):
        """(latent frame array (N, C, h, w), completed steps): the last intact checkpoint of pass `name` (with the
        scheduler, the generator and what callbacks changed in `cond` as they were then), else the
        start: the given `latents` or noise drawn on the host (`one_sample`: one sample repeated over the frames),
        noised from the video's VAE encoding for strength < 1 (a chunk of frames at a time), saved as step 0."""
        resumed = run.resume(name)
        if resumed is not None:
            step, frames, state = resumed
            restore_state(scheduler, generator, state, self, cond)
            if step >= len(timesteps):
                logger.warning(f"resuming the {name} pass after its last step ({step} of {len(timesteps)} done)")
            elif step:
                logger.warning(f"resuming the {name} pass at step {step + 1} of {len(timesteps)} ({step} done)")
            return frames, step
        n, c = len(source), self.unet.config.in_channels
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        frames = run.latents(name, 0, (n, c, h, w))
        if latents is not None:
            frames.write(0, latents[0].transpose(0, 1).float().cpu().numpy())
        elif one_sample:
            frames.write(0, _host_randn((1, c, 1, h, w), generator)[0].transpose(0, 1).expand(n, -1, -1, -1).numpy())
        else:
            randn_into(frames, generator)  # the numbers of one host draw of (1, C, N, h, w), a piece at a time
        starts = range(0, n, chunk_size)  # the same VAE batches as `encode_video`; split over a process group
        encode = lambda s: self.encode_video(source.resized(s, s + chunk_size, height, width), chunk_size)  # noqa: E731
        encoded = map_chunks(run.group, "encoding", starts, encode) if strength < 1 else ((s, None) for s in starts)
        for start, x0 in encoded:
            noise = torch.from_numpy(frames.read(start, start + chunk_size))
            if x0 is not None:  # diffusers' img2img: add_noise scales the noise itself
                frames.write(start, scheduler.add_noise(x0[0].transpose(0, 1), noise, timesteps[:1]).numpy())
            elif scheduler.init_noise_sigma != 1:
                frames.write(start, (noise * scheduler.init_noise_sigma).numpy())
        run.checkpoint(name, 0, frames, checkpoint_state(scheduler, generator))
        return frames, 0

    def _sample(self, run, name: str, latents, first_step: int, timesteps, cond: DiffutoonConditions, scheduler,
                desc: str, callback=None, callback_inputs=("latents",), generator=None, previewer=None):
        """The sampler: full-length noise prediction, scheduler step, callback, checkpoint; it never sees a window.
        Starts after `first_step` completed steps (a resumed render). Returns (the latents of the last completed
        step, whether every step ran)."""
        num_windows, num_steps = len(cond.windows), len(timesteps)
        with self._bar(total=(num_steps - first_step) * num_windows, desc=desc) as bar:
            for i, t in enumerate(timesteps[first_step:], start=first_step):
                if self.interrupt and cond.group is None:  # a process group stops together, in `denoise`
                    return latents, False
                windows_done = iter(range(1, num_windows + 1))

                def on_window():
                    window = next(windows_done)
                    bar.update()
                    trim_host_memory()  # the allocator's free pages back to the OS: host memory flat over a long render
                    run.report(stage="denoising" if name == "main" else name, **{"pass": name}, step=i,
                               steps=num_steps, window=window,
                               windows=num_windows, done=i * num_windows + window, total=num_steps * num_windows,
                               frames=len(latents))

                # the model input: Euler's c_in scaling, or the latents themselves (DDIM, LCM)
                x = model_input(scheduler, t, latents, lambda: run.scratch(f"{name}-input", latents.shape))
                noise = self.denoise(x, t, self._step_conditions(cond), out=run.scratch(f"{name}-noise", latents.shape),
                                     on_window=on_window)
                if noise is None:  # interrupted within the step: it is dropped
                    return latents, False
                before, wanted = latents, previewer.frames_needed(len(latents)) if previewer else None
                latents, x0 = self._step(scheduler, noise, t, latents, run.latents(name, i + 1, latents.shape),
                                         generator, wanted)
                if previewer:  # reads the step's tensors only: the render is the same without it
                    previewer.publish(i, num_steps, x0 if x0 is not None else
                                      lambda: self._x0(scheduler, t, before, noise, wanted), wanted)
                if callback is not None:
                    self._callback(callback, callback_inputs, i, t, latents, cond)
                run.checkpoint(name, i + 1, latents, checkpoint_state(scheduler, generator, self._guidance_scale, cond))
        return latents, True

    @staticmethod
    def _step(scheduler, noise, t, latents, out, generator=None, estimate=None):
        """One scheduler step of the whole video into the frame array `out`. The reference DDIM is elementwise: it
        steps a few frames at a time, so host memory holds those; other schedulers get diffusers' full tensors and
        the call's generator (LCM's noise). Returns (`out`, the scheduler's clean estimate of frames `estimate`, or
        None if it gives none or none was asked for)."""
        if hasattr(scheduler, "step_function"):
            step = scheduler.step_function(t)
            for start in range(0, len(latents), 4 * CHUNK):
                end = start + 4 * CHUNK
                out.write(start, step(torch.from_numpy(noise.read(start, end)),
                                      torch.from_numpy(latents.read(start, end))).numpy())
            return out, None
        x, x0 = scheduler_step(scheduler, _video_latents(noise), t, _video_latents(latents), generator)
        out.write(0, x[0].transpose(0, 1).numpy())
        return out, None if x0 is None or estimate is None else x0[0].transpose(0, 1)[estimate]

    @staticmethod
    def _x0(scheduler, t, latents, noise, frames: list[int]) -> torch.Tensor:
        """The clean estimate of `frames` from an epsilon prediction (the reference DDIM's step gives none)."""
        pick = lambda a: torch.from_numpy(np.stack([a.read(f, f + 1)[0] for f in frames]))  # noqa: E731
        return ddim_x0(scheduler, t, pick(latents), pick(noise))

    def _previewer(self, run, preview, preview_vae, fps):
        """Where this call's previews go (diffutoon/previews.py), or None: rank 0 writes them."""
        if preview is False or process_rank(run.group):
            return None
        path = None if preview is None or preview is True else preview
        previewer = Previewer(getattr(run, "path", None), path, preview_vae, run.report, fps)
        return previewer if previewer.enabled else None

    def _callback(self, callback, callback_inputs, i: int, t, latents, cond: DiffutoonConditions):
        """diffusers' `callback_on_step_end`: it sees video latents (1, C, N, h, w) and may replace them and the
        embeddings."""
        tensors = {"latents": _video_latents(latents), "prompt_embeds": cond.prompt_embeds,
                   "negative_prompt_embeds": cond.negative_prompt_embeds}
        outputs = callback(self, i, t, {k: tensors[k] for k in callback_inputs}) or {}
        for name, frames in (("prompt_embeds", cond.prompt_frames), ("negative_prompt_embeds", cond.negative_prompt_frames)):
            new = outputs.get(name)
            if frames is None or new is None or len(new) == len(frames):
                continue
            if len(new) == 1 and torch.equal(new, tensors[name][-1:]):  # diffusers' "the conditional half" (CFG cutoff):
                outputs.pop(name)  # ours are that already, one row per key frame of the prompts over time
            else:
                raise ValueError(f"callback_on_step_end returned {name} of {len(new)} rows: with prompts over time it "
                                 f"must keep one per key frame ({len(frames)}).")
        if "latents" in outputs:
            latents.write(0, outputs.pop("latents")[0].transpose(0, 1).float().cpu().numpy())
        cond.prompt_embeds = outputs.pop("prompt_embeds", cond.prompt_embeds)
        cond.negative_prompt_embeds = outputs.pop("negative_prompt_embeds", cond.negative_prompt_embeds)

    def _output(self, run, latents, output_type: str, output_path, fps, source, decode_chunk_size: int,
                overwrite: bool = False, quality=None):
        """The frames as `output_type`, or None once streamed into `output_path` (a video file or PNG folder).
        `quality` (diffutoon/report.py) sees every output frame with its source frame."""
        n = len(latents)
        h, w = latents.shape[2] * self.vae_scale_factor, latents.shape[3] * self.vae_scale_factor
        sources = (source.resized(s, s + decode_chunk_size, h, w).permute(0, 2, 3, 1).numpy()
                   for s in range(0, n, decode_chunk_size))  # for `quality`, read as the output is
        if output_type == "latent":
            return _video_latents(latents).contiguous().clone()
        if output_path is None:  # diffusers' batch of one video
            frames = self.decode_latents(latents, decode_chunk_size, output_type, report=run.report, group=run.group)
            if quality is not None and frames is not None:
                for start, chunk in zip(range(0, n, decode_chunk_size), sources):
                    quality.add(_frames_uint8(frames[start : start + decode_chunk_size], output_type), chunk)
            return None if frames is None else [frames] if output_type == "pil" else frames[None]
        vio = _import("diffutoon.video", "Writing output_path")
        clip = source.clip if getattr(source.clip, "audio", False) else None  # a video file's audio goes along
        chunks = self._decoded(latents, decode_chunk_size, "uint8", report=run.report, group=run.group)
        chunks = chunks if quality is None else quality.tap(chunks, sources)
        if process_rank(run.group):  # rank 0 writes the file: this process decodes its share
            for _ in chunks:
                pass
            return None
        vio.write_output(output_path, chunks, fps, audio_from=getattr(clip, "path", None),
                         audio_span=clip.audio_span() if clip is not None else None, overwrite=overwrite,
                         progress=not getattr(self, "_progress_bar_config", {}).get("disable", False), total=n)
        return None

    def _quality_report(self, run, windows, num_frames: int, output_type: str, output_path, scene_cuts=None):
        """The quality report's accumulator (diffutoon/report.py) when someone will read it (a render folder, a progress
        callback, an output file) and this process has the frames; None without the project's report module (cv2)."""
        wanted = getattr(run, "path", None) is not None or run.progress_callback is not None or output_path is not None
        if not wanted or output_type == "latent" or process_rank(run.group):
            return None
        try:
            return _import("diffutoon.report", "The quality report").QualityReport(windows, num_frames, scene_cuts)
        except ImportError as error:
            logger.info(f"no quality report: {error}")
            return None

    @staticmethod
    def _publish_report(run, quality) -> dict | None:
        """`report.json` in the render folder, and "report" in the progress dict."""
        if quality is None:
            return None
        report = quality.result(getattr(run, "path", None))  # writes report.json into a render folder
        run.report(report=report)
        return report

    def _check_output(self, output_path, fps, source, overwrite: bool = False):
        """Before any work: the output path's kind, that it is not the input, and the frame rate a video file needs."""
        if fps is not None and not (_finite(fps) and 0.01 <= fps <= 1000):
            raise ValueError(f"fps must be a number in [0.01, 1000] (frames per second), got {fps}.")
        if output_path is None:
            return fps
        vio = _import("diffutoon.video", "Writing output_path")
        source_path = getattr(source.clip, "path", None)
        if source_path is not None and os.path.exists(output_path) and os.path.samefile(output_path, source_path):
            raise ValueError(f"output_path {output_path} is the input video ({source_path}), also through a link: "
                             "write the result to another path.")
        try:
            vio.check_output(output_path, overwrite)
        except FileExistsError as e:
            raise ValueError(str(e).replace("--overwrite (overwrite=True)", "overwrite=True")) from None
        suffix = Path(output_path).suffix.lower()
        if suffix and suffix not in vio.VIDEO_SUFFIXES:
            raise ValueError(f"output_path {output_path}: use a video file ({', '.join(vio.VIDEO_SUFFIXES)}) or a "
                             "folder path without a suffix for PNG frames.")
        fps = fps or getattr(source.clip, "fps", None)
        if suffix and fps is None:
            raise ValueError("output_path is a video file: pass fps= (the frame rate), or pass the video as a file.")
        return fps

    # ------------------------------------------------------------------------------------------------------------
    # The editing branch (paper 3.2, SPEC 2)

    def _check_edit(self, video, edit_prompt, color_video, edit_kwargs) -> dict:
        """Checks of the editing branch's inputs, before any model runs; returns its settings (`make_color_video`'s
        defaults, then `edit_kwargs`), or {} without `edit_prompt`."""
        edit_kwargs = dict(edit_kwargs or {})
        unknown = set(edit_kwargs) - set(inspect.signature(self.make_color_video).parameters) | \
            ({"video", "edit_prompt", "negative_prompt", "generator"} & set(edit_kwargs))
        if unknown:
            raise ValueError(f"edit_kwargs has unknown settings {sorted(unknown)}: see `make_color_video`'s arguments.")
        if {"ip_adapter_image", "ip_adapter_image_embeds"} & set(edit_kwargs):  # the call's style goes to both
            raise ValueError("edit_kwargs cannot set the style image of both passes: pass `ip_adapter_image` (or "
                             "`ip_adapter_image_embeds`) to the call itself.")
        if edit_prompt is not None and color_video is not None:
            raise ValueError("Pass either `edit_prompt` (run the editing branch) or `color_video` (your own), not both.")
        if color_video is not None and len(color_video) != video.shape[0]:
            raise ValueError(f"color_video has {len(color_video)} frames, the video {video.shape[0]}: one per frame.")
        _check_values(color_video, "`color_video`")
        if (edit_prompt is not None or color_video is not None) and "tile" not in self.config.controlnet_conditions.split(","):
            raise ValueError("The colour video feeds the tile ControlNet, and this pipeline has none "
                             f"(controlnet_conditions={self.config.controlnet_conditions!r}).")
        if edit_prompt is None:
            return {}
        settings = {**{k: p.default for k, p in inspect.signature(self.make_color_video).parameters.items()
                       if p.default is not inspect.Parameter.empty}, **edit_kwargs}
        settings.pop("negative_prompt"), settings.pop("generator")
        self._check_edit_settings(video, **{k: settings[k] for k in (
            "height", "width", "num_inference_steps", "strength", "context_length", "context_stride",
            "conditioning_frames", "controlnet_conditioning_scale", "guidance_scale", "clip_skip", "decode_chunk_size",
            "fastblend")})
        return settings

    def _check_keyframes(self, source, keyframes, keyframe_kwargs, height, width, edit_prompt, color_video):
        """Painted keyframes read, checked and resized as the frames are, before any work (diffutoon/keyframes.py);
        returns (keyframes, FastBlend options)."""
        if edit_prompt is not None or color_video is not None:
            raise ValueError("Pass either `keyframes` or `edit_prompt` / `color_video`, not both: each makes the tile "
                             "ControlNet's colour video (to recolour painted keyframes, paint the recolouring in them).")
        if "tile" not in self.config.controlnet_conditions.split(","):
            raise ValueError("Painted keyframes feed the tile ControlNet, and this pipeline has none "
                             f"(controlnet_conditions={self.config.controlnet_conditions!r}).")
        _import("fastblend", "Propagating painted keyframes")
        keyframes_module = _import("diffutoon.keyframes", "Painted keyframes")
        options = keyframes_module.check_options(keyframe_kwargs, height, width)
        return keyframes_module.load(keyframes, len(source), (source.height, source.width), height, width,
                                     _resize_uint8), options

    def _check_edit_settings(self, video, height, width, num_inference_steps, strength, context_length,
                             context_stride, conditioning_frames, controlnet_conditioning_scale, guidance_scale=7.0,
                             clip_skip=None, decode_chunk_size=8, fastblend=None):
        _import("attention_processors", "The editing branch")  # what it needs, before its settings and any work
        if fastblend is not False:
            _import("fastblend", "The editing branch's deflickering (pass fastblend=False to skip it)")
        if not self.edit_controlnets:
            raise ValueError(
                "The editing branch needs its ControlNets (softedge + depth), which this pipeline has not loaded: "
                "DiffutoonPipeline.from_models(..., edit_controlnets=['lllyasviel/control_v11p_sd15_softedge', "
                "'lllyasviel/control_v11f1p_sd15_depth']), or set `pipe.edit_controlnet = MultiControlNetModel([...])`.")
        self._check_pass(video, self.edit_controlnets, "edit_controlnet_conditions", height, width,
                         num_inference_steps, strength, context_length, context_stride, controlnet_conditioning_scale,
                         conditioning_frames, guidance_scale, clip_skip, decode_chunk_size, where="the editing branch's ")

    @torch.no_grad()
    def make_color_video(
        self,
        video,
        edit_prompt: str,
        negative_prompt: str = "",
        height: int = 512,
        width: int = 512,
        num_inference_steps: int = 20,
        guidance_scale: float = 7.0,
        strength: float = 0.9,
        context_length: int = 8,
        context_stride: int = 4,
        controlnet_conditioning_scale: float | list[float] = 0.5,
        clip_skip: int | None = None,
        conditioning_frames: list | None = None,
        detectors: dict | None = None,
        cross_frame_mode: str = "joint",
        fastblend: dict | bool | None = None,
        generator: torch.Generator | None = None,
        decode_chunk_size: int = 8,
        scheduler=None,
        cross_attention_kwargs: dict | None = None,
        reuse_across_windows: bool = True,
        scene_cuts: str | list[int] | None = None,
        long_prompt: str = "chunks",
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
    ) -> np.ndarray:
        """The editing branch: the edited colour video, uint8 (N, height, width, 3), SPEC 2's defaults.

        The same UNet runs WITHOUT its motion modules (swapped out, not copied) with cross-frame attention in its
        spatial self-attention, the softedge + depth ControlNets, scaled-linear DDIM, 20 steps, img2img at
        strength 0.9 from ONE noise sample repeated over all frames, windows of 8 with stride 4; then FastBlend
        ("fast", window 60, guided by the original frames) smooths the decoded frames.

        Args:
            detectors: {"softedge": callable, "depth": callable} to replace controlnet-aux's HED / MiDaS.
            cross_frame_mode: "joint" (the reference), "first" or "first_prev" (see `attention_processors`).
            fastblend: options of `fastblend.smooth_video` over the defaults, or False to skip the smoothing.
            scheduler: defaults to the reference DDIM with scaled-linear betas.
            cross_attention_kwargs: as in `__call__` (e.g. {"scale": 0.7} scales LoRAs, text encoder included).
            reuse_across_windows: as in `__call__`: the ControlNets run once per frame and step.
            scene_cuts: as in `__call__`: windows and FastBlend per shot.
            negative_prompt, long_prompt: as in `__call__` (`negative_prompt` may also be embeddings (1, L, D)).
            ip_adapter_image, ip_adapter_image_embeds: a style image, as in `__call__`.
        """
        settings = dict(locals())
        source = _as_source(settings.pop("video"))
        del settings["self"]
        self._check_edit_settings(source, height, width, num_inference_steps, strength, context_length, context_stride,
                                  conditioning_frames, controlnet_conditioning_scale, guidance_scale, clip_skip,
                                  decode_chunk_size, fastblend)
        check_style(self, ip_adapter_image, ip_adapter_image_embeds, guidance_scale > 1)
        self._interrupt = False
        settings["scene_cuts"] = _scene_cuts(scene_cuts, source, "scene_cuts")
        colors = self._edit_pass(InMemoryRender(), source, **settings)
        return None if colors is None else colors.array

    def _edit_pass(self, run, source, edit_prompt, negative_prompt, generator, height, width, num_inference_steps,
                   guidance_scale, strength, context_length, context_stride, controlnet_conditioning_scale, clip_skip,
                   conditioning_frames, detectors, cross_frame_mode, fastblend, decode_chunk_size, scheduler,
                   cross_attention_kwargs, reuse_across_windows, scene_cuts=None, long_prompt="chunks",
                   ip_adapter_image=None, ip_adapter_image_embeds=None):
        """The editing branch's colour video as a frame array (N, height, width, 3) of `run` (stages done before a
        crash are kept), or None if interrupted. `make_color_video` documents the settings."""
        cross_frame_attention = _import("attention_processors", "The editing branch").cross_frame_attention
        n, kinds = len(source), self.config.edit_controlnet_conditions.split(",")
        colors = run.frames("edit/colors", (n, height, width, 3), np.uint8)[0]
        scheduler = scheduler or DiffutoonDDIMScheduler(beta_schedule="scaled_linear")
        if run.stage_done("edit"):  # the generator as it was after the branch drew its noise
            restore_state(None, generator, run.resume("edit")[2])
            return broadcast_frames(run.group, colors, "sharing the colour video")
        frames, written = run.frames("edit/frames", (n, height, width, 3), np.uint8)  # the video at the branch's size
        for chunk, start in enumerate(range(0, n, CHUNK)):
            if not written.done(chunk):
                frames.write(start, source.resized(start, start + CHUNK, height, width).permute(0, 2, 3, 1).numpy())
                written.mark(chunk)
        frames = _VideoSource(frames)
        control_frames = self.prepare_control_frames(run, frames, conditioning_frames, kinds, height, width, detectors,
                                                     branch="edit")
        text = self._encode_pair(edit_prompt, negative_prompt, clip_skip, guidance_scale > 1, True,
                                 (cross_attention_kwargs or {}).get("scale"), long_prompt)
        cond = DiffutoonConditions(text.prompt_embeds, text.negative_prompt_embeds, control_frames,
                                   _per_net(controlnet_conditioning_scale, len(kinds)),
                                   shot_windows(n, context_length, context_stride, scene_cuts), guidance_scale,
                                   cross_attention_kwargs=cross_attention_kwargs, branch="edit",
                                   reuse=reuse_across_windows, group=run.group, prompt_frames=text.prompt_frames,
                                   negative_prompt_frames=text.negative_prompt_frames,
                                   image_embeds=style_embeds(self, ip_adapter_image, ip_adapter_image_embeds,
                                                             self._execution_device))
        timesteps = self._timesteps(scheduler, num_inference_steps, strength, self._execution_device)
        # ONE noise sample for every frame (SPEC 2), the img2img start at the first timestep
        latents, first_step = self._initial_latents(run, "edit", scheduler, timesteps, frames, height, width, None,
                                                    generator, strength, decode_chunk_size, one_sample=True)
        with without_motion_modules(self.unet), cross_frame_attention(self.unet, mode=cross_frame_mode) as state:
            cond.cross_frame = state
            outer_guidance, self._guidance_scale = getattr(self, "_guidance_scale", None), guidance_scale  # this pass's
            try:
                latents, complete = self._sample(run, "edit", latents, first_step, timesteps, cond, scheduler,
                                                 "editing branch (steps x windows)", generator=generator)
            finally:
                self._guidance_scale = outer_guidance
        if not complete:
            return None
        decoded = colors if fastblend is False else run.frames("edit/decoded", colors.shape, np.uint8)[0]
        for i, chunk in enumerate(self._decoded(latents, decode_chunk_size, "uint8", report=run.report,
                                                desc="decoding the colour video", group=run.group)):
            decoded.write(i * decode_chunk_size, chunk)
        # FastBlend's matches share one random stream, so splitting them would change the result: rank 0 alone
        if fastblend is not False and not process_rank(run.group):
            smooth_video = _import("fastblend", "The editing branch's deflickering (pass fastblend=False to skip it)"
                                   ).smooth_video
            run.report(stage="fastblend", **{"pass": "edit"}, done=0, total=n)
            options = {**FASTBLEND_DEFAULTS, "device": self._execution_device, **(fastblend or {})}
            progress = not getattr(self, "_progress_bar_config", {}).get("disable", False)
            style, guide, out = _frames_array(decoded), _frames_array(frames.clip), _frames_array(colors, writable=True)
            for s, e in [(0, n)] if not scene_cuts else zip([0, *scene_cuts], [*scene_cuts, n]):  # never across a cut
                smooth_video(style[s:e], guide[s:e], progress=progress, out=out[s:e], **options)  # each frame as done
        run.finish_stage("edit")
        return broadcast_frames(run.group, colors, "sharing the colour video")


def _finite(value) -> bool:
    """A real, finite number (not a bool, nan or inf)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _scene_cuts(scene_cuts, source: _VideoSource, name: str):
    """None, or the checked list of cuts; "auto" detects them now, a chunk of frames at a time (diffutoon/scenes.py)."""
    if scene_cuts is None:
        return None
    scenes = _import("diffutoon.scenes", name)
    if isinstance(scene_cuts, str) and scene_cuts.lower() == "auto":
        _import("scenedetect", f"{name}='auto'", scenes.INSTALL)
    read = lambda s, e: source.read(s, e).permute(0, 2, 3, 1).numpy()  # noqa: E731
    return scenes.resolve(scene_cuts, read, len(source))


def _as_source(video) -> _VideoSource:
    return video if isinstance(video, _VideoSource) else _VideoSource(video)


def _frames_array(frames, writable: bool = False) -> np.ndarray:
    """A frame array's frames as one numpy array (memory-mapped for one in the render folder)."""
    return frames.array if isinstance(frames, HostFrames) else np.load(frames.path, mmap_mode="r+" if writable else "r")


def _frames_uint8(frames, output_type: str) -> np.ndarray:
    """Decoded frames ("pil" list, "np" (n, H, W, 3) in [0, 1], "pt" (n, 3, H, W)) as uint8 (n, H, W, 3)."""
    if output_type == "pil":
        return np.stack([np.asarray(f) for f in frames])
    array = frames.permute(0, 2, 3, 1).numpy() if output_type == "pt" else np.asarray(frames)
    return (array * 255).round().clip(0, 255).astype(np.uint8)


def _video_latents(latents) -> torch.Tensor:
    """A latent frame array (N, C, h, w) as diffusers' video latents (1, C, N, h, w): a view when in memory."""
    return torch.from_numpy(_frames_array(latents)).transpose(0, 1)[None]


def _per_net(scale, num_nets: int) -> list[float]:
    """One conditioning scale per ControlNet from a single value or a list."""
    return list(scale) if isinstance(scale, (list, tuple)) else [scale] * num_nets


def _host_randn(shape, generator) -> torch.Tensor:
    """Gaussian noise drawn on the generator's device, kept on the host as float32."""
    device = generator.device if isinstance(generator, torch.Generator) else torch.device("cpu")
    return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32).cpu()


def _fold_kohya_alphas(state_dict: dict) -> dict:
    """lora_up *= alpha / rank and alpha := rank for each kohya module: the same delta at weight 1."""
    out = dict(state_dict)
    for key, alpha in state_dict.items():
        name = key[: -len(".alpha")]
        if (key.endswith(".alpha") and key.startswith(("lora_unet_", "lora_te"))
                and f"{name}.lora_up.weight" in out and f"{name}.lora_down.weight" in out):
            up, rank = out[f"{name}.lora_up.weight"], out[f"{name}.lora_down.weight"].shape[0]
            out[f"{name}.lora_up.weight"] = (up.float() * (float(alpha) / rank)).to(up.dtype)
            out[key] = torch.tensor(float(rank), dtype=alpha.dtype)
    return out


DiffutoonPipeline.__call__.__doc__ = DiffutoonPipeline.__call__.__doc__.replace("Examples:\n", "Examples:\n" + EXAMPLE_DOC_STRING)
