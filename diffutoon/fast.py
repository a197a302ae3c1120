"""Few-step rendering with distilled motion modules (issue 17): AnimateDiff-Lightning and AnimateLCM.

Both keep the rest of the pipeline (whole-denoiser sliding windows, both ControlNets, reuse across windows, the render
folder, torchrun): only the motion modules, the sampler, the step count and the guidance change. A preset sets the
three consistently:

    >>> from diffutoon.fast import PRESETS
    >>> PRESETS["lightning-4"].steps, PRESETS["lightning-4"].guidance_scale
    (4, 1.0)

Loading: `load_motion_adapter(source)` reads a Lightning single file (`animatediff_lightning_4step_diffusers.safetensors`,
a `MotionAdapter` state dict in diffusers' key layout), an AnimateLCM folder or Hub id (`wangfuyun/AnimateLCM`: the
adapter plus `AnimateLCM_sd15_t2v_lora.safetensors`, fused at 0.8 by `load_lcm_lora`), or any diffusers MotionAdapter.

Only the standard library, torch and diffusers are imported here: the module ships beside the pipeline file.
"""

from __future__ import annotations

import inspect
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

PAPER_STEPS, PAPER_GUIDANCE = 10, 7.0  # the pipeline's defaults: left as they are, a preset replaces them
LCM_LORA = "AnimateLCM_sd15_t2v_lora.safetensors"
LCM_LORA_SCALE = 0.8  # AnimateLCM's recipe
LCM_ADAPTER_NAME = "animatelcm"
_LIGHTNING_FILE = re.compile(r"animatediff_lightning_(\d+)step", re.IGNORECASE)
SD15_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", steps_offset=1)  # from_config(SD1.5)


@dataclass(frozen=True)
class FastPreset:
    """A consistent few-step recipe: the adapter family it is for, its sampler, steps and guidance, and the
    explicit values it also accepts (`max_guidance`, `step_range`)."""

    family: str  # "lightning" or "lcm"
    steps: int
    guidance_scale: float
    max_guidance: float
    step_range: tuple[int, int]

    def scheduler(self):
        """The model cards' samplers with SD1.5's (linear) betas: Lightning's trailing Euler, AnimateLCM's LCM."""
        from diffusers import EulerDiscreteScheduler, LCMScheduler

        if self.family == "lightning":
            return EulerDiscreteScheduler(timestep_spacing="trailing", **SD15_BETAS)
        return LCMScheduler(set_alpha_to_one=False, clip_sample=False, **SD15_BETAS)

    @property
    def scheduler_name(self) -> str:
        return "EulerDiscreteScheduler" if self.family == "lightning" else "LCMScheduler"


PRESETS = {
    **{f"lightning-{n}": FastPreset("lightning", n, 1.0, 1.0, (n, n)) for n in (1, 2, 4, 8)},  # no negative branch
    **{f"lcm-{n}": FastPreset("lcm", n, 1.0, 2.0, (1, 8)) for n in (4, 6, 8)},
}


def adapter_preset(kind: str | None) -> str | None:
    """The preset made for a motion adapter kind ("lightning-4", "animatelcm"), or None for another adapter."""
    if kind is None:
        return None
    return kind if kind in PRESETS else "lcm-4" if kind == "animatelcm" else None


def _describe(kind: str) -> str:
    if kind.startswith("lightning-"):
        return f"AnimateDiff-Lightning {kind.split('-')[1]}-step"
    return "AnimateLCM"


def _problems(preset: FastPreset, scheduler, steps: int, guidance: float) -> list[str]:
    problems = []
    if type(scheduler).__name__ != preset.scheduler_name:
        problems.append(f"it samples with {preset.scheduler_name}, this call with {type(scheduler).__name__}")
    lo, hi = preset.step_range
    if not lo <= steps <= hi:
        problems.append(f"it takes {lo if lo == hi else f'{lo}-{hi}'} steps, this call {steps}")
    if guidance > preset.max_guidance:
        problems.append(f"it needs guidance <= {preset.max_guidance:g}, this call asks for {guidance:g}")
    return problems


