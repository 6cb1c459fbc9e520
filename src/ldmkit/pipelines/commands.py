"""`ldm sample`, `ldm img2img`, `ldm inpaint`, `ldm upscale`, `ldm semantic` (registered by ldmkit.cli).

Every command loads the model once, runs the task for every prompt (`--prompt` or
one per line of `--prompts-file`) `--num` times, and writes PNGs whose text chunks hold
the settings (`--json` prints the same records). Image k of a run (counting across
prompts) uses seed + k. Unset settings come from the model folder's model_index.json
"defaults". See docs/generation.md.
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

TASKS = {"sample": "text2img", "img2img": "img2img", "inpaint": "inpaint", "upscale": "upscale",
         "semantic": "semantic2img"}


def _common(p, sizes: bool = True) -> None:
    p.add_argument("--model", required=True, help="model folder (ours or diffusers'), single-file checkpoint, "
                   "or the name of a bundled model")
    p.add_argument("--prompt", default=None, help="text prompt (text-conditioned models)")
    p.add_argument("--negative-prompt", default=None, help="what to steer away from (replaces the empty prompt in CFG)")
    p.add_argument("--class", dest="class_label", default=None, metavar="NAME|ID",
                   help="class name or index (class-conditional models)")
    p.add_argument("--prompts-file", default=None, help="one prompt per line (blank lines skipped); --num images each")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    p.add_argument("--sampler", default=None, help="ddpm, ddim, euler, euler_a, heun, dpmpp_2m, dpmpp_2m_karras, "
                   "flow_euler, flow_heun (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--guidance-rescale", type=float, default=None, help="CFG rescale in [0, 1] (Lin et al. 2023)")
    p.add_argument("--seed", type=int, default=0, help="image k of the run uses seed + k")
    p.add_argument("--num", type=int, default=1, help="images per prompt")
    if sizes:
        p.add_argument("--height", type=int, default=None, help="image height in pixels")
        p.add_argument("--width", type=int, default=None, help="image width in pixels")
    p.add_argument("--out", default="outputs", help="output folder, or a .png file name")
    p.add_argument("--grid", action="store_true", help="also write all images as one grid")
    p.add_argument("--json", action="store_true", help="print the records (settings + file) as JSON")
    p.add_argument("--batch-size", type=int, default=None, help="images per sampler run")
    p.add_argument("--max-model-batch", type=int, default=None,
                   help="cap on the denoiser batch (CFG doubles the batch): trades speed for memory")
    p.add_argument("--decode-batch", type=int, default=1, help="latents decoded at a time")
    p.add_argument("--vae-tile", type=int, default=None,
                   help="tiled decode with this latent tile size (default: tiles above 96 latents; 0 = never)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default: float16 on CUDA)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    single = p.add_argument_group("original single-file checkpoints (.safetensors / .ckpt)")
    single.add_argument("--prediction-type", choices=("eps", "v"), default=None,
                        help="what the UNet predicts (SD 2.x 768 models: v); not stored in the weights")
    single.add_argument("--original-config", default=None, help="the checkpoint's CompVis YAML (default: NAME.yaml beside it)")
    single.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder to use with the checkpoint")


def register(sub) -> None:
    """Add this package's subcommands to the `ldm` parser."""
    p = sub.add_parser("sample", help="text-to-image (or class / unconditional) generation")
    _common(p)
    p.set_defaults(func=run)

    p = sub.add_parser("img2img", help="image-to-image: noise an image to --strength and denoise with a prompt")
    _common(p)
    p.add_argument("--image", required=True, help="input image")
    p.add_argument("--strength", type=float, default=0.75, help="0 = keep the input, 1 = ignore it")
    p.set_defaults(func=run)

    p = sub.add_parser("inpaint", help="regenerate the white part of --mask")
    _common(p)
    p.add_argument("--image", required=True, help="input image")
    p.add_argument("--mask", required=True, help="mask image of the same size: white = repaint, black = keep")
    p.add_argument("--strength", type=float, default=1.0, help="how much of the masked region to change")
    p.add_argument("--blend", dest="blend", action="store_true", default=None,
                   help="re-impose the known latents every step (default for models without a concat input)")
    p.add_argument("--no-blend", dest="blend", action="store_false")
    p.set_defaults(func=run)

    p = sub.add_parser("upscale", help="super-resolution with a concat-conditioned model (output = input x f)")
    _common(p, sizes=False)
    p.add_argument("--image", required=True, help="low-resolution input image")
    p.add_argument("--noise-level", type=int, default=None, help="noise augmentation level (x4-upscaler-style models)")
    p.set_defaults(func=run)

    p = sub.add_parser("semantic", help="semantic synthesis: an image from a class map (models trained with "
                       "`ldm train --spatial semantic`; output size = map size)")
    _common(p, sizes=False)
    p.add_argument("--map", dest="seg_map", required=True, metavar="MAP.png",
                   help="class map: a grey or palette PNG whose pixel values are the class ids")
    p.set_defaults(func=run)


