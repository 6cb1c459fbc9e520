"""Writing a diffusers folder: our model as the diffusers pipeline that runs it -- StableDiffusionPipeline
(or the inpainting variant, or StableDiffusionUpscalePipeline for x4 upscalers: `diffusers_upscaler`) for
text models with a CLIP encoder, LDMPipeline for unconditional ones, DiTPipeline for class-conditional
DiTs -- with diffusers' config files, weight names and scheduler config (reading: `diffusers_format`).
Models diffusers has no pipeline for are refused with the reason."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ldmkit.errors import UserError
from ldmkit.io.diffusers_format import _UNET_FIXED, _VAE_FIXED, TEXT_WEIGHTS, UNET_WEIGHTS, _unet_fields
from ldmkit.io.diffusers_schedulers import schedule_to_diffusers  # noqa: F401 (the scheduler config, re-exported)
from ldmkit.io.diffusers_upscaler import FOLDER_SETTINGS, export_refusal, write_low_res_scheduler
from ldmkit.io.files import config_to_dict, save_tensors, write_json


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
        "use_quant_conv": cfg.get("use_quant_conv", True), "use_post_quant_conv": cfg.get("use_post_quant_conv", True),
    }
    out.update({k: v for k, v in _VAE_FIXED.items()})
    return out


def diffusers_pipeline_of(index: dict, components: dict) -> str:
    """The diffusers pipeline a model can be written as -- "sd" (StableDiffusion[Inpaint]Pipeline),
    "ldm" (LDMPipeline, unconditional) or "dit" (DiTPipeline, class-conditional) -- or a UserError
    saying why diffusers has none for it."""
    from ldmkit.autoencoder.model import Autoencoder
    from ldmkit.conditioning.text import CLIPTextEncoder
    from ldmkit.denoisers.dit import DiT
    from ldmkit.denoisers.unet import UNet

    den, ae, text = components.get("denoiser"), components.get("autoencoder"), components.get("conditioner")
    conditioning, concat = index.get("conditioning") or ("none" if text is None else "text"), index.get("concat")
    schedule = index.get("schedule") or {}
    why = None
    kinds = {("MMDiT", "SD3TextEncoder"): "sd3", ("FluxModel", "FluxTextEncoder"): "flux"}
    if (type(den).__name__, type(text).__name__) in kinds:
        if isinstance(ae, Autoencoder) and ae.config.kind == "kl" and schedule.get("kind") == "flow":
            return kinds[(type(den).__name__, type(text).__name__)]
        why = "an SD3 / FLUX transformer needs a KL autoencoder and a flow schedule to run as diffusers' pipeline"
    elif type(den).__name__ == "ExtendedUNet":
        why = ("its denoiser is an ExtendedUNet: ldmkit's extensions (context adapter / position features) have no "
               "counterpart in diffusers' UNet2DConditionModel; train without them to export")
    elif not isinstance(ae, Autoencoder) or ae.config.kind != "kl":
        why = "its autoencoder is not a KL autoencoder (diffusers' pipelines here decode with AutoencoderKL)"
    elif schedule.get("kind", "discrete") != "discrete":
        why = "rectified-flow models have no diffusers pipeline for this network (diffusers' flow pipelines are SD3/FLUX)"
    elif isinstance(den, UNet) and conditioning == "text" and type(text).__name__ == "SDXLTextEncoder":
        if concat is not None:
            why = f"ldmkit writes SDXL text-to-image models as diffusers folders, not concat={concat!r} ones"
        else:
            return "sdxl"
    elif isinstance(den, UNet) and conditioning == "text":
        if not isinstance(text, CLIPTextEncoder):
            why = (f"StableDiffusionPipeline needs a CLIP text encoder, this model has {type(text).__name__}; train "
                   "with --text-encoder clip-tiny|clip-small|clip-base or --text-encoder-from a Stable Diffusion model")
        elif concat == "upscale" and export_refusal(den.config.num_class_embeds, ae.config.scaling_factor):
            why = export_refusal(den.config.num_class_embeds, ae.config.scaling_factor)
        elif concat not in (None, "inpaint", "upscale"):
            why = f"diffusers has no pipeline for a text UNet with concat={concat!r} in ldmkit's layout"
        else:
            return "sd"
    elif isinstance(den, UNet) and conditioning == "none" and concat is None and not den.config.num_class_embeds:
        return "ldm"
    elif isinstance(den, UNet):
        why = (f"diffusers has no pipeline for a {conditioning}-conditioned UNet"
               + (f" with concat={concat!r}" if concat else "") + " (class-conditional models export as DiTs)")
    elif isinstance(den, DiT) and conditioning == "class" and concat is None and den.config.cross_attention_dim is None:
        if den.config.num_classes > 1000:
            why = f"DiTPipeline's null class is label 1000; this DiT has {den.config.num_classes} classes"
        else:
            return "dit"
    else:
        why = f"diffusers has no pipeline for a {conditioning}-conditioned {type(den).__name__}"
    raise UserError(f"cannot write a diffusers folder: {why}")


def save_diffusers(folder, index: dict, components: dict) -> Path:
    """Write an ldmkit model as the diffusers pipeline folder that runs it: StableDiffusionPipeline (or
    the inpainting variant), LDMPipeline (unconditional) or DiTPipeline (class-conditional).

    Weights keep their names (UNet and VAE names are diffusers' names; the text encoder gets the
    classic `text_model.` layout that every transformers version reads). model_index.json is written
    last, so a folder with an index is complete; it carries our sampling defaults under "_ldmkit",
    which diffusers ignores.
    """
    kind = diffusers_pipeline_of(index, components)
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    defaults = dict(index.get("defaults") or {})
    ae, ae_folder = components["autoencoder"], "vqvae" if kind == "ldm" else "vae"  # LDMPipeline's name for it
    write_json(root / ae_folder / "config.json",
               autoencoder_config_to_diffusers(config_to_dict(ae.config), bool(defaults.get("upcast_vae", True))))
    _weights(root, ae.state_dict(), ae_folder, UNET_WEIGHTS)
    if kind in ("sd3", "flux"):
        from ldmkit.io.transformer_export import flow_scheduler_config

        sched = flow_scheduler_config(index["schedule"])
    else:
        sched = schedule_to_diffusers(index["schedule"], defaults.get("sampler", "ddim"),
                                      defaults.get("sampler_options"), index.get("objective"))
    write_json(root / "scheduler" / "scheduler_config.json", sched)
    model_index = {"_diffusers_version": "0.30.0", "scheduler": ["diffusers", sched["_class_name"]],
                   "_ldmkit": {"defaults": defaults, "latent_size": index.get("latent_size")}}
    from ldmkit.io.transformer_export import write_flux, write_sd3

    write = {"sd": _write_sd, "sdxl": _write_sdxl, "ldm": _write_ldm, "dit": _write_dit, "sd3": write_sd3,
             "flux": write_flux}[kind]
    model_index.update(write(root, index, components))
    write_json(root / "model_index.json", dict(sorted(model_index.items())))
    return root


def _weights(root: Path, state: dict, sub: str, stem: str) -> None:
    state = {k: v.detach().to("cpu") for k, v in state.items() if not k.endswith("position_ids")}
    save_tensors(root / sub / f"{stem}.safetensors", state, metadata={"format": "pt"})


def _write_sd(root: Path, index: dict, components: dict) -> dict:
    unet, text = components["denoiser"], components["conditioner"]
    write_json(root / "unet" / "config.json", unet_config_to_diffusers(config_to_dict(unet.config)))
    _weights(root, unet.state_dict(), "unet", UNET_WEIGHTS)
    hf = dict(text.config.hf_config)
    hf.update(architectures=["CLIPTextModel"], model_type="clip_text_model")
    write_json(root / "text_encoder" / "config.json", hf)
    _weights(root, {"text_model." + k.removeprefix("text_model."): v for k, v in text.model.state_dict().items()},
             "text_encoder", TEXT_WEIGHTS)
    tok_dir = root / "tokenizer"
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    text.tokenizer.save_pretrained(str(tok_dir))
    inpaint = index.get("concat") == "inpaint"
    lcm = bool(getattr(unet.config, "time_cond_proj_dim", None))  # an LCM student reads the guidance scale
    out = {"_class_name": "StableDiffusionInpaintPipeline" if inpaint else (
            "LatentConsistencyModelPipeline" if lcm else "StableDiffusionPipeline"),
            "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "_ldmkit": {"defaults": index.get("defaults") or {}, "latent_size": index.get("latent_size"),
                        "conditioner": {"max_length": text.config.max_length, "clip_skip": text.config.clip_skip}}}
    if index.get("concat") == "upscale":  # StableDiffusionUpscalePipeline: + low_res_scheduler/, max_noise_level
        del out["requires_safety_checker"]  # not one of its arguments
        out.update(write_low_res_scheduler(root, index, unet.config.num_class_embeds))
        extra = out["_ldmkit"]  # the folder's own entries say these; a stale copy must not override them
        extra["defaults"] = {k: v for k, v in extra["defaults"].items() if k not in FOLDER_SETTINGS}
    return out


def _write_sdxl(root: Path, index: dict, components: dict) -> dict:
    """SDXL: StableDiffusionXLPipeline (two text encoders) or, for a refiner (the second encoder alone,
    aesthetic-score ids), StableDiffusionXLImg2ImgPipeline."""
    unet, text = components["denoiser"], components["conditioner"]
    write_json(root / "unet" / "config.json", unet_config_to_diffusers(config_to_dict(unet.config)))
    _weights(root, unet.state_dict(), "unet", UNET_WEIGHTS)
    refiner = len(text.encoders) == 1
    subs = [("text_encoder_2", "tokenizer_2")] if refiner else [("text_encoder", "tokenizer"),
                                                                ("text_encoder_2", "tokenizer_2")]
    out = {}
    for (sub, tok_sub), enc in zip(subs, text.encoders):
        hf = dict(enc.config.hf_config)
        kind = type(enc.model).__name__
        hf.update(architectures=[kind], model_type="clip_text_model")
        write_json(root / sub / "config.json", hf)
        state = enc.model.state_dict()
        if kind == "CLIPTextModel":  # the classic `text_model.` layout every transformers version reads
            state = {"text_model." + k.removeprefix("text_model."): v for k, v in state.items()}
        _weights(root, state, sub, TEXT_WEIGHTS)
        if (root / tok_sub).exists():
            shutil.rmtree(root / tok_sub)
        enc.tokenizer.save_pretrained(str(root / tok_sub))
        out[sub], out[tok_sub] = ["transformers", kind], ["transformers", "CLIPTokenizer"]
    if refiner:
        out.update(text_encoder=[None, None], tokenizer=[None, None])
    options = {"force_zeros_for_empty_prompt": text.config.force_zeros_for_empty_prompt}
    if refiner:
        options["requires_aesthetics_score"] = text.config.requires_aesthetics_score
    return {"_class_name": "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "image_encoder": [None, None], "feature_extractor": [None, None], **out, **options,
            "_ldmkit": {"defaults": index.get("defaults") or {}, "latent_size": index.get("latent_size"),
                        "conditioner": {"max_length": text.max_length, "clip_skip": text.encoders[0].config.clip_skip}}}


def _write_ldm(root: Path, index: dict, components: dict) -> dict:
    """An unconditional UNet as diffusers' UNet2DModel. Our UNet (UNet2DConditionModel's layout) has one
    resnet in its attention-free middle block, UNet2DModel always two: the second is written as an exact
    identity (its last convolution zero, so it returns its input)."""
    unet = components["denoiser"]
    c = unet.config
    cfg = {"_class_name": "UNet2DModel", "sample_size": c.sample_size, "in_channels": c.in_channels,
           "out_channels": c.out_channels, "block_out_channels": list(c.block_out_channels),
           "down_block_types": list(c.down_block_types), "up_block_types": list(c.up_block_types),
           "mid_block_type": "UNetMidBlock2D" if c.mid_block_type else None, "add_attention": False,
           "layers_per_block": c.layers_per_block, "norm_num_groups": c.norm_num_groups, "norm_eps": c.norm_eps,
           "flip_sin_to_cos": c.flip_sin_to_cos, "freq_shift": c.freq_shift, "downsample_padding": c.downsample_padding,
           "resnet_time_scale_shift": c.resnet_time_scale_shift, "dropout": c.dropout, "act_fn": "silu",
           "center_input_sample": False, "time_embedding_type": "positional", "mid_block_scale_factor": 1}
    state = dict(unet.state_dict())
    if c.mid_block_type:
        for k, v in list(state.items()):
            if k.startswith("mid_block.resnets.0."):
                twin = k.replace("mid_block.resnets.0.", "mid_block.resnets.1.")
                state[twin] = torch.zeros_like(v) if ".conv2." in k or ".time_emb_proj." in k else v.clone()
    write_json(root / "unet" / "config.json", cfg)
    _weights(root, state, "unet", UNET_WEIGHTS)
    return {"_class_name": "LDMPipeline", "unet": ["diffusers", "UNet2DModel"], "vqvae": ["diffusers", "AutoencoderKL"]}


def _write_dit(root: Path, index: dict, components: dict) -> dict:
    """A class-conditional DiT as DiTTransformer2DModel. DiTPipeline's null label is 1000: the class table
    is written with 1001 rows, ours first and our null row at 1000 (the rows between repeat it)."""
    from ldmkit.denoisers.dit import state_dict_to_diffusers

    dit = components["denoiser"]
    c = dit.config
    state = dict(dit.state_dict())
    table = state["class_embedding.embedding_table.weight"]
    n = c.num_classes
    if n < 1000:
        state["class_embedding.embedding_table.weight"] = torch.cat([table[:n], table[n:n + 1].expand(1001 - n, -1)])
    cfg = {"_class_name": "DiTTransformer2DModel", "num_attention_heads": c.num_heads,
           "attention_head_dim": c.hidden_size // c.num_heads, "in_channels": c.in_channels,
           "out_channels": c.out_channels, "num_layers": c.depth, "dropout": 0.0, "norm_num_groups": 32,
           "attention_bias": True, "sample_size": c.sample_size, "patch_size": c.patch_size,
           "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000, "upcast_attention": False,
           "norm_type": "ada_norm_zero", "norm_elementwise_affine": False, "norm_eps": c.norm_eps}
    write_json(root / "transformer" / "config.json", cfg)
    _weights(root, state_dict_to_diffusers(state, c.depth), "transformer", UNET_WEIGHTS)
    names = (components.get("conditioner") and getattr(components["conditioner"].config, "class_names", None)) or ()
    return {"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "id2label": {str(i): str(name) for i, name in enumerate(names)} or None}
