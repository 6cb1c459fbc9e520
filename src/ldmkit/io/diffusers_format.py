"""diffusers' Stable Diffusion folders <-> ldmkit models.

A diffusers folder (`save_pretrained` of a StableDiffusionPipeline):

    model_index.json                  {"_class_name": "StableDiffusionPipeline", "unet": [...], ...}
    unet/config.json + diffusion_pytorch_model.safetensors      -> our "denoiser" (UNet)
    vae/config.json  + diffusion_pytorch_model.safetensors      -> our "autoencoder"
    text_encoder/config.json + model.safetensors (CLIPTextModel) -> our "conditioner"
    tokenizer/ (vocab.json, merges.txt, tokenizer_config.json)   -> inside our conditioner
    scheduler/scheduler_config.json   -> our schedule + the default sampler (model_index.json)

Parameter names of our UNet and autoencoder are diffusers' names, so the weights
copy over unchanged; only configs are translated. Both directions go through
`DiffusersParts` (configs + tensors in diffusers' terms), which is also what
`ldmkit.io.single_file` produces from an original checkpoint.

Weights: `*.safetensors` preferred (also `*.fp16.safetensors` variants and
sharded `*.safetensors.index.json`); `*.bin` only through
`torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldmkit.io.format import read_json, save_tensors, write_json

UNET_WEIGHTS = "diffusion_pytorch_model"
TEXT_WEIGHTS = "model"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.json", "added_tokens.json")


@dataclass
class DiffusersParts:
    """A Stable Diffusion model in diffusers' terms, held in memory."""

    unet_config: dict
    unet_state: dict
    vae_config: dict
    vae_state: dict
    text_config: dict           # transformers CLIPTextConfig fields
    text_state: dict            # CLIPTextModel tensor names (text_model.*)
    tokenizer: str | Path | None  # folder with vocab.json + merges.txt (or a diffusers folder with tokenizer/)
    scheduler_config: dict
    pad_with_eos: bool = True   # SD 1.x pads prompts with <|endoftext|>, SD 2.x with "!" (used without tokenizer_config)
    notes: list = field(default_factory=list)


