"""SDXL's command-line settings (sample, img2img, inpaint): micro-conditioning and the refiner.

    ldm sample --model sdxl --prompt "..." --original-size 1024 1024 --crop 0 0 --target-size 1024 1024
    ldm sample --model sdxl --refiner sdxl-refiner --refiner-start 0.8 --aesthetic-score 6 --prompt "..."
"""
from __future__ import annotations

PAIRS = {"original_size": ("H", "W"), "crop": ("TOP", "LEFT"), "target_size": ("H", "W")}


def add_flags(p) -> None:
    g = p.add_argument_group("SDXL (micro-conditioning: defaults are the output size and a (0, 0) crop)")
    for name, metavar in PAIRS.items():
        flag = name.replace("_", "-")
        what = {"original_size": "the size the model is told the image had before resizing",
                "crop": "the crop's top-left corner the model is told", "target_size": "the size it is told to make"}
        g.add_argument(f"--{flag}", type=int, nargs=2, default=None, metavar=metavar, help=what[name])
        g.add_argument(f"--negative-{flag}", type=int, nargs=2, default=None, metavar=metavar,
                       help=f"the same for the negative side of classifier-free guidance (default: --{flag})")
    g.add_argument("--aesthetic-score", type=float, default=None, help="the refiner's score (default 6.0)")
    g.add_argument("--negative-aesthetic-score", type=float, default=None, help="its negative side's (default 2.5)")
    g.add_argument("--refiner", default=None, metavar="MODEL", help="an SDXL refiner that denoises the last part of "
                   "the noise levels (ensemble of experts)")
    g.add_argument("--refiner-start", type=float, default=None,
                   help="fraction of the noise levels after which the refiner takes over (default 0.8)")


def micro_of(args) -> dict:
    """The micro-conditioning settings given on the command line (pipelines.base.Settings.micro)."""
    out = {}
    for side in ("", "negative_"):
        for name in PAIRS:
            value = getattr(args, side + name, None)
            if value is not None:
                out[side + ("crops_coords_top_left" if name == "crop" else name)] = tuple(value)
    for name in ("aesthetic_score", "negative_aesthetic_score"):
        if getattr(args, name, None) is not None:
            out[name] = getattr(args, name)
    return out


def attach_refiner(pipe, args, **options) -> None:
    from ldmkit.errors import UserError

    if args.refiner is None:
        if args.refiner_start is not None:
            raise UserError("--refiner-start needs --refiner MODEL")
        return
    pipe.load_refiner(args.refiner, 0.8 if args.refiner_start is None else args.refiner_start, **options)
