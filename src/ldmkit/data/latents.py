"""Latent cache: encode a data set once through a frozen autoencoder, train stage 2 on it.

Layout of a cache folder::

    CACHE/
      index.json                  written last: its presence marks a complete cache
      shard-00000.safetensors     {"mean": [n, c, h, w], "std": [n, c, h, w],
                                   "image": uint8 [n, 3, H, W]        (optional, store_images)
                                   "segmentation": uint8 [n, H, W]}   (optional, store_segmentation)
      shard-00000.json            {"captions": [...] | null, "labels": [...] | null}
      shard-00001.safetensors ...

The stored ``mean`` and ``std`` are the posterior's moments **already in
diffusion space**: ``mean = (mean_ae - shift_factor) * scaling_factor`` and
``std = std_ae * scaling_factor``, so ``z = mean + std * eps`` has exactly the
distribution of ``autoencoder.encode_latents(x)`` and the trainer applies no
further scaling. The factors used are recorded in ``index.json``
(``"scaled": true``, ``scaling_factor``, ``shift_factor``) together with the
autoencoder's config and a SHA-256 of its weights, so a trainer can check that
it decodes with the same autoencoder. For a VQ autoencoder ``std`` is 0.

Spatially conditioned training (``ldm train --spatial``) also needs per item what
the spatial input is made from: the source image (uint8, exactly the pixels that
were encoded: inpainting masks it, super-resolution downsamples it) and/or an
integer segmentation map (semantic synthesis). Format version 2 adds them as
optional tensors; ``index.json`` says which are present (``has_images``,
``image_shape``, ``has_segmentation``, ``segmentation_classes``). Version-1 caches
(no such fields) still load, as caches without images or maps.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ldmkit.io.files import atomic_write, write_json
from ldmkit.util import tensors_sha256, weights_sha256

FORMAT = "ldmkit-latents"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 2 adds the optional image / segmentation tensors
INDEX_FILE = "index.json"
_SHARD_RE = re.compile(r"^shard-\d{5}\.(safetensors|json)$")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _split_item(item) -> tuple[torch.Tensor, str | None, int | None]:
    """A data set item -> (image [C, H, W], caption or None, label or None)."""
    if isinstance(item, dict):
        if "image" not in item:
            raise ValueError(f"data set items need an 'image' entry; got keys {sorted(item)}")
        label = item.get("label")
        return item["image"], item.get("caption"), None if label is None else int(label)
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], None, int(item[1])
    if isinstance(item, torch.Tensor):
        return item, None, None
    raise ValueError(f"data set item of type {type(item).__name__}: expected a dict with 'image' "
                     "(+ 'caption', 'label'), an (image, label) pair or an image tensor")


def _segmentation_of(item) -> torch.Tensor | None:
    seg = item.get("segmentation") if isinstance(item, dict) else None
    if seg is None:
        return None
    seg = torch.as_tensor(seg)
    if seg.dim() != 2 or seg.is_floating_point():
        raise ValueError(f"a segmentation map must be an integer [H, W] tensor, got {seg.dtype} "
                         f"{tuple(seg.shape)}")
    return seg


def image_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] in [-1, 1] -> uint8 (as an image file stores it)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def uint8_to_image(x: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float in [-1, 1]."""
    return x.float() / 127.5 - 1.0


def _config_dict(autoencoder) -> dict | None:
    cfg = getattr(autoencoder, "config", None)
    if cfg is not None and dataclasses.is_dataclass(cfg):
        return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    return None


