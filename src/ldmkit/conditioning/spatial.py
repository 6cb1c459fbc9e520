"""Spatial conditions concatenated to the noisy latent (the LDM paper's concat conditioning).

    kind="inpaint":  mask (1 = repaint) at image size + latents of the masked image
                     -> [mask resized to latent size, masked latents]   (1 + latent_channels)
                     SD-inpainting order: denoiser input = [z_t, mask, masked_latents] (9 channels)
    kind="upscale":  low-resolution RGB image in [-1, 1] resized to latent size (3 channels);
                     SD x4 upscaler: input = [z_t, low_res] (7 channels), noise level as class label
    kind="semantic": integer segmentation map [H, W] -> one-hot, nearest-resized (num_classes channels)

The autoencoder is not owned here: callers encode the masked image themselves and pass
``masked_latents``. The module has no weights; it is a component so a model folder records which
spatial input its denoiser expects. ``null`` gives zeros (the LDM "no condition"); SD pipelines keep
the real spatial input in both CFG branches instead and only drop the text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ldmkit.conditioning.base import Conditioner, Conditioning, check_batch

KINDS = ("inpaint", "upscale", "semantic")


@dataclass(frozen=True)
class SpatialConfig:
    kind: str
    latent_channels: int = 4
    num_classes: int = 0  # semantic maps only
    latent_size: tuple = (8, 8)  # default size for null(); encode() takes it from the inputs

    def __post_init__(self):
        from ldmkit.errors import check_int, check_ints

        if isinstance(self.latent_size, list):
            object.__setattr__(self, "latent_size", tuple(self.latent_size))
        check_int("latent_channels", self.latent_channels, 1, 65536)
        check_int("num_classes", self.num_classes, 0, 65536)
        check_ints("latent_size", self.latent_size, 1, 65536, min_len=2, max_len=2)
        if not isinstance(self.kind, str) or self.kind not in KINDS:
            raise ValueError(f"spatial kind {self.kind!r} is not one of {KINDS}")
        if self.kind == "semantic" and self.num_classes < 1:
            raise ValueError("semantic spatial conditioning needs num_classes >= 1")

    @property
    def channels(self) -> int:
        """Channels appended to the latent (denoiser in_channels = latent_channels + this)."""
        return {"inpaint": 1 + self.latent_channels, "upscale": 3, "semantic": self.num_classes}[self.kind]


def resize_mask(mask: torch.Tensor, size) -> torch.Tensor:
    """[B, 1, H, W] or [B, H, W] mask -> [B, 1, h, w] nearest (as diffusers' inpaint pipeline)."""
    if mask.ndim == 3:
        mask = mask[:, None]
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask has shape {tuple(mask.shape)}; expected [B, 1, H, W] or [B, H, W]")
    return F.interpolate(mask.float(), size=tuple(size), mode="nearest")


def resize_image(image: torch.Tensor, size) -> torch.Tensor:
    """[B, 3, H, W] image -> [B, 3, h, w] (bicubic with antialiasing when shrinking)."""
    if image.ndim != 4:
        raise ValueError(f"image has shape {tuple(image.shape)}; expected [B, C, H, W]")
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image.float(), size=tuple(size), mode="bicubic", antialias=True, align_corners=False)


def one_hot_map(seg: torch.Tensor, num_classes: int, size) -> torch.Tensor:
    """[B, H, W] integer labels -> [B, num_classes, h, w] one-hot, nearest-resized."""
    if seg.ndim != 3 or seg.is_floating_point():
        raise ValueError(f"segmentation map has shape {tuple(seg.shape)} dtype {seg.dtype}; expected integer [B, H, W]")
    lo, hi = int(seg.min()), int(seg.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"segmentation labels span [{lo}, {hi}]; allowed [0, {num_classes - 1}]")
    onehot = F.one_hot(seg.long(), num_classes).permute(0, 3, 1, 2).float()
    return F.interpolate(onehot, size=tuple(size), mode="nearest")


class SpatialConditioner(Conditioner):
    component_type = "spatial"

    def __init__(self, config: SpatialConfig):
        super().__init__()
        self.config = config

    @classmethod
    def from_component(cls, config: dict, folder) -> "SpatialConditioner":
        from ldmkit.io.files import config_from_dict

        return cls(config_from_dict(SpatialConfig, config))

    @property
    def channels(self) -> int:
        return self.config.channels

    def encode(self, conditions: list, latent_size=None) -> Conditioning:
        """One dict per sample: inpaint {"mask": [1,H,W], "masked_latents": [C,h,w]};
        upscale {"image": [3,H,W]} (needs ``latent_size``, default config.latent_size);
        semantic {"segmentation": [H,W] int} (same)."""
        conditions = check_batch(conditions, "spatial condition dicts")
        key = {"inpaint": "masked_latents", "upscale": "image", "semantic": "segmentation"}[self.config.kind]
        for c in conditions:
            if not isinstance(c, dict) or key not in c:
                raise ValueError(f"{self.config.kind} conditions are dicts with key {key!r}, got {c!r:.80}")
        stack = torch.stack([c[key] for c in conditions])
        if self.config.kind == "inpaint":
            if "mask" not in conditions[0]:
                raise ValueError("inpaint conditions need a 'mask' (1 = repaint) as well")
            if stack.ndim != 4 or stack.shape[1] != self.config.latent_channels:
                raise ValueError(f"masked_latents have shape {tuple(stack.shape[1:])}; expected "
                                 f"[{self.config.latent_channels}, h, w]")
            mask = resize_mask(torch.stack([c["mask"] for c in conditions]), stack.shape[-2:])
            return Conditioning(concat=torch.cat([mask.to(stack), stack], dim=1))
        size = tuple(latent_size or self.config.latent_size)
        if self.config.kind == "upscale":
            return Conditioning(concat=resize_image(stack, size))
        return Conditioning(concat=one_hot_map(stack, self.config.num_classes, size))

    def null(self, batch_size: int, latent_size=None) -> Conditioning:
        h, w = tuple(latent_size or self.config.latent_size)
        return Conditioning(concat=torch.zeros(batch_size, self.channels, h, w))

    def null_like(self, cond: Conditioning) -> Conditioning:
        if cond.concat is None:
            raise ValueError("a spatial null condition needs a conditioning with 'concat' set")
        return self.null(cond.batch_size, cond.concat.shape[-2:])


