"""Images at the library's edges: loading with clear errors, tensor <-> PIL, grids,
and PNGs that carry their generation settings in text chunks."""
from __future__ import annotations

import io
import json
import math
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, PngImagePlugin, UnidentifiedImageError


def load_image(path: str | os.PathLike, mode: str | None = "RGB", what: str = "image") -> Image.Image:
    """Open an image file fully (so truncated files fail here, not later) and convert it to `mode`
    (None: keep the file's mode, e.g. a palette class map)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} " + ("is not a file" if path.exists() else "does not exist"))
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert(mode) if mode is not None else img.copy()
    except Image.DecompressionBombError as exc:  # a header claiming more pixels than PIL's limit
        raise ValueError(f"cannot read {what} {path}: image too large ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"cannot read {what} {path}: {exc}") from None


def check_opaque(img: Image.Image, what: str = "image") -> None:
    """Refuse an image with transparent pixels where only colours count (a control image: what would
    transparent pixels mean?); an alpha channel that is opaque everywhere is fine."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        if np.asarray(img.convert("RGBA"))[..., 3].min() < 255:
            from ldmkit.errors import UserError

            raise UserError(f"{what} has transparent pixels ({img.mode}); give an opaque RGB or grayscale image")


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> float tensor [C, H, W] in [-1, 1]."""
    arr = np.asarray(img, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def tensor_to_pil(x: torch.Tensor) -> Image.Image | list[Image.Image]:
    """[C, H, W] (or [B, C, H, W]) tensor in [-1, 1] -> PIL image(s); values are clamped."""
    if x.ndim == 4:
        return [tensor_to_pil(xi) for xi in x]  # type: ignore[misc]
    if x.ndim != 3:
        raise ValueError(f"expected an image tensor [C, H, W] or [B, C, H, W], got shape {tuple(x.shape)}")
    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    if arr.shape[2] == 1:
        return Image.fromarray(arr[:, :, 0], mode="L")
    return Image.fromarray(arr)


def make_grid(images: torch.Tensor | Sequence[Image.Image], nrow: int | None = None, padding: int = 2,
              background: int = 255) -> Image.Image:
    """Tile images row-major into one picture; `nrow` images per row (default: about square)."""
    pils = tensor_to_pil(images) if isinstance(images, torch.Tensor) else list(images)
    if isinstance(pils, Image.Image):
        pils = [pils]
    if not pils:
        raise ValueError("make_grid needs at least one image")
    pils = [p.convert("RGB") for p in pils]
    w = max(p.width for p in pils)
    h = max(p.height for p in pils)
    ncol = nrow or math.ceil(math.sqrt(len(pils)))
    nrows = math.ceil(len(pils) / ncol)
    grid = Image.new("RGB", (ncol * w + (ncol + 1) * padding, nrows * h + (nrows + 1) * padding), (background,) * 3)
    for i, p in enumerate(pils):
        r, c = divmod(i, ncol)
        grid.paste(p, (padding + c * (w + padding), padding + r * (h + padding)))
    return grid


def png_bytes(img: Image.Image, metadata: dict | None = None) -> bytes:
    """The PNG file of `img` whose text chunks hold `metadata`: `ldmkit` with all of it as JSON, and
    A1111's `parameters` (`io.infotext`), which other image tools read."""
    from ldmkit.io.infotext import infotext

    info = PngImagePlugin.PngInfo()
    if metadata:
        info.add_text("ldmkit", json.dumps(metadata, sort_keys=True))
        text = infotext(metadata)
        if text:
            info.add_text("parameters", text)
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(img: Image.Image, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write `png_bytes(img, metadata)` to `path`, atomically."""
    from ldmkit.io.files import atomic_write

    data = png_bytes(img, metadata)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write)


_NUMBERED = re.compile(r"(?:grid-)?(\d{5,})-?")  # NNNNN-SEED.png, grid-NNNNN.png


def reserve_numbered(folder: str | os.PathLike, seeds: Sequence[int], grid: bool = False) -> tuple[list[Path], Path | None]:
    """Names for new images in `folder`: NNNNN-SEED.png numbered after the files already there (as
    AUTOMATIC1111 numbers them), and grid-NNNNN.png when `grid`. Each name is created empty at once
    (O_EXCL), so no other writer -- a second command, a server -- can take it; the images then
    replace these placeholders. Nothing is ever overwritten."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    numbers = [int(m.group(1)) for f in folder.iterdir() if (m := _NUMBERED.match(f.name))]
    n = max(numbers, default=-1) + 1
    paths = []
    for name in [f"{{:05d}}-{seed}.png" for seed in seeds] + (["grid-{:05d}.png"] if grid else []):
        while True:
            path = folder / name.format(n)
            n += 1
            try:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                break
            except FileExistsError:
                continue
        paths.append(path)
    return (paths[:-1], paths[-1]) if grid else (paths, None)


def read_png_text(path: str | os.PathLike, what: str = "image") -> dict:
    """The text chunks of an image file ({} for a format without them), with one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} " + ("is not a file" if path.exists() else "does not exist"))
    try:
        with Image.open(path) as img:
            img.load()  # chunks after the image data are read with it
            return {str(k): str(v) for k, v in (getattr(img, "text", None) or {}).items()}
    except Image.DecompressionBombError as exc:
        raise ValueError(f"cannot read {what} {path}: image too large ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"cannot read {what} {path}: {exc}") from None


def read_png_metadata(path: str | os.PathLike) -> dict:
    """The settings a PNG written by `save_png` carries (the `ldmkit` JSON chunk; else all text chunks)."""
    with Image.open(path) as img:
        text = dict(getattr(img, "text", {}) or {})
    if "ldmkit" in text:
        return json.loads(text["ldmkit"])
    return text


def save_images(images: Iterable[Image.Image], folder: str | os.PathLike, prefix: str = "image") -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        p = folder / f"{prefix}-{i:04d}.png"
        img.save(p)
        paths.append(p)
    return paths
