"""The Stable-Diffusion-compatible UNet: eps_theta(z_t, t, tau(y)).

Architecture and numerics match diffusers' ``UNet2DConditionModel`` for the
options below, and every parameter has the same name, so the key map to
diffusers is the identity (see docs/denoisers.md):

    conv_in, time_embedding.linear_{1,2}, class_embedding,
    down_blocks.I.{resnets.J, attentions.J, downsamplers.0.conv},
    mid_block.{resnets.J, attentions.J},
    up_blocks.I.{resnets.J, attentions.J, upsamplers.0.conv},
    conv_norm_out, conv_out

Data path: sinusoidal timestep features -> MLP -> temb (+ class embedding);
conv_in; down levels (ResNet blocks with temb injection, optional spatial
transformers with cross-attention to ``context``, stride-2 downsampling) whose
outputs are kept as skips; mid block; up levels that concatenate the skips,
upsampling to the skip's size (so any latent size works, not only multiples
of 2**levels); GroupNorm, SiLU, conv_out.

Opt-in additions that diffusers' UNet does not have (a context adapter, position
features) wrap this class from outside: ``ldmkit.denoisers.extensions``.

The head-count quirk: diffusers' ``attention_head_dim`` in SD1/SD2 configs is
really the *number of heads* per level (``num_attention_heads`` falls back to
it) and the per-head width is ``channels // heads``. ``UNetConfig`` keeps the
same field names and the same meaning so diffusers configs copy over as is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.nn.blocks import Downsample2D, ResnetBlock2D, Upsample2D, run_block
from ldmkit.nn.embeddings import TimestepEmbedding, guidance_embedding, timestep_embedding
from ldmkit.nn.transformer import Transformer2D

DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)


def _per_level(value, n: int, name: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name}={tuple(value)} must have one entry per level ({n})")
        return tuple(value)
    return (value,) * n


@dataclass(frozen=True)
class UNetConfig:
    """UNet hyper-parameters; field names and meanings follow diffusers' config.json."""

    in_channels: int = 4  # counts concatenated spatial inputs (9 for inpainting, 4+3 for x4 upscale)
    out_channels: int = 4
    block_out_channels: tuple = (320, 640, 1280, 1280)
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    layers_per_block: int = 2
    attention_head_dim: int | tuple = 8  # diffusers quirk: number of heads when num_attention_heads is None
    num_attention_heads: int | tuple | None = None
    transformer_layers_per_block: int | tuple = 1
    only_cross_attention: bool | tuple = False  # per level: attn1 also attends to the context (x4 upscaler)
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"  # or "scale_shift"
    num_class_embeds: int | None = None  # nn.Embedding added to temb (class labels, x4-upscaler noise level)
    # SDXL's micro-conditioning: "text_time" adds MLP([pooled text; sinusoids of each time id]) to temb
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None  # sinusoid width per time id (SDXL: 256)
    projection_class_embeddings_input_dim: int | None = None  # pooled width + n_ids * addition_time_embed_dim
    # LCM's guidance-distilled students: sinusoids of (guidance - 1) -> Linear -> added to the time features
    time_cond_proj_dim: int | None = None
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    dropout: float = 0.0
    sample_size: int | None = 64  # latent size used in training (informational; any size runs)

    def __post_init__(self):
        # JSON round trips give lists; keep the dataclass hashable and comparable.
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                object.__setattr__(self, f.name, tuple(v))
        self._check_values()
        n = len(self.block_out_channels)
        if n < 1:
            raise ValueError("block_out_channels must name at least one level")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"down_block_types {self.down_block_types} and up_block_types "
                             f"{self.up_block_types} must both have {n} entries (one per level)")
        for t in self.down_block_types:
            if t not in DOWN_TYPES:
                raise ValueError(f"down block type {t!r} is not one of {DOWN_TYPES}")
        for t in self.up_block_types:
            if t not in UP_TYPES:
                raise ValueError(f"up block type {t!r} is not one of {UP_TYPES}")
        if self.mid_block_type not in MID_TYPES:
            raise ValueError(f"mid_block_type={self.mid_block_type!r} is not one of {MID_TYPES}")
        if self.resnet_time_scale_shift not in ("default", "scale_shift"):
            raise ValueError(f"resnet_time_scale_shift={self.resnet_time_scale_shift!r} must be "
                             "'default' or 'scale_shift'")
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block={self.layers_per_block} must be >= 1")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"block_out_channels entry {c} is not divisible by norm_num_groups="
                                 f"{self.norm_num_groups}")
        for c, h in zip(self.block_out_channels, self.heads):
            if h < 1 or c % h:
                raise ValueError(f"{c} channels cannot be split into {h} attention heads")
        _per_level(self.transformer_layers_per_block, n, "transformer_layers_per_block")
        _per_level(self.only_cross_attention, n, "only_cross_attention")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"addition_embed_type={self.addition_embed_type!r} is not supported (only 'text_time', "
                             "SDXL's)")
        if self.addition_embed_type and not (self.addition_time_embed_dim and self.projection_class_embeddings_input_dim):
            raise ValueError("addition_embed_type='text_time' needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim")

    def _check_values(self) -> None:
        """Types and sane ranges of every field (a config read from JSON may hold anything)."""
        from ldmkit.errors import check_int, check_ints, check_number

        big = 65536  # channels
        check_ints("block_out_channels", self.block_out_channels, 1, big, max_len=16)
        n = len(self.block_out_channels)
        for name in ("down_block_types", "up_block_types"):
            v = getattr(self, name)
            if not isinstance(v, tuple) or not all(isinstance(t, str) for t in v):
                raise ValueError(f"{name}={v!r} must be a list of block type names")
        if self.mid_block_type is not None and not isinstance(self.mid_block_type, str):
            raise ValueError(f"mid_block_type={self.mid_block_type!r} must be a block type name or null")
        for name in ("in_channels", "out_channels", "norm_num_groups"):
            check_int(name, getattr(self, name), 1, big)
        check_int("cross_attention_dim", self.cross_attention_dim, 1, big, optional=True)
        check_int("layers_per_block", self.layers_per_block, 1, 64)
        for name, lo, hi in (("attention_head_dim", 1, big), ("num_attention_heads", 1, big),
                             ("transformer_layers_per_block", 1, 64)):
            v = getattr(self, name)
            if name == "num_attention_heads" and v is None:
                continue
            if isinstance(v, tuple):
                check_ints(name, v, lo, hi, min_len=n, max_len=n)
            else:
                check_int(name, v, lo, hi)
        v = self.only_cross_attention
        if not (isinstance(v, bool) or (isinstance(v, tuple) and all(isinstance(b, bool) for b in v))):
            raise ValueError(f"only_cross_attention={v!r} must be true/false or one per level")
        check_int("num_class_embeds", self.num_class_embeds, 1, 1 << 24, optional=True)
        check_int("addition_time_embed_dim", self.addition_time_embed_dim, 2, big, optional=True)
        check_int("time_cond_proj_dim", self.time_cond_proj_dim, 4, big, optional=True)  # sinusoids need 2 per half
        check_int("projection_class_embeddings_input_dim", self.projection_class_embeddings_input_dim, 1, 1 << 20,
                  optional=True)
        check_int("freq_shift", self.freq_shift, 0, 1 << 16)
        check_int("downsample_padding", self.downsample_padding, 0, 16)
        check_int("sample_size", self.sample_size, 1, big, optional=True)  # informational: null allowed
        check_number("norm_eps", self.norm_eps, 0.0, 1.0, lo_open=True)
        check_number("dropout", self.dropout, 0.0, 1.0, hi_open=True)
        for name in ("use_linear_projection", "upcast_attention", "flip_sin_to_cos"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false")

    @property
    def heads(self) -> tuple:
        """Attention heads per level (diffusers: ``num_attention_heads or attention_head_dim``)."""
        value = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return _per_level(value, len(self.block_out_channels), "attention heads")

    @property
    def has_cross_attention(self) -> bool:
        return ("CrossAttnDownBlock2D" in self.down_block_types or "CrossAttnUpBlock2D" in self.up_block_types
                or self.mid_block_type == "UNetMidBlock2DCrossAttn")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown UNetConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**d)


