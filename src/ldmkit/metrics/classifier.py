"""A small CNN classifier trained on the data set itself: offline feature network.

FID needs a feature network.  The usual one (Inception-v3 with the TF FID
weights, see ``features.py``) cannot be downloaded here, and on 32x32
grey-scale clothing it measures the wrong thing anyway.  So, as MNIST papers
do with LeNet features, ldmkit trains a small classifier on the evaluation data
set and uses its penultimate layer (``feature_dim`` units, post-ReLU) as the
feature space.  The same network also scores class-conditional samples: the
share of samples it assigns to the class they were conditioned on.

A trained classifier is a component folder in our format::

    CLASSIFIER/
      config.json        {"type": "feature_classifier", "config": {...}}
      model.safetensors
      classifier.json    {"dataset": ..., "accuracy": ..., "class_names": [...],
                          "image_size": ..., "train_examples": ..., "epochs": ...}

Every metric report names the folder, the data set, the test accuracy and the
sha256 of ``model.safetensors`` (see ``describe``), so a number can always be
traced to the exact weights that produced it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

COMPONENT_TYPE = "feature_classifier"
DATASETS = ("fashion-mnist", "shapes")


@dataclass(frozen=True)
class FeatureClassifierConfig:
    in_channels: int = 1
    image_size: int = 32
    num_classes: int = 10
    widths: tuple[int, ...] = (32, 64, 128)
    feature_dim: int = 128
    dropout: float = 0.2

    def __post_init__(self):
        from ldmkit.errors import check_int, check_ints, check_number

        check_int("in_channels", self.in_channels, 1, 3)
        check_int("image_size", self.image_size, 1, 65536)
        check_int("num_classes", self.num_classes, 2, 1 << 20)
        check_ints("widths", self.widths, 1, 65536, max_len=16)
        check_int("feature_dim", self.feature_dim, 1, 65536)
        check_number("dropout", self.dropout, 0.0, 1.0, hi_open=True)
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.image_size < 2 ** len(self.widths):
            raise ValueError(f"image_size {self.image_size} is too small for {len(self.widths)} downsamplings")
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))


PRESETS: dict[str, FeatureClassifierConfig] = {
    "fashion-mnist": FeatureClassifierConfig(in_channels=1, image_size=32, num_classes=10, widths=(16, 32, 64),
                                             feature_dim=64),
    "shapes": FeatureClassifierConfig(in_channels=3, image_size=32, num_classes=12, widths=(16, 32, 64),
                                      feature_dim=64),
    "tiny": FeatureClassifierConfig(in_channels=1, image_size=16, num_classes=4, widths=(8, 16), feature_dim=16),
}


class FeatureClassifier(nn.Module):
    """conv-BN-ReLU x2 per stage, 2x2 max-pool between stages, global average, MLP head.

    ``features(x)`` is the penultimate layer (what FID/KID/PR use);
    ``forward(x)`` gives class logits.  Inputs are images in [-1, 1].
    """

    def __init__(self, config: FeatureClassifierConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        c = config.in_channels
        for i, w in enumerate(config.widths):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            for _ in range(2):
                layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                c = w
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(c, config.feature_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != cfg.in_channels:
            if x.shape[1] == 3 and cfg.in_channels == 1:
                x = x.mean(1, keepdim=True)
            elif x.shape[1] == 1 and cfg.in_channels == 3:
                x = x.expand(-1, 3, -1, -1)
            else:
                raise ValueError(f"images have {x.shape[1]} channels, the classifier expects {cfg.in_channels}")
        if x.shape[-2:] != (cfg.image_size, cfg.image_size):
            x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(self._prepare(x)).mean(dim=(2, 3))
        return F.relu(self.fc(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


# ----------------------------------------------------------------------------- data


def labelled_dataset(name: str, split: str = "train", image_size: int = 32, limit: int | None = None,
                     root: str | None = None):
    """A torch Dataset of ``(image [C, H, W] in [-1, 1], label)`` pairs.

    ``fashion-mnist``: the Fashion-MNIST reader in ``ldmkit.data.fashion_mnist``
    (split "train" or "test"), padded to 32x32.  ``shapes``: the bundled shapes
    set, labelled by the colour and shape of its first object (12 classes);
    "test" maps to a different seed of the training split.
    """
    if name == "fashion-mnist":
        from ldmkit.data import fashion_mnist

        return _FashionMNISTPairs(fashion_mnist, split, image_size, limit, root)
    if name == "shapes":
        return _ShapesPairs(split, image_size, limit or 12000)
    raise ValueError(f"dataset {name!r} is not one of {list(DATASETS)}")


def class_names(name: str) -> list[str]:
    if name == "fashion-mnist":
        from ldmkit.data.fashion_mnist import CLASSES

        return list(CLASSES)
    if name == "shapes":
        from ldmkit.data import shapes

        return [f"{c} {s}" for c in shapes.COLOURS for s in shapes.SHAPES]
    raise ValueError(f"dataset {name!r} is not one of {list(DATASETS)}")


class _FashionMNISTPairs(torch.utils.data.Dataset):
    def __init__(self, module, split, image_size, limit, root):
        if image_size not in (28, 32):
            raise ValueError(f"image_size {image_size} for Fashion-MNIST must be 28 or 32 (zero-padded)")
        self.data = module.FashionMNIST(split=split, root=root, pad_to_32=image_size == 32, limit=limit)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        item = self.data[i]
        return item["image"], int(item["label"])


class _ShapesPairs(torch.utils.data.Dataset):
    def __init__(self, split, image_size, length):
        from ldmkit.data import shapes

        seed = {"train": 0, "test": 1}.get(split)
        if seed is None:
            raise ValueError(f"split {split!r} is not one of ['train', 'test']")
        self.data = shapes.ShapesDataset("train", size=image_size, length=length, seed=seed)
        names = class_names("shapes")
        self.index = {name: i for i, name in enumerate(names)}

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        item = self.data[i]
        obj = item["spec"].objects[0]
        return item["image"], self.index[f"{obj.colour} {obj.shape}"]


# ----------------------------------------------------------------------------- train / evaluate


@torch.no_grad()
def evaluate_accuracy(model: FeatureClassifier, dataset, batch_size: int = 256, device="cpu") -> float:
    """Share of ``dataset`` items whose argmax class equals the label."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    was_training = model.training
    model.eval()
    correct = total = 0
    for images, labels in loader:
        logits = model(images.to(device))
        correct += int((logits.argmax(1).cpu() == labels).sum())
        total += len(labels)
    model.train(was_training)
    return correct / max(total, 1)


