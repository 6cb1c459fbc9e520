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
    p.add_argument("--sampler", default=None, help="ddpm, ddim, pndm, euler, euler_a, heun, lms, dpmpp_2m, "
                   "dpmpp_2m_sde, dpmpp_3m_sde, dpmpp_sde, unipc, deis, lcm, flow_euler, flow_heun, or an "
                   "AUTOMATIC1111 name (\"DPM++ 2M Karras\", \"Euler a\", \"PLMS\"); default: the model's")
    p.add_argument("--sigmas", choices=("karras", "exponential", "beta"), default=None,
                   help="the noise levels of a sigma-based sampler (euler, euler_a, heun, lms, dpmpp_*, unipc, "
                   "deis): Karras et al.'s, log-uniform or Beta(0.6, 0.6) instead of the schedule's spacing")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--guidance-rescale", type=float, default=None, help="CFG rescale in [0, 1] (Lin et al. 2023)")
    p.add_argument("--seed", type=int, default=-1, help="image k of the run uses seed + k; -1 draws a random seed "
                   "(printed and stored in the PNGs)")
    p.add_argument("--num", type=int, default=1, help="images per prompt")
    p.add_argument("--from-png", default=None, metavar="FILE", help="run again with a PNG's settings (its ldmkit "
                   "chunk, or an AUTOMATIC1111 `parameters` chunk); flags given here win")
    if sizes:
        p.add_argument("--height", type=int, default=None, help="image height in pixels")
        p.add_argument("--width", type=int, default=None, help="image width in pixels")
    p.add_argument("--out", default="outputs", help="output folder (new files are numbered after the ones there), "
                   "or a .png file name")
    p.add_argument("--overwrite", action="store_true", help="allow replacing an existing --out .png file")
    p.add_argument("--grid", action="store_true", help="also write all images as one grid")
    p.add_argument("--json", action="store_true", help="print the records (settings + file) as JSON")
    p.add_argument("--batch-size", type=int, default=None, help="images per sampler run")
    p.add_argument("--max-model-batch", type=int, default=None,
                   help="cap on the denoiser batch (CFG doubles the batch): trades speed for memory")
    p.add_argument("--decode-batch", type=int, default=1, help="latents decoded at a time")
    p.add_argument("--vae-tile", type=int, default=None,
                   help="tiled decode with this latent tile size (default: tiles above 96 latents; 0 = never)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="merge a LoRA into the weights at SCALE (default 1): kohya / A1111 or diffusers / peft "
                   "files, told apart by their keys; repeat for several")
    p.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                   help="textual-inversion embedding (diffusers learned_embeds or A1111); its trigger word is "
                   "TOKEN, else the one in the file, else the file name; repeat for several")
    control = p.add_argument_group("ControlNet (sample, img2img, inpaint)")
    control.add_argument("--controlnet", action="append", default=[], metavar="PATH[:SCALE]",
                         help="a diffusers ControlNet folder or an original single file (control_*.safetensors) "
                         "at SCALE (default 1); repeat for several, each with its --control-image in order")
    control.add_argument("--control-image", action="append", default=[], metavar="IMG",
                         help="control image (edges, depth, pose, segmentation ...), one per ControlNet; resized "
                         "to the output (which takes the first one's size without --height / --width)")
    control.add_argument("--control-start", type=float, default=0.0, help="fraction of the steps where the "
                         "ControlNets start (default 0)")
    control.add_argument("--control-end", type=float, default=1.0, help="fraction of the steps where they stop "
                         "(default 1)")
    control.add_argument("--guess-mode", action="store_true", help="ControlNets on the conditional half of the CFG "
                         "batch only, shallow residuals weaker (diffusers' guess_mode)")
    control.add_argument("--control-fit", choices=("stretch", "error"), default="stretch",
                         help="a control image of another aspect ratio: stretch it, or refuse it")
    ip = p.add_argument_group("IP-Adapter (sample, img2img, inpaint)")
    ip.add_argument("--ip-adapter", default=None, metavar="FILE",
                    help="an IP-Adapter in h94's single-file layout (ip-adapter_sd15.safetensors / .bin; the basic "
                    "one or Plus): the image prompt steers the images")
    ip.add_argument("--image-prompt", action="append", default=[], metavar="IMG",
                    help="the image prompt (repeat for several: their tokens side by side)")
    ip.add_argument("--ip-scale", type=float, default=1.0, help="weight of the image prompt in [0, 2] (default 1)")
    ip.add_argument("--image-encoder", default=None, metavar="DIR",
                    help="its CLIP image encoder (a transformers CLIPVisionModelWithProjection folder; default: "
                    "image_encoder/ beside the --ip-adapter file, else the model folder's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default: float16 on CUDA)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    if sizes:
        from ldmkit.pipelines import feature_cache, sdxl_cli

        sdxl_cli.add_flags(p)
        feature_cache.add_flags(p)
    from ldmkit.pipelines import fast_decode

    fast_decode.add_flags(p)
    _single_file_flags(p)


def _single_file_flags(p) -> None:
    single = p.add_argument_group("original single-file checkpoints (.safetensors / .ckpt)")
    single.add_argument("--prediction-type", choices=("eps", "v"), default=None,
                        help="what the UNet predicts (SD 2.x 768 models: v); not stored in the weights")
    single.add_argument("--original-config", default=None, help="the checkpoint's CompVis YAML (default: NAME.yaml beside it)")
    single.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder to use with the checkpoint")
    single.add_argument("--base", default=None, metavar="DIR",
                        help="SD3 / FLUX.1 single files: a diffusers SD3 / FLUX.1 folder giving what the file lacks "
                             "(tokenizers, scheduler; text encoders and VAE the file does not hold)")


def register(sub, argv: list[str] | None = None) -> None:
    """Add this package's subcommands to the `ldm` parser."""
    p = sub.add_parser("sample", help="text-to-image (or class / unconditional) generation")
    _common(p)
    p.set_defaults(func=run)

    p = sub.add_parser("img2img", help="image-to-image: noise an image to --strength and denoise with a prompt")
    _common(p)
    p.add_argument("--image", required=True, help="input image")
    p.add_argument("--strength", type=float, default=None, help="0 = keep the input, 1 = ignore it (default 0.75)")
    p.add_argument("--posterior", choices=("mode", "sample"), default="mode", help="encode the input with the "
                   "autoencoder's posterior mode, or a sample from each image's seed (diffusers' and A1111's way)")
    p.set_defaults(func=run)

    p = sub.add_parser("inpaint", help="regenerate the white part of --mask")
    _common(p)
    p.add_argument("--image", required=True, help="input image")
    p.add_argument("--mask", required=True, help="mask image of the same size: white = repaint, black = keep")
    p.add_argument("--strength", type=float, default=None, help="how much of the masked region to change "
                   "(default 1)")
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

    from ldmkit.conditioning.control_images import KINDS

    p = sub.add_parser("control-image", help="a ControlNet's control image from an image (canny, scribble, "
                       "softedge) or a ready-made map (segmentation, depth, pose)")
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--image", required=True, help="input image (for segmentation / depth / pose: the map itself)")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--low", type=int, default=100, help="canny: lower hysteresis threshold (0-1000)")
    p.add_argument("--high", type=int, default=200, help="canny: upper hysteresis threshold (0-1000)")
    p.add_argument("--threshold", type=int, default=32, help="scribble: line threshold (0-255)")
    p.add_argument("--resolution", type=int, default=None, help="short side of the output (multiples of 8; "
                   "default: the input's size)")
    p.add_argument("--overwrite", action="store_true", help="allow replacing an existing --out file")
    p.set_defaults(func=run_control_image)


