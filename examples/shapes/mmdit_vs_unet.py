"""The demo's UNet against MM-DiTs (SD3's denoiser) of two sizes at equal training FLOPs, on the shapes set.

    python examples/shapes/mmdit_vs_unet.py --out outputs/mmdit-vs-unet [--budget-scale 1.0] [--device cuda]

1. The demo's autoencoder and latent caches (examples/shapes/recipe.py: 700 autoencoder steps, 8000
   captioned scenes, the forward-phrased copy).
2. Training FLOPs per step of each model, measured with `torch.utils.flop_counter` on one forward +
   backward of a global batch (the denoiser, with the frozen MiniLM text encoder's states as input).
3. The budget is the demo's: its UNet (with its context adapter and position features, v-prediction,
   cosine schedule) for recipe.STAGES steps (two runs: forward-phrased captions, then the captions as
   drawn). Each MM-DiT (`mmdit-tiny`: 4 blocks of 4 x 32 heads; `mmdit-small`: 6 blocks of 6 x 32) trains
   for the same FLOPs -- steps = budget / its FLOPs per step, split between the two runs as the demo's are
   -- with rectified flow (`--objective flow`), everything else as the recipe (batch, lr, EMA, condition
   dropout, MiniLM layer 2).
4. Prompt adherence (the shapes analyser) of each model on 200 training-style and 200 held-out prompts at
   guidance 3, 20 steps of the model's default sampler (DPM++ 2M for the UNet, flow Euler for the MM-DiTs).

Writes results.json (FLOPs, steps, wall time, adherence) and adherence.png (adherence against parameters
at equal FLOPs). On a GPU (`--device cuda --budget-scale 10`) the same study runs at 10x the compute.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import recipe  # noqa: E402

MMDIT = {"mmdit-tiny": dict(preset="mmdit-tiny"), "mmdit-small": dict(preset="mmdit-small")}


def step_flops(config, data, autoencoder) -> tuple[float, int]:
    """(FLOPs of one training step's forward + backward over a global batch, trained parameters)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ldmkit.training.methods import ldm_parts as parts

    conditioner = parts.build_conditioner(config, data, {})
    model = parts.Stage2(parts.build_denoiser(config, data, conditioner, None), conditioner)
    b = config.batch_size
    x = torch.randn(b, *data.latent_shape)
    t = torch.rand(b) * 999
    captions = data.conditions("text", list(range(b)))
    with torch.no_grad():
        model.conditioner.encode(captions)  # the frozen encoder's rows are cached, as in training
    with FlopCounterMode(display=False) as counter:
        model(x, t, captions).float().pow(2).mean().backward()
    return float(counter.get_total_flops()), sum(p.numel() for p in model.parameters() if p.requires_grad)


def adherence(pipe, sets: dict) -> dict:
    """Match rate per prompt set at the recipe's guidance and steps, with the model's default sampler."""
    from ldmkit.metrics.shapes_analysis import adherence_report

    out = {}
    for name, prompts in sets.items():
        res = pipe.text2img(prompt=prompts, num=len(prompts), seed=1000 + recipe.SEED, guidance=recipe.EVAL["headline"],
                            steps=recipe.EVAL["steps"], batch_size=len(prompts), progress=False)
        out[name] = adherence_report([r.image for r in res], prompts)["match_rate"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/mmdit-vs-unet")
    p.add_argument("--budget-scale", type=float, default=1.0, help="the demo's training FLOPs times this")
    p.add_argument("--samples", type=int, default=200, help="prompts per set")
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", default="unet,mmdit-tiny,mmdit-small")
    args = p.parse_args(argv)
    import torch

    from demo import eval_prompts, run_stage

    from ldmkit import pipelines
    from ldmkit.data.latents import encode_dataset, open_latents, recaption
    from ldmkit.data.shapes import ShapesDataset, forward_caption
    from ldmkit.io.format import load_component
    from ldmkit.training import AETrainConfig, AutoencoderMethod, LDMConfig, train

    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ae_dir = out / "autoencoder" / "autoencoder"
    if not ae_dir.is_dir():
        train(AutoencoderMethod(AETrainConfig(out=str(out / "autoencoder"), **{**recipe.AUTOENCODER,
                                                                                 "device": args.device})))
    ae = load_component(ae_dir, device="cpu")
    if not (out / "latents_forward" / "index.json").is_file():
        cache = encode_dataset(ae, ShapesDataset("train", size=32, length=recipe.CACHE["length"],
                                                 seed=recipe.CACHE["seed"]), out / "latents", batch_size=256,
                               progress=False)
        recaption(cache, out / "latents_forward", forward_caption, note="shapes.forward_caption")
    data = open_latents(out / "latents")
    print(f"[{time.time() - t0:5.0f}s] autoencoder and caches ready", flush=True)

    base = LDMConfig(autoencoder=str(ae_dir), **{**recipe.LDM, "device": args.device})
    configs = {"unet": base}
    for name, change in MMDIT.items():
        configs[name] = dataclasses.replace(base, denoiser="mmdit", objective="flow", schedule="scaled_linear",
                                            context_adapter_layers=0, position_features=False,
                                            sample_sampler="flow_euler", **change)
    flops = {name: step_flops(dataclasses.replace(c, latents=str(out / "latents")), data, ae)
             for name, c in configs.items()}
    budget = flops["unet"][0] * sum(recipe.STAGES.values()) * args.budget_scale
    sets = {k: eval_prompts(k, args.samples, recipe.SEED) for k in ("train", "heldout")}
    results = {}
    for name in args.models.split(","):
        c = configs[name]
        total = max(2, round(budget / flops[name][0]))
        split = {k: max(1, round(total * v / sum(recipe.STAGES.values()))) for k, v in recipe.STAGES.items()}
        t1 = time.time()
        model = out / name / "full" / "model"
        if not (model / "model_index.json").is_file():  # a model already trained by this study is kept
            first = dataclasses.replace(c, latents=str(out / "latents_forward"), out=str(out / name / "forward"),
                                        steps=split["forward"], checkpoint_every=split["forward"],
                                        sample_every=split["forward"])
            second = dataclasses.replace(c, latents=str(out / "latents"), out=str(out / name / "full"),
                                         steps=split["full"], checkpoint_every=split["full"],
                                         sample_every=split["full"], init_from=str(run_stage(first, 0.0, 1, out)))
            model = run_stage(second, recipe.WORD_DROP, 1, out)
        train_s = time.time() - t1
        pipe = pipelines.load(model, device="cpu", dtype=torch.float32)
        results[name] = {"flops_per_step": flops[name][0], "parameters": flops[name][1], "steps": split,
                         "training_flops": flops[name][0] * sum(split.values()), "train_seconds": round(train_s, 1),
                         "sampler": pipe.settings().sampler, "adherence": adherence(pipe, sets)}
        print(f"[{time.time() - t0:5.0f}s] {name}: {flops[name][1] / 1e6:.2f} M parameters, "
              f"{flops[name][0] / 1e9:.2f} GFLOP / step x {sum(split.values())} steps, {train_s:.0f} s; adherence "
              + ", ".join(f"{k} {100 * v:.1f}%" for k, v in results[name]["adherence"].items()), flush=True)
        (out / "results.json").write_text(json.dumps({"budget_flops": budget, "results": results,
                                                      "samples_per_set": args.samples,
                                                      "guidance": recipe.EVAL["headline"]}, indent=2) + "\n")
    plot(results, out / "adherence.png")
    print(f"wrote {out / 'results.json'} and {out / 'adherence.png'}")
    return 0


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, r in results.items():
        for k, marker in (("train", "o"), ("heldout", "s")):
            ax.scatter(r["parameters"] / 1e6, 100 * r["adherence"][k], marker=marker,
                       color="tab:blue" if name == "unet" else "tab:orange")
            ax.annotate(f"{name} ({k})", (r["parameters"] / 1e6, 100 * r["adherence"][k]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("trained parameters (M)")
    ax.set_ylabel("prompts drawn right (%)")
    ax.set_title("adherence at equal training FLOPs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
