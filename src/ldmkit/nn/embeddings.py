"""Sinusoidal timestep embeddings and the MLP that lifts them to the network width."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(
    t: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    max_period: float = 10000.0,
    scale: float = 1.0,
) -> torch.Tensor:
    """[B] timesteps (any real values) -> [B, dim] sinusoids at geometrically spaced frequencies.

    Matches diffusers' get_timestep_embedding: frequencies exp(-ln(max_period) * i / (half - shift)),
    [sin, cos] halves, swapped to [cos, sin] when flip_sin_to_cos.
    """
    if t.ndim == 0:
        t = t[None]
    if t.ndim != 1:
        raise ValueError(f"timesteps must be a scalar or 1-D tensor, got shape {tuple(t.shape)}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - downscale_freq_shift))
    args = scale * t[:, None].float() * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear (`linear_1`, `linear_2`, as diffusers names them); with `cond_proj_dim`
    a condition (LCM's guidance features) is projected (`cond_proj`, no bias) and added to the input."""

    def __init__(self, in_channels: int, time_embed_dim: int, out_dim: int | None = None,
                 cond_proj_dim: int | None = None):
        super().__init__()
        self.cond_proj = nn.Linear(cond_proj_dim, in_channels, bias=False) if cond_proj_dim else None
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, out_dim or time_embed_dim)

    def forward(self, emb: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            emb = emb + self.cond_proj(condition.to(emb.dtype))
        return self.linear_2(F.silu(self.linear_1(emb)))


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """[B] guidance weights -> [B, dim] sinusoids of 1000 w (sin half, then cos half; LCM's
    `get_guidance_scale_embedding`, float32). LCM students read w = guidance scale - 1."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    args = (w.float() * 1000.0)[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


POSITION_FREQUENCIES = 3


def position_features(h: int, w: int, device=None, dtype=None, freqs: int = POSITION_FREQUENCIES) -> torch.Tensor:
    """[2 + 4 * freqs, h, w] Fourier features of the pixel centre coordinates, normalised to [-1, 1]
    per axis: x, y, then sin / cos of pi * k * x / 2 and pi * k * y / 2 for k = 1..freqs. Normalised
    coordinates keep their meaning ("left half") when a model samples at another size than it
    was trained at."""
    ys = torch.linspace(-1.0, 1.0, h, device=device, dtype=torch.float32)
    xs = torch.linspace(-1.0, 1.0, w, device=device, dtype=torch.float32)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    feats = [xx, yy]
    for k in range(1, freqs + 1):
        for v in (xx, yy):
            feats += [torch.sin(math.pi * k * v / 2), torch.cos(math.pi * k * v / 2)]
    return torch.stack(feats).to(dtype or torch.float32)


class PositionInjection(nn.Module):
    """Adds a learned 1x1 projection of :func:`position_features` to a feature map [B, C, H, W].
    The projection starts at zero, so a fresh layer leaves the network's function unchanged."""

    def __init__(self, channels: int, freqs: int = POSITION_FREQUENCIES):
        super().__init__()
        self.freqs = freqs
        self.proj = nn.Conv2d(2 + 4 * freqs, channels, 1, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = position_features(x.shape[-2], x.shape[-1], x.device, x.dtype, self.freqs)
        return x + self.proj(feats[None])

    def hook(self, module: nn.Module, args: tuple) -> tuple:
        """As a forward pre-hook: the hooked module's first input gets the position features added."""
        return (self(args[0]), *args[1:])
