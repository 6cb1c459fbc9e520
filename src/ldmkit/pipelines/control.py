"""ControlNets at sampling time: the control images, and the residuals every denoiser call receives.

    pipe.load_controlnet("models/control-canny", scale=0.8, start=0.0, end=1.0)   # repeat for several
    pipe.text2img("a house", control_image="edges.png", guess_mode=False)

As in diffusers' ControlNet pipelines: a control image is resized to the output size (LANCZOS) and read
in [0, 1] RGB; each ControlNet's residuals are scaled by its scale times its keep value at step i of the
n steps that run, keep = 0 when i / n < start or (i + 1) / n > end, else 1; several ControlNets add up.
With classifier-free guidance the ControlNets see both halves of the batch, in guess mode only the
conditional half (the unconditional half gets no residuals). The ControlNet sees the latents before
any spatial concatenation (an inpainting UNet's mask channels are the UNet's, not the ControlNet's).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ldmkit.errors import UserError


@dataclass
class Attached:
    """A ControlNet loaded into a pipeline, with its settings."""
    net: torch.nn.Module
    name: str
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    hash: str = ""


def check_settings(scale: float, start: float, end: float, where: str) -> None:
    if not -100.0 <= scale <= 100.0:
        raise UserError(f"{where}: ControlNet scale {scale} is outside [-100, 100]")
    if not 0.0 <= start < end <= 1.0:
        raise UserError(f"{where}: ControlNet start {start} and end {end} must satisfy 0 <= start < end <= 1 "
                        "(fractions of the steps)")


def control_tensor(image, width: int, height: int, channels: int = 3, fit: str = "stretch",
                   what: str = "control image") -> torch.Tensor:
    """PIL image / path / tensor [C,H,W] or [1,C,H,W] in [0, 1] -> [1, channels, height, width] in [0, 1].
    Grayscale and palette images become RGB; an image with transparent pixels is refused (what would they
    mean?); fit='error' refuses an aspect ratio other than the output's instead of stretching."""
    import numpy as np
    from PIL import Image

    from ldmkit.io.images import check_opaque, load_image

    if isinstance(image, torch.Tensor):
        x = (image if image.dim() == 4 else image[None]).float()
        size = (x.shape[-1], x.shape[-2])
    else:
        pil = image if isinstance(image, Image.Image) else load_image(image, mode=None)
        check_opaque(pil, what)
        size = pil.size
    if fit == "error" and abs(size[0] * height - size[1] * width) > max(size):
        raise UserError(f"{what} is {size[0]}x{size[1]}, the output {width}x{height}: another aspect ratio "
                        "(--control-fit stretch resizes it anyway)")
    if not isinstance(image, torch.Tensor):
        if pil.size != (width, height):
            pil = pil.resize((width, height), Image.LANCZOS)  # diffusers: resize first, then convert to RGB
        x = torch.from_numpy(np.asarray(pil.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    elif (x.shape[-2], x.shape[-1]) != (height, width):
        x = torch.nn.functional.interpolate(x, size=(height, width), mode="bicubic", align_corners=False)
    if x.shape[1] != channels:
        raise UserError(f"{what} has {x.shape[1]} channels; the ControlNet takes {channels}")
    return x.clamp(0, 1)


class ControlRun:
    """The ControlNets of one sampling call. `step` is the index of the step being run (the sampler's
    callback advances it); `residuals` is called by the pipeline's model function for each chunk."""

    def __init__(self, units: list, images: list, guess_mode: bool, steps: int, rows: int, adapt_context=None):
        self.units, self.images, self.guess_mode, self.adapt_context = units, images, guess_mode, adapt_context
        self.steps, self.rows, self.step = max(1, steps), rows, 0  # rows: images sampled together

    def keep(self, u: Attached) -> float:
        i, n = self.step, self.steps
        return 0.0 if (i / n < u.start or (i + 1) / n > u.end) else 1.0

    def residuals(self, x: torch.Tensor, t, kw: dict, lo: int, B: int) -> dict:
        """Keyword arguments for the UNet (down_residuals, mid_residual) for rows lo .. lo + len(x) of a
        batch of B rows: [uncond; cond] when classifier-free guidance doubled the images (B = 2 rows)."""
        skip = max(0, B // 2 - lo) if (self.guess_mode and B == 2 * self.rows) else 0
        skip = min(skip, x.shape[0])
        if skip == x.shape[0]:
            return {}
        rows = slice(skip, x.shape[0])
        tt = t[rows] if isinstance(t, torch.Tensor) and t.dim() > 0 else t
        args = {name: (v[rows] if isinstance(v, torch.Tensor) else v) for name, v in kw.items()}
        if self.adapt_context is not None:  # an extended UNet's ControlNets read its adapted context
            args["context"] = self.adapt_context(args.get("context"), args.get("context_mask"))
        total = None
        for u, image in zip(self.units, self.images):
            k = u.scale * self.keep(u)
            if k == 0:
                continue  # adds nothing: skip the network
            control = image.to(x.device, x.dtype).expand(x.shape[0] - skip, -1, -1, -1)
            r = u.net(x[rows], tt, control, scale=k, guess_mode=self.guess_mode, **args)
            total = r if total is None else total + r
        if total is None:
            return {}
        down, mid = total.down, total.mid
        if skip:  # the unconditional rows get nothing
            down = [torch.cat([d.new_zeros((skip,) + d.shape[1:]), d]) for d in down]
            mid = torch.cat([mid.new_zeros((skip,) + mid.shape[1:]), mid])
        return {"down_residuals": down, "mid_residual": mid}


def prepare(pipe, control_image, height: int, width: int, guess_mode: bool, fit: str = "stretch"):
    """The call's control images (one per loaded ControlNet) -> (images, metadata), or (None, {})."""
    units = pipe.controlnets
    if not units:
        if control_image is not None:
            raise UserError("a control image was given but no ControlNet is loaded (--controlnet)")
        return None, {}
    if control_image is None:
        raise UserError(f"{len(units)} ControlNet(s) loaded but no control image given (--control-image)")
    images = list(control_image) if isinstance(control_image, (list, tuple)) else [control_image]
    if len(images) != len(units):
        raise UserError(f"{len(units)} ControlNet(s) but {len(images)} control image(s): give one per ControlNet")
    tensors = [control_tensor(im, width, height, u.net.config.conditioning_channels, fit,
                              what=f"control image {k + 1}") for k, (u, im) in enumerate(zip(units, images))]
    meta = {"controlnets": ", ".join(f"{u.name}:{u.scale:g}" + (f" [{u.start:g}-{u.end:g}]"
                                                                  if (u.start, u.end) != (0, 1) else "")
                                     for u in units),
            "controlnet_hashes": ", ".join(f"{u.name}: {u.hash}" for u in units)}
    if guess_mode:
        meta["guess_mode"] = True
    return tensors, meta


def open_images(control_image) -> list:
    """The call's control images as a list, files opened (PIL images and tensors as they are)."""
    from PIL import Image

    from ldmkit.io.images import load_image

    images = list(control_image) if isinstance(control_image, (list, tuple)) else [control_image]
    return [im if isinstance(im, (Image.Image, torch.Tensor)) else load_image(im, mode=None) for im in images]


def image_size(pipe, images: list) -> dict:
    """{height, width} of the first of `images` (`open_images`), rounded down to the model's size multiple."""
    first = images[0]
    w, h = (first.shape[-1], first.shape[-2]) if isinstance(first, torch.Tensor) else first.size
    m = pipe.size_multiple
    return {"height": max(m, h // m * m), "width": max(m, w // m * m)}
