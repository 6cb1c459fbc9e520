"""CLI subcommands of this package (registered by ldmkit.cli): `ldm train`.

    ldm train --autoencoder AE_DIR --latents CACHE_DIR --out RUN_DIR [options]
    ldm train --out RUN_DIR --resume            # continue from the newest RUN_DIR/checkpoints/step-N.pt
    ldm train --config OLD_RUN/config.json --out NEW_RUN [options]   # a run's settings; flags override
    torchrun --nproc_per_node 4 -m ldmkit.cli train ...   # DDP (gloo on CPU, nccl on GPU)
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

# options that may change when resuming without changing the numerics of the run
RUNTIME_FIELDS = ("steps", "device", "strategy", "progress", "checkpoint_every", "sample_every", "log_every",
                  "sample_prompts", "sample_seeds", "sample_sampler", "sample_steps", "guidance", "compile",
                  "max_bad_steps", "out")


def register(sub) -> None:
    """Add this package's subcommands to the `ldm` parser."""
    p = sub.add_parser("train", help="train a latent diffusion model (stage 2) on cached latents",
                       description="Train a denoiser (+ trainable text encoder) on latents cached from a frozen "
                                   "autoencoder. Works as one process or under `torchrun --nproc_per_node N`.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--out", help="run folder: config.json, checkpoints/, samples/, loss.png, model/ (required unless "
                    "--config names one)")
    a("--config", help="start from these settings: a run's config.json or a JSON object of training fields "
                       "(ldmkit.training.ldm.TrainConfig); the options given here override them")
    a("--autoencoder", help="frozen autoencoder component folder")
    a("--latents", help="latent cache folder (ldmkit.data.latents); see docs/training.md")
    a("--resume", nargs="?", const="auto", default=None,
      help="continue a run: a checkpoint path, or no value for the newest OUT/checkpoints/step-N.pt")
    a("--denoiser", choices=("unet", "dit"))
    a("--preset", help="denoiser preset (ldmkit.denoisers.unet/dit PRESETS)")
    a("--conditioning", choices=("text", "class", "none"))
    a("--text-encoder", help="trainable text transformer preset (tiny, small, base) or minilm (frozen, pretrained)")
    a("--text-encoder-layer", type=int,
      help="minilm: read the hidden states after this layer (1-6; 0 = the token embeddings) instead of the "
           "last ones: earlier layers mix less of the other words into each token")
    a("--objective", choices=("eps", "v", "x0", "flow"))
    a("--schedule", choices=("linear", "scaled_linear", "cosine"))
    a("--loss-weighting", choices=("uniform", "min_snr"))
    a("--timestep-sampling", choices=("auto", "uniform", "stratified", "logit_normal"),
      help="training timesteps: auto (flow: logit_normal, else uniform); stratified spreads each batch's "
           "timesteps evenly over the noise levels (lower-variance loss, same expectation)")
    a("--spatial", choices=("inpaint", "upscale", "semantic"),
      help="spatially aligned input concatenated to the noisy latent (the cache needs `ldm cache-latents "
           "--store-images` for inpaint/upscale, `--segmentation` for semantic); see docs/training.md")
    a("--noise-level-max", type=int, help="upscale: highest noise augmentation level of the low-res input "
                                            "(0 = none; UNets without class conditioning)")
    a("--position-features", action="store_true", default=None,
      help="UNet: feed normalised pixel coordinates to the first conv's output and every attention block")
    a("--context-adapter-layers", type=int,
      help="UNet: trainable self-attention layers over the conditioning tokens before cross-attention "
           "(lets a frozen text encoder's states be re-mixed, e.g. who is left of whom)")
    a("--init-from", help="start from the model + EMA weights of another run's checkpoint (fresh optimiser, LR "
                          "schedule and step count): a second training stage, fine-tuning")
    a("--stage1-latents", help="a recaptioned copy of --latents (same latents, other captions; "
                               "ldmkit.data.latents.recaption) whose captions the first --stage1-steps steps read")
    a("--stage1-steps", type=int, help="steps of the caption curriculum's first stage (with --stage1-latents)")
    a("--word-drop", type=float, help="each occurrence of a --drop-words word leaves a training caption with this "
                                        "probability (drawn per step, so resume stays exact; with --stage1-latents "
                                        "from step --stage1-steps on)")
    a("--drop-words", type=lambda v: tuple(w for w in v.split(",") if w),
      help="comma-separated words --word-drop may remove, e.g. attribute words (red,green,blue,yellow), so the "
           "rest of the caption has to carry the meaning")
    a("--steps", type=int)
    a("--batch-size", type=int, help="global batch per optimiser step (all processes, all accumulation steps)")
    a("--grad-accum", type=int)
    a("--lr", type=float)
    a("--lr-schedule", choices=("constant", "cosine"))
    a("--warmup-steps", type=int)
    a("--weight-decay", type=float)
    a("--grad-clip", type=float, help="max gradient norm (0 disables)")
    a("--ema-decay", type=float)
    a("--ema-warmup", type=int)
    a("--cond-drop", type=float, help="condition dropout probability (for classifier-free guidance)")
    a("--precision", choices=("no", "bf16", "fp16"))
    a("--compile", action="store_true", default=None, help="torch.compile the model")
    a("--seed", type=int)
    a("--max-bad-steps", type=int, help="stop after this many consecutive NaN/inf steps")
    a("--checkpoint-every", type=int)
    a("--sample-every", type=int)
    a("--log-every", type=int)
    a("--sample-prompt", action="append", dest="sample_prompts",
      help="prompt for the sample grid (repeatable; class runs take labels)")
    a("--sample-seeds", type=int, nargs="+")
    a("--sampler", dest="sample_sampler")
    a("--sample-steps", type=int)
    a("--guidance", type=float)
    a("--device", help="cpu | cuda (default: cuda when available)")
    a("--strategy", choices=("ddp", "fsdp"), help="data parallelism under torchrun")
    a("--no-progress", dest="progress", action="store_false", default=None)
    p.set_defaults(func=_train)


