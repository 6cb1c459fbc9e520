"""The LDM paper's f-sweep (its Fig. 6) on Fashion-MNIST, at a size this CPU can run.

    python benchmarks/fsweep.py                          # CPU default (~20-25 min on 2 busy cores)
    python benchmarks/fsweep.py --long --reuse           # the recipe-sized CPU protocol: 3 seeds, hours
    python benchmarks/fsweep.py --full --device cuda     # the same protocol scaled up for a GPU
    python benchmarks/fsweep.py --factors 4 8 --budget-gflop 200   # a quick partial run

Each (f, seed) run is stored in OUT/runs/ as it finishes; with --reuse a rerun keeps the finished runs whose
settings match and trains the rest, so a long sweep can be run in parts (one --seeds or --factors at a time);
--report-only trains nothing and reports what is stored.

Question: for the same training compute, which compression factor f gives the best class-conditional samples?
LDM-1 is diffusion in pixel space; LDM-f (f = 2, 4, 8) diffuses in the latent space of a KL autoencoder that
downsamples 32x32 images by f.

Protocol (what is equal, what is measured):
1. Data: Fashion-MNIST train split (zero-padded to 32x32, first `--train-images`),
   reference set = the test split (first `--reference-images`).
2. Stage 1, trained once per f (seed 0, shared by every stage-2 seed) by the library's autoencoder method (what
   `ldm train-autoencoder` runs) on the full train split and then frozen: a KL autoencoder with L1 + 1e-6 KL
   loss and, with `--ae-perceptual W` (on in --long and --full), the perceptual term in a classifier's features
   (what `ldm train-autoencoder --perceptual-net` does; LPIPS-VGG cannot be downloaded here):
   `--perceptual-net`, by default the feature classifier -- give another one (same recipe, another seed) so
   that the judge is not the network stage 1 was trained to please, which would favour the latent models over
   pixel-space LDM-1; no GAN at this size.  Latents are the posterior means, shifted and scaled to unit variance
   by the factors the trainer stores.  f = 1 uses the pixels.  Autoencoder training and latent caching are
   *not* counted in the compute (as in the paper: stage 1 is trained once and shared).
3. Stage 2: the same class-conditional UNet (`ldmkit.denoisers.UNet`, class embedding with a null class for
   classifier-free guidance, 10% condition dropout), eps objective on the DDPM linear schedule (--long and
   --full: v on the cosine schedule, as the recipe), AdamW + EMA.
   **Equal FLOPs**: the forward+backward FLOPs of one training sample are measured with
   `torch.utils.flop_counter.FlopCounterMode`; every model runs the same number of optimiser steps with a batch
   sized so that one step costs the same FLOPs as LDM-1's step at `--pixel-batch` (small latents get bigger
   batches, capped at the data size).  Wall-clock seconds are recorded too, but they are not what is equalised.
   The loop is written out in `train_ldm` below with the library's schedule, objective
   (`ldmkit.diffusion.training_loss`), EMA and samplers rather than `ldm train`'s ldm method: LDM-1 has no
   autoencoder (the trainer needs a frozen one and a latent cache), and evaluating at exact FLOP budgets needs
   the loop in hand; all four runs share it.
4. At `--eval-points` evenly spaced points of the budget, the EMA model draws `--num-eval` class-balanced
   samples (`--eval-sampler`, `--eval-steps` steps, CFG scale `--guidance`); they are scored by FID / KID
   against the reference set in the feature space of ldmkit's own Fashion-MNIST classifier (`ldm
   train-classifier`), and by class accuracy under that classifier.
5. Every (f, seed) run is repeated for each of `--seeds`; each compute point is reported as the mean and its
   95 % t-interval over the seeds, and the verdict (_fsweep_report.verdict) says whether a mild latent space
   beats pixels and f = 8 trails it, "clearly" only where the intervals separate.
6. Sampler quality vs NFE on one trained model (`--nfe-model`, default LDM-4, first seed): DDIM, DPM++ 2M and
   Euler at 5 / 10 / 20 / 50 steps, same seeds and guidance.

Writes `OUT/fsweep.json`, `OUT/fsweep.md` (the tables and the verdict), `OUT/fsweep.png` (quality vs training
compute, with the intervals), `OUT/fsweep_nfe.png`, per run `OUT/runs/f{f}-seed{s}.json`,
`OUT/samples-f{f}-seed{s}.png` and the model folder `OUT/ldm-f{f}-seed{s}/` (f > 1), the NFE table
`OUT/nfe-f{f}.json`, and copies the JSON to `benchmarks/results/fsweep.json` (`fsweep_cpu-long.json`,
`fsweep_full.json` for --long, --full).  docs/fsweep.md reports the runs.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # _fsweep_report

DEFAULTS = dict(  # CPU default: about 20-25 minutes on the 2 shared cores here
    train_images=6000, reference_images=1000, classifier_steps=400,
    ae_channels=8, ae_steps=200, ae_batch=32, ae_lr=2e-3,
    unet_channels=(16, 32), pixel_batch=16, steps=180, lr=1e-3, ema=0.99,
    eval_points=3, num_eval=100, eval_steps=10, guidance=3.0, nfe_steps=(5, 10, 20, 50),
    ae_perceptual=0.0, ae_schedule="constant", ae_ema=0.99, objective="eps", schedule="linear", eval_sampler="ddim",
)
LONG = dict(  # the Fashion-MNIST recipe's sizes on this CPU (examples/fashion_mnist/recipe.py): ~15 min per model
    train_images=60000, reference_images=1000, classifier_steps=1900,
    ae_channels=32, ae_steps=1200, ae_batch=32, ae_lr=2e-3,
    unet_channels=(32, 64, 64), pixel_batch=16, steps=5800, lr=1e-3, ema=0.999,
    eval_points=3, num_eval=500, eval_steps=10, guidance=2.0, nfe_steps=(5, 10, 20, 50),
    ae_perceptual=1.0, ae_schedule="cosine", ae_ema=0.995, objective="v", schedule="cosine",
    eval_sampler="dpmpp_2m",
)
FULL = dict(  # one GPU: the same protocol with real sizes
    train_images=60000, reference_images=10000, classifier_steps=3000,
    ae_channels=64, ae_steps=6000, ae_batch=64, ae_lr=5e-4,
    unet_channels=(64, 128, 128), pixel_batch=64, steps=20000, lr=2e-4, ema=0.999,
    eval_points=8, num_eval=2000, eval_steps=50, guidance=3.0, nfe_steps=(5, 10, 20, 50),
    ae_perceptual=1.0, ae_schedule="cosine", ae_ema=0.999, objective="v", schedule="cosine",
    eval_sampler="dpmpp_2m",
)
LATENT_CHANNELS = {2: 1, 4: 2, 8: 4}  # f -> c: 4x, 8x and 16x fewer numbers than the 32x32 image
NULL_CLASS = 10


# ----------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"[fsweep {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fashion_mnist(split: str, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    from ldmkit.data.fashion_mnist import FashionMNIST

    data = FashionMNIST(split=split, pad_to_32=True, limit=limit)
    x = torch.from_numpy(data.images.copy()).float().div(127.5).sub(1.0)[:, None]
    x = F.pad(x, (data.pad,) * 4, value=-1.0)
    return x, torch.from_numpy(data.labels.copy())


def batches(n: int, batch: int, g: torch.Generator):
    """Endless shuffled index batches of size `batch` (epochs reshuffle)."""
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch + 1, batch):
            yield perm[i:i + batch]


def flops_per_sample(model, x: torch.Tensor, labels: torch.Tensor) -> float:
    """Forward + backward FLOPs of one training sample, measured on the batch `x` (gradients left cleared)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(x, torch.full((len(x),), 500, device=x.device), class_labels=labels).square().mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(x)


