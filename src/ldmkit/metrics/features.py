"""Feature networks for FID / KID / precision-recall.

A feature network is anything with

- ``features(images) -> [N, D]`` for images ``[N, C, H, W]`` in [-1, 1]
  (any size, 1 or 3 channels: each network resizes / converts itself),
- ``feature_dim`` (D) and
- ``describe() -> dict`` naming the network, its weights (sha256) and, for a
  classifier, the data set and its test accuracy.

Two implementations:

``InceptionFeatures``
    Inception-v3 in the pytorch-fid layout (the TF "2015-12-05" graph with the
    FID patches: average pools that ignore padding, max pool in the last
    block), 2048-d pool3 features, inputs resized bilinearly to 299x299.  Built
    here in plain torch (no torchvision).  Its weights file
    ``pt_inception-2015-12-05-6726825d.pth`` is *not* shipped and *cannot be
    downloaded by ldmkit*: pass its path, or put it in the torch hub cache
    (``$TORCH_HOME/hub/checkpoints/``, usually ``~/.cache/torch/hub/checkpoints``)
    where pytorch-fid leaves it.  Numbers from it are comparable with
    published FIDs only when computed on the same data and sample counts.

``ClassifierFeatures``
    The penultimate layer of a small classifier trained on the evaluation data
    set (``ldmkit.metrics.classifier``, ``ldm train-classifier``); works fully
    offline.  Its FIDs are comparable only with FIDs from the same weights,
    which is why every report records the weights hash.

``load_feature_network(spec)`` turns a CLI string into one of them:
``"inception"`` (cache), ``"inception:/path/to/pt_inception.pth"``, or a
classifier folder path (optionally ``"classifier:/path"``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

INCEPTION_FILENAME = "pt_inception-2015-12-05-6726825d.pth"


@runtime_checkable
class FeatureNetwork(Protocol):
    feature_dim: int

    def features(self, images: torch.Tensor) -> torch.Tensor: ...

    def describe(self) -> dict: ...


# ----------------------------------------------------------------------------- Inception-v3 (pytorch-fid layout)


class BasicConv2d(nn.Module):
    """conv (no bias) + batch norm (eps 1e-3) + ReLU; names ``conv`` / ``bn`` as in the weights file."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    # TF's average pool ignores the zero padding: count_include_pad=False
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg3(x)),
        ], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        dbl = x
        for i in range(1, 6):
            dbl = getattr(self, f"branch7x7dbl_{i}")(dbl)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(_avg3(x)),
        ], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b = x
        for i in range(1, 5):
            b = getattr(self, f"branch7x7x3_{i}")(b)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """``max_pool=True`` is the FID graph's last block (max pool in the pool branch)."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
            self.branch_pool(pooled),
        ], 1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 up to pool3 (2048-d); parameter names match the weights file."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # the 1008-way logits; kept so the file loads strictly, unused

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))


def inception_weights_candidates() -> list[Path]:
    """Where a pytorch-fid Inception weights file is looked for (in order)."""
    out = []
    if os.environ.get("LDMKIT_INCEPTION_WEIGHTS"):
        out.append(Path(os.environ["LDMKIT_INCEPTION_WEIGHTS"]))
    out.append(Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME)
    return out


class InceptionFeatures(nn.Module):
    """2048-d pool3 features of the FID Inception-v3 (pytorch-fid compatible)."""

    feature_dim = 2048

    def __init__(self, weights: str | os.PathLike | None = None, *, random_init: bool = False):
        super().__init__()
        self.net = FIDInceptionV3()
        self.weights_path: Path | None = None
        self.weights_sha256: str | None = None
        if random_init:  # tests only: an untrained network in the same layout
            self.eval()
            return
        path = Path(weights) if weights is not None else next(
            (p for p in inception_weights_candidates() if p.is_file()), None)
        if path is None or not path.is_file():
            looked = [str(p) for p in ([Path(weights)] if weights else inception_weights_candidates())]
            raise FileNotFoundError(
                f"Inception FID weights not found (looked in {looked}). ldmkit cannot download them; copy "
                f"{INCEPTION_FILENAME} (pytorch-fid's release file) there, pass its path as "
                "'inception:/path/to/file', or use an offline classifier from `ldm train-classifier`")
        from ldmkit.io.files import check_state_dict, read_torch_weights

        state = read_torch_weights(path, "Inception weights file")
        check_state_dict(self.net, state, str(path), strict=False)  # shapes, before load_state_dict
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        bad_missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if bad_missing or unexpected:
            raise ValueError(f"{path} is not a pytorch-fid Inception weights file: missing {bad_missing[:5]}, "
                             f"unexpected {list(unexpected)[:5]}")
        from ldmkit.metrics.classifier import file_sha256

        self.weights_path, self.weights_sha256 = path, file_sha256(path)
        self.eval()

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be [N, 1 or 3, H, W], got shape {tuple(images.shape)}")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        x = F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(x)

    def describe(self) -> dict:
        return {"name": "inception-v3-fid", "feature_dim": self.feature_dim,
                "weights": str(self.weights_path) if self.weights_path else "random-init (test only)",
                "weights_sha256": self.weights_sha256}


# ----------------------------------------------------------------------------- own classifier features


class ClassifierFeatures(nn.Module):
    """Penultimate-layer features of an ldmkit feature classifier (see classifier.py)."""

    def __init__(self, model, meta: dict):
        super().__init__()
        self.model = model.eval()
        self.meta = dict(meta)
        self.feature_dim = model.config.feature_dim

    @classmethod
    def load(cls, folder, device="cpu") -> "ClassifierFeatures":
        from ldmkit.metrics.classifier import load_classifier

        model, meta = load_classifier(folder, device=device)
        return cls(model, meta)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.features(images)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def describe(self) -> dict:
        return {"name": f"ldmkit-classifier[{self.meta.get('dataset', '?')}]", "feature_dim": self.feature_dim,
                "weights": self.meta.get("path"), "weights_sha256": self.meta.get("weights_sha256"),
                "dataset": self.meta.get("dataset"), "accuracy": self.meta.get("accuracy")}


def load_feature_network(spec: str, device="cpu"):
    """``inception`` | ``inception:PATH`` | ``classifier:FOLDER`` | ``FOLDER`` -> a feature network."""
    if spec == "inception":
        return InceptionFeatures().to(device)
    if spec.startswith("inception:"):
        return InceptionFeatures(spec.split(":", 1)[1]).to(device)
    folder = spec.split(":", 1)[1] if spec.startswith("classifier:") else spec
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"feature network {spec!r}: not 'inception', 'inception:PATH' or a classifier "
                                "folder (create one with `ldm train-classifier`)")
    return ClassifierFeatures.load(folder, device=device)


@torch.no_grad()
def extract_features(network, images: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 256,
                     device=None) -> torch.Tensor:
    """Features for a tensor of images (batched) or an iterable of image batches -> float64 CPU [N, D]."""
    if device is None:
        device = next(iter(network.parameters())).device
    batches = images.split(batch_size) if isinstance(images, torch.Tensor) else images
    out = [network.features(b.to(device)).double().cpu() for b in batches]
    if not out:
        raise ValueError("no images to extract features from")
    return torch.cat(out)
