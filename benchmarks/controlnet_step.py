"""One sampling step with a ControlNet: ldmkit's (ControlNet residuals into our UNet) vs diffusers'
(ControlNetModel + UNet2DConditionModel, as StableDiffusionControlNetPipeline calls them), on identical
weights and inputs; and what the ControlNet costs as a fraction of a UNet step.

Case (CPU, fp32, eval, no grad): SD 1.5's layout at widths 64-128-256-256, a CFG batch of 2, 32x32x4
latents (a 256x256 control image, the standard 16-32-96-256 conditioning embedder), 77x768 context.
Timing alternates ours / diffusers / ours-UNet-alone step by step (machine load hits all alike) and
reports medians.

    python benchmarks/controlnet_step.py [--repeats 10] [--out benchmarks/results/controlnet_step.json]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_results  # noqa: E402
from unet_vs_diffusers import twin_unet  # noqa: E402

from ldmkit.denoisers.unet import PRESETS, UNetConfig  # noqa: E402

CASE = dict(preset="sd15", overrides=dict(block_out_channels=(64, 128, 256, 256)), size=32, batch=2, ctx=(77, 768))


def build(device: str):
    from diffusers import ControlNetModel

    from ldmkit.denoisers.controlnet import ControlNet, ControlNetConfig

    cfg = UNetConfig(**{**PRESETS[CASE["preset"]].to_dict(), **CASE["overrides"]})
    ref_unet = twin_unet(cfg, CASE["size"], "diffusers").to(device).eval()
    our_unet = twin_unet(cfg, CASE["size"], "ours").to(device).eval()
    torch.manual_seed(1)
    ref_cn = ControlNetModel.from_unet(ref_unet)
    with torch.no_grad():  # non-zero convolutions: the residuals must really be added
        for name, p in ref_cn.named_parameters():
            if name.startswith("controlnet_"):
                p.add_(torch.randn_like(p) * 0.02)
    ref_cn = ref_cn.to(device).eval()
    our_cn = ControlNet(ControlNetConfig.from_dict(dict(ref_cn.config))).to(device).eval()
    our_cn.load_state_dict(ref_cn.state_dict(), strict=True)
    return ref_unet, ref_cn, our_unet, our_cn


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "controlnet_step.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    dev = args.device
    ref_unet, ref_cn, our_unet, our_cn = build(dev)
    g = torch.Generator().manual_seed(0)
    b, s = CASE["batch"], CASE["size"]
    x = torch.randn(b, 4, s, s, generator=g).to(dev)
    ctx = torch.randn(b, *CASE["ctx"], generator=g).to(dev)
    control = torch.rand(b, 3, 8 * s, 8 * s, generator=g).to(dev)
    t = torch.tensor([500] * b, device=dev)

    def ours():
        r = our_cn(x, t, control, context=ctx, scale=0.8)
        return our_unet(x, t, context=ctx, down_residuals=r.down, mid_residual=r.mid)

    def theirs():
        down, mid = ref_cn(x, t, ctx, control, conditioning_scale=0.8, return_dict=False)
        return ref_unet(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample

    def unet_alone():
        return our_unet(x, t, context=ctx)

    variants = {"ours": ours, "diffusers": theirs, "ours_unet_alone": unet_alone}
    with torch.no_grad():
        diff = float((ours() - theirs()).abs().max())
        for fn in variants.values():  # warm-up
            fn()
        times = {k: [] for k in variants}
        for _ in range(args.repeats):
            for k, fn in variants.items():
                if dev == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if dev == "cuda":
                    torch.cuda.synchronize()
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    results = {"device": dev, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "machine": platform.machine(), "load_average_at_start": list(os.getloadavg()), "case": CASE,
               "repeats": args.repeats, "median_step_s": med, "max_abs_difference": diff,
               "ratios": {"time_ours_vs_diffusers": med["ours"] / med["diffusers"],
                          "controlnet_cost_vs_unet_step": (med["ours"] - med["ours_unet_alone"]) / med["ours_unet_alone"]}}
    for k, v in med.items():
        print(f"{k:16s} {v * 1000:8.1f} ms")
    print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in results["ratios"].items()) + f"; max |diff| {diff:.1e}")
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
