"""A class-conditional Fashion-MNIST latent diffusion model on a 2-core CPU in under an hour of training:
the `ldm` commands of the recipe, its evaluation, and (`--bundle`) the copy into the package as the
`fashion-mnist` model.

    python examples/fashion_mnist/recipe.py --out outputs/fmnist [--bundle]

1. `ldm train-classifier` -- the evaluation's feature network and class judge (4 epochs, ~3 min);
2. `ldm train-autoencoder` -- a KL autoencoder, f = 4, 4 latent channels (32x32 grey -> 4x8x8), L1 + KL + a
   perceptual term in the features of the classifier of step 1 (`--perceptual-net`: no VGG download needed);
3. `ldm cache-latents` -- the 60,000 training images encoded once;
4. `ldm train` -- the class-conditional UNet on the latents (v objective, cosine schedule);
5. `ldm eval` at guidance 1 / 1.5 / 2 / 3 / 4 (1,000 class-balanced samples, DPM++ 2M, 20 steps, against 1,000
   test images), and the real-vs-real floor (1,000 class-balanced training images against the same 1,000
   test images); OUT/report.json, OUT/grid.png (a row per class).

Every setting is in the command lists below: the recipe is flags, no special code. Finished steps are skipped on a
rerun; their wall times are kept in OUT/times.json.
"""
from __future__ import annotations

import argparse
import filecmp
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
               "--warmup-steps", "100", "--perceptual-weight", "1.0", "--disc-weight", "0", "--kl-weight", "1e-6",
               "--ema-decay", "0.995", "--checkpoint-every", "1200", "--sample-every", "1200",
               "--stats-samples", "1024", "--eval-images", "1000"]
LDM = ["train", "--conditioning", "class", "--denoiser", "unet", "--preset", "small", "--objective", "v",
       "--schedule", "cosine", "--timestep-sampling", "stratified", "--batch-size", "128", "--lr", "1e-3",
       "--lr-schedule", "cosine", "--warmup-steps", "100", "--weight-decay", "0.01", "--grad-clip", "1.0",
       "--ema-decay", "0.999", "--cond-drop", "0.1", "--sampler", "dpmpp_2m", "--sample-steps", "20",
       "--guidance", "2.0", "--checkpoint-every", "500", "--sample-every", "1000", "--seed", "0"]