# ----------------------------------------------------------------------------- building the inputs
NOISE_LEVELS = 1000  # the x4 upscaler's noise-augmentation levels (its class table size)
MASK_FULL = 0.25  # share of random inpainting masks covering everything (also learns plain generation)
MASK_NONE = 0.10  # share with nothing masked


def random_masks(n: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """SD-inpainting-style training masks [n, 1, H, W] in {0, 1} (1 = repaint): a share MASK_FULL
    fully masked, MASK_NONE unmasked, the rest 1-3 random rectangles and thick polyline strokes."""
    import math

    masks = torch.zeros(n, 1, height, width)
    yy, xx = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    side = min(height, width)

    def uniform(lo, hi):
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    for i in range(n):
        u = uniform(0, 1)
        if u < MASK_FULL:
            masks[i] = 1
            continue
        if u < MASK_FULL + MASK_NONE:
            continue
        m = masks[i, 0]
        for _ in range(int(torch.randint(1, 4, (), generator=generator))):
            if uniform(0, 1) < 0.5:  # rectangle covering 10-60 % of each side
                rh, rw = uniform(0.1, 0.6) * height, uniform(0.1, 0.6) * width
                y0, x0 = uniform(0, height - rh), uniform(0, width - rw)
                m[(yy >= y0) & (yy < y0 + rh) & (xx >= x0) & (xx < x0 + rw)] = 1
                continue
            # stroke: 1-4 segments of a random walk, 5-15 % of the side thick
            r = uniform(0.025, 0.075) * side
            y, x = uniform(0, height), uniform(0, width)
            for _ in range(int(torch.randint(1, 5, (), generator=generator))):
                angle, length = uniform(0, 2 * math.pi), uniform(0.1, 0.5) * side
                y1 = min(max(y + length * math.sin(angle), 0.0), float(height))
                x1 = min(max(x + length * math.cos(angle), 0.0), float(width))
                dy, dx = y1 - y, x1 - x
                # distance of every pixel centre to the segment (y, x) -> (y1, x1)
                s = (((yy - y) * dy + (xx - x) * dx) / max(dy * dy + dx * dx, 1e-8)).clamp(0, 1)
                m[(yy - y - s * dy) ** 2 + (xx - x - s * dx) ** 2 <= r * r] = 1
                y, x = y1, x1
    return masks


def centre_mask(height: int, width: int) -> torch.Tensor:
    """[1, 1, H, W]: the middle half of the image masked (sample grids of inpainting runs)."""
    m = torch.zeros(1, 1, height, width)
    m[..., height // 4: height - height // 4, width // 4: width - width // 4] = 1
    return m


def low_res_input(images: torch.Tensor, size) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> the low-resolution input of a super-resolution model: downsampled to
    `size` (bicubic with antialiasing) and rounded to 8 bits, as an image file would hold it."""
    small = resize_image(images, tuple(size)).clamp(-1, 1)
    return ((small + 1) * 127.5).round() / 127.5 - 1


def augment_low_res(low: torch.Tensor, levels: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The x4 upscaler's noise augmentation: the low-res image put at level `levels[i]` of a linear DDPM
    schedule with NOISE_LEVELS steps (level 0 = unchanged). Training uses it and `ldm upscale` the same
    schedule for ldmkit's upscalers; diffusers' x4 upscaler was trained otherwise (its low_res_scheduler:
    scaled-linear betas, level 0 noised too), which `ldm upscale` follows for it (`pipelines.upscale`)."""
    from ldmkit.diffusion.forward import q_sample
    from ldmkit.diffusion.schedules import make_schedule

    levels = torch.as_tensor(levels, dtype=torch.long).reshape(-1).expand(low.shape[0])
    noisy = q_sample(make_schedule("linear", num_train_timesteps=NOISE_LEVELS), low, noise, levels.cpu())
    return torch.where((levels > 0).to(low.device).view(-1, 1, 1, 1), noisy.to(low.dtype), low)


# a colour per segmentation class for sample grids (background white)
_PALETTE = torch.tensor([[255, 255, 255], [230, 30, 30], [40, 70, 220], [30, 170, 50], [240, 220, 20],
                         [150, 60, 200], [20, 200, 200], [250, 140, 20], [0, 0, 0]], dtype=torch.float32)


def segmentation_colours(seg: torch.Tensor) -> torch.Tensor:
    """[B, H, W] class map -> [B, 3, H, W] in [-1, 1] with a fixed colour per class (sample grids)."""
    return (_PALETTE[seg.long() % len(_PALETTE)].permute(0, 3, 1, 2) / 127.5 - 1)