def fast_settings(pipe_scheduler, kind: str | None, fast_mode: str | None, num_inference_steps: int,
                  guidance_scale: float, strength: float, generator):
    """(scheduler, steps, guidance, generator) for one call, or one ValueError before any model runs.

    `fast_mode`: None checks the call against the pipeline's motion adapter `kind` (a distilled adapter with the
    paper's 10 DDIM steps at guidance 7 is refused); "off" samples as asked, whatever the adapter; a preset name (or
    "auto": the one made for the adapter) sets the scheduler, and the steps and guidance left at the paper's defaults.
    LCM draws fresh noise every step: without a generator it gets one, drawn from torch's global generator, whose
    state the checkpoints keep (a resume continues it exactly)."""
    if fast_mode is None or fast_mode == "off":
        scheduler = pipe_scheduler
        name = adapter_preset(kind)
        if fast_mode is None and name is not None:
            problems = _problems(PRESETS[name], scheduler, num_inference_steps, guidance_scale)
            if problems:
                raise ValueError(f"This pipeline's motion adapter is {_describe(kind)}, made for fast_mode={name!r}, "
                                 f"but {'; '.join(problems)}: pass fast_mode={name!r} (sets all of them), or "
                                 "fast_mode='off' to sample it as asked anyway.")
    else:
        if fast_mode == "auto":
            fast_mode = adapter_preset(kind)
            if fast_mode is None:
                raise ValueError("fast_mode='auto' needs a distilled motion adapter (AnimateDiff-Lightning or "
                                 "AnimateLCM, loaded with `from_models`): name a preset instead, one of "
                                 f"{', '.join(PRESETS)}.")
        if fast_mode not in PRESETS:
            raise ValueError(f"fast_mode must be None, 'off', 'auto' or one of {', '.join(PRESETS)}; got {fast_mode!r}.")
        preset = PRESETS[fast_mode]
        made_for = adapter_preset(kind)
        if made_for is not None and PRESETS[made_for].family != preset.family or \
                kind is not None and kind.startswith("lightning-") and made_for != fast_mode:
            raise ValueError(f"fast_mode={fast_mode!r} does not fit this pipeline's motion adapter, {_describe(kind)}: "
                             f"use fast_mode={made_for!r}, or load the adapter the preset is for.")
        scheduler = preset.scheduler()
        if num_inference_steps == PAPER_STEPS:
            num_inference_steps = preset.steps
        if guidance_scale == PAPER_GUIDANCE:
            guidance_scale = preset.guidance_scale
        problems = _problems(preset, scheduler, num_inference_steps, guidance_scale)
        if problems:
            raise ValueError(f"fast_mode={fast_mode!r}: {'; '.join(problems)}. Leave num_inference_steps and "
                             "guidance_scale at their defaults, or pass fast_mode='off' with your own scheduler.")
    if "strength" not in inspect.signature(scheduler.set_timesteps).parameters and \
            int(num_inference_steps * strength) < 1:
        raise ValueError(f"strength {strength} keeps no step of {num_inference_steps} with {type(scheduler).__name__}: "
                         "raise strength.")
    if generator is None and _is_stochastic(scheduler):
        generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
    return scheduler, num_inference_steps, guidance_scale, generator


def _is_stochastic(scheduler) -> bool:
    """Schedulers that draw noise in every step (LCM's multistep sampling, ancestral samplers)."""
    return type(scheduler).__name__ in ("LCMScheduler", "TCDScheduler") or "Ancestral" in type(scheduler).__name__


# ----------------------------------------------------------------------------------------------------------------
# The sampler's side: the model input scaling and the step's noise


def model_input(scheduler, t, latents, scratch, chunk: int = 64):
    """diffusers' `scheduler.scale_model_input` of the whole video, a few frames at a time into `scratch()` (a frame
    array); the latents themselves when the scheduler does not scale (DDIM, LCM: every sampler of the paper mode)."""
    one = torch.ones(1)
    if torch.equal(scheduler.scale_model_input(one, t), one):
        return latents
    out = scratch()
    for start in range(0, len(latents), chunk):  # elementwise: the same numbers as one call on the whole video
        out.write(start, scheduler.scale_model_input(torch.from_numpy(latents.read(start, start + chunk)), t).numpy())
    return out


def scheduler_step(scheduler, noise: torch.Tensor, t, latents: torch.Tensor, generator=None):
    """`scheduler.step` on full tensors (1, C, N, h, w) with the call's generator (LCM's fresh noise comes from it, so
    the checkpointed generator state makes a resume exact), on the generator's device. Returns (the next latents, the
    step's clean-video estimate or None), float32 on the host."""
    kwargs = {}
    device = noise.device
    if "generator" in inspect.signature(scheduler.step).parameters and isinstance(generator, torch.Generator):
        kwargs["generator"], device = generator, generator.device
    out = scheduler.step(noise.to(device), t, latents.to(device), **kwargs)
    x0 = getattr(out, "denoised", None)
    x0 = getattr(out, "pred_original_sample", None) if x0 is None else x0
    return out.prev_sample.float().cpu(), None if x0 is None else x0.float().cpu()


# ----------------------------------------------------------------------------------------------------------------
# Loading


