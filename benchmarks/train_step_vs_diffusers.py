"""Training throughput of our LDM training step vs the same loop over diffusers' UNet2DConditionModel.

Both models get identical weights (diffusers' state dict loads into ours unchanged) and identical
batches; the loop around them is the same code (the ldm method's math: q_sample, model, weighted MSE
against the eps target, backward, grad clipping, AdamW fused as the Trainer uses it on CPU and CUDA,
zero_grad(set_to_none=True)), so the numbers compare the networks as trained, not two different loops.

Cases (CPU, fp32):
  demo-text:      the `small` text UNet, 8x8x4 latents, batch 64, 16x128 context (no mask)
  reduced-sd15:   SD1.5 layout with reduced widths (64, 128, 256, 256), 32x32x4 latents, batch 4, 77x768
  demo-minilm:    `make demo`'s step: `tiny` UNet, 8x8x4 latents, batch 64, 28x384 MiniLM-shaped context (the
                  demo's max_length) with a key mask (5-12 attended tokens per caption as MiniLM tokenises the
                  shapes captions, 10 % null captions of 2). Both models get the same mask (diffusers:
                  encoder_attention_mask); ours, as Stage2 does, first trims the columns no row attends
                  (conditioning.base.trim_padding: 16 here), diffusers attends over all 28 with a -10000 bias.
Each case is timed in a fresh process of its own; timing alternates ours / diffusers step by step
(so machine load hits both alike) and reports the median; peak memory is measured in a fresh subprocess per model as peak RSS during training steps
minus RSS before the first step (on CUDA: torch.cuda.max_memory_allocated).

`--compile` adds a second mode in which BOTH models are compiled in place (nn.Module.compile, as
`ldm train --compile` compiles its denoiser; inductor) and timed the same way after a compiling
warm-up step. The JSON keeps the modes apart: `throughput_ratio` (eager ours / eager diffusers),
`compiled.throughput_ratio` (compiled ours / compiled diffusers) and `compiled.ours_speedup_vs_eager`
(compiled ours / eager ours); all four variants are timed interleaved in one loop. Peak memory is
measured for the eager mode only (the compiling warm-up inflates peak RSS with compiler memory that
is not training memory).

    python benchmarks/train_step_vs_diffusers.py [--repeats 6] [--compile [--no-eager]] [--cases ...]
                                                 [--out benchmarks/results/train_step.json]
"""
from __future__ import annotations

import argparse
import json
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

from ldmkit.conditioning.base import Conditioning, trim_padding  # noqa: E402
from ldmkit.denoisers.unet import PRESETS, UNetConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from unet_vs_diffusers import twin_unet  # noqa: E402
from _results import write_results  # noqa: E402
from _memory import peak_rss_mb, reset_peak, rss_mb  # noqa: E402

CASES = {
    "demo-text": dict(preset="small", overrides={}, size=8, batch=64, ctx=(16, 128)),
    "reduced-sd15": dict(preset="sd15", overrides=dict(block_out_channels=(64, 128, 256, 256)), size=32, batch=4,
                         ctx=(77, 768)),
    # `make demo`'s own step: `tiny` UNet reading frozen MiniLM states (28 tokens, masked past each caption)
    "demo-minilm": dict(preset="tiny", overrides=dict(cross_attention_dim=384), size=8, batch=64, ctx=(28, 384),
                        masked=True),
}


def build(case: str, which: str, device: str, compile: bool = False):
    spec = CASES[case]
    cfg = UNetConfig(**{**PRESETS[spec["preset"]].to_dict(), **spec["overrides"]})
    model = twin_unet(cfg, spec["size"], which)
    model = model.to(device).train()
    if compile:
        model.compile()
    return model


def make_step(model, which: str, case: str, device: str):
    """One training step closure over a fixed batch (same batch, schedule and loss for both models)."""
    from ldmkit.diffusion.forward import q_sample
    from ldmkit.diffusion.objectives import training_loss
    from ldmkit.diffusion.schedules import DiscreteSchedule

    spec = CASES[case]
    g = torch.Generator().manual_seed(0)
    b, s = spec["batch"], spec["size"]
    z0 = torch.randn(b, 4, s, s, generator=g).to(device)
    noise = torch.randn(b, 4, s, s, generator=g).to(device)
    t = torch.randint(0, 1000, (b,), generator=g)
    ctx = torch.randn(b, *spec["ctx"], generator=g).to(device)
    mask = None
    if spec.get("masked"):  # caption lengths as MiniLM tokenises the shapes captions (5-12 tokens), 10 % null
        lengths = torch.randint(5, 13, (b,), generator=g)
        lengths[torch.rand(b, generator=g) < 0.1] = 2
        mask = (torch.arange(spec["ctx"][0])[None] < lengths[:, None]).to(device)
    schedule = DiscreteSchedule("linear")
    # as the Trainer: fused AdamW on CPU and CUDA (same optimiser, same numerics on both sides)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device in ("cpu", "cuda") or None)

    def step():
        x_t = q_sample(schedule, z0, noise, t)
        tt = t.to(device, torch.float32)
        if which == "diffusers":
            out = model(x_t, tt, encoder_hidden_states=ctx, encoder_attention_mask=mask, return_dict=False)[0]
        else:  # as Stage2 feeds the denoiser: masked trailing padding trimmed first
            cond = trim_padding(Conditioning(context=ctx, mask=mask))[0]
            out = model(x_t, tt, context=cond.context, context_mask=cond.mask)
        loss = training_loss(schedule, "eps", out, z0, noise, t).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    return step