def run_control_image(args) -> int:
    from ldmkit.conditioning.control_images import make_control_image
    from ldmkit.errors import UserError
    from ldmkit.io.images import load_image, save_png

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: the control image is written as a .png file")
    if out.exists() and not args.overwrite:
        raise UserError(f"--out {out} exists; pass --overwrite to replace it")
    if args.resolution is not None and not 8 <= args.resolution <= MAX_SIDE:
        raise UserError(f"--resolution {args.resolution} is outside [8, {MAX_SIDE}]")
    image = make_control_image(load_image(args.image, mode=None), args.kind, args.low, args.high, args.threshold,
                               args.resolution)
    save_png(image, out, {"control_kind": args.kind, "source": Path(args.image).name})
    print(out)
    return 0


MAX_IMAGES = 100_000  # images one command makes (--num x prompts)
MAX_SIDE = 16384  # pixels: the largest image height or width
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed takes


def _prompts(args) -> list | None:
    from ldmkit.errors import check_text, reading

    if args.prompts_file:
        if args.prompt:
            raise ValueError("pass either --prompt or --prompts-file, not both")
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file {path} " + ("is not a file" if path.exists() else "does not exist"))
        with reading(f"prompts file {path}"):
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        prompts = [ln for ln in lines if ln]
        if not prompts:
            raise ValueError(f"prompts file {path} has no prompts (one per line)")
        if len(prompts) * args.num > MAX_IMAGES:
            raise ValueError(f"prompts file {path}: {len(prompts)} prompts x --num {args.num} = "
                             f"{len(prompts) * args.num} images; at most {MAX_IMAGES} per run")
        return prompts
    if args.prompt is not None:
        check_text("--prompt", args.prompt)
    return [args.prompt] if args.prompt is not None else None


