"""`ldm sample --from-png FILE`: run again with the settings a PNG carries.

The settings come from ldmkit's own `ldmkit` chunk, else from an AUTOMATIC1111 `parameters` chunk
read with A1111's infotext rules (`io.infotext`). Flags given on the command line win over the
file's values; --seed -1 (the default) takes the file's seed.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ldmkit.errors import UserError
from ldmkit.io.infotext import png_settings
from ldmkit.io.images import read_png_text

# (metadata key, argparse destination): taken from the file unless the flag was given
_FIELDS = (("prompt", "prompt"), ("negative_prompt", "negative_prompt"), ("class", "class_label"),
           ("steps", "steps"), ("sampler", "sampler"), ("guidance", "guidance"),
           ("guidance_rescale", "guidance_rescale"), ("height", "height"), ("width", "width"),
           ("strength", "strength"), ("cache_interval", "cache_interval"), ("cache_branch", "cache_branch"))


def apply_png_settings(args) -> dict:
    """Fill the unset flags of `args` from the PNG `args.from_png`; returns the file's settings."""
    path = Path(args.from_png)
    settings, source = png_settings(read_png_text(path, what="--from-png"))
    if not source:
        raise UserError(f"--from-png {path}: the PNG has no ldmkit or A1111 `parameters` chunk to read settings from")
    if settings.get("a1111_sampler") and args.sampler is None:
        label, schedule = settings["a1111_sampler"]
        from ldmkit.diffusion.samplers import sampler_names

        raise UserError(f"--from-png {path}: sampler {label!r}" + (f" ({schedule})" if schedule else "")
                        + f" has no ldmkit equivalent; pass --sampler ({', '.join(sampler_names())})")
    for key, dest in _FIELDS:
        if key in settings and settings[key] not in (None, "") and getattr(args, dest, None) is None \
                and hasattr(args, dest):
            if dest == "prompt" and getattr(args, "prompts_file", None):
                continue
            setattr(args, dest, settings[key])
    if args.seed == -1 and isinstance(settings.get("seed"), int):
        args.seed = settings["seed"]
    args.png_source = source
    return settings


def after_load(args, pipe, settings: dict) -> None:
    """What needs the loaded model: A1111's "Euler" / "Heun" on a flow model are ldmkit's flow samplers,
    and a warning when the file names another model than the one given."""
    flow = getattr(pipe.schedule, "kind", "discrete") == "flow"
    if flow and getattr(args, "png_source", "") == "parameters" and args.sampler in ("euler", "heun") \
            and settings.get("sampler") == args.sampler:
        args.sampler = "flow_" + args.sampler
    want = settings.get("model_hash")
    if want and pipe.model_hash and want != pipe.model_hash:
        print(f"ldm {args.command}: warning: {args.from_png} was made with model {settings.get('model', '?')} "
              f"(hash {want}); --model {args.model} has hash {pipe.model_hash}", file=sys.stderr)
