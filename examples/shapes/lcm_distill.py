"""Few-step generation for the bundled demo-shapes model: latent consistency distillation (`ldm distill`).

    python examples/shapes/lcm_distill.py --out outputs/lcm [--steps 1500]

1. encodes 4,000 training scenes (the demo's data generator, a new seed) with the model's own autoencoder;
2. distils the bundled `demo-shapes` (the teacher: DPM++ 2M, 20-25 steps, guidance 3) into an LCM student
   -- the whole extended UNet with a guidance input -- on the teacher's guidance range 2-5
   (`ldm distill --method lcm`; settings in DISTILL below);
3. scores prompt adherence (the shapes analyser, `metrics.shapes_analysis`) of the teacher at 25 DPM++ 2M
   steps and of the student at 1 / 2 / 4 / 8 LCM steps, on 200 training and 200 held-out prompts
   (the demo's prompt sets), guidance 3, seeds 5000 + i; writes OUT/report.json and OUT/steps.png
   (a row per setting).

OUT/ then holds latents/ (the cache), run/ (the distillation run: loss.png, samples/, checkpoints/,
model/ -- the student, `ldm sample --model OUT/run/model --steps 4`), report.json and steps.png.
The learning rate and the guidance range are this example's recipe, not the method's defaults.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

DISTILL = dict(init_from="demo-shapes", batch_size=32, lr=1e-4, lr_schedule="cosine", warmup_steps=50,
               ema_decay=0.95, distill_guidance=(2.0, 5.0), guidance_input=64, grad_clip=1.0, sample_steps=4,
               guidance=3.0, checkpoint_every=500, sample_every=500, seed=0, device="cpu",
               sample_prompts=("a red circle", "a blue square to the left of a yellow circle",
                               "a green circle above a red triangle", "a yellow triangle below a blue circle"))
CACHE = dict(length=4000, seed=11)
EVAL = dict(n=200, guidance=3.0, seed=5000, teacher_steps=25, student_steps=(1, 2, 4, 8))


def distil(out: Path, steps: int, length: int) -> Path:
    from ldmkit.data.latents import encode_dataset
    from ldmkit.data.shapes import ShapesDataset
    from ldmkit.pipelines import load
    from ldmkit.training import train
    from ldmkit.training.methods import LCM, LCMConfig

    if (out / "run" / "model" / "model_index.json").is_file():
        return out / "run" / "model"
    teacher = load("demo-shapes")
    cache = out / "latents"
    if not (cache / "index.json").is_file():
        encode_dataset(teacher.autoencoder, ShapesDataset("train", size=32, length=length, seed=CACHE["seed"]),
                       cache, batch_size=256, progress=False,
                       source={"dataset": "shapes", "split": "train", "seed": CACHE["seed"]})
    config = LCMConfig(**DISTILL, latents=str(cache), out=str(out / "run"), steps=steps)
    resume = out / "run" / "checkpoints"
    checkpoint = max(resume.glob("step-*.pt"), key=lambda p: int(p.stem[5:]), default=None) if resume.is_dir() else None
    train(LCM(config), resume=checkpoint)
    return out / "run" / "model"


def score(pipe, prompts, sampler: str, steps: int, cfg: dict) -> tuple[dict, list, float]:
    """Adherence of one setting over `prompts` (batches of 50), its images and seconds per image."""
    from ldmkit.metrics.shapes_analysis import adherence_report

    images, t0 = [], time.perf_counter()
    for lo in range(0, len(prompts), 50):
        part = prompts[lo:lo + 50]
        images += [r.image for r in pipe.text2img(prompt=part, num=len(part), seed=cfg["seed"] + lo, steps=steps,
                                                  sampler=sampler, guidance=cfg["guidance"], batch_size=len(part),
                                                  progress=False)]
    seconds = (time.perf_counter() - t0) / len(prompts)
    report = adherence_report(images, prompts)
    report.pop("samples")
    return report, images, seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="examples/shapes/lcm_distill.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/lcm")
    p.add_argument("--steps", type=int, default=1500, help="distillation steps")
    p.add_argument("--n", type=int, default=EVAL["n"], help="prompts per set")
    p.add_argument("--small", action="store_true", help="a few steps of everything (a smoke test)")
    args = p.parse_args(argv)
    import torch

    from demo import eval_prompts

    from ldmkit.io.images import make_grid
    from ldmkit.pipelines import load

    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = distil(out, 4 if args.small else args.steps, 64 if args.small else CACHE["length"])
    train_seconds = time.time() - t0
    teacher, student = load("demo-shapes"), load(model)
    sets = {"train": eval_prompts("train", args.n, 7), "heldout": eval_prompts("heldout", args.n, 7)}
    settings = [("teacher", teacher, "dpmpp_2m", EVAL["teacher_steps"])] + [
        ("student", student, "lcm", k) for k in EVAL["student_steps"]]
    rows, grid = [], []
    for who, pipe, sampler, steps in settings:
        row = {"model": who, "sampler": sampler, "steps": steps}
        for name, prompts in sets.items():
            report, images, seconds = score(pipe, prompts, sampler, steps, EVAL)
            m = report["match_rate"]
            row[name] = {"match_rate": m, "stderr": math.sqrt(m * (1 - m) / len(prompts)), **report}
            row[f"{name}_seconds_per_image"] = seconds
            if name == "heldout":
                grid += images[:8]
        rows.append(row)
        print(f"{who:8s} {sampler:9s} {steps:2d} steps: train {100 * row['train']['match_rate']:.1f} %, held-out "
              f"{100 * row['heldout']['match_rate']:.1f} %, {1e3 * row['heldout_seconds_per_image']:.1f} ms/image",
              flush=True)
    make_grid(grid, nrow=8).save(out / "steps.png")
    report = {"teacher": "demo-shapes", "distill": {**DISTILL, "steps": args.steps, "cache": CACHE},
              "distill_seconds": round(train_seconds, 1), "eval": {**EVAL, "prompts": "demo.eval_prompts(set, n, 7)"},
              "threads": torch.get_num_threads(), "rows": rows}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / 'report.json'} and {out / 'steps.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
