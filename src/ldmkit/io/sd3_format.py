"""diffusers' Stable Diffusion 3 / 3.5 folders (`StableDiffusion3Pipeline`) -> an ldmkit model:

    transformer/   SD3Transformer2DModel          -> denoiser  (denoisers.mmdit.MMDiT, identity key map)
    vae/           AutoencoderKL, 16 channels, no quant convs, scaling and shift factors -> autoencoder
    text_encoder/, text_encoder_2/  CLIPTextModelWithProjection (L, G) + tokenizer/, tokenizer_2/
    text_encoder_3/ T5EncoderModel + tokenizer_3/ (optional: `without_t5=True` or an absent folder)
                                                   -> conditioner (conditioning.sd3.SD3TextEncoder)
    scheduler/     FlowMatchEulerDiscreteScheduler (static `shift`) -> a FlowSchedule and flow_euler
"""
from __future__ import annotations

from pathlib import Path

import torch

from ldmkit.io.files import read_json

SD3_PIPELINES = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline")
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")


def is_sd3(path: Path) -> bool:
    index = Path(path) / "model_index.json"
    return index.is_file() and read_json(index).get("_class_name") in SD3_PIPELINES


def flow_schedule_from_diffusers(cfg: dict, where: str) -> tuple[dict, str]:
    """A FlowMatch scheduler config -> (FlowSchedule dict, default sampler), static or dynamic shift (FLUX)."""
    from ldmkit.errors import UserError, check_int, check_number

    kind = cfg.get("_class_name")
    if kind not in FLOW_SCHEDULERS:
        raise UserError(f"{where}: scheduler {kind!r} is not a flow-matching scheduler ({', '.join(FLOW_SCHEDULERS)})")
    try:
        check_int("num_train_timesteps", cfg.get("num_train_timesteps", 1000), 2, 1_000_000)
        check_number("shift", cfg.get("shift", 1.0), 0.0, 1000.0, lo_open=True)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    for key, ok in (("invert_sigmas", False), ("shift_terminal", None),
                    ("use_karras_sigmas", False), ("use_exponential_sigmas", False), ("use_beta_sigmas", False),
                    ("stochastic_sampling", False)):
        if cfg.get(key, ok) != ok:
            raise UserError(f"{where}: {key}={cfg[key]!r} is not supported (ldmkit runs {ok!r})")
    sched = {"kind": "flow", "num_train_timesteps": int(cfg.get("num_train_timesteps", 1000)),
             "shift": float(cfg.get("shift", 1.0))}
    if cfg.get("use_dynamic_shifting"):
        sched.update(use_dynamic_shifting=True, **{k: cfg[k] for k in ("base_shift", "max_shift", "base_image_seq_len",
                                                                       "max_image_seq_len") if cfg.get(k) is not None})
    return sched, "flow_heun" if kind == "FlowMatchHeunDiscreteScheduler" else "flow_euler"


def _weights(folder: Path, stem: str, variant: str | None) -> dict:
    from ldmkit.io.diffusers_format import _read_weights

    return _read_weights(folder, stem, variant)


def hf_text_model(cls, cfg: dict, state: dict, what: str):
    """A transformers text model (`cls`: CLIPTextModel[WithProjection], T5EncoderModel) from its config dict and
    tensors, checked: CLIP names with or without `text_model.`, buffers and T5's tied embedding filled in."""
    from ldmkit.conditioning.text import hf_config_fields
    from ldmkit.io.files import check_state_dict

    hf = hf_config_fields(cfg)
    model = cls(cls.config_class.from_dict(hf))
    own = model.state_dict()
    inner = any(k.startswith("text_model.") for k in own)
    if cls.__name__.startswith("CLIP"):
        state = {k if k.startswith("text_projection") else (f"text_model.{k.removeprefix('text_model.')}" if inner
                 else k.removeprefix("text_model.")): v for k, v in state.items() if not k.endswith("position_ids")}
    else:
        state = dict(state)
    for k in own:  # buffers and tied weights the file may omit
        if k not in state and (k.endswith("position_ids") or k == "encoder.embed_tokens.weight"):
            state[k] = state.get("shared.weight", own[k]) if k == "encoder.embed_tokens.weight" else own[k]
    check_state_dict(model, state, what)
    model.load_state_dict(state, strict=True)
    return model.eval()


def folder_tokenizer(root: Path, tok: str):
    from transformers import AutoTokenizer

    from ldmkit.conditioning.text import load_hf_tokenizer

    tok_dir = Path(root) / tok
    if not tok_dir.is_dir():
        raise FileNotFoundError(f"{root} has no {tok}/ folder (the tokenizer)")
    return load_hf_tokenizer(lambda: AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True), tok_dir)


def _text(root: Path, sub: str, tok: str, cls, variant: str | None, what: str):
    """(model, tokenizer) of a diffusers folder's text encoder `sub` and tokenizer `tok`."""
    from ldmkit.conditioning.text import check_hf_text_config

    cfg = read_json(root / sub / "config.json")
    check_hf_text_config(cfg, f"{root / sub / 'config.json'}")
    model = hf_text_model(cls, cfg, _weights(root / sub, "model", variant), what)
    return model, folder_tokenizer(root, tok)


def read_vae(root: Path, variant: str | None) -> tuple[dict, dict]:
    """(diffusers AutoencoderKL config, tensors) of a diffusers folder's vae/."""
    from ldmkit.io.diffusers_format import UNET_WEIGHTS

    return read_json(root / "vae" / "config.json"), _weights(root / "vae", UNET_WEIGHTS, variant)