_SD_LEVELS = dict(
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)

PRESETS: dict[str, UNetConfig] = {
    # Stable Diffusion 1.x (CompVis/runwayml v1-5): 8 heads everywhere, conv projections, CLIP-L context.
    "sd15": UNetConfig(**_SD_LEVELS, attention_head_dim=8, cross_attention_dim=768, sample_size=64),
    # 1.5 inpainting: latents + mask + masked-image latents.
    "sd15-inpaint": UNetConfig(**_SD_LEVELS, in_channels=9, attention_head_dim=8, cross_attention_dim=768,
                               sample_size=64),
    # Stable Diffusion 2.x (768-v): 64-wide heads, linear projections, OpenCLIP-H context, upcast attention.
    "sd21": UNetConfig(**_SD_LEVELS, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                       use_linear_projection=True, upcast_attention=True, sample_size=96),
    # SD x4 upscaler: 4 noisy latents + 3 low-res RGB channels, noise level as class label.
    "sd-x4-upscaler": UNetConfig(
        in_channels=7, block_out_channels=(256, 512, 512, 1024),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
        attention_head_dim=8, cross_attention_dim=1024, use_linear_projection=True,
        only_cross_attention=(True, True, True, False), num_class_embeds=1000, sample_size=128),
    # SDXL base: no attention at the first level, 2 / 10 transformer layers below, two text encoders'
    # 768 + 1280 = 2048-wide context, pooled text (1280) + 6 size / crop ids into the time embedding.
    "sdxl": UNetConfig(block_out_channels=(320, 640, 1280),
                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                       transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                       cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                       addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, sample_size=128),
    # SDXL refiner: OpenCLIP-G context only; 5 ids (sizes, crop, aesthetic score).
    "sdxl-refiner": UNetConfig(block_out_channels=(384, 768, 1536, 1536),
                               down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                               up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",),
                               transformer_layers_per_block=4, attention_head_dim=(6, 12, 24, 24),
                               cross_attention_dim=1280, use_linear_projection=True, addition_embed_type="text_time",
                               addition_time_embed_dim=256, projection_class_embeddings_input_dim=2560,
                               sample_size=128),
    # SDXL's shape at CPU size: no attention at the first level, two transformer layers at the second,
    # pooled text + 6 size / crop ids into the time embedding (`ldm train` fits the widths to the text encoder).
    "sdxl-small": UNetConfig(block_out_channels=(64, 128), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                             up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                             transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=128,
                             use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=32,
                             projection_class_embeddings_input_dim=128 + 6 * 32, sample_size=8),
    # Small CPU models: same code path, few channels.
    "tiny": UNetConfig(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                       attention_head_dim=2, cross_attention_dim=32, norm_num_groups=8, sample_size=8),
    # The demo: text-conditioned model on 8x8x4 latents, trains in minutes on 2 CPU cores.
    "small": UNetConfig(block_out_channels=(64, 128, 128),
                        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                        layers_per_block=1, attention_head_dim=4, cross_attention_dim=128,
                        norm_num_groups=32, use_linear_projection=True, sample_size=8),
}


