"""A bundled synthetic data set of captioned flat-colour shapes.

Every sample is computed from ``(seed, split, index)``: nothing is downloaded
or stored, so the set is identical on every machine. An image shows one or
two flat-coloured shapes (circle, square, upright triangle) on a white
background, with a caption such as ``"a red circle"`` or
``"a red circle to the left of a blue square"``.

Compositional split (fixed, see docs/data.md):

* ``HELDOUT_OBJECTS`` -- colour/shape pairs that never occur in any training
  caption (neither alone nor as part of a pair). The model sees the colour on
  other shapes and the shape in other colours.
* ``HELDOUT_TRIPLES`` -- ``(shape_a, relation, shape_b)`` phrasings that never
  occur in training, whatever the colours. (The converse phrasing, e.g.
  "triangle below circle" for "circle above triangle", is a training caption:
  the held-out thing is the caption composition.)

A caption is held out when it contains a held-out object or its relation
triple is held out; every other caption is a training caption. The two sets
are disjoint and together cover every caption the grammar can produce.

Geometry makes the relation unambiguous: shapes do not overlap, they are
separated by a gap along the relation axis, and the centre offset across the
axis is at most half the offset along it (so the dominant axis of the
displacement between bounding-box centres always names the relation).
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

# Palette: well separated hues so that blurred/noisy renders still classify.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "yellow": (240, 220, 20),
    "green": (30, 170, 50),
    "blue": (40, 70, 220),
}
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
CONVERSE = {"to the left of": "to the right of", "to the right of": "to the left of",
            "above": "below", "below": "above"}

HELDOUT_OBJECTS: frozenset[tuple[str, str]] = frozenset({("green", "triangle"), ("yellow", "square")})
HELDOUT_TRIPLES: frozenset[tuple[str, str, str]] = frozenset({
    ("circle", "above", "triangle"),
    ("square", "to the left of", "circle"),
    ("triangle", "to the right of", "square"),
})

SPLITS = ("train", "heldout")
MIN_SIZE = 16  # smallest image side the generator and analyser support


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str

    def __post_init__(self):
        if self.colour not in COLOURS:
            raise ValueError(f"colour {self.colour!r} is not one of {sorted(COLOURS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape {self.shape!r} is not one of {list(SHAPES)}")


@dataclass(frozen=True)
class Spec:
    """What an image shows: one object, or two objects and the relation of the first to the second."""
    objects: tuple[Obj, ...]
    relation: str | None = None

    def __post_init__(self):
        if len(self.objects) not in (1, 2):
            raise ValueError(f"a spec holds 1 or 2 objects, got {len(self.objects)}")
        if len(self.objects) == 2:
            if self.relation not in RELATIONS:
                raise ValueError(f"relation {self.relation!r} is not one of {list(RELATIONS)}")
            if self.objects[0] == self.objects[1]:
                raise ValueError(f"the two objects of a spec must differ, got {self.objects[0]} twice")
        elif self.relation is not None:
            raise ValueError(f"a single-object spec has no relation, got {self.relation!r}")

    @property
    def triple(self) -> tuple[str, str, str] | None:
        if self.relation is None:
            return None
        return (self.objects[0].shape, self.relation, self.objects[1].shape)


def caption(spec: Spec) -> str:
    """``Spec`` -> caption text, e.g. "a red circle to the left of a blue square"."""
    words = [f"a {o.colour} {o.shape}" for o in spec.objects]
    if spec.relation is None:
        return words[0]
    return f"{words[0]} {spec.relation} {words[1]}"


_OBJ = r"an? (\w+) (\w+)"
_CAPTION_RE = re.compile(rf"^{_OBJ}(?: ({'|'.join(map(re.escape, RELATIONS))}) {_OBJ})?$")


def parse_caption(text: str) -> Spec:
    """Caption text -> ``Spec`` (inverse of :func:`caption`; case and extra spaces are ignored)."""
    norm = " ".join(str(text).lower().strip().rstrip(".").split())
    m = _CAPTION_RE.match(norm)
    if m is None:
        raise ValueError(
            f"caption {text!r} does not follow the shapes grammar "
            f"'a <colour> <shape>[ <relation> a <colour> <shape>]' with colours {sorted(COLOURS)}, "
            f"shapes {list(SHAPES)}, relations {list(RELATIONS)}")
    c1, s1, rel, c2, s2 = m.groups()
    if rel is None:
        return Spec((Obj(c1, s1),))
    return Spec((Obj(c1, s1), Obj(c2, s2)), rel)


def is_heldout(spec: Spec) -> bool:
    if any((o.colour, o.shape) in HELDOUT_OBJECTS for o in spec.objects):
        return True
    return spec.triple in HELDOUT_TRIPLES


def converse(spec: Spec) -> Spec:
    """The same scene described from the other object: "A to the right of B" -> "B to the left of A"."""
    if spec.relation is None:
        return spec
    return Spec((spec.objects[1], spec.objects[0]), CONVERSE[spec.relation])


def forward_caption(text: str) -> str:
    """The caption of the same scene that names the left / upper object first ("to the left of",
    "above"), unless that phrasing is a held-out caption (then ``text`` comes back unchanged).

    A training stage on these captions ties the first-named object to the left / top, which a
    text-conditioned model picks up quickly; the full set of phrasings, where which object goes
    left depends on both word order and the relation word, is then learned from there (see
    examples/shapes/recipe.py). The held-out split stays untouched: no held-out caption is
    ever produced."""
    spec = parse_caption(text)
    if spec.relation not in ("to the right of", "below"):
        return text
    flipped = converse(spec)
    return text if is_heldout(flipped) else caption(flipped)


def all_specs() -> list[Spec]:
    """Every spec the grammar can produce, in a fixed order (singles first)."""
    objs = [Obj(c, s) for c in COLOURS for s in SHAPES]
    singles = [Spec((o,)) for o in objs]
    pairs = [Spec((a, b), r) for a, b in itertools.permutations(objs, 2) for r in RELATIONS]
    return singles + pairs


def split_specs(split: str) -> list[Spec]:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {list(SPLITS)}")
    want_heldout = split == "heldout"
    return [s for s in all_specs() if is_heldout(s) == want_heldout]


def all_prompts() -> list[str]:
    """All captions in a fixed order; a sample's ``label`` indexes this list."""
    return [caption(s) for s in all_specs()]


