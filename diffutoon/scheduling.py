"""The reference's DDIM ("DDIM as in AnimateDiff", paper eq. 8) as a diffusers scheduler.

It lives in the installed `diffutoon` package, not in `pipeline_diffutoon.py`, so that a saved pipeline
folder names it `["diffutoon.scheduling", "DiffutoonDDIMScheduler"]` and reloads however the pipeline
file itself was loaded (installed module, `custom_pipeline=` file, Hub folder).

Example:
    >>> from diffutoon.scheduling import DiffutoonDDIMScheduler
    >>> scheduler = DiffutoonDDIMScheduler()
    >>> scheduler.set_timesteps(10)
    >>> scheduler.timesteps.tolist()
    [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput


def diffutoon_timesteps(num_inference_steps: int, strength: float = 1.0, num_train_timesteps: int = 1000) -> list[int]:
    """The reference's timestep list: t_max = round(1000 s) - 1, then T points from t_max down to 0 (SPEC 1).

    >>> diffutoon_timesteps(10)
    [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}.")
    t_max = round(num_train_timesteps * strength) - 1
    if num_inference_steps == 1:
        return [t_max]
    return [round(t_max - k * t_max / (num_inference_steps - 1)) for k in range(num_inference_steps)]


def ddim_step(sample: torch.Tensor, noise_pred: torch.Tensor, alpha_bar: float, alpha_bar_prev: float) -> torch.Tensor:
    """Paper eq. 8, DDIM with eta = 0 and epsilon prediction, no clipping:
    x_prev = sqrt(ab_prev / ab_t) x_t + (sqrt(1 - ab_prev) - sqrt(ab_prev (1 - ab_t) / ab_t)) eps.
    """
    a, ap = float(alpha_bar), float(alpha_bar_prev)
    return (ap / a) ** 0.5 * sample + ((1 - ap) ** 0.5 - (ap * (1 - a) / a) ** 0.5) * noise_pred


class DiffutoonDDIMScheduler(SchedulerMixin, ConfigMixin):
    """DDIM over the reference's timestep list; each step goes to the next listed timestep, the last to
    alpha-bar = 1 (SPEC 1, "Scheduler"). `beta_schedule="scaled_linear"` gives the editing branch's betas.

    Unlike diffusers' `DDIMScheduler` (which steps to t - 1000 // T), this is the sampler the reference ran.
    `set_timesteps(..., strength=s)` starts at round(1000 s) - 1 and still takes all T steps.
    """

    order = 1
    config_name = "scheduler_config.json"

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "linear"):
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        else:
            raise ValueError(f"beta_schedule must be 'linear' or 'scaled_linear', got {beta_schedule!r}.")
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # float64: the step coefficients in full precision
        self.init_noise_sigma = 1.0
        self.timesteps = torch.tensor(diffutoon_timesteps(10))
        self.num_inference_steps = None
        self._step_index = None

    @property
    def step_index(self):
        return self._step_index

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps: list[int] | None = None,
                      strength: float = 1.0):
        """The reference list for `num_inference_steps` and `strength`, or a custom decreasing `timesteps`."""
        if timesteps is None:
            timesteps = diffutoon_timesteps(num_inference_steps, strength, self.config.num_train_timesteps)
        elif any(a <= b for a, b in zip(timesteps, timesteps[1:])):
            raise ValueError(f"timesteps must be strictly decreasing, got {list(timesteps)}.")
        self.num_inference_steps = len(timesteps)
        self.timesteps = torch.tensor(list(timesteps), dtype=torch.long, device=device)
        self._step_index = None

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, **kwargs):
        """One eq. 8 step from `timestep` to the next timestep of the list (alpha-bar 1 after the last)."""
        prev_sample = self.step_function(timestep, self._step_index)(model_output, sample)
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    def step_function(self, timestep, index: int | None = None):
        """The step from `timestep` as a function of (model_output, sample). Eq. 8 is elementwise, so the function
        may be applied to any part of the video (a few frames at a time keeps host memory flat). Advances the step."""
        if index is None:
            matches = (self.timesteps == int(timestep)).nonzero()
            if len(matches) == 0:
                raise ValueError(f"timestep {int(timestep)} is not in this scheduler's timesteps; call set_timesteps.")
            index = int(matches[0])
        alpha_bar = self.alphas_cumprod[int(self.timesteps[index])]
        alpha_bar_prev = self.alphas_cumprod[int(self.timesteps[index + 1])] if index + 1 < len(self.timesteps) else 1.0
        self._step_index = index + 1
        return lambda model_output, sample: ddim_step(sample, model_output, alpha_bar, alpha_bar_prev).to(sample.dtype)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """The img2img start: x = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise (SPEC 1)."""
        alpha_bar = float(self.alphas_cumprod[int(torch.as_tensor(timesteps).flatten()[0])])
        return (alpha_bar**0.5 * original_samples + (1 - alpha_bar) ** 0.5 * noise).to(original_samples.dtype)

    def __len__(self):
        return self.config.num_train_timesteps
