"""Reading and writing models: our own format, diffusers folders, original single files, images.

`load_model(path)` accepts any of the three model formats and returns
`(index, components)` in our terms: `index` is the model_index.json dict of our
format and `components` maps "autoencoder", "denoiser", "conditioner" to modules.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ldmkit.io.format import INDEX_FILE, is_ldmkit_model, load_component, load_model as load_ldmkit_model, save_component, save_model

BUNDLED_MODELS_DIR = Path(__file__).resolve().parent.parent / "assets"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def resolve_model_path(path: str | os.PathLike) -> Path:
    """A path, or the name of a model bundled with ldmkit (e.g. "demo-shapes")."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    bundled = BUNDLED_MODELS_DIR / str(path)
    if os.sep not in str(path) and bundled.is_dir():
        return bundled
    available = sorted(d.name for d in BUNDLED_MODELS_DIR.iterdir() if d.is_dir()) if BUNDLED_MODELS_DIR.is_dir() else []
    raise FileNotFoundError(f"model {str(path)!r} not found: not a path, nor a bundled model ({', '.join(available) or 'none'})")


def detect_format(path: str | os.PathLike) -> str:
    """"ldmkit", "diffusers" or "single_file" (ValueError when none fits)."""
    from ldmkit.io.format import FORMAT_NAME
    from ldmkit.io.files import read_json

    p = Path(path)
    if p.is_dir():
        if (p / INDEX_FILE).is_file() and read_json(p / INDEX_FILE).get("format") == FORMAT_NAME:
            return "ldmkit"  # (a model_index.json that is not a JSON object is refused by read_json)
        if (p / INDEX_FILE).is_file() or (p / "unet").is_dir():
            return "diffusers"
        raise ValueError(f"{p} is a folder but neither an ldmkit model (model_index.json with format 'ldmkit') "
                         "nor a diffusers folder (model_index.json, unet/, vae/ ...)")
    if p.is_file() and p.suffix.lower() in SINGLE_FILE_SUFFIXES:
        return "single_file"
    raise ValueError(f"{p}: not a model folder nor a single-file checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)})")


def load_model(path: str | os.PathLike, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, **options) -> tuple[dict, dict[str, torch.nn.Module]]:
    """Load a model in any supported format; see the module docstring for the result."""
    p = resolve_model_path(path)
    kind = detect_format(p)
    if kind != "single_file" and options.pop("base", None) is not None:
        from ldmkit.errors import UserError

        raise UserError(f"base= completes SD3 / FLUX.1 single files; {p} is a {kind} model folder")
    if kind == "ldmkit":
        return load_ldmkit_model(p, device=device, dtype=dtype)
    if kind == "diffusers":
        from ldmkit.io.diffusers_format import load_diffusers
        from ldmkit.io.flux_format import is_flux, load_flux
        from ldmkit.io.sd3_format import is_sd3, load_sd3

        if is_sd3(p):
            return load_sd3(p, device=device, dtype=dtype, **options)
        if is_flux(p):
            return load_flux(p, device=device, dtype=dtype, **options)

        return load_diffusers(p, device=device, dtype=dtype, **options)
    from ldmkit.io.single_file import load_single_file

    return load_single_file(p, device=device, dtype=dtype, **options)


def sampling_settings(index: dict, components: dict) -> dict:
    """How a loaded model samples, from its index and components: its noise schedule (built), what its
    network predicts, its conditioning (text when a conditioner is there and the index says nothing),
    its spatial concat input and latent size. The index must hold a schedule."""
    from ldmkit.diffusion import prediction_of, schedule_from_dict

    sched = index["schedule"]
    return {"schedule": schedule_from_dict(sched), "objective": index.get("objective") or prediction_of(sched),
            "conditioning": index.get("conditioning") or ("none" if components.get("conditioner") is None else "text"),
            "concat": index.get("concat"), "latent_size": index.get("latent_size")}


__all__ = ["detect_format", "load_component", "load_model", "resolve_model_path", "sampling_settings",
           "save_component", "save_model"]