def as_stored(obj):
    """`obj` as it reads back from JSON (tuples as lists), so settings compare equal to stored ones."""
    return json.loads(json.dumps(obj))


def stored(path: Path, settings: dict, reuse: bool) -> dict | None:
    """The JSON at `path` when --reuse is on and it was written under exactly `settings`, else None."""
    from ldmkit.io.files import read_json

    if not (reuse and path.is_file()):
        return None
    data = read_json(path)
    return data if data.get("settings") == settings else None


# ----------------------------------------------------------------------------- stage 1


def autoencoder_overrides(f: int, channels: int) -> dict:
    """Architecture of the f-autoencoder: grey 32x32 in, (32/f)^2 x c latents out."""
    m = int(math.log2(f))
    return {"image_channels": 1, "channels": channels, "ch_mult": (1,) + (2,) * m, "num_res_blocks": 1,
            "latent_channels": LATENT_CHANNELS[f], "norm_groups": 8, "mid_attention": False}


AE_KEYS = ("ae_channels", "ae_steps", "ae_batch", "ae_lr", "ae_perceptual", "ae_schedule", "ae_ema")


def train_autoencoder(f: int, p, device, folder: Path) -> tuple[object, dict | None]:
    """Stage 1 with the library's method (`ldm train-autoencoder`), seed 0 whatever the stage-2 seeds: L1 + 1e-6 KL
    on Fashion-MNIST 32x32, plus the perceptual term in --perceptual-net's features (default: the feature
    classifier's) when --ae-perceptual > 0 (what `ldm train-autoencoder --perceptual-net` does); no GAN. The
    trainer stores the latent scaling/shift factors in the component's config. Reused (--reuse) only when
    trained with the same settings; with --report-only, (None, None) instead of training."""
    from ldmkit.io.format import load_component
    from ldmkit.io.files import read_json, write_json
    from ldmkit.training import AETrainConfig, AutoencoderMethod, Trainer

    summary_path, settings_path = folder / "summary.json", folder / "fsweep_ae.json"
    net = p.perceptual_net or p.classifier_dir
    want = {k: getattr(p, k) for k in AE_KEYS} | {"f": f}
    if p.ae_perceptual > 0:
        from ldmkit.metrics.classifier import file_sha256

        want["perceptual_net_sha256"] = file_sha256(Path(net) / "model.safetensors")
    want = as_stored(want)
    if (p.reuse and summary_path.is_file() and (folder / "autoencoder" / "config.json").is_file()
            and settings_path.is_file() and read_json(settings_path) == want):
        log(f"LDM-{f}: reusing autoencoder {folder}")
    elif p.report_only:
        return None, None
    else:
        perceptual = {"perceptual_weight": p.ae_perceptual}
        if p.ae_perceptual > 0:
            perceptual["perceptual_net"] = str(net)
        cfg = AETrainConfig(data="fashion-mnist", out=str(folder), preset="tiny-kl-f4", steps=p.ae_steps,
                            batch_size=p.ae_batch, lr=p.ae_lr, adam_betas=(0.9, 0.99), size=32,
                            lr_schedule=p.ae_schedule, ema_decay=p.ae_ema,
                            warmup_steps=0 if p.ae_schedule == "constant" else min(100, p.ae_steps // 10),
                            checkpoint_every=p.ae_steps, sample_every=p.ae_steps, log_every=10, stats_samples=512,
                            seed=0, device=str(device), disc_weight=0.0, kl_weight=1e-6, **perceptual,
                            **autoencoder_overrides(f, p.ae_channels))
        t0 = time.perf_counter()
        trainer = Trainer(AutoencoderMethod(cfg), overwrite=True)
        trainer.run()
        write_json(settings_path, want)
        log(f"LDM-{f}: autoencoder trained in {time.perf_counter() - t0:.0f} s")
    summary = read_json(summary_path)
    ae = load_component(folder / "autoencoder", device=device)
    held = summary["heldout"]
    info = {"f": f, "folder": str(folder / "autoencoder"), "steps": summary["steps"], "batch": p.ae_batch,
            "seconds_per_step": summary.get("seconds_per_step"), "heldout_psnr": held["psnr"],
            "heldout_ssim": held["ssim"], "scaling_factor": ae.config.scaling_factor,
            "shift_factor": ae.config.shift_factor, "latent_shape": [LATENT_CHANNELS[f], 32 // f, 32 // f]}
    psnr = held["psnr"]["mean"] if isinstance(held["psnr"], dict) else held["psnr"]
    log(f"LDM-{f}: autoencoder held-out PSNR {psnr:.2f} dB, latents {info['latent_shape']}")
    return ae, info


@torch.no_grad()
def encode_all(ae, x: torch.Tensor, device) -> torch.Tensor:
    if ae is None:  # LDM-1: pixel space
        return x.clone()
    return torch.cat([ae.encode_latents(b.to(device), sample=False).cpu() for b in x.split(256)])


@torch.no_grad()
def decode_all(ae, z: torch.Tensor, device) -> torch.Tensor:
    if ae is None:
        return z.clamp(-1, 1).cpu()
    return torch.cat([ae.decode_latents(b.to(device)).clamp(-1, 1).cpu() for b in z.split(256)])


# ----------------------------------------------------------------------------- stage 2


def build_unet(channels_in: int, widths: tuple[int, ...]):
    from ldmkit.denoisers.unet import UNet, UNetConfig

    n = len(widths)
    cfg = UNetConfig(in_channels=channels_in, out_channels=channels_in, block_out_channels=tuple(widths),
                     down_block_types=("DownBlock2D",) * n, up_block_types=("UpBlock2D",) * n,
                     mid_block_type="UNetMidBlock2D", layers_per_block=1, norm_num_groups=8,
                     num_class_embeds=NULL_CLASS + 1, sample_size=8)
    return UNet(cfg)


@torch.no_grad()  # no graph through the sampling steps (LDM-1 at 500 samples would need >24 GB for one)
def sample(model, schedule, objective: str, shape, labels: torch.Tensor, sampler: str, steps: int, guidance: float,
           seed: int, device, batch: int = 250) -> torch.Tensor:
    """Class-conditional samples with CFG (null class = NULL_CLASS); seeds fixed per image index."""
    from ldmkit.diffusion import cfg, sample as run_sampler

    out = []
    for lo in range(0, len(labels), batch):
        y = labels[lo:lo + batch].to(device)
        g = torch.Generator().manual_seed(seed + lo)
        x_T = torch.randn((len(y), *shape), generator=g).to(device)
        model_fn = lambda x, t, c: model(x, t, class_labels=c)  # noqa: E731
        network = cfg(model_fn, y, torch.full_like(y, NULL_CLASS), guidance)
        out.append(run_sampler(sampler, network, x_T, schedule, objective, steps,
                               generator=[torch.Generator().manual_seed(seed + lo + k) for k in range(len(y))]).cpu())
    return torch.cat(out)


def score(images, labels, ref_images, classifier, seed: int) -> dict:
    from ldmkit.metrics.evaluate import evaluate

    r = evaluate(images, ref_images, classifier, labels=labels.tolist(), kid_subsets=50,
                 kid_subset_size=min(1000, len(images)), seed=seed)
    return {"fid": r["fid"], "kid": r["kid"]["mean"], "kid_std": r["kid"]["std"], "precision": r["precision"],
            "recall": r["recall"], "class_accuracy": r["class_accuracy"]["accuracy"]}


def real_baseline(x_train, y_train, ref_images, classifier, p) -> dict:
    """The same scores for `--num-eval` real training images (class-balanced): the floor the
    models are measured against at this sample count (FID is biased upwards for small N)."""
    idx = torch.cat([torch.nonzero(y_train == c).flatten()[: (p.num_eval + 9 - c) // 10] for c in range(10)])
    return score(x_train[idx], y_train[idx], ref_images, classifier, 0)


def train_ldm(f: int, seed: int, ae, latents: torch.Tensor, labels: torch.Tensor, ref_images, classifier, p, device,
              step_flops_target: float) -> dict:
    from ldmkit.diffusion import make_schedule, q_sample, sample_timesteps, training_loss
    from ldmkit.training.common import EMA

    schedule = make_schedule(p.schedule)
    shape = tuple(latents.shape[1:])
    torch.manual_seed(seed)
    model = build_unet(shape[0], p.unet_channels).to(device)
    per_sample = flops_per_sample(model, latents[:4].to(device), labels[:4].to(device))
    batch = int(max(2, min(len(latents), round(step_flops_target / per_sample))))
    ema = EMA(model, decay=p.ema, warmup=True)
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 1)
    it = batches(len(latents), batch, g)
    eval_at = sorted({max(1, round(p.steps * k / p.eval_points)) for k in range(1, p.eval_points + 1)})
    n_eval = p.num_eval
    eval_labels = torch.arange(n_eval) % 10
    points, seconds = [], 0.0
    from tqdm.auto import tqdm

    bar = tqdm(range(1, p.steps + 1), desc=f"LDM-{f} seed {seed} (batch {batch})", leave=False)
    for step in bar:
        t0 = time.perf_counter()
        idx = next(it)
        z0, y = latents[idx].to(device), labels[idx].clone()
        drop = torch.rand(len(y), generator=g) < 0.1
        y[drop] = NULL_CLASS
        t = sample_timesteps(schedule, len(y), generator=g, device=device)
        noise = torch.randn(z0.shape, generator=g).to(device)
        out = model(q_sample(schedule, z0, noise, t), t, class_labels=y.to(device))
        loss = training_loss(schedule, p.objective, out, z0, noise, t).mean()
        lr = p.lr * min(1.0, step / 20)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update()
        seconds += time.perf_counter() - t0
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step in eval_at:
            with ema.swapped():
                z = sample(model, schedule, p.objective, shape, eval_labels, p.eval_sampler, p.eval_steps, p.guidance,
                           seed + 999, device)
            images = decode_all(ae, z, device)
            s = score(images, eval_labels, ref_images, classifier, seed)
            s.update(step=step, train_gflop=step * batch * per_sample / 1e9, train_seconds=round(seconds, 1),
                     loss=loss.item())
            points.append(s)
            log(f"LDM-{f} seed {seed} step {step}/{p.steps}: FID {s['fid']:.2f}  KID {s['kid']:.4f}  "
                f"acc {s['class_accuracy']:.3f}  ({s['train_gflop']:.0f} GFLOP, {seconds:.0f} s)")
            last_images = images
    return {"f": f, "seed": seed, "latent_shape": list(shape), "batch": batch, "steps": p.steps,
            "train_flops_per_sample": per_sample, "train_flops_per_step": per_sample * batch,
            "params": sum(q.numel() for q in model.parameters()), "points": points,
            "_model": averaged_copy(model, ema), "_schedule": schedule, "_images": last_images}


def averaged_copy(model, ema):
    import copy

    with ema.swapped():
        return copy.deepcopy(model).eval()


def export_model(run: dict, ae, p, folder: Path) -> Path:
    """The final EMA model as an ldmkit model folder: `ldm sample` / `ldm eval --model` can load it."""
    from ldmkit.conditioning.labels import ClassConditioner, ClassConfig
    from ldmkit.data.fashion_mnist import CLASSES
    from ldmkit.io.format import save_model

    conditioner = ClassConditioner(ClassConfig(num_classes=10, class_names=tuple(CLASSES)))
    index = {"schedule": run["_schedule"].to_dict(), "objective": p.objective, "conditioning": "class", "concat": None,
             "latent_size": run["latent_shape"][1:],
             "defaults": {"sampler": p.eval_sampler, "steps": p.eval_steps, "guidance": p.guidance}}
    return save_model(folder, {"autoencoder": ae, "denoiser": run["_model"], "conditioner": conditioner}, index)


def nfe_sweep(run: dict, ae, ref_images, classifier, p, device) -> list[dict]:
    rows = []
    labels = torch.arange(p.num_eval) % 10
    for sampler in ("ddim", "dpmpp_2m", "euler"):
        for steps in p.nfe_steps:
            t0 = time.perf_counter()
            z = sample(run["_model"], run["_schedule"], p.objective, tuple(run["latent_shape"]), labels, sampler,
                       steps, p.guidance, run["seed"] + 999, device)
            s = score(decode_all(ae, z, device), labels, ref_images, classifier, run["seed"])
            s.update(sampler=sampler, steps=steps, nfe=steps, seconds=round(time.perf_counter() - t0, 1))
            rows.append(s)
            log(f"NFE LDM-{run['f']} {sampler:9s} {steps:3d} steps: FID {s['fid']:.2f}  KID {s['kid']:.4f}  "
                f"acc {s['class_accuracy']:.3f}")
    return rows


# ----------------------------------------------------------------------------- outputs


def save_grid(images: torch.Tensor, path: Path) -> None:
    from ldmkit.io.images import make_grid

    make_grid(images[:min(len(images), 40)], nrow=10).save(path)


# ----------------------------------------------------------------------------- main


def parse(argv=None):
    ap = argparse.ArgumentParser(description="LDM f-sweep on Fashion-MNIST (equal training FLOPs)")
    ap.add_argument("--out", default=None, help="work folder (default outputs/fsweep, with --long outputs/fsweep-long, "
                    "with --full outputs/fsweep-full)")
    ap.add_argument("--results", default=str(HERE / "results"), help="where fsweep.json is copied")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--long", action="store_true", help="the recipe-sized CPU protocol (see LONG in this file)")
    size.add_argument("--full", action="store_true", help="GPU-sized run (see FULL in this file)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4, 8], help="f values (1 = pixels)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="training seeds, one run per f and seed (default: 0; --long and --full: 0 1 2)")
    ap.add_argument("--classifier", default=None, help="feature classifier folder (default OUT/classifier; "
                    "trained there when missing)")
    ap.add_argument("--perceptual-net", default=None,
                    help="classifier folder whose features give the autoencoders' perceptual term (default: the "
                    "feature classifier; another one keeps the judge independent of what stage 1 trained on)")
    ap.add_argument("--nfe-model", type=int, default=4, help="f of the model for the NFE table (0: skip)")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse autoencoders, and (f, seed) runs whose settings match, already in OUT")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: report the (f, seed) runs stored in OUT (implies --reuse) and list the rest")
    ap.add_argument("--budget-gflop", type=float, default=None,
                    help="denoiser training budget per model; sets --steps from LDM-1's step cost")
    for key, value in DEFAULTS.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, tuple):
            ap.add_argument(flag, type=int, nargs="+", default=None)
        else:
            ap.add_argument(flag, type=type(value), default=None)
    args = ap.parse_args(argv)
    base = FULL if args.full else LONG if args.long else DEFAULTS
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
        elif isinstance(value, tuple):
            setattr(args, key, tuple(getattr(args, key)))
    if args.perceptual_net and not (Path(args.perceptual_net) / "config.json").is_file():
        ap.error(f"--perceptual-net {args.perceptual_net}: not a classifier folder (no config.json)")
    if args.out is None:
        args.out = "outputs/fsweep" + ("-full" if args.full else "-long" if args.long else "")
    args.reuse = args.reuse or args.report_only
    if args.seeds is None:
        args.seeds = [0, 1, 2] if (args.full or args.long) else [0]
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        ap.error(f"--seeds {args.seeds}: must be distinct and >= 0")
    bad = [f for f in args.factors if f not in (1, 2, 4, 8)]
    if bad:
        ap.error(f"--factors {bad}: each must be one of 1, 2, 4, 8")
    for key in ("train_images", "reference_images", "steps", "eval_points", "num_eval", "eval_steps", "pixel_batch"):
        if getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.num_eval < 10:
        ap.error(f"--num-eval must be >= 10 (one per class), got {args.num_eval}")
    for key, choices in (("objective", ("eps", "v")), ("schedule", ("linear", "cosine", "scaled_linear")),
                         ("ae_schedule", ("constant", "cosine")), ("eval_sampler", ("ddim", "dpmpp_2m", "euler"))):
        if getattr(args, key) not in choices:
            ap.error(f"--{key.replace('_', '-')} {getattr(args, key)!r}: must be one of {', '.join(choices)}")
    return args


def feature_classifier(p, out: Path, device):
    from ldmkit.metrics.classifier import PRESETS, labelled_dataset, save_classifier, train_classifier
    from ldmkit.metrics.features import ClassifierFeatures

    clf_dir = Path(p.classifier) if p.classifier else out / "classifier"
    if not (clf_dir / "config.json").is_file():
        if p.classifier:
            raise FileNotFoundError(f"--classifier {clf_dir} is not a classifier folder")
        log(f"training the feature classifier ({p.classifier_steps} steps) into {clf_dir}")
        res = train_classifier(labelled_dataset("fashion-mnist", "train"), labelled_dataset("fashion-mnist", "test"),
                               PRESETS["fashion-mnist"], epochs=100, max_steps=p.classifier_steps, device=device,
                               seed=0)
        save_classifier(res.model, clf_dir, dataset="fashion-mnist", accuracy=res.accuracy,
                        steps=p.classifier_steps)
    p.classifier_dir = clf_dir
    classifier = ClassifierFeatures.load(clf_dir, device=device)
    log(f"feature network: {classifier.describe()['name']} accuracy {classifier.meta['accuracy']:.4f}")
    return classifier


def pixel_step_flops(p, device) -> float:
    """Equal FLOPs per step: what LDM-1's optimiser step costs at --pixel-batch, whichever factors this run
    trains (so runs made in parts share one budget)."""
    torch.manual_seed(0)
    probe = build_unet(1, p.unet_channels).to(device)
    x, y = torch.randn(4, 1, 32, 32, device=device), torch.arange(4, device=device)
    return flops_per_sample(probe, x, y) * p.pixel_batch


def run_settings(p, classifier, step_target: float) -> dict:
    """What a stored (f, seed) run must share with this invocation to be reused."""
    skip = {"nfe_steps", "classifier_steps", *AE_KEYS}  # the classifier's and autoencoder's hashes stand for them
    keep = {k: getattr(p, k) for k in DEFAULTS if k not in skip}
    keep |= {"steps": p.steps, "step_flops": round(step_target), "classifier": classifier.describe()["weights_sha256"]}
    return as_stored(keep)


def nfe_table(f: int, run: dict, ae, out: Path, x_ref, classifier, p, device, settings: dict) -> dict | None:
    """The NFE sweep on LDM-f's run of the first seed: read back from OUT when stored with the same settings,
    else from the model in hand or (a reused run) its exported folder; pixel-space runs are not exported, so a
    reused LDM-1 run gets no table."""
    from ldmkit.io.files import write_json

    path = out / f"nfe-f{f}.json"
    key = settings | {"seed": run["seed"], "nfe_steps": list(p.nfe_steps)}
    if (done := stored(path, key, p.reuse)) is not None:
        return done["table"]
    if p.report_only:
        return None
    if "_model" not in run:
        folder = out / f"ldm-f{f}-seed{run['seed']}"
        if not (folder / "denoiser").is_dir():
            log(f"NFE sweep skipped: no LDM-{f} model in hand or in {folder}")
            return None
        from ldmkit.diffusion import make_schedule
        from ldmkit.io.format import load_component

        run = {**run, "_model": load_component(folder / "denoiser", device=device).eval(),
               "_schedule": make_schedule(p.schedule)}
    table = {"f": f, "rows": nfe_sweep(run, ae, x_ref, classifier, p, device)}
    write_json(path, {"settings": key, "table": table})
    return table


def main(argv=None) -> int:
    from _fsweep_report import aggregate, markdown_table, plot, verdict
    from ldmkit.io.files import write_json
    from ldmkit.metrics.classifier import file_sha256

    p = parse(argv)
    device = torch.device(p.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(p.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    x_train, y_train = fashion_mnist("train", p.train_images)
    x_ref, _ = fashion_mnist("test", p.reference_images)
    log(f"data: {len(x_train)} train / {len(x_ref)} reference images, device {device}, seeds {p.seeds}")
    classifier = feature_classifier(p, out, device)
    baseline = real_baseline(x_train, y_train, x_ref, classifier, p)
    log(f"real-data floor ({p.num_eval} train images vs reference): FID {baseline['fid']:.2f}  "
        f"KID {baseline['kid']:.4f}  acc {baseline['class_accuracy']:.3f}")
    step_target = pixel_step_flops(p, device)
    if p.budget_gflop is not None:
        p.steps = max(p.eval_points, int(p.budget_gflop * 1e9 / step_target))
    log(f"budget: {p.steps} steps x {step_target / 1e9:.2f} GFLOP = {p.steps * step_target / 1e9:.0f} GFLOP per model")
    settings = run_settings(p, classifier, step_target)
    stage1, runs, aes, nfe_run, missing = {}, [], {}, None, []
    for f in sorted(p.factors):
        ae, f_settings = None, dict(settings)
        if f > 1:
            folder = out / f"autoencoder-f{f}"
            ae, info = train_autoencoder(f, p, device, folder)
            if ae is None:  # --report-only without a stored autoencoder: no run of this factor can be reused
                missing += [f"f{f}-seed{seed}" for seed in p.seeds]
                continue
            stage1[f] = info
            f_settings["autoencoder_sha256"] = file_sha256(folder / "autoencoder" / "model.safetensors")
        aes[f], latents = ae, None
        for seed in p.seeds:
            path = out / "runs" / f"f{f}-seed{seed}.json"
            if (done := stored(path, f_settings, p.reuse)) is not None:
                log(f"LDM-{f} seed {seed}: reusing {path}")
                run = done["run"]
            elif p.report_only:
                missing.append(f"f{f}-seed{seed}")
                continue
            else:
                latents = encode_all(ae, x_train, device) if latents is None else latents
                run = train_ldm(f, seed, ae, latents, y_train, x_ref, classifier, p, device, step_target)
                save_grid(run["_images"], out / f"samples-f{f}-seed{seed}.png")
                if ae is not None:
                    export_model(run, ae, p, out / f"ldm-f{f}-seed{seed}")
                write_json(path, {"settings": f_settings,
                                  "run": {k: v for k, v in run.items() if not k.startswith("_")}})
            if f == p.nfe_model and seed == p.seeds[0]:
                nfe_run, nfe_settings = run, f_settings
            runs.append(run)

    if missing:
        log(f"not in {out / 'runs'} under these settings (not reported): {', '.join(missing)}")
    if not runs:
        log("no runs to report")
        return 2
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in runs]
    summary = aggregate(public)
    mode = "full" if p.full else "cpu-long" if p.long else "cpu-default"
    result = {
        "benchmark": "fsweep", "mode": mode, "device": str(device),
        "equalised": "FLOPs (forward+backward of the denoiser per optimiser step x steps)",
        "feature_network": classifier.describe(), "real_baseline": baseline,
        "params": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(p).items()
                   if k not in ("classifier_dir", "results")},
        "stage1": {str(k): v for k, v in stage1.items()}, "runs": public, "missing": missing, "summary": summary,
        "verdict": verdict(summary),
    }
    if nfe_run is not None:
        nfe = nfe_table(p.nfe_model, nfe_run, aes[p.nfe_model], out, x_ref, classifier, p, device, nfe_settings)
        if nfe is not None:
            result["nfe"] = nfe
    result["total_seconds"] = round(time.perf_counter() - t_start, 1)
    write_json(out / "fsweep.json", result)
    write_json(Path(p.results) / ("fsweep.json" if mode == "cpu-default" else f"fsweep_{mode}.json"), result)
    plots = plot(result, out)
    (out / "fsweep.md").write_text(markdown_table(result) + "\n")
    log(f"done in {result['total_seconds']:.0f} s: {out / 'fsweep.json'}, {', '.join(map(str, plots))}")
    print(markdown_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
