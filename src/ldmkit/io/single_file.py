"""Original single-file Stable Diffusion checkpoints (CompVis / LDM layout) -> ldmkit.

An original checkpoint is one `.safetensors` or `.ckpt` holding every network
under a prefix:

    model.diffusion_model.*   the UNet            (LDM names: input_blocks, middle_block, output_blocks)
    first_stage_model.*       the KL autoencoder  (LDM names: encoder.down.N.block.M, mid.attn_1 ...)
    cond_stage_model.transformer.*   SD 1.x text encoder: HF CLIPTextModel names already
    cond_stage_model.model.*         SD 2.x text encoder: OpenCLIP names (resblocks, in_proj ...)
    betas, alphas_cumprod, ...        the training schedule as buffers (optional)
    model_ema.*                      EMA copy of the UNet (optional, `ema=True` uses it)

SD3 / SD3.5 files (`model.diffusion_model.joint_blocks.*`) and Black Forest Labs' FLUX.1 files
(`double_blocks.*`) are recognised by their keys and read by `io.sd3_single_file` / `io.flux_single_file`.

This module renames those tensors to diffusers' names (which are ldmkit's
names: see docs/internals.md) and infers the architecture from the tensor
shapes, producing a `DiffusersParts` that `ldmkit.io.diffusers_format` turns
into ldmkit modules. What the weights cannot tell (the prediction type, the
attention head count) comes from the family rules below, an optional original
YAML config (`original_config=`), or explicit options.

Safety: `.safetensors` is read with safetensors; `.ckpt`/`.pt`/`.pth`/`.bin`
only with `torch.load(weights_only=True)`. Real SD `.ckpt` files also pickle a
PyTorch-Lightning `ModelCheckpoint` callback object; such training metadata is
replaced by an inert placeholder (a fixed allow-list of names, nothing is
imported or called), everything else that is not a tensor is refused.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ldmkit.io.diffusers_format import DiffusersParts
from ldmkit.io.ldm_layout import (_strip, clip_to_transformers, openclip_to_transformers, unet_to_diffusers,
                                vae_to_diffusers)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "model_ema.decay", "model_ema.num_updates",
)
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# SD's published training schedule (CompVis configs v1-inference.yaml / v2-inference*.yaml).
SD_SCHEDULER = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "timestep_spacing": "leading",
    "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False,
}


# --------------------------------------------------------------------------- reading safely
class _IgnoredTrainingMetadata:
    """Stands in for harmless training-time objects pickled into original .ckpt files."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _ignored(*args, **kwargs):
    return None


