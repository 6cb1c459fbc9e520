"""Tiny-decoder options of the sampling commands: `--fast-decode`, `--tiny-decoder PATH`, `--live-preview`.

    ldm sample --model demo-shapes --fast-decode ...            the model folder's own tiny_decoder/
    ldm sample --model SD --tiny-decoder taesd/ --fast-decode   a TAESD (diffusers AutoencoderTiny or original file)
    ldm sample ... --live-preview                               OUT/preview.png shows each step's x0 estimate

`--tiny-decoder` alone loads it for previews; the final images keep the full decoder unless `--fast-decode`
asks otherwise. Previews go through the tiny decoder when there is one, else the full decoder.
This module imports nothing heavy: the command line reads its flags before torch loads.
"""
from __future__ import annotations

import sys
from pathlib import Path


def add_flags(p) -> None:
    g = p.add_argument_group("tiny decoder (TAESD-style: fast decoding and previews)")
    g.add_argument("--fast-decode", action="store_true", help="decode the final images with the tiny decoder "
                   "(the model folder's tiny_decoder/, or --tiny-decoder): much faster, a little less detail")
    g.add_argument("--tiny-decoder", default=None, metavar="PATH", help="a tiny decoder: `ldm train-tiny-decoder`'s "
                   "RUN/tiny_decoder, a diffusers AutoencoderTiny folder or a TAESD decoder file")
    g.add_argument("--live-preview", action="store_true", help="rewrite OUT/preview.png after every sampler step "
                   "with the current x0 estimate of the first image")


def attach(pipe, args) -> dict:
    """Load --tiny-decoder, set the live preview; the pipeline settings of the flags."""
    if getattr(args, "tiny_decoder", None):
        pipe.load_tiny_decoder(args.tiny_decoder)
    if getattr(args, "live_preview", False):
        out = Path(args.out)
        folder = out.parent if out.suffix.lower() == ".png" else out
        pipe.step_hook = preview_writer(pipe, folder / "preview.png")
        print(f"ldm {args.command}: live preview in {folder / 'preview.png'}", file=sys.stderr)
    return {"fast_decode": bool(getattr(args, "fast_decode", False))}


def preview_writer(pipe, path: Path):
    """A step hook that decodes the first image's x0 estimate (tiny decoder when there is one) into `path`,
    written atomically so a viewer never reads half a file."""
    decode = preview_decoder(pipe)
    path.parent.mkdir(parents=True, exist_ok=True)

    def hook(step: int, steps: int, x0) -> None:
        tmp = path.with_suffix(".tmp.png")
        decode(x0[:1]).save(tmp)
        tmp.replace(path)

    return hook


def preview_decoder(pipe):
    """latent [1, ...] -> PIL image: the tiny decoder when the pipeline has one, else the full decoder."""
    from ldmkit.io.images import tensor_to_pil
    from ldmkit.pipelines.base import Settings

    plain = Settings("preview", 1, 1.0, fast_decode=pipe.tiny_decoder is not None)
    return lambda latent: tensor_to_pil(pipe.decode(latent, plain)[0])
