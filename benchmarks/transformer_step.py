"""The transformer denoisers of SD3 and FLUX.1: ldmkit vs diffusers on identical weights -- one sampling step's
time (medians of interleaved steps) and peak memory (a fresh subprocess per model: CPU peak RSS growth
over one forward; CUDA: the allocator's peak).

Cases (CPU: reduced width; CUDA: the full models in bfloat16):
    mmdit   SD3 Medium's layout (24 blocks of 24 x 64 heads) -- CPU: 6 blocks of 6 heads, 64x64 latents
            (1024 image tokens), 77 + 256 text tokens of 4096, a CFG batch of 2
    flux    FLUX.1-dev's layout (19 double + 38 single blocks) -- CPU: 2 + 4 blocks of 6 heads, 32x32 packed
            tokens (a 64x64 latent), 256 T5 tokens, batch 1 (distilled guidance, no CFG)

    python benchmarks/transformer_step.py [--cases mmdit,flux] [--repeats 10]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _memory import peak_rss_mb, reset_peak, rss_mb  # noqa: E402
from _results import write_results  # noqa: E402


def _mmdit(device: str):
    from diffusers import SD3Transformer2DModel

    from ldmkit.denoisers.mmdit import PRESETS, MMDiT

    cfg = PRESETS["sd3-medium"]
    if device != "cuda":
        cfg = dataclasses.replace(cfg, num_layers=6, num_attention_heads=6, caption_projection_dim=384)
    torch.manual_seed(0)
    ref = SD3Transformer2DModel(**cfg.to_dict())
    ours = MMDiT(cfg)
    ours.load_state_dict(ref.state_dict())
    size = 128 if device == "cuda" else 64
    g = torch.Generator().manual_seed(0)
    inputs = dict(x=torch.randn(2, 16, size, size, generator=g), t=torch.tensor([500.0, 500.0]),
                  ctx=torch.randn(2, 333, 4096, generator=g), pooled=torch.randn(2, 2048, generator=g))

    def call(model, which, x, t, ctx, pooled):
        if which == "diffusers":
            return model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled).sample
        return model(x, t, ctx, pooled)
    return {"ours": ours, "diffusers": ref}, inputs, call


def _flux(device: str):
    from diffusers import FluxTransformer2DModel

    from ldmkit.denoisers.flux import PRESETS, Flux

    cfg = PRESETS["flux-dev"]
    if device != "cuda":
        cfg = dataclasses.replace(cfg, num_layers=2, num_single_layers=4, num_attention_heads=6)
    torch.manual_seed(0)
    ref = FluxTransformer2DModel(**cfg.to_dict())
    ours = Flux(cfg)
    ours.load_state_dict(ref.state_dict())
    side = 64 if device == "cuda" else 32  # packed tokens per side
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(side, side, 3)
    ids[..., 1], ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None, :]
    inputs = dict(x=torch.randn(1, side * side, cfg.in_channels, generator=g), t=torch.tensor([0.5]),
                  guidance=torch.tensor([3.5]), pooled=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                  ctx=torch.randn(1, 256, cfg.joint_attention_dim, generator=g), img_ids=ids.reshape(-1, 3),
                  txt_ids=torch.zeros(256, 3))

    def call(model, which, x, t, guidance, pooled, ctx, img_ids, txt_ids):
        if which == "diffusers":
            return model(hidden_states=x, timestep=t, guidance=guidance, pooled_projections=pooled,
                         encoder_hidden_states=ctx, img_ids=img_ids, txt_ids=txt_ids).sample
        return model(x, t, guidance, pooled, ctx, img_ids, txt_ids)
    return {"ours": ours, "diffusers": ref}, inputs, call


CASES = {"mmdit": _mmdit, "flux": _flux}


def _prepare(case: str, device: str):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    models, inputs, call = CASES[case](device)
    models = {k: m.to(device=device, dtype=dtype).eval() for k, m in models.items()}
    inputs = {k: (v.to(device, dtype) if v.is_floating_point() and k not in ("img_ids", "txt_ids") else v.to(device))
              for k, v in inputs.items()}
    return models, inputs, call


def timings(case: str, device: str, repeats: int) -> tuple[dict, float]:
    models, inputs, call = _prepare(case, device)
    times = {w: [] for w in models}
    with torch.no_grad():
        diff = float((call(models["ours"], "ours", **inputs) - call(models["diffusers"], "diffusers", **inputs))
                     .abs().max())
        for _ in range(repeats):
            for w, m in models.items():
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                call(m, w, **inputs)
                if device == "cuda":
                    torch.cuda.synchronize()
                times[w].append(time.perf_counter() - t0)
    return {w: statistics.median(v) * 1000 for w, v in times.items()}, diff


def memory_probe(case: str, which: str, device: str) -> float:
    models, inputs, call = _prepare(case, device)
    model = models[which]
    del models
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            call(model, which, **inputs)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with torch.no_grad():
        call(model, which, **inputs)  # warm-up: one-time buffers are not the step's memory
    before = rss_mb()
    reset_peak()
    with torch.no_grad():
        call(model, which, **inputs)
    return peak_rss_mb() - before


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="mmdit,flux")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "transformer_step.json"))
    ap.add_argument("--memory-probe", nargs=2, metavar=("CASE", "WHICH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_probe:
        print(memory_probe(*args.memory_probe, args.device))
        return 0
    import diffusers

    results = {"device": args.device, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
               "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
               "threads": torch.get_num_threads(), "load_average_at_start": list(os.getloadavg()),
               "repeats": args.repeats, "cases": {}}
    for case in args.cases.split(","):
        med, diff = timings(case, args.device, args.repeats)
        mem = {}
        for w in ("ours", "diffusers"):
            r = subprocess.run([sys.executable, __file__, "--memory-probe", case, w, "--device", args.device],
                               capture_output=True, text=True, check=True)
            mem[w] = float(r.stdout.strip().splitlines()[-1])
        results["cases"][case] = {"median_step_ms": med, "peak_memory_mib": mem, "max_abs_difference": diff,
                                  "time_ours_vs_diffusers": med["ours"] / med["diffusers"],
                                  "memory_ours_vs_diffusers": mem["ours"] / mem["diffusers"]}
        print(f"{case}: ours {med['ours']:.1f} ms, diffusers {med['diffusers']:.1f} ms; peak memory ours "
              f"{mem['ours']:.0f} MiB, diffusers {mem['diffusers']:.0f} MiB; max |diff| {diff:.1e}")
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