def train_prompts() -> list[str]:
    return [caption(s) for s in split_specs("train")]


def heldout_prompts() -> list[str]:
    return [caption(s) for s in split_specs("heldout")]


# ----------------------------------------------------------------------------- rendering

_SUPERSAMPLE = 4  # draw at 4x and box-downsample: soft, anti-aliased edges


def _check_size(size: int) -> int:
    if not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise ValueError(f"image size {size!r} must be an integer >= {MIN_SIZE}")
    return int(size)


def _layout(spec: Spec, size: int, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """Place the objects: a list of (centre_x, centre_y, side) in pixels, one per object."""
    margin = 0.06 * size
    if len(spec.objects) == 1:
        side = rng.uniform(0.30, 0.60) * size
        lo, hi = margin + side / 2, size - margin - side / 2
        return [(rng.uniform(lo, hi), rng.uniform(lo, hi), side)]
    gap = max(2.0, 0.08 * size)
    horizontal = spec.relation in ("to the left of", "to the right of")
    # first object is before (left/above) the second when the relation says so
    first_before = spec.relation in ("to the left of", "above")
    for _ in range(100):
        sa, sb = rng.uniform(0.24, 0.38, size=2) * size
        # coordinates along the relation axis: the earlier object at u1, the later at u2
        s1, s2 = (sa, sb) if first_before else (sb, sa)
        lo1, hi1 = margin + s1 / 2, size - margin - s1 / 2
        lo2, hi2 = margin + s2 / 2, size - margin - s2 / 2
        d_min = (s1 + s2) / 2 + gap
        if hi2 - d_min < lo1:
            continue
        u1 = rng.uniform(lo1, min(hi1, hi2 - d_min))
        u2 = rng.uniform(max(lo2, u1 + d_min), hi2)
        d_axis = u2 - u1
        # across the axis: offset at most half the distance along it
        v1 = rng.uniform(lo1, hi1)
        a2, b2 = max(lo2, v1 - 0.5 * d_axis), min(hi2, v1 + 0.5 * d_axis)
        if a2 > b2:
            continue
        v2 = rng.uniform(a2, b2)
        p1, p2 = ((u1, v1), (u2, v2)) if horizontal else ((v1, u1), (v2, u2))
        pa, pb = (p1, p2) if first_before else (p2, p1)
        return [(pa[0], pa[1], sa), (pb[0], pb[1], sb)]
    raise RuntimeError(f"could not place {caption(spec)!r} in a {size}x{size} image")  # pragma: no cover


def _draw(draw: ImageDraw.ImageDraw, obj: Obj, cx: float, cy: float, side: float, k: int) -> None:
    x0, y0, x1, y1 = (cx - side / 2) * k, (cy - side / 2) * k, (cx + side / 2) * k, (cy + side / 2) * k
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif obj.shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    else:  # upright isosceles triangle filling its box
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def render(spec: Spec, size: int = 32, rng: np.random.Generator | int | None = None,
           return_layout: bool = False):
    """Draw ``spec`` at a random valid layout: a ``size`` x ``size`` RGB PIL image.

    With ``return_layout=True`` also returns the boxes ``[(x0, y0, x1, y1), ...]``
    (pixels, one per object in spec order).
    """
    size = _check_size(size)
    if not isinstance(spec, Spec):
        raise ValueError(f"spec must be a shapes.Spec (use parse_caption for text), got {type(spec).__name__}")
    rng = np.random.default_rng(rng)
    layout = _layout(spec, size, rng)
    k = _SUPERSAMPLE
    big = Image.new("RGB", (size * k, size * k), BACKGROUND)
    draw = ImageDraw.Draw(big)
    for obj, (cx, cy, side) in zip(spec.objects, layout):
        _draw(draw, obj, cx, cy, side, k)
    img = big.resize((size, size), Image.BOX)
    if return_layout:
        boxes = [(cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2) for cx, cy, s in layout]
        return img, boxes
    return img


# Per-pixel classes of segmentation maps (render_segmentation, ShapesDataset(segmentation=True)).
SEGMENTATION_CLASSES: tuple[str, ...] = ("background",) + SHAPES


def render_segmentation(spec: Spec, boxes, size: int = 32) -> np.ndarray:
    """The per-pixel class map of an image drawn by :func:`render`: ``[size, size]`` uint8,
    index into ``SEGMENTATION_CLASSES`` (0 = background, then circle, square, triangle).

    ``boxes`` is what ``render(spec, size, rng, return_layout=True)`` returns with the image,
    so the map is drawn from the very layout of that image (and no random numbers are used).
    A pixel gets the class covering most of its 4x4 supersamples (the drawing the image's
    anti-aliased pixels are averaged from).
    """
    size = _check_size(size)
    if len(boxes) != len(spec.objects):
        raise ValueError(f"{len(boxes)} boxes for {len(spec.objects)} objects")
    k = _SUPERSAMPLE
    big = Image.new("L", (size * k, size * k), 0)
    draw = ImageDraw.Draw(big)
    for obj, (x0, y0, x1, y1) in zip(spec.objects, boxes):
        x0, y0, x1, y1 = x0 * k, y0 * k, x1 * k, y1 * k
        fill = 1 + SHAPES.index(obj.shape)
        if obj.shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif obj.shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    cells = np.asarray(big, dtype=np.uint8).reshape(size, k, size, k).transpose(0, 2, 1, 3).reshape(size, size, -1)
    counts = np.stack([(cells == c).sum(-1) for c in range(len(SEGMENTATION_CLASSES))], axis=-1)
    return counts.argmax(-1).astype(np.uint8)  # ties go to the lower class (background first)


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL -> float tensor [3, H, W] in [-1, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


# ----------------------------------------------------------------------------- data set

_SPLIT_SALT = {"train": 0x5A17, "heldout": 0x4E1D}


class ShapesDataset(torch.utils.data.Dataset):
    """Deterministic captioned shapes: item ``i`` depends only on (seed, split, size, i).

    Items are dicts ``{"image": float [3, size, size] in [-1, 1], "caption": str,
    "label": int (index into all_prompts()), "spec": Spec}``. Use
    :func:`collate` in a DataLoader (``Spec`` is not a tensor).

    ``p_single``: probability that a sample shows a single object (else two).
    ``segmentation=True`` adds ``"segmentation"``: long [size, size], the per-pixel class
    (index into ``SEGMENTATION_CLASSES``) of the same image; images, captions and labels are
    the same either way.
    """

    def __init__(self, split: str = "train", size: int = 32, length: int = 10000, seed: int = 0,
                 p_single: float = 0.3, segmentation: bool = False):
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {list(SPLITS)}")
        self.size = _check_size(size)
        if not isinstance(length, (int, np.integer)) or length < 1:
            raise ValueError(f"length {length!r} must be a positive integer")
        if not 0.0 <= p_single <= 1.0:
            raise ValueError(f"p_single {p_single!r} must be in [0, 1]")
        self.split, self.length, self.seed, self.p_single = split, int(length), int(seed), float(p_single)
        self.segmentation = bool(segmentation)
        specs = split_specs(split)
        self.singles = [s for s in specs if len(s.objects) == 1]
        self.pairs = [s for s in specs if len(s.objects) == 2]
        self._label = {caption(s): i for i, s in enumerate(all_specs())}

    def __len__(self) -> int:
        return self.length

    def spec_at(self, index: int) -> tuple[Spec, np.random.Generator]:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for a data set of length {self.length}")
        index %= self.length
        rng = np.random.default_rng([self.seed, _SPLIT_SALT[self.split], index])
        pool = self.singles if (rng.random() < self.p_single or not self.pairs) else self.pairs
        return pool[int(rng.integers(len(pool)))], rng

    def __getitem__(self, index: int) -> dict:
        spec, rng = self.spec_at(int(index))
        text = caption(spec)
        if self.segmentation:
            img, boxes = render(spec, self.size, rng, return_layout=True)
            seg = torch.from_numpy(render_segmentation(spec, boxes, self.size)).long()
            return {"image": pil_to_tensor(img), "caption": text, "label": self._label[text], "spec": spec,
                    "segmentation": seg}
        return {"image": pil_to_tensor(render(spec, self.size, rng)), "caption": text,
                "label": self._label[text], "spec": spec}


def collate(batch: list[dict]) -> dict:
    """DataLoader collate for ShapesDataset items: stacks images/labels, lists captions/specs."""
    return {"image": torch.stack([b["image"] for b in batch]),
            "caption": [b["caption"] for b in batch],
            "label": torch.tensor([b["label"] for b in batch], dtype=torch.long),
            "spec": [b["spec"] for b in batch]}
