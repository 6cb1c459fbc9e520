"""`make demo`: latent diffusion end to end on the bundled shapes set, on a CPU, in minutes.

    python -m ldmkit.demo --out outputs/demo

1. trains a tiny KL autoencoder (32x32 RGB -> 8x8x4 latents, f=4) on rendered shapes;
2. encodes a training set once into a latent cache;
3. trains a text-conditioned UNet on the cached latents with `ldm train` (v-prediction, cosine
   schedule, stratified timesteps, condition dropout for classifier-free guidance), reading captions
   through the frozen all-MiniLM-L6-v2 sentence encoder (each caption is encoded once) and a
   trainable context adapter, with pixel-coordinate features in the UNet. A caption curriculum
   runs first: half the steps read the cache's captions re-phrased so that the left / upper object
   is named first (``shapes.forward_caption``, a recaptioned copy of the cache,
   ``--stage1-latents``), the rest the captions as drawn -- without it the model never learns which
   object a relation word puts left (see docs/training.md). With ``--procs 2`` (the default on a
   machine with >= 2 cores) training runs as two single-threaded DDP processes under torchrun,
   which outruns one two-threaded process on a small model. The number of steps is fitted to the
   time budget after timing the first steps;
4. samples grids for training prompts and held-out compositions, scores prompt adherence with the
   shapes analyser over >= 200 samples per set and at guidance 1, 3 and 7.5, and writes
   `adherence.json` plus a printed table.

Everything lands in OUT/: autoencoder/ (stage-1 run), latents/, latents_forward/ (the same latents
with forward-phrased captions), ldm/ (stage-2 run: loss.png, samples/, checkpoints/), model/ (the
model folder `ldm sample --model` loads),
grid_train.png, grid_heldout.png, loss_autoencoder.png, loss_ldm.png, adherence.json, summary.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

GUIDANCE_SCALES = (1.0, 3.0, 7.5)


def _log(t0: float, msg: str) -> None:
    print(f"[demo {time.time() - t0:6.1f}s] {msg}", flush=True)


def _train_torchrun(cfg, procs: int) -> Path:
    """`ldm train --config` with ``cfg`` as ``procs`` single-threaded DDP processes (gloo); returns the
    model folder."""
    import subprocess
    import tempfile

    from ldmkit.io.format import write_json

    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "train.json"
        write_json(config, cfg.to_dict())
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
               "-m", "ldmkit.cli", "train", "--config", str(config)]
        done = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if done.returncode != 0:
        raise SystemExit(f"LDM training under torchrun failed (exit {done.returncode}): {' '.join(cmd)}")
    return Path(cfg.out) / "model"


def eval_prompts(kind: str, n: int, seed: int, p_single: float = 0.3) -> list[str]:
    """`n` prompts drawn like the data set draws captions: one object with p_single, else two."""
    from ldmkit.data.shapes import heldout_prompts, parse_caption, train_prompts

    pool = train_prompts() if kind == "train" else heldout_prompts()
    singles = [p for p in pool if parse_caption(p).relation is None]
    pairs = [p for p in pool if parse_caption(p).relation is not None]
    rng = random.Random(f"{kind}:{seed}")
    out = []
    for _ in range(n):
        group = singles if (rng.random() < p_single and singles) or not pairs else pairs
        out.append(rng.choice(group))
    return out


def reconstruction_adherence(ae, n: int, seed: int) -> dict:
    """Match rate of the analyser on real shapes images passed through the autoencoder, per split:
    what a perfect stage-2 model could reach with this autoencoder."""
    import torch

    from ldmkit.data.shapes import ShapesDataset
    from ldmkit.data.shapes_analysis import adherence_report
    from ldmkit.io.images import tensor_to_pil

    out = {}
    for split in ("train", "heldout"):
        data = ShapesDataset(split, size=32, length=n, seed=seed + 7)
        items = [data[i] for i in range(n)]
        with torch.no_grad():
            x = torch.stack([it["image"] for it in items])
            rec = ae.decode_latents(ae.encode_latents(x, sample=False)).clamp(-1, 1)
        out[split] = adherence_report([tensor_to_pil(r) for r in rec], [it["caption"] for it in items])["match_rate"]
    return out


def adherence_table(pipe, prompts_by_set: dict, scales, steps: int, sampler: str, seed: int, batch: int) -> dict:
    """{set: {str(scale): adherence report without per-sample details}} and the images of the first scale.
    The held-out set's reports also hold ``by_cause`` (``shapes_analysis.heldout_causes``)."""
    from ldmkit.data.shapes_analysis import adherence_report, heldout_causes

    results, first_images = {}, {}
    for name, prompts in prompts_by_set.items():
        results[name] = {}
        for g in scales:
            res = pipe.text2img(prompt=prompts, num=len(prompts), seed=seed, guidance=g, steps=steps,
                                sampler=sampler, batch_size=batch, progress=False)
            images = [r.image for r in res]
            report = adherence_report(images, prompts)
            samples = report.pop("samples")
            if name == "heldout":
                report["by_cause"] = heldout_causes(samples)
            results[name][str(g)] = report
            first_images.setdefault((name, g), images)
    return results, first_images


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ldmkit.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--budget", type=float, default=450.0,
                   help="wall-clock seconds the demo aims to fit in (LDM steps are fitted to it); with the "
                        "60-100 s venv build of a fresh `make demo` and the ~45 s by which a run on a busy "
                        "machine overshoots the fit, the whole command stays under 10 minutes")
    p.add_argument("--ae-steps", type=int, default=700)
    p.add_argument("--ldm-steps", type=int, default=0, help="fixed LDM steps (0: fit to the budget)")
    p.add_argument("--max-ldm-steps", type=int, default=20000)
    p.add_argument("--latents", type=int, default=8000, help="training images encoded into the cache")
    p.add_argument("--samples", type=int, default=200, help="samples per prompt set and guidance scale")
    p.add_argument("--guidance", type=float, default=3.0, help="guidance of the headline numbers and grids")
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    p.add_argument("--preset", default="tiny", help="UNet preset")
    p.add_argument("--text-encoder", default="minilm", help="minilm (frozen, pretrained) or a trainable preset")
    p.add_argument("--text-encoder-layer", type=int, default=2,
                   help="minilm: the hidden layer (of 6) whose states the UNet reads; -1: the last")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--stage1-fraction", type=float, default=0.5,
                   help="share of the LDM steps that read forward-phrased captions first (shapes.forward_caption); "
                        "0: all steps on the captions as drawn")
    p.add_argument("--word-drop", type=float, default=0.0,
                   help="probability that a colour word leaves a training caption of the second curriculum stage "
                        "(`ldm train --word-drop`), so the shape word alone has to carry the shape; 0: none")
    p.add_argument("--context-adapter-layers", type=int, default=2, help="UNet context adapter layers (0: none)")
    p.add_argument("--no-position-features", dest="position_features", action="store_false",
                   help="leave out the UNet's pixel-coordinate features")
    p.add_argument("--procs", type=int, default=0,
                   help="LDM training processes under torchrun, one thread each (0: 2 if >= 2 cores, else 1)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch

    t0 = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _log(t0, f"writing to {out} ({torch.get_num_threads()} threads, budget {args.budget:.0f}s)")

    # ---- 1. autoencoder -------------------------------------------------------------------
    from ldmkit.training.autoencoder import AETrainConfig, AutoencoderTrainer

    ae_run = out / "autoencoder"
    if ae_run.exists():
        shutil.rmtree(ae_run)
    ae_cfg = AETrainConfig(data="shapes", out=str(ae_run), preset="tiny-kl-f4", steps=args.ae_steps, batch_size=16,
                           lr=2e-3, betas=(0.9, 0.99), perceptual_weight=0.0, disc_weight=0.0, kl_weight=1e-6,
                           ema_decay=0.99, ckpt_every=0, sample_every=0, log_every=10, stats_samples=512,
                           seed=args.seed, device="cpu", amp="none")
    ae_summary = AutoencoderTrainer(ae_cfg, progress_bar=True).run()
    ae_dir = ae_run / "autoencoder"
    phases = {"autoencoder_s": round(time.time() - t0, 1)}
    shutil.copy(ae_run / "loss.png", out / "loss_autoencoder.png")
    _log(t0, f"autoencoder: held-out {json.dumps(ae_summary.get('heldout', {}))[:160]}")

    # ---- 2. latent cache ---------------------------------------------------------------------
    from ldmkit.data.latents import encode_dataset
    from ldmkit.data.shapes import ShapesDataset
    from ldmkit.io.format import load_component

    ae = load_component(ae_dir, device="cpu")
    cache = out / "latents"
    encode_dataset(ae, ShapesDataset("train", size=32, length=args.latents, seed=args.seed + 1), cache,
                   batch_size=256, source={"dataset": "shapes", "split": "train", "seed": args.seed + 1},
                   overwrite=True, progress=False)
    _log(t0, f"latent cache: {args.latents} items in {cache}")
    ceiling = reconstruction_adherence(ae, args.samples, args.seed)
    _log(t0, "analyser on autoencoder reconstructions of real images (the ceiling): "
         + ", ".join(f"{k} {100 * v:.1f}%" for k, v in ceiling.items()))
    phases["latent_cache_s"] = round(time.time() - t0 - sum(phases.values()), 1)

    # ---- 3. LDM ------------------------------------------------------------------------------
    from ldmkit.data.latents import recaption
    from ldmkit.data.shapes import COLOURS, forward_caption
    from ldmkit.training.ldm import LDMTrainer, TrainConfig

    if not 0.0 <= args.stage1_fraction < 1.0:
        raise SystemExit(f"--stage1-fraction must be in [0, 1), got {args.stage1_fraction}")
    forward_cache = recaption(cache, out / "latents_forward", forward_caption, overwrite=True,
                              note="shapes.forward_caption: the left/upper object named first where allowed")
    ldm_run = out / "ldm"
    if ldm_run.exists():
        shutil.rmtree(ldm_run)
    grid_prompts = ("a red circle", "a blue square to the left of a yellow circle",
                    "a green circle above a red triangle", "a yellow triangle below a blue circle")
    base = TrainConfig(latents=str(cache), autoencoder=str(ae_dir), out=str(ldm_run), denoiser="unet",
                       preset=args.preset, conditioning="text", text_encoder=args.text_encoder,
                       text_encoder_layer=(None if args.text_encoder != "minilm" or args.text_encoder_layer < 0
                                           else args.text_encoder_layer), objective="v",
                       schedule="cosine", timestep_sampling="stratified", steps=max(args.ldm_steps, 1),
                       batch_size=64, lr=args.lr, lr_schedule="cosine", warmup_steps=50, weight_decay=0.01,
                       grad_clip=1.0, ema_decay=0.995, cond_drop=0.1, seed=args.seed, sample_prompts=grid_prompts,
                       sample_seeds=(0,), sample_sampler=args.sampler, sample_steps=args.steps, guidance=args.guidance,
                       device="cpu", progress=True, log_every=10, position_features=args.position_features,
                       context_adapter_layers=args.context_adapter_layers, word_drop=args.word_drop,
                       drop_words=tuple(COLOURS) if args.word_drop else ())
    procs = args.procs or (2 if (os.cpu_count() or 1) >= 2 else 1)
    steps = args.ldm_steps
    if not steps:  # time a few steps, then fit the step count to what is left of the budget
        threads = torch.get_num_threads()
        if procs > 1:  # each process: one thread, its share of the batch (+ the gradient all-reduce)
            torch.set_num_threads(1)
        probe = LDMTrainer(dataclasses.replace(base, batch_size=base.batch_size // procs))
        if getattr(probe.model.conditioner, "weights_external", False):  # frozen encoder: encode every caption
            probe.model.conditioner.encode(sorted(set(probe.data.captions)))  # once, as training soon will
        for _ in range(2):
            probe.train_step()
        tp = time.time()
        for _ in range(5):
            probe.train_step()
        per_step = (time.time() - tp) / 5 * (1.2 if procs > 1 else 1.05)  # + all-reduce, checkpoints, sample grid
        del probe
        torch.set_num_threads(threads)
        elapsed = time.time() - t0
        eval_cost = 60 + (15 if procs > 1 else 0)  # sampling + scoring: 55 s measured on 2 cores (+ start-up)
        steps = int((args.budget - elapsed - eval_cost) / per_step)
        steps = max(100, min(args.max_ldm_steps, steps))
        _log(t0, f"LDM: {per_step:.3f}s/step measured ({procs} process(es)) -> {steps} steps")
    # caption curriculum: the first steps read the forward-phrased captions (every two-object caption
    # that may say "A to the left of / above B" does, so the first-named object goes left / up), the
    # rest the captions as drawn; one run, one optimiser and LR schedule
    n1 = int(round(steps * args.stage1_fraction))
    cfg = dataclasses.replace(base, steps=steps, checkpoint_every=max(steps // 2, 1), sample_every=steps,
                              stage1_latents=str(forward_cache) if n1 else None, stage1_steps=n1)
    _log(t0, f"LDM: {steps} steps, the first {n1} on forward-phrased captions")
    if procs > 1:
        model_dir = _train_torchrun(cfg, procs)
    else:
        model_dir = LDMTrainer(cfg).run()
    shutil.copy(ldm_run / "loss.png", out / "loss_ldm.png")
    final = out / "model"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(model_dir, final)
    _log(t0, f"LDM trained ({steps} steps); model folder {final}")
    phases["ldm_s"] = round(time.time() - t0 - sum(phases.values()), 1)

    # ---- 4. samples + adherence ---------------------------------------------------------------
    from ldmkit import pipelines
    from ldmkit.data.shapes_analysis import format_report
    from ldmkit.io.images import make_grid

    pipe = pipelines.load(final, device="cpu", dtype=torch.float32)
    sets = {"train": eval_prompts("train", args.samples, args.seed),
            "heldout": eval_prompts("heldout", args.samples, args.seed)}
    scales = sorted(set(GUIDANCE_SCALES) | {args.guidance})
    table, images = adherence_table(pipe, sets, scales, args.steps, args.sampler, seed=1000 + args.seed,
                                    batch=args.samples)
    for name in sets:
        grid = make_grid(images[(name, args.guidance)][:64], nrow=8)
        grid.save(out / f"grid_{name}.png")
        with open(out / f"grid_{name}_prompts.txt", "w") as f:
            f.write("\n".join(sets[name][:64]) + "\n")
    headline = {name: table[name][str(args.guidance)] for name in sets}
    elapsed = time.time() - t0
    phases["evaluation_s"] = round(elapsed - sum(phases.values()), 1)
    report = {
        "guidance": args.guidance, "sampler": args.sampler, "steps": args.steps, "samples_per_set": args.samples,
        "headline": {k: v["match_rate"] for k, v in headline.items()},
        "target": {"train": 0.95, "heldout": 0.85},
        "by_guidance": table,
        "ldm_steps": steps, "ae_steps": args.ae_steps, "latents": args.latents,
        "ldm": {**{k: getattr(cfg, k) for k in ("preset", "text_encoder", "text_encoder_layer", "objective", "schedule",
                                                "timestep_sampling", "lr", "batch_size", "stage1_steps", "word_drop",
                                                "drop_words", "position_features", "context_adapter_layers")},
                "processes": procs},
        "autoencoder_reconstruction_match_rate": ceiling,
        "seconds": round(elapsed, 1), "phases": phases, "threads": torch.get_num_threads(),
    }
    from ldmkit.io.format import write_json

    write_json(out / "adherence.json", report)
    write_json(out / "summary.json", {"autoencoder": ae_summary, "adherence": report["headline"],
                                      "seconds": round(elapsed, 1)})
    print()
    print(f"prompt adherence at guidance {args.guidance} ({args.samples} samples per set, {args.sampler} "
          f"{args.steps} steps):")
    print(format_report({f"{k} (g={args.guidance})": v for k, v in headline.items()}))
    print()
    print("match rate by guidance scale:")
    print("set      " + "".join(f"  g={g:<5}" for g in scales))
    for name in sets:
        print(f"{name:8} " + "".join(f"  {100 * table[name][str(g)]['match_rate']:5.1f}%" for g in scales))
    print(f"{'ceiling':8} " + "".join(f"  {100 * ceiling[name]:5.1f}%" for name in sets)
          + "   (analyser on autoencoder reconstructions of real images, train / heldout)")
    rate = lambda v: "-" if v is None else f"{100 * v:.1f}%"
    print(f"held-out prompts by what makes them held out (g={args.guidance}): "
          + ", ".join(f"{k} {rate(v['match_rate'])} (n={v['n']})" for k, v in headline["heldout"]["by_cause"].items()))
    print()
    print(f"done in {elapsed:.0f}s; outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
