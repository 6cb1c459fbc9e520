"""The named data sets of the command line: an image folder, "fashion-mnist" or "shapes"."""
from __future__ import annotations

from pathlib import Path

from ldmkit.errors import UserError

DATA_HELP = "an image folder (PNG/JPEG, recursive), 'fashion-mnist' (Debian dataset-fashion-mnist) or 'shapes'"


def build_datasets(data: str, size: int, channels: int = 3, holdout: int = 16, seed: int = 0,
                   train_augment: bool = True):
    """(train, held-out) data sets yielding {"image": [C, size, size] in [-1, 1], ...}: an image folder
    (held-out: a fixed seeded subset of `holdout` images, never augmented), "fashion-mnist" (train /
    t10k) or "shapes" (the bundled synthetic set; train / held-out compositions)."""
    if data == "fashion-mnist":
        from ldmkit.data.fashion_mnist import FashionMNIST

        if size not in (28, 32):
            raise UserError(f"size={size}: Fashion-MNIST images are 28x28 (32 when padded); use 28 or 32")
        return (FashionMNIST("train", pad_to_32=size == 32, channels=channels),
                FashionMNIST("test", pad_to_32=size == 32, channels=channels))
    if data == "shapes":
        from ldmkit.data.shapes import ShapesDataset

        if channels != 3:
            raise UserError(f"channels={channels}: the shapes data set is RGB (3 channels)")
        return (ShapesDataset("train", size=size, length=20000, seed=seed),
                ShapesDataset("heldout", size=size, length=max(holdout, 1000), seed=seed))
    from ldmkit.data.images import ImageFolder

    if not Path(data).is_dir():
        raise UserError(f"--data {data!r}: not a folder, and not 'fashion-mnist' or 'shapes'")
    full = ImageFolder(Path(data), size=size, channels=channels, random_crop=train_augment, flip=train_augment,
                       seed=seed)
    if len(full) < 2:
        raise UserError(f"--data {data}: need at least 2 images (training + held-out), found {len(full)}")
    return full.split(min(holdout, len(full) // 2), seed=seed)


def evaluation_set(data: str, size: int, channels: int = 3, seed: int = 0):
    """The images a reconstruction is scored on: all of an image folder (center crops), Fashion-MNIST's
    test split, or the shapes set's held-out compositions."""
    if data in ("fashion-mnist", "shapes"):
        return build_datasets(data, size, channels, seed=seed, train_augment=False)[1]
    from ldmkit.data.images import ImageFolder

    if not Path(data).is_dir():
        raise UserError(f"--data {data!r}: not a folder, and not 'fashion-mnist' or 'shapes'")
    return ImageFolder(Path(data), size=size, channels=channels, seed=seed)
