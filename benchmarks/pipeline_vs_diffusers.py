"""End-to-end text-to-image, ours vs diffusers' StableDiffusionPipeline, on identical weights.

One image: CLIP text encoding (prompt + empty negative), 20 DPM++ 2M steps with classifier-free
guidance (batch 2 per step), VAE decode, PIL output. The model is a reduced SD1.5 shape built here
with random weights (nothing is downloaded): the SD1.5 UNet layout (4 levels, cross-attention on
3, 2 layers per level, 8 heads, 768-wide context) with widths (64, 128, 256, 256), the SD VAE
layout with widths (64, 128, 256, 256), and a 2-layer 768-wide CLIP text encoder with a tiny BPE
vocabulary. diffusers writes the folder (`save_pretrained`); ldmkit loads that same folder through
`ldmkit.pipelines.load` (the diffusers importer), so both run the same tensors.

Runs alternate (ours, theirs, ours, ...) so machine load hits both alike; the reported time is
the median. The images are compared too (same seed: diffusers' batch-1 noise equals ours).

    python benchmarks/pipeline_vs_diffusers.py [--repeats 3] [--size 256] [--device cpu] [--threads 1]
                                               [--full] [--out benchmarks/results]

`--full` uses the full SD1.5 UNet/VAE widths (GPU machines); the result goes to pipeline.json
(pipeline-full.json with --full).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

PROMPT = "a red cat on the street"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
MERGES = ["t h", "th e</w>", "a n", "o n</w>", "r e", "c a", "ca t</w>", "re d</w>", "s t", "o r"]


def write_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["!"] + list(LETTERS) + [c + "</w>" for c in LETTERS] + [m.replace(" ", "") for m in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(dict.fromkeys(tokens))}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>",
                         model_max_length=77)


def build_diffusers(folder: Path, full: bool):
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet_w = (320, 640, 1280, 1280) if full else (64, 128, 256, 256)
    vae_w = (128, 256, 512, 512) if full else (64, 128, 256, 256)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=unet_w,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=vae_w, layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
    tokenizer = write_tokenizer(folder / "_tok")
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=2 if not full else 12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=len(tokenizer) - 2, eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1))
    with torch.no_grad():  # random, non-trivial weights everywhere (zero-initialised layers too)
        for m in (unet, vae, text):
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", steps_offset=1, timestep_spacing="linspace", algorithm_type="dpmsolver++",
        solver_order=2)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "model")
    return folder / "model"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--full", action="store_true", help="full SD1.5 widths (for a GPU)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads for both (default 1: steadier timings on a shared machine)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()

    from diffusers import StableDiffusionPipeline

    from ldmkit import pipelines

    device = torch.device(args.device)
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_diffusers(Path(tmp), args.full)
        theirs = StableDiffusionPipeline.from_pretrained(folder, dtype=dtype, safety_checker=None,
                                                         requires_safety_checker=False).to(device)
        theirs.set_progress_bar_config(disable=True)
        ours = pipelines.load(folder, device=device, dtype=dtype)
        assert ours.settings().sampler == "dpmpp_2m", ours.defaults

        def run_ours(seed):
            return ours.text2img(PROMPT, seed=seed, steps=args.steps, guidance=args.guidance, sampler="dpmpp_2m",
                                 height=args.size, width=args.size, progress=False)[0].image

        def run_theirs(seed):
            g = torch.Generator("cpu").manual_seed(seed)
            return theirs(PROMPT, num_inference_steps=args.steps, guidance_scale=args.guidance, generator=g,
                          height=args.size, width=args.size, output_type="pil").images[0]

        def timed(fn, seed):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            img = fn(seed)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0, img

        timed(run_ours, 0), timed(run_theirs, 0)  # warm-up (allocator, kernels, caches)
        t_ours, t_theirs = [], []
        for r in range(args.repeats):
            dt, img_ours = timed(run_ours, 1)
            t_ours.append(dt)
            dt, img_theirs = timed(run_theirs, 1)
            t_theirs.append(dt)
            print(f"repeat {r}: ours {t_ours[-1]:.2f}s  diffusers {t_theirs[-1]:.2f}s", flush=True)
        a = np.asarray(img_ours, dtype=np.int16)
        b = np.asarray(img_theirs, dtype=np.int16)
        diff = np.abs(a - b)

    mo, mt = statistics.median(t_ours), statistics.median(t_theirs)
    result = {
        "benchmark": "pipeline_vs_diffusers",
        "case": f"{'full' if args.full else 'reduced'}-sd15 text2img {args.size}x{args.size}, "
                f"{args.steps} DPM++ 2M steps, CFG {args.guidance}, decode",
        "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(), "repeats": args.repeats,
        "ours_s": round(mo, 4), "diffusers_s": round(mt, 4), "ratio_ours_over_diffusers": round(mo / mt, 4),
        "ours_runs_s": [round(x, 4) for x in t_ours], "diffusers_runs_s": [round(x, 4) for x in t_theirs],
        "image_max_abs_diff_uint8": int(diff.max()), "image_mean_abs_diff_uint8": round(float(diff.mean()), 4),
        "torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
        "python": platform.python_version(), "machine": platform.machine(),
    }
    out = Path(args.out)
    if out.suffix != ".json":
        out = out / ("pipeline-full.json" if args.full else "pipeline.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"ratio ours / diffusers = {mo / mt:.3f}  (goal <= 0.85)")


if __name__ == "__main__":
    main()
