"""The LDM paper's f-sweep (its Fig. 6) on Fashion-MNIST, at a size this CPU can run.

    python benchmarks/fsweep.py                          # CPU default (~20-25 min on 2 busy cores)
    python benchmarks/fsweep.py --full --device cuda     # the same protocol scaled up for a GPU
    python benchmarks/fsweep.py --factors 4 8 --budget-gflop 200   # a quick partial run

Question: for the same training compute, which compression factor f gives the
best class-conditional samples?  LDM-1 is diffusion in pixel space; LDM-f
(f = 2, 4, 8) diffuses in the latent space of a KL autoencoder that
downsamples 32x32 images by f.

Protocol (what is equal, what is measured):
1. Data: Fashion-MNIST train split (zero-padded to 32x32, first `--train-images`),
   reference set = the test split (first `--reference-images`).
2. Stage 1, trained once per f with the library's autoencoder method (what
   `ldm train-autoencoder` runs) on the full train split and then frozen: a KL
   autoencoder with L1 + 1e-6 KL loss (no LPIPS: the VGG weights cannot be downloaded
   here; no GAN at this size).  Latents are the posterior means, shifted and scaled to
   unit variance by the factors the trainer stores.  f = 1 uses the pixels.
   Autoencoder training and latent caching are *not* counted in the compute (as in the
   paper: stage 1 is trained once and shared).
3. Stage 2: the same class-conditional UNet (`ldmkit.denoisers.UNet`, class embedding
   with a null class for classifier-free guidance, 10% condition dropout), eps
   objective on the DDPM linear schedule, AdamW + EMA.  **Equal FLOPs**: the
   forward+backward FLOPs of one training sample are measured with
   `torch.utils.flop_counter.FlopCounterMode`; every model runs the same number of
   optimiser steps with a batch sized so that one step costs the same FLOPs as LDM-1's
   step at `--pixel-batch` (small latents get bigger batches, capped at the data size).
   Wall-clock seconds are recorded too, but they are not what is equalised.
   The loop is written out in `train_ldm` below with the library's schedule, objective
   (`ldmkit.diffusion.training_loss`), EMA and samplers rather than `ldm train`'s
   the ldm method: LDM-1 has no autoencoder (the trainer needs a frozen one and a latent
   cache), and evaluating at exact FLOP budgets needs the loop in hand; all four runs share it.
4. At `--eval-points` evenly spaced points of the budget, the EMA model draws
   `--num-eval` class-balanced samples (DDIM, `--eval-steps` steps, CFG scale
   `--guidance`); they are scored by FID / KID against the reference set in the
   feature space of ldmkit's own Fashion-MNIST classifier (`ldm train-classifier`),
   and by class accuracy under that classifier.
5. Sampler quality vs NFE on one trained model (`--nfe-model`, default LDM-4): DDIM,
   DPM++ 2M and Euler at 5 / 10 / 20 / 50 steps, same seeds and guidance.

Writes `OUT/fsweep.json`, `OUT/fsweep.png` (quality vs training compute),
`OUT/fsweep_nfe.png`, `OUT/samples-f{f}.png`, and copies the JSON to
`benchmarks/results/fsweep.json`.  docs/fsweep.md reports a run.
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

DEFAULTS = dict(  # CPU default: about 20-25 minutes on the 2 shared cores here
    train_images=6000, reference_images=1000, classifier_steps=400,
    ae_channels=8, ae_steps=200, ae_batch=32, ae_lr=2e-3,
    unet_channels=(16, 32), pixel_batch=16, steps=180, lr=1e-3, ema=0.99,
    eval_points=3, num_eval=100, eval_steps=10, guidance=3.0, nfe_steps=(5, 10, 20, 50),
)
FULL = dict(  # one GPU: the same protocol with real sizes
    train_images=60000, reference_images=10000, classifier_steps=3000,
    ae_channels=64, ae_steps=6000, ae_batch=64, ae_lr=5e-4,
    unet_channels=(64, 128, 128), pixel_batch=64, steps=20000, lr=2e-4, ema=0.999,
    eval_points=8, num_eval=2000, eval_steps=50, guidance=3.0, nfe_steps=(5, 10, 20, 50),
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


def train_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# ----------------------------------------------------------------------------- stage 1


def autoencoder_overrides(f: int, channels: int) -> dict:
    """Architecture of the f-autoencoder: grey 32x32 in, (32/f)^2 x c latents out."""
    m = int(math.log2(f))
    return {"image_channels": 1, "channels": channels, "ch_mult": (1,) + (2,) * m, "num_res_blocks": 1,
            "latent_channels": LATENT_CHANNELS[f], "norm_groups": 8, "mid_attention": False}


def train_autoencoder(f: int, p, device, folder: Path) -> tuple[object, dict]:
    """Stage 1 with the library's method (`ldm train-autoencoder`):
    L1 + 1e-6 KL on Fashion-MNIST 32x32; no LPIPS (VGG16 weights cannot be downloaded here) and no GAN
    at this size. The trainer stores the latent scaling/shift factors in the component's config."""
    from ldmkit.io.format import load_component
    from ldmkit.io.files import read_json
    from ldmkit.training import AETrainConfig, AutoencoderMethod, Trainer

    summary_path = folder / "summary.json"
    if p.reuse and summary_path.is_file() and (folder / "autoencoder" / "config.json").is_file():
        log(f"LDM-{f}: reusing autoencoder {folder}")
    else:
        cfg = AETrainConfig(data="fashion-mnist", out=str(folder), preset="tiny-kl-f4", steps=p.ae_steps,
                            batch_size=p.ae_batch, lr=p.ae_lr, adam_betas=(0.9, 0.99), size=32, ema_decay=0.99,
                            checkpoint_every=p.ae_steps, sample_every=p.ae_steps, log_every=10, stats_samples=512,
                            seed=p.seed, device=str(device), perceptual_weight=0.0, disc_weight=0.0, kl_weight=1e-6,
                            **autoencoder_overrides(f, p.ae_channels))
        t0 = time.perf_counter()
        trainer = Trainer(AutoencoderMethod(cfg), overwrite=True)
        trainer.run()
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


