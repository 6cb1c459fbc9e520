"""CLI subcommands of this package (registered by ldmkit.cli): `ldm convert`.

    ldm convert --from sd15.safetensors --to models/sd15 --tokenizer sd15-diffusers/tokenizer
    ldm convert --from sd21-768.ckpt --to models/sd21 --tokenizer tok/ --prediction-type v
    ldm convert --from models/sd15 --to exported/sd15 --format diffusers
    ldm convert --from some-diffusers-folder --to models/x --dtype fp16
    ldm convert --from models/sd15 --lora style.safetensors:0.8 --to models/sd15-style    (LoRA merged in)
    ldm convert --from flux1-dev.safetensors --base FLUX.1-dev-diffusers --to models/flux-dev
"""
from __future__ import annotations

SINGLE_FILE_OPTIONS = ("prediction_type", "tokenizer", "original_config", "ema", "num_heads", "num_head_channels",
                       "base")


def register(sub, argv: list[str] | None = None) -> None:
    """Add this package's subcommands to the `ldm` parser."""
    p = sub.add_parser("convert", help="convert a model between ldmkit, diffusers and original SD single files",
                       description="Convert a Stable Diffusion model: an ldmkit model folder, a diffusers folder "
                                   "or an original single file (.safetensors / .ckpt) is written as an ldmkit "
                                   "model folder (--format ldmkit) or a diffusers folder (--format diffusers).")
    p.add_argument("--from", dest="source", required=True, metavar="PATH",
                   help="model folder (ldmkit or diffusers) or original single file")
    p.add_argument("--to", dest="dest", required=True, metavar="DIR", help="output folder")
    p.add_argument("--format", choices=("ldmkit", "diffusers"), default="ldmkit", help="output format")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="store weights in this dtype (default: float32)")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty folder")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="merge this LoRA (kohya / A1111 or diffusers / peft file) into the weights at SCALE "
                        "(default 1); repeat for several")
    g = p.add_argument_group("original single files only")
    g.add_argument("--prediction-type", choices=("eps", "v"), default=None,
                   help="what the UNet predicts; not stored in SD files (SD 2.x 768-v models need 'v')")
    g.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="CLIP tokenizer folder (vocab.json + merges.txt, or tokenizer.json), e.g. the "
                        "tokenizer/ folder of a diffusers SD model; single files do not contain one")
    g.add_argument("--original-config", metavar="YAML", default=None,
                   help="the CompVis inference YAML (v1-inference.yaml, v2-inference-v.yaml ...)")
    g.add_argument("--ema", action="store_true", help="use the EMA UNet weights (model_ema.*)")
    g.add_argument("--num-heads", type=int, default=None, help="UNet attention heads (SD 1.x: 8)")
    g.add_argument("--num-head-channels", type=int, default=None, help="UNet channels per head (SD 2.x: 64)")
    g.add_argument("--base", metavar="DIR", default=None,
                   help="SD3 / FLUX.1 single files: a diffusers SD3 / FLUX.1 folder giving what the file lacks "
                        "(tokenizers, scheduler; text encoders and VAE the file does not hold)")
    p.set_defaults(func=_convert)


def _convert(args) -> int:
    from pathlib import Path

    import torch

    from ldmkit.errors import UserError
    from ldmkit.io import detect_format, load_model, resolve_model_path
    from ldmkit.io.diffusers_export import save_diffusers
    from ldmkit.io.format import save_model

    src = resolve_model_path(args.source)
    kind = detect_format(src)
    opts = {k: getattr(args, k) for k in SINGLE_FILE_OPTIONS
            if getattr(args, k) is not None and getattr(args, k) is not False}  # 0 is a given value
    if opts and kind != "single_file":
        flags = ", ".join("--" + k.replace("_", "-") for k in opts)
        raise UserError(f"{flags} only apply to original single-file checkpoints; {src} is a {kind} model")
    for k in ("num_heads", "num_head_channels"):
        if k in opts and not 1 <= opts[k] <= 65536:
            raise UserError(f"--{k.replace('_', '-')}={opts[k]} must be in [1, 65536]")
    dest = Path(args.dest)
    if dest.resolve() == src.resolve():
        raise UserError(f"--to {dest} is the source itself; choose another folder")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not args.overwrite:
        raise UserError(f"--to {dest} exists and is not empty; pass --overwrite to write into it")
    dtype = {None: None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    from ldmkit.io.adapter_files import parse_weighted, read_lora

    loras = [parse_weighted(spec) if not Path(spec).is_file() else (spec, 1.0) for spec in args.lora]
    for path, _ in loras:
        if not Path(path).is_file():
            raise UserError(f"--lora {path} " + ("is not a file" if Path(path).exists() else "does not exist"))
    index, comps = load_model(src, device="cpu", **opts)
    if loras:
        from ldmkit.adapters.lora import merge

        for path, scale in loras:  # merged in float32, before any --dtype cast
            layers = merge(comps, read_lora(path), scale, path)
            print(f"merged LoRA {path} ({layers} layers, scale {scale:g})")
        index.setdefault("merged_loras", []).extend(f"{Path(p).name}:{s:g}" for p, s in loras)
    if dtype is not None:  # storage dtype: every component, the VAE included
        for m in comps.values():
            if m is not None:
                m.to(dtype=dtype)
    for note in index.get("notes", []):
        print(note)
    if args.format == "diffusers":
        save_diffusers(dest, index, comps)
    else:
        keep = {k: v for k, v in index.items() if k not in ("format", "format_version", "components", "notes")}
        save_model(dest, comps, keep)
    print(f"wrote {args.format} model to {dest} (from {kind} {src})")
    return 0
