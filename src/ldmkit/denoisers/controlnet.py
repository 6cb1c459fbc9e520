"""ControlNet (Zhang et al. 2023): a trainable copy of the UNet's first half, fed a control image, whose
outputs reach the locked UNet through zero-initialised 1x1 convolutions -- added to its skip connections
and to its mid-block output, so a new ControlNet leaves the UNet's output unchanged.

Architecture, numerics and parameter names match diffusers' ``ControlNetModel`` (the key map is the
identity):

    conv_in, time_embedding, class_embedding, down_blocks, mid_block      (= the UNet's, ``UNetEncoder``)
    controlnet_cond_embedding.{conv_in, blocks.K, conv_out}               (control image -> latent grid)
    controlnet_down_blocks.K, controlnet_mid_block                        (the zero convolutions)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.denoisers.unet import UNetConfig, UNetEncoder

_MIRROR = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
_SHARED = ("in_channels", "down_block_types", "mid_block_type", "block_out_channels", "layers_per_block",
           "downsample_padding", "norm_num_groups", "norm_eps", "cross_attention_dim", "transformer_layers_per_block",
           "attention_head_dim", "num_attention_heads", "use_linear_projection", "num_class_embeds",
           "upcast_attention", "resnet_time_scale_shift", "flip_sin_to_cos", "freq_shift", "only_cross_attention",
           "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim")


@dataclass(frozen=True)
class ControlNetConfig:
    """diffusers' ``ControlNetModel`` config: its field names, meanings and defaults (SD 1.5's)."""
    in_channels: int = 4
    conditioning_channels: int = 3
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    only_cross_attention: bool | tuple = False
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple = 1
    attention_head_dim: int | tuple = 8
    num_attention_heads: int | tuple | None = None
    use_linear_projection: bool = False
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple = (16, 32, 96, 256)
    global_pool_conditions: bool = False
    addition_embed_type: str | None = None  # SDXL ControlNets: "text_time", as their UNet
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    def __post_init__(self):
        for f in fields(self):
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ValueError(f"controlnet_conditioning_channel_order {self.controlnet_conditioning_channel_order!r}"
                             " is not 'rgb' or 'bgr'")
        emb = self.conditioning_embedding_out_channels
        if not emb or any(not isinstance(c, int) or not 0 < c <= 65536 for c in emb):
            raise ValueError(f"conditioning_embedding_out_channels {emb!r} must be 1..65536 channels per stage")
        if not isinstance(self.conditioning_channels, int) or not 0 < self.conditioning_channels <= 64:
            raise ValueError(f"conditioning_channels {self.conditioning_channels!r} is not 1..64")
        bad = [k for k in self.down_block_types if k not in _MIRROR]
        if bad:
            raise ValueError(f"down_block_types {bad} are not supported (only {', '.join(_MIRROR)})")
        self.unet  # noqa: B018  (the UNet's own checks of the shared fields)

    @property
    def unet(self) -> UNetConfig:
        """The UNet whose first half this ControlNet copies (its up blocks mirror the down blocks)."""
        shared = {k: getattr(self, k) for k in _SHARED}
        return UNetConfig(**shared, out_channels=self.in_channels, sample_size=None,
                          up_block_types=tuple(_MIRROR[k] for k in reversed(self.down_block_types)))

    @classmethod
    def from_unet(cls, unet: UNetConfig, **overrides) -> "ControlNetConfig":
        return cls(**{k: getattr(unet, k) for k in _SHARED}, **overrides)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ControlNetConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class Residuals(NamedTuple):
    """What a ControlNet adds to the UNet: one tensor per skip connection, one for the mid block."""
    down: list
    mid: torch.Tensor

    def __add__(self, other: "Residuals") -> "Residuals":  # several ControlNets: their residuals sum
        return Residuals([a + b for a, b in zip(self.down, other.down)], self.mid + other.mid)


class ConditioningEmbedding(nn.Module):
    """Control image [B, C, H, W] in [0, 1] -> [B, c0, H / 2^k, W / 2^k] (k = stages - 1): 3x3 convs with
    SiLU, a stride-2 conv between stages, then a zero-initialised conv_out (the new branch starts silent)."""

    def __init__(self, in_channels: int, stages: tuple, out_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, stages[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for a, b in zip(stages[:-1], stages[1:]):
            self.blocks.append(nn.Conv2d(a, a, 3, padding=1))
            self.blocks.append(nn.Conv2d(a, b, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(stages[-1], out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # zero: a new ControlNet adds nothing to conv_in's output
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, control: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(control))
        for block in self.blocks:
            h = F.silu(block(h))
        return self.conv_out(h)


def _zero_conv(channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, 1)
    nn.init.zeros_(conv.weight)  # zero: the locked UNet sees exactly its own skips until training moves it
    nn.init.zeros_(conv.bias)
    return conv


class ControlNet(UNetEncoder):
    """``forward(x, t, control, context, class_labels, context_mask, scale, guess_mode) -> Residuals``."""

    def __init__(self, config: ControlNetConfig):
        super().__init__(config.unet)
        self.config = c = config
        self.controlnet_cond_embedding = ConditioningEmbedding(c.conditioning_channels,
                                                               c.conditioning_embedding_out_channels,
                                                               c.block_out_channels[0])
        self.controlnet_down_blocks = nn.ModuleList(_zero_conv(ch) for ch in self.skip_channels)
        self.controlnet_mid_block = _zero_conv(c.block_out_channels[-1])

    @property
    def factor(self) -> int:
        """Control-image pixels per latent pixel."""
        return 2 ** (len(self.config.conditioning_embedding_out_channels) - 1)

    @classmethod
    def from_unet(cls, unet: nn.Module, **overrides) -> "ControlNet":
        """A new ControlNet whose encoder starts as `unet`'s (a UNet, or a wrapper holding one as .unet)."""
        unet = getattr(unet, "unet", unet)
        net = cls(ControlNetConfig.from_unet(unet.config, **overrides))
        own = {k: v for k, v in unet.state_dict().items() if not k.startswith(("up_blocks.", "conv_norm_out.",
                                                                                "conv_out."))}
        missing, unexpected = net.load_state_dict(own, strict=False)
        assert not unexpected and all(k.startswith("controlnet_") for k in missing), (missing, unexpected)
        return net

    def forward(self, x: torch.Tensor, t, control: torch.Tensor, context: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                scale: float = 1.0, guess_mode: bool = False, pooled: torch.Tensor | None = None,
                time_ids: torch.Tensor | None = None) -> Residuals:
        # x: [B, in_channels, h, w] latents; control: [B, conditioning_channels, h * factor, w * factor] in [0, 1]
        c = self.config
        self._check(x, context, class_labels, context_mask, pooled, time_ids)
        want = (x.shape[0], c.conditioning_channels, x.shape[2] * self.factor, x.shape[3] * self.factor)
        if tuple(control.shape) != want:
            raise ValueError(f"control image has shape {tuple(control.shape)}; expected {want} "
                             f"({self.factor}x the latent size)")
        if c.controlnet_conditioning_channel_order == "bgr":
            control = control.flip(1)
        if context_mask is not None:
            context_mask = context_mask.to(device=x.device, dtype=torch.bool)
        temb = self.embed_time(x, t, class_labels, pooled, time_ids)
        h = self.conv_in(x) + self.controlnet_cond_embedding(control.to(x.dtype))
        h, skips = self.encode(h, temb, context, context_mask)
        down = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips)]  # [B, c_k, h_k, w_k] each
        mid = self.controlnet_mid_block(h)  # [B, c_last, h / 2^(n-1), w / 2^(n-1)]
        if guess_mode and not c.global_pool_conditions:  # shallow skips weaker: 0.1 ... 1 (geometric)
            scales = torch.logspace(-1, 0, len(down) + 1, device=x.device) * scale
            down = [d * s for d, s in zip(down, scales)]
            mid = mid * scales[-1]
        else:
            down = [d * scale for d in down]
            mid = mid * scale
        if c.global_pool_conditions:
            down = [d.mean(dim=(2, 3), keepdim=True) for d in down]
            mid = mid.mean(dim=(2, 3), keepdim=True)
        return Residuals(down, mid)
