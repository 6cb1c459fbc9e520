"""Stage 1: the perceptual autoencoder (Stable Diffusion's AutoencoderKL layout, KL or VQ bottleneck).

    x [B,3,H,W] ─ Encoder ─ quant_conv ─▶ posterior (KL: mean/logvar; VQ: pre-quant latent)
    z [B,c,H/f,W/f] ─ (VQ: quantize) ─ post_quant_conv ─ Decoder ─▶ x_rec

f = 2^(len(ch_mult) - 1). The encoder has one down block per ch_mult entry
(num_res_blocks resnets, then a stride-2 conv except in the last block), a
mid block (resnet, single-head self-attention, resnet), GroupNorm + SiLU and a
conv to 2c (KL, "double z") or c (VQ) channels. The decoder mirrors it with
num_res_blocks + 1 resnets per up block.

Key map: parameter names are diffusers' AutoencoderKL names, so a diffusers
VAE state dict loads with the identity map:
    encoder.conv_in, encoder.down_blocks.{i}.resnets.{j}.{norm1,conv1,norm2,conv2,conv_shortcut},
    encoder.down_blocks.{i}.downsamplers.0.conv, encoder.mid_block.resnets.{0,1},
    encoder.mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0},
    encoder.conv_norm_out, encoder.conv_out, quant_conv, post_quant_conv,
    decoder.conv_in, decoder.mid_block..., decoder.up_blocks.{i}.resnets.{j},
    decoder.up_blocks.{i}.upsamplers.0.conv, decoder.conv_norm_out, decoder.conv_out.
Like diffusers, decoder.up_blocks[0] is the lowest-resolution block (reversed
order with respect to ch_mult). The VQ codebook is `quantize.embedding.weight`
(diffusers' VQModel name).

Latents for stage 2: `encode_latents` returns (z - shift_factor) * scaling_factor
and `decode_latents` undoes it; the factors live in the config (computed after
training by `ldmkit.autoencoder.evaluation.latent_statistics`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ldmkit.autoencoder.bottlenecks import DiagonalGaussian, VectorQuantizer
from ldmkit.nn import AttentionBlock2D, Downsample2D, ResnetBlock2D, Upsample2D


MAX_CHANNELS = 65536  # the most channels (image, latent or feature) a config may ask for


@dataclass(frozen=True)
class AutoencoderConfig:
    kind: str = "kl"                      # "kl" (diagonal Gaussian) or "vq" (vector quantiser)
    in_channels: int = 3
    out_channels: int = 3
    channels: int = 128                   # base width; block i has channels * ch_mult[i]
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    latent_channels: int = 4              # c (z_channels; = code dimension d for VQ)
    norm_groups: int = 32
    mid_attention: bool = True
    dropout: float = 0.0
    # VQ only
    num_codes: int = 8192
    vq_beta: float = 0.25
    vq_ema: bool = False
    vq_ema_decay: float = 0.99
    vq_l2_normalize: bool = False
    vq_restart_after: int = 0
    # Latent normalisation used by stage 2: z_diffusion = (z - shift_factor) * scaling_factor
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    sample_size: int = 256                # training resolution (informative)
    # 1x1 convolutions around the bottleneck (diffusers' names); SD3 / FLUX autoencoders have neither
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    def __post_init__(self):
        self._check_values()
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        if self.kind not in ("kl", "vq"):
            raise ValueError(f"kind={self.kind!r}: must be 'kl' or 'vq'")
        if not 1 <= len(self.ch_mult) <= 6:
            raise ValueError(f"ch_mult={self.ch_mult}: needs 1..6 entries (f = 2^(len-1), m in 0..5)")
        if any(m < 1 for m in self.ch_mult) or self.channels < 1:
            raise ValueError(f"channels={self.channels}, ch_mult={self.ch_mult}: all must be >= 1")
        for w in {self.channels * m for m in self.ch_mult}:
            if w % self.norm_groups:
                raise ValueError(f"norm_groups={self.norm_groups} does not divide block width {w}")
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks={self.num_res_blocks}: must be >= 1")
        if self.latent_channels < 1:
            raise ValueError(f"latent_channels={self.latent_channels}: must be >= 1")
        if self.scaling_factor <= 0:
            raise ValueError(f"scaling_factor={self.scaling_factor}: must be > 0")

    def _check_values(self) -> None:
        """Types and sane ranges of every field (a config read from JSON may hold anything)."""
        from ldmkit.errors import check_int, check_ints, check_number, check_str

        check_str("kind", self.kind, ("kl", "vq"))
        for name in ("in_channels", "out_channels", "channels", "latent_channels", "norm_groups"):
            check_int(name, getattr(self, name), 1, MAX_CHANNELS)
        check_ints("ch_mult", self.ch_mult, 1, 64, max_len=64)  # the count (1..6) is checked below
        widest = self.channels * max(self.ch_mult)
        if widest > MAX_CHANNELS:
            raise ValueError(f"channels={self.channels} x ch_mult={tuple(self.ch_mult)} gives {widest} channels; "
                             f"at most {MAX_CHANNELS} are allowed")
        check_int("num_res_blocks", self.num_res_blocks, 1, 64)
        check_int("num_codes", self.num_codes, 1, 1 << 24)
        check_int("vq_restart_after", self.vq_restart_after, 0, 1 << 40)
        check_int("sample_size", self.sample_size, 1, 1 << 16, optional=True)
        check_number("dropout", self.dropout, 0.0, 1.0, hi_open=True)
        check_number("vq_beta", self.vq_beta, 0.0)
        check_number("vq_ema_decay", self.vq_ema_decay, 0.0, 1.0)
        check_number("scaling_factor", self.scaling_factor, 0.0, lo_open=True)
        check_number("shift_factor", self.shift_factor)
        for name in ("mid_attention", "vq_ema", "vq_l2_normalize"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


PRESETS: dict[str, AutoencoderConfig] = {
    # Stable Diffusion's VAE (and the LDM paper's kl-f8); 0.18215 is SD's scaling factor.
    "kl-f8": AutoencoderConfig(kind="kl", channels=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2,
                               latent_channels=4, scaling_factor=0.18215),
    "kl-f4": AutoencoderConfig(kind="kl", channels=128, ch_mult=(1, 2, 4), num_res_blocks=2,
                               latent_channels=3),
    # SD3's / FLUX.1's: 16 latent channels, no 1x1 convolutions around the bottleneck (SD3's factors; `ldm
    # train-autoencoder` measures its own scaling factor).
    "kl-f8-c16": AutoencoderConfig(kind="kl", channels=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2,
                                   latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                                   use_quant_conv=False, use_post_quant_conv=False),
    "tiny-kl-f4-c16": AutoencoderConfig(kind="kl", channels=16, ch_mult=(1, 2, 4), num_res_blocks=1,
                                        latent_channels=16, norm_groups=8, sample_size=32, use_quant_conv=False,
                                        use_post_quant_conv=False),
    "vq-f4": AutoencoderConfig(kind="vq", channels=128, ch_mult=(1, 2, 4), num_res_blocks=2,
                               latent_channels=3, num_codes=8192),
    "vq-f8": AutoencoderConfig(kind="vq", channels=128, ch_mult=(1, 2, 2, 4), num_res_blocks=2,
                               latent_channels=4, num_codes=16384),
    # Small models for CPU tests and the demo (32x32 images train in minutes on 2 cores).
    # Narrow at full resolution (16 channels), wider at the latent (64): ~0.2 CPU-s per
    # forward+backward of a 16x32x32 batch on one core.
    "tiny-kl-f4": AutoencoderConfig(kind="kl", channels=16, ch_mult=(1, 2, 4), num_res_blocks=1,
                                    latent_channels=4, norm_groups=8, sample_size=32),
    "tiny-kl-f8": AutoencoderConfig(kind="kl", channels=16, ch_mult=(1, 2, 4, 4), num_res_blocks=1,
                                    latent_channels=4, norm_groups=8, sample_size=64),
    "tiny-vq-f4": AutoencoderConfig(kind="vq", channels=16, ch_mult=(1, 2, 4), num_res_blocks=1,
                                    latent_channels=4, norm_groups=8, num_codes=256,
                                    vq_ema=True, vq_restart_after=100, sample_size=32),
}


class _DownBlock(nn.Module):
    def __init__(self, cin: int, cout: int, n: int, downsample: bool, groups: int, dropout: float):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(cin if j == 0 else cout, cout, groups=groups, eps=1e-6, dropout=dropout)
            for j in range(n))
        self.downsamplers = nn.ModuleList([Downsample2D(cout, padding=0)]) if downsample else None

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class _UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, n: int, upsample: bool, groups: int, dropout: float):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(cin if j == 0 else cout, cout, groups=groups, eps=1e-6, dropout=dropout)
            for j in range(n))
        self.upsamplers = nn.ModuleList([Upsample2D(cout)]) if upsample else None

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class _MidBlock(nn.Module):
    def __init__(self, ch: int, groups: int, attention: bool, dropout: float):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(ch, ch, groups=groups, eps=1e-6, dropout=dropout)
                                     for _ in range(2))
        self.attentions = nn.ModuleList([AttentionBlock2D(ch, groups=groups, eps=1e-6)] if attention else [])

    def forward(self, x):
        x = self.resnets[0](x)
        for a in self.attentions:
            x = a(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    def __init__(self, c: AutoencoderConfig):
        super().__init__()
        widths = [c.channels * m for m in c.ch_mult]
        self.conv_in = nn.Conv2d(c.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            _DownBlock(widths[max(i - 1, 0)], widths[i], c.num_res_blocks, i < len(widths) - 1,
                       c.norm_groups, c.dropout)
            for i in range(len(widths)))
        self.mid_block = _MidBlock(widths[-1], c.norm_groups, c.mid_attention, c.dropout)
        self.conv_norm_out = nn.GroupNorm(c.norm_groups, widths[-1], eps=1e-6)
        self.conv_act = nn.SiLU()
        out = 2 * c.latent_channels if c.kind == "kl" else c.latent_channels
        self.conv_out = nn.Conv2d(widths[-1], out, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, c: AutoencoderConfig):
        super().__init__()
        widths = [c.channels * m for m in reversed(c.ch_mult)]  # lowest resolution first
        self.conv_in = nn.Conv2d(c.latent_channels, widths[0], 3, padding=1)
        self.mid_block = _MidBlock(widths[0], c.norm_groups, c.mid_attention, c.dropout)
        self.up_blocks = nn.ModuleList(
            _UpBlock(widths[max(i - 1, 0)], widths[i], c.num_res_blocks + 1, i < len(widths) - 1,
                     c.norm_groups, c.dropout)
            for i in range(len(widths)))
        self.conv_norm_out = nn.GroupNorm(c.norm_groups, widths[-1], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(widths[-1], c.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class Autoencoder(nn.Module):
    """KL or VQ autoencoder built from an `AutoencoderConfig` (see module docstring for the key map)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        c = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        moments = 2 * c if config.kind == "kl" else c
        self.quant_conv = nn.Conv2d(moments, moments, 1) if config.use_quant_conv else nn.Identity()
        self.post_quant_conv = nn.Conv2d(c, c, 1) if config.use_post_quant_conv else nn.Identity()
        if config.kind == "vq":
            self.quantize = VectorQuantizer(
                config.num_codes, c, beta=config.vq_beta, use_ema=config.vq_ema,
                ema_decay=config.vq_ema_decay, l2_normalize=config.vq_l2_normalize,
                restart_after=config.vq_restart_after)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "Autoencoder":
        if name not in PRESETS:
            raise ValueError(f"unknown autoencoder preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(replace(PRESETS[name], **overrides))

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the decoder's last conv: where the adaptive GAN weight is measured."""
        return self.decoder.conv_out.weight

    def _check_input(self, x: torch.Tensor) -> None:
        f = self.downsample_factor
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected images [B, {self.config.in_channels}, H, W], got shape {tuple(x.shape)}")
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"image size {tuple(x.shape[-2:])} must be divisible by the downsample factor {f}")

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        self._check_input(x)
        h = self.quant_conv(self.encoder(x))
        if self.config.kind == "kl":
            return DiagonalGaussian.from_moments(h)
        return DiagonalGaussian(h)  # VQ: the pre-quantisation latent, std 0

    def quantize_latents(self, z: torch.Tensor):
        """VQ only: (z_q, vq_loss, info). For KL returns z unchanged with zero loss."""
        if self.config.kind == "kl":
            return z, z.new_zeros(()), {}
        return self.quantize(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"expected latents [B, {self.latent_channels}, h, w], got shape {tuple(z.shape)}")
        z, _, _ = self.quantize_latents(z)
        return self.decoder(self.post_quant_conv(z.to(self.decoder.conv_in.weight.dtype)))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True):
        """Training pass: returns (x_rec, aux) with aux keys `kl` ([B], KL only),
        `vq_loss`, `perplexity`, `usage` (VQ only) and `posterior`."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        z_q, vq_loss, info = self.quantize_latents(z)
        x_rec = self.decoder(self.post_quant_conv(z_q.to(self.decoder.conv_in.weight.dtype)))
        aux = {"posterior": posterior}
        if self.config.kind == "kl":
            aux["kl"] = posterior.kl()
        else:
            aux.update(vq_loss=vq_loss, perplexity=info["perplexity"], usage=info["usage"],
                       indices=info["indices"])
        return x_rec, aux

    def encode_latents(self, x: torch.Tensor, generator: torch.Generator | None = None,
                       sample: bool = True) -> torch.Tensor:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(z / self.config.scaling_factor + self.config.shift_factor)
