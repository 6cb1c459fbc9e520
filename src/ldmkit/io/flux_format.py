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
    from ldmkit.denoisers.flux import FluxConfig
    from ldmkit.io.diffusers_format import UNET_WEIGHTS
    from ldmkit.io.sd3_format import _weights, transformer_config

    root = Path(path)
    cfg = transformer_config(root, "FLUX", FluxConfig)
    parts = flux_base_parts(root, variant, dtype)
    kind = "distilled guidance" if cfg.guidance_embeds else "no guidance"
    notes = [f"{root.name}: diffusers FluxPipeline folder ({kind})"]
    return flux_model(cfg, _weights(root / "transformer", UNET_WEIGHTS, variant), *parts, notes, device=device,
                      dtype=dtype, max_sequence_length=max_sequence_length)


def flux_base_parts(root: Path, variant: str | None, dtype: torch.dtype | None):
    """What a FLUX.1 model holds besides its transformer, from a diffusers FLUX folder: the built autoencoder,
    (CLIP-L, tokenizer), (T5, tokenizer) and (flow schedule, sampler)."""
    from transformers import CLIPTextModel, T5EncoderModel

    from ldmkit.io.sd3_format import _text, build_autoencoder, flow_schedule_from_diffusers, read_vae

    ae = build_autoencoder(*read_vae(root, variant), str(root / "vae"), dtype or torch.float32)
    clip = _text(root, "text_encoder", "tokenizer", CLIPTextModel, variant, "text encoder 1 (CLIP)")
    t5 = _text(root, "text_encoder_2", "tokenizer_2", T5EncoderModel, variant, "text encoder 2 (T5)")
    schedule, sampler = flow_schedule_from_diffusers(read_json(root / "scheduler" / "scheduler_config.json"),
                                                     str(root / "scheduler" / "scheduler_config.json"))
    schedule["grid"] = "flux"  # FluxPipeline's sigmas, linspace(1, 1/n, n), shifted for the image's size
    return ae, clip, t5, (schedule, sampler)


def flux_model(cfg, net_state: dict, ae, clip, t5, scheduling: tuple, notes: list, device=None,
               dtype: torch.dtype | None = None, max_sequence_length: int = 512):
    """(index, components) of a FLUX.1 model from its parts: the transformer config (`FluxConfig`) and tensors
    (diffusers' names), the built autoencoder, (CLIP-L, tokenizer), (T5, tokenizer), (schedule, sampler)."""
    from ldmkit.conditioning.sd3 import FluxTextEncoder
    from ldmkit.denoisers.flux import FluxModel
    from ldmkit.io.diffusers_format import _build_on_meta

    dtype = dtype or torch.float32
    schedule, sampler = scheduling
    net = _build_on_meta(lambda: FluxModel(cfg), net_state, "transformer", dtype)
    text = FluxTextEncoder.build(*clip, *t5, max_sequence_length=max_sequence_length).to(dtype=dtype)
    if device is not None:
        for m in (net, ae, text):
            m.to(device=device)
    dev = cfg.guidance_embeds
    index = {"format": "ldmkit", "format_version": 1, "schedule": schedule, "objective": "flow",
             "conditioning": "text", "concat": None, "latent_size": [128, 128],
             "defaults": {"sampler": sampler, "steps": 28 if dev else 4, "guidance": 3.5 if dev else 1.0},
             "components": ["autoencoder", "conditioner", "denoiser"], "notes": list(notes)}
    return index, {"autoencoder": ae, "denoiser": net, "conditioner": text}


__all__ = ["FLUX_PIPELINES", "flux_base_parts", "flux_model", "is_flux", "load_flux"]
