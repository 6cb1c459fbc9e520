"""The stage-1 training loop: autoencoder + PatchGAN, two AdamW optimizers, EMA, exact resume.

One step:
    x_rec, aux = model(x)                                   (posterior sample / VQ lookup)
    L_G = rec + w_p LPIPS + w_kl KL (or w_vq L_vq) + lambda * L_gan  -> AdamW(autoencoder)
    L_D = hinge / non-saturating on D(x), D(sg[x_rec])      -> AdamW(discriminator)  (from disc_start)
    EMA of the autoencoder weights.

RUN_DIR layout:
    checkpoints/step-<N>.pt   full training state (atomic; --resume continues the newest)
    samples/step-<N>.png      originals (top) over reconstructions (bottom), held-out images
    loss.csv, loss.png        every logged term separately
    autoencoder/              final component (EMA weights) with scaling_factor/shift_factor
    summary.json              held-out PSNR/SSIM of the final model and the latent statistics

Resume is exact: model, EMA, discriminator, both optimizers, every RNG and the
data order (a permutation per epoch from (seed, epoch)) are restored, so an
interrupted run continues as if it had not stopped.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ldmkit.autoencoder.losses import LPIPS, AutoencoderLoss, LossConfig
from ldmkit.autoencoder.model import PRESETS, Autoencoder, AutoencoderConfig


@dataclass(frozen=True)
class AETrainConfig:
    data: str                          # image folder, "fashion-mnist" or "shapes"
    out: str
    preset: str = "tiny-kl-f4"
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-4
    disc_lr: float | None = None       # default: lr
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    size: int | None = None            # image size (default: the preset's sample_size; 32 for fashion-mnist)
    grad_clip: float = 1.0             # 0 disables clipping
    ema_decay: float = 0.999           # 0 disables EMA
    amp: str = "auto"                  # "auto" (bf16 on CUDA), "bf16", "none"
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    sample_every: int = 500
    log_every: int = 10
    holdout: int = 16                  # held-out images of an image folder (for grids and metrics)
    stats_samples: int = 256           # images used for the latent scaling factor
    num_workers: int = 0
    seed: int = 0
    device: str = "auto"
    vgg_weights: str | None = None
    # losses
    rec_loss: str = "l1"
    perceptual_weight: float = 1.0
    kl_weight: float = 1e-6
    vq_weight: float = 1.0
    disc_weight: float = 0.5
    disc_start: int = 0
    disc_loss: str = "hinge"
    disc_layers: int = 3
    disc_channels: int = 64
    # architecture overrides on the preset (e.g. {"num_codes": 512})
    model_overrides: dict | None = None

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"unknown autoencoder preset {self.preset!r}; choose from {sorted(PRESETS)}")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        for name in ("ckpt_every", "sample_every", "log_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0 (0 disables)")
        if self.lr <= 0 or (self.disc_lr is not None and self.disc_lr <= 0):
            raise ValueError(f"lr={self.lr}, disc_lr={self.disc_lr}: learning rates must be > 0")
        if self.amp not in ("auto", "bf16", "none"):
            raise ValueError(f"amp={self.amp!r}: must be 'auto', 'bf16' or 'none'")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay}: must be in [0, 1)")
        if self.stats_samples < 1:
            raise ValueError(f"stats_samples={self.stats_samples}: must be >= 1")
        self.loss_config()  # validates the loss settings

    def loss_config(self) -> LossConfig:
        return LossConfig(rec_loss=self.rec_loss, perceptual_weight=self.perceptual_weight,
                          kl_weight=self.kl_weight, vq_weight=self.vq_weight, disc_weight=self.disc_weight,
                          disc_start=self.disc_start, disc_loss=self.disc_loss, disc_layers=self.disc_layers,
                          disc_channels=self.disc_channels)

    def model_config(self) -> AutoencoderConfig:
        cfg = replace(PRESETS[self.preset], **(self.model_overrides or {}))
        return replace(cfg, sample_size=self.image_size(cfg))

    def image_size(self, cfg: AutoencoderConfig | None = None) -> int:
        if self.size is not None:
            return self.size
        if self.data == "fashion-mnist":
            return 32
        return (cfg or PRESETS[self.preset]).sample_size


# ----------------------------------------------------------------------------- data


def build_datasets(data: str, size: int, channels: int = 3, holdout: int = 16, seed: int = 0,
                   train_augment: bool = True):
    """(train, held-out) datasets yielding {"image": [C, size, size] in [-1, 1], ...}.

    `data` is an image folder, "fashion-mnist" (train / t10k) or "shapes" (the
    bundled synthetic set; train / heldout split). The held-out part of a folder
    is a fixed random subset of `holdout` images (seeded), never augmented.
    """
    if data == "fashion-mnist":
        from ldmkit.data.fashion_mnist import FashionMNIST

        if size not in (28, 32):
            raise ValueError(f"size={size}: Fashion-MNIST images are 28x28 (32 when padded); use 28 or 32")
        return (FashionMNIST("train", pad_to_32=size == 32, channels=channels),
                FashionMNIST("test", pad_to_32=size == 32, channels=channels))
    if data == "shapes":
        try:
            from ldmkit.data.shapes import ShapesDataset
        except ImportError as exc:  # pragma: no cover - the module ships with ldmkit
            raise ValueError(f"--data shapes needs ldmkit.data.shapes ({exc})") from None
        if channels != 3:
            raise ValueError(f"channels={channels}: the shapes data set is RGB (3 channels)")
        return (ShapesDataset("train", size=size, length=20000, seed=seed),
                ShapesDataset("heldout", size=size, length=max(holdout, 1000), seed=seed))
    from ldmkit.data.images import ImageFolder

    folder = Path(data)
    if not folder.is_dir():
        raise ValueError(f"--data {data!r}: not a folder, and not 'fashion-mnist' or 'shapes'")
    full = ImageFolder(folder, size=size, channels=channels, random_crop=train_augment, flip=train_augment,
                       seed=seed)
    if len(full) < 2:
        raise ValueError(f"--data {data}: need at least 2 images (training + held-out), found {len(full)}")
    return full.split(min(holdout, len(full) // 2), seed=seed)


def image_batch(dataset, indices) -> torch.Tensor:
    return torch.stack([dataset[int(i)]["image"] for i in indices])


class StepBatchSampler(torch.utils.data.Sampler):
    """Batches for steps start..steps-1: epoch e is a permutation seeded by (seed, e), so
    the batch of any step is known in advance (exact resume). Each element is
    (index, augmentation seed), the seed a function of (seed, step, position)."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, steps: int):
        self.n, self.bs, self.seed, self.start, self.steps = n, batch_size, seed, start, steps
        self.per_epoch = max(1, n // batch_size)

    def batch(self, step: int) -> list[int]:
        epoch, pos = divmod(step, self.per_epoch)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n, generator=g)
        if self.n < self.bs:  # tiny data: repeat the permutation
            perm = perm.repeat(math.ceil(self.bs / self.n))
        return perm[pos * self.bs:(pos + 1) * self.bs].tolist()

    def __iter__(self):
        for step in range(self.start, self.steps):
            yield [(i, (self.seed * 1_000_003 + step) * 4099 + j) for j, i in enumerate(self.batch(step))]

    def __len__(self) -> int:
        return max(0, self.steps - self.start)


