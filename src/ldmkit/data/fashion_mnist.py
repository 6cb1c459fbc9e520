"""Fashion-MNIST from the Debian package `dataset-fashion-mnist` (standard idx .gz files).

Files: /usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
(override the folder with `root=` or $LDMKIT_FASHION_MNIST). Items are dicts
like ImageFolder's: {"image": [C, S, S] in [-1, 1], "caption": class name,
"label": int}. 28x28 grayscale images can be zero-padded (background is
black, i.e. -1) to 32x32 so that f = 2, 4, 8, 16 divide the size, and
repeated to 3 channels.
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_SPLITS = {"train": "train", "test": "t10k"}


def fashion_mnist_root(root: str | Path | None = None) -> Path:
    return Path(root or os.environ.get("LDMKIT_FASHION_MNIST") or DEFAULT_ROOT)


def available(root: str | Path | None = None) -> bool:
    r = fashion_mnist_root(root)
    return all((r / f"{p}-{k}.gz").is_file() for p in _SPLITS.values()
               for k in ("images-idx3-ubyte", "labels-idx1-ubyte"))


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally gzipped): magic 0x0000 08 ndim, big-endian dims, uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {arr.size} values")
    return arr.reshape(dims)


class FashionMNIST(torch.utils.data.Dataset):
    def __init__(self, split: str = "train", root: str | Path | None = None, pad_to_32: bool = True,
                 channels: int = 1, limit: int | None = None):
        if split not in _SPLITS:
            raise ValueError(f"split={split!r}: must be one of {sorted(_SPLITS)}")
        if channels not in (1, 3):
            raise ValueError(f"channels={channels}: must be 1 or 3")
        r = fashion_mnist_root(root)
        prefix = _SPLITS[split]
        img_path, lbl_path = r / f"{prefix}-images-idx3-ubyte.gz", r / f"{prefix}-labels-idx1-ubyte.gz"
        if not img_path.is_file() or not lbl_path.is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST not found in {r} (need {img_path.name}, {lbl_path.name}); "
                "install it with `apt-get install dataset-fashion-mnist` or set $LDMKIT_FASHION_MNIST")
        images, labels = read_idx(img_path), read_idx(lbl_path)
        if images.ndim != 3 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"{r}: images {images.shape} and labels {labels.shape} do not match")
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        self.images, self.labels = images, labels.astype(np.int64)
        self.pad = 2 if pad_to_32 and images.shape[1] == 28 else 0
        self.channels = channels
        self.classes = list(CLASSES)
        self.skipped = 0

    @property
    def size(self) -> int:
        return self.images.shape[1] + 2 * self.pad

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        x = torch.from_numpy(self.images[i].copy()).float().div(127.5).sub(1.0)[None]
        if self.pad:
            x = torch.nn.functional.pad(x, (self.pad,) * 4, value=-1.0)
        if self.channels == 3:
            x = x.expand(3, -1, -1).clone()
        label = int(self.labels[i])
        return {"image": x, "caption": self.classes[label], "label": label}
