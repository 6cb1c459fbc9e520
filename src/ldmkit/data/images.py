"""An image-folder dataset: any PNG/JPEG tree, optional captions and class labels.

Items are dicts `{"image": FloatTensor [C, S, S] in [-1, 1], "caption": str | None,
"label": int | None}` (use `collate` with a DataLoader).

Captions, first match wins:
  1. a same-named `.txt` next to the image (`cat.png` + `cat.txt`);
  2. a `metadata.jsonl` (lines `{"file_name": ..., "text": ...}`) or
     `metadata.csv` (columns file_name,text) in the root, the Hugging Face
     `imagefolder` layout; file names are relative to the root.
Class labels (`class_folders=True`): the first directory level names the
class (`root/cat/1.png` -> "cat"); `classes` lists them sorted, labels index it.

Transforms: resize the short side to `size` (bicubic, antialiased), center or
random crop to size x size, optional random horizontal flip. A file that cannot
be decoded is skipped with a warning and counted in `skipped`; when all files
are unreadable the dataset raises ValueError.

Label maps (`maps=DIR`, for semantic synthesis): DIR mirrors the image tree, the map of
`root/a/b.jpg` being `DIR/a/b.png` -- a grey or palette PNG whose pixel values are class ids;
it gets the image's resize (nearest), crop and flip, and the item a "segmentation" entry
(long [S, S]). Control images (`controls=DIR`, ControlNet training) mirror the tree the same way
(any image suffix), have their image's size, and get its resize (bicubic), crop and flip: a
"control" entry, float [3, S, S] in [0, 1].
"""
from __future__ import annotations

import csv
import json
import random
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def _read_metadata(root: Path) -> dict[str, str]:
    captions: dict[str, str] = {}
    jsonl, csv_path = root / "metadata.jsonl", root / "metadata.csv"
    if jsonl.is_file():
        for n, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                captions[str(row["file_name"])] = str(row.get("text", row.get("caption", "")))
            except (json.JSONDecodeError, KeyError) as exc:
                raise ValueError(f"{jsonl}:{n}: expected a JSON object with 'file_name' and 'text' ({exc})") from None
    elif csv_path.is_file():
        with csv_path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "file_name" not in reader.fieldnames:
                raise ValueError(f"{csv_path}: needs a 'file_name' column (and 'text'), got {reader.fieldnames}")
            for row in reader:
                captions[row["file_name"]] = row.get("text") or row.get("caption") or ""
    return {k.replace("\\", "/"): v for k, v in captions.items()}


