"""A class-conditional Fashion-MNIST latent diffusion model on a 2-core CPU in under an hour of training:
the `ldm` commands of the recipe, its evaluation, and (`--bundle`) the copy into the package as the
`fashion-mnist` model.

    python examples/fashion_mnist/recipe.py --out outputs/fmnist [--bundle]

1. `ldm train-classifier` -- the evaluation's feature network and class judge (4 epochs, ~3 min);
2. `ldm train-autoencoder` -- a KL autoencoder, f = 4, 4 latent channels (32x32 grey -> 4x8x8), L1 + KL;
3. `ldm cache-latents` -- the 60,000 training images encoded once;
4. `ldm train` -- the class-conditional UNet on the latents (v objective, cosine schedule);
5. `ldm eval` at guidance 1 / 1.5 / 2 / 3 / 4 (1,000 class-balanced samples, DPM++ 2M, 20 steps, against 1,000
   test images), and the real-vs-real floor (1,000 class-balanced training images against the same 1,000
   test images); OUT/report.json, OUT/grid.png (a row per class).

Every setting is in the command lists below: the recipe is flags, no special code. Wall times are recorded.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

CLASSIFIER = ["train-classifier", "--dataset", "fashion-mnist", "--epochs", "4", "--batch-size", "128", "--lr", "2e-3"]
AUTOENCODER = ["train-autoencoder", "--data", "fashion-mnist", "--size", "32", "--image-channels", "1",
               "--preset", "tiny-kl-f4", "--channels", "32", "--latent-channels", "4", "--steps", "1200",
               "--batch-size", "32", "--lr", "2e-3", "--adam-betas", "0.9", "0.99", "--lr-schedule", "cosine",
               "--warmup-steps", "100", "--perceptual-weight", "0", "--disc-weight", "0", "--kl-weight", "1e-6",
               "--ema-decay", "0.995", "--checkpoint-every", "1200", "--sample-every", "1200",
               "--stats-samples", "1024", "--eval-images", "1000"]
LDM = ["train", "--conditioning", "class", "--denoiser", "unet", "--preset", "small", "--objective", "v",
       "--schedule", "cosine", "--timestep-sampling", "stratified", "--batch-size", "128", "--lr", "1e-3",
       "--lr-schedule", "cosine", "--warmup-steps", "100", "--weight-decay", "0.01", "--grad-clip", "1.0",
       "--ema-decay", "0.999", "--cond-drop", "0.1", "--sampler", "dpmpp_2m", "--sample-steps", "20",
       "--guidance", "2.0", "--checkpoint-every", "500", "--sample-every", "1000", "--seed", "0"]
LDM_STEPS = 4000
GUIDANCE = (1.0, 1.5, 2.0, 3.0, 4.0)
EVAL = ["--dataset", "fashion-mnist", "--num", "1000", "--num-reference", "1000", "--sampler", "dpmpp_2m",
        "--steps", "20", "--seed", "0"]


def ldm(args: list[str]) -> float:
    """Run one `ldm` command in this process; its wall seconds."""
    from ldmkit.cli import main

    t0 = time.time()
    code = main(args)
    if code:
        raise SystemExit(f"ldm {' '.join(args)} failed with exit code {code}")
    return time.time() - t0


def floor(classifier: Path, n: int = 1000) -> dict:
    """The real-vs-real floor: n class-balanced training images scored like the samples."""
    from ldmkit.metrics.evaluate import real_floor
    from ldmkit.metrics.features import load_feature_network

    return real_floor(load_feature_network(str(classifier)), "fashion-mnist", n)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="examples/fashion_mnist/recipe.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/fmnist")
    p.add_argument("--steps", type=int, default=LDM_STEPS, help="LDM steps")
    p.add_argument("--bundle", action="store_true", help="copy the model and its classifier into the package")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    times = {}
    clf, ae, cache, run = out / "classifier", out / "ae", out / "latents", out / "ldm"
    if not (clf / "config.json").is_file():
        times["classifier_s"] = ldm(CLASSIFIER + ["--out", str(clf)])
    if not (ae / "autoencoder" / "config.json").is_file():
        times["autoencoder_s"] = ldm(AUTOENCODER + ["--out", str(ae)])
    if not (cache / "index.json").is_file():
        times["cache_s"] = ldm(["cache-latents", "--autoencoder", str(ae / "autoencoder"), "--data", "fashion-mnist",
                                "--out", str(cache)])
    if not (run / "model" / "model_index.json").is_file():
        resume = ["--resume"] if (run / "checkpoints").is_dir() else []
        times["ldm_s"] = ldm(LDM + ["--latents", str(cache), "--autoencoder", str(ae / "autoencoder"), "--out", str(run),
                                    "--steps", str(args.steps)] + resume)
    report = {"recipe": {"classifier": CLASSIFIER, "autoencoder": AUTOENCODER, "ldm": LDM + ["--steps", str(args.steps)],
                         "eval": EVAL}, "times": times,
              "autoencoder": json.loads((ae / "summary.json").read_text())["heldout"],
              "classifier": json.loads((clf / "classifier.json").read_text()), "floor": floor(clf), "guidance": {}}
    for g in GUIDANCE:
        path = out / f"eval-g{g}.json"
        if not path.is_file():
            ldm(["eval", "--model", str(run / "model"), "--features", str(clf), "--guidance", str(g), "--out", str(path)]
                + EVAL)
        report["guidance"][str(g)] = json.loads(path.read_text())
    best = min(report["guidance"], key=lambda g: report["guidance"][g]["fid"])
    report["best_guidance"] = float(best)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    class_grid(run / "model", float(best), out / "grid.png")
    print_table(report)
    if args.bundle:
        bundle(run / "model", clf, float(best), report)
    return 0


def class_grid(model: Path, guidance: float, path: Path, per_class: int = 10) -> None:
    """A row per class (T-shirt/top ... Ankle boot), `per_class` seeds each, at the recipe's sampling settings."""
    from ldmkit.data.fashion_mnist import CLASSES
    from ldmkit.io.images import make_grid, save_png
    from ldmkit.pipelines import load

    pipe = load(model, device="cpu")
    labels = [c for c in CLASSES for _ in range(per_class)]
    images = [r.image for r in pipe.text2img(class_label=labels, num=len(labels), seed=1, sampler="dpmpp_2m", steps=20,
                                             guidance=guidance, batch_size=50, progress=False)]
    save_png(make_grid(images, nrow=per_class), path, {"rows": ", ".join(CLASSES), "guidance": guidance,
                                                       "sampler": "dpmpp_2m", "steps": 20, "seeds": "1 + i"})