# Globals found in published SD .ckpt files outside the state dict. They are
# mapped to inert placeholders: nothing from these packages is imported or run.
_METADATA_GLOBALS = [
    (_IgnoredTrainingMetadata, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    (_IgnoredTrainingMetadata, "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint"),
    (_ignored, "numpy.core.multiarray.scalar"),
    (_ignored, "numpy._core.multiarray.scalar"),
    (_IgnoredTrainingMetadata, "numpy.dtype"),
    (_IgnoredTrainingMetadata, "numpy.dtypes.Float64DType"),
]


def read_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a single-file checkpoint safely -> (tensors by name, metadata such as global_step)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    suffix = path.suffix.lower()
    meta: dict = {}
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors import safe_open

        from ldmkit.errors import reading

        state = {}
        with reading(f"checkpoint {path}"), safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            for k in f.keys():
                state[k] = f.get_tensor(k)
        return state, meta
    if suffix not in PICKLE_SUFFIXES:
        raise ValueError(f"unsupported checkpoint file {path.name!r}: expected one of "
                         f"{SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES}")
    import pickle
    import struct

    from ldmkit.errors import UserError, one_line
    from ldmkit.io.files import pickle_refusal

    try:
        with torch.serialization.safe_globals(_METADATA_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about odd pickle protocols in damaged files
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise UserError(f"checkpoint {path}: not a readable PyTorch checkpoint ({one_line(str(exc), 200)})") \
                from None
        raise UserError(
            f"checkpoint {path} cannot be read safely: it pickles Python objects other than tensors "
            f"({one_line(pickle_refusal(exc), 200)}); nothing in it was run. ldmkit only loads .ckpt files through "
            "torch.load(weights_only=True); convert the file to .safetensors with a tool you trust, or use the "
            ".safetensors release of the weights") from None
    except (EOFError, RuntimeError, KeyError, ValueError, IndexError, UnicodeDecodeError, struct.error) as exc:
        # how torch.load reports a damaged or foreign file
        raise UserError(f"checkpoint {path}: not a readable PyTorch checkpoint ({type(exc).__name__}: "
                        f"{one_line(str(exc), 200)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        meta = {k: v for k, v in obj.items() if k in ("global_step", "epoch") and isinstance(v, (int, float))}
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path.name} holds a {type(obj).__name__}, not a state dict of tensors")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return state, meta


def _use_ema(state: dict) -> dict:
    """Replace UNet weights by their EMA copy (`model_ema.diffusion_modelinput_blocks00weight`)."""
    ema = {k[len("model_ema."):]: v for k, v in state.items()
           if k.startswith("model_ema.") and k not in ("model_ema.decay", "model_ema.num_updates")}
    if not ema:
        raise ValueError("ema=True but the checkpoint holds no model_ema.* weights")
    out = dict(state)
    for k in list(state):
        if k.startswith(UNET_PREFIX):
            flat = "diffusion_model" + k[len(UNET_PREFIX):].replace(".", "")
            if flat not in ema:
                raise ValueError(f"ema=True but the EMA copy lacks {k} (looked for model_ema.{flat})")
            out[k] = ema[flat]
    return out


def detect_family(state: dict) -> str:
    """'sd1' (CLIP ViT text encoder, HF layout), 'sd2' (OpenCLIP layout) or 'sdxl' (conditioner.embedders.*)
    from the key names."""
    if not any(k.startswith(UNET_PREFIX) for k in state):
        raise ValueError("not an original Stable Diffusion checkpoint: no 'model.diffusion_model.*' keys "
                         f"(first keys: {sorted(state)[:5]})")
    if any(k.startswith("conditioner.embedders.") for k in state):
        return "sdxl"
    if any(k.startswith(OPENCLIP_PREFIX) for k in state):
        return "sd2"
    if any(k.startswith(CLIP_PREFIX) for k in state):
        return "sd1"
    raise ValueError("the checkpoint has no text encoder (neither cond_stage_model.transformer.* (SD 1.x) "
                     "nor cond_stage_model.model.* (SD 2.x) keys)")


# --------------------------------------------------------------------------- schedule and options
def _read_original_config(path) -> dict:
    """The few facts we need from a CompVis YAML (v1-inference.yaml, v2-inference-v.yaml ...)."""
    import yaml

    from ldmkit.errors import UserError, check_int, check_number, reading

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"original config {path} " + ("is not a file" if path.exists() else "does not exist"))
    with reading(f"original config {path}"), open(path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f) or {}

    def table(node, where: str) -> dict:
        if node is None:
            return {}
        if not isinstance(node, dict):
            raise UserError(f"original config {path}: {where} must be a mapping, got {type(node).__name__}")
        return node

    cfg = table(cfg, "the file")
    params = table(table(cfg.get("model"), "model").get("params"), "model.params")
    unet = table(table(params.get("unet_config"), "model.params.unet_config").get("params"),
                 "model.params.unet_config.params")
    out = {k: params[k] for k in ("parameterization", "linear_start", "linear_end", "timesteps", "scale_factor")
           if k in params}
    try:
        for k in ("linear_start", "linear_end", "scale_factor"):
            check_number(k, out.get(k), optional=True)
        check_int("timesteps", out.get("timesteps"), 2, 1_000_000, optional=True)
    except UserError as exc:
        raise UserError(f"original config {path}: {exc}") from None
    for k in ("num_heads", "num_head_channels", "image_size"):
        if isinstance(unet.get(k), int) and unet[k] > 0:
            out[k] = unet[k]
    return out


def _schedule_from(state: dict, yaml_facts: dict, prediction_type: str) -> dict:
    sched = dict(SD_SCHEDULER)
    sched["prediction_type"] = prediction_type
    if "linear_start" in yaml_facts:
        sched["beta_start"] = float(yaml_facts["linear_start"])
        sched["beta_end"] = float(yaml_facts["linear_end"])
        sched["num_train_timesteps"] = int(yaml_facts.get("timesteps", 1000))
    elif "betas" in state:  # the training schedule, stored as a buffer in most original checkpoints
        betas = state["betas"].double()
        n = betas.numel()
        start, end = float(betas[0]), float(betas[-1])
        scaled = torch.linspace(start ** 0.5, end ** 0.5, n, dtype=torch.float64) ** 2
        linear = torch.linspace(start, end, n, dtype=torch.float64)
        if torch.allclose(betas, scaled, rtol=1e-4, atol=1e-7):
            sched["beta_schedule"] = "scaled_linear"
        elif torch.allclose(betas, linear, rtol=1e-4, atol=1e-7):
            sched["beta_schedule"] = "linear"
        else:
            raise ValueError("the checkpoint's betas buffer is neither a linear nor a scaled-linear schedule")
        sched.update(num_train_timesteps=n, beta_start=round(start, 8), beta_end=round(end, 8))
    return sched


PREDICTION_TYPES = {"eps": "epsilon", "epsilon": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}


def single_file_to_parts(path, prediction_type: str | None = None, original_config=None, tokenizer=None,
                         ema: bool = False, num_heads: int | None = None, num_head_channels: int | None = None,
                         scaling_factor: float | None = None, checkpoint: tuple | None = None) -> DiffusersParts:
    """Read an original SD checkpoint (or take `checkpoint`, what `read_checkpoint(path)` returned) and
    rename/infer everything into diffusers' terms."""
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r}: expected one of {sorted(PREDICTION_TYPES)}")
    state, meta = checkpoint if checkpoint is not None else read_checkpoint(path)
    family = detect_family(state)
    if family == "sdxl":
        from ldmkit.io.sdxl_single_file import sdxl_to_parts

        return sdxl_to_parts(path, _use_ema(state) if ema else state, tokenizer, scaling_factor,
                             PREDICTION_TYPES[prediction_type or "eps"])
    sidecar = Path(path).with_suffix(".yaml")
    if original_config is None and sidecar.is_file():  # the usual convention: model.ckpt + model.yaml
        original_config = sidecar
    facts = _read_original_config(original_config) if original_config else {}
    if ema:
        state = _use_ema(state)
    notes = [f"{Path(path).name}: original Stable Diffusion checkpoint, {'SD 1.x' if family == 'sd1' else 'SD 2.x'} layout"]
    if original_config:
        notes.append(f"settings from {original_config}: {facts}")

    if prediction_type is None and facts.get("parameterization") in ("v", "eps"):
        prediction_type = facts["parameterization"]
    if prediction_type is None:
        step = meta.get("global_step")
        if family == "sd2" and step in (110000, 875000):  # the SD 2.0-v and 2.1-v releases
            prediction_type = "v"
            notes.append(f"prediction type v inferred from global_step={step} (SD 2.x 768-v release)")
        else:
            prediction_type = "eps"
            if family == "sd2":
                warnings.warn("SD 2.x checkpoint without a stored prediction type: assuming eps; pass "
                              "prediction_type='v' (CLI: --prediction-type v) for 768-v models", stacklevel=2)
    prediction = PREDICTION_TYPES[prediction_type]

    heads = num_heads if num_heads is not None else facts.get("num_heads")
    head_ch = num_head_channels if num_head_channels is not None else facts.get("num_head_channels")
    unet_cfg, unet_sd = unet_to_diffusers(_strip(state, UNET_PREFIX), family, heads, head_ch)
    # latent training size (not in the weights): 64 (512 px) for SD 1.x and 2.x-base, 96 (768 px) for 768-v
    unet_cfg["sample_size"] = int(facts.get("image_size", 96 if prediction == "v_prediction" else 64))
    if not any(k.startswith(VAE_PREFIX) for k in state):
        raise ValueError("the checkpoint has no autoencoder (first_stage_model.*) weights")
    scale = scaling_factor if scaling_factor is not None else float(facts.get("scale_factor", 0.18215))
    vae_cfg, vae_sd = vae_to_diffusers(_strip(state, VAE_PREFIX), scale)
    if family == "sd1":
        text_cfg, text_sd, text_notes = clip_to_transformers(_strip(state, CLIP_PREFIX))
    else:
        text_cfg, text_sd, text_notes = openclip_to_transformers(_strip(state, OPENCLIP_PREFIX))
    notes += text_notes
    if unet_cfg["cross_attention_dim"] != text_cfg["hidden_size"]:
        raise ValueError(f"UNet cross-attention width {unet_cfg['cross_attention_dim']} does not match the text "
                         f"encoder width {text_cfg['hidden_size']}")

    known = (UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX, OPENCLIP_PREFIX, "model_ema.")
    ignored = sorted(k for k in state if not k.startswith(known) and k not in SCHEDULE_BUFFERS)
    if ignored:
        notes.append(f"ignored {len(ignored)} tensors outside the model: {ignored[:6]}")
    return DiffusersParts(
        unet_config=unet_cfg, unet_state=unet_sd, vae_config=vae_cfg, vae_state=vae_sd,
        text_config=text_cfg, text_state=text_sd, tokenizer=tokenizer,
        scheduler_config=_schedule_from(state, facts, prediction),
        pad_with_eos=family == "sd1", notes=notes)


