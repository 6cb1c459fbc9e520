"""Super-resolution with a concat-conditioned LDM (the LDM paper's SR models, SD's x4 upscaler).

The denoiser's input is [noisy latents, low-resolution image]: the low-resolution RGB image
(in [-1, 1]) is concatenated at the latent resolution, so the latent grid has the input's
size and the output is the input's size times the autoencoder's factor f (x4 for an f=4
autoencoder). Models whose denoiser has a class embedding and no class conditioning take the
low-resolution image's noise-augmentation level as that label (SD x4 upscaler: `noise_level`,
default from model_index.json "defaults", else 20); the image is then noised to that level of a
linear DDPM schedule, as the upscaler was trained.
"""
from __future__ import annotations

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
    labels = None
    has_labels = bool(getattr(pipe.denoiser.config, "num_class_embeds", None)) and pipe.conditioning != "class"
    if has_labels:
        level = int(noise_level if noise_level is not None else pipe.defaults.get("noise_level", 20))
        limit = pipe.denoiser.config.num_class_embeds
        if not 0 <= level < limit:
            raise ValueError(f"noise_level={level} is outside the allowed range [0, {limit - 1}]")
        if level > 0:
            from ldmkit.diffusion.forward import q_sample
            from ldmkit.diffusion.schedules import make_schedule

            g = torch.Generator("cpu").manual_seed(int(seed))
            lr = q_sample(make_schedule("linear", num_train_timesteps=limit), lr,
                          torch.randn(lr.shape, generator=g), torch.tensor([level]))
        labels = torch.tensor([level], device=pipe.device)
        noise_level = level
    elif noise_level is not None:
        raise ValueError("this upscaler has no noise-level input; do not pass noise_level")
    lr = lr.to(pipe.device, torch.float32)

    def inputs(idx):
        k = len(idx)
        return {"concat": lr.expand(k, -1, -1, -1),
                "labels": labels.expand(k) if labels is not None else None}

    return pipe.generate("upscale", s, conditions, negative_prompt, int(seed), inputs,
                         {"noise_level": noise_level, "input_size": f"{w}x{h}"})