class _Level(nn.Module):
    """Parameter container for one level: ``resnets`` (+ ``attentions``) (+ ``downsamplers`` /
    ``upsamplers``); UNet.forward runs it, so the skip bookkeeping reads in one place."""


def _makers(c: UNetConfig):
    """The config's block builders: resnet(cin, cout) and transformer(channels, heads, depth, only_cross)."""
    temb_dim = c.block_out_channels[0] * 4

    def resnet(cin, cout):
        return ResnetBlock2D(cin, cout, temb_channels=temb_dim, groups=c.norm_num_groups, eps=c.norm_eps,
                             dropout=c.dropout, time_embedding_norm=c.resnet_time_scale_shift)

    def transformer(channels, level_heads, level_depth, level_only_cross=False):
        return Transformer2D(channels, level_heads, channels // level_heads, depth=level_depth,
                             cross_attention_dim=c.cross_attention_dim, groups=c.norm_num_groups,
                             use_linear_projection=c.use_linear_projection,
                             upcast_attention=c.upcast_attention, only_cross_attention=level_only_cross)

    return resnet, transformer


class UNetEncoder(nn.Module):
    """The UNet's first half: time embedding, conv_in, the down levels and the mid block. The UNet adds
    the up levels; a ControlNet (``denoisers.controlnet``) is this half with zero convolutions."""

    def __init__(self, arch: UNetConfig):
        super().__init__()
        self.arch = c = arch
        ch = c.block_out_channels
        n = len(ch)
        heads = c.heads
        depth = _per_level(c.transformer_layers_per_block, n, "transformer_layers_per_block")
        temb_dim = ch[0] * 4
        resnet, transformer = _makers(c)
        only_cross = _per_level(c.only_cross_attention, n, "only_cross_attention")

        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb_dim, cond_proj_dim=c.time_cond_proj_dim)
        self.class_embedding = nn.Embedding(c.num_class_embeds, temb_dim) if c.num_class_embeds else None
        # SDXL: pooled text + Fourier features of the size / crop (/ aesthetic score) ids -> temb
        self.add_embedding = (TimestepEmbedding(c.projection_class_embeddings_input_dim, temb_dim)
                              if c.addition_embed_type == "text_time" else None)

        self.down_blocks = nn.ModuleList()
        cout = ch[0]
        for i, kind in enumerate(c.down_block_types):
            cin, cout = cout, ch[i]
            level = _Level()
            level.resnets = nn.ModuleList(resnet(cin if j == 0 else cout, cout) for j in range(c.layers_per_block))
            level.attentions = (nn.ModuleList(transformer(cout, heads[i], depth[i], only_cross[i])
                                              for _ in range(c.layers_per_block))
                                if kind == "CrossAttnDownBlock2D" else None)
            level.downsamplers = (nn.ModuleList([Downsample2D(cout, cout, padding=c.downsample_padding)])
                                  if i < n - 1 else None)
            self.down_blocks.append(level)

        self.mid_block = None
        if c.mid_block_type is not None:
            mid = _Level()
            if c.mid_block_type == "UNetMidBlock2DCrossAttn":
                mid.resnets = nn.ModuleList([resnet(ch[-1], ch[-1]), resnet(ch[-1], ch[-1])])
                mid.attentions = nn.ModuleList([transformer(ch[-1], heads[-1], depth[-1])])
            else:  # diffusers builds UNetMidBlock2D without attention inside UNet2DConditionModel
                mid.resnets = nn.ModuleList([resnet(ch[-1], ch[-1])])
                mid.attentions = None
            self.mid_block = mid
        self.gradient_checkpointing = False  # recompute each resnet / transformer in the backward pass

    @property
    def skip_channels(self) -> list[int]:
        """Channels of the skip connections `encode` returns, in order (conv_in, each resnet, each
        downsampler)."""
        c, out = self.arch, [self.arch.block_out_channels[0]]
        for i, ch in enumerate(c.block_out_channels):
            out += [ch] * c.layers_per_block + ([ch] if i < len(c.block_out_channels) - 1 else [])
        return out

    # -- input checks -------------------------------------------------------------------
    def _timesteps(self, t, x: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0 or t.numel() == 1:
            return t.reshape(1).expand(x.shape[0])
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t has shape {tuple(t.shape)}; expected a scalar or [B] with B={x.shape[0]}")
        return t

    def _check(self, x, context, class_labels, context_mask, pooled=None, time_ids=None):
        c = self.arch
        if c.addition_embed_type == "text_time":
            if pooled is None or time_ids is None:
                raise ValueError("this UNet takes SDXL's micro-conditioning: pass pooled [B, P] and time_ids [B, k]")
            width = pooled.shape[-1] + time_ids.shape[-1] * c.addition_time_embed_dim
            if pooled.shape[0] != x.shape[0] or time_ids.shape[0] != x.shape[0] or \
                    width != c.projection_class_embeddings_input_dim:
                raise ValueError(f"pooled {tuple(pooled.shape)} and time_ids {tuple(time_ids.shape)} give "
                                 f"{width} features for batch {pooled.shape[0]}; the UNet takes "
                                 f"{c.projection_class_embeddings_input_dim} for batch {x.shape[0]}")
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected [B, {c.in_channels}, H, W] "
                             "(in_channels includes concatenated spatial conditions)")
        if c.has_cross_attention:
            if context is None:
                raise ValueError(f"this UNet has cross-attention (cross_attention_dim={c.cross_attention_dim}); "
                                 f"pass context of shape [B, L, {c.cross_attention_dim}]")
            if context.ndim != 3 or context.shape[-1] != c.cross_attention_dim or context.shape[0] != x.shape[0]:
                raise ValueError(f"context has shape {tuple(context.shape)}; expected "
                                 f"[{x.shape[0]}, L, {c.cross_attention_dim}]")
            if context_mask is not None and tuple(context_mask.shape) != tuple(context.shape[:2]):
                raise ValueError(f"context_mask has shape {tuple(context_mask.shape)}; expected "
                                 f"{tuple(context.shape[:2])} (True = attend)")
        if c.num_class_embeds:
            if class_labels is None:
                raise ValueError(f"this UNet has a class embedding (num_class_embeds={c.num_class_embeds}); "
                                 "pass class_labels [B]")
            if class_labels.shape != (x.shape[0],):
                raise ValueError(f"class_labels has shape {tuple(class_labels.shape)}; expected [{x.shape[0]}]")
            lo, hi = int(class_labels.min()), int(class_labels.max())
            if lo < 0 or hi >= c.num_class_embeds:
                raise ValueError(f"class_labels range [{lo}, {hi}] is outside [0, {c.num_class_embeds - 1}]")

    # -- the first half of forward ------------------------------------------------------------
    def embed_time(self, x: torch.Tensor, t, class_labels, pooled=None, time_ids=None, guidance=None) -> torch.Tensor:
        """t (scalar or [B]) -> temb [B, 4 * block_out_channels[0]] (+ the class embedding, + SDXL's
        embedding of the pooled text and the time ids; an LCM student's `guidance`, scalar or [B], enters
        the time features as sinusoids of guidance - 1; without it nothing is added, as in diffusers)."""
        c = self.arch
        t = self._timesteps(t, x)
        temb = timestep_embedding(t, c.block_out_channels[0], flip_sin_to_cos=c.flip_sin_to_cos,
                                  downscale_freq_shift=c.freq_shift).to(x.dtype)
        w = None
        if guidance is not None and c.time_cond_proj_dim:
            scale = torch.as_tensor(guidance, dtype=torch.float32, device=x.device).reshape(-1)
            w = guidance_embedding(scale.expand(x.shape[0]) - 1, c.time_cond_proj_dim)
        temb = self.time_embedding(temb, w)
        if self.class_embedding is not None:
            temb = temb + self.class_embedding(class_labels.to(x.device)).to(temb.dtype)
        if self.add_embedding is not None:
            ids = time_ids.to(x.device).flatten()
            fourier = timestep_embedding(ids, c.addition_time_embed_dim, flip_sin_to_cos=c.flip_sin_to_cos,
                                         downscale_freq_shift=c.freq_shift).reshape(x.shape[0], -1)
            temb = temb + self.add_embedding(torch.cat([pooled.to(x.device), fourier.to(pooled.dtype)], -1).to(temb.dtype))
        return temb

    def encode(self, h: torch.Tensor, temb: torch.Tensor, context, context_mask, depth: int | None = None):
        """h = conv_in(x) [B, c0, H, W] -> (mid-block output [B, c_last, H / 2^(n-1), W / 2^(n-1)],
        the skips: conv_in's output, every down resnet's (+ attention's), every downsampler's). With `depth`
        it stops once that many skips are made and returns (the last of them, the skips): the shallow
        part a feature cache's partial step runs (`denoisers.feature_cache`)."""
        skips = [h]
        ck = self.gradient_checkpointing and self.training

        def attend(attn, h):
            return run_block(attn, h, context, context_mask, checkpoint=ck)

        for level in self.down_blocks:
            for j, res in enumerate(level.resnets):
                h = run_block(res, h, temb, checkpoint=ck)
                if level.attentions is not None:
                    h = attend(level.attentions[j], h)
                skips.append(h)
                if len(skips) == depth:
                    return h, skips
            if level.downsamplers is not None:
                h = level.downsamplers[0](h)
                skips.append(h)
                if len(skips) == depth:
                    return h, skips

        if self.mid_block is not None:
            h = run_block(self.mid_block.resnets[0], h, temb, checkpoint=ck)
            if self.mid_block.attentions is not None:
                for attn, res in zip(self.mid_block.attentions, self.mid_block.resnets[1:]):
                    h = run_block(res, attend(attn, h), temb, checkpoint=ck)
        return h, skips