def _prompts(args) -> list | None:
    if args.prompts_file:
        if args.prompt:
            raise ValueError("pass either --prompt or --prompts-file, not both")
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file {path} does not exist")
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        prompts = [ln for ln in lines if ln]
        if not prompts:
            raise ValueError(f"prompts file {path} has no prompts (one per line)")
        return prompts
    return [args.prompt] if args.prompt is not None else None


def _check_args(args) -> None:
    """Checks that need no model, so bad input fails before a slow load."""
    from ldmkit.diffusion.samplers import sampler_names

    if args.sampler is not None and args.sampler not in sampler_names():
        raise ValueError(f"unknown sampler {args.sampler!r}; valid samplers: {', '.join(sampler_names())}")
    if args.num < 1:
        raise ValueError(f"--num={args.num} must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size={args.batch_size} must be >= 1")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps={args.steps} must be >= 1")
    strength = getattr(args, "strength", None)
    if strength is not None and not 0.0 <= strength <= 1.0:
        raise ValueError(f"--strength={strength} is outside the allowed range [0, 1]")
    for name in ("height", "width"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise ValueError(f"--{name}={v} must be a positive number of pixels")
    for name in ("image", "mask"):  # a missing or corrupt input fails before the model loads
        if getattr(args, name, None):
            from ldmkit.io.images import load_image

            load_image(args.__dict__[name], mode="L" if name == "mask" else "RGB")
    if getattr(args, "seg_map", None):
        from ldmkit.pipelines.semantic import class_maps

        class_maps(args.seg_map)


def _out_paths(out: str, n: int, metas: list[dict]) -> tuple[list[Path], Path]:
    o = Path(out)
    if o.suffix.lower() == ".png":
        if n == 1:
            return [o], o.with_name(o.stem + "-grid.png")
        return [o.with_name(f"{o.stem}-{k:04d}.png") for k in range(n)], o.with_name(o.stem + "-grid.png")
    return [o / f"{k:05d}-{m['seed']}.png" for k, m in enumerate(metas)], o / "grid.png"


def run(args) -> int:
    task = TASKS[args.command]
    _check_args(args)
    prompts = _prompts(args)

    from ldmkit.io.images import make_grid, save_png
    from ldmkit.pipelines.base import load

    importer_options = {k: v for k, v in (("prediction_type", args.prediction_type),
                                           ("original_config", args.original_config),
                                           ("tokenizer", args.tokenizer)) if v is not None}
    pipe = load(args.model, device=args.device, dtype=args.dtype, **importer_options)
    common = dict(negative_prompt=args.negative_prompt, class_label=args.class_label, seed=args.seed,
                  sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                  guidance_rescale=args.guidance_rescale, batch_size=args.batch_size,
                  max_model_batch=args.max_model_batch, decode_batch=args.decode_batch, vae_tile=args.vae_tile,
                  progress=not args.no_progress)
    if task not in ("upscale", "semantic2img"):
        common.update(height=args.height, width=args.width)
    prompt = None
    if prompts is not None:
        prompt = [p for p in prompts for _ in range(args.num)]  # --num images per prompt, in order
    n = args.num * (len(prompts) if prompts else 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        if task == "text2img":
            results = pipe.text2img(prompt, num=n, **common)
        elif task == "img2img":
            results = pipe.img2img(args.image, prompt, num=n, strength=args.strength, **common)
        elif task == "inpaint":
            results = pipe.inpaint(args.image, args.mask, prompt, num=n, strength=args.strength,
                                   blend=args.blend, **common)
        elif task == "semantic2img":
            results = pipe.semantic2img(args.seg_map, prompt, num=n, **common)
        else:
            results = pipe.upscale(args.image, prompt, num=n, noise_level=args.noise_level, **common)
    shown = (UserWarning, RuntimeWarning)  # truncated prompts, float16 decode retried in float32
    for message in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, shown)
                                 and not issubclass(w.category, (DeprecationWarning, FutureWarning))):
        print(f"ldm {args.command}: warning: {message}", file=sys.stderr)

    paths, grid_path = _out_paths(args.out, len(results), [r.metadata for r in results])
    records = []
    for r, path in zip(results, paths):
        save_png(r.image, path, r.metadata)
        records.append({**r.metadata, "file": str(path)})
    if args.grid:
        save_png(make_grid([r.image for r in results]), grid_path,
                 {"task": task, "images": json.dumps([str(p) for p in paths])})
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        for path in paths:
            print(path)
        if args.grid:
            print(grid_path)
    return 0
