"""A tiny decoder (TAESD, Bohan 2023): latents -> images through a few ReLU conv blocks and nearest-neighbour
upsampling, trained to imitate a full decoder (`ldm train-tiny-decoder`). It decodes in a fraction of the
full decoder's time: fast decoding (`ldm sample --fast-decode`) and live previews.

    z (the sampler's latents) ─ 3 tanh(z / 3) ─ conv ─ ReLU ─┬ [block x n_i ─ upsample x2 ─ conv]  per level
                                                             └ block x n_last ─ conv ─▶ x in [0, 1] ─▶ 2x - 1

Layer names and numerics are diffusers' `AutoencoderTiny` decoder (`decoder.layers.N`), so its folders and
the original TAESD decoder files (`taesd_decoder.safetensors` / `.pth`: the same layers, numbered from 1)
load here (`io/tiny_decoder_files.py`): TAESD for SD 1/2, TAESDXL, TAESD3, TAEF1 decode the latents those
pipelines sample (their configs' scaling / shift factors are kept).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn



@dataclass(frozen=True)
class TinyDecoderConfig:
    latent_channels: int = 4
    out_channels: int = 3
    channels: int = 64  # every level's width (diffusers' decoder_block_out_channels, all equal)
    num_blocks: tuple = (3, 3, 3, 1)  # blocks per level; an upsampling x2 between levels
    # the decoder reads z / scaling_factor + shift_factor of the sampler's latents z, as diffusers' pipelines hand
    # latents to AutoencoderTiny: 1 / 0 for TAESD (SD's scaled latents) and ldmkit's own, SD3's / FLUX's for theirs
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    def __post_init__(self):
        from ldmkit.errors import check_int

        v = self.num_blocks
        object.__setattr__(self, "num_blocks", tuple(v) if isinstance(v, (list, tuple)) else v)
        if not isinstance(self.num_blocks, tuple) or not self.num_blocks:
            raise ValueError(f"num_blocks={v!r} must be a non-empty list")
        check_int("latent_channels", self.latent_channels, 1, 4096)
        check_int("out_channels", self.out_channels, 1, 64)
        check_int("channels", self.channels, 1, 4096)
        from ldmkit.errors import check_number

        check_number("scaling_factor", self.scaling_factor, 0.0, lo_open=True)
        check_number("shift_factor", self.shift_factor)
        for n in self.num_blocks:
            check_int("num_blocks entry", n, 0, 64)

    @property
    def factor(self) -> int:
        return 2 ** (len(self.num_blocks) - 1)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class Block(nn.Module):
    """ReLU(conv-ReLU-conv-ReLU-conv(x) + skip(x)) (diffusers' AutoencoderTinyBlock)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))


class _Layers(nn.Module):
    def __init__(self, c: TinyDecoderConfig):
        super().__init__()
        ch = c.channels
        layers = [nn.Conv2d(c.latent_channels, ch, 3, padding=1), nn.ReLU()]
        for i, n in enumerate(c.num_blocks):
            last = i == len(c.num_blocks) - 1
            layers += [Block(ch, ch) for _ in range(n)]
            if not last:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            # between levels a conv without bias; the last one makes the image
            layers.append(nn.Conv2d(ch, c.out_channels if last else ch, 3, padding=1, bias=last))
        self.layers = nn.Sequential(*layers)


class TinyDecoder(nn.Module):
    component_type = "tiny-decoder"

    def __init__(self, config: TinyDecoderConfig):
        super().__init__()
        self.config = config
        self.decoder = _Layers(config)

    @property
    def downsample_factor(self) -> int:
        return self.config.factor

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # z: [B, latent_channels, h, w] (the sampler's scaled latents) -> [B, out_channels, f h, f w] in [-1, 1]
        c = self.config
        if c.scaling_factor != 1.0 or c.shift_factor != 0.0:
            z = z / c.scaling_factor + c.shift_factor
        x = torch.tanh(z / 3) * 3  # soft clamp of out-of-range latents
        return self.decoder.layers(x).mul(2).sub(1)


__all__ = ["TinyDecoder", "TinyDecoderConfig"]
