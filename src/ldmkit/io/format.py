"""ldmkit's own checkpoint format (file-level helpers: `ldmkit.io.files`).

A *component* folder holds one network: `config.json` ({"type", "config"}) and
`model.safetensors`, plus whatever extra files the component writes itself
(a tokenizer, say). A *model* folder wires components together:
`model_index.json` and one sub-folder per component (see docs/internals.md).

The set of component types is the explicit dict `COMPONENT_TYPES` below: a
type name maps to a builder `(config_dict, folder) -> nn.Module` that makes the
network with fresh weights; `load_component` then fills the weights in.
Nothing here imports arbitrary paths named in a file.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file

from ldmkit.io.files import (check_state_dict, config_from_dict, config_to_dict, json_kind, read_json, save_tensors,
                             write_json)

FORMAT_NAME = "ldmkit"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model_index.json"


# ----------------------------------------------------------------------------- component registry
def _autoencoder(cfg: dict, folder: Path):
    from ldmkit.autoencoder.model import Autoencoder, AutoencoderConfig

    return Autoencoder(config_from_dict(AutoencoderConfig, cfg))


def _unet(cfg: dict, folder: Path):
    from ldmkit.denoisers.extensions import LEGACY_FIELDS, ExtendedUNet, legacy_config
    from ldmkit.denoisers.unet import UNet, UNetConfig

    if cfg.get("position_features") or cfg.get("context_adapter_layers"):  # extensions inside an older UNet
        module = ExtendedUNet(legacy_config(cfg))
        module.upgrade_state = module.legacy_state  # this folder's weights use the old key names
        return module
    return UNet(config_from_dict(UNetConfig, {k: v for k, v in cfg.items() if k not in LEGACY_FIELDS}))


def _extended_unet(cfg: dict, folder: Path):
    from ldmkit.denoisers.extensions import ExtendedUNet, ExtendedUNetConfig

    return ExtendedUNet(ExtendedUNetConfig.from_dict(cfg))


def _dit(cfg: dict, folder: Path):
    from ldmkit.denoisers.dit import DiT, DiTConfig

    return DiT(config_from_dict(DiTConfig, cfg))


def _mmdit(cfg: dict, folder: Path):
    from ldmkit.denoisers.mmdit import MMDiT, MMDiTConfig

    return MMDiT(MMDiTConfig.from_dict(cfg))


def _flux(cfg: dict, folder: Path):
    from ldmkit.denoisers.flux import FluxConfig, FluxModel

    return FluxModel(FluxConfig.from_dict(cfg))


def _tiny_decoder(cfg: dict, folder: Path):
    from ldmkit.autoencoder.tiny import TinyDecoder, TinyDecoderConfig

    return TinyDecoder(config_from_dict(TinyDecoderConfig, cfg))


def _conditioner(kind: str) -> Callable[[dict, Path], torch.nn.Module]:
    def build(cfg: dict, folder: Path):
        from ldmkit import conditioning as c

        from ldmkit.conditioning.sd3 import FluxTextEncoder, SD3TextEncoder
        from ldmkit.conditioning.sdxl import SDXLTextEncoder

        classes = {"text-transformer": c.TransformerTextEncoder, "text-bert": c.BertTextEncoder,
                   "text-clip": c.CLIPTextEncoder, "text-sdxl": SDXLTextEncoder, "text-sd3": SD3TextEncoder,
                   "text-flux": FluxTextEncoder,
                   "class": c.ClassConditioner, "spatial": c.SpatialConditioner}
        return classes[kind].from_component(cfg, folder)

    return build


COMPONENT_TYPES: dict[str, Callable[[dict, Path], torch.nn.Module]] = {
    "autoencoder": _autoencoder,
    "unet": _unet,
    "unet-extended": _extended_unet,
    "dit": _dit,
    "mmdit": _mmdit,
    "flux": _flux,
    "tiny-decoder": _tiny_decoder,
    **{k: _conditioner(k) for k in ("text-transformer", "text-bert", "text-clip", "text-sdxl", "text-sd3",
                                    "text-flux", "class", "spatial")},
}


def component_type_of(module: torch.nn.Module) -> str:
    kind = getattr(module, "component_type", None)
    if kind is None:
        kind = {"Autoencoder": "autoencoder", "UNet": "unet", "DiT": "dit"}.get(type(module).__name__)
    if kind not in COMPONENT_TYPES:
        raise ValueError(f"cannot save {type(module).__name__}: component type {kind!r} is not one of {sorted(COMPONENT_TYPES)}")
    return kind


# ----------------------------------------------------------------------------- save / load
def save_component(module: torch.nn.Module, folder: str | os.PathLike, extra_config: dict | None = None) -> Path:
    """Write `module` as a component folder (weights, config, and the module's own extra files)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kind = component_type_of(module)
    config = config_to_dict(module.config)
    if getattr(module, "weights_external", False):  # frozen weights from an installed package: config names them
        (folder / WEIGHTS_FILE).unlink(missing_ok=True)
    else:
        save_tensors(folder / WEIGHTS_FILE, module.state_dict(), metadata={"format": FORMAT_NAME, "type": kind})
    save_extra = getattr(module, "save_extra_files", None)
    if callable(save_extra):
        save_extra(folder)
    write_json(folder / CONFIG_FILE, {"type": kind, "config": config, **(extra_config or {})})
    return folder


def load_component(folder: str | os.PathLike, device: str | torch.device | None = None,
                   dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Rebuild the network in a component folder and load its weights (safetensors only)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"component folder {folder} "
                                + ("is not a folder" if folder.exists() else "does not exist"))
    from ldmkit.errors import UserError, known_bad_input, one_line, reading

    meta = read_json(folder / CONFIG_FILE)
    kind = meta.get("type")
    if not isinstance(kind, str) or kind not in COMPONENT_TYPES:
        raise UserError(f"{folder / CONFIG_FILE}: unknown component type {kind!r}; known: {sorted(COMPONENT_TYPES)}")
    config = meta.get("config")
    if not isinstance(config, dict):
        raise UserError(f"{folder / CONFIG_FILE}: \"config\" must be a JSON object with the {kind} settings, "
                        f"got {json_kind(config) if 'config' in meta else 'nothing'}")
    weights = folder / WEIGHTS_FILE
    try:
        module = COMPONENT_TYPES[kind](config, folder)
    except ValueError as exc:  # a config value out of its range: name the file it came from
        if str(folder) in str(exc):
            raise
        raise UserError(f"{folder / CONFIG_FILE}: {exc}") from None
    except (MemoryError, RuntimeError) as exc:  # sizes within the checked ranges can still add up
        if known_bad_input(exc) != "not enough memory":
            raise
        raise UserError(f"{folder / CONFIG_FILE}: the {kind} it describes does not fit in memory "
                        f"({one_line(str(exc), 200)})") from None
    if not getattr(module, "weights_external", False):  # else from_component loaded and checked them
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} is missing")
        with reading(f"weights file {weights}"):
            state = load_file(str(weights))
        if hasattr(module, "upgrade_state"):  # an older layout of the same weights
            state = module.upgrade_state(state)
        check_state_dict(module, state, str(weights))
        module.load_state_dict(state, strict=True)
    module.eval()
    if device is not None or dtype is not None:
        module.to(device=device, dtype=dtype)
    return module