def adapter_specs(args) -> tuple[list[tuple[str, float]], list[tuple[str, str | None]]]:
    """--lora PATH[:SCALE] and --embedding FILE[:TOKEN] as ((path, scale), ...), ((path, token), ...);
    the files must exist (checked before the model loads)."""
    from ldmkit.io.adapter_files import parse_weighted

    loras = [parse_weighted(spec) if not Path(spec).is_file() else (spec, 1.0) for spec in args.lora]
    embeddings = []
    for spec in args.embedding:
        path, sep, token = spec.rpartition(":")
        embeddings.append((spec, None) if Path(spec).is_file() or not sep or not path else (path, token or None))
    for flag, path in [("--lora", p) for p, _ in loras] + [("--embedding", p) for p, _ in embeddings]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path} " + ("is not a file" if Path(path).exists() else "does not exist"))
    return loras, embeddings


def _attach(pipe, args, loras, embeddings, controlnets) -> dict:
    """Load the LoRAs, embeddings, ControlNets, IP-Adapter and tiny decoder of the command line; the task's
    extra arguments."""
    from ldmkit.pipelines import fast_decode

    extra = fast_decode.attach(pipe, args)
    if getattr(args, "ip_adapter", None):
        adapter = pipe.load_ip_adapter(args.ip_adapter, args.ip_scale, args.image_encoder)
        print(f"ldm {args.command}: IP-Adapter {args.ip_adapter} ({adapter.kind}, {len(adapter.layers)} layers) at "
              f"scale {args.ip_scale:g}", file=sys.stderr)
        extra["image_prompt"] = args.image_prompt
    for path, scale in loras:
        layers = pipe.load_lora(path, scale)
        print(f"ldm {args.command}: LoRA {path}: {layers} layers at scale {scale:g}", file=sys.stderr)
    for path, token in embeddings:
        names = pipe.load_embedding(path, token)
        print(f"ldm {args.command}: embedding {path}: token {names[0]!r} ({len(names)} vector(s))", file=sys.stderr)
    for path, scale in controlnets:
        pipe.load_controlnet(path, scale, args.control_start, args.control_end)
    if not pipe.controlnets:
        if getattr(args, "control_image", None):
            from ldmkit.errors import UserError

            raise UserError("--control-image needs a ControlNet: add --controlnet PATH (or give a ControlNet pipeline "
                            "folder as --model)")
        return extra
    return dict(extra, control_image=args.control_image or None, guess_mode=args.guess_mode,
                control_fit=args.control_fit)


def check_ip_args(args, task: str) -> None:
    """--ip-adapter, --image-prompt, --ip-scale and --image-encoder, checked before the model loads."""
    from ldmkit.errors import UserError
    from ldmkit.io.images import load_image
    from ldmkit.pipelines.image_prompt import SCALE_RANGE

    path, images = getattr(args, "ip_adapter", None), getattr(args, "image_prompt", [])
    if path is None:
        if images:
            raise UserError("--image-prompt needs an IP-Adapter: add --ip-adapter FILE")
        if args.image_encoder is not None:
            raise UserError("--image-encoder belongs to an IP-Adapter: add --ip-adapter FILE")
        return
    if task not in ("text2img", "img2img", "inpaint"):
        raise UserError(f"ldm {args.command} takes no IP-Adapter (sample, img2img and inpaint do)")
    if not Path(path).is_file():
        raise UserError(f"--ip-adapter {path} " + ("is not a file" if Path(path).exists() else "does not exist"))
    if not images:
        raise UserError("--ip-adapter needs an image prompt: add --image-prompt IMG")
    lo, hi = SCALE_RANGE
    if not lo <= args.ip_scale <= hi:
        raise UserError(f"--ip-scale {args.ip_scale:g} is outside [{lo:g}, {hi:g}]")
    if args.image_encoder is not None and not Path(args.image_encoder).is_dir():
        raise UserError(f"--image-encoder {args.image_encoder} "
                        + ("is not a folder" if Path(args.image_encoder).exists() else "does not exist"))
    for image in images:
        load_image(image, what="--image-prompt")


