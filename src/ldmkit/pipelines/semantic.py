"""Semantic image synthesis with a concat-conditioned LDM (the LDM paper's segmentation-map models).

    results = pipe.semantic2img("map.png", "a red circle", num=2, seed=1, steps=20, guidance=3)

The input is a class map: an integer tensor / array [H, W] (or a batch [B, H, W], or a list of
maps of one size), a PIL image or a PNG file whose pixel values are the class ids (grey "L" or
palette "P" images; a grey image stored as RGB is accepted, a coloured one is not). The map has
the output's size, a multiple of the autoencoder's factor f. It is one-hot encoded and
nearest-resized to the latent grid (`ldmkit.conditioning.spatial.one_hot_map`, the function the
trainer's SpatialConditioner uses, so the denoiser sees exactly what it was trained on) and
concatenated to the noisy latents:

    denoiser input = [z_t, one-hot map at latent size]      (latent channels + num_classes)

Classifier-free guidance drops only the text / class condition: the map stays in both branches,
as `ldm train --spatial semantic`'s condition dropout trains it. Image i uses seed + i, map
i % B and prompt i % P (a list of P prompts); `num` defaults to max(B, P).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ldmkit.data.images import class_ids
from ldmkit.pipelines.base import PipelineCore, Result, image_count


def _one_map(m, where: str) -> tuple[torch.Tensor, str | None]:
    """One map or a batch of maps -> (integer [b, H, W], source file name or None)."""
    from PIL import Image

    from ldmkit.io.images import load_image

    source = None
    if isinstance(m, (str, Path)):
        m, source = class_ids(load_image(m, mode=None, what="class map"), f"class map {m}"), str(m)
    elif isinstance(m, Image.Image):
        m = class_ids(m, where)
    if isinstance(m, np.ndarray):
        if m.dtype.kind not in "iu":
            raise ValueError(f"{where} has dtype {m.dtype}; a class map holds integer class ids")
        m = torch.from_numpy(m.astype(np.int64))
    if not isinstance(m, torch.Tensor):
        raise ValueError(f"{where} is a {type(m).__name__}; expected an integer tensor / array [H, W] or "
                         "[B, H, W], a PIL image or a PNG path")
    if m.is_floating_point() or m.is_complex() or m.dtype == torch.bool:
        raise ValueError(f"{where} has dtype {m.dtype}; a class map holds integer class ids "
                         "(e.g. torch.long or uint8)")
    if m.dim() == 2:
        m = m[None]
    if m.dim() != 3:
        raise ValueError(f"{where} has shape {tuple(m.shape)}; expected [H, W] or a batch [B, H, W]")
    return m.long().cpu(), source


def class_maps(seg_map) -> tuple[torch.Tensor, list[str | None]]:
    """Any accepted map input -> (long [B, H, W] on the CPU, the source file of each map or None)."""
    items = list(seg_map) if isinstance(seg_map, (list, tuple)) else [seg_map]
    if not items:
        raise ValueError("no class map given")
    maps, sources = [], []
    for k, item in enumerate(items):
        m, src = _one_map(item, "class map" if len(items) == 1 else f"class map {k}")
        maps.append(m)
        sources += [src] * len(m)
    sizes = {tuple(m.shape[-2:]) for m in maps}
    if len(sizes) > 1:
        raise ValueError(f"class maps of one call must have one size; got {sorted(f'{w}x{h}' for h, w in sizes)}")
    return torch.cat(maps), sources


def check_maps(pipe: PipelineCore, seg: torch.Tensor) -> None:
    """Map size a multiple of the model's size multiple, class ids within the model's classes."""
    h, w = seg.shape[-2:]
    m = pipe.size_multiple
    if h < m or w < m or h % m or w % m:
        raise ValueError(f"class map size {w}x{h} must be a positive multiple of {m} on both sides (the "
                         f"autoencoder's downsample factor {pipe.factor}"
                         + (f" x DiT patch size {pipe.denoiser.config.patch_size})" if pipe.is_dit else ")")
                         + "; the map has the output image's size")
    lo, hi = int(seg.min()), int(seg.max())
    if lo < 0 or hi >= pipe.num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"class map holds class id {bad}; this model knows {pipe.num_classes} classes "
                         f"(ids 0-{pipe.num_classes - 1})")


def semantic2img(pipe: PipelineCore, seg_map, prompt=None, *, negative_prompt=None, class_label=None,
                 num: int | None = None, seed: int = 0, **settings) -> list[Result]:
    from ldmkit.conditioning.spatial import one_hot_map

    pipe.require_task("semantic2img")
    for k in ("height", "width"):
        if settings.get(k) is not None:
            raise ValueError(f"semantic2img takes the output size from the class map; do not pass {k}")
        settings.pop(k, None)
    seg, sources = class_maps(seg_map)
    check_maps(pipe, seg)
    b, (h, w) = seg.shape[0], seg.shape[-2:]
    n = num if num is not None else max(b, image_count(prompt, None))
    if n < 1:
        raise ValueError(f"num={n} must be >= 1")
    s = pipe.settings(height=h, width=w, **settings)
    conditions = pipe.conditions(prompt, class_label, n)
    onehot = one_hot_map(seg, pipe.num_classes, (h // pipe.factor, w // pipe.factor)).to(pipe.device)

    def inputs(idx):
        return {"concat": onehot[[i % b for i in idx]]}

    def meta_of(i):
        classes = ",".join(str(c) for c in torch.unique(seg[i % b]).tolist())
        return {"map": sources[i % b], "map_classes": classes}

    return pipe.generate("semantic2img", s, conditions, negative_prompt, int(seed), inputs, meta_of=meta_of)
