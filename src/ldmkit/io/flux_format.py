"""diffusers' FLUX.1 folders (`FluxPipeline`) -> an ldmkit model:

    transformer/     FluxTransformer2DModel -> denoiser (denoisers.flux.FluxModel: packs 2x2 latent patches itself)
    vae/             AutoencoderKL, 16 channels, no quant convs, scaling 0.3611 and shift 0.1159 -> autoencoder
    text_encoder/    CLIPTextModel + tokenizer/    (its pooled output)  \
    text_encoder_2/  T5EncoderModel + tokenizer_2/ (its states)          -> conditioner (conditioning.sd3.FluxTextEncoder)
    scheduler/       FlowMatchEulerDiscreteScheduler with use_dynamic_shifting -> a FlowSchedule whose grid
                     shifts with the image's token count, and flow_euler

FLUX.1-dev's transformer has a guidance embedding: the guidance scale is its input (distilled guidance,
no classifier-free guidance); FLUX.1-schnell has none and runs without guidance.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ldmkit.io.files import read_json

FLUX_PIPELINES = ("FluxPipeline", "FluxImg2ImgPipeline")


def is_flux(path: Path) -> bool:
    index = Path(path) / "model_index.json"
    return index.is_file() and read_json(index).get("_class_name") in FLUX_PIPELINES


def load_flux(path, device=None, dtype: torch.dtype | None = None, variant: str | None = None,
              max_sequence_length: int = 512, **unused):
    """(index, components) of a diffusers FLUX.1 folder (see the module docstring)."""
    from transformers import CLIPTextModel, T5EncoderModel

    from ldmkit.autoencoder.model import Autoencoder, AutoencoderConfig
    from ldmkit.conditioning.sd3 import FluxTextEncoder
    from ldmkit.denoisers.flux import FluxConfig, FluxModel
    from ldmkit.errors import UserError
    from ldmkit.io.diffusers_format import UNET_WEIGHTS, _build_on_meta, autoencoder_config_from_diffusers
    from ldmkit.io.files import config_from_dict
    from ldmkit.io.sd3_format import _text, _weights, flow_schedule_from_diffusers

    root = Path(path)
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2", "scheduler"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"{root} is not a complete diffusers FLUX folder: {sub}/ is missing")
    try:
        cfg = FluxConfig.from_dict(read_json(root / "transformer" / "config.json"))
        ae_cfg = config_from_dict(AutoencoderConfig, autoencoder_config_from_diffusers(read_json(root / "vae" /
                                                                                                 "config.json")))
    except (TypeError, ValueError) as exc:
        raise UserError(f"{root}: {exc}") from None
    schedule, sampler = flow_schedule_from_diffusers(read_json(root / "scheduler" / "scheduler_config.json"),
                                                     str(root / "scheduler" / "scheduler_config.json"))
    schedule["grid"] = "flux"  # FluxPipeline's sigmas, linspace(1, 1/n, n), shifted for the image's size
    dtype = dtype or torch.float32
    net = _build_on_meta(lambda: FluxModel(cfg), _weights(root / "transformer", UNET_WEIGHTS, variant), "transformer",
                         dtype)
    ae = _build_on_meta(lambda: Autoencoder(ae_cfg), _weights(root / "vae", UNET_WEIGHTS, variant), "VAE",
                        torch.float32 if dtype == torch.float16 else dtype)
    clip = _text(root, "text_encoder", "tokenizer", CLIPTextModel, variant, "text encoder 1 (CLIP)")
    t5 = _text(root, "text_encoder_2", "tokenizer_2", T5EncoderModel, variant, "text encoder 2 (T5)")
    text = FluxTextEncoder.build(*clip, *t5, max_sequence_length=max_sequence_length).to(dtype=dtype)
    if device is not None:
        for m in (net, ae, text):
            m.to(device=device)
    dev = cfg.guidance_embeds
    index = {"format": "ldmkit", "format_version": 1, "schedule": schedule, "objective": "flow",
             "conditioning": "text", "concat": None, "latent_size": [128, 128],
             "defaults": {"sampler": sampler, "steps": 28 if dev else 4, "guidance": 3.5 if dev else 1.0},
             "components": ["autoencoder", "conditioner", "denoiser"],
             "notes": [f"{root.name}: diffusers FluxPipeline folder ({'distilled guidance' if dev else 'no guidance'})"]}
    return index, {"autoencoder": ae, "denoiser": net, "conditioner": text}


__all__ = ["FLUX_PIPELINES", "is_flux", "load_flux"]
