"""Train and measure the three spatially conditioned models of docs/training.md section 9.

    python benchmarks/_spatial_models.py --runs runs/spatial --train     # cache + 3 trainings + measures
    python benchmarks/_spatial_models.py --runs runs/spatial             # measures of trained runs only

Not part of `make bench` (the leading underscore keeps run_all.py away): training takes about
15 minutes on 2 CPU cores. `--train` runs, inside RUNS, exactly the `ldm cache-latents` and
`ldm train` commands the docs list (demo autoencoder, 4000 shapes, 1500 steps of the `tiny` UNet,
batch 32); then 64 shapes images that are not in the cache (seed 1) are
* upscaled from 8x8 (PSNR against the real image; bicubic and the autoencoder's own
  reconstruction as references),
* inpainted with the middle half masked (PSNR outside the mask, caption match by the shapes
  analyser; references: the bundled demo text model drawing the caption from scratch and
  inpainting by re-noise-and-blend),
* drawn from their segmentation maps (foreground IoU of the analyser's colour map vs the map,
  right set of shapes).
Results go to OUT (default benchmarks/results/spatial_models.json).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

AE = str(Path(__file__).resolve().parents[1] / "src" / "ldmkit" / "assets" / "demo-shapes" / "autoencoder")


def train(runs: Path, steps: int, length: int) -> dict:
    from ldmkit.cli import main

    times = {}
    t0 = time.time()
    assert main(["cache-latents", "--autoencoder", AE, "--data", "shapes", "--out", str(runs / "lat"), "--length",
                 str(length), "--size", "32", "--store-images", "--segmentation", "--device", "cpu",
                 "--overwrite"]) == 0
    times["cache_s"] = time.time() - t0
    common = ["--autoencoder", AE, "--latents", str(runs / "lat"), "--preset", "tiny", "--steps", str(steps),
              "--batch-size", "32", "--lr", "1e-3", "--warmup-steps", str(min(100, steps)), "--sample-every", "500",
              "--checkpoint-every", "500", "--device", "cpu", "--no-progress"]
    for kind, cond in (("inpaint", "text"), ("upscale", "none"), ("semantic", "none")):
        t0 = time.time()
        assert main(["train", *common, "--out", str(runs / kind), "--spatial", kind, "--conditioning", cond]) == 0
        times[f"train_{kind}_s"] = time.time() - t0
    return times


def psnr(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor | None = None) -> float:
    d = (a - b) ** 2 if keep is None else ((a - b) ** 2)[keep.expand_as(a)]
    return float(10 * torch.log10(4 / d.mean()))  # images in [-1, 1]: peak-to-peak 2


@torch.no_grad()
def measure(runs: Path, n: int) -> dict:
    from ldmkit import pipelines
    from ldmkit.data.shapes import ShapesDataset
    from ldmkit.metrics.shapes_analysis import adherence, analyse, colour_map
    from ldmkit.io.images import pil_to_tensor
    from ldmkit.conditioning.spatial import centre_mask, low_res_input

    held = ShapesDataset("train", size=32, length=n, seed=1, segmentation=True)  # the cache used seed 0
    items = [held[i] for i in range(n)]

    def mean(xs):
        return sum(xs) / len(xs)

    out = {"images": n, "sampler": "ddim", "sample_steps": 20}
    up = pipelines.load(runs / "upscale" / "model", device="cpu")
    model_p, bicubic_p, ae_p = [], [], []
    for i, it in enumerate(items):
        low = low_res_input(it["image"][None], (8, 8))[0]
        x = pil_to_tensor(up.upscale(low, seed=i, steps=20, progress=False)[0].image)
        model_p.append(psnr(x, it["image"]))
        bic = F.interpolate(low[None], size=32, mode="bicubic", align_corners=False)[0].clamp(-1, 1)
        bicubic_p.append(psnr(bic, it["image"]))
        ae_p.append(psnr(up.decode(up.encode(it["image"][None]), up.settings()).cpu()[0], it["image"]))
    out["upscale_psnr_db"] = {"model": mean(model_p), "bicubic": mean(bicubic_p),
                              "autoencoder_reconstruction": mean(ae_p), "noise_level": up.defaults.get("noise_level")}

    mask = centre_mask(32, 32)
    keep = mask[0] == 0
    inp = pipelines.load(runs / "inpaint" / "model", device="cpu")
    demo = pipelines.load("demo-shapes", device="cpu")
    rows = {"model": [], "demo_text2img": [], "demo_blend_inpaint": []}
    for i, it in enumerate(items):
        images = {
            "model": inp.inpaint(it["image"], mask, it["caption"], seed=i, steps=20, guidance=3, progress=False),
            "demo_text2img": demo.text2img(it["caption"], seed=i, steps=20, guidance=3, progress=False),
            "demo_blend_inpaint": demo.inpaint(it["image"], mask, it["caption"], seed=i, steps=20, guidance=3,
                                               progress=False)}
        for name, res in images.items():
            img = res[0].image
            rows[name].append((psnr(pil_to_tensor(img), it["image"], keep), adherence(img, it["caption"])["match"]))
    out["inpaint"] = {name: {"known_region_psnr_db": mean([p for p, _ in r]), "caption_match_rate": mean([m for _, m in r])}
                      for name, r in rows.items()}

    seg = torch.stack([it["segmentation"] for it in items])
    sem = pipelines.load(runs / "semantic" / "model", device="cpu")
    x = torch.stack([pil_to_tensor(r.image) for r in sem.semantic2img(seg, num=len(seg), seed=0, sampler="ddim",
                                                                       steps=20, batch_size=len(seg),
                                                                       progress=False)])
    iou, shapes_ok, real_ok = [], 0, 0
    for i, it in enumerate(items):
        fg, want = torch.from_numpy(colour_map(x[i]) >= 0), seg[i] > 0
        iou.append(float((fg & want).sum() / (fg | want).sum().clamp(min=1)))
        shapes = sorted(o.shape for o in it["spec"].objects)
        shapes_ok += sorted(d.shape for d in analyse(x[i]).objects) == shapes
        real_ok += sorted(d.shape for d in analyse(it["image"]).objects) == shapes
    out["semantic"] = {"foreground_iou": mean(iou), "shapes_match_rate": shapes_ok / n,
                       "analyser_on_real_images": real_ok / n}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", required=True, help="folder of the cache and the three runs")
    p.add_argument("--train", action="store_true", help="cache the latents and train the three models first")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--length", type=int, default=4000, help="shapes images cached")
    p.add_argument("--images", type=int, default=64, help="held-out images measured")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "spatial_models.json"))
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    runs = Path(args.runs)
    result = {"steps": args.steps, "cached_images": args.length}
    if args.train:
        runs.mkdir(parents=True, exist_ok=True)
        result["times"] = train(runs, args.steps, args.length)
    result.update(measure(runs, args.images))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
