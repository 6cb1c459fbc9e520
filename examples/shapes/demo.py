"""`make demo`: latent diffusion end to end on the bundled shapes set, on a CPU, in minutes.

    python examples/shapes/demo.py --out outputs/demo

1. trains a tiny KL autoencoder on rendered shapes (`ldm train-autoencoder`'s method);
2. encodes a training set once into a latent cache, and a copy of it with forward-phrased captions;
3. trains the text-conditioned latent diffusion model in two runs joined by `--init-from` (recipe.py
   says what and why), each as two single-threaded DDP processes under torchrun when the machine has
   two cores -- the same model as one process, faster;
4. samples grids for training prompts and held-out compositions, scores prompt adherence with the
   shapes analyser (`ldmkit.metrics.shapes_analysis`) over 200 prompts per set at guidance 1, 3 and
   7.5, and writes `adherence.json` and a printed table.

OUT/ then holds: autoencoder/ (stage-1 run), latents/ + latents_forward/ (caches), ldm-forward/ and
ldm/ (the two stage-2 runs: loss.png, samples/, checkpoints/), model/ (the model folder `ldm sample
--model` loads), grid_train.png, grid_heldout.png, loss_autoencoder.png, loss_ldm.png,
adherence.json, summary.json. Every step count is fixed by the recipe; the wall time is reported.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import recipe  # noqa: E402  (the example's own settings, next to this file)


def log(t0: float, msg: str) -> None:
    print(f"[demo {time.time() - t0:6.1f}s] {msg}", flush=True)


def eval_prompts(kind: str, n: int, seed: int, p_single: float = 0.3) -> list[str]:
    """`n` prompts drawn like the data set draws captions: one object with p_single, else two."""
    from ldmkit.data.shapes import heldout_prompts, parse_caption, train_prompts

    pool = train_prompts() if kind == "train" else heldout_prompts()
    singles = [p for p in pool if parse_caption(p).relation is None]
    pairs = [p for p in pool if parse_caption(p).relation is not None]
    rng = random.Random(f"{kind}:{seed}")
    return [rng.choice(singles if (rng.random() < p_single and singles) or not pairs else pairs) for _ in range(n)]


def reconstruction_adherence(ae, n: int, seed: int) -> dict:
    """Match rate of the analyser on real images passed through the autoencoder, per split: what a
    perfect stage-2 model could reach with this autoencoder."""
    import torch

    from ldmkit.data.shapes import ShapesDataset
    from ldmkit.io.images import tensor_to_pil
    from ldmkit.metrics.shapes_analysis import adherence_report

    out = {}
    for split in ("train", "heldout"):
        items = [ShapesDataset(split, size=32, length=n, seed=seed + 7)[i] for i in range(n)]
        with torch.no_grad():
            x = torch.stack([it["image"] for it in items])
            rec = ae.decode_latents(ae.encode_latents(x, sample=False)).clamp(-1, 1)
        out[split] = adherence_report([tensor_to_pil(r) for r in rec], [it["caption"] for it in items])["match_rate"]
    return out


def adherence_table(pipe, prompts_by_set: dict, scales, seed: int, steps: int) -> tuple[dict, dict]:
    """{set: {str(scale): report without per-sample details}} and the images of every (set, scale); the
    held-out reports also say which held-out cause failed (`shapes_analysis.heldout_causes`)."""
    from ldmkit.metrics.shapes_analysis import adherence_report, heldout_causes

    results, images = {}, {}
    for name, prompts in prompts_by_set.items():
        results[name] = {}
        for g in scales:
            res = pipe.text2img(prompt=prompts, num=len(prompts), seed=seed, guidance=g, steps=steps,
                                sampler=recipe.EVAL["sampler"], batch_size=len(prompts), progress=False)
            images[(name, g)] = [r.image for r in res]
            report = adherence_report(images[(name, g)], prompts)
            samples = report.pop("samples")
            if name == "heldout":
                report["by_cause"] = heldout_causes(samples)
            results[name][str(g)] = report
    return results, images


def train_stage(config_file: str) -> None:
    """One stage-2 run (this script under torchrun): the recipe's config, its caption transform."""
    from ldmkit.training import LDM, LDMConfig, train
    from ldmkit.training.config import from_dict

    spec = json.loads(Path(config_file).read_text())
    transform = recipe.drop_words(spec["word_drop"]) if spec["word_drop"] else None
    train(LDM(from_dict(LDMConfig, spec["config"]), caption_transform=transform))


