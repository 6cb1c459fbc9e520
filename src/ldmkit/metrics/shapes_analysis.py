"""Read a shapes image back: which coloured shapes it shows and how they are placed.

This is how prompt adherence of a model trained on :mod:`ldmkit.data.shapes`
is scored. Plain image processing is enough because the shapes are flat
colours on a white background:

1. Colour: every pixel gets the palette colour with the nearest *hue*
   (within ``HUE_TOLERANCE`` degrees) and a strength = its chroma divided by
   that palette colour's chroma. Pixels with strength >= 0.5 are foreground.
   Hue/chroma are used rather than RGB distance because a blurred edge is a
   blend with white: it keeps the hue and loses chroma, whereas in RGB a
   half-red pixel is nearer to yellow than to red. Threshold 0.5 puts the
   boundary where a symmetric blur puts the original edge.
2. Blobs: 8-connected components per colour; blobs smaller than
   0.6% of the image (at least 4 pixels) or than 10% of the largest blob, and
   faint blobs (90th-percentile strength < 0.65: tinted smudges in the
   background) are noise.
3. Shape: analysis by synthesis on the blob's *soft* strength map (strength
   is linear in coverage for a blend with white, and blur preserves its mass,
   centroid and adds sigma^2 to each axis variance). For each ideal shape and
   each candidate blur sigma, the ideal shape is fitted to those moments,
   rendered, blurred and compared with the map; the smallest squared error
   wins. Fitting the blur as well keeps blurred squares from reading as circles.
4. Relation of object A to B: the dominant axis of the displacement between
   bounding-box centres (the generator guarantees it is dominant by 2x).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ldmkit.data.shapes import COLOURS, MIN_SIZE, Spec, parse_caption

HUE_TOLERANCE = 35.0  # degrees
STRENGTH_THRESHOLD = 0.5
MIN_BLOB_FRACTION = 0.006  # of the image area
MIN_BLOB_RELATIVE = 0.10  # of the largest blob
MIN_BLOB_PEAK = 0.65  # a shape's 90th-percentile strength reaches this; tinted smudges do not
_PAD = 4  # margin (pixels) around a blob for its blurred fringe and the fitted shape


def _hue_chroma(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """rgb float [..., 3] in [0, 1] -> (hue in degrees [0, 360), chroma in [0, 1])."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    c = mx - mn
    safe = np.where(c > 1e-6, c, 1.0)
    h = np.where(mx == r, ((g - b) / safe) % 6.0,
                 np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    return (h * 60.0) % 360.0, c


_NAMES = list(COLOURS)
_PAL_HUE, _PAL_CHROMA = _hue_chroma(np.array([COLOURS[n] for n in _NAMES], dtype=np.float64) / 255.0)


def to_rgb_array(image) -> np.ndarray:
    """PIL image, uint8 HxWx3 array, or float tensor/array [3, H, W] (or [1, 3, H, W]) in
    [-1, 1] -> float64 HxWx3 in [0, 1]."""
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    elif isinstance(image, (torch.Tensor, np.ndarray)):
        t = image.detach().float().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim == 3 and t.shape[0] == 3 and t.shape[-1] != 3:
            arr = (t.transpose(1, 2, 0).astype(np.float64) + 1.0) / 2.0  # CHW in [-1, 1]
        elif t.ndim == 3 and t.shape[-1] == 3 and t.dtype == np.uint8:
            arr = t.astype(np.float64) / 255.0
        else:
            raise ValueError(f"image array of shape {tuple(t.shape)} and dtype {t.dtype}: expected a "
                             "float [3, H, W] tensor in [-1, 1] or a uint8 [H, W, 3] array")
    else:
        raise ValueError(f"image of type {type(image).__name__}: expected a PIL image, tensor or array")
    if min(arr.shape[:2]) < MIN_SIZE:
        raise ValueError(f"image of size {arr.shape[1]}x{arr.shape[0]} is too small; each side must be >= {MIN_SIZE}")
    return np.clip(arr, 0.0, 1.0)


def _colour_planes(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (nearest palette index, strength = chroma / palette chroma, hue within tolerance)."""
    hue, chroma = _hue_chroma(arr)
    d = np.abs(hue[..., None] - _PAL_HUE)
    d = np.minimum(d, 360.0 - d)
    idx = d.argmin(-1)
    return idx, chroma / _PAL_CHROMA[idx], d.min(-1) <= HUE_TOLERANCE


def colour_map(image) -> np.ndarray:
    """Per-pixel palette index (into ``list(COLOURS)``), -1 for background/unknown."""
    idx, strength, hue_ok = _colour_planes(to_rgb_array(image))
    return np.where(hue_ok & (strength >= STRENGTH_THRESHOLD), idx, -1)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, each as an array of (y, x) pixels."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    comps = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pix = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pix.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                        seen[yy, xx] = True
                        queue.append((yy, xx))
        comps.append(np.array(pix))
    return comps


# Ideal shapes in a unit box (apex of the triangle at the top): area fraction, centroid
# and per-axis variance. A blob's moments give the box that each ideal shape would need.
_IDEAL = {
    "circle": dict(area=np.pi / 4, cx=0.5, cy=0.5, vx=1 / 16, vy=1 / 16),
    "square": dict(area=1.0, cx=0.5, cy=0.5, vx=1 / 12, vy=1 / 12),
    "triangle": dict(area=0.5, cx=0.5, cy=2 / 3, vx=1 / 24, vy=1 / 18),
}


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Box-relative coordinates (u right, v down, both in [0, 1] inside the box) -> bool mask."""
    box = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == "square":
        return box
    return box & (np.abs(u - 0.5) <= v / 2)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions of ``mask`` that do not touch its border."""
    outside = np.zeros_like(mask)
    for comp in _components(~mask):
        if comp[:, 0].min() == 0 or comp[:, 1].min() == 0 or \
                comp[:, 0].max() == mask.shape[0] - 1 or comp[:, 1].max() == mask.shape[1] - 1:
            outside[comp[:, 0], comp[:, 1]] = True
    return ~outside


BLUR_SIGMAS = (0.0, 0.5, 0.8, 1.1, 1.5, 2.0, 2.6)  # candidate blurs, pixels


def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """[n, n] matrix applying a 1-D Gaussian blur with zero padding."""
    if sigma <= 0:
        return np.eye(n)
    x = np.arange(n)
    k = np.exp(-((x[:, None] - x[None, :]) ** 2) / (2 * sigma ** 2))
    return k / (np.sqrt(2 * np.pi) * sigma)


def shape_scores(soft: np.ndarray) -> dict[str, float]:
    """Soft map of one blob (coverage-like values in [0, 1], 0 away from the blob, with a
    margin of a few pixels) -> relative squared error of the best-fitting blurred ideal
    of each shape (lower is better)."""
    mass = soft.sum()
    if mass <= 0:
        raise ValueError("shape_scores needs a non-empty soft map")
    hh, ww = soft.shape
    ys, xs = np.mgrid[0:hh, 0:ww] + 0.5
    cx, cy = (soft * xs).sum() / mass, (soft * ys).sum() / mass
    vx = (soft * (xs - cx) ** 2).sum() / mass
    vy = (soft * (ys - cy) ** 2).sum() / mass
    k = 4  # supersampling of the ideal shape
    gy, gx = np.meshgrid((np.arange(hh * k) + 0.5) / k, (np.arange(ww * k) + 0.5) / k, indexing="ij")
    norm = (soft ** 2).sum()
    scores = {name: np.inf for name in _IDEAL}
    for sigma in BLUR_SIGMAS:
        # pixel sampling adds 1/12 to the variance, the blur sigma^2
        tvx, tvy = vx - sigma ** 2 - 1 / 12, vy - sigma ** 2 - 1 / 12
        if min(tvx, tvy) < 0.25:  # the blob is too small for this much blur
            continue
        bh, bw = _blur_matrix(hh, sigma), _blur_matrix(ww, sigma)
        for name, p in _IDEAL.items():
            aspect = np.sqrt((tvx / p["vx"]) / (tvy / p["vy"]))  # box w / h
            h = np.sqrt(mass / (p["area"] * aspect))
            w = aspect * h
            x0, y0 = cx - p["cx"] * w, cy - p["cy"] * h
            t = _inside(name, (gx - x0) / w, (gy - y0) / h).reshape(hh, k, ww, k).mean(axis=(1, 3))
            t = bh @ t @ bw.T
            scores[name] = min(scores[name], float(((soft - t) ** 2).sum() / norm))
    return scores


def classify_shape(soft: np.ndarray) -> str:
    """Soft map of one blob -> "circle" | "square" | "triangle" (see :func:`shape_scores`)."""
    scores = shape_scores(soft)
    return min(scores, key=scores.get)


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        p = np.pad(mask, 1)
        h, w = mask.shape
        mask = np.zeros_like(mask)
        for dy in range(3):
            for dx in range(3):
                mask |= p[dy:dy + h, dx:dx + w]
    return mask


@dataclass
class Detected:
    colour: str
    shape: str
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive)
    area: int

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.bbox
        return ((x0 + x1) / 2.0, (y0 + y1) / 2.0)


@dataclass
class Analysis:
    objects: list[Detected] = field(default_factory=list)  # largest first
    relation: str | None = None  # of objects[0] to objects[1] when exactly two objects

    def describe(self) -> str:
        words = [f"a {o.colour} {o.shape}" for o in self.objects]
        if self.relation is not None:
            return f"{words[0]} {self.relation} {words[1]}"
        return ", ".join(words) if words else "(nothing)"


def relation_between(a: Detected, b: Detected) -> str:
    """Relation of ``a`` to ``b`` along the dominant axis of their centre displacement."""
    dx = b.centre[0] - a.centre[0]
    dy = b.centre[1] - a.centre[1]
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def analyse(image) -> Analysis:
    """Detect the flat-colour shapes in ``image`` (PIL, uint8 HWC array or [-1, 1] CHW tensor)."""
    idx, strength, hue_ok = _colour_planes(to_rgb_array(image))
    cmap = np.where(hue_ok & (strength >= STRENGTH_THRESHOLD), idx, -1)
    h, w = cmap.shape
    blobs = [(ci, pix) for ci in range(len(_NAMES)) for pix in _components(cmap == ci)
             # a faint tinted smudge is not a flat-colour shape
             if np.percentile(strength[pix[:, 0], pix[:, 1]], 90) >= MIN_BLOB_PEAK]
    if not blobs:
        return Analysis()
    largest = max(len(p) for _, p in blobs)
    min_area = max(4.0, MIN_BLOB_FRACTION * h * w, MIN_BLOB_RELATIVE * largest)
    # soft strength of each colour, 0 where another hue (or none) is seen
    soft_all = np.where(hue_ok, np.clip(strength, 0.0, 1.0), 0.0)
    padded_idx = np.pad(idx, _PAD, constant_values=-1)
    padded_soft = np.pad(soft_all, _PAD)
    objects = []
    for ci, pix in blobs:
        if len(pix) < min_area:
            continue
        y0, x0 = pix.min(0)
        y1, x1 = pix.max(0) + 1
        # crop with a margin (in padded coordinates the crop starts at y0, x0)
        ch, cw = y1 - y0 + 2 * _PAD, x1 - x0 + 2 * _PAD
        blob = np.zeros((ch, cw), dtype=bool)
        blob[pix[:, 0] - y0 + _PAD, pix[:, 1] - x0 + _PAD] = True
        filled = _fill_holes(blob)
        region = _dilate(filled, 2)  # the blurred fringe around the blob, not its neighbours
        crop_idx = padded_idx[y0:y0 + ch, x0:x0 + cw]
        soft = np.where(region & (crop_idx == ci), padded_soft[y0:y0 + ch, x0:x0 + cw], 0.0)
        soft[filled & ~blob] = 1.0  # holes (noise inside the shape) count as covered
        objects.append(Detected(_NAMES[ci], classify_shape(soft), (int(x0), int(y0), int(x1), int(y1)), len(pix)))
    objects.sort(key=lambda o: -o.area)
    rel = relation_between(objects[0], objects[1]) if len(objects) == 2 else None
    return Analysis(objects, rel)


def adherence(image, prompt: str | Spec) -> dict:
    """Does ``image`` show what ``prompt`` asks for?

    Returns ``{"match", "count_ok", "colour_ok", "shape_ok", "binding_ok", "relation_ok",
    "detected"}``: count = exactly as many objects as asked; colour / shape = every asked
    colour / shape is present (as multisets); binding = every asked colour-shape object is
    present; relation = the matched objects stand in the asked relation (None for a
    single-object prompt); match = count and binding and relation all hold.
    """
    spec = prompt if isinstance(prompt, Spec) else parse_caption(prompt)
    an = analyse(image)
    det = an.objects

    def contains(have: list, want: list) -> bool:
        have = list(have)
        for x in want:
            if x not in have:
                return False
            have.remove(x)
        return True

    count_ok = len(det) == len(spec.objects)
    colour_ok = contains([o.colour for o in det], [o.colour for o in spec.objects])
    shape_ok = contains([o.shape for o in det], [o.shape for o in spec.objects])
    binding_ok = contains([(o.colour, o.shape) for o in det], [(o.colour, o.shape) for o in spec.objects])
    relation_ok = None
    if spec.relation is not None:
        found = []
        for want in spec.objects:  # the largest detection of each asked object
            found.append(next((o for o in det if (o.colour, o.shape) == (want.colour, want.shape)), None))
        relation_ok = (None not in found) and relation_between(found[0], found[1]) == spec.relation
    match = count_ok and binding_ok and relation_ok is not False
    return {"match": bool(match), "count_ok": count_ok, "colour_ok": colour_ok, "shape_ok": shape_ok,
            "binding_ok": binding_ok, "relation_ok": relation_ok, "detected": an.describe()}


_RATE_KEYS = ("match", "count_ok", "colour_ok", "shape_ok", "binding_ok", "relation_ok")


def adherence_report(images, prompts) -> dict:
    """Score many images: ``{"n", "match_rate", "count_ok_rate", ..., "relation_ok_rate"
    (over two-object prompts; None if there are none), "n_relation", "samples": [...]}``."""
    images, prompts = list(images), list(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; they must pair up")
    if not images:
        raise ValueError("adherence_report needs at least one image")
    samples = [dict(prompt=p if isinstance(p, str) else None, **adherence(im, p)) for im, p in zip(images, prompts)]
    out: dict = {"n": len(samples)}
    for k in _RATE_KEYS:
        vals = [s[k] for s in samples if s[k] is not None]
        out[f"{k}_rate"] = float(np.mean(vals)) if vals else None
    out["n_relation"] = sum(s["relation_ok"] is not None for s in samples)
    out["samples"] = samples
    return out


def heldout_causes(samples: list[dict]) -> dict:
    """Match rate of scored held-out prompts (``adherence_report(...)["samples"]``) by what makes
    each held out: one group per colour-shape pair no training caption has
    (``shapes.HELDOUT_OBJECTS``, e.g. "green triangle") and one for the held-out relation phrasings
    (``shapes.HELDOUT_TRIPLES``). A prompt counts in every group it belongs to.
    ``{group: {"n": prompts, "match_rate": rate or None}}``."""
    from ldmkit.data.shapes import HELDOUT_OBJECTS, HELDOUT_TRIPLES, parse_caption

    groups: dict[str, list[bool]] = {f"{c} {s}": [] for c, s in sorted(HELDOUT_OBJECTS)}
    phrasing = "held-out relation phrasing"
    groups[phrasing] = []
    for sample in samples:
        spec = parse_caption(sample["prompt"])
        for name in dict.fromkeys(f"{o.colour} {o.shape}" for o in spec.objects):
            if name in groups:
                groups[name].append(bool(sample["match"]))
        if spec.triple in HELDOUT_TRIPLES:
            groups[phrasing].append(bool(sample["match"]))
    return {k: {"n": len(v), "match_rate": float(np.mean(v)) if v else None} for k, v in groups.items()}


def format_report(reports: dict[str, dict]) -> str:
    """A printable table with one row per named report, e.g. ``{"train": r1, "heldout": r2}``."""
    cols = ["n"] + [f"{k}_rate" for k in _RATE_KEYS]
    heads = ["set", "n", "match", "count", "colour", "shape", "binding", "relation"]
    rows = []
    for name, r in reports.items():
        cells = [str(name), str(r["n"])]
        for c in cols[1:]:
            v = r.get(c)
            cells.append("-" if v is None else f"{100 * v:.1f}%")
        rows.append(cells)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(heads)]
    line = lambda cells: "  ".join(c.rjust(wd) if i else c.ljust(wd) for i, (c, wd) in enumerate(zip(cells, widths)))
    return "\n".join([line(heads), line(["-" * wd for wd in widths])] + [line(r) for r in rows])


def degrade(image: Image.Image, rng: np.random.Generator, noise: float = 0.0, blur: float = 0.0,
            cast: float = 0.0) -> Image.Image:
    """Gaussian blur (sigma in pixels), then a colour cast (per-channel gain in 1 +- cast and
    offset in +-cast, drawn once per image), then Gaussian pixel noise (std on the [0, 1] scale)."""
    from PIL import ImageFilter

    if blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    a = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    if cast > 0:
        a = a * rng.uniform(1 - cast, 1 + cast, 3) + rng.uniform(-cast, cast, 3)
    if noise > 0:
        a = a + rng.normal(0.0, noise, a.shape)
    return Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8))


def self_test(size: int = 32, n: int = 400, noise: float = 0.0, blur: float = 0.0, seed: int = 0,
              cast: float = 0.0) -> dict:
    """The analyser's accuracy on ``n`` fresh renders (half train, half held-out prompts),
    optionally degraded (see :func:`degrade`); ``blur`` is in pixels at 32 px and scales
    with ``size``."""
    from ldmkit.data.shapes import ShapesDataset, caption, render

    rng = np.random.default_rng(seed)
    images, prompts = [], []
    for split, count in (("train", n - n // 2), ("heldout", n // 2)):
        ds = ShapesDataset(split, size=size, length=max(count, 1), seed=seed + 1000)
        for i in range(count):
            spec, r = ds.spec_at(i)
            images.append(degrade(render(spec, size, r), rng, noise, blur * size / 32, cast))
            prompts.append(caption(spec))
    return adherence_report(images, prompts)