def _train(args) -> int:
    from ldmkit.errors import UserError
    from ldmkit.io.format import read_json
    from ldmkit.training import distributed
    from ldmkit.training.common import latest_checkpoint
    from ldmkit.training.ldm import LDMTrainer, TrainConfig, TrainingDiverged

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    for key in ("sample_prompts", "sample_seeds"):
        if key in given:
            given[key] = tuple(given[key])
    resume = None
    if args.config is not None:
        if args.resume is not None:
            raise UserError("--config starts a run; --resume continues one with the settings of its config.json")
        base = _config_file(args.config)
        given = {**base, **given}
    if "out" not in given:
        raise UserError("--out is required (unless --config names one)")
    if args.resume is not None:
        out = Path(given["out"])
        resume = (latest_checkpoint(out / "checkpoints") or out / "checkpoints" / "step-N.pt") if args.resume == "auto" else Path(args.resume)
        if not resume.is_file():
            raise UserError(f"--resume: checkpoint {resume} does not exist")
        saved = read_json(out / "config.json")["training"]
        # fields newer than the run's config.json take their defaults (what the run used)
        changed = sorted(k for k, v in given.items()
                         if k not in RUNTIME_FIELDS and TrainConfig.from_dict({k: saved[k]} if k in saved else {})
                         .__dict__[k] != v)
        if changed:
            raise UserError(f"--resume keeps the run's settings; these options differ from {out}/config.json: "
                            f"{changed} (only {list(RUNTIME_FIELDS)} may change)")
        config = dataclasses.replace(TrainConfig.from_dict(saved), **{k: v for k, v in given.items()
                                                                       if k in RUNTIME_FIELDS})
    else:
        for need in ("autoencoder", "latents"):
            if need not in given:
                raise UserError(f"--{need} is required (unless --resume)")
        config = TrainConfig.from_dict(given)
    ctx = distributed.init(config.device)
    try:
        trainer = LDMTrainer(config, ctx, resume=resume)
        folder = trainer.run()
    except TrainingDiverged as exc:
        raise UserError(str(exc)) from None
    finally:
        distributed.shutdown(ctx)
    if ctx.is_main:
        task = {"inpaint": "inpaint --image IMG --mask MASK", "upscale": "upscale --image LOWRES",
                "semantic": "semantic --map MAP.png"}.get(config.spatial, "sample")
        print(f"model written to {folder} (load with: ldm {task} --model {folder} ...)")
    return 0


def _config_file(path: str) -> dict:
    """Training fields from ``path``: a run's config.json (its "training" object) or a plain object of
    TrainConfig fields. Unknown keys are refused by name."""
    import json

    from ldmkit.errors import UserError
    from ldmkit.training.ldm import TrainConfig

    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as exc:
        raise UserError(f"--config: cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"--config: {path} is not valid JSON: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("training"), dict):
        data = data["training"]
    if not isinstance(data, dict):
        raise UserError(f"--config: {path} holds no object of training settings")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"--config: {path} has unknown training settings {unknown}")
    return dict(data)
