"""CLI subcommands of the autoencoder package: ae-stats, eval-autoencoder (`ldm train-autoencoder` is a
training method: ldmkit.training.methods.autoencoder)."""
from __future__ import annotations

import argparse
import json
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
    from ldmkit.io.files import config_from_dict, read_json

    meta = read_json(folder / "config.json")
    if meta.get("type") != "autoencoder" or not isinstance(meta.get("config"), dict):
        raise UserError(f"{folder / 'config.json'} does not describe an autoencoder (type {meta.get('type')!r})")
    try:
        return config_from_dict(AutoencoderConfig, meta["config"])
    except ValueError as exc:
        raise UserError(f"{folder / 'config.json'}: {exc}") from None


def _device(name: str):
    """--device: "auto" is CUDA when available, else the CPU."""
    import torch

    from ldmkit.errors import check_device

    return check_device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def _check_size(size: int, factor: int) -> None:
    if size % factor:
        raise ValueError(f"--size {size} is not a multiple of the autoencoder's downsampling factor {factor}")


def _stats(args) -> int:
    from ldmkit.autoencoder.evaluation import update_scaling_factor
    from ldmkit.data.sets import build_datasets

    _check_common(args)
    folder = _component_folder(args.model)
    cfg = _autoencoder_config(folder)
    size = args.size or cfg.sample_size or 256
    _check_size(size, cfg.downsample_factor)
    train, _ = build_datasets(args.data, size, cfg.in_channels, seed=args.seed, train_augment=False)
    stats = update_scaling_factor(folder, train, args.num_samples, seed=args.seed, device=_device(args.device))
    print(json.dumps({"autoencoder": str(folder), **stats}, indent=2))
    return 0


def _eval(args) -> int:
    import torch

    from ldmkit.autoencoder.losses import LPIPS
    from ldmkit.io.format import load_component
    from ldmkit.io.files import write_json
    from ldmkit.autoencoder.evaluation import evaluate
    from ldmkit.data.sets import evaluation_set

    _check_common(args)
    folder = _component_folder(args.model)
    _autoencoder_config(folder)
    device = _device(args.device)
    model = load_component(folder, device=device)
    size = args.size or model.config.sample_size or 256
    _check_size(size, model.downsample_factor)
    heldout = evaluation_set(args.data, size, model.config.in_channels, seed=args.seed)
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


def register(sub, argv: list[str] | None = None) -> None:
    """Add this package's subcommands to the `ldm` parser."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
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
                       description="Reconstruct held-out images (an image folder: all of it, center crops; "
                                   "fashion-mnist: t10k; shapes: the held-out compositions) and report JSON.")
    p.add_argument("--model", required=True, help="autoencoder component folder (or a run / model folder)")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--num-images", type=int, default=None, help="limit the held-out images (default: all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--vgg-weights", default=None, help="VGG16 weights for LPIPS (see train-autoencoder)")
    p.add_argument("--no-lpips", action="store_true")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.set_defaults(func=_eval)
