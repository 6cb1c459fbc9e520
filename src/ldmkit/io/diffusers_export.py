"""Writing a diffusers folder: our model as `StableDiffusionPipeline` (or the inpainting variant)
with diffusers' config files, weight names and scheduler config (reading: `diffusers_format`)."""
from __future__ import annotations

import shutil
from pathlib import Path

from ldmkit.io.diffusers_format import (_UNET_FIXED, _VAE_FIXED, SCHEDULER_OF_SAMPLER, TEXT_WEIGHTS, UNET_WEIGHTS,
                                        _unet_fields)
from ldmkit.io.files import save_tensors, write_json


def unet_config_to_diffusers(cfg: dict) -> dict:
    ours = _unet_fields()
    out = {"_class_name": "UNet2DConditionModel", **{k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}}
    out.update({k: v for k, v in _UNET_FIXED.items() if k not in ours and k != "addition_embed_type_num_heads"})
    return out


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


def schedule_to_diffusers(schedule: dict, sampler: str = "ddim", options: dict | None = None,
                          prediction: str | None = None) -> dict:
    from ldmkit.diffusion.schedules import prediction_of

    options = options or {}
    cls = SCHEDULER_OF_SAMPLER.get(sampler, "DDIMScheduler")
    pred = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[prediction or prediction_of(schedule, "eps")]
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


def save_diffusers(folder, index: dict, components: dict) -> Path:
    """Write an ldmkit Stable Diffusion model as a diffusers StableDiffusionPipeline folder.

    Weights keep their names (UNet and VAE names are diffusers' names; the text encoder gets the
    classic `text_model.` layout that every transformers version reads). model_index.json is written
    last, so a folder with an index is complete; it carries our sampling defaults under "_ldmkit",
    which diffusers ignores.
    """
    from ldmkit.autoencoder.model import Autoencoder
    from ldmkit.conditioning.text import CLIPTextEncoder
    from ldmkit.denoisers.unet import UNet
    from ldmkit.io.files import config_to_dict

    unet, ae, text = components.get("denoiser"), components.get("autoencoder"), components.get("conditioner")
    if not isinstance(unet, UNet) or not isinstance(ae, Autoencoder) or not isinstance(text, CLIPTextEncoder):
        kinds = {k: type(v).__name__ for k, v in components.items() if v is not None}
        raise ValueError(f"only Stable-Diffusion-shaped models (UNet denoiser, KL autoencoder, CLIP text "
                         f"conditioner) can be written as a diffusers folder; this model has {kinds}")
    if index.get("concat") not in (None, "inpaint"):
        raise ValueError(f"models with concat={index.get('concat')!r} have no StableDiffusionPipeline layout")
    schedule = index.get("schedule") or {}
    if schedule.get("kind", "discrete") != "discrete":
        raise ValueError("flow-matching schedules have no StableDiffusionPipeline scheduler")
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    defaults = dict(index.get("defaults") or {})

    def weights(module, sub, stem, rename=lambda k: k):
        state = {rename(k): v.detach().to("cpu") for k, v in module.state_dict().items()
                 if not k.endswith("position_ids")}
        save_tensors(root / sub / f"{stem}.safetensors", state, metadata={"format": "pt"})

    write_json(root / "unet" / "config.json", unet_config_to_diffusers(config_to_dict(unet.config)))
    weights(unet, "unet", UNET_WEIGHTS)
    write_json(root / "vae" / "config.json",
               autoencoder_config_to_diffusers(config_to_dict(ae.config), bool(defaults.get("upcast_vae", True))))
    weights(ae, "vae", UNET_WEIGHTS)
    hf = dict(text.config.hf_config)
    hf.update(architectures=["CLIPTextModel"], model_type="clip_text_model")
    write_json(root / "text_encoder" / "config.json", hf)
    weights(text.model, "text_encoder", TEXT_WEIGHTS, rename=lambda k: "text_model." + k.removeprefix("text_model."))
    tok_dir = root / "tokenizer"
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    text.tokenizer.save_pretrained(str(tok_dir))
    sched = schedule_to_diffusers(schedule, defaults.get("sampler", "ddim"), defaults.get("sampler_options"),
                                  index.get("objective"))
    write_json(root / "scheduler" / "scheduler_config.json", sched)
    write_json(root / "model_index.json", {
        "_class_name": "StableDiffusionInpaintPipeline" if index.get("concat") == "inpaint" else "StableDiffusionPipeline",
        "_diffusers_version": "0.30.0",
        "_ldmkit": {"defaults": defaults, "latent_size": index.get("latent_size"),
                    "conditioner": {"max_length": text.config.max_length, "clip_skip": text.config.clip_skip}},
        "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", sched["_class_name"]], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
    return root
