"""Reading ControlNets: a diffusers ``ControlNetModel`` folder (config.json + diffusion_pytorch_model.*), or
the ``controlnet/`` folder of a diffusers ControlNet pipeline. Parameter names are diffusers' own
(``denoisers.controlnet``), so the key map is the identity."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ldmkit.errors import UserError

# ControlNetModel options ldmkit does not build (value: the one it does)
_FIXED = {"act_fn": "silu", "class_embed_type": None, "addition_embed_type": None, "encoder_hid_dim": None,
          "encoder_hid_dim_type": None, "projection_class_embeddings_input_dim": None,
          "addition_time_embed_dim": None, "mid_block_scale_factor": 1}


def controlnet_folder(path: str | os.PathLike) -> Path:
    """The ControlNetModel folder of `path` (itself, or a pipeline's controlnet/)."""
    p = Path(path)
    for folder in (p, p / "controlnet"):
        if (folder / "config.json").is_file():
            return folder
    raise UserError(f"--controlnet {path}: not a diffusers ControlNet folder (no config.json"
                    f"{'' if p.is_dir() else '; the path does not exist' if not p.exists() else ''})")


def read_controlnet(path: str | os.PathLike, device=None, dtype: torch.dtype = torch.float32):
    """A diffusers ControlNet folder -> ``ControlNet`` (eval mode, on `device`, in `dtype`)."""
    from ldmkit.denoisers.controlnet import ControlNet, ControlNetConfig
    from ldmkit.io.diffusers_format import _build_on_meta, _check_fixed, _read_weights
    from ldmkit.io.files import read_json

    folder = controlnet_folder(path)
    cfg = read_json(folder / "config.json")
    kind = cfg.get("_class_name", "ControlNetModel")
    if kind != "ControlNetModel":
        raise UserError(f"--controlnet {path}: {folder / 'config.json'} describes a {kind!r}, not a ControlNetModel"
                        + (" (SDXL / SD3 / FLUX ControlNets are not supported)" if "XL" in str(kind) else ""))
    try:
        _check_fixed(cfg, _FIXED, "diffusers ControlNet")
        config = ControlNetConfig.from_dict(cfg)
    except (TypeError, ValueError) as e:
        raise UserError(f"--controlnet {path}: {e}") from None
    state = _read_weights(folder, "diffusion_pytorch_model")
    net = _build_on_meta(lambda: ControlNet(config), state, f"ControlNet {folder}", dtype)
    return net.to(device) if device is not None else net


def check_fits(net, unet, where: str) -> None:
    """Refuse a ControlNet built for another UNet: its skip channels, latent channels and context width
    must be the UNet's."""
    from ldmkit.denoisers.unet import UNetEncoder

    if hasattr(unet, "unet"):  # ExtendedUNet: its adapter and position features would have to reach the ControlNet
        raise UserError(f"{where}: ControlNets run on plain UNets; this model's UNet has ldmkit's extensions "
                        "(context adapter / position features)")
    if not isinstance(unet, UNetEncoder):
        raise UserError(f"{where}: ControlNets need a UNet model; this model's denoiser is a "
                        f"{type(unet).__name__}")
    a, b = net.config, unet.config
    if net.skip_channels != unet.skip_channels or a.in_channels > b.in_channels:
        raise UserError(f"{where}: the ControlNet was made for another UNet (skip channels {net.skip_channels}, "
                        f"latent channels {a.in_channels}; the model's: {unet.skip_channels}, {b.in_channels})")
    if a.cross_attention_dim != b.cross_attention_dim:
        raise UserError(f"{where}: the ControlNet's cross_attention_dim is {a.cross_attention_dim}, the model's "
                        f"{b.cross_attention_dim} (a ControlNet of another base model, e.g. SD 2 on SD 1)")