# the options of SD3 / FLUX.1 single files (io.sd3_single_file, io.flux_single_file); the others are SD's
TRANSFORMER_OPTIONS = {"sd3": ("base", "without_t5", "max_sequence_length", "clip_skip", "num_heads", "variant"),
                       "flux": ("base", "max_sequence_length", "variant")}


def load_single_file(path, device="cpu", dtype=None, **opts):
    """Load an original single-file checkpoint as an ldmkit model (see `ldmkit.io.load_model`).

    SD 1.x / 2.x / SDXL options: prediction_type ('eps' | 'v'), original_config (CompVis YAML path; default:
    a .yaml file with the checkpoint's name next to it, if any),
    tokenizer (folder with vocab.json + merges.txt, or a diffusers model folder; default: CLIP's BPE
    vocabulary from the clip-anytorch package),
    ema (use the EMA UNet weights), num_heads / num_head_channels, scaling_factor; and those of
    `parts_to_model`: upcast_vae, max_length, clip_skip.
    SD3 / SD3.5 files (`model.diffusion_model.joint_blocks.*`, io.sd3_single_file) and Black Forest Labs'
    FLUX.1 files (`double_blocks.*`, io.flux_single_file): `TRANSFORMER_OPTIONS`, `base` a diffusers folder of
    the same family that gives what the file lacks.
    """
    from ldmkit.errors import UserError
    from ldmkit.io.diffusers_format import parts_to_model
    from ldmkit.io.flux_single_file import is_flux_file
    from ldmkit.io.sd3_single_file import is_sd3_file

    checkpoint = read_checkpoint(path)
    family = "sd3" if is_sd3_file(checkpoint[0]) else "flux" if is_flux_file(checkpoint[0]) else None
    if family is None:
        if opts.get("base") is not None:
            raise UserError(f"base={opts['base']} only applies to SD3 and FLUX.1 single files; {Path(path).name} is "
                            "neither (pass tokenizer=FOLDER for its tokenizer)")
        opts.pop("base", None)
        build = {k: opts.pop(k) for k in ("upcast_vae", "max_length", "clip_skip") if k in opts}
        return parts_to_model(single_file_to_parts(path, checkpoint=checkpoint, **opts), device=device, dtype=dtype,
                              **build)
    given = {k: v for k, v in opts.items() if v is not None and v is not False}
    wrong = sorted(set(given) - set(TRANSFORMER_OPTIONS[family]))
    if wrong:
        raise UserError(f"{', '.join(wrong)}: not {'an option' if len(wrong) == 1 else 'options'} of "
                        f"{'SD3' if family == 'sd3' else 'FLUX.1'} single files ({Path(path).name}), which take "
                        f"{', '.join(TRANSFORMER_OPTIONS[family])}")
    if family == "sd3":
        from ldmkit.io.sd3_single_file import load_sd3_single_file

        return load_sd3_single_file(path, checkpoint[0], device=device, dtype=dtype, **given)
    from ldmkit.io.flux_single_file import load_flux_single_file

    return load_flux_single_file(path, checkpoint[0], device=device, dtype=dtype, **given)
