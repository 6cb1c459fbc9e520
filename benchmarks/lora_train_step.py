"""LoRA training step: ldmkit's (peft layers injected into our UNet, as `ldm train --lora-rank` does) vs
diffusers' LoRA training loop (peft on UNet2DConditionModel through `unet.add_adapter`, the recipe of
diffusers' train_text_to_image_lora.py), and vs full fine-tuning of the same UNet.

Both UNets hold identical weights (diffusers' state dict loads into ours unchanged), get identical
batches and the same loop around them (q_sample, model, eps MSE, backward, grad clipping over the
trained parameters, fused AdamW over them, zero_grad(set_to_none=True)). LoRA: rank 8, alpha 8, on
to_q / to_k / to_v / to_out.0 of every attention layer (diffusers' default target set).

Case (CPU, fp32): reduced-sd15 -- SD1.5's layout with widths (64, 128, 256, 256), 32x32x4 latents,
batch 4, 77x768 context (the shapes of train_step_vs_diffusers.py).
Timing alternates the variants step by step (machine load hits all alike) and reports the median;
peak memory is measured per variant in a fresh subprocess (peak RSS during two steps minus RSS
before the first; on CUDA torch.cuda.max_memory_allocated). Also the LoRA file sizes as each side
writes them (ours: write_lora, diffusers format; diffusers: save_lora_weights).

    python benchmarks/lora_train_step.py [--repeats 8] [--out benchmarks/results/lora_train_step.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_results  # noqa: E402
from _memory import peak_rss_mb, reset_peak, rss_mb  # noqa: E402
from unet_vs_diffusers import twin_unet  # noqa: E402

from ldmkit.denoisers.unet import PRESETS, UNetConfig  # noqa: E402

CASE = dict(preset="sd15", overrides=dict(block_out_channels=(64, 128, 256, 256)), size=32, batch=4, ctx=(77, 768))
RANK = 8
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
VARIANTS = ("ours-lora", "diffusers-lora", "ours-full", "diffusers-full")


def build(variant: str, device: str):
    which, mode = variant.split("-")
    cfg = UNetConfig(**{**PRESETS[CASE["preset"]].to_dict(), **CASE["overrides"]})
    model = twin_unet(cfg, CASE["size"], which).to(device).train()
    if mode == "lora":
        torch.manual_seed(1)
        if which == "diffusers":  # train_text_to_image_lora.py: freeze the UNet, add_adapter
            from peft import LoraConfig

            model.requires_grad_(False)
            model.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                         target_modules=TARGETS))
        else:  # ldm train --lora-rank 8 --lora-targets attn
            from ldmkit.adapters.lora import TARGETS as GROUPS, attach

            attach(model, RANK, float(RANK), GROUPS["attn"])
    return model


def make_step(model, variant: str, device: str):
    from ldmkit.diffusion.forward import q_sample
    from ldmkit.diffusion.objectives import training_loss
    from ldmkit.diffusion.schedules import DiscreteSchedule

    g = torch.Generator().manual_seed(0)
    b, s = CASE["batch"], CASE["size"]
    z0, noise = torch.randn(b, 4, s, s, generator=g).to(device), torch.randn(b, 4, s, s, generator=g).to(device)
    t = torch.randint(0, 1000, (b,), generator=g)
    ctx = torch.randn(b, *CASE["ctx"], generator=g).to(device)
    schedule = DiscreteSchedule("scaled_linear")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device in ("cpu", "cuda") or None)
    diffusers_side = variant.startswith("diffusers")

    def step():
        x_t = q_sample(schedule, z0, noise, t)
        tt = t.to(device, torch.float32)
        if diffusers_side:
            out = model(x_t, tt, encoder_hidden_states=ctx, return_dict=False)[0]
        else:
            out = model(x_t, tt, context=ctx)
        loss = training_loss(schedule, "eps", out, z0, noise, t).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    return step, sum(p.numel() for p in params)


def timing_child(repeats: int, device: str) -> dict:
    steps, trained = {}, {}
    for v in VARIANTS:
        steps[v], trained[v] = make_step(build(v, device), v, device)
    for v in VARIANTS:  # warm-up: allocator, oneDNN primitive caches
        steps[v]()
        steps[v]()
    times = {v: [] for v in VARIANTS}
    for _ in range(repeats):
        for v in VARIANTS:
            t0 = time.perf_counter()
            steps[v]()
            times[v].append(time.perf_counter() - t0)
    return {v: {"step_s_median": statistics.median(ts), "step_s_all": ts, "trained_parameters": trained[v]}
            for v, ts in times.items()}


def memory_child(variant: str, device: str) -> dict:
    model = build(variant, device)
    step, _ = make_step(model, variant, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_mb()
        reset_peak()
    for _ in range(2):
        step()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else peak_rss_mb() - base
    return {"peak_mb": peak}


def file_sizes() -> dict:
    """Bytes of the rank-8 attention LoRA of this UNet as ldmkit and diffusers write it."""
    from peft.utils import get_peft_model_state_dict

    from ldmkit.adapters.lora import LoRA, extract
    from ldmkit.io.adapter_files import write_lora

    with tempfile.TemporaryDirectory() as tmp:
        ours = write_lora(Path(tmp) / "ours.safetensors", LoRA({"unet": extract(build("ours-lora", "cpu"))}))
        import diffusers

        ref = build("diffusers-lora", "cpu")
        diffusers.StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=get_peft_model_state_dict(ref))
        theirs = Path(tmp) / "pytorch_lora_weights.safetensors"
        return {"ours_bytes": ours.stat().st_size, "diffusers_bytes": theirs.stat().st_size}


def child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lora_train_step.json"))
    p.add_argument("--timing-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--memory-child", metavar="VARIANT", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.timing_child:
        print(json.dumps(timing_child(args.repeats, args.device)))
        return 0
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.device)))
        return 0
    import diffusers
    import peft

    timed = child(["--timing-child", "--repeats", str(args.repeats), "--device", args.device])
    for v in VARIANTS:
        timed[v].update(child(["--memory-child", v, "--device", args.device]))
    r = {v: timed[v] for v in VARIANTS}
    ratios = {
        "lora_time_ours_vs_diffusers": r["ours-lora"]["step_s_median"] / r["diffusers-lora"]["step_s_median"],
        "lora_memory_ours_vs_diffusers": r["ours-lora"]["peak_mb"] / r["diffusers-lora"]["peak_mb"],
        "ours_lora_time_vs_full": r["ours-lora"]["step_s_median"] / r["ours-full"]["step_s_median"],
        "ours_lora_memory_vs_full": r["ours-lora"]["peak_mb"] / r["ours-full"]["peak_mb"],
        "full_time_ours_vs_diffusers": r["ours-full"]["step_s_median"] / r["diffusers-full"]["step_s_median"],
    }
    results = {"device": args.device, "torch": torch.__version__, "diffusers": diffusers.__version__,
               "peft": peft.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
               "load_average_at_start": list(os.getloadavg()), "repeats": args.repeats, "case": CASE,
               "lora": {"rank": RANK, "alpha": RANK, "targets": TARGETS}, "variants": r, "ratios": ratios,
               "file_sizes": file_sizes()}
    for v in VARIANTS:
        print(f"{v:15s} step {r[v]['step_s_median'] * 1000:7.1f} ms  peak {r[v]['peak_mb']:7.0f} MB  "
              f"trained {r[v]['trained_parameters']:,} parameters")
    print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    print(f"LoRA file: ours {results['file_sizes']['ours_bytes']:,} B, diffusers "
          f"{results['file_sizes']['diffusers_bytes']:,} B")
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