class UNet(UNetEncoder):
    """SD-compatible conditional UNet. ``forward(x, t, context, class_labels, context_mask)``; a
    ControlNet's residuals add to the skips and the mid-block output (``down_residuals``,
    ``mid_residual``), as in diffusers. ``feature_cache`` (a ``denoisers.feature_cache.FeatureCache``,
    set only while a cached sampling call runs) lets a forward reuse the deep features of an earlier one."""

    feature_cache = None

    @property
    def guidance_mode(self) -> str:
        """"distilled": an LCM student reads the guidance scale as an input (no CFG pair); else "cfg"."""
        return "distilled" if self.arch.time_cond_proj_dim else "cfg"

    def add_guidance_input(self, dim: int) -> None:
        """Make this UNet an LCM student: a guidance input `dim` wide (diffusers' time_cond_proj_dim) whose
        projection is zero, so the UNet still computes what it computed before, for every guidance."""
        if self.config.time_cond_proj_dim:
            raise ValueError(f"this UNet already has a guidance input ({self.config.time_cond_proj_dim} wide)")
        emb = self.time_embedding
        emb.cond_proj = nn.Linear(dim, emb.linear_1.in_features, bias=False).to(emb.linear_1.weight)
        nn.init.zeros_(emb.cond_proj.weight)  # zero: the student starts as its teacher
        self.config = self.arch = replace(self.config, time_cond_proj_dim=dim)

    def __init__(self, config: UNetConfig):
        super().__init__(config)
        self.config = c = config
        ch = c.block_out_channels
        n = len(ch)
        heads = c.heads
        depth = _per_level(c.transformer_layers_per_block, n, "transformer_layers_per_block")
        resnet, transformer = _makers(c)
        only_cross = _per_level(c.only_cross_attention, n, "only_cross_attention")

        self.up_blocks = nn.ModuleList()
        rch, rheads, rdepth, ronly = ch[::-1], heads[::-1], depth[::-1], only_cross[::-1]
        cout = rch[0]
        for i, kind in enumerate(c.up_block_types):
            prev, cout = cout, rch[i]
            skip_in = rch[min(i + 1, n - 1)]
            layers = c.layers_per_block + 1
            level = _Level()
            level.resnets = nn.ModuleList(
                resnet((prev if j == 0 else cout) + (skip_in if j == layers - 1 else cout), cout)
                for j in range(layers))
            level.attentions = (nn.ModuleList(transformer(cout, rheads[i], rdepth[i], ronly[i]) for _ in range(layers))
                                if kind == "CrossAttnUpBlock2D" else None)
            level.upsamplers = nn.ModuleList([Upsample2D(cout, cout)]) if i < n - 1 else None
            self.up_blocks.append(level)

        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, ch[0], eps=c.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], c.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t, context: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                down_residuals: Sequence[torch.Tensor] | None = None,
                mid_residual: torch.Tensor | None = None, pooled: torch.Tensor | None = None,
                time_ids: torch.Tensor | None = None, guidance=None) -> torch.Tensor:
        # x: [B, in_channels, h, w]; context: [B, L, cross_attention_dim]; SDXL: pooled [B, P], time_ids [B, k]
        self._check(x, context, class_labels, context_mask, pooled, time_ids)
        if context_mask is not None:
            context_mask = context_mask.to(device=x.device, dtype=torch.bool)
        temb = self.embed_time(x, t, class_labels, pooled, time_ids, guidance)
        cache = self.feature_cache
        partial = cache is not None and cache.begin(x)  # a partial step: the shallow layers only
        h, skips = self.encode(self.conv_in(x), temb, context, context_mask, cache.depth if partial else None)
        if partial:
            h = cache.features()
        if down_residuals is not None:  # diffusers: added after the whole down path, the mid block unchanged
            if len(down_residuals) != len(self.skip_channels):
                raise ValueError(f"{len(down_residuals)} residuals for {len(self.skip_channels)} skip connections: "
                                 "a ControlNet made for another UNet")
            skips = [s + r for s, r in zip(skips, down_residuals)]  # a partial step: the shallow skips' only
        if mid_residual is not None and not partial:  # a partial step's deep features are cached, residual and all
            h = h + mid_residual
        h = self.decode(h, skips, temb, context, context_mask, cache)
        return self.conv_out(F.silu(self.conv_norm_out(h)))

    def decode(self, h: torch.Tensor, skips: list, temb: torch.Tensor, context, context_mask,
               cache=None) -> torch.Tensor:
        """The up levels: each resnet concatenates the last skip, each upsampler goes to the next skip's size
        (odd sizes, e.g. 65 -> 33 -> 65, then line up). Given fewer skips than the down path makes (a feature
        cache's partial step), `h` is the cached input of the layer that takes the last of them and the
        deeper layers are skipped; `cache` records that input at a full step."""
        ck = self.gradient_checkpointing and self.training
        pos = len(self.skip_channels)  # the skip the next up resnet takes is skips[pos - 1]
        ran = len(skips) == pos  # a partial step starts part way, at the cached features
        for level in self.up_blocks:
            for j, res in enumerate(level.resnets):
                pos -= 1
                if pos >= len(skips):
                    continue  # a partial step: this layer's output is inside the cached features
                if cache is not None:
                    cache.record(pos, h)
                ran = True
                h = run_block(res, torch.cat([h, skips.pop()], dim=1), temb, checkpoint=ck)
                if level.attentions is not None:
                    h = run_block(level.attentions[j], h, context, context_mask, checkpoint=ck)
            if level.upsamplers is not None and ran:
                h = level.upsamplers[0](h, output_size=skips[-1].shape[-2:])
        return h
