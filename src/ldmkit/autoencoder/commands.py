"""CLI subcommands of the autoencoder package: train-autoencoder, ae-stats, eval-autoencoder."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DATA_HELP = "an image folder (PNG/JPEG, recursive), 'fashion-mnist' (Debian dataset-fashion-mnist) or 'shapes'"


def _component_folder(path: str) -> Path:
    """Accept a component folder, a model folder (MODEL/autoencoder) or a training run (RUN/autoencoder)."""
    p = Path(path)
    if (p / "config.json").is_file() and (p / "model.safetensors").is_file():
        return p
    if (p / "autoencoder" / "config.json").is_file():
        return p / "autoencoder"
    raise FileNotFoundError(f"--model {path}: no autoencoder component (config.json + model.safetensors) "
                            "there or in its autoencoder/ sub-folder")


def _train(args) -> int:
    from ldmkit.training.autoencoder import AETrainConfig, AutoencoderTrainer

    overrides = {}
    if args.num_codes is not None:
        overrides["num_codes"] = args.num_codes
    fields = dict(
        data=args.data, out=args.out, preset=args.preset, steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, disc_lr=args.disc_lr, weight_decay=args.weight_decay, size=args.size,
        grad_clip=args.grad_clip, ema_decay=args.ema_decay, amp=args.amp, ckpt_every=args.ckpt_every,
        keep_checkpoints=args.keep_checkpoints, sample_every=args.sample_every, log_every=args.log_every,
        holdout=args.holdout, stats_samples=args.stats_samples, num_workers=args.num_workers, seed=args.seed,
        device=args.device, vgg_weights=args.vgg_weights, rec_loss=args.rec_loss,
        perceptual_weight=args.perceptual_weight, kl_weight=args.kl_weight, vq_weight=args.vq_weight,
        disc_weight=args.disc_weight, disc_start=args.disc_start, disc_loss=args.disc_loss,
        disc_layers=args.disc_layers, disc_channels=args.disc_channels, model_overrides=overrides or None)
    config = AETrainConfig(**fields)
    if args.threads:
        import torch

        if args.threads < 1:
            raise ValueError(f"--threads {args.threads}: must be >= 1")
        torch.set_num_threads(args.threads)
    trainer = AutoencoderTrainer(config, resume=args.resume, progress_bar=not args.quiet)
    if args.resume:
        print(f"resuming from {trainer.resumed_from} (step {trainer.step})", file=sys.stderr)
    summary = trainer.run()
    print(json.dumps(summary, indent=2))
    return 0


MAX_SIZE = 16384  # pixels
MAX_IMAGES = 10_000_000
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed takes


def _check_common(args) -> None:
    """Flags of ae-stats / eval-autoencoder that need no model (bad ones fail before any loading)."""
    from ldmkit.errors import check_device

    if args.size is not None and not 1 <= args.size <= MAX_SIZE:
        raise ValueError(f"--size {args.size} must be in [1, {MAX_SIZE}] pixels")
    if not SEED_RANGE[0] <= args.seed <= SEED_RANGE[1]:
        raise ValueError(f"--seed {args.seed} is outside the allowed range [{SEED_RANGE[0]}, {SEED_RANGE[1]}]")
    if args.device != "auto":
        check_device(args.device)
    for name in ("num_samples", "num_images", "holdout"):
        v = getattr(args, name, None)
        if v is not None and not 1 <= v <= MAX_IMAGES:
            raise ValueError(f"--{name.replace('_', '-')} {v} must be in [1, {MAX_IMAGES}]")
    if getattr(args, "batch_size", None) is not None and not 1 <= args.batch_size <= 65536:
        raise ValueError(f"--batch-size {args.batch_size} must be in [1, 65536]")


def _autoencoder_config(folder: Path):
    """The component's AutoencoderConfig, checked (without building the network)."""
    from ldmkit.autoencoder.model import AutoencoderConfig
    from ldmkit.errors import UserError
    from ldmkit.io.format import config_from_dict, read_json

    meta = read_json(folder / "config.json")
    if meta.get("type") != "autoencoder" or not isinstance(meta.get("config"), dict):
        raise UserError(f"{folder / 'config.json'} does not describe an autoencoder (type {meta.get('type')!r})")
    try:
        return config_from_dict(AutoencoderConfig, meta["config"])
    except ValueError as exc:
        raise UserError(f"{folder / 'config.json'}: {exc}") from None


def _check_size(size: int, factor: int) -> None:
    if size % factor:
        raise ValueError(f"--size {size} is not a multiple of the autoencoder's downsampling factor {factor}")


def _stats(args) -> int:
    from ldmkit.training.autoencoder import build_datasets, update_scaling_factor

    _check_common(args)
    folder = _component_folder(args.model)
    cfg = _autoencoder_config(folder)
    size = args.size or cfg.sample_size or 256
    _check_size(size, cfg.downsample_factor)
    train, _ = build_datasets(args.data, size, cfg.in_channels, seed=args.seed, train_augment=False)
    stats = update_scaling_factor(folder, train, args.num_samples, seed=args.seed, device=args.device)
    print(json.dumps({"autoencoder": str(folder), **stats}, indent=2))
    return 0


