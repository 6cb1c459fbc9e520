"""Image folders as stage-2 training reads them when latents are not cached (`ldm train --data DIR`,
DreamBooth's instance and class images): the interface of `LatentData` (conditions, fingerprint,
latent shape), with `pixels(indices, seeds)` in place of cached posteriors -- the training method
encodes each micro-batch with the frozen autoencoder, so random crops and flips are new every epoch.

Each part is a folder (recursive PNG/JPEG/WebP) with its own caption rule: the images' captions
(`cat.txt` beside `cat.png`, or metadata.jsonl / metadata.csv), or one fixed caption for all (an
instance or class prompt). Crop and flip of an item are drawn from a seed the caller passes, so a
step's batch is a pure function of the run's seed and the step (exact resume).
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ldmkit.data.images import ImageFolder
from ldmkit.errors import UserError


@dataclass
class _Part:
    folder: ImageFolder
    caption: str | None  # one caption for every image, else each image's own


class ImageData:
    def __init__(self, parts: list[_Part], size: int):
        self.parts, self.size = parts, size
        self.starts = []
        n = 0
        for part in parts:
            self.starts.append(n)
            n += len(part.folder)
        self.count = n
        self.captions = [self._caption(i) for i in range(n)]
        self.labels, self.class_names, self.images, self.segmentation = None, None, None, None
        self.latent_shape: tuple[int, int, int] | None = None  # set by `bind`
        self.index = None

    @classmethod
    def from_folder(cls, folder: str | Path, size: int, caption: str | None = None, random_crop: bool = False,
                    flip: bool = False, what: str = "--data", controls: str | Path | None = None) -> "ImageData":
        """`controls`: a folder of control images mirroring `folder` (ControlNet training; `controls`)."""
        return cls([_part(folder, size, caption, random_crop, flip, what, controls)], size)

    def plus(self, folder: str | Path, caption: str | None, random_crop: bool = False, flip: bool = False,
             what: str = "--class-data") -> "ImageData":
        """These images followed by another folder's (their item indices come after ours)."""
        return ImageData(self.parts + [_part(folder, self.size, caption, random_crop, flip, what)], self.size)

    def __len__(self) -> int:
        return self.count

    def locate(self, i: int) -> tuple[int, int]:
        """(part, index inside the part) of item `i`."""
        for k in range(len(self.parts) - 1, -1, -1):
            if i >= self.starts[k]:
                return k, i - self.starts[k]
        raise IndexError(i)

    def _caption(self, i: int) -> str | None:
        k, j = self.locate(i)
        part = self.parts[k]
        return part.caption if part.caption is not None else part.folder.caption(part.folder.files[j])

    def bind(self, autoencoder) -> "ImageData":
        """Fix the latent shape from the autoencoder that encodes the images."""
        f = autoencoder.downsample_factor
        if self.size % f:
            raise UserError(f"--resolution {self.size} is not a multiple of the autoencoder's factor {f}")
        self.latent_shape = (autoencoder.latent_channels, self.size // f, self.size // f)
        return self

    # ---- what stage-2 training reads ----------------------------------------------------------
    @property
    def num_classes(self) -> int | None:
        return None

    def conditions(self, kind: str, indices) -> list | None:
        return [self.captions[i] for i in indices] if kind == "text" else None

    def check_conditioning(self, kind: str, where: str) -> None:
        if kind == "class":
            raise UserError(f"{where}: image folders give captions, not class labels; cache class folders with "
                            "`ldm cache-latents --class-folders` and train on --latents")
        if kind == "text":
            missing = [i for i, c in enumerate(self.captions) if c is None]
            if missing:
                k, j = self.locate(missing[0])
                path = self.parts[k].folder.files[j]
                raise UserError(f"{where}: {len(missing)} of {len(self)} images have no caption (e.g. {path}); add "
                                "a .txt beside each image or a metadata.jsonl, or give one prompt for all "
                                "(--instance-prompt)")

    def first_conditions(self, kind: str, n: int) -> list:
        return list(dict.fromkeys(c for c in self.captions if c is not None))[:n] if kind == "text" else []

    def fingerprint(self) -> dict:
        """The files (names and sizes) and captions: what a resumed run checks it still trains on."""
        h = hashlib.sha256()
        for part in self.parts:
            for p in part.folder.files:
                h.update(f"{p.relative_to(part.folder.root)}\0{p.stat().st_size}\0".encode())
                if part.folder.controls is not None:
                    h.update(f"control\0{part.folder.control_path(p).stat().st_size}\0".encode())
        h.update("\0".join(c or "" for c in self.captions).encode())
        return {"num_items": len(self), "size": self.size, "files_sha256": h.hexdigest()}

    def items(self, indices, seeds) -> list[dict]:
        """Items `indices` (ImageFolder items); item k cropped / flipped by Random(seeds[k])."""
        out = []
        for i, seed in zip(indices, seeds):
            k, j = self.locate(int(i))
            out.append(self.parts[k].folder.item(j, random.Random(int(seed))))
        return out

    def pixels(self, indices, seeds) -> torch.Tensor:
        """Items `indices` as [b, 3, size, size] in [-1, 1]; item k cropped / flipped by Random(seeds[k])."""
        return torch.stack([it["image"] for it in self.items(indices, seeds)])

    def controls(self, indices, seeds) -> tuple[torch.Tensor, torch.Tensor]:
        """(images [b, 3, S, S] in [-1, 1], their control images [b, 3, S, S] in [0, 1]), cropped alike."""
        items = self.items(indices, seeds)
        return torch.stack([it["image"] for it in items]), torch.stack([it["control"] for it in items])


def _part(folder, size: int, caption: str | None, random_crop: bool, flip: bool, what: str,
          controls: str | Path | None = None) -> _Part:
    if not Path(folder).is_dir():
        raise UserError(f"{what} {folder}: not a folder of images")
    try:
        images = ImageFolder(folder, size=size, random_crop=random_crop, flip=flip, captions=caption is None,
                             controls=controls)
        if controls is not None:  # every image has a fitting control image (before training starts, not at step k)
            for path in images.files:
                images.check_control(path)
    except (ValueError, FileNotFoundError, OSError) as exc:
        raise UserError(f"{what} {folder}: {exc}") from None
    return _Part(images, caption)


__all__ = ["ImageData"]