def pil_to_unit_tensor(img: Image.Image) -> torch.Tensor:
    """PIL -> float tensor [C, H, W] in [-1, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def crop_plan(w: int, h: int, size: int, random_crop: bool = False,
              rng: random.Random | None = None) -> tuple[int, int, int, int]:
    """(resized width, resized height, left, top): the short side resized to `size`, a size x size crop
    (center, or random from `rng`)."""
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    if random_crop:
        rng = rng or random
        return nw, nh, rng.randint(0, nw - size), rng.randint(0, nh - size)
    return nw, nh, (nw - size) // 2, (nh - size) // 2


def apply_crop(img: Image.Image, plan: tuple[int, int, int, int], size: int, resample=Image.BICUBIC) -> Image.Image:
    nw, nh, left, top = plan
    if (nw, nh) != img.size:
        img = img.resize((nw, nh), resample, reducing_gap=None)
    return img.crop((left, top, left + size, top + size))


def resize_crop(img: Image.Image, size: int, random_crop: bool = False, rng: random.Random | None = None) -> Image.Image:
    """Resize the short side to `size`, then crop size x size (center, or random)."""
    return apply_crop(img, crop_plan(*img.size, size, random_crop, rng), size)


def class_ids(img: Image.Image, where: str) -> np.ndarray:
    """The class ids a label-map image holds: its grey values or palette indices (a grey map saved as
    RGB is accepted; a coloured one is not)."""
    if img.mode in ("L", "P", "I", "I;16", "1"):
        return np.asarray(img).astype(np.int64)
    if img.mode in ("RGB", "RGBA"):
        arr = np.asarray(img)[..., :3]
        if (arr == arr[..., :1]).all():
            return arr[..., 0].astype(np.int64)
    raise ValueError(f"{where} is a {img.mode} colour image; a class map holds one class id per pixel "
                     "(save it as a grey 'L' or palette 'P' PNG whose pixel values are the class ids)")


class ImageFolder(torch.utils.data.Dataset):
    def __init__(self, root: str | Path, size: int = 256, random_crop: bool = False, flip: bool = False,
                 channels: int = 3, class_folders: bool = False, captions: bool = True,
                 files: list[Path] | None = None, seed: int | None = None, maps: str | Path | None = None,
                 controls: str | Path | None = None):
        self.root = Path(root)
        self.maps = Path(maps) if maps is not None else None
        if self.maps is not None and not self.maps.is_dir():
            raise FileNotFoundError(f"label-map folder {self.maps} does not exist")
        self.controls = Path(controls) if controls is not None else None
        if self.controls is not None and not self.controls.is_dir():
            raise FileNotFoundError(f"control-image folder {self.controls} does not exist")
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        if size < 1:
            raise ValueError(f"size={size}: must be >= 1")
        if channels not in (1, 3):
            raise ValueError(f"channels={channels}: must be 1 or 3")
        self.size, self.random_crop, self.flip, self.channels = size, random_crop, flip, channels
        self.rng = random.Random(seed)
        if files is None:
            files = sorted(p for p in self.root.rglob("*")
                           if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {self.root}")
        self.files = list(files)
        self.skipped = 0
        self._bad: set[int] = set()
        self._metadata = _read_metadata(self.root) if captions else {}
        self.use_captions = captions
        self.classes: list[str] = []
        if class_folders:
            self.classes = sorted({p.relative_to(self.root).parts[0] for p in self.files
                                   if len(p.relative_to(self.root).parts) > 1})
            if not self.classes:
                raise ValueError(f"class_folders=True but {self.root} has no class sub-folders")
        self._class_index = {c: i for i, c in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.files)

    def caption(self, path: Path) -> str | None:
        if not self.use_captions:
            return None
        txt = path.with_suffix(".txt")
        if txt.is_file():
            return txt.read_text(encoding="utf-8").strip()
        return self._metadata.get(path.relative_to(self.root).as_posix())

    def label(self, path: Path) -> int | None:
        if not self.classes:
            return None
        parts = path.relative_to(self.root).parts
        return self._class_index.get(parts[0]) if len(parts) > 1 else None

    def map_path(self, path: Path) -> Path:
        """The label map of image `path` (maps mirror the image tree, as PNG)."""
        return (self.maps / path.relative_to(self.root)).with_suffix(".png")

    def load_map(self, path: Path) -> Image.Image:
        m = self.map_path(path)
        if not m.is_file():
            raise ValueError(f"image {path} has no label map {m} (maps mirror the image folder, as PNG)")
        with Image.open(m) as im:
            im.load()
            return Image.fromarray(class_ids(im, f"label map {m}").astype(np.int32), mode="I")

    def control_path(self, path: Path) -> Path:
        """The control image of image `path`: the same relative path under `controls`, any image suffix."""
        base = self.controls / path.relative_to(self.root)
        for suffix in (path.suffix, ".png", *sorted(IMAGE_EXTENSIONS)):
            if base.with_suffix(suffix).is_file():
                return base.with_suffix(suffix)
        raise ValueError(f"image {path} has no control image {base.with_suffix('.png')} (control images mirror "
                         "the image folder)")

    def check_control(self, path: Path) -> None:
        """Refuse, from its header, a control image that is missing, of another size than its image, or
        with an alpha channel (what would transparent control pixels mean?)."""
        c = self.control_path(path)
        with Image.open(path) as im, Image.open(c) as ctrl:
            if ctrl.size != im.size:
                raise ValueError(f"control image {c} is {ctrl.size[0]}x{ctrl.size[1]}, its image {path} "
                                 f"{im.size[0]}x{im.size[1]}: they must have one size")
            if ctrl.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in ctrl.info:
                raise ValueError(f"control image {c} has an alpha channel ({ctrl.mode}); save it as RGB or grey")

    def load_control(self, path: Path) -> Image.Image:
        with Image.open(self.control_path(path)) as im:
            im.load()
            return im.convert("RGB")

    def _load(self, path: Path) -> Image.Image:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB" if self.channels == 3 else "L")

    def __getitem__(self, index: int) -> dict:
        return self.item(index)

    def item(self, index: int, rng: random.Random | None = None) -> dict:
        """Item `index`; crop/flip draws come from `rng` (default: the dataset's own seeded stream),
        so a caller can make augmentation a function of (seed, step) for exact resume."""
        rng = rng or self.rng
        n = len(self.files)
        for attempt in range(n):
            i = (index + attempt) % n
            if i in self._bad:
                continue
            path = self.files[i]
            try:
                img = self._load(path)
                control = self.load_control(path) if self.controls is not None else None  # skipped with its image
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                self._bad.add(i)
                self.skipped += 1
                warnings.warn(f"skipping unreadable image {path}: {exc}", stacklevel=2)
                continue
            seg = self.load_map(path) if self.maps is not None else None
            if seg is not None and seg.size != img.size:
                raise ValueError(f"label map {self.map_path(path)} is {seg.size[0]}x{seg.size[1]}, its image "
                                 f"{path} {img.size[0]}x{img.size[1]}: they must have one size")
            if control is not None and control.size != img.size:
                raise ValueError(f"control image {self.control_path(path)} is {control.size[0]}x{control.size[1]}, "
                                 f"its image {path} {img.size[0]}x{img.size[1]}: they must have one size")
            source = img.size
            plan = crop_plan(*img.size, self.size, self.random_crop, rng)
            img = apply_crop(img, plan, self.size)
            flip = self.flip and rng.random() < 0.5
            if flip:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            nw, _, left, top = plan
            item = {"image": pil_to_unit_tensor(img), "caption": self.caption(path), "label": self.label(path),
                    # SDXL's micro-conditioning: the source size (h, w) and the crop's corner (top, left)
                    "original_size": (source[1], source[0]), "crop_top_left": (top, nw - left - self.size if flip else left)}
            if seg is not None:
                seg = apply_crop(seg, plan, self.size, Image.NEAREST)
                seg = seg.transpose(Image.FLIP_LEFT_RIGHT) if flip else seg
                item["segmentation"] = torch.from_numpy(np.asarray(seg).astype(np.int64))
            if control is not None:  # [3, S, S] in [0, 1], cropped and flipped with the image
                control = apply_crop(control, plan, self.size)
                control = control.transpose(Image.FLIP_LEFT_RIGHT) if flip else control
                item["control"] = pil_to_unit_tensor(control).add(1).div(2)
            return item
        raise ValueError(f"all {n} images under {self.root} are unreadable")

    def split(self, holdout: float | int, seed: int = 0, **train_overrides) -> tuple["ImageFolder", "ImageFolder"]:
        """Deterministic (train, held-out) split of the files; the held-out part uses center crops, no flips."""
        n = len(self.files)
        k = int(round(holdout * n)) if isinstance(holdout, float) and holdout < 1 else int(holdout)
        if not 1 <= k < n:
            raise ValueError(f"holdout={holdout} gives {k} of {n} images: need 1 <= held-out < total")
        order = list(range(n))
        random.Random(seed).shuffle(order)
        held = sorted(order[:k])
        train = sorted(order[k:])
        common = dict(size=self.size, channels=self.channels, captions=self.use_captions, seed=seed, maps=self.maps)

        def make(idx, **kw):
            ds = ImageFolder(self.root, files=[self.files[i] for i in idx], **{**common, **kw})
            ds.classes, ds._class_index = self.classes, self._class_index
            return ds

        return (make(train, random_crop=self.random_crop, flip=self.flip, **train_overrides),
                make(held, random_crop=False, flip=False))


def collate(items: list[dict]) -> dict:
    """Stack images; keep captions and labels as lists."""
    return {"image": torch.stack([it["image"] for it in items]),
            "caption": [it["caption"] for it in items],
            "label": [it["label"] for it in items]}
