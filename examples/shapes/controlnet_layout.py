"""Put the bundled `demo-shapes` model's shapes where a layout map says, with a ControlNet.

    python examples/shapes/controlnet_layout.py --out outputs/controlnet-layout

A caption fixes which shapes appear and how they stand to each other ("a red circle to the left of a
blue square"), never where: the same prompt lands anywhere in the picture. The control image here is
the layout -- the segmentation map of a rendered scene (background black, each shape's area grey by
its kind: circle 85, square 170, triangle 255) -- and the ControlNet is to put each named shape there.

1. Writes the control data: images/ (rendered training scenes, captioned) and conditioning/ (their maps),
   from the library's shapes renderer (train split).
2. Trains a ControlNet for the frozen demo model: `ldm train --method controlnet --init-from demo-shapes
   --control-data DIR` (the method's defaults except the recipe's rate, batch and steps: RECIPE).
3. Measures on new layouts (a seed the data never used; train-split captions, and held-out captions the
   demo model never trained on): each layout's caption sampled with and without the ControlNet (same
   seeds). A sample is *placed* when every asked shape is detected (colour and kind, by the shapes
   analyser) with its centre inside its box in the map (and, stricter, with its bounding box overlapping
   the map's box by IoU >= 0.5); it *matches* when the analyser finds what the
   caption asks (count, colours, kinds, relation). Writes results.json and grid.png (map row, without,
   with).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

GREYS = (0, 85, 170, 255)  # background, circle, square, triangle (ldmkit.data.shapes.SEGMENTATION_CLASSES)
RECIPE = dict(steps=3000, batch_size=16, lr=1e-4, seed=0)
DATA = dict(items=4000, seed=11)
EVAL = dict(layouts=200, heldout_layouts=100, seed=777, guidance=3.0, steps=20, sampler="dpmpp_2m")


def scene(dataset, k: int):
    """(image, caption, layout map, boxes) of item k of a ShapesDataset."""
    from PIL import Image

    from ldmkit.data.shapes import caption, render, render_segmentation

    spec, rng = dataset.spec_at(k)
    image, boxes = render(spec, dataset.size, rng, return_layout=True)
    seg = render_segmentation(spec, boxes, dataset.size)
    layout = Image.fromarray(np.asarray(GREYS, np.uint8)[seg]).convert("RGB")
    return image, caption(spec), layout, boxes


def make_data(folder: Path, items: int, seed: int) -> None:
    from ldmkit.data.shapes import ShapesDataset

    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "conditioning").mkdir(parents=True, exist_ok=True)
    data = ShapesDataset("train", size=32, length=items, seed=seed)
    for k in range(items):
        image, text, layout, _ = scene(data, k)
        image.save(folder / "images" / f"{k:05d}.png")
        (folder / "images" / f"{k:05d}.txt").write_text(text + "\n")
        layout.save(folder / "conditioning" / f"{k:05d}.png")


def iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def placed(image, text: str, boxes) -> tuple[bool, bool, float]:
    """(every asked shape detected with its centre in its box, ... with its bounding box overlapping its
    box by IoU >= 0.5, mean distance in pixels of the asked shapes' detected centres from their boxes'
    centres -- nan when one is missing)."""
    from ldmkit.data.shapes import parse_caption
    from ldmkit.metrics.shapes_analysis import analyse

    found = analyse(image).objects
    ok, tight, dists = True, True, []
    for obj, (x0, y0, x1, y1) in zip(parse_caption(text).objects, boxes):
        same = [d for d in found if (d.colour, d.shape) == (obj.colour, obj.shape)]
        if not same:
            return False, False, float("nan")
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        best = min(same, key=lambda d: (d.centre[0] - cx) ** 2 + (d.centre[1] - cy) ** 2)
        dists.append(float(np.hypot(best.centre[0] - cx, best.centre[1] - cy)))
        ok &= bool(x0 <= best.centre[0] <= x1 and y0 <= best.centre[1] <= y1)
        tight &= iou(best.bbox, (x0, y0, x1, y1)) >= 0.5
    return ok, tight, float(np.mean(dists))


def measure(pipe, scenes: list, with_control: bool) -> dict:
    from ldmkit.metrics.shapes_analysis import adherence

    images, place, overlap, dist, match = [], [], [], [], []
    for k, (_, text, layout, boxes) in enumerate(scenes):
        kw = {"control_image": layout} if with_control else {}
        image = pipe.text2img(prompt=text, seed=EVAL["seed"] + k, guidance=EVAL["guidance"], steps=EVAL["steps"],
                              sampler=EVAL["sampler"], progress=False, **kw)[0].image
        ok, tight, d = placed(image, text, boxes)
        images.append(image)
        place.append(ok)
        overlap.append(tight)
        dist.append(d)
        match.append(bool(adherence(image, text)["match"]))
    found = [d for d in dist if d == d]
    return {"placed": float(np.mean(place)), "placed_iou50": float(np.mean(overlap)), "matches": float(np.mean(match)),
            "mean_centre_error_px": float(np.mean(found)) if found else None, "n": len(scenes), "images": images}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/controlnet-layout")
    p.add_argument("--steps", type=int, default=RECIPE["steps"])
    p.add_argument("--lr", type=float, default=RECIPE["lr"])
    p.add_argument("--batch-size", type=int, default=RECIPE["batch_size"])
    p.add_argument("--items", type=int, default=DATA["items"], help="training scenes written to the control data")
    p.add_argument("--layouts", type=int, default=EVAL["layouts"], help="new layouts of train-split captions")
    p.add_argument("--heldout-layouts", type=int, default=EVAL["heldout_layouts"],
                   help="new layouts of held-out captions")
    args = p.parse_args(argv)
    import torch

    from ldmkit import pipelines
    from ldmkit.data.shapes import ShapesDataset
    from ldmkit.io.images import make_grid
    from ldmkit.training import train
    from ldmkit.training.methods import ControlNetMethod, ControlTrainConfig

    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    t0 = time.time()
    if not (out / "data" / "conditioning" / f"{args.items - 1:05d}.png").is_file():
        make_data(out / "data", args.items, DATA["seed"])
    print(f"[{time.time() - t0:5.0f}s] control data: {args.items} scenes in {out / 'data'}")
    settings = {**RECIPE, "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size}
    first = ShapesDataset("train", size=32, length=4, seed=DATA["seed"])
    config = ControlTrainConfig(init_from="demo-shapes", control_data=str(out / "data"), out=str(out / "run"),
                                resolution=32, sample_steps=EVAL["steps"], guidance=EVAL["guidance"],
                                checkpoint_every=max(1, args.steps // 3), sample_every=max(1, args.steps // 3),
                                sample_prompts=tuple(scene(first, k)[1] for k in range(4)), device="cpu", **settings)
    t1 = time.time()
    folder = train(ControlNetMethod(config), overwrite=True)
    train_s = time.time() - t1
    print(f"[{time.time() - t0:5.0f}s] ControlNet {folder} in {train_s:.0f} s")
    evals = {"train captions": [scene(ShapesDataset("train", 32, args.layouts, EVAL["seed"]), k)
                                for k in range(args.layouts)]}
    if args.heldout_layouts:
        evals["held-out captions"] = [scene(ShapesDataset("heldout", 32, args.heldout_layouts, EVAL["seed"]), k)
                                      for k in range(args.heldout_layouts)]
    base = pipelines.load("demo-shapes", device="cpu")
    controlled = pipelines.load("demo-shapes", device="cpu")
    controlled.load_controlnet(folder)
    results, grid = {}, []
    for name, scenes in evals.items():
        without, with_cn = measure(base, scenes, False), measure(controlled, scenes, True)
        if not grid:
            grid = [s[2] for s in scenes[:10]] + without["images"][:10] + with_cn["images"][:10]
        results[name] = {"without": {k: v for k, v in without.items() if k != "images"},
                         "with": {k: v for k, v in with_cn.items() if k != "images"}}
        print(f"[{time.time() - t0:5.0f}s] {name} ({len(scenes)} layouts): placed {100 * without['placed']:.1f}% "
              f"-> {100 * with_cn['placed']:.1f}% (IoU >= 0.5: {100 * without['placed_iou50']:.1f}% -> "
              f"{100 * with_cn['placed_iou50']:.1f}%), caption matched {100 * without['matches']:.1f}% -> "
              f"{100 * with_cn['matches']:.1f}%")
    make_grid(grid, nrow=10).save(out / "grid.png")
    summary = {"results": results, "train_seconds": round(train_s, 1), "controlnet": str(folder),
               "controlnet_bytes": sum(f.stat().st_size for f in folder.iterdir()),
               "settings": {"recipe": settings, "data": {**DATA, "items": args.items}, "eval": EVAL}}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out / 'results.json'} and {out / 'grid.png'} (rows: layout map, without, with the ControlNet)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
