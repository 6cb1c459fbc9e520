"""Super-resolution with a concat-conditioned LDM (the LDM paper's SR models, SD's x4 upscaler).

The denoiser's input is [noisy latents, low-resolution image]: the low-resolution RGB image
(in [-1, 1]) is concatenated at the latent resolution, so the latent grid has the input's
size and the output is the input's size times the autoencoder's factor f (x4 for an f=4
autoencoder). Models whose denoiser has a class embedding and no class conditioning take the
low-resolution image's noise-augmentation level as that label (SD x4 upscaler: `noise_level`,
default from model_index.json "defaults", else 20); the image is then noised to that level:

- diffusers' x4 upscaler (defaults "low_res_schedule", from its low_res_scheduler): as its pipeline
  does, `low_res_scheduler.add_noise(image, noise, noise_level)` on that schedule's betas (scaled-linear
  in the real model), at every level including 0, and levels above defaults "max_noise_level" (350)
  are refused;
- ldmkit's own upscalers: a linear DDPM schedule with one step per class, level 0 = unchanged, as
  `ldm train --spatial upscale` trained them (`conditioning.spatial.augment_low_res`).

Noise order, as diffusers': image i's generator (seed + i) first draws the low-res image's noise
([3, h, w]), then the starting latents; so with one image, `seed` gives the image diffusers'
`pipe(..., generator=torch.Generator().manual_seed(seed))` gives.
"""
from __future__ import annotations

import operator

import torch

from ldmkit.pipelines.base import PipelineCore, Result


def _low_res(image) -> torch.Tensor:
    """PIL / path / tensor [3,h,w] or [1,3,h,w] in [-1,1] -> [1,3,h,w], at its own size."""
    from PIL import Image

    from ldmkit.io.images import load_image, pil_to_tensor

    if isinstance(image, torch.Tensor):
        x = (image if image.dim() == 4 else image[None]).float()
    else:
        x = pil_to_tensor((image if isinstance(image, Image.Image) else load_image(image)).convert("RGB"))[None]
    if x.dim() != 4 or x.shape[:2] != (1, 3):
        raise ValueError(f"low-resolution image must be one RGB image, got shape {tuple(x.shape)}")
    return x


def upscale(pipe: PipelineCore, image, prompt=None, *, negative_prompt=None, class_label=None, num: int = 1,
            seed: int = 0, noise_level: int | None = None, **settings) -> list[Result]:
    pipe.require_task("upscale")
    for k in ("height", "width"):
        if settings.get(k) is not None:
            raise ValueError(f"upscale sets the output size itself (input size x {pipe.factor}); do not pass {k}")
        settings.pop(k, None)
    extra = pipe.denoiser.config.in_channels - pipe.latent_channels
    if extra != 3:
        raise ValueError(f"upscale expects 3 low-resolution RGB channels concatenated to the latents; "
                         f"this denoiser takes {extra} extra channels")
    lr = _low_res(image)
    h, w = lr.shape[-2:]
    if pipe.is_dit and (h % pipe.denoiser.config.patch_size or w % pipe.denoiser.config.patch_size):
        raise ValueError(f"input size {w}x{h} must be a multiple of the DiT patch size "
                         f"{pipe.denoiser.config.patch_size}")
    if num < 1:
        raise ValueError(f"num={num} must be >= 1")
    s = pipe.settings(height=h * pipe.factor, width=w * pipe.factor, **settings)
    conditions = pipe.conditions(prompt, class_label, num)
    has_labels = bool(getattr(pipe.denoiser.config, "num_class_embeds", None)) and pipe.conditioning != "class"
    labels = augment = None
    if has_labels:
        noise_level, augment = _noise_augmentation(pipe, noise_level)
        labels = torch.tensor([noise_level], device=pipe.device)
    elif noise_level is not None:
        raise ValueError("this upscaler has no noise-level input; do not pass noise_level")

    def inputs(idx):
        k = len(idx)

        def concat(generators):  # the low-res noise comes first from each image's generator
            noise = torch.stack([torch.randn(tuple(lr.shape[1:]), generator=g) for g in generators])
            low = augment(lr.expand(k, -1, -1, -1), noise) if augment is not None else lr.expand(k, -1, -1, -1)
            return low.to(pipe.device, torch.float32)

        return {"concat": concat, "labels": labels.expand(k) if labels is not None else None}

    return pipe.generate("upscale", s, conditions, negative_prompt, int(seed), inputs,
                         {"noise_level": noise_level, "input_size": f"{w}x{h}"})


def _noise_augmentation(pipe: PipelineCore, noise_level) -> tuple:
    """(the checked noise level, f(low, noise) -> the noised low-res image) of a noise-level upscaler."""
    from ldmkit.diffusion.forward import q_sample
    from ldmkit.diffusion.schedules import make_schedule, schedule_from_dict

    d = pipe.defaults
    raw = noise_level if noise_level is not None else d.get("noise_level", 20)
    try:
        level = None if isinstance(raw, bool) else operator.index(raw)  # ints, numpy ints
    except TypeError:
        level = None
    if level is None:
        raise ValueError(f"noise_level={raw!r} must be an integer")
    limit = pipe.denoiser.config.num_class_embeds
    if not 0 <= level < limit:
        raise ValueError(f"noise_level={level} is outside the allowed range [0, {limit - 1}]")
    top = d.get("max_noise_level")
    if top is not None and level > top:
        raise ValueError(f"noise_level={level} is above this upscaler's max_noise_level={top} "
                         "(model_index.json), the highest level diffusers' pipeline accepts")
    if d.get("low_res_schedule"):  # diffusers' x4 upscaler: its low_res_scheduler.add_noise, at any level
        schedule = schedule_from_dict(d["low_res_schedule"])
        if level >= schedule.num_train_timesteps:
            raise ValueError(f"noise_level={level} is outside the low-res schedule's "
                             f"[0, {schedule.num_train_timesteps - 1}]")
        return level, lambda low, noise: q_sample(schedule, low, noise, torch.tensor([level]))
    if level == 0:  # ldmkit's upscalers were trained with level 0 = the clean image
        return level, None
    schedule = make_schedule("linear", num_train_timesteps=limit)
    return level, lambda low, noise: q_sample(schedule, low, noise, torch.tensor([level]))