def lightning_kind(source) -> str | None:
    """"lightning-4" for `animatediff_lightning_4step_diffusers.safetensors` (the Hub names), else None."""
    match = _LIGHTNING_FILE.search(Path(str(source)).name)
    return f"lightning-{int(match.group(1))}" if match else None


def source_kind(source) -> str | None:
    """The kind `load_motion_adapter` finds for `source`, from its name and folder alone (nothing loaded): the CLI
    checks --fast with it before reading any frame."""
    source = os.fspath(source)
    if os.path.isfile(source):
        return lightning_kind(source)
    if (Path(source) / LCM_LORA).is_file() or ("animatelcm" in source.lower() and not os.path.isdir(source)):
        return "animatelcm"
    return None


def adapter_config_from_state_dict(state_dict: dict, **overrides) -> dict:
    """A `MotionAdapter` config for a diffusers-layout state dict: the block widths, motion layers per block, mid block
    and positional length read from the weights; the rest (heads, norm groups) AnimateDiff v2's, which Lightning and
    AnimateLCM keep, unless given."""
    widths, layers = [], 0
    while f"down_blocks.{len(widths)}.motion_modules.0.proj_in.weight" in state_dict:
        widths.append(state_dict[f"down_blocks.{len(widths)}.motion_modules.0.proj_in.weight"].shape[0])
    while f"down_blocks.0.motion_modules.{layers}.proj_in.weight" in state_dict:
        layers += 1
    if not widths:
        raise ValueError("not a diffusers MotionAdapter state dict (no down_blocks.0.motion_modules.0.proj_in.weight)")
    pe = state_dict.get("down_blocks.0.motion_modules.0.transformer_blocks.0.pos_embed.pe")
    config = dict(block_out_channels=tuple(widths), motion_layers_per_block=layers,
                  use_motion_mid_block=any(k.startswith("mid_block.") for k in state_dict),
                  motion_max_seq_length=pe.shape[1] if pe is not None else 32)
    return {**config, **overrides}


def load_motion_adapter(source, config: dict | None = None, dtype=None, **load):
    """(MotionAdapter, kind, LoRA source) from a Hub id, a diffusers folder or a single file. `kind`: "lightning-N" for
    an AnimateDiff-Lightning file, "animatelcm" for AnimateLCM (its LoRA is the third value), else None. A single file
    in diffusers' key layout (Lightning's) is loaded strictly into a MotionAdapter whose shape is read from the
    weights (`config` overrides, e.g. for tiny test models); another layout (AnimateDiff's .ckpt) goes through
    diffusers' `MotionAdapter.from_single_file`."""
    from diffusers import MotionAdapter

    source = os.fspath(source)
    if os.path.isfile(source):
        state_dict = _load_state_dict(source)
        if "down_blocks.0.motion_modules.0.proj_in.weight" not in state_dict:
            return MotionAdapter.from_single_file(source, torch_dtype=dtype), lightning_kind(source), None
        adapter = MotionAdapter(**adapter_config_from_state_dict(state_dict, **(config or {})))
        adapter.load_state_dict(state_dict, strict=True)  # every key, or one error naming those that differ
        adapter = adapter.to(dtype) if dtype is not None else adapter
        return adapter.eval(), lightning_kind(source), None
    adapter = MotionAdapter.from_pretrained(source, **({"dtype": dtype} if dtype is not None else {}), **load)
    lora = Path(source) / LCM_LORA
    if lora.is_file():
        return adapter, "animatelcm", str(lora)
    if "animatelcm" in source.lower() and not os.path.isdir(source):  # the Hub repo: the LoRA beside the adapter
        return adapter, "animatelcm", source
    return adapter, None, None


def _load_state_dict(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def load_lcm_lora(pipe, source, scale: float = LCM_LORA_SCALE, **load):
    """AnimateLCM's spatial LoRA (a kohya-layout file, `AnimateLCM_sd15_t2v_lora.safetensors`) through the pipeline's
    diffusers LoRA loading, fused into the UNet at `scale` (W + scale up down): the adapter is part of the model, as
    the motion modules are, so later LoRAs and `set_adapters` leave it alone. `source`: the file, or the Hub repo."""
    source = os.fspath(source)
    if os.path.isfile(source):
        pipe.load_lora_weights(source, adapter_name=LCM_ADAPTER_NAME)
    else:
        pipe.load_lora_weights(source, weight_name=LCM_LORA, adapter_name=LCM_ADAPTER_NAME, **load)
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=scale, adapter_names=[LCM_ADAPTER_NAME])
    pipe.unload_lora_weights()  # the LoRA layers go, the fused weights stay

