"""Diffusion math: schedules, forward process, objectives, samplers, guidance. Pure tensor code.

See docs/internals.md, section "Diffusion math (ldmkit.diffusion)", for the contract.
"""

from .forward import PREDICTIONS, coefficients, convert, noise_to, posterior, q_sample, to_eps, to_score, to_v, to_x0
from .guidance import cfg_denoiser, concat_conditions, rescale_cfg
from .objectives import (OBJECTIVES, loss_weight, model_timestep, sample_timesteps, snr, training_loss,
                         training_target)
from .samplers import (DETERMINISTIC, SAMPLERS, Plan, get_sampler, img2img_start, karras_sigmas, plan,
                       sampler_names)
from .schedules import (PRESETS, SCHEDULES, DiscreteSchedule, FlowSchedule, Schedule, make_schedule,
                        schedule_from_dict, spaced_timesteps)

__all__ = [
    "PREDICTIONS", "coefficients", "convert", "noise_to", "posterior", "q_sample", "to_eps", "to_score", "to_v",
    "to_x0", "cfg_denoiser", "concat_conditions", "rescale_cfg", "OBJECTIVES", "loss_weight", "model_timestep",
    "sample_timesteps", "snr", "training_loss", "training_target", "DETERMINISTIC", "SAMPLERS", "Plan",
    "get_sampler", "img2img_start", "karras_sigmas", "plan", "sampler_names", "PRESETS", "SCHEDULES",
    "DiscreteSchedule", "FlowSchedule", "Schedule", "make_schedule", "schedule_from_dict", "spaced_timesteps",
]