def build_autoencoder(vae_config: dict, state: dict, where: str, dtype: torch.dtype):
    """The ldmkit autoencoder of a diffusers AutoencoderKL config and its tensors (float32 when `dtype` is float16)."""
    from ldmkit.autoencoder.model import Autoencoder, AutoencoderConfig
    from ldmkit.errors import UserError
    from ldmkit.io.diffusers_format import _build_on_meta, autoencoder_config_from_diffusers
    from ldmkit.io.files import config_from_dict

    try:
        ae_cfg = config_from_dict(AutoencoderConfig, autoencoder_config_from_diffusers(vae_config))
    except (TypeError, ValueError) as exc:
        raise UserError(f"{where}: {exc}") from None
    return _build_on_meta(lambda: Autoencoder(ae_cfg), state, "VAE", torch.float32 if dtype == torch.float16 else dtype)


def sd3_model(cfg, net_state: dict, ae, clips: list, t5, schedule: dict, sampler: str, notes: list, device=None,
              dtype: torch.dtype | None = None, max_sequence_length: int = 256, clip_skip: int = 0):
    """(index, components) of an SD3 model from its parts, wherever they were read: the MM-DiT config
    (`MMDiTConfig`) and tensors (diffusers' names), the built autoencoder, [(CLIP-L, tokenizer),
    (CLIP-G, tokenizer)], (T5, tokenizer) or None, and the flow schedule and sampler."""
    from ldmkit.conditioning.sd3 import SD3TextEncoder
    from ldmkit.denoisers.mmdit import MMDiT
    from ldmkit.io.diffusers_format import _build_on_meta

    dtype = dtype or torch.float32
    net = _build_on_meta(lambda: MMDiT(cfg), net_state, "transformer", dtype)
    text = SD3TextEncoder.build([m for m, _ in clips], [t for _, t in clips], *(t5 or (None, None)),
                                clip_skip=clip_skip, max_sequence_length=max_sequence_length,
                                joint_attention_dim=cfg.joint_attention_dim).to(dtype=dtype)
    if device is not None:
        for m in (net, ae, text):
            m.to(device=device)
    size = cfg.sample_size
    index = {"format": "ldmkit", "format_version": 1, "schedule": schedule, "objective": "flow",
             "conditioning": "text", "concat": None, "latent_size": [size, size],
             "defaults": {"sampler": sampler, "steps": 28, "guidance": 7.0},
             "components": ["autoencoder", "conditioner", "denoiser"], "notes": list(notes)}
    return index, {"autoencoder": ae, "denoiser": net, "conditioner": text}


def load_sd3(path, device=None, dtype: torch.dtype | None = None, variant: str | None = None, without_t5: bool = False,
             max_sequence_length: int = 256, clip_skip: int = 0, **unused):
    """(index, components) of a diffusers SD3 folder (see the module docstring)."""
    from ldmkit.denoisers.mmdit import MMDiTConfig
    from ldmkit.io.diffusers_format import UNET_WEIGHTS

    root = Path(path)
    cfg = transformer_config(root, "SD3", MMDiTConfig)
    ae = build_autoencoder(*read_vae(root, variant), str(root / "vae"), dtype or torch.float32)
    clips, t5 = sd3_text_encoders(root, variant, without_t5)
    schedule, sampler = flow_schedule_from_diffusers(read_json(root / "scheduler" / "scheduler_config.json"),
                                                     str(root / "scheduler" / "scheduler_config.json"))
    notes = [f"{root.name}: diffusers StableDiffusion3Pipeline folder" + ("" if t5 else ", without T5")]
    return sd3_model(cfg, _weights(root / "transformer", UNET_WEIGHTS, variant), ae, clips, t5, schedule, sampler,
                     notes, device=device, dtype=dtype, max_sequence_length=max_sequence_length, clip_skip=clip_skip)


def check_folder(root: Path, family: str, subs=("transformer", "vae", "text_encoder", "text_encoder_2", "scheduler")):
    for sub in subs:
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"{root} is not a complete diffusers {family} folder: {sub}/ is missing")


def transformer_config(root: Path, family: str, config_cls):
    """The transformer's config of a complete diffusers SD3 / FLUX folder; a bad config is a one-line error."""
    from ldmkit.errors import UserError

    check_folder(root, family)
    try:
        return config_cls.from_dict(read_json(root / "transformer" / "config.json"))
    except (TypeError, ValueError) as exc:
        raise UserError(f"{root}: {exc}") from None


def sd3_text_encoders(root: Path, variant: str | None, without_t5: bool = False):
    """[(CLIP-L, tokenizer), (CLIP-G, tokenizer)] and (T5, tokenizer) or None of a diffusers SD3 folder."""
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    clips = [_text(root, s, t, CLIPTextModelWithProjection, variant, f"text encoder {k + 1}")
             for k, (s, t) in enumerate((("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")))]
    t5 = None
    if not without_t5 and (root / "text_encoder_3").is_dir():
        t5 = _text(root, "text_encoder_3", "tokenizer_3", T5EncoderModel, variant, "text encoder 3 (T5)")
    return clips, t5


__all__ = ["SD3_PIPELINES", "build_autoencoder", "flow_schedule_from_diffusers", "hf_text_model", "is_sd3", "load_sd3",
           "sd3_model"]
