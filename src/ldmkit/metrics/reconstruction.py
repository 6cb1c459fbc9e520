"""Reconstruction metrics: PSNR, SSIM (Wang et al. 2004) and LPIPS, per image, in torch.

All functions take two image batches [B, C, H, W] on the same scale and return
one value per image ([B]). PSNR and SSIM expect [0, 1] images by default
(`data_range=1.0`; 255 for uint8 values): SSIM is scale- but not
offset-invariant, so library images in [-1, 1] are mapped with `to_unit`
first, which is what `ldm eval-autoencoder` reports. LPIPS takes [-1, 1].

SSIM follows Wang et al.: an 11x11 Gaussian window with sigma 1.5,
K1 = 0.01, K2 = 0.03, population (not sample) covariances, the map averaged
over the "valid" region (no padding) and over channels. This is exactly
scikit-image's `structural_similarity(..., gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=...)`, whose reflect-padded border is
cropped before averaging.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] library images -> [0, 1], clamped."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"expected two [B, C, H, W] batches of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image: 10 log10(range^2 / MSE)."""
    _check_pair(x, y)
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(data_range ** 2 / mse.clamp_min(1e-20))).float()


def _gaussian_window(size: int, sigma: float, device, dtype) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Mean structural similarity per image (see module docstring)."""
    _check_pair(x, y)
    b, c, h, w = x.shape
    if h < window_size or w < window_size:
        raise ValueError(f"image size {h}x{w} is smaller than the SSIM window {window_size}")
    x, y = x.double(), y.double()
    g = _gaussian_window(window_size, sigma, x.device, x.dtype)
    # Separable Gaussian filter applied per channel ("valid" region only).
    kh = g.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    kw = g.view(1, 1, 1, -1).expand(c, 1, 1, -1)

    def blur(t):
        return F.conv2d(F.conv2d(t, kh, groups=c), kw, groups=c)

    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x ** 2
    syy = blur(y * y) - mu_y ** 2
    sxy = blur(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1).float()


def load_lpips(vgg_weights: str | None = None, device="cpu"):
    """The LPIPS(VGG16) network, or None (with a one-time warning) when the VGG16
    backbone weights are not available. See ldmkit.autoencoder.losses.LPIPS."""
    from ldmkit.autoencoder.losses import LPIPS

    return LPIPS.from_pretrained(vgg_weights, device=device)


@torch.no_grad()
def lpips(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS distance per image with a network from `load_lpips` (inputs in [-1, 1])."""
    _check_pair(x, y)
    return model(x, y).flatten().float()


def summarize(values: list[float]) -> dict:
    """Mean and standard error of a list of per-image values."""
    n = len(values)
    if n == 0:
        return {"mean": math.nan, "stderr": math.nan, "n": 0}
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / max(n - 1, 1)
    return {"mean": mean, "stderr": math.sqrt(var / n), "n": n}
