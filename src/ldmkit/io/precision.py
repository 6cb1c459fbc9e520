"""Half precision for Stable Diffusion weights: what may run in fp16/bf16, and the VAE safety net.

SD's VAE decoder overflows in float16 on many latents: activations in its last
up blocks exceed 65504, giving inf, then NaN, then a black image. Two remedies:

- *upcast*: keep the autoencoder in float32 while the UNet and text encoder run
  in float16 (`ldmkit.io` loaders do this when the VAE config says
  `force_upcast`, as SD's does; `upcast_vae=False` turns it off);
- *retry*: `decode_checked` decodes in the autoencoder's own dtype, and if the
  image holds NaN/inf, warns and decodes again in float32.

bfloat16 has float32's range, so it does not overflow; the retry still guards it.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

HALF = (torch.float16, torch.bfloat16)


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def decode_checked(autoencoder: torch.nn.Module, z: torch.Tensor,
                   decode: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """`decode(autoencoder, z)` (default: `autoencoder.decode_latents(z)`) in the autoencoder's dtype;
    if that gives NaN/inf in half precision, warn and decode again with the autoencoder in float32.

    The autoencoder is returned to its dtype afterwards; the result is float32 after a retry.
    """
    decode = decode or (lambda ae, latents: ae.decode_latents(latents))
    dtype = module_dtype(autoencoder)
    with torch.no_grad():
        x = decode(autoencoder, z.to(dtype))
    if dtype not in HALF or bool(torch.isfinite(x).all()):
        return x
    bad = int((~torch.isfinite(x)).sum())
    warnings.warn(f"autoencoder decode in {str(dtype).removeprefix('torch.')} gave {bad} NaN/inf values "
                  "(Stable Diffusion's VAE overflows in float16); decoding again in float32", RuntimeWarning,
                  stacklevel=2)
    autoencoder.to(torch.float32)
    try:
        with torch.no_grad():
            x = decode(autoencoder, z.to(torch.float32))
    finally:
        autoencoder.to(dtype)
    return x