def time_case(case: str, repeats: int, device: str, modes=("eager",)) -> dict:
    """Median step time of ours and diffusers in each mode ("eager", "compiled"). All variants are
    timed in one interleaved loop (ours/diffusers, eager/compiled step by step), so a change of
    machine load during the run hits every variant alike and the ratios stay comparable."""
    variants = [(m, w) for m in modes for w in ("ours", "diffusers")]
    steps = {v: make_step(build(case, v[1], device, v[0] == "compiled"), v[1], case, device) for v in variants}
    warmup_s = {}
    for v in variants:  # warm-up (allocator, oneDNN primitive caches; compilation in compile mode)
        t0 = time.perf_counter()
        steps[v]()
        steps[v]()
        warmup_s[v] = time.perf_counter() - t0
    times = {v: [] for v in variants}
    for _ in range(repeats):
        for v in variants:
            t0 = time.perf_counter()
            steps[v]()
            times[v].append(time.perf_counter() - t0)
    batch = CASES[case]["batch"]
    out: dict = {m: {} for m in modes}
    for (m, w), ts in times.items():
        med = statistics.median(ts)
        out[m][w] = {"step_s_median": med, "step_s_all": ts, "latents_per_s": batch / med, "warmup_s": warmup_s[(m, w)]}
    return out


def memory_child(case: str, which: str, device: str) -> None:
    model = build(case, which, device)
    step = make_step(model, which, case, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_mb()
        reset_peak()  # this process's own peak from here (ru_maxrss would include the parent's)
    for _ in range(2):
        step()
    if device == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mb = peak_rss_mb() - base
    print(json.dumps({"peak_mb": peak_mb}))


def timing(case: str, repeats: int, device: str, modes) -> dict:
    """`time_case` in a fresh process: a case's step time then does not depend on which (larger)
    cases ran before it. The C allocator keeps the heap a larger model grew and raises its mmap
    threshold, so a small model timed after reduced-sd15 in one process gets its tensors without
    page faults, which it never does in a run of its own (demo-minilm after reduced-sd15: 1.14x;
    alone: 1.20-1.27x, 2026-12-04)."""
    cmd = [sys.executable, __file__, "--timing-child", case, "--repeats", str(repeats), "--device", device,
           "--modes", *modes]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"timing {case} failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory(case: str, which: str, device: str) -> float:
    out = subprocess.run([sys.executable, __file__, "--memory-child", case, which, "--device", device],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="also time both models compiled (inductor)")
    p.add_argument("--no-eager", action="store_true", help="with --compile: skip the eager mode")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_step.json"))
    p.add_argument("--memory-child", nargs=2, metavar=("CASE", "WHICH"), help=argparse.SUPPRESS)
    p.add_argument("--timing-child", metavar="CASE", help=argparse.SUPPRESS)
    p.add_argument("--modes", nargs="+", default=["eager"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child, args.device)
        return 0
    if args.timing_child:
        print(json.dumps(time_case(args.timing_child, args.repeats, args.device, tuple(args.modes))))
        return 0
    import diffusers

    if args.no_eager and not args.compile:
        p.error("--no-eager needs --compile")
    results = {"device": args.device, "torch": torch.__version__, "diffusers": diffusers.__version__,
               "threads": torch.get_num_threads(), "machine": platform.machine(),
               "load_average_at_start": list(os.getloadavg()), "repeats": args.repeats,
               "optimizer": "AdamW(fused)" if args.device in ("cpu", "cuda") else "AdamW", "cases": {}}
    for case in args.cases:
        r = {}
        modes = (() if args.no_eager else ("eager",)) + (("compiled",) if args.compile else ())
        timed = timing(case, args.repeats, args.device, modes)
        r = timed.get("eager", {})
        if r:
            for w in ("ours", "diffusers"):
                r[w]["peak_mb"] = memory(case, w, args.device)
            r["throughput_ratio"] = r["ours"]["latents_per_s"] / r["diffusers"]["latents_per_s"]
            r["memory_ratio"] = (r["ours"]["peak_mb"] / r["diffusers"]["peak_mb"]
                                 if r["diffusers"]["peak_mb"] > 0 else None)
            print(f"{case} eager: ours {r['ours']['latents_per_s']:.1f} latents/s, diffusers "
                  f"{r['diffusers']['latents_per_s']:.1f} latents/s -> throughput ratio "
                  f"{r['throughput_ratio']:.2f}x; peak memory ours {r['ours']['peak_mb']:.0f} MB vs "
                  f"{r['diffusers']['peak_mb']:.0f} MB -> ratio {r['memory_ratio'] or float('nan'):.2f}", flush=True)
        if "compiled" in timed:
            c = timed["compiled"]
            c["throughput_ratio"] = c["ours"]["latents_per_s"] / c["diffusers"]["latents_per_s"]
            if r:
                c["ours_speedup_vs_eager"] = c["ours"]["latents_per_s"] / r["ours"]["latents_per_s"]
                c["diffusers_speedup_vs_eager"] = c["diffusers"]["latents_per_s"] / r["diffusers"]["latents_per_s"]
            r["compiled"] = c
            print(f"{case} compiled (both sides): ours {c['ours']['latents_per_s']:.1f} latents/s, diffusers "
                  f"{c['diffusers']['latents_per_s']:.1f} latents/s -> throughput ratio "
                  f"{c['throughput_ratio']:.2f}x" + (f"; compiled/eager: ours {c['ours_speedup_vs_eager']:.2f}x, "
                                                     f"diffusers {c['diffusers_speedup_vs_eager']:.2f}x"
                                                     if r.get("ours") else ""), flush=True)
        results["cases"][case] = r
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