def run_stage(config, word_drop: float, procs: int, work: Path) -> Path:
    """Train one stage-2 run in `procs` processes (one thread each) or in this process."""
    from ldmkit.io.files import write_json
    from ldmkit.training.config import to_dict

    spec = write_json(work / f"{Path(config.out).name}.json", {"config": to_dict(config), "word_drop": word_drop})
    if procs == 1:
        train_stage(str(spec))
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
               str(Path(__file__).resolve()), "--stage", str(spec)]
        done = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if done.returncode != 0:
            raise SystemExit(f"stage-2 training under torchrun failed (exit {done.returncode}): {' '.join(cmd)}")
    return Path(config.out) / "model"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="examples/shapes/demo.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--samples", type=int, default=recipe.EVAL["samples"], help="prompts per set and guidance")
    p.add_argument("--procs", type=int, default=0, help="training processes (0: 2 on >= 2 cores, else 1)")
    p.add_argument("--small", action="store_true", help="a few steps of everything (a smoke test, not the demo)")
    p.add_argument("--stage", help=argparse.SUPPRESS)  # internal: one stage-2 run under torchrun
    args = p.parse_args(argv)
    if args.stage:
        train_stage(args.stage)
        return 0

    import torch

    t0 = time.time()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out = Path(args.out)
    if out.exists():  # the demo owns its output folder: a new run replaces the last one
        shutil.rmtree(out)
    out.mkdir(parents=True)
    procs = args.procs or (2 if (os.cpu_count() or 1) >= 2 else 1)
    stages = {k: (2 if args.small else v) for k, v in recipe.STAGES.items()}
    phases = {}

    # ---- 1. autoencoder ---------------------------------------------------------------------------
    from ldmkit.training import AETrainConfig, AutoencoderMethod, train

    small = {"steps": 4, "stats_samples": 16, "eval_images": 16} if args.small else {}
    ae_cfg = AETrainConfig(out=str(out / "autoencoder"), **{**recipe.AUTOENCODER, "progress": True, **small})
    ae_dir = train(AutoencoderMethod(ae_cfg))
    shutil.copy(out / "autoencoder" / "loss.png", out / "loss_autoencoder.png")
    phases["autoencoder_s"] = round(time.time() - t0, 1)
    log(t0, f"autoencoder: {ae_dir}")

    # ---- 2. latent caches ---------------------------------------------------------------------------
    from ldmkit.data.latents import encode_dataset, recaption
    from ldmkit.data.shapes import ShapesDataset, forward_caption
    from ldmkit.io.format import load_component

    ae = load_component(ae_dir, device="cpu")
    n = 96 if args.small else recipe.CACHE["length"]
    cache = encode_dataset(ae, ShapesDataset("train", size=32, length=n, seed=recipe.CACHE["seed"]),
                           out / "latents", batch_size=256, progress=False,
                           source={"dataset": "shapes", "split": "train", "seed": recipe.CACHE["seed"]})
    forward = recaption(cache, out / "latents_forward", forward_caption,
                        note="shapes.forward_caption: the left/upper object named first where allowed")
    ceiling = reconstruction_adherence(ae, args.samples, recipe.SEED)
    phases["latent_cache_s"] = round(time.time() - t0 - sum(phases.values()), 1)
    log(t0, f"latent caches: {n} items; the analyser on autoencoder reconstructions: "
        + ", ".join(f"{k} {100 * v:.1f}%" for k, v in ceiling.items()))

    # ---- 3. the two stage-2 runs ---------------------------------------------------------------------
    from ldmkit.training import LDMConfig

    base = LDMConfig(autoencoder=str(ae_dir), **recipe.LDM)
    first = dataclasses.replace(base, latents=str(forward), out=str(out / "ldm-forward"), steps=stages["forward"],
                                checkpoint_every=stages["forward"], sample_every=stages["forward"])
    model = run_stage(first, 0.0, procs, out)
    log(t0, f"run 1 ({stages['forward']} steps on forward-phrased captions) -> {model}")
    second = dataclasses.replace(base, latents=str(cache), out=str(out / "ldm"), steps=stages["full"],
                                 checkpoint_every=stages["full"], sample_every=stages["full"], init_from=str(model))
    model = run_stage(second, recipe.WORD_DROP, procs, out)
    shutil.copytree(model, out / "model")
    shutil.copy(out / "ldm" / "loss.png", out / "loss_ldm.png")
    phases["ldm_s"] = round(time.time() - t0 - sum(phases.values()), 1)
    log(t0, f"run 2 ({stages['full']} steps on the captions as drawn) -> {out / 'model'}")

    # ---- 4. samples and adherence ------------------------------------------------------------------------
    from ldmkit import pipelines
    from ldmkit.io.files import write_json
    from ldmkit.io.images import make_grid
    from ldmkit.metrics.shapes_analysis import format_report

    pipe = pipelines.load(out / "model", device="cpu", dtype=torch.float32)
    sets = {k: eval_prompts(k, args.samples, recipe.SEED) for k in ("train", "heldout")}
    scales, g = recipe.EVAL["guidance"], recipe.EVAL["headline"]
    eval_steps = 2 if args.small else recipe.EVAL["steps"]
    table, images = adherence_table(pipe, sets, scales, seed=1000 + recipe.SEED, steps=eval_steps)
    for name in sets:
        make_grid(images[(name, g)][:64], nrow=8).save(out / f"grid_{name}.png")
        (out / f"grid_{name}_prompts.txt").write_text("\n".join(sets[name][:64]) + "\n")
    best = {k: max(table[k][str(s)]["match_rate"] for s in scales) for k in sets}
    phases["evaluation_s"] = round(time.time() - t0 - sum(phases.values()), 1)
    report = {"guidance": g, "sampler": recipe.EVAL["sampler"], "steps": eval_steps,
              "samples_per_set": args.samples, "headline": {k: table[k][str(g)]["match_rate"] for k in sets},
              "best_guidance": best, "target": {"train": 0.95, "heldout": 0.85}, "by_guidance": table,
              "stages": stages, "processes": procs, "recipe": {"ldm": recipe.LDM, "autoencoder": recipe.AUTOENCODER,
                                                                "word_drop": recipe.WORD_DROP},
              "autoencoder_reconstruction_match_rate": ceiling, "seconds": round(time.time() - t0, 1),
              "phases": phases}
    write_json(out / "adherence.json", report)
    write_json(out / "summary.json", {"adherence": report["headline"], "best_guidance": best,
                                      "seconds": report["seconds"]})
    print(f"\nprompt adherence at guidance {g} ({args.samples} prompts per set, {recipe.EVAL['sampler']} "
          f"{eval_steps} steps):")
    print(format_report({f"{k} (g={g})": table[k][str(g)] for k in sets}))
    print("\nmatch rate by guidance scale:")
    print("set      " + "".join(f"  g={s:<5}" for s in scales))
    for name in sets:
        print(f"{name:8} " + "".join(f"  {100 * table[name][str(s)]['match_rate']:5.1f}%" for s in scales))
    print(f"{'ceiling':8} " + "".join(f"  {100 * ceiling[name]:5.1f}%" for name in sets)
          + "   (the analyser on autoencoder reconstructions of real images, train / held-out)")
    rate = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    print(f"held-out prompts by what makes them held out (g={g}): " + ", ".join(
        f"{k} {rate(v['match_rate'])} (n={v['n']})" for k, v in table["heldout"][str(g)]["by_cause"].items()))
    print(f"\ndone in {report['seconds']:.0f}s; outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
