"""Reading ControlNets: a diffusers ``ControlNetModel`` folder (config.json + diffusion_pytorch_model.*), the
``controlnet/`` folder of a diffusers ControlNet pipeline, or an original single file
(``control_*.safetensors`` / ``.pth``: ``control_model.`` + the CompVis UNet's first half, ``input_hint_block``,
``zero_convs``, ``middle_block_out``). Parameter names are diffusers' own (``denoisers.controlnet``), so
the diffusers key map is the identity; the original one is:

    input_hint_block.0             controlnet_cond_embedding.conv_in
    input_hint_block.{2k + 2}      controlnet_cond_embedding.blocks.{k}   (3x3 convs; SiLUs in between)
    input_hint_block.{last}        controlnet_cond_embedding.conv_out
    zero_convs.{i}.0               controlnet_down_blocks.{i}
    middle_block_out.0             controlnet_mid_block
    the rest                       the UNet's names (io.single_file.unet_to_diffusers)
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ldmkit.errors import UserError

# ControlNetModel options ldmkit does not build (value: the one it does)
_FIXED = {"act_fn": "silu", "class_embed_type": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
          "mid_block_scale_factor": 1}


def controlnet_folder(path: str | os.PathLike) -> Path:
    """The ControlNetModel folder of `path` (itself, or a pipeline's controlnet/)."""
    p = Path(path)
    for folder in (p, p / "controlnet"):
        if (folder / "config.json").is_file():
            return folder
    raise UserError(f"--controlnet {path}: not a diffusers ControlNet folder (no config.json"
                    f"{'' if p.is_dir() else '; the path does not exist' if not p.exists() else ''})")


def original_to_diffusers(state: dict, where: str):
    """An original single-file ControlNet's tensors -> (ControlNetConfig, tensors in diffusers' names)."""
    from ldmkit.denoisers.controlnet import ControlNetConfig
    from ldmkit.io.ldm_layout import _indices, unet_to_diffusers

    if any(k.startswith("control_model.") for k in state):
        state = {k[len("control_model."):]: v for k, v in state.items() if k.startswith("control_model.")}
    if "input_hint_block.0.weight" not in state:
        hint = "controlnet_cond_embedding.conv_in.weight" in state
        raise UserError(f"--controlnet {where}: " + ("a ControlNet in diffusers' names: give its folder (with "
                        "config.json)" if hint else "not a ControlNet (no input_hint_block / control_model keys)"))
    hint = _indices(state, "input_hint_block.")
    out, rest = {}, {}
    for k, v in state.items():
        head, _, tail = k.partition(".")
        if head == "input_hint_block":
            i, _, name = tail.partition(".")
            pos = hint.index(int(i))
            new = "conv_in" if pos == 0 else "conv_out" if pos == len(hint) - 1 else f"blocks.{pos - 1}"
            out[f"controlnet_cond_embedding.{new}.{name}"] = v
        elif head == "zero_convs":
            i, _, name = tail.partition(".")
            out[f"controlnet_down_blocks.{i}.{name.removeprefix('0.')}"] = v
        elif head == "middle_block_out":
            out[f"controlnet_mid_block.{tail.removeprefix('0.')}"] = v
        else:
            rest[k] = v
    proj = next((v for k, v in rest.items() if k.endswith("proj_in.weight")), None)
    to_k = next((v for k, v in rest.items() if k.endswith("attn2.to_k.weight")), None)
    family = "sd2" if (proj is not None and proj.ndim == 2) or (to_k is not None and to_k.shape[1] == 1024) else "sd1"
    try:
        ucfg, unet_state = unet_to_diffusers(rest, family)
    except (KeyError, ValueError) as e:
        raise UserError(f"--controlnet {where}: {e}") from None
    convs = [out[f"controlnet_cond_embedding.{n}.weight"] for n in
             ["conv_in"] + [f"blocks.{j}" for j in range(len(hint) - 2)]]
    stages = [convs[0].shape[0]] + [c.shape[0] for c in convs[2::2]]
    fields = {k: v for k, v in ucfg.items() if not k.startswith("_")}
    config = ControlNetConfig.from_dict({**fields, "upcast_attention": False,  # as diffusers' converter
                                         "conditioning_channels": convs[0].shape[1],
                                         "conditioning_embedding_out_channels": tuple(stages)})
    return config, {**unet_state, **out}


def read_controlnet(path: str | os.PathLike, device=None, dtype: torch.dtype = torch.float32):
    """A diffusers ControlNet folder or an original single file -> ``ControlNet`` (eval mode, on
    `device`, in `dtype`)."""
    from ldmkit.denoisers.controlnet import ControlNet
    from ldmkit.io.diffusers_format import _build_on_meta, _read_weights
    from ldmkit.io.single_file import read_checkpoint

    if Path(path).is_file():
        config, state = original_to_diffusers(read_checkpoint(path)[0], str(path))
        source = Path(path)
    else:
        source = controlnet_folder(path)
        config, state = _diffusers_config(path, source), _read_weights(source, "diffusion_pytorch_model")
    net = _build_on_meta(lambda: ControlNet(config), state, f"ControlNet {source}", dtype)
    return net.to(device) if device is not None else net


def _diffusers_config(path, folder: Path):
    """A diffusers ControlNetModel folder's config.json -> ``ControlNetConfig`` (other classes and options
    refused)."""
    from ldmkit.denoisers.controlnet import ControlNetConfig
    from ldmkit.io.diffusers_format import _check_fixed
    from ldmkit.io.files import read_json

    cfg = read_json(folder / "config.json")
    kind = cfg.get("_class_name", "ControlNetModel")
    if kind != "ControlNetModel":
        raise UserError(f"--controlnet {path}: {folder / 'config.json'} describes a {kind!r}, not a ControlNetModel"
                        + (" (SD3 / FLUX ControlNets are not supported)" if "SD3" in str(kind) or "Flux" in str(kind) else ""))
    try:
        _check_fixed(cfg, _FIXED, "diffusers ControlNet")
        return ControlNetConfig.from_dict(cfg)
    except (TypeError, ValueError) as e:
        raise UserError(f"--controlnet {path}: {e}") from None


def write_controlnet(folder: str | os.PathLike, net, metadata: dict[str, str] | None = None) -> Path:
    """A ``ControlNet`` as the diffusers ``ControlNetModel`` folder ``ControlNetModel.from_pretrained`` and
    ``--controlnet`` read: weights first, config.json last (a folder with a config is complete)."""
    from ldmkit.io.files import save_tensors, write_json

    root = Path(folder)
    state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    save_tensors(root / "diffusion_pytorch_model.safetensors", state, {"format": "pt", **(metadata or {})})
    config = {"_class_name": "ControlNetModel", "_diffusers_version": "0.30.0", **_FIXED,
              **{k: list(v) if isinstance(v, tuple) else v for k, v in net.config.to_dict().items()}}
    write_json(root / "config.json", config)
    return root


def check_fits(net, unet, where: str) -> None:
    """Refuse a ControlNet built for another UNet: its skip channels, latent channels and context width
    must be the UNet's."""
    from ldmkit.denoisers.unet import UNetEncoder

    unet = getattr(unet, "unet", unet)  # an extended UNet: its plain UNet (denoisers/extensions.py)
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
