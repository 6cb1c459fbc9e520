"""Diffusion math: schedules, forward process, objectives, the denoiser, samplers, guidance. Pure tensor code.

    network --cfg--> model(x, t) --Denoiser--> D(x, sigma) -> x0 --sampler(D, x, plan.sigmas)--> sample

See docs/internals.md, section "Diffusion math (ldmkit.diffusion)", for the contract.
"""

from .denoiser import Denoiser
from .forward import coefficients, convert, noise_to, posterior, q_sample, to_x0
from .guidance import cfg, concat_conditions, rescale_cfg
from .objectives import (OBJECTIVES, TIMESTEP_SAMPLING, loss_weight, model_timestep, sample_timesteps, snr,
                         training_loss, training_target)
from .samplers import (GRIDS, SAMPLERS, SIGMA_KINDS, Plan, Sampler, get_sampler, img2img_start, karras_sigmas, plan,
                       resolve_sampler, sample, sampler_names, split_options, with_sigmas)
from .schedules import (PREDICTIONS, PRESETS, SCHEDULES, DiscreteSchedule, FlowSchedule, Schedule, flow_time,
                        make_schedule, prediction_name, prediction_of, schedule_from_dict, sigma_of_flow_time,
                        spaced_timesteps, vp_of_sigma)

__all__ = [
    "Denoiser", "coefficients", "convert", "noise_to", "posterior", "q_sample", "to_x0", "cfg",
    "concat_conditions", "rescale_cfg", "OBJECTIVES", "TIMESTEP_SAMPLING", "loss_weight", "model_timestep",
    "sample_timesteps", "snr", "training_loss", "training_target", "GRIDS", "SAMPLERS", "Plan", "Sampler",
    "get_sampler", "img2img_start", "karras_sigmas", "plan", "sample", "sampler_names", "split_options", "PREDICTIONS",
    "SIGMA_KINDS", "resolve_sampler", "with_sigmas",
    "PRESETS", "SCHEDULES", "DiscreteSchedule", "FlowSchedule", "Schedule", "flow_time", "make_schedule",
    "prediction_name", "prediction_of", "schedule_from_dict", "sigma_of_flow_time", "spaced_timesteps",
    "vp_of_sigma",
]