@torch.no_grad()
def encode_dataset(autoencoder: torch.nn.Module, dataset, out: str | Path, batch_size: int = 64,
                   shard_size: int = 4096, device: str | torch.device | None = None,
                   dtype: str = "float32", class_names: list[str] | None = None,
                   source: dict | None = None, overwrite: bool = False, progress: bool = True,
                   store_images: bool = False, store_segmentation: bool = False,
                   segmentation_classes: list[str] | None = None) -> Path:
    """Encode every item of ``dataset`` with the frozen ``autoencoder`` into a cache at ``out``.

    ``dataset[i]`` may be a dict with "image" ([C, H, W] in [-1, 1]) and optional
    "caption" / "label", an ``(image, label)`` pair or an image tensor.
    ``shard_size`` items go in each safetensors shard; ``dtype`` ("float32", "float16",
    "bfloat16") is the storage type. ``source`` is free-form provenance stored in the
    index (e.g. ``{"dataset": "shapes", "split": "train", "seed": 0}``). Returns ``out``.

    ``store_images`` keeps each encoded image as uint8 [3, H, W] beside its latent (what
    inpainting and super-resolution training build their spatial input from).
    ``store_segmentation`` keeps each item's ``"segmentation"`` (an integer [H, W] map of the
    image's size, values in [0, 255]; the data set must give one per item), with the class
    names ``segmentation_classes`` (their count is the number of map classes).
    """
    out = Path(out)
    if min(batch_size, shard_size) < 1:
        raise ValueError(f"batch_size {batch_size} and shard_size {shard_size} must be >= 1")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    n = len(dataset)
    if n == 0:
        raise ValueError("the data set is empty; nothing to cache")
    if store_segmentation and not segmentation_classes:
        raise ValueError("store_segmentation needs segmentation_classes (the names of the map's classes)")
    _prepare_folder(out, overwrite)
    if device is None:
        p = next(iter(autoencoder.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    cfg = getattr(autoencoder, "config", None)
    scale = float(getattr(cfg, "scaling_factor", 1.0))
    shift = float(getattr(cfg, "shift_factor", 0.0))
    was_training = autoencoder.training
    autoencoder.eval()

    from ldmkit.util import progress as progress_bar

    shards, first = [], None
    bar = progress_bar(total=n, desc="encoding latents", disable=not progress, unit="img")
    options = dict(device=torch.device(device), scale=scale, shift=shift, batch_size=batch_size,
                   store_images=store_images, seg_classes=segmentation_classes if store_segmentation else None,
                   bar=bar)
    try:
        for si, s0 in enumerate(range(0, n, shard_size)):
            name, s1 = f"shard-{si:05d}", min(n, s0 + shard_size)
            tensors, side = _encode_shard(autoencoder, dataset, s0, s1, **options)
            shape = {"latent": list(tensors["mean"].shape[1:]), "captions": side["captions"][0] is not None,
                     "labels": side["labels"][0] is not None,
                     "image": list(tensors["image"].shape[1:]) if store_images else None}
            first = first or shape
            if shape["latent"] != first["latent"]:
                raise ValueError(f"latents of shape {shape['latent']} in shard {si} differ from "
                                 f"{first['latent']}: all images must have one size")
            if any((c is not None) != first["captions"] for c in side["captions"]) or \
                    any((lb is not None) != first["labels"] for lb in side["labels"]):
                raise ValueError("some items have a caption/label and some do not; a cache needs all or none")
            tensors.update(mean=tensors["mean"].to(_DTYPES[dtype]), std=tensors["std"].to(_DTYPES[dtype]))
            atomic_write(out / f"{name}.safetensors", lambda tmp: save_file(tensors, tmp))
            write_json(out / f"{name}.json", {"captions": side["captions"] if first["captions"] else None,
                                               "labels": side["labels"] if first["labels"] else None})
            shards.append({"name": name, "count": s1 - s0})
    finally:
        bar.close()
        autoencoder.train(was_training)
    write_json(out / INDEX_FILE, {  # written last: its presence marks a complete cache
        "format": FORMAT, "format_version": FORMAT_VERSION, "num_items": n, "latent_shape": first["latent"],
        "dtype": dtype, "scaled": True, "scaling_factor": scale, "shift_factor": shift,
        "has_captions": bool(first["captions"]), "has_labels": bool(first["labels"]),
        "class_names": list(class_names) if class_names is not None else None,
        "has_images": bool(store_images), "image_shape": first["image"], "has_segmentation": bool(store_segmentation),
        "segmentation_classes": list(segmentation_classes) if store_segmentation else None,
        "autoencoder": {"config": _config_dict(autoencoder), "weights_sha256": weights_sha256(autoencoder)},
        "source": source or {}, "shards": shards})
    return out


def _prepare_folder(out: Path, overwrite: bool) -> None:
    """Refuse to write over a cache unless `overwrite`; then drop that cache's own files, nothing else."""
    if (out / INDEX_FILE).exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a latent cache; replace it with --overwrite (overwrite=True)")
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for f in out.iterdir():
            if f.name == INDEX_FILE or _SHARD_RE.match(f.name):
                f.unlink()


def _encode_shard(autoencoder, dataset, s0: int, s1: int, *, device, scale: float, shift: float, batch_size: int,
                  store_images: bool, seg_classes: list[str] | None, bar) -> tuple[dict, dict]:
    """Items s0 ... s1-1 encoded: ({"mean", "std" (scaled), "image"?, "segmentation"?}, {"captions", "labels"})."""
    p = next(iter(autoencoder.parameters()), None)
    in_dtype = p.dtype if p is not None else torch.float32
    means, stds, captions, labels, images, segs = [], [], [], [], [], []
    for b0 in range(s0, s1, batch_size):
        raw = [dataset[i] for i in range(b0, min(s1, b0 + batch_size))]
        items = [_split_item(r) for r in raw]
        pixels = torch.stack([torch.as_tensor(im) for im, _, _ in items])
        if store_images:
            images.append(image_to_uint8(pixels))
        if seg_classes:
            segs.append(_segmentation_batch(raw, b0, pixels.shape[-2:], len(seg_classes)))
        post = autoencoder.encode(pixels.to(device=device, dtype=in_dtype))
        means.append(((post.mean.float() - shift) * scale).cpu())
        stds.append((post.std.float() * scale).cpu())
        captions += [cap for _, cap, _ in items]
        labels += [lab for _, _, lab in items]
        bar.update(len(items))
    tensors = {"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous()}
    if store_images:
        tensors["image"] = torch.cat(images).contiguous()
    if seg_classes:
        tensors["segmentation"] = torch.cat(segs).contiguous()
    return tensors, {"captions": captions, "labels": labels}


def _segmentation_batch(raw: list, start: int, size, num_classes: int) -> torch.Tensor:
    """The items' segmentation maps as uint8 [b, H, W], checked against the image size and classes."""
    out = []
    for j, item in enumerate(raw):
        seg = _segmentation_of(item)
        if seg is None:
            raise ValueError(f"item {start + j} has no 'segmentation' map; store_segmentation needs one per "
                             "item (e.g. ShapesDataset(segmentation=True))")
        if tuple(seg.shape) != tuple(size):
            raise ValueError(f"item {start + j}: segmentation map {tuple(seg.shape)} does not match the image "
                             f"size {tuple(size)}")
        lo, hi = int(seg.min()), int(seg.max())
        if lo < 0 or hi >= num_classes or hi > 255:
            raise ValueError(f"item {start + j}: segmentation labels span [{lo}, {hi}]; allowed "
                             f"[0, {min(num_classes, 256) - 1}] ({num_classes} segmentation classes)")
        out.append(seg.to(torch.uint8))
    return torch.stack(out)


def recaption(src: str | Path, out: str | Path, fn, note: str = "", overwrite: bool = False) -> Path:
    """A copy of the cache ``src`` at ``out`` with every caption replaced by ``fn(caption)``: the same
    latents (shards copied byte for byte), labels, images and autoencoder record. For rewording
    captions -- another phrasing, a training stage on normalised captions -- without encoding
    again. ``note`` is stored in the index's ``source`` as ``"recaptioned"``. Returns ``out``."""
    import shutil

    src, out = Path(src), Path(out)
    index = read_index(src)
    if not index["has_captions"]:
        raise ValueError(f"{src} holds no captions to rewrite")
    if src.resolve() == out.resolve():
        raise ValueError("recaption writes a new cache; out must differ from src")
    if (out / INDEX_FILE).exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a latent cache; replace it with --overwrite (overwrite=True)")
    out.mkdir(parents=True, exist_ok=True)
    for shard in index["shards"]:
        name = shard["name"]
        side = json.loads((src / f"{name}.json").read_text(encoding="utf-8"))
        new = [fn(c) for c in side["captions"]]
        if any(not isinstance(c, str) for c in new):
            raise ValueError("the caption function must return a string for every caption")
        atomic_write(out / f"{name}.safetensors", lambda tmp, n=name: shutil.copyfile(src / f"{n}.safetensors", tmp))
        write_json(out / f"{name}.json", {**side, "captions": new})
    index = dict(index, source={**(index.get("source") or {}), "recaptioned": note or "yes",
                                "recaptioned_from": str(src)})
    write_json(out / INDEX_FILE, index)
    return out


def read_index(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a latent cache (no {INDEX_FILE}); "
                                "make one with `ldm cache-latents`")
    from ldmkit.io.files import read_json

    index = read_json(path)
    if index.get("format") != FORMAT or index.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(f"{path}: format {index.get('format')!r} version {index.get('format_version')!r}; "
                         f"expected {FORMAT!r} version {' or '.join(map(str, READABLE_VERSIONS))}")
    # fields a version-1 cache lacks: it holds no images and no segmentation maps
    for key, default in (("has_images", False), ("image_shape", None), ("has_segmentation", False),
                         ("segmentation_classes", None)):
        index.setdefault(key, default)
    _check_index(index, path)
    return index


def _check_index(index: dict, path: Path) -> None:
    """The fields a reader relies on, with the types it needs (a damaged index.json is a UserError)."""
    from ldmkit.errors import UserError

    shards = index.get("shards")
    problems = []
    if not isinstance(shards, list) or not all(
            isinstance(s, dict) and isinstance(s.get("name"), str) and _SHARD_RE.match(s["name"] + ".json")
            and isinstance(s.get("count"), int) and s["count"] >= 0 for s in shards):
        problems.append("shards must be a list of {\"name\": \"shard-NNNNN\", \"count\": N}")
    if not isinstance(index.get("num_items"), int) or isinstance(index.get("num_items"), bool):
        problems.append("num_items must be an integer")
    for key in ("has_captions", "has_labels", "has_images", "has_segmentation"):
        if not isinstance(index.get(key, False), bool):
            problems.append(f"{key} must be true or false")
    for key in ("scaling_factor", "shift_factor"):
        if key in index and (not isinstance(index[key], (int, float)) or isinstance(index[key], bool)):
            problems.append(f"{key} must be a number")
    if problems:
        raise UserError(f"{path} is damaged: {'; '.join(problems)}; rebuild the cache")


class CachedLatents(torch.utils.data.Dataset):
    """A latent cache folder as a data set (all shards are loaded into memory as float32).

    Items: ``{"latent": [c, h, w], "caption": str, "label": int}`` (caption / label only
    when the cache has them, so the default DataLoader collate works). With
    ``sample=True`` the latent is ``mean + std * eps`` with ``eps`` drawn from a generator
    seeded by ``(seed, epoch, index)`` -- reproducible, different each epoch (call
    :meth:`set_epoch`); with ``sample=False`` it is the posterior mean. Whole tensors are
    available as ``.mean`` / ``.std`` ([N, c, h, w]), plus ``.captions``, ``.labels``
    (LongTensor or None), ``.class_names``, ``.index`` (the parsed index.json), and, when the
    cache stores them, ``.images`` (uint8 [N, 3, H, W]) and ``.segmentation`` (uint8 [N, H, W])
    with ``.segmentation_classes`` (else None); items then also carry ``"image"`` ([-1, 1]) and
    ``"segmentation"`` (long).
    """

    def __init__(self, folder: str | Path, sample: bool = True, seed: int = 0):
        self.folder = Path(folder)
        self.index = read_index(self.folder)
        means, stds, captions, labels, images, segs = [], [], [], [], [], []
        from ldmkit.errors import UserError, reading
        from ldmkit.io.files import read_json

        for shard in self.index["shards"]:
            shard_file = self.folder / f"{shard['name']}.safetensors"
            with reading(f"latent cache shard {shard_file}"):
                tensors = load_file(str(shard_file))
            side = read_json(self.folder / f"{shard['name']}.json")
            moments = [tensors.get(k) for k in ("mean", "std")]
            if not all(isinstance(side.get(k), (list, type(None))) for k in ("captions", "labels")) \
                    or not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in moments):
                raise UserError(f"{self.folder}/{shard['name']}: the shard lacks mean/std latents [n, c, h, w] or "
                                "its .json lacks the captions/labels lists: the cache is damaged, rebuild it")
            if tensors["mean"].shape[0] != shard["count"] or tensors["std"].shape != tensors["mean"].shape:
                raise ValueError(f"{self.folder}/{shard['name']}.safetensors holds {tensors['mean'].shape[0]} "
                                 f"latents; index.json says {shard['count']}: the cache is damaged, rebuild it")
            for key, flag, store in (("image", "has_images", images), ("segmentation", "has_segmentation", segs)):
                if self.index[flag]:
                    if key not in tensors or tensors[key].shape[0] != shard["count"]:
                        raise ValueError(f"{self.folder}/{shard['name']}.safetensors: index.json says the cache "
                                         f"stores '{key}' for every item, the shard does not: rebuild the cache")
                    store.append(tensors[key])
            means.append(tensors["mean"].float())
            stds.append(tensors["std"].float())
            captions.extend(side["captions"] or [])
            labels.extend(side["labels"] or [])
        self.mean = torch.cat(means)
        self.std = torch.cat(stds)
        n = self.index["num_items"]
        if self.mean.shape[0] != n:
            raise ValueError(f"{self.folder}: shards hold {self.mean.shape[0]} latents, index.json says {n}")
        self.captions = captions if self.index["has_captions"] else None
        self.labels = torch.tensor(labels, dtype=torch.long) if self.index["has_labels"] else None
        self.class_names = self.index.get("class_names")
        self.images = torch.cat(images) if self.index["has_images"] else None
        self.segmentation = torch.cat(segs) if self.index["has_segmentation"] else None
        self.segmentation_classes = self.index["segmentation_classes"] if self.segmentation is not None else None
        self.sample, self.seed, self.epoch = bool(sample), int(seed), 0

    def __len__(self) -> int:
        return self.mean.shape[0]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.mean.shape[1:])

    @property
    def scaling_factor(self) -> float:
        return float(self.index["scaling_factor"])

    @property
    def shift_factor(self) -> float:
        return float(self.index["shift_factor"])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a latent cache of {n} items")
        i %= n
        z = self.mean[i]
        if self.sample:
            key = hashlib.sha256(f"{self.seed}:{self.epoch}:{i}".encode()).digest()
            g = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
            z = z + self.std[i] * torch.randn(z.shape, generator=g)
        item = {"latent": z}
        if self.captions is not None:
            item["caption"] = self.captions[i]
        if self.labels is not None:
            item["label"] = int(self.labels[i])
        if self.images is not None:
            item["image"] = uint8_to_image(self.images[i])
        if self.segmentation is not None:
            item["segmentation"] = self.segmentation[i].long()
        return item


class LatentData:
    """Latents as stage-2 training reads them: posterior mean/std [N, c, h, w] (already scaled), the
    condition of each item (captions, or integer labels with their class names) and what spatial
    inputs are built from (`images` uint8 [N, 3, H, W], `segmentation` [N, H, W] with
    `segmentation_classes`) when the cache stores them. `open_latents(folder)` reads a cache;
    tests and scripts can build one from tensors."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor | None = None, captions: list[str] | None = None,
                 labels: torch.Tensor | None = None, class_names: list[str] | None = None,
                 images: torch.Tensor | None = None, segmentation: torch.Tensor | None = None,
                 segmentation_classes: list[str] | None = None, index: dict | None = None):
        if mean.dim() != 4:
            raise ValueError(f"latent means have shape {tuple(mean.shape)}; expected [N, c, h, w]")
        self.mean = mean.float()
        self.std = torch.zeros_like(self.mean) if std is None else std.float()
        if self.std.shape != self.mean.shape:
            raise ValueError(f"latent std {tuple(self.std.shape)} does not match mean {tuple(self.mean.shape)}")
        n = mean.shape[0]
        if captions is not None and len(captions) != n:
            raise ValueError(f"{len(captions)} captions for {n} latents")
        if labels is not None and len(labels) != n:
            raise ValueError(f"{len(labels)} labels for {n} latents")
        if images is not None and (images.dtype != torch.uint8 or images.dim() != 4 or len(images) != n):
            raise ValueError(f"images must be uint8 [{n}, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        if segmentation is not None and (segmentation.is_floating_point() or segmentation.dim() != 3
                                         or len(segmentation) != n):
            raise ValueError(f"segmentation maps must be integer [{n}, H, W], got {segmentation.dtype} "
                             f"{tuple(segmentation.shape)}")
        self.captions = list(captions) if captions is not None else None
        self.labels = torch.as_tensor(labels, dtype=torch.long) if labels is not None else None
        self.class_names = list(class_names) if class_names else None
        self.images, self.segmentation = images, segmentation
        self.segmentation_classes = list(segmentation_classes) if segmentation_classes else None
        self.index = index

    def __len__(self) -> int:
        return self.mean.shape[0]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.mean.shape[1:])

    @property
    def num_classes(self) -> int | None:
        if self.labels is None:
            return None
        return len(self.class_names) if self.class_names else int(self.labels.max()) + 1

    def conditions(self, kind: str, indices) -> list | None:
        """The conditions of items `indices` for a run conditioned on `kind` ("text", "class", "none")."""
        if kind == "text":
            return [self.captions[i] for i in indices]
        if kind == "class":
            return self.labels[torch.as_tensor(indices, dtype=torch.long)].tolist()
        return None

    def check_conditioning(self, kind: str, where: str) -> None:
        if kind == "text" and self.captions is None:
            raise ValueError(f"conditioning 'text' needs captions, but {where} has none")
        if kind == "class" and self.labels is None:
            raise ValueError(f"conditioning 'class' needs labels, but {where} has none")

    def first_conditions(self, kind: str, n: int) -> list:
        """The first `n` distinct conditions of the data (sample grids)."""
        if kind == "none":
            return []
        pool = self.captions if kind == "text" else self.labels.tolist()
        return list(dict.fromkeys(pool))[:n]

    def fingerprint(self) -> dict:
        """What a resumed run checks: the data it continues on is the data it started with."""
        return {"num_items": len(self), "latent_shape": list(self.latent_shape),
                "mean_sha256": tensors_sha256({"mean": self.mean[: min(len(self), 256)]})}


def open_latents(path: str | Path) -> LatentData:
    """A latent cache folder (`encode_dataset`) as LatentData (already scaled)."""
    if not path:
        raise ValueError("latents: a latent cache folder is required (make one with `ldm cache-latents`)")
    cache = CachedLatents(path, sample=False)
    return LatentData(cache.mean, cache.std, captions=cache.captions, labels=cache.labels,
                      class_names=cache.class_names, images=cache.images, segmentation=cache.segmentation,
                      segmentation_classes=cache.segmentation_classes, index=cache.index)


def check_cache_matches(data: LatentData, autoencoder: torch.nn.Module, where: str, autoencoder_path: str) -> None:
    """Refuse a cache encoded with other autoencoder weights than the ones samples are decoded with."""
    want = ((data.index or {}).get("autoencoder") or {}).get("weights_sha256")
    if want and want != weights_sha256(autoencoder):
        raise ValueError(f"{where} was encoded with other autoencoder weights than "
                         f"{autoencoder_path}; rebuild the cache or pass the autoencoder it was made with")
