"""Writing SD3 and FLUX.1 models as the diffusers folders that run them (`StableDiffusion3Pipeline`,
`FluxPipeline`): the transformer under its diffusers class (identical parameter names), the text encoders
and tokenizers in transformers' layout, and the flow-matching scheduler with its shift (static, or FLUX's
dynamic shift). `io.diffusers_export.save_diffusers` writes the VAE and calls these."""
from __future__ import annotations

import shutil
from pathlib import Path

from ldmkit.io.files import save_tensors, write_json

UNET_WEIGHTS, TEXT_WEIGHTS = "diffusion_pytorch_model", "model"


def flow_scheduler_config(schedule: dict) -> dict:
    """A FlowSchedule dict -> diffusers' FlowMatchEulerDiscreteScheduler config."""
    out = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": schedule["num_train_timesteps"],
           "shift": schedule.get("shift", 1.0), "use_dynamic_shifting": bool(schedule.get("use_dynamic_shifting"))}
    if out["use_dynamic_shifting"]:
        out.update({k: schedule[k] for k in ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")})
    return out


def _text(root: Path, sub: str, tok_sub: str, part) -> list:
    """One text encoder (a conditioning part holding `.model` and `.tokenizer`) -> sub/ and tok_sub/."""
    kind = type(part.model).__name__
    hf = dict(part.config.hf_config)
    hf["architectures"] = [kind]
    write_json(root / sub / "config.json", hf)
    state = {k: v.detach().to("cpu").contiguous() for k, v in part.model.state_dict().items()
             if not k.endswith("position_ids")}
    if kind == "CLIPTextModel":  # the classic `text_model.` layout every transformers version reads
        state = {"text_model." + k.removeprefix("text_model."): v for k, v in state.items()}
    save_tensors(root / sub / f"{TEXT_WEIGHTS}.safetensors", state, metadata={"format": "pt"})
    if (root / tok_sub).exists():
        shutil.rmtree(root / tok_sub)
    part.tokenizer.save_pretrained(str(root / tok_sub))
    return ["transformers", kind]


def _transformer(root: Path, net, cls: str) -> None:
    write_json(root / "transformer" / "config.json", {"_class_name": cls, **{
        k: list(v) if isinstance(v, tuple) else v for k, v in net.config.to_dict().items()}})
    state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    save_tensors(root / "transformer" / f"{UNET_WEIGHTS}.safetensors", state, metadata={"format": "pt"})


def write_sd3(root: Path, index: dict, components: dict) -> dict:
    net, text = components["denoiser"], components["conditioner"]
    _transformer(root, net, "SD3Transformer2DModel")
    out = {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
           "vae": ["diffusers", "AutoencoderKL"], "image_encoder": [None, None], "feature_extractor": [None, None]}
    for (sub, tok), part in zip((("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")), text.encoders):
        out[sub], out[tok] = _text(root, sub, tok, part), ["transformers", type(part.tokenizer).__name__]
    if text.t5 is not None:
        out["text_encoder_3"] = _text(root, "text_encoder_3", "tokenizer_3", text.t5)
        out["tokenizer_3"] = ["transformers", type(text.t5.tokenizer).__name__]
    else:
        out["text_encoder_3"], out["tokenizer_3"] = [None, None], [None, None]
    return out


def write_flux(root: Path, index: dict, components: dict) -> dict:
    net, text = components["denoiser"], components["conditioner"]
    _transformer(root, net, "FluxTransformer2DModel")
    return {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"], "image_encoder": [None, None], "feature_extractor": [None, None],
            "text_encoder": _text(root, "text_encoder", "tokenizer", text.clip),
            "tokenizer": ["transformers", type(text.clip.tokenizer).__name__],
            "text_encoder_2": _text(root, "text_encoder_2", "tokenizer_2", text.t5),
            "tokenizer_2": ["transformers", type(text.t5.tokenizer).__name__]}


__all__ = ["flow_scheduler_config", "write_flux", "write_sd3"]