# ----------------------------------------------------------------------------- reading weights
def _read_weights(folder: Path, stem: str, variant: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of one diffusers component folder (safetensors preferred, sharded allowed)."""
    from safetensors.torch import load_file

    names = [f"{stem}.{variant}" if variant else None, stem]
    for name in [n for n in names if n]:
        single = folder / f"{name}.safetensors"
        if single.is_file():
            return load_file(str(single))
        index = folder / f"{name}.safetensors.index.json"
        if index.is_file():
            state = {}
            for shard in sorted(set(read_json(index).get("weight_map", {}).values())):
                state.update(load_file(str(folder / shard)))
            return state
    for name in [n for n in names if n]:
        pickled = folder / f"{name}.bin"
        if pickled.is_file():
            try:
                return torch.load(str(pickled), map_location="cpu", weights_only=True)
            except Exception as exc:
                raise ValueError(f"{pickled} cannot be read safely with torch.load(weights_only=True) ({exc}); "
                                 "re-save the model with safetensors") from None
    raise FileNotFoundError(f"no weights in {folder}: expected {stem}.safetensors (or .bin)")


def read_diffusers(path, variant: str | None = None) -> DiffusersParts:
    """Read a diffusers Stable Diffusion folder into `DiffusersParts` (nothing is built yet)."""
    root = Path(path)
    for sub in ("unet", "vae", "text_encoder", "scheduler"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"{root} is not a complete diffusers Stable Diffusion folder: {sub}/ is missing")
    index = read_json(root / "model_index.json") if (root / "model_index.json").is_file() else {}
    pipeline = index.get("_class_name", "StableDiffusionPipeline")
    if pipeline not in ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"):
        raise ValueError(f"{root}: pipeline {pipeline!r} is not supported; ldmkit reads StableDiffusionPipeline "
                         "folders (SD 1.x / 2.x text-to-image)")
    sched_file = root / "scheduler" / "scheduler_config.json"
    return DiffusersParts(
        unet_config=read_json(root / "unet" / "config.json"),
        unet_state=_read_weights(root / "unet", UNET_WEIGHTS, variant),
        vae_config=read_json(root / "vae" / "config.json"),
        vae_state=_read_weights(root / "vae", UNET_WEIGHTS, variant),
        text_config=read_json(root / "text_encoder" / "config.json"),
        text_state=_read_weights(root / "text_encoder", TEXT_WEIGHTS, variant),
        tokenizer=root / "tokenizer" if (root / "tokenizer").is_dir() else None,
        scheduler_config=read_json(sched_file),
        notes=[f"{root.name}: diffusers {pipeline} folder"],
    )


# ----------------------------------------------------------------------------- configs: UNet
# diffusers' UNet2DConditionModel defaults for the fields ldmkit's UNetConfig shares (old configs omit some).
_UNET_DEFAULTS = {
    "in_channels": 4, "out_channels": 4, "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "layers_per_block": 2, "attention_head_dim": 8, "num_attention_heads": None,
    "transformer_layers_per_block": 1, "cross_attention_dim": 1280, "use_linear_projection": False,
    "upcast_attention": False, "norm_num_groups": 32, "norm_eps": 1e-5, "resnet_time_scale_shift": "default",
    "num_class_embeds": None, "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1,
    "dropout": 0.0, "sample_size": 64,
}
# diffusers options ldmkit's UNet implements only at these values (anything else is refused by name).
_UNET_FIXED = {
    "center_input_sample": False, "act_fn": "silu", "class_embed_type": None, "addition_embed_type": None,
    "time_embedding_type": "positional", "time_cond_proj_dim": None, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "dual_cross_attention": False, "only_cross_attention": False,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
    "reverse_transformer_layers_per_block": None, "mid_block_only_cross_attention": None,
    "cross_attention_norm": None, "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "projection_class_embeddings_input_dim": None, "timestep_post_act": None, "time_embedding_dim": None,
    "time_embedding_act_fn": None, "addition_time_embed_dim": None, "class_embeddings_concat": False,
    "mid_block_scale_factor": 1, "addition_embed_type_num_heads": 64,
}


def _check_fixed(cfg: dict, fixed: dict, what: str) -> None:
    for k, allowed in fixed.items():
        v = cfg.get(k, allowed)
        if v != allowed and not (isinstance(allowed, (int, float)) and isinstance(v, (int, float)) and float(v) == allowed):
            raise ValueError(f"{what} option {k}={v!r} is not supported by ldmkit (supported: {allowed!r})")


def unet_config_from_diffusers(cfg: dict) -> dict:
    _check_fixed(cfg, _UNET_FIXED, "diffusers UNet")
    out = {k: cfg.get(k, d) for k, d in _UNET_DEFAULTS.items()}
    for k, v in out.items():
        if isinstance(v, list):
            out[k] = tuple(v)
    return out


def unet_config_to_diffusers(cfg: dict) -> dict:
    out = {"_class_name": "UNet2DConditionModel", **{k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}}
    out.update({k: v for k, v in _UNET_FIXED.items() if k not in ("addition_embed_type_num_heads",)})
    return out


# ----------------------------------------------------------------------------- configs: autoencoder
_VAE_FIXED = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True,
              "latents_mean": None, "latents_std": None}


def autoencoder_config_from_diffusers(cfg: dict) -> dict:
    _check_fixed(cfg, _VAE_FIXED, "diffusers AutoencoderKL")
    for k, expect in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        bad = [t for t in cfg.get(k, []) if t != expect]
        if bad:
            raise ValueError(f"diffusers AutoencoderKL {k} entries {bad} are not supported (only {expect})")
    widths = list(cfg.get("block_out_channels", [64]))
    base = widths[0]
    if any(w % base for w in widths):
        raise ValueError(f"autoencoder block_out_channels={widths} are not multiples of the first width {base}")
    return {
        "kind": "kl",
        "in_channels": cfg.get("in_channels", 3),
        "out_channels": cfg.get("out_channels", 3),
        "channels": base,
        "ch_mult": tuple(w // base for w in widths),
        "num_res_blocks": cfg.get("layers_per_block", 1),
        "latent_channels": cfg.get("latent_channels", 4),
        "norm_groups": cfg.get("norm_num_groups", 32),
        "mid_attention": bool(cfg.get("mid_block_add_attention", True)),
        "scaling_factor": float(cfg.get("scaling_factor", 0.18215)),
        "shift_factor": float(cfg.get("shift_factor") or 0.0),
        "sample_size": cfg.get("sample_size", 512),
    }


def autoencoder_config_to_diffusers(cfg: dict, force_upcast: bool = True) -> dict:
    if cfg.get("kind", "kl") != "kl":
        raise ValueError(f"only KL autoencoders have a diffusers AutoencoderKL counterpart (kind={cfg.get('kind')!r})")
    n = len(cfg["ch_mult"])
    out = {
        "_class_name": "AutoencoderKL",
        "in_channels": cfg["in_channels"], "out_channels": cfg["out_channels"],
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [cfg["channels"] * m for m in cfg["ch_mult"]],
        "layers_per_block": cfg["num_res_blocks"], "latent_channels": cfg["latent_channels"],
        "norm_num_groups": cfg["norm_groups"], "mid_block_add_attention": cfg["mid_attention"],
        "sample_size": cfg["sample_size"], "scaling_factor": cfg["scaling_factor"],
        "shift_factor": cfg["shift_factor"] or None, "force_upcast": force_upcast,
    }
    out.update({k: v for k, v in _VAE_FIXED.items()})
    return out


# ----------------------------------------------------------------------------- configs: scheduler
# diffusers scheduler class -> ldmkit sampler name (ldmkit.diffusion.SAMPLERS).
SAMPLER_OF_SCHEDULER = {
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "HeunDiscreteScheduler": "heun",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    # No PNDM/LMS/UniPC in ldmkit: their SD defaults are served by the closest deterministic sampler.
    "PNDMScheduler": "ddim",
    "LMSDiscreteScheduler": "euler",
    "UniPCMultistepScheduler": "dpmpp_2m",
    "DPMSolverSinglestepScheduler": "dpmpp_2m",
}
SCHEDULER_OF_SAMPLER = {
    "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler", "heun": "HeunDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler", "dpmpp_2m_karras": "DPMSolverMultistepScheduler",
}


def schedule_from_diffusers(cfg: dict) -> tuple[dict, dict, list[str]]:
    """diffusers scheduler_config.json -> (our DiscreteSchedule dict, sampler defaults, notes)."""
    from ldmkit.diffusion.schedules import DiscreteSchedule

    notes = []
    if cfg.get("trained_betas") is not None:
        raise ValueError("scheduler config with explicit trained_betas is not supported")
    cls = cfg.get("_class_name", "DDIMScheduler")
    if cls not in SAMPLER_OF_SCHEDULER:
        raise ValueError(f"diffusers scheduler {cls!r} is not supported; known: {sorted(SAMPLER_OF_SCHEDULER)}")
    sampler = SAMPLER_OF_SCHEDULER[cls]
    if SCHEDULER_OF_SAMPLER.get(sampler) != cls:
        notes.append(f"scheduler {cls} has no ldmkit counterpart: default sampler set to {sampler}")
    spacing = cfg.get("timestep_spacing", "leading")
    schedule = DiscreteSchedule(
        beta_schedule=cfg.get("beta_schedule", "linear"),
        num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)),
        beta_start=float(cfg.get("beta_start", 0.0001)),
        beta_end=float(cfg.get("beta_end", 0.02)),
        prediction_type=cfg.get("prediction_type", "epsilon"),
        rescale_zero_terminal_snr=bool(cfg.get("rescale_betas_zero_snr", False)),
        timestep_spacing=spacing,
        steps_offset=int(cfg.get("steps_offset", 0)),
    ).to_dict()
    options = {}
    if cls == "DDIMScheduler":
        options["set_alpha_to_one"] = bool(cfg.get("set_alpha_to_one", True))
    if cls in ("DDIMScheduler", "DDPMScheduler") and cfg.get("clip_sample", True):
        options["clip_x0"] = float(cfg.get("clip_sample_range", 1.0))
    if cfg.get("use_karras_sigmas"):
        if sampler == "dpmpp_2m":
            sampler = "dpmpp_2m_karras"
        else:
            notes.append(f"use_karras_sigmas is ignored for {cls} (ldmkit has Karras sigmas for DPM++ 2M only)")
    return schedule, {"sampler": sampler, "sampler_options": options}, notes


def schedule_to_diffusers(schedule: dict, sampler: str = "ddim", options: dict | None = None) -> dict:
    options = options or {}
    cls = SCHEDULER_OF_SAMPLER.get(sampler, "DDIMScheduler")
    pred = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[schedule.get("prediction_type", "eps")]
    beta = {"cosine": "squaredcos_cap_v2"}.get(schedule["beta_schedule"], schedule["beta_schedule"])
    out = {
        "_class_name": cls, "num_train_timesteps": schedule["num_train_timesteps"],
        "beta_start": schedule["beta_start"], "beta_end": schedule["beta_end"], "beta_schedule": beta,
        "prediction_type": pred, "timestep_spacing": schedule["timestep_spacing"],
        "steps_offset": schedule["steps_offset"], "rescale_betas_zero_snr": schedule["rescale_zero_terminal_snr"],
        "trained_betas": None,
    }
    if cls in ("DDIMScheduler", "DDPMScheduler"):
        clip = options.get("clip_x0")
        out.update(clip_sample=clip is not None, clip_sample_range=float(clip if clip is not None else 1.0))
    if cls == "DDIMScheduler":
        out["set_alpha_to_one"] = bool(options.get("set_alpha_to_one", True))
    if cls == "DPMSolverMultistepScheduler":
        out.update(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=sampler == "dpmpp_2m_karras")
    return out