class _SeededItems(torch.utils.data.Dataset):
    """dataset[(index, seed)]: augmentation (ImageFolder crops/flips) drawn from Random(seed)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        if hasattr(self.dataset, "item"):
            return self.dataset.item(index, rng=random.Random(seed))
        return self.dataset[index]


def _collate_images(items: list[dict]) -> torch.Tensor:
    return torch.stack([it["image"] for it in items])


# ----------------------------------------------------------------------------- statistics


@torch.no_grad()
def latent_statistics(model: Autoencoder, dataset, num_samples: int = 256, batch_size: int = 32,
                      seed: int = 0, device=None) -> dict:
    """Mean and std of the latents over the first `num_samples` images of `dataset`
    (posterior samples for KL, pre-quantisation latents for VQ).

    Returns {"shift_factor": mean, "scaling_factor": 1 / std, "std", "mean", "num_samples"}:
    (z - shift_factor) * scaling_factor then has zero mean and unit variance.
    """
    device = device or next(model.parameters()).device
    n = min(num_samples, len(dataset))
    if n < 1:
        raise ValueError("latent_statistics needs at least one image")
    g = torch.Generator(device=device).manual_seed(seed)
    total, total_sq, count = 0.0, 0.0, 0
    model.eval()
    for start in range(0, n, batch_size):
        x = image_batch(dataset, range(start, min(n, start + batch_size))).to(device)
        z = model.encode(x).sample(g).double()
        total += z.sum().item()
        total_sq += z.pow(2).sum().item()
        count += z.numel()
    mean = total / count
    std = math.sqrt(max(total_sq / count - mean ** 2, 1e-24))
    return {"shift_factor": mean, "scaling_factor": 1.0 / std, "mean": mean, "std": std, "num_samples": n}


@torch.no_grad()
def evaluate(model: Autoencoder, dataset, num_images: int | None = None, batch_size: int = 32, lpips=None,
             device=None) -> dict:
    """Held-out reconstruction metrics: PSNR / SSIM on [0, 1] images, LPIPS when given,
    codebook usage and perplexity over all held-out codes for VQ."""
    from ldmkit.metrics.reconstruction import lpips as lpips_fn
    from ldmkit.metrics.reconstruction import psnr, ssim, summarize, to_unit

    device = device or next(model.parameters()).device
    n = len(dataset) if num_images is None else min(num_images, len(dataset))
    model.eval()
    vals = {"psnr": [], "ssim": [], "lpips": []}
    counts = torch.zeros(model.config.num_codes, device=device) if model.config.kind == "vq" else None
    for start in range(0, n, batch_size):
        x = image_batch(dataset, range(start, min(n, start + batch_size))).to(device)
        z = model.encode(x).mode()
        if counts is not None:
            _, _, info = model.quantize(z)
            counts += torch.bincount(info["indices"].flatten(), minlength=counts.numel()).float()
        x_rec = model.decode(z).float().clamp(-1, 1)
        vals["psnr"] += psnr(to_unit(x), to_unit(x_rec)).tolist()
        vals["ssim"] += ssim(to_unit(x), to_unit(x_rec)).tolist() if min(x.shape[-2:]) >= 11 else []
        if lpips is not None:
            rgb = (lambda t: t if t.shape[1] == 3 else t.expand(-1, 3, -1, -1))
            vals["lpips"] += lpips_fn(lpips, rgb(x), rgb(x_rec)).tolist()
    out = {"num_images": n, "psnr": summarize(vals["psnr"]), "ssim": summarize(vals["ssim"]),
           "lpips": summarize(vals["lpips"]) if lpips is not None else "unavailable (no VGG16 weights)"}
    if counts is not None:
        p = counts / counts.sum()
        out["codebook"] = {"num_codes": int(counts.numel()), "used": int((counts > 0).sum()),
                           "usage": float((counts > 0).float().mean()),
                           "perplexity": float(torch.exp(-(p * torch.log(p + 1e-10)).sum()))}
    return out


# ----------------------------------------------------------------------------- training


# Logged to loss.csv / loss.png; everything else (grad_norm, d_weight, logits, perplexity,
# usage) goes to diagnostics.csv / diagnostics.png so the scales do not crush each other.
LOSS_TERMS = ("rec", "lpips", "kl", "vq", "g", "d", "total")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r}: CUDA is not available here")
    return dev


class AutoencoderTrainer:
    """Builds everything from an AETrainConfig; `run()` trains to `steps` and writes the component."""

    def __init__(self, c: AETrainConfig, resume: bool = False, progress_bar: bool = True):
        from ldmkit.training.common import EMA, LossLog, latest_checkpoint, load_training_state, set_seed

        self.c, self.out, self.progress_bar = c, Path(c.out), progress_bar
        self.device = _device(c.device)
        self.ckpt_dir = self.out / "checkpoints"
        state = None
        if resume:
            path = latest_checkpoint(self.ckpt_dir)
            if path is None:
                raise ValueError(f"--resume: no checkpoint (step-*.pt) in {self.ckpt_dir}")
            state = load_training_state(path, map_location="cpu")
            self.resumed_from = path
        set_seed(c.seed)
        model_cfg = c.model_config()
        if state is not None:
            from ldmkit.io.format import config_from_dict

            model_cfg = config_from_dict(AutoencoderConfig, state["model_config"])
        self.size = model_cfg.sample_size
        self.train_data, self.heldout = build_datasets(c.data, self.size, model_cfg.in_channels, c.holdout, c.seed)
        self.model = Autoencoder(model_cfg).to(self.device)
        lpips = None
        if c.perceptual_weight > 0:
            lpips = LPIPS.from_pretrained(c.vgg_weights, device=self.device)
        self.lpips = lpips
        self.loss = AutoencoderLoss(c.loss_config(), model_cfg.out_channels, lpips).to(self.device)
        ae_params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt_ae = torch.optim.AdamW(ae_params, lr=c.lr, betas=c.betas, weight_decay=c.weight_decay)
        self.opt_d = None
        if self.loss.discriminator is not None:
            self.opt_d = torch.optim.AdamW(self.loss.discriminator.parameters(), lr=c.disc_lr or c.lr,
                                           betas=c.betas, weight_decay=c.weight_decay)
        self.ema = EMA(self.model, c.ema_decay) if c.ema_decay > 0 else None
        self.step = 0
        if state is not None:
            self._load_state(state)
        resume_step = self.step if state is not None else None
        self.log = LossLog(self.out / "loss.csv", resume_step=resume_step)
        self.diag = LossLog(self.out / "diagnostics.csv", resume_step=resume_step)
        use_bf16 = c.amp == "bf16" or (c.amp == "auto" and self.device.type == "cuda")
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext
        n_show = min(8, len(self.heldout))
        self.show = image_batch(self.heldout, range(n_show))

    # ---- state
    def state_dict(self) -> dict:
        from ldmkit.training.common import rng_state

        return {"step": self.step, "model_config": dataclasses.asdict(self.model.config),
                "train_config": json.loads(json.dumps(dataclasses.asdict(self.c))),
                "model": self.model.state_dict(), "loss": self.loss.state_dict(),
                "opt_ae": self.opt_ae.state_dict(),
                "opt_d": self.opt_d.state_dict() if self.opt_d is not None else None,
                "ema": self.ema.state_dict() if self.ema is not None else None, "rng": rng_state()}

    def _load_state(self, state: dict) -> None:
        from ldmkit.training.common import set_rng_state

        self.model.load_state_dict(state["model"])
        missing, unexpected = self.loss.load_state_dict(state["loss"], strict=False)
        bad = [k for k in missing + unexpected if not k.startswith("lpips.")]
        if bad:
            raise ValueError(f"checkpoint loss/discriminator state does not match the current settings: {bad[:5]}")
        self.opt_ae.load_state_dict(state["opt_ae"])
        if self.opt_d is not None:
            if state["opt_d"] is None:
                raise ValueError("checkpoint was trained without a discriminator; keep --disc-weight 0")
            self.opt_d.load_state_dict(state["opt_d"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.step = int(state["step"])
        set_rng_state(state["rng"])

    def save_checkpoint(self) -> Path:
        from ldmkit.training.common import prune_checkpoints, save_training_state

        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        path = save_training_state(self.ckpt_dir / f"step-{self.step}.pt", self.state_dict())
        prune_checkpoints(self.ckpt_dir, self.c.keep_checkpoints)
        return path

    # ---- one step
    def train_step(self, x: torch.Tensor) -> dict:
        c = self.c
        self.model.train()
        x = x.to(self.device, non_blocking=True)
        with self.autocast():
            x_rec, aux = self.model(x)
            loss, logs = self.loss.generator_loss(x, x_rec, aux, self.step, last_layer=self.model.last_layer)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite autoencoder loss at step {self.step}: {float(loss)}")
        self.opt_ae.zero_grad(set_to_none=True)
        loss.backward()
        if c.grad_clip > 0:
            logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        self.opt_ae.step()
        if self.loss.gan_active(self.step):
            with self.autocast():
                d_loss, d_logs = self.loss.discriminator_loss(x, x_rec.detach(), self.step)
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            if c.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.loss.discriminator.parameters(), c.grad_clip)
            self.opt_d.step()
            logs.update(d_logs)
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        return {k: float(v) for k, v in logs.items()}

    def eval_model(self) -> Autoencoder:
        return self.ema.module if self.ema is not None else self.model

    @torch.no_grad()
    def save_samples(self) -> Path:
        from ldmkit.io.images import make_grid, save_png

        model = self.eval_model().eval()
        x = self.show.to(self.device)
        x_rec = model.decode(model.encode(x).mode()).float().clamp(-1, 1)
        grid = make_grid(torch.cat([x, x_rec]).cpu(), nrow=len(x))
        return save_png(grid, self.out / "samples" / f"step-{self.step}.png",
                        metadata={"step": self.step, "rows": "originals over reconstructions (held-out)"})

    def _plot(self) -> None:
        self.log.plot(self.out / "loss.png", title=f"autoencoder {self.c.preset}: loss terms")
        self.diag.plot(self.out / "diagnostics.png", title=f"autoencoder {self.c.preset}: diagnostics")

    # ---- the loop
    def run(self) -> dict:
        from ldmkit.io.format import save_component, write_json
        from ldmkit.training.common import progress

        c = self.c
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / "train_config.json", json.loads(json.dumps(dataclasses.asdict(c))))
        sampler = StepBatchSampler(len(self.train_data), c.batch_size, c.seed, self.step, c.steps)
        loader = torch.utils.data.DataLoader(_SeededItems(self.train_data), batch_sampler=sampler, num_workers=c.num_workers,
                                             collate_fn=_collate_images, pin_memory=self.device.type == "cuda",
                                             # own generator: creating the iterator must not draw from the
                                             # global RNG (exact resume)
                                             generator=torch.Generator().manual_seed(c.seed))
        bar = progress(total=c.steps, initial=self.step, desc=f"train-autoencoder {c.preset}",
                       disable=not self.progress_bar)
        t0, first = time.perf_counter(), self.step
        try:
            for x in loader:
                logs = self.train_step(x)
                bar.update(1)
                if c.log_every and (self.step % c.log_every == 0 or self.step == c.steps):
                    self.log.append(self.step, **{k: v for k, v in logs.items() if k in LOSS_TERMS})
                    self.diag.append(self.step, **{k: v for k, v in logs.items() if k not in LOSS_TERMS})
                    bar.set_postfix({k: f"{logs[k]:.4g}" for k in ("rec", "lpips", "kl", "vq", "g", "d") if k in logs})
                if c.sample_every and self.step % c.sample_every == 0:
                    self.save_samples()
                if c.ckpt_every and self.step % c.ckpt_every == 0 and self.step < c.steps:
                    self.save_checkpoint()
                    self._plot()
        finally:
            bar.close()
        seconds = time.perf_counter() - t0
        self.save_checkpoint()
        self._plot()
        self.save_samples()
        model = self.eval_model()
        stats = latent_statistics(model, self.train_data, c.stats_samples, seed=c.seed, device=self.device)
        model.config = replace(model.config, scaling_factor=stats["scaling_factor"],
                               shift_factor=stats["shift_factor"])
        metrics = evaluate(model, self.heldout, num_images=min(len(self.heldout), 256), lpips=self.lpips,
                           device=self.device)
        folder = save_component(model.to("cpu"), self.out / "autoencoder")
        model.to(self.device)
        steps_done = self.step - first
        summary = {"preset": c.preset, "steps": self.step, "latent_statistics": stats, "heldout": metrics,
                   "seconds_per_step": seconds / steps_done if steps_done else None,
                   "device": str(self.device), "autoencoder": str(folder)}
        write_json(self.out / "summary.json", summary)
        return summary


def update_scaling_factor(folder: str | Path, dataset, num_samples: int = 256, seed: int = 0,
                          device: str = "auto") -> dict:
    """`ldm ae-stats`: recompute the latent statistics of a component folder and store them in its config.json."""
    from ldmkit.io.format import load_component, read_json, write_json

    folder = Path(folder)
    model = load_component(folder, device=_device(device))
    if not isinstance(model, Autoencoder):
        raise ValueError(f"{folder} holds a {type(model).__name__}, not an autoencoder")
    model.config = replace(model.config, scaling_factor=1.0, shift_factor=0.0)
    stats = latent_statistics(model, dataset, num_samples, seed=seed)
    meta = read_json(folder / "config.json")
    meta["config"]["scaling_factor"] = stats["scaling_factor"]
    meta["config"]["shift_factor"] = stats["shift_factor"]
    write_json(folder / "config.json", meta)
    return stats
