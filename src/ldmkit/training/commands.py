"""`ldm train` and `ldm train-autoencoder` (registered by ldmkit.cli); their flags come from the configs.

    ldm train --latents CACHE --autoencoder AE --out RUN [options]      method "ldm" (the default)
    ldm train --method NAME ...                                          another method (ldm train --method NAME --help)
    ldm train --init-from SD --lora-rank 8 --data DIR --out RUN          method "finetune" (picked by its flags)
    ldm train --out RUN --resume [CHECKPOINT]                            continue a run exactly (the newest checkpoint)
    ldm train --config RUN/config.json --out RUN2 --lr 5e-5             a run's settings, some changed
    ldm train-autoencoder --data DIR --out RUN [options]                 method "autoencoder"
    ldm distill --teacher MODEL --data DIR --out RUN [--lora-rank R]     method "lcm" (a 1-8 step student)
    ldm train-tiny-decoder --autoencoder MODEL --data DIR --out RUN      method "tiny-decoder"
    torchrun --nproc_per_node 4 -m ldmkit.cli train ...                  the same under DDP (--strategy fsdp)
"""
from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_METHOD = "ldm"


def _method_in(argv: list[str] | None) -> str:
    """The method the command line names (`--method NAME`), else the run's own when resuming, else the
    method one of whose own flags is given (`route_flags`: --lora-rank picks finetune), else ldm."""
    argv = list(argv or [])
    for i, a in enumerate(argv):
        if a == "--method" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--method="):
            return a.split("=", 1)[1]
    if "--resume" in argv or any(a.startswith("--resume=") for a in argv):
        for i, a in enumerate(argv):
            out = argv[i + 1] if a == "--out" and i + 1 < len(argv) else (a[6:] if a.startswith("--out=") else None)
            if out and (Path(out) / "config.json").is_file():
                try:
                    from ldmkit.training.loop import saved_config

                    return saved_config(out)[0]
                except ValueError:
                    return DEFAULT_METHOD
    from ldmkit.training.methods import METHODS

    flags = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    for name, (method_cls, _) in METHODS.items():
        if any("--" + f.replace("_", "-") in flags for f in getattr(method_cls, "route_flags", ())):
            return name
    return DEFAULT_METHOD


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="start from these settings: a run's config.json or a JSON object "
                   "of settings; the flags given here override them")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="continue the run in --out exactly: from CHECKPOINT, or without a value from its newest one")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (its checkpoints, "
                   "samples, logs and outputs)")


def register(sub, argv: list[str] | None = None) -> None:
    """Add this package's subcommands to the `ldm` parser (`argv` picks the method whose flags `train` takes)."""
    from ldmkit.training.config import add_flags
    from ldmkit.training.methods import METHODS

    name = _method_in(argv) if argv and argv[0] == "train" else DEFAULT_METHOD
    method_cls, config_cls = METHODS.get(name, METHODS[DEFAULT_METHOD])
    p = sub.add_parser("train", help="train a model with one of the training methods (default: ldm, a latent "
                       "diffusion model on cached latents)",
                       description=f"Train with method {name!r}: {method_cls.summary} "
                                   "Runs as one process or under `torchrun --nproc_per_node N`. "
                                   f"Methods: {', '.join(METHODS)} (`ldm train --method NAME --help`).")
    p.add_argument("--method", choices=list(METHODS), default=name, help="training method")
    _add_run_flags(p)
    add_flags(p, config_cls, f"{name} settings")
    p.set_defaults(func=_train, config_cls=config_cls, method_cls=method_cls)

    _method_command(sub, "train-autoencoder", "autoencoder", "train a stage-1 KL or VQ autoencoder (= ldm train "
                    "--method autoencoder)", "Train a perceptual autoencoder (L1 + LPIPS + PatchGAN; KL or VQ "
                    "bottleneck). Writes checkpoints/, samples/, loss.png, autoencoder/ (with its latent scaling "
                    "factor) and summary.json under --out. See docs/autoencoder.md.")
    _method_command(sub, "train-tiny-decoder", "tiny-decoder", "distil a model's decoder into a tiny one for fast "
                    "decoding and previews (= ldm train --method tiny-decoder)", "Train a TAESD-style tiny decoder "
                    "to imitate an autoencoder's full decoder. Writes tiny_decoder/ and summary.json (its PSNR "
                    "against the full decoder, decode times) under --out. Use it with `ldm sample --tiny-decoder "
                    "RUN/tiny_decoder --fast-decode`. See docs/generation.md.")
    p = _method_command(sub, "distill", "lcm", "distil a pretrained model into a 1-8 step student (= ldm train "
                        "--method lcm)", "Latent consistency distillation: a teacher (--teacher MODEL) becomes a "
                        "student that samples in 1-8 steps with --sampler lcm -- the whole UNet with a guidance "
                        "input (a model folder), or a LoRA (--lora-rank R, LCM-LoRA). See docs/finetuning.md.")
    p.add_argument("--method", choices=("lcm",), default="lcm", help="distillation method: lcm (latent consistency)")


def _method_command(sub, command: str, method: str, help: str, description: str):
    """`ldm COMMAND`: one method's run, its flags from its config."""
    from ldmkit.training.config import add_flags
    from ldmkit.training.methods import METHODS

    method_cls, config_cls = METHODS[method]
    p = sub.add_parser(command, help=help, description=description)
    _add_run_flags(p)
    add_flags(p, config_cls, f"{method} settings")
    p.set_defaults(func=_train, config_cls=config_cls, method_cls=method_cls, method=method)
    return p


def build_config(args) -> tuple[object, Path | None]:
    """(config, checkpoint to resume from) from the flags, `--config` and a resumed run's config.json."""
    from ldmkit.errors import UserError
    from ldmkit.training.common import latest_checkpoint
    from ldmkit.training.config import from_dict, given, read_config_file, resume_changes
    from ldmkit.training.loop import saved_config

    cls = args.config_cls
    flags = given(args, cls)
    if args.resume is None:
        base = read_config_file(args.config, cls) if args.config else {}
        return from_dict(cls, {**base, **flags}, "the settings"), None
    if args.config:
        raise UserError("--config starts a run; --resume continues one with the settings of its config.json")
    if "out" not in flags:
        raise UserError("--resume needs --out: the run folder to continue")
    out = Path(flags["out"])
    method, saved = saved_config(out)
    if method != args.method:
        raise UserError(f"{out} holds an `ldm train --method {method}` run; resume it with --method {method}")
    saved = from_dict(cls, {**saved, "out": str(out)}, f"{out}/config.json")
    changed = resume_changes(saved, flags)
    if changed:
        raise UserError(f"--resume keeps the run's settings; {changed} differ from {out}/config.json (only "
                        "bookkeeping such as --steps, --checkpoint-every, --sample-every or --device may change)")
    import dataclasses

    checkpoint = latest_checkpoint(out / "checkpoints") if args.resume == "auto" else Path(args.resume)
    if checkpoint is None or not checkpoint.is_file():
        raise UserError(f"--resume: no checkpoint {'in ' + str(out / 'checkpoints') if checkpoint is None else checkpoint}")
    return dataclasses.replace(saved, **flags), checkpoint


def _train(args) -> int:
    from ldmkit.training.loop import train

    config, checkpoint = build_config(args)
    method = args.method_cls(config)
    result = train(method, resume=checkpoint, overwrite=args.overwrite)
    if result is not None:
        print(method.usage(result))
    return 0
