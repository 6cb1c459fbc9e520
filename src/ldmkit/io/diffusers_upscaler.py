"""diffusers' Stable Diffusion x4 upscaler folders (`StableDiffusionUpscalePipeline`) <-> ldmkit models.

The folder is a Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/) plus

    low_res_scheduler/scheduler_config.json   a DDPMScheduler whose `add_noise` noises the low-res image
    model_index.json "max_noise_level"        the highest noise level the pipeline accepts (350)

and a UNet that takes the 4 latent channels + the 3 channels of the low-resolution RGB image, with a
1000-row class embedding that receives the noise level. In ldmkit terms: `concat: "upscale"`, the noise
level a class label, and these settings in model_index.json "defaults" (the pipeline reads them):

    noise_level       20 (diffusers' default; `ldm upscale --noise-level`)
    max_noise_level   model_index.json's value (refused when it is not an integer in [0, classes - 1])
    low_res_schedule  the low_res_scheduler's betas as an ldmkit schedule dict (scaled-linear
                      1e-4 .. 0.02 in the real model; ldmkit's own upscalers use linear betas)
    steps, guidance   75 and 9.0: diffusers' call defaults for this pipeline

diffusers resets the VAE's scaling_factor to 0.08333 when the config has another value; so does this
reader (with a note). The functions here take and return plain dicts: `diffusers_format` (reading) and
`diffusers_export` (writing) call them, this module imports neither.
"""
from __future__ import annotations

from pathlib import Path

UPSCALE_PIPELINE = "StableDiffusionUpscalePipeline"
X4_SCALING_FACTOR = 0.08333  # what diffusers' pipeline forces on the VAE config
DEFAULT_MAX_NOISE_LEVEL = 350  # StableDiffusionUpscalePipeline.__init__'s default
DEFAULT_NOISE_LEVEL = 20  # StableDiffusionUpscalePipeline.__call__'s default
# schedulers whose add_noise is the DDPM forward process sqrt(abar) x + sqrt(1 - abar) eps
LOW_RES_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
_BETAS = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
# defaults a written folder holds as diffusers' own entries (low_res_scheduler/, max_noise_level), not under "_ldmkit"
FOLDER_SETTINGS = ("low_res_schedule", "max_noise_level")


def low_res_schedule(cfg: dict, where: str) -> dict:
    """low_res_scheduler/scheduler_config.json -> an ldmkit DiscreteSchedule dict (the betas add_noise uses)."""
    from ldmkit.diffusion.schedules import DiscreteSchedule
    from ldmkit.errors import UserError, check_int, check_number, check_str
    from ldmkit.io.format import MAX_TIMESTEPS

    try:
        cls = cfg.get("_class_name", "DDPMScheduler")
        check_str("_class_name", cls, LOW_RES_SCHEDULERS)
        check_int("num_train_timesteps", cfg.get("num_train_timesteps", 1000), 2, MAX_TIMESTEPS)
        for name in ("beta_start", "beta_end"):
            check_number(name, cfg.get(name), 0, 1, optional=True, lo_open=True, hi_open=True)
        check_str("beta_schedule", cfg.get("beta_schedule", "linear"), tuple(_BETAS))
        if cfg.get("trained_betas") is not None:
            raise UserError("trained_betas must be null (explicit betas are not supported)")
        zero_snr = cfg.get("rescale_betas_zero_snr", False)
        if not isinstance(zero_snr, bool):
            raise UserError(f"rescale_betas_zero_snr={zero_snr!r} must be true or false")
        schedule = DiscreteSchedule(beta_schedule=_BETAS[cfg.get("beta_schedule", "linear")],
                                    num_train_timesteps=cfg.get("num_train_timesteps", 1000),
                                    beta_start=float(cfg.get("beta_start", 0.0001)),
                                    beta_end=float(cfg.get("beta_end", 0.02)), rescale_zero_terminal_snr=zero_snr)
    except ValueError as exc:  # UserError included
        raise UserError(f"{where}: {exc}") from None
    return schedule.to_dict()


