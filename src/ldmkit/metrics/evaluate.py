"""Score a set of generated images against a reference set: what `ldm eval` runs.

    from ldmkit.metrics.evaluate import evaluate, reference_images
    from ldmkit.metrics.features import load_feature_network
    net = load_feature_network("runs/clf-fmnist")              # or "inception:/path/pt_inception.pth"
    real = reference_images("fashion-mnist", split="test", limit=2000)
    report = evaluate(fake_images, real.images, net, labels=fake_labels)

The report is a plain dict (JSON-ready): FID, KID (mean/std over subsets),
precision/recall (k-NN manifolds), class accuracy of conditional samples under
the feature classifier, prompt adherence for the shapes set (through
``ldmkit.metrics.shapes_analysis``), and always the description of the feature
network (name, weights sha256, data set and accuracy) that produced them.

Generated images come from a tensor, a folder of images (labels / prompts read
from the PNG metadata that ``ldm sample`` writes, or from class sub-folders),
or a model folder sampled here with balanced classes / the shapes prompts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class ImageSet:
    """Images [N, C, H, W] in [-1, 1] with optional per-image class labels (int or name) / prompts."""

    images: torch.Tensor
    labels: list | None = None
    prompts: list | None = None
    source: str = ""
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- inputs


def images_from_folder(folder, limit: int | None = None) -> ImageSet:
    """Every image under ``folder`` (sorted); labels/prompts from PNG metadata or class sub-folders."""
    from ldmkit.io.images import load_image, pil_to_tensor, read_png_metadata

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} "
                                + ("is not a folder" if folder.exists() else "does not exist"))
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if limit is not None:
        paths = paths[:limit]
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {folder}")
    images, labels, prompts = [], [], []
    for p in paths:
        img = load_image(p, mode="RGB")
        images.append(pil_to_tensor(img))
        meta = read_png_metadata(p) if p.suffix.lower() == ".png" else {}
        label = meta.get("class")
        if label is None and p.parent != folder:
            label = p.parent.name  # class sub-folder
        labels.append(_parse_label(label))
        prompts.append(meta.get("prompt"))
    shapes = {tuple(t.shape) for t in images}
    if len(shapes) > 1:
        raise ValueError(f"images in {folder} have different sizes {sorted(shapes)[:4]}; resize them to one size")
    x = torch.stack(images)
    if all(_is_grey(t) for t in images[:16]):
        x = x[:, :1]
    return ImageSet(x, labels if any(v is not None for v in labels) else None,
                    prompts if any(v is not None for v in prompts) else None, source=str(folder))


def _is_grey(t: torch.Tensor) -> bool:
    return bool(t.shape[0] == 3 and torch.equal(t[0], t[1]) and torch.equal(t[1], t[2]))


def _parse_label(value):
    if value is None:
        return None
    if isinstance(value, str):
        v = value.strip().strip('"')
        return int(v) if v.lstrip("-").isdigit() else v
    return int(value)


def reference_images(name_or_folder: str, split: str = "test", limit: int | None = 2000,
                     image_size: int = 32) -> ImageSet:
    """The real images: ``fashion-mnist`` / ``shapes`` (via the classifier's data sets) or a folder."""
    from ldmkit.metrics.classifier import DATASETS, labelled_dataset

    if name_or_folder in DATASETS:
        data = labelled_dataset(name_or_folder, split=split, image_size=image_size, limit=limit)
        n = len(data) if limit is None else min(limit, len(data))
        xs, ys = zip(*(data[i] for i in range(n)))
        return ImageSet(torch.stack(xs), list(ys), source=f"{name_or_folder}:{split}")
    return images_from_folder(name_or_folder, limit=limit)


def sample_model(model, num: int, dataset: str | None = None, seed: int = 0, sampler: str | None = None,
                 steps: int | None = None, guidance: float | None = None, batch_size: int = 32,
                 device=None, split: str = "train", prompts: list[str] | None = None) -> ImageSet:
    """Sample ``num`` images from a model folder: classes cycle 0..C-1; a text model's prompts cycle over
    ``prompts`` (default for the shapes set: its ``split`` prompts)."""
    from ldmkit import pipelines
    from ldmkit.io.images import pil_to_tensor

    pipe = pipelines.load(model, device=device, dtype=torch.float32)
    labels = None
    kw: dict = {}
    extra: dict = {}
    if pipe.conditioning == "class":
        n_classes = _num_classes(pipe, dataset)
        labels = [i % n_classes for i in range(num)]
        kw["class_label"] = labels
        extra["class_names"] = list(getattr(pipe.conditioner.config, "class_names", ()) or ()) or None
    elif pipe.conditioning == "text":
        pool = prompts
        if pool is None:
            if dataset != "shapes":
                raise ValueError("a text-conditional model needs prompts to sample: pass --prompts-file FILE (one "
                                 "prompt per line), or --dataset shapes for the shapes prompts")
            from ldmkit.data import shapes

            pool = shapes.train_prompts() if split == "train" else shapes.heldout_prompts()
        if not pool:
            raise ValueError("no prompts to sample with (the prompts file is empty)")
        prompts = [pool[i % len(pool)] for i in range(num)]
        kw["prompt"] = prompts
    else:
        prompts = None
    results = pipe.text2img(num=num, seed=seed, sampler=sampler, steps=steps, guidance=guidance,
                            batch_size=batch_size, **kw)
    x = torch.stack([pil_to_tensor(r.image.convert("RGB")) for r in results])
    if all(_is_grey(t) for t in x[:16]):
        x = x[:, :1]
    meta = results[0].metadata if results else {}
    return ImageSet(x, labels, prompts, source=str(model),
                    extra={**{k: meta.get(k) for k in ("sampler", "steps", "guidance", "model_hash")}, **extra})


def _num_classes(pipe, dataset) -> int:
    n = getattr(getattr(pipe.conditioner, "config", None), "num_classes", None)
    if n:
        return int(n)
    if dataset == "fashion-mnist":
        return 10
    raise ValueError("cannot tell the number of classes of this model; pass --dataset fashion-mnist or shapes")


# ----------------------------------------------------------------------------- the report


def class_accuracy(classifier, images: torch.Tensor, labels: list, batch_size: int = 256,
                   class_names: list[str] | None = None) -> dict:
    """Share of images the classifier assigns to their conditioning class (labels: ints or class names).
    `class_names`: the generating model's classes; when they are not the classifier's, labels are
    compared by index and the result carries a warning saying so."""
    names = [str(n) for n in (classifier.meta.get("class_names") or [])]
    lower = [n.lower() for n in names]
    ids = []
    for v in labels:
        if isinstance(v, str):
            if v.lower() not in lower:
                raise ValueError(f"class {v!r} is not one of the classifier's classes {names}")
            v = lower.index(v.lower())
        ids.append(int(v))
    if names and max(ids) >= len(names):
        raise ValueError(f"the samples have class {max(ids)}, the classifier knows {len(names)} classes ({names}); "
                         "score them with a classifier trained on the model's classes")
    warning = None
    if class_names and names and [c.lower() for c in class_names] != lower:
        warning = (f"the model's classes {list(class_names)} are not the classifier's {names}: labels are compared "
                   "by index, so this accuracy may mean nothing")
    elif not class_names and names:
        warning = (f"the model names no classes; its labels are read as the classifier's {names} by index")
    device = next(classifier.parameters()).device
    preds = torch.cat([classifier.logits(b.to(device)).argmax(1).cpu() for b in images.split(batch_size)])
    target = torch.tensor(ids)
    per_class = {}
    for c in sorted(set(ids)):
        m = target == c
        per_class[names[c] if c < len(names) else str(c)] = float((preds[m] == c).double().mean())
    out = {"accuracy": float((preds == target).double().mean()), "n": len(ids), "per_class": per_class}
    return {**out, "warning": warning} if warning else out


def evaluate(fake: torch.Tensor, real: torch.Tensor, network, labels: list | None = None,
             prompts: list | None = None, classifier=None, kid_subsets: int = 100, kid_subset_size: int = 1000,
             k: int = 3, batch_size: int = 256, seed: int = 0, class_names: list[str] | None = None) -> dict:
    """FID / KID / precision-recall (+ class accuracy, + shapes adherence) as a JSON-ready dict."""
    from ldmkit.metrics.features import ClassifierFeatures, extract_features
    from ldmkit.metrics.fid import fid_from_features, kid_from_features, precision_recall

    if fake.shape[0] < 2 or real.shape[0] < 2:
        raise ValueError(f"need at least 2 generated and 2 reference images, got {fake.shape[0]} and {real.shape[0]}")
    f_fake = extract_features(network, fake, batch_size)
    f_real = extract_features(network, real, batch_size)
    kid_mean, kid_std = kid_from_features(f_real, f_fake, subsets=kid_subsets, subset_size=kid_subset_size,
                                          seed=seed)
    whole = f_real.shape[0] <= kid_subset_size and f_fake.shape[0] <= kid_subset_size  # exact, no subsets
    kk = min(k, f_real.shape[0] - 1, f_fake.shape[0] - 1)
    precision, recall = precision_recall(f_real, f_fake, k=kk)
    report = {
        "feature_network": network.describe(),
        "num_generated": int(fake.shape[0]),
        "num_reference": int(real.shape[0]),
        "fid": fid_from_features(f_real, f_fake),
        "kid": {"mean": kid_mean, "std": kid_std, "subsets": 1 if whole else kid_subsets,
                "subset_size": "all" if whole else min(kid_subset_size, f_real.shape[0], f_fake.shape[0])},
        "precision": precision,
        "recall": recall,
        "pr_k": kk,
        "class_accuracy": None,
        "adherence": None,
    }
    if classifier is None and isinstance(network, ClassifierFeatures):
        classifier = network
    if labels is not None and all(v is not None for v in labels):
        if classifier is None:
            report["class_accuracy"] = {"skipped": "no classifier: pass a classifier folder as --classifier"}
        else:
            report["class_accuracy"] = class_accuracy(classifier, fake, labels, batch_size, class_names)
            report["class_accuracy"]["classifier"] = classifier.describe()
    if prompts is not None and all(p is not None for p in prompts):
        report["adherence"] = adherence(fake, prompts)
    return report


def real_floor(network, dataset: str = "fashion-mnist", n: int = 1000, num_classes: int = 10) -> dict:
    """`evaluate` of n class-balanced real training images against the first n test images: the floor a
    model's n samples are measured against (FID is biased upwards at small n, so it is never 0)."""
    train = reference_images(dataset, "train", limit=(n // num_classes) * num_classes * 4)
    labels = torch.tensor(train.labels)
    idx = torch.cat([torch.nonzero(labels == c).flatten()[: n // num_classes] for c in range(num_classes)])
    real = reference_images(dataset, "test", limit=n)
    return evaluate(train.images[idx], real.images, network, labels=[int(v) for v in labels[idx]], kid_subset_size=n)


def adherence(images: torch.Tensor, prompts: list) -> dict:
    """Shapes-set prompt adherence rates from ``ldmkit.metrics.shapes_analysis`` (per-sample details dropped);
    skipped, saying why, when the prompts are not in the shapes set's grammar."""
    from ldmkit.data.shapes import parse_caption
    from ldmkit.metrics.shapes_analysis import adherence_report

    try:
        for p in set(prompts):
            parse_caption(p)
    except ValueError:
        return {"skipped": "the prompts are not in the shapes set's grammar; adherence is scored for shapes "
                           "prompts only"}
    if images.shape[1] != 3:
        raise ValueError(f"adherence needs RGB shapes images, got {images.shape[1]} channel(s)")
    rep = adherence_report(list(images), list(prompts))
    return {k: v for k, v in rep.items() if k != "samples"}