def _eval(args) -> int:
    import torch

    from ldmkit.autoencoder.losses import LPIPS
    from ldmkit.io.format import load_component, write_json
    from ldmkit.training.autoencoder import _device, build_datasets, evaluate

    _check_common(args)
    folder = _component_folder(args.model)
    _autoencoder_config(folder)
    device = _device(args.device)
    model = load_component(folder, device=device)
    size = args.size or model.config.sample_size or 256
    _check_size(size, model.downsample_factor)
    _, heldout = build_datasets(args.data, size, model.config.in_channels, holdout=args.holdout, seed=args.seed,
                                train_augment=False)
    lpips = None if args.no_lpips else LPIPS.from_pretrained(args.vgg_weights, device=device)
    with torch.inference_mode():
        metrics = evaluate(model, heldout, num_images=args.num_images, batch_size=args.batch_size, lpips=lpips,
                           device=device)
    result = {"autoencoder": str(folder), "data": args.data, "size": size, "kind": model.config.kind,
              "downsample_factor": model.downsample_factor, **metrics}
    text = json.dumps(result, indent=2)
    if args.out:
        write_json(args.out, result)
    print(text)
    return 0


def register(sub) -> None:
    """Add this package's subcommands to the `ldm` parser."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("train-autoencoder", help="train a stage-1 KL or VQ autoencoder", formatter_class=fmt,
                       description="Train a perceptual autoencoder (L1 + LPIPS + PatchGAN; KL or VQ bottleneck). "
                                   "Writes checkpoints/, samples/, loss.png and the final autoencoder/ component "
                                   "(with its latent scaling factor) under --out. See docs/autoencoder.md.")
    a = p.add_argument
    a("--data", required=True, help=DATA_HELP)
    a("--out", required=True, help="run folder")
    a("--preset", default="tiny-kl-f4", help="kl-f4, kl-f8 (SD VAE shape), vq-f4, vq-f8, tiny-kl-f4, tiny-kl-f8, "
                                               "tiny-vq-f4 (ldmkit.autoencoder.model.PRESETS)")
    a("--steps", type=int, default=1000, help="total optimiser steps (a resumed run continues to this)")
    a("--batch-size", type=int, default=16)
    a("--lr", type=float, default=1e-4)
    a("--disc-lr", type=float, default=None, help="discriminator learning rate (default: --lr)")
    a("--weight-decay", type=float, default=0.0)
    a("--size", type=int, default=None, help="image size (default: the preset's; 32 for fashion-mnist)")
    a("--grad-clip", type=float, default=1.0, help="max gradient norm (0 disables)")
    a("--ema-decay", type=float, default=0.999, help="0 disables EMA")
    a("--amp", choices=("auto", "bf16", "none"), default="auto", help="auto: bf16 autocast on CUDA")
    a("--resume", action="store_true", help="continue from the newest OUT/checkpoints/step-N.pt")
    a("--ckpt-every", type=int, default=500, help="steps between checkpoints (0: only at the end)")
    a("--keep-checkpoints", type=int, default=2)
    a("--sample-every", type=int, default=500, help="steps between reconstruction grids (0: only at the end)")
    a("--log-every", type=int, default=10)
    a("--holdout", type=int, default=16, help="held-out images of an image folder")
    a("--stats-samples", type=int, default=256, help="images for the latent scaling factor")
    a("--num-workers", type=int, default=0)
    a("--seed", type=int, default=0)
    a("--device", default="auto")
    a("--vgg-weights", default=None,
      help="VGG16 weights (torchvision vgg16-397923af.pth) for LPIPS; default: $LDMKIT_VGG16_WEIGHTS or the "
           "torch hub cache; without them training runs without the perceptual loss")
    a("--rec-loss", choices=("l1", "l2"), default="l1")
    a("--perceptual-weight", type=float, default=1.0)
    a("--kl-weight", type=float, default=1e-6)
    a("--vq-weight", type=float, default=1.0)
    a("--disc-weight", type=float, default=0.5, help="0 disables the discriminator")
    a("--disc-start", type=int, default=0, help="first step with the adversarial loss")
    a("--disc-loss", choices=("hinge", "non-saturating"), default="hinge")
    a("--disc-layers", type=int, default=3, help="PatchGAN stride-2 stages")
    a("--disc-channels", type=int, default=64, help="PatchGAN base width")
    a("--num-codes", type=int, default=None, help="VQ codebook size (overrides the preset)")
    a("--threads", type=int, default=None,
      help="torch CPU threads (on a busy machine 1 thread can be much faster than several)")
    a("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)

    p = sub.add_parser("ae-stats", help="compute the latent scaling/shift factor of an autoencoder",
                       formatter_class=fmt,
                       description="Encode a data sample, store shift_factor = mean and scaling_factor = 1/std of "
                                   "the latents in the component's config.json (what stage 2 uses).")
    p.add_argument("--model", required=True, help="autoencoder component folder (or a run / model folder)")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--size", type=int, default=None, help="image size (default: the model's sample_size)")
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_stats)

    p = sub.add_parser("eval-autoencoder", help="reconstruction metrics (PSNR, SSIM, LPIPS, codebook usage)",
                       formatter_class=fmt,
                       description="Reconstruct the held-out split (image folder: the same seeded held-out "
                                   "subset as training; fashion-mnist: t10k; shapes: heldout) and report JSON.")
    p.add_argument("--model", required=True, help="autoencoder component folder (or a run / model folder)")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--num-images", type=int, default=None, help="limit the held-out images (default: all)")
    p.add_argument("--holdout", type=int, default=16, help="held-out images of an image folder (as in training)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--vgg-weights", default=None, help="VGG16 weights for LPIPS (see train-autoencoder)")
    p.add_argument("--no-lpips", action="store_true")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.set_defaults(func=_eval)