def print_table(report: dict) -> None:
    f = report["floor"]
    print(f"floor: FID {f['fid']:.3f}  precision {f['precision']:.3f}  recall {f['recall']:.3f}  class accuracy "
          f"{f['class_accuracy']['accuracy']:.3f}")
    for g, r in report["guidance"].items():
        print(f"guidance {g}: FID {r['fid']:.3f} ({r['fid'] / f['fid']:.2f}x floor)  precision {r['precision']:.3f}  "
              f"recall {r['recall']:.3f}  class accuracy {r['class_accuracy']['accuracy']:.3f}")


def bundle(model: Path, classifier: Path, guidance: float, report: dict) -> None:
    """The model folder (EMA weights) as src/ldmkit/assets/fashion-mnist, its classifier as eval_classifier/,
    its default guidance the best one, and the measured numbers beside it."""
    dest = ROOT / "src" / "ldmkit" / "assets" / "fashion-mnist"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(model, dest)
    shutil.copytree(classifier, dest / "eval_classifier")
    index = json.loads((dest / "model_index.json").read_text())
    index["defaults"] = {**index.get("defaults", {}), "guidance": guidance, "sampler": "dpmpp_2m", "steps": 20}
    index["components"] = index.get("components") or ["autoencoder", "conditioner", "denoiser"]  # not the classifier
    (dest / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    g = report["guidance"][str(guidance)]
    keep = {"floor": report["floor"], "at_best_guidance": g, "best_guidance": guidance,
            "autoencoder_heldout": report["autoencoder"], "recipe": report["recipe"], "times": report["times"]}
    (dest / "evaluation.json").write_text(json.dumps(keep, indent=1) + "\n")
    print(f"bundled as {dest}")


if __name__ == "__main__":
    raise SystemExit(main())