def control_specs(args, task: str) -> list[tuple[str, float]]:
    """--controlnet DIR[:SCALE] as ((dir, scale), ...), checked against --control-image before any load."""
    from ldmkit.errors import UserError
    from ldmkit.io.adapter_files import parse_weighted
    from ldmkit.io.images import load_image
    from ldmkit.pipelines.control import check_settings

    specs = [(spec, 1.0) if Path(spec).exists() else parse_weighted(spec, "--controlnet")
             for spec in getattr(args, "controlnet", [])]
    images = getattr(args, "control_image", [])
    if not specs and not images:
        return []
    if task not in ("text2img", "img2img", "inpaint"):
        raise UserError(f"ldm {args.command} takes no ControlNet (sample, img2img and inpaint do)")
    for path, scale in specs:
        if not Path(path).exists():
            raise UserError(f"--controlnet {path} does not exist")
        check_settings(scale, args.control_start, args.control_end, f"--controlnet {path}")
    if specs and len(images) != len(specs):
        raise UserError(f"{len(specs)} --controlnet but {len(images)} --control-image: give one image per ControlNet")
    for image in images:
        load_image(image, mode=None, what="--control-image")
    return specs


def _check_args(args) -> None:
    """Checks that need no model, so bad input fails before a slow load."""
    from ldmkit.diffusion.samplers import resolve_sampler, with_sigmas

    import math

    from ldmkit.errors import check_text

    if args.sampler is not None:  # a name or an A1111 label (the model's schedule picks flow ones later)
        with_sigmas(resolve_sampler(args.sampler), getattr(args, "sigmas", None))
    if args.num < 1:
        raise ValueError(f"--num={args.num} must be >= 1")
    if args.num > MAX_IMAGES:
        raise ValueError(f"--num={args.num} is too many images for one run; at most {MAX_IMAGES}")
    if not SEED_RANGE[0] <= args.seed <= SEED_RANGE[1] - (args.num - 1):
        raise ValueError(f"--seed={args.seed} is outside the allowed range [{SEED_RANGE[0]}, {SEED_RANGE[1]}] "
                         "(image k uses seed + k)")
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 0):
        raise ValueError(f"--guidance={args.guidance} must be a finite number >= 0")
    if args.guidance_rescale is not None and not 0.0 <= args.guidance_rescale <= 1.0:
        raise ValueError(f"--guidance-rescale={args.guidance_rescale} is outside the allowed range [0, 1]")
    if args.negative_prompt is not None:
        check_text("--negative-prompt", args.negative_prompt)
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
        if v is not None and v > MAX_SIDE:
            raise ValueError(f"--{name}={v} is larger than the {MAX_SIDE} pixels allowed")
    out = Path(args.out)
    for parent in [out, *out.parents]:  # a file where a folder is needed fails now, not after sampling
        if parent.exists():
            if not parent.is_dir() and (parent != out or out.suffix.lower() != ".png"):
                raise ValueError(f"--out {out}: {parent} is a file, not a folder")
            break
    for name in ("max_model_batch", "decode_batch", "cache_interval"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')}={v} must be >= 1")
    for name in ("image", "mask"):  # a missing or corrupt input fails before the model loads
        if getattr(args, name, None):
            from ldmkit.io.images import load_image

            load_image(args.__dict__[name], mode="L" if name == "mask" else "RGB")
    if getattr(args, "seg_map", None):
        from ldmkit.pipelines.semantic import class_maps

        class_maps(args.seg_map)


def _available_memory(device) -> int | None:
    """Bytes free for tensors on `device` (None when unknown)."""
    import os

    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _output_size(args, task: str, pipe) -> tuple[int, int]:
    """(height, width) in pixels of the images the command will make."""
    from ldmkit.io.images import load_image

    if task == "upscale":
        w, h = load_image(args.image).size
        return h * pipe.factor, w * pipe.factor
    if task == "semantic2img":
        w, h = load_image(args.seg_map, mode=None, what="class map").size
        return h, w
    d = pipe.defaults
    if task in ("img2img", "inpaint") and (args.height is None or args.width is None):
        w, h = load_image(args.image).size
        return args.height or h, args.width or w
    return (args.height or int(d.get("height") or pipe.latent_size[0] * pipe.factor),
            args.width or int(d.get("width") or pipe.latent_size[1] * pipe.factor))


def _check_memory(args, task: str, pipe, n: int) -> None:
    """Refuse sizes whose latents and decoded images alone outgrow the memory there is, before sampling."""
    h, w = _output_size(args, task, pipe)
    if max(h, w) > MAX_SIDE:
        raise ValueError(f"the output would be {w}x{h} pixels; at most {MAX_SIDE} pixels a side are allowed")
    batch = min(args.batch_size or int(pipe.defaults.get("batch_size") or 4), n)
    f = pipe.factor
    latent = pipe.latent_channels * -(-h // f) * -(-w // f) * 4  # float32
    # per image: the sampler's latents (x, noise, model input and output, twice with CFG) and the decoded
    # image (float32 from the decoder, its clamp, the uint8 copy)
    per_image = 12 * latent + 3 * h * w * (4 + 4 + 1)
    need = batch * per_image
    free = _available_memory(pipe.device)
    if free is not None and need > free:
        raise ValueError(f"{batch} image(s) of {w}x{h} per batch need about {need / 2**30:.1f} GiB for their "
                         f"latents and decoded pixels alone, more than the {free / 2**30:.1f} GiB free on "
                         f"{pipe.device}; lower --width/--height or --batch-size")


def _out_paths(out: str, n: int, seeds: list[int], overwrite: bool, grid: bool = False,
               reserve: bool = True) -> tuple[list[Path], Path | None]:
    """Where the images go. A folder: NNNNN-SEED.png numbered after the files already there (as
    AUTOMATIC1111 does), grid-NNNNN.png -- names taken at once, nothing is ever replaced
    (`io.images.reserve_numbered`; `reserve=False` only checks). A .png name: that file
    (NAME-KKKK.png for several images), refused when it exists unless `overwrite`."""
    from ldmkit.io.images import reserve_numbered

    o = Path(out)
    if o.suffix.lower() == ".png":
        paths = [o] if n == 1 else [o.with_name(f"{o.stem}-{k:04d}.png") for k in range(n)]
        grid_path = o.with_name(o.stem + "-grid.png")
        taken = [str(p) for p in paths + [grid_path] if p.exists()]
        if taken and not overwrite:
            raise ValueError(f"--out {out}: {taken[0]} exists; pass --overwrite to replace it, or give a folder "
                             "(new files are numbered there)")
        return paths, grid_path
    return reserve_numbered(o, seeds, grid) if reserve else ([], None)


STRENGTH = {"img2img": 0.75, "inpaint": 1.0}  # --strength when neither the flag nor --from-png gives one


def _fill_settings(args, task: str) -> dict:
    """--from-png's settings into the unset flags, the default --strength, a random seed for --seed -1;
    returns the PNG's settings ({} without --from-png)."""
    png = {}
    if args.from_png:
        from ldmkit.pipelines.from_png import apply_png_settings

        png = apply_png_settings(args)
    if task in STRENGTH and args.strength is None:
        args.strength = STRENGTH[task]
    if args.seed == -1:  # a random seed, recorded in every image's settings
        import secrets

        args.seed = secrets.randbelow(2**32)
        args.random_seed = True
    return png


def _pick_sampler(args, pipe) -> dict:
    """--sampler as a sampler name (AUTOMATIC1111's labels read for this model's schedule kind) on --sigmas'
    levels; returns the model's sampler options when --sigmas only re-grids its own sampler ({} else). When
    the model's own sampler runs, a diffusers folder's note on its scheduler (what runs instead, and why) is
    printed once to stderr."""
    from ldmkit.diffusion.samplers import SAMPLERS, base_name, resolve_sampler, with_sigmas
    from ldmkit.io.diffusers_schedulers import scheduler_notes

    flow = getattr(pipe.schedule, "kind", "discrete") == "flow"
    if args.sampler is None:
        for note in scheduler_notes(getattr(pipe, "model_path", None) or args.model):
            print(f"ldm {args.command}: note: {note}", file=sys.stderr)
    else:
        args.sampler = resolve_sampler(args.sampler, flow)
    if getattr(args, "sigmas", None) is None:
        return {}
    own = pipe.defaults.get("sampler") or ("flow_euler" if flow else "dpmpp_2m")
    args.sampler = with_sigmas(args.sampler or own, args.sigmas)
    same = own in SAMPLERS and base_name(args.sampler) == base_name(own)
    return {"sampler_options": dict(pipe.defaults.get("sampler_options") or {})} if same else {}


def run(args) -> int:
    task = TASKS[args.command]
    png = _fill_settings(args, task)
    _check_args(args)
    loras, embeddings = adapter_specs(args)
    controlnets = control_specs(args, task)
    check_ip_args(args, task)
    prompts = _prompts(args)
    _out_paths(args.out, args.num * (len(prompts) if prompts else 1), [args.seed], args.overwrite,
               reserve=False)  # fail early

    from ldmkit.io.images import make_grid, save_png
    from ldmkit.pipelines import load

    importer_options = {k: v for k, v in (("prediction_type", args.prediction_type),
                                           ("original_config", args.original_config),
                                           ("tokenizer", args.tokenizer), ("base", args.base)) if v is not None}
    pipe = load(args.model, device=args.device, dtype=args.dtype, **importer_options)
    if args.from_png:  # what needs the model: A1111's "Euler" on a flow model, another model's hash
        from ldmkit.pipelines.from_png import after_load

        after_load(args, pipe, png)
    picked = _pick_sampler(args, pipe)  # --sampler / --sigmas (A1111 names read), the folder's scheduler note
    common = dict(negative_prompt=args.negative_prompt, class_label=args.class_label, seed=args.seed,
                  sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                  guidance_rescale=args.guidance_rescale, batch_size=args.batch_size,
                  max_model_batch=args.max_model_batch, decode_batch=args.decode_batch, vae_tile=args.vae_tile,
                  progress=not args.no_progress, **picked)
    if task not in ("upscale", "semantic2img"):
        from ldmkit.pipelines import feature_cache, sdxl_cli

        common.update(height=args.height, width=args.width, micro=sdxl_cli.micro_of(args), **feature_cache.settings_of(args))
        sdxl_cli.attach_refiner(pipe, args, **importer_options)
    prompt = None
    if prompts is not None:
        prompt = [p for p in prompts for _ in range(args.num)]  # --num images per prompt, in order
    n = args.num * (len(prompts) if prompts else 1)
    if args.seed + n - 1 > SEED_RANGE[1]:
        raise ValueError(f"--seed={args.seed}: the last of the {n} images would use seed {args.seed + n - 1}, "
                         f"above the largest seed {SEED_RANGE[1]}")
    _check_memory(args, task, pipe, n)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        common.update(_attach(pipe, args, loras, embeddings, controlnets))
        if task == "text2img":
            results = pipe.text2img(prompt, num=n, **common)
        elif task == "img2img":
            results = pipe.img2img(args.image, prompt, num=n, strength=args.strength, posterior=args.posterior,
                                   **common)
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

    paths, grid_path = _out_paths(args.out, len(results), [r.metadata["seed"] for r in results], args.overwrite,
                                  args.grid)
    records = []
    for r, path in zip(results, paths):
        save_png(r.image, path, r.metadata)
        records.append({**r.metadata, "file": str(path)})
    if args.grid:
        save_png(make_grid([r.image for r in results]), grid_path,
                 {"task": task, "images": json.dumps([str(p) for p in paths])})
    if getattr(args, "random_seed", False):
        print(f"ldm {args.command}: random seed {args.seed} (image k: seed + k)", file=sys.stderr)
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        for path in paths:
            print(path)
        if args.grid:
            print(grid_path)
    return 0
