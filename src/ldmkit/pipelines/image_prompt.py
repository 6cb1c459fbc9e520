"""IP-Adapters at sampling time: the loaded adapter with its image encoder, and an image prompt's tokens.

    pipe.load_ip_adapter("models/ip-adapter_sd15.safetensors", scale=0.6)   # image_encoder/ beside it
    pipe.text2img("a dog on the beach", image_prompt="dog.png")             # also img2img, inpaint

As diffusers' `load_ip_adapter` + `ip_adapter_image`: the image prompt is preprocessed by the encoder's
CLIPImageProcessor, embedded once per call, projected to tokens (`adapters.ip_adapter.encode_image`),
and every image of the call attends to them at the adapter's scale; the classifier-free-guidance
half sees the unconditional tokens. Several image prompts give their tokens side by side (diffusers'
list of images for one adapter). One IP-Adapter at a time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ldmkit.errors import UserError

SCALE_RANGE = (0.0, 2.0)


@dataclass
class Attached:
    """An IP-Adapter loaded into a pipeline: its layers sit in the UNet's cross-attention (attn2.processor)."""
    adapter: torch.nn.Module  # adapters.ip_adapter.IPAdapter
    encoder: torch.nn.Module  # transformers CLIPVisionModelWithProjection
    processor: Any  # transformers CLIPImageProcessor
    name: str
    hash: str = ""

    @property
    def scale(self) -> float:
        return self.adapter.scale

    def to(self, device=None, dtype=None) -> "Attached":
        self.adapter.to(device=device, dtype=dtype)
        self.encoder.to(device=device, dtype=dtype)
        return self

    def tokens(self, images: list) -> tuple[torch.Tensor, torch.Tensor]:
        """PIL images -> (tokens, unconditional tokens), each [1, len(images) * n, context width]."""
        from ldmkit.adapters.ip_adapter import encode_image

        pixels = self.processor(images, return_tensors="pt").pixel_values
        p = next(self.encoder.parameters())
        return encode_image(self.adapter, self.encoder, pixels.to(p.device, p.dtype))


def check_scale(scale, where: str) -> float:
    lo, hi = SCALE_RANGE
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not lo <= float(scale) <= hi:
        raise UserError(f"{where}: IP-Adapter scale {scale} is outside [{lo:g}, {hi:g}]")
    return float(scale)


def open_images(image_prompt) -> list:
    """The image prompts as a list of RGB PIL images (files opened)."""
    from PIL import Image

    from ldmkit.io.images import load_image

    items = list(image_prompt) if isinstance(image_prompt, (list, tuple)) else [image_prompt]
    if not items:
        raise UserError("the image prompt list is empty")
    out = []
    for im in items:
        if isinstance(im, Image.Image):
            out.append(im.convert("RGB"))
        elif isinstance(im, torch.Tensor):
            raise UserError("image prompts are PIL images or image files, not tensors")
        else:
            out.append(load_image(im, what="image prompt"))
    return out


def prepare(pipe, image_prompt) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, dict]:
    """The call's image-prompt tokens (cond, uncond) and their metadata, or (None, {})."""
    unit = pipe.ip_adapter
    if unit is None:
        if image_prompt is not None:
            raise UserError("an image prompt was given but no IP-Adapter is loaded (--ip-adapter)")
        return None, {}
    if image_prompt is None:
        raise UserError(f"IP-Adapter {unit.name} is loaded but no image prompt was given (--image-prompt)")
    tokens = unit.tokens(open_images(image_prompt))
    meta = {"ip_adapter": f"{unit.name}:{unit.scale:g}", "ip_adapter_hash": f"{unit.name}: {unit.hash}"}
    items = image_prompt if isinstance(image_prompt, (list, tuple)) else [image_prompt]
    names = [_name(im) for im in items]
    if all(names):
        meta["image_prompt"] = ", ".join(names)
    return tokens, meta


def _name(image) -> str | None:
    return Path(image).name if isinstance(image, (str, os.PathLike)) else None