def sample(model, schedule, shape, labels: torch.Tensor, sampler: str, steps: int, guidance: float, seed: int,
           device, batch: int = 250) -> torch.Tensor:
    """Class-conditional samples with CFG (null class = NULL_CLASS); seeds fixed per image index."""
    from ldmkit.diffusion import cfg, sample as run_sampler

    out = []
    for lo in range(0, len(labels), batch):
        y = labels[lo:lo + batch].to(device)
        g = torch.Generator().manual_seed(seed + lo)
        x_T = torch.randn((len(y), *shape), generator=g).to(device)
        model_fn = lambda x, t, c: model(x, t, class_labels=c)  # noqa: E731
        network = cfg(model_fn, y, torch.full_like(y, NULL_CLASS), guidance)
        out.append(run_sampler(sampler, network, x_T, schedule, "eps", steps,
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
    return score(x_train[idx], y_train[idx], ref_images, classifier, p.seed)


def train_ldm(f: int, ae, latents: torch.Tensor, labels: torch.Tensor, ref_images, classifier, p, device,
              step_flops_target: float | None) -> dict:
    from ldmkit.diffusion import make_schedule, q_sample, sample_timesteps, training_loss
    from ldmkit.training.common import EMA

    schedule = make_schedule("linear")
    shape = tuple(latents.shape[1:])
    torch.manual_seed(p.seed)
    model = build_unet(shape[0], p.unet_channels).to(device)
    # FLOPs of one training sample (forward + backward), measured on a batch of 4
    probe = latents[:4].to(device)

    def probe_step():
        out = model(probe, torch.full((4,), 500, device=device), class_labels=labels[:4].to(device))
        out.square().mean().backward()

    per_sample = train_flops(probe_step) / 4
    model.zero_grad(set_to_none=True)
    target = step_flops_target if step_flops_target is not None else per_sample * p.pixel_batch
    batch = int(max(2, min(len(latents), round(target / per_sample))))
    ema = EMA(model, decay=p.ema, warmup=True)
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(p.seed + 1)
    it = batches(len(latents), batch, g)
    eval_at = sorted({max(1, round(p.steps * k / p.eval_points)) for k in range(1, p.eval_points + 1)})
    n_eval = p.num_eval
    eval_labels = torch.arange(n_eval) % 10
    points, seconds = [], 0.0
    from tqdm.auto import tqdm

    bar = tqdm(range(1, p.steps + 1), desc=f"LDM-{f} (batch {batch})", leave=False)
    for step in bar:
        t0 = time.perf_counter()
        idx = next(it)
        z0, y = latents[idx].to(device), labels[idx].clone()
        drop = torch.rand(len(y), generator=g) < 0.1
        y[drop] = NULL_CLASS
        t = sample_timesteps(schedule, len(y), generator=g, device=device)
        noise = torch.randn(z0.shape, generator=g).to(device)
        out = model(q_sample(schedule, z0, noise, t), t, class_labels=y.to(device))
        loss = training_loss(schedule, "eps", out, z0, noise, t).mean()
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
                z = sample(model, schedule, shape, eval_labels, "ddim", p.eval_steps, p.guidance, p.seed + 999,
                           device)
            images = decode_all(ae, z, device)
            s = score(images, eval_labels, ref_images, classifier, p.seed)
            s.update(step=step, train_gflop=step * batch * per_sample / 1e9, train_seconds=round(seconds, 1),
                     loss=loss.item())
            points.append(s)
            log(f"LDM-{f} step {step}/{p.steps}: FID {s['fid']:.2f}  KID {s['kid']:.4f}  "
                f"acc {s['class_accuracy']:.3f}  ({s['train_gflop']:.0f} GFLOP, {seconds:.0f} s)")
            last_images = images
    return {"f": f, "latent_shape": list(shape), "batch": batch, "steps": p.steps,
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
    index = {"schedule": run["_schedule"].to_dict(), "objective": "eps", "conditioning": "class", "concat": None,
             "latent_size": run["latent_shape"][1:],
             "defaults": {"sampler": "ddim", "steps": p.eval_steps, "guidance": p.guidance}}
    return save_model(folder, {"autoencoder": ae, "denoiser": run["_model"], "conditioner": conditioner}, index)


def nfe_sweep(run: dict, ae, ref_images, classifier, p, device) -> list[dict]:
    rows = []
    labels = torch.arange(p.num_eval) % 10
    for sampler in ("ddim", "dpmpp_2m", "euler"):
        for steps in p.nfe_steps:
            t0 = time.perf_counter()
            z = sample(run["_model"], run["_schedule"], tuple(run["latent_shape"]), labels, sampler, steps,
                       p.guidance, p.seed + 999, device)
            s = score(decode_all(ae, z, device), labels, ref_images, classifier, p.seed)
            s.update(sampler=sampler, steps=steps, nfe=steps, seconds=round(time.perf_counter() - t0, 1))
            rows.append(s)
            log(f"NFE LDM-{run['f']} {sampler:9s} {steps:3d} steps: FID {s['fid']:.2f}  KID {s['kid']:.4f}  "
                f"acc {s['class_accuracy']:.3f}")
    return rows


# ----------------------------------------------------------------------------- plots


def plot(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for run in result["runs"]:
        xs = [pt["train_gflop"] for pt in run["points"]]
        label = f"LDM-{run['f']}" + (" (pixels)" if run["f"] == 1 else "")
        axes[0].plot(xs, [pt["fid"] for pt in run["points"]], "o-", label=label)
        axes[1].plot(xs, [pt["kid"] for pt in run["points"]], "o-", label=label)
        axes[2].plot(xs, [pt["class_accuracy"] for pt in run["points"]], "o-", label=label)
    for ax, name in zip(axes, ("FID (own classifier features) - lower is better", "KID - lower is better",
                               "class accuracy of samples - higher is better")):
        ax.set_xlabel("denoiser training compute (GFLOP, forward+backward)")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend()
    prm = result["params"]
    fig.suptitle(f"Fashion-MNIST 32x32 class-conditional, equal FLOPs per model ({result['mode']} sizes, "
                 f"{prm['steps']} steps, {prm['num_eval']} samples per point)")
    fig.tight_layout()
    paths.append(out / "fsweep.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    if result.get("nfe"):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        styles = {"ddim": "o-", "dpmpp_2m": "s-", "euler": "x--"}  # euler == ddim here: dashed on top
        steps = sorted({r["nfe"] for r in result["nfe"]["rows"]})
        for sampler in ("ddim", "dpmpp_2m", "euler"):
            rows = [r for r in result["nfe"]["rows"] if r["sampler"] == sampler]
            axes[0].plot([r["nfe"] for r in rows], [r["fid"] for r in rows], styles[sampler], label=sampler)
            axes[1].plot([r["nfe"] for r in rows], [r["class_accuracy"] for r in rows], styles[sampler],
                         label=sampler)
        for ax, name in zip(axes, ("FID (own features)", "class accuracy")):
            ax.set_xscale("log")
            ax.set_xticks(steps, [str(v) for v in steps])
            ax.minorticks_off()
            ax.set_xlabel("sampling steps (model evaluations per image, x2 with CFG)")
            ax.set_title(f"{name}, LDM-{result['nfe']['f']}", fontsize=10)
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.tight_layout()
        paths.append(out / "fsweep_nfe.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def save_grid(images: torch.Tensor, path: Path) -> None:
    from ldmkit.io.images import make_grid

    make_grid(images[:min(len(images), 40)], nrow=10).save(path)


def markdown_table(result: dict) -> str:
    lines = []
    if result.get("real_baseline"):
        b = result["real_baseline"]
        lines += [f"Real-data floor ({result['params']['num_eval']} real training images scored the same way): "
                  f"FID {b['fid']:.2f}, KID {b['kid']:.4f}, precision {b['precision']:.2f}, "
                  f"recall {b['recall']:.2f}, accuracy {b['class_accuracy']:.3f}", ""]
    if result.get("stage1"):
        lines += ["| autoencoder | latent | steps | held-out PSNR (dB) | held-out SSIM |", "|---|---|---|---|---|"]
        for f, info in sorted(result["stage1"].items(), key=lambda kv: int(kv[0])):
            lines.append(f"| f={f} | {'x'.join(map(str, info['latent_shape']))} | {info['steps']} | "
                         f"{info['heldout_psnr']['mean']:.2f} | {info['heldout_ssim']['mean']:.3f} |")
        lines.append("")
    lines += ["| model | latent | batch | step | train GFLOP | train s | FID | KID | precision | recall | accuracy |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        for pt in run["points"]:
            lines.append(f"| LDM-{run['f']} | {'x'.join(map(str, run['latent_shape']))} | {run['batch']} | "
                         f"{pt['step']} | {pt['train_gflop']:.0f} | {pt['train_seconds']:.0f} | {pt['fid']:.2f} | "
                         f"{pt['kid']:.4f} | {pt['precision']:.2f} | {pt['recall']:.2f} | "
                         f"{pt['class_accuracy']:.3f} |")
    if result.get("nfe"):
        lines += ["", f"Sampler quality vs steps on LDM-{result['nfe']['f']} (guidance {result['params']['guidance']}):",
                  "", "| sampler | steps | FID | KID | accuracy | seconds |", "|---|---|---|---|---|---|"]
        for r in result["nfe"]["rows"]:
            lines.append(f"| {r['sampler']} | {r['steps']} | {r['fid']:.2f} | {r['kid']:.4f} | "
                         f"{r['class_accuracy']:.3f} | {r['seconds']} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def parse(argv=None):
    ap = argparse.ArgumentParser(description="LDM f-sweep on Fashion-MNIST (equal training FLOPs)")
    ap.add_argument("--out", default="outputs/fsweep", help="work folder (default outputs/fsweep)")
    ap.add_argument("--results", default=str(HERE / "results"), help="where fsweep.json is copied")
    ap.add_argument("--full", action="store_true", help="GPU-sized run (see FULL in this file)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4, 8], help="f values (1 = pixels)")
    ap.add_argument("--classifier", default=None, help="feature classifier folder (default OUT/classifier; "
                    "trained there when missing)")
    ap.add_argument("--nfe-model", type=int, default=4, help="f of the model for the NFE table (0: skip)")
    ap.add_argument("--reuse", action="store_true", help="reuse autoencoders already in OUT")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-gflop", type=float, default=None,
                    help="denoiser training budget per model; sets --steps from LDM-1's step cost")
    for key, value in DEFAULTS.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, tuple):
            ap.add_argument(flag, type=int, nargs="+", default=None)
        else:
            ap.add_argument(flag, type=type(value), default=None)
    args = ap.parse_args(argv)
    base = FULL if args.full else DEFAULTS
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
        elif isinstance(value, tuple):
            setattr(args, key, tuple(getattr(args, key)))
    bad = [f for f in args.factors if f not in (1, 2, 4, 8)]
    if bad:
        ap.error(f"--factors {bad}: each must be one of 1, 2, 4, 8")
    for key in ("train_images", "reference_images", "steps", "eval_points", "num_eval", "eval_steps", "pixel_batch"):
        if getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.num_eval < 10:
        ap.error(f"--num-eval must be >= 10 (one per class), got {args.num_eval}")
    return args


def main(argv=None) -> int:
    p = parse(argv)
    device = torch.device(p.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(p.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    x_train, y_train = fashion_mnist("train", p.train_images)
    x_ref, _ = fashion_mnist("test", p.reference_images)
    log(f"data: {len(x_train)} train / {len(x_ref)} reference images, device {device}")

    from ldmkit.metrics.classifier import PRESETS, labelled_dataset, save_classifier, train_classifier
    from ldmkit.metrics.features import ClassifierFeatures

    clf_dir = Path(p.classifier) if p.classifier else out / "classifier"
    if not (clf_dir / "config.json").is_file():
        if p.classifier:
            raise FileNotFoundError(f"--classifier {clf_dir} is not a classifier folder")
        log(f"training the feature classifier ({p.classifier_steps} steps) into {clf_dir}")
        res = train_classifier(labelled_dataset("fashion-mnist", "train"), labelled_dataset("fashion-mnist", "test"),
                               PRESETS["fashion-mnist"], epochs=100, max_steps=p.classifier_steps, device=device,
                               seed=p.seed)
        save_classifier(res.model, clf_dir, dataset="fashion-mnist", accuracy=res.accuracy,
                        steps=p.classifier_steps)
    classifier = ClassifierFeatures.load(clf_dir, device=device)
    log(f"feature network: {classifier.describe()['name']} accuracy {classifier.meta['accuracy']:.4f}")

    baseline = real_baseline(x_train, y_train, x_ref, classifier, p)
    log(f"real-data floor ({p.num_eval} train images vs reference): FID {baseline['fid']:.2f}  "
        f"KID {baseline['kid']:.4f}  acc {baseline['class_accuracy']:.3f}")
    stage1, runs = {}, []
    step_target = None
    for f in sorted(p.factors):
        ae = None
        if f > 1:
            ae, info = train_autoencoder(f, p, device, out / f"autoencoder-f{f}")
            stage1[f] = info
        latents = encode_all(ae, x_train, device)
        if step_target is None:
            # equal FLOPs per step: the smallest f present sets the step cost at --pixel-batch
            probe = build_unet(latents.shape[1], p.unet_channels).to(device)
            y4 = y_train[:4].to(device)
            per = train_flops(lambda: probe(latents[:4].to(device), torch.full((4,), 500, device=device),
                                            class_labels=y4).square().mean().backward()) / 4
            step_target = per * p.pixel_batch
            if p.budget_gflop is not None:
                p.steps = max(p.eval_points, int(p.budget_gflop * 1e9 / step_target))
            log(f"budget: {p.steps} steps x {step_target / 1e9:.2f} GFLOP = "
                f"{p.steps * step_target / 1e9:.0f} GFLOP per model")
            del probe
        run = train_ldm(f, ae, latents, y_train, x_ref, classifier, p, device, step_target)
        run["_ae"] = ae
        save_grid(run["_images"], out / f"samples-f{f}.png")
        if ae is not None:
            run["model_folder"] = str(export_model(run, ae, p, out / f"ldm-f{f}"))
        runs.append(run)

    result = {
        "benchmark": "fsweep", "mode": "full" if p.full else "cpu-default", "device": str(device),
        "equalised": "FLOPs (forward+backward of the denoiser per optimiser step x steps)",
        "feature_network": classifier.describe(),
        "real_baseline": baseline,
        "params": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(p).items()},
        "stage1": {str(k): v for k, v in stage1.items()},
        "runs": [{k: v for k, v in r.items() if not k.startswith("_")} for r in runs],
    }
    nfe_run = next((r for r in runs if r["f"] == p.nfe_model), None)
    if nfe_run is not None:
        result["nfe"] = {"f": nfe_run["f"], "rows": nfe_sweep(nfe_run, nfe_run["_ae"], x_ref, classifier, p, device)}
    result["total_seconds"] = round(time.perf_counter() - t_start, 1)
    (out / "fsweep.json").write_text(json.dumps(result, indent=2))
    results_dir = Path(p.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "fsweep.json").write_text(json.dumps(result, indent=2))
    plots = plot(result, out)
    (out / "fsweep.md").write_text(markdown_table(result) + "\n")
    log(f"done in {result['total_seconds']:.0f} s: {out / 'fsweep.json'}, {', '.join(map(str, plots))}")
    print(markdown_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