def save_model(folder: str | os.PathLike, components: dict[str, torch.nn.Module], index: dict) -> Path:
    """Write a model folder: each component in its sub-folder, then model_index.json last
    (so a folder with an index is always complete)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, module in components.items():
        if module is not None:
            save_component(module, folder / name)
    full = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **index,
            "components": sorted(k for k, v in components.items() if v is not None)}
    write_json(folder / INDEX_FILE, full)
    return folder


def is_ldmkit_model(path: str | os.PathLike) -> bool:
    index = Path(path) / INDEX_FILE
    if not index.is_file():
        return False
    try:
        return read_json(index).get("format") == FORMAT_NAME
    except ValueError:
        return False


_COMPONENT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
MAX_TIMESTEPS = 1_000_000  # the longest training schedule a model file may ask for


def check_schedule_dict(schedule: Any, where: str) -> None:
    """Types and ranges of a schedule's fields as a file holds them (before a schedule is built)."""
    from ldmkit.errors import UserError, check_int, check_number, check_str

    if not isinstance(schedule, dict):
        raise UserError(f"{where}: the schedule must be a JSON object, got {json_kind(schedule)}")
    try:
        for name, value in schedule.items():
            if name == "num_train_timesteps":
                check_int(f"schedule {name}", value, 2, MAX_TIMESTEPS)
            elif name == "steps_offset":
                check_int(f"schedule {name}", value, 0, MAX_TIMESTEPS)
            elif name in ("beta_start", "beta_end", "shift"):
                check_number(f"schedule {name}", value)
            elif name in ("beta_schedule", "timestep_spacing", "kind", "prediction_type"):
                check_str(f"schedule {name}", value, optional=name == "prediction_type")
            elif name == "rescale_zero_terminal_snr" and not isinstance(value, bool):
                raise UserError(f"schedule {name}={value!r} must be true or false")
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None