def read_upscaler(root, index: dict, parts) -> None:
    """Add an x4 upscaler folder's own parts to `parts` (a `diffusers_format.DiffusersParts`): its
    low_res_scheduler, max_noise_level and diffusers' fixed VAE scaling factor."""
    from ldmkit.errors import UserError, check_int
    from ldmkit.io.files import read_json

    root = Path(root)
    sched_file = root / "low_res_scheduler" / "scheduler_config.json"
    if not sched_file.is_file():
        raise FileNotFoundError(f"{root} is a {UPSCALE_PIPELINE} folder without {sched_file.relative_to(root)} "
                                "(the scheduler that noises the low-resolution image)")
    level = index.get("max_noise_level", DEFAULT_MAX_NOISE_LEVEL)
    try:
        check_int("max_noise_level", level, 0, 1 << 20)
    except UserError as exc:
        raise UserError(f"{root / 'model_index.json'}: {exc}") from None
    parts.upscaler = {"low_res_schedule": low_res_schedule(read_json(sched_file), str(sched_file)),
                      "max_noise_level": level}
    scale = parts.vae_config.get("scaling_factor")
    if scale != X4_SCALING_FACTOR:  # diffusers' pipeline does the same (with a deprecation warning)
        parts.vae_config = {**parts.vae_config, "scaling_factor": X4_SCALING_FACTOR}
        parts.notes.append(f"vae scaling_factor {scale!r} replaced by {X4_SCALING_FACTOR}, as diffusers' "
                           f"{UPSCALE_PIPELINE} does")


def upscaler_defaults(upscaler: dict, num_class_embeds, where: str) -> dict:
    """The model_index.json "defaults" of a diffusers x4 upscaler (see the module docstring), checked
    against its UNet's class table (`num_class_embeds`: the noise levels it has embeddings for)."""
    from ldmkit.errors import UserError

    if not num_class_embeds:
        raise UserError(f"{where}: the UNet of a {UPSCALE_PIPELINE} needs a class embedding for the noise level "
                        "(num_class_embeds), this one has none")
    top = min(num_class_embeds, upscaler["low_res_schedule"]["num_train_timesteps"]) - 1
    level = upscaler["max_noise_level"]
    if level > top:
        raise UserError(f"{where}: max_noise_level={level} must be at most {top} (the UNet embeds "
                        f"{num_class_embeds} noise levels, the low_res_scheduler has "
                        f"{upscaler['low_res_schedule']['num_train_timesteps']} steps)")
    return {"noise_level": min(DEFAULT_NOISE_LEVEL, level), "max_noise_level": level,
            "low_res_schedule": dict(upscaler["low_res_schedule"]), "steps": 75, "guidance": 9.0}


# ----------------------------------------------------------------------------- writing
def export_refusal(num_class_embeds, scaling_factor) -> str | None:
    """Why a text-conditioned CLIP `concat: "upscale"` UNet cannot be written as a StableDiffusionUpscalePipeline
    (None when it can): the pipeline always noises the low-res image and passes the level as a class label,
    and it decodes with scaling factor 0.08333 whatever the VAE config says."""
    if not num_class_embeds:
        return (f"{UPSCALE_PIPELINE} passes the low-res image's noise level as a class label; this upscaler's UNet "
                "has no class embedding (no noise-level input)")
    if scaling_factor != X4_SCALING_FACTOR:
        return (f"{UPSCALE_PIPELINE} replaces the VAE's scaling_factor by {X4_SCALING_FACTOR}; this model's "
                f"autoencoder has scaling_factor={scaling_factor}")
    return None


def write_low_res_scheduler(root, index: dict, num_class_embeds: int) -> dict:
    """Write low_res_scheduler/scheduler_config.json for an upscaler model; returns the model_index.json
    entries of a StableDiffusionUpscalePipeline. An ldmkit-trained upscaler (no low_res_schedule in its
    defaults) noised its inputs on a linear schedule with one step per class; its max_noise_level is the
    last class."""
    from ldmkit.io.files import write_json

    defaults = index.get("defaults") or {}
    schedule = defaults.get("low_res_schedule") or {"beta_schedule": "linear", "num_train_timesteps": num_class_embeds,
                                                    "beta_start": 0.0001, "beta_end": 0.02}
    beta = {"cosine": "squaredcos_cap_v2"}.get(schedule["beta_schedule"], schedule["beta_schedule"])
    cfg = {"_class_name": "DDPMScheduler", "num_train_timesteps": schedule["num_train_timesteps"],
           "beta_start": schedule["beta_start"], "beta_end": schedule["beta_end"], "beta_schedule": beta,
           "rescale_betas_zero_snr": bool(schedule.get("rescale_zero_terminal_snr", False)),
           "prediction_type": "epsilon", "variance_type": "fixed_small", "clip_sample": True, "trained_betas": None}
    write_json(Path(root) / "low_res_scheduler" / "scheduler_config.json", cfg)
    level = defaults.get("max_noise_level")
    return {"_class_name": UPSCALE_PIPELINE, "low_res_scheduler": ["diffusers", "DDPMScheduler"],
            "max_noise_level": int(level if level is not None else min(num_class_embeds, cfg["num_train_timesteps"]) - 1)}