@dataclass
class ClassifierTrainResult:
    model: FeatureClassifier
    accuracy: float
    losses: list[float] = field(default_factory=list)


def train_classifier(train_set, test_set, config: FeatureClassifierConfig, epochs: int = 2,
                     batch_size: int = 128, lr: float = 2e-3, device="cpu", seed: int = 0,
                     max_steps: int | None = None, progress: bool = True) -> ClassifierTrainResult:
    """Adam + one-cycle cosine LR, light augmentation (random 2-pixel shifts); returns test accuracy."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2, got {batch_size}")
    torch.manual_seed(seed)
    model = FeatureClassifier(config).to(device)
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=g,
                                         drop_last=len(train_set) > batch_size)
    total = epochs * len(loader) if max_steps is None else min(max_steps, epochs * len(loader))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(total, 1), pct_start=0.15)
    losses: list[float] = []
    bar = _progress(total, "train classifier", progress)
    step = 0
    model.train()
    while step < total:
        for images, labels in loader:
            images = _shift(images.to(device), g)
            loss = F.cross_entropy(model(images), labels.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if step >= total:
                break
    if bar is not None:
        bar.close()
    model.eval()
    return ClassifierTrainResult(model=model, accuracy=evaluate_accuracy(model, test_set, device=device),
                                 losses=losses)


def _shift(images: torch.Tensor, g: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random integer translation of the whole batch (pad with the background value -1)."""
    dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=g))
    if dx == 0 and dy == 0:
        return images
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    h, w = images.shape[-2:]
    return padded[..., max_shift + dy:max_shift + dy + h, max_shift + dx:max_shift + dx + w]


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


# ----------------------------------------------------------------------------- save / load


def save_classifier(model: FeatureClassifier, folder, dataset: str, accuracy: float, **extra) -> Path:
    """Write the component folder (each file atomically; config.json last, so a folder with one is whole)."""
    from ldmkit.io.files import config_to_dict, save_tensors, write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / "model.safetensors", model.state_dict(),
                 metadata={"format": "ldmkit", "type": COMPONENT_TYPE})
    meta = {"dataset": dataset, "accuracy": float(accuracy),
            "class_names": class_names(dataset) if dataset in DATASETS else None,
            "image_size": model.config.image_size, **extra}
    write_json(folder / "classifier.json", meta)
    write_json(folder / "config.json", {"type": COMPONENT_TYPE, "config": config_to_dict(model.config)})
    return folder


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_classifier(folder, device="cpu") -> tuple[FeatureClassifier, dict]:
    """Load a saved classifier; returns ``(model in eval mode, metadata incl. weights_sha256)``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, weights = folder / "config.json", folder / "model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{folder} is not a feature classifier folder (needs config.json and "
                                f"model.safetensors; create one with `ldm train-classifier`)")
    from ldmkit.errors import UserError, reading
    from ldmkit.io.files import check_state_dict, config_from_dict, json_kind, read_json

    cfg_json = read_json(cfg_path)
    if cfg_json.get("type") != COMPONENT_TYPE:
        raise ValueError(f"{folder} holds a {cfg_json.get('type')!r} component, expected {COMPONENT_TYPE!r}")
    if not isinstance(cfg_json.get("config"), dict):
        raise UserError(f"{cfg_path}: \"config\" must be a JSON object with the classifier settings, got "
                        f"{json_kind(cfg_json.get('config')) if 'config' in cfg_json else 'nothing'}")
    try:
        model = FeatureClassifier(config_from_dict(FeatureClassifierConfig, cfg_json["config"]))
    except UserError as exc:
        raise UserError(f"{cfg_path}: {exc}") from None
    with reading(f"weights file {weights}"):
        state = load_file(str(weights))
    check_state_dict(model, state, str(weights))
    model.load_state_dict(state)
    model.to(device).eval()
    meta_path = folder / "classifier.json"
    meta = read_json(meta_path) if meta_path.is_file() else {}
    meta["weights_sha256"] = file_sha256(weights)
    meta["path"] = str(folder)
    return model, meta