def check_model_index(index: dict, where: str) -> None:
    """The shape of an ldmkit model_index.json: component names, schedule, latent size, defaults."""
    from ldmkit.errors import UserError, check_ints, check_number, check_str

    try:
        names = index.get("components")
        if names is not None and (not isinstance(names, list) or not all(
                isinstance(n, str) and _COMPONENT_NAME.match(n) and n not in (".", "..") for n in names)):
            raise UserError(f"components={names!r} must be a list of component folder names")
        for key in ("defaults", "schedule"):
            if index.get(key) is not None and not isinstance(index[key], dict):
                raise UserError(f"{key} must be a JSON object, got {json_kind(index[key])}")
        defaults = index.get("defaults") or {}
        options = defaults.get("sampler_options")
        if options is not None and not isinstance(options, dict):
            raise UserError(f"defaults.sampler_options must be a JSON object, got {json_kind(options)}")
        for key in ("steps", "height", "width", "batch_size", "noise_level", "max_noise_level"):
            value = defaults.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise UserError(f"defaults.{key}={defaults[key]!r} must be an integer")
        for key in ("guidance", "guidance_rescale"):
            if defaults.get(key) is not None:
                check_number(f"defaults.{key}", defaults[key])
        check_str("defaults.sampler", defaults.get("sampler"), optional=True)
        if index.get("latent_size") is not None:
            check_ints("latent_size", index["latent_size"], 1, 65536, max_len=2)
        for key in ("conditioning", "concat", "objective"):
            check_str(key, index.get(key), optional=True)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    if index.get("schedule") is not None:
        check_schedule_dict(index["schedule"], where)
    low_res = (index.get("defaults") or {}).get("low_res_schedule")  # an x4 upscaler's noise augmentation
    if low_res is not None:
        check_schedule_dict(low_res, f"{where} (defaults.low_res_schedule)")


def load_model(folder: str | os.PathLike, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None) -> tuple[dict, dict[str, torch.nn.Module]]:
    """Read a model folder in our format: returns (index, {component name: module})."""
    folder = Path(folder)
    index = read_json(folder / INDEX_FILE)
    if index.get("format") != FORMAT_NAME:
        raise ValueError(f"{folder / INDEX_FILE} is not an ldmkit model index (format={index.get('format')!r})")
    check_model_index(index, str(folder / INDEX_FILE))
    names = index.get("components") or [p.name for p in sorted(folder.iterdir()) if (p / CONFIG_FILE).is_file()]
    components = {}
    for name in names:
        component_dtype = dtype
        # SD's VAE overflows in float16: a model that says so keeps its autoencoder in float32
        if name == "autoencoder" and dtype == torch.float16 and (index.get("defaults") or {}).get("upcast_vae"):
            component_dtype = torch.float32
        components[name] = load_component(folder / name, device=device, dtype=component_dtype)
    return index, components
