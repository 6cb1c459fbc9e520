"""Image-to-image (SDEdit, Meng et al. 2022): encode, noise to a strength, denoise with a new prompt.

strength s in [0, 1] skips the first steps - int(steps * s) sampler steps: the input's latents
are put at the noise level of the first step that runs (`noise_to`) and the rest of the
schedule runs as usual. s = 0 runs no step and returns the input's autoencoder
reconstruction; s = 1 ignores the input and starts from pure noise, exactly as text-to-image
with the same seed. The input is encoded with the posterior mode (deterministic; `posterior=
"sample"` draws from the posterior as diffusers and A1111 do) and resized to the requested
height/width (default: its own size rounded down to the size multiple).
"""
from __future__ import annotations

import torch

from ldmkit.pipelines import control, image_prompt as ip
from ldmkit.pipelines.base import PipelineCore, Result, image_count


def check_strength(strength) -> float:
    s = float(strength)
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"strength={strength} is outside the allowed range [0, 1]")
    return s


def image_tensor(pipe: PipelineCore, image, height: int | None, width: int | None, what: str = "image"):
    """PIL image / path / tensor [3,H,W] or [1,3,H,W] in [-1,1] -> ([1,3,h,w], h, w) at a valid size."""
    from PIL import Image

    from ldmkit.io.images import load_image, pil_to_tensor

    if isinstance(image, torch.Tensor):
        x = image if image.dim() == 4 else image[None]
        x = x.float()
        size = (x.shape[-1], x.shape[-2])
    else:
        pil = image if isinstance(image, Image.Image) else load_image(image)
        pil = pil.convert("RGB")
        x, size = None, pil.size
    m = pipe.size_multiple
    w = width or max(m, size[0] // m * m)
    h = height or max(m, size[1] // m * m)
    if x is None:
        if (w, h) != pil.size:
            pil = pil.resize((w, h), Image.LANCZOS)
        x = pil_to_tensor(pil)[None]
    elif (x.shape[-2], x.shape[-1]) != (h, w):
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", align_corners=False).clamp(-1, 1)
    if x.shape[1] != 3:
        raise ValueError(f"{what} must have 3 channels, got {x.shape[1]}")
    return x, h, w


def img2img(pipe: PipelineCore, image, prompt=None, *, strength: float = 0.75, negative_prompt=None,
            class_label=None, num: int | None = None, seed: int = 0, height: int | None = None,
            width: int | None = None, control_image=None, guess_mode: bool = False, control_fit: str = "stretch",
            image_prompt=None, posterior: str = "mode", **settings) -> list[Result]:
    """`posterior`: "mode" encodes the image deterministically; "sample" draws the latents from the
    autoencoder's posterior with each image's generator before its starting noise -- what diffusers'
    and AUTOMATIC1111's img2img do, so the same seed gives their image."""
    pipe.require_task("img2img")
    strength = check_strength(strength)
    if posterior not in ("mode", "sample"):
        raise ValueError(f"posterior={posterior!r} must be 'mode' or 'sample'")
    x, h, w = image_tensor(pipe, image, height, width)
    n = image_count(prompt, num)
    s = pipe.settings(height=h, width=w, **settings)
    conditions = pipe.conditions(prompt, class_label, n)
    z0 = pipe.encode(x)
    if posterior == "sample":  # drawn in sample_latents from the images' generators, before their noise
        def z0_of(idx):
            return lambda gens: torch.cat([pipe.encode(x, generator=g) for g in gens])
    else:
        def z0_of(idx):
            return z0.expand(len(idx), -1, -1, -1)

    images, meta = control.prepare(pipe, control_image, h, w, guess_mode, control_fit)
    tokens, ip_meta = ip.prepare(pipe, image_prompt)
    meta.update(ip_meta)

    def inputs(idx):
        out = {"z0": z0_of(idx), "strength": strength}
        if tokens:
            out["image_tokens"] = tokens
        return {**out, "control": images, "guess_mode": guess_mode} if images else out

    extra = {"strength": strength, **({"posterior": "sample"} if posterior == "sample" else {}), **meta}
    return pipe.generate("img2img", s, conditions, negative_prompt, int(seed), inputs, extra)