LDM_STEPS = 4000
TINY_DECODER = ["train-tiny-decoder", "--data", "fashion-mnist", "--steps", "1500", "--batch-size", "32", "--channels",
                "16", "--num-blocks", "2", "2", "1", "--lr", "2e-3"]
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
    times_path = out / "times.json"
    times = json.loads(times_path.read_text()) if times_path.is_file() else {}

    def step(key: str, command: list[str]) -> None:
        times[key] = ldm(command)
        times_path.write_text(json.dumps(times, indent=1))

    clf, ae, cache, run = out / "classifier", out / "ae", out / "latents", out / "ldm"
    if not (clf / "config.json").is_file():
        step("classifier_s", CLASSIFIER + ["--out", str(clf)])
    if not (ae / "autoencoder" / "config.json").is_file():
        step("autoencoder_s", AUTOENCODER + ["--perceptual-net", str(clf), "--out", str(ae)])
    check_autoencoder(ae, clf)
    if not (cache / "index.json").is_file():
        step("cache_s", ["cache-latents", "--autoencoder", str(ae / "autoencoder"), "--data", "fashion-mnist",
                         "--out", str(cache)])
    if not (run / "model" / "model_index.json").is_file():
        resume = ["--resume"] if (run / "checkpoints").is_dir() else []
        step("ldm_s", LDM + ["--latents", str(cache), "--autoencoder", str(ae / "autoencoder"), "--out", str(run),
                             "--steps", str(args.steps)] + resume)
    report = {"recipe": {"classifier": CLASSIFIER, "autoencoder": AUTOENCODER + ["--perceptual-net", "CLASSIFIER"],
                         "ldm": LDM + ["--steps", str(args.steps)], "eval": EVAL}, "times": times,
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
        bundle(out, run / "model", clf, float(best), report)
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


def check_autoencoder(ae: Path, classifier: Path) -> None:
    """A stage 1 left in OUT by an earlier recipe is used only if it trained with this recipe's perceptual term."""
    cfg = json.loads((ae / "config.json").read_text())["config"]
    wanted = float(AUTOENCODER[AUTOENCODER.index("--perceptual-weight") + 1])
    net = cfg.get("perceptual_net")
    same = net is not None and (Path(net) / "model.safetensors").is_file() and filecmp.cmp(
        Path(net) / "model.safetensors", classifier / "model.safetensors", shallow=False)
    if cfg.get("perceptual_weight") != wanted or not same:
        raise SystemExit(f"{ae} was trained with perceptual weight {cfg.get('perceptual_weight')} and perceptual net "
                         f"{net}, not {wanted} and {classifier}: remove it (or use another --out) to retrain")


def bundle(out: Path, model: Path, classifier: Path, guidance: float, report: dict) -> None:
    """src/ldmkit/assets/fashion-mnist: the model's EMA weights in float16 (`ldm convert --dtype fp16`), a tiny
    decoder distilled from its decoder (`ldm train-tiny-decoder`), its classifier as eval_classifier/, its default
    guidance the best one; then `ldm eval` of exactly these files, recorded beside them in evaluation.json."""
    dest = ROOT / "src" / "ldmkit" / "assets" / "fashion-mnist"
    tiny = out / "tiny"
    if not (tiny / "tiny_decoder" / "config.json").is_file():
        ldm(TINY_DECODER + ["--autoencoder", str(model), "--out", str(tiny)])
    trained_on = json.loads((tiny / "config.json").read_text())["config"]["autoencoder"]
    if Path(trained_on).resolve() != model.resolve():
        raise SystemExit(f"{tiny} was distilled from {trained_on}, not {model}: remove it to retrain")
    if dest.exists():
        shutil.rmtree(dest)
    ldm(["convert", "--from", str(model), "--to", str(dest), "--dtype", "fp16"])
    shutil.copytree(classifier, dest / "eval_classifier")
    shutil.copytree(tiny / "tiny_decoder", dest / "tiny_decoder")
    tiny_summary = json.loads((tiny / "summary.json").read_text())
    index = json.loads((dest / "model_index.json").read_text())
    index["defaults"] = {**index.get("defaults", {}), "guidance": guidance, "sampler": "dpmpp_2m", "steps": 20}
    index["components"] = ["autoencoder", "conditioner", "denoiser", "tiny_decoder"]  # not the classifier
    index.setdefault("training", {})["tiny_decoder"] = (
        f"ldm {' '.join(TINY_DECODER)} --autoencoder MODEL ({tiny_summary['parameters']:,} parameters, "
        f"{tiny_summary['psnr_vs_full_decoder_db']} dB against the full decoder on {tiny_summary['heldout_images']} "
        "test images)")
    (dest / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    bundled = out / "eval-bundled.json"
    ldm(["eval", "--model", str(dest), "--dataset", "fashion-mnist", "--num-reference", "1000", "--out", str(bundled)])
    g = report["guidance"][str(guidance)]
    evaluated = json.loads(bundled.read_text().replace(str(ROOT) + "/", ""))  # paths in the repository, not this disk
    keep = {"floor": report["floor"], "at_best_guidance": evaluated, "best_guidance": guidance,
            "float32_run_at_best_guidance": {k: g[k] for k in ("fid", "precision", "recall")}
            | {"class_accuracy": g["class_accuracy"]["accuracy"]},
            "guidance_sweep": {k: {"fid": r["fid"], "precision": r["precision"], "recall": r["recall"],
                                   "class_accuracy": r["class_accuracy"]["accuracy"]}
                               for k, r in report["guidance"].items()},
            "autoencoder_heldout": report["autoencoder"], "recipe": report["recipe"],
            "tiny_decoder": {k: v for k, v in tiny_summary.items() if k != "tiny_decoder"},  # not a local path
            "times": report["times"],
            "note": "weights stored as float16 (the tiny decoder as float32); at_best_guidance is `ldm eval --model "
                    "fashion-mnist --dataset fashion-mnist --num-reference 1000` on these files, "
                    "float32_run_at_best_guidance the recipe's float32 model under the same protocol"}
    (dest / "evaluation.json").write_text(json.dumps(keep, indent=1) + "\n")
    print(f"bundled as {dest}")


if __name__ == "__main__":
    raise SystemExit(main())
