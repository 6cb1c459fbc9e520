"""Inpainting: regenerate the white part of a mask, keep the rest.

Two ways, chosen by the model:

* any model (``concat`` null in model_index.json) -- re-noise and blend: after every sampler step
  the latents outside the mask are replaced by the input's latents noised to the step's level
  (`noise_to` with the same noise the sample started from), and at the end by the clean input
  latents. A latent cell is regenerated when any of its f x f pixels is masked (max-pool), so
  every masked pixel changes; pixels outside the mask equal the autoencoder reconstruction of the
  input except within the decoder's reach of the mask border.
* concat-conditioned inpainting models (``concat: "inpaint"``, e.g. SD 1.5 inpainting, 9 input
  channels) -- the denoiser sees [latents, mask at latent size, latents of the masked image]
  (masked pixels set to 0, i.e. grey) and fills the hole itself; blending is off unless
  ``blend=True``.

The mask is a grey image of the input's size: white (>= 128) = repaint, black = keep.
`strength` < 1 keeps some of the masked region's content (as img2img).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ldmkit.pipelines import control, image_prompt as ip
from ldmkit.pipelines.base import PipelineCore, Result, image_count, latent_mask
from ldmkit.pipelines.img2img import check_strength, image_tensor


def mask_tensor(mask, size: tuple[int, int]) -> torch.Tensor:
    """PIL / path / tensor mask -> [1,1,H,W] in {0,1} (1 = repaint); must match the image's size (w, h)."""
    from PIL import Image

    from ldmkit.io.images import load_image

    if isinstance(mask, torch.Tensor):
        m = mask.float()
        while m.dim() < 4:
            m = m[None]
        if m.shape[1] != 1:
            m = m.mean(1, keepdim=True)
        got = (m.shape[-1], m.shape[-2])
        if got != tuple(size):
            raise ValueError(f"mask size {got[0]}x{got[1]} does not match the image size {size[0]}x{size[1]}")
        return (m >= 0.5).float()
    pil = mask if isinstance(mask, Image.Image) else load_image(mask, mode="L")
    if pil.size != tuple(size):
        raise ValueError(f"mask size {pil.size[0]}x{pil.size[1]} does not match the image size "
                         f"{size[0]}x{size[1]}; the mask must have the input image's size")
    m = torch.frombuffer(bytearray(pil.convert("L").tobytes()), dtype=torch.uint8).float()
    return (m.reshape(1, 1, pil.size[1], pil.size[0]) >= 128).float()


def _input_size(image) -> tuple[int, int]:
    from PIL import Image

    from ldmkit.io.images import load_image

    if isinstance(image, torch.Tensor):
        return image.shape[-1], image.shape[-2]
    return (image if isinstance(image, Image.Image) else load_image(image)).size


def inpaint(pipe: PipelineCore, image, mask, prompt=None, *, strength: float = 1.0, blend: bool | None = None,
            negative_prompt=None, class_label=None, num: int | None = None, seed: int = 0,
            height: int | None = None, width: int | None = None, control_image=None, guess_mode: bool = False,
            control_fit: str = "stretch", image_prompt=None, **settings) -> list[Result]:
    pipe.require_task("inpaint")
    strength = check_strength(strength)
    size = _input_size(image)
    m = mask_tensor(mask, size)
    x, h, w = image_tensor(pipe, image, height, width)
    if (m.shape[-2], m.shape[-1]) != (h, w):
        m = (F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False) >= 0.5).float()
    n = image_count(prompt, num)
    s = pipe.settings(height=h, width=w, **settings)
    conditions = pipe.conditions(prompt, class_label, n)
    z0 = pipe.encode(x)
    concat = None
    if pipe.concat == "inpaint":
        lat = (h // pipe.factor, w // pipe.factor)
        m_small = F.interpolate(m, size=lat, mode="nearest").to(pipe.device)
        masked = pipe.encode(x * (1 - m))
        concat = torch.cat([m_small, masked], dim=1)
    blend = (pipe.concat != "inpaint") if blend is None else bool(blend)
    m_lat = latent_mask(m, pipe.factor).to(pipe.device) if blend else None

    images, meta = control.prepare(pipe, control_image, h, w, guess_mode, control_fit)
    tokens, ip_meta = ip.prepare(pipe, image_prompt)
    meta.update(ip_meta)

    def inputs(idx):
        k = len(idx)
        out = {"z0": z0.expand(k, -1, -1, -1), "strength": strength}
        if images:
            out.update(control=images, guess_mode=guess_mode)
        if tokens:
            out["image_tokens"] = tokens
        if m_lat is not None:
            out["mask"] = m_lat.expand(k, -1, -1, -1)
        if concat is not None:
            out["concat"] = concat.expand(k, -1, -1, -1)
        return out

    mode = "concat" if pipe.concat == "inpaint" else "blend"
    return pipe.generate("inpaint", s, conditions, negative_prompt, int(seed), inputs,
                         {"strength": strength, "inpaint_mode": mode + ("+blend" if blend and mode == "concat" else ""),
                          **meta})
