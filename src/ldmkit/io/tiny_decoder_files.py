"""Reading tiny decoders (`autoencoder/tiny.py`): ldmkit component folders, diffusers AutoencoderTiny folders
(their decoder half) and the original TAESD decoder files (layers numbered from 1: TAESD's Sequential starts
with its clamp)."""
from __future__ import annotations

from pathlib import Path

import torch

from ldmkit.autoencoder.tiny import TinyDecoder, TinyDecoderConfig
from ldmkit.errors import UserError


def read_tiny_decoder(path: str | Path) -> TinyDecoder:
    """A tiny decoder from an ldmkit component folder, a diffusers AutoencoderTiny folder, or an original
    TAESD decoder file (.safetensors, or a .pth read with weights_only)."""
    from ldmkit.io.adapter_files import read_tensors
    from ldmkit.io.files import read_json

    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file() and read_json(p / "config.json").get("type") == "tiny-decoder":
        from ldmkit.io.format import load_component

        return load_component(p, device="cpu")
    if p.is_dir():
        cfg = read_json(p / "config.json") if (p / "config.json").is_file() else {}
        if cfg.get("_class_name") != "AutoencoderTiny":
            raise UserError(f"--tiny-decoder {p}: not a tiny decoder (an ldmkit tiny-decoder folder, a diffusers "
                            "AutoencoderTiny folder or a TAESD decoder file)")
        fixed = {"act_fn": "relu", "upsample_fn": "nearest", "upsampling_scaling_factor": 2, "latent_magnitude": 3,
                 "latent_shift": 0.5}
        bad = {k: cfg[k] for k, v in fixed.items() if k in cfg and cfg[k] != v}
        if bad:
            raise UserError(f"--tiny-decoder {p}: {bad} differ from the TAESD decoder ldmkit implements ({fixed})")
        from ldmkit.io.diffusers_format import _read_weights

        state = {k: v for k, v in _read_weights(p, "diffusion_pytorch_model").items() if k.startswith("decoder.")}
        widths = set(cfg.get("decoder_block_out_channels", (64, 64, 64, 64)))
        if len(widths) != 1:
            raise UserError(f"--tiny-decoder {p}: decoder_block_out_channels must be one width, got {sorted(widths)}")
        config = TinyDecoderConfig(cfg.get("latent_channels", 4), cfg.get("out_channels", 3), widths.pop(),
                                   tuple(cfg.get("num_decoder_blocks", (3, 3, 3, 1))),
                                   float(cfg.get("scaling_factor", 1.0)), float(cfg.get("shift_factor") or 0.0))
    elif p.is_file():
        raw = read_tensors(p, "--tiny-decoder")[0]
        if not isinstance(raw, dict) or not raw:
            raise UserError(f"--tiny-decoder {p}: not a TAESD decoder file (no tensors)")
        # TAESD's Sequential starts with its clamp (index 0): its layer k is diffusers' layer k - 1
        state = {}
        for k, v in raw.items():
            head, _, rest = k.partition(".")
            if not head.isdigit() or not isinstance(v, torch.Tensor):
                raise UserError(f"--tiny-decoder {p}: key {k!r} is not a TAESD decoder layer")
            state[f"decoder.layers.{int(head) - 1}.{rest}"] = v
        config = _config_of_layers(state, p)
    else:
        raise UserError(f"--tiny-decoder {p}: no such file or folder")
    module = TinyDecoder(config)
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError:  # shapes that do not fit
        from ldmkit.errors import one_line

        missing, unexpected = ["(tensor shapes differ)"], [one_line(k, 60) for k in list(state)[:1]]
    if missing or unexpected:
        raise UserError(f"--tiny-decoder {p}: its tensors do not fit a TAESD decoder (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    return module.eval()


def _config_of_layers(state: dict, where: Path) -> TinyDecoderConfig:
    """The TAESD decoder layout of an original file (the shapes of its first conv, its blocks and convs)."""
    first = state.get("decoder.layers.0.weight")
    if first is None or first.dim() != 4:
        raise UserError(f"--tiny-decoder {where}: no first convolution (layer 1 in TAESD's numbering)")
    idx = sorted({int(k.split(".")[2]) for k in state})
    blocks, n = [], 0
    for i in idx[1:]:
        if f"decoder.layers.{i}.conv.0.weight" in state:
            n += 1
        elif f"decoder.layers.{i}.weight" in state:  # a level's closing conv
            blocks.append(n)
            n = 0
    return TinyDecoderConfig(first.shape[1], state[f"decoder.layers.{idx[-1]}.weight"].shape[0], first.shape[0],
                             tuple(blocks))


__all__ = ["read_tiny_decoder"]
