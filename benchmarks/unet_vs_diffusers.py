"""Ours vs diffusers UNet2DConditionModel on identical weights: forward time and peak memory.

Cases
  cpu-reduced-sd15: SD1.5 layout (4 levels, cross-attention on 3, 2 layers, 8 heads, 77x768
                    context) with reduced widths, fp32, 32x32 latents, batch 2, on CPU.
  cuda-sd15:        the full sd15 preset, bf16, 64x64 latents, batch 2 (skipped without CUDA).
Each case runs eager and torch.compile (``--no-compile`` skips the latter). Timings alternate
between the two models (ours, theirs, ours, ...) so machine load hits both alike; the number
reported is the median. CPU peak memory is measured in a fresh subprocess per model (peak RSS
during one forward minus RSS before it); CUDA peak memory with torch.cuda.max_memory_allocated.

    python benchmarks/unet_vs_diffusers.py [--repeats 10] [--no-compile] [--out benchmarks/results/unet.json]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ldmkit.denoisers.unet import PRESETS, UNet, UNetConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import peak_rss_mb, reset_peak, rss_mb  # noqa: E402

REDUCED = dict(block_out_channels=(64, 128, 256, 256))


def _config(case: str) -> UNetConfig:
    sd = PRESETS["sd15"]
    return UNetConfig(**{**sd.to_dict(), **REDUCED}) if case == "cpu-reduced-sd15" else sd


def twin_unet(cfg: UNetConfig, sample_size: int, which: str) -> torch.nn.Module:
    """diffusers' UNet2DConditionModel built from ``cfg`` (seed 0) for ``which="diffusers"``, else our
    UNet holding the same weights (the config is mapped as `ldm convert` maps it)."""
    import diffusers

    from ldmkit.io.diffusers_export import unet_config_to_diffusers

    theirs = {k: v for k, v in unet_config_to_diffusers(cfg.to_dict()).items() if not k.startswith("_")}
    theirs["sample_size"] = sample_size
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**theirs)
    if which == "diffusers":
        return ref
    model = UNet(cfg)
    model.load_state_dict(ref.state_dict(), strict=True)
    return model


def build(case: str, which: str, device: str, dtype: torch.dtype):
    return twin_unet(_config(case), 64, which).to(device=device, dtype=dtype).eval()


def inputs(case: str, device: str, dtype: torch.dtype):
    size = 32 if case == "cpu-reduced-sd15" else 64
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, size, size, generator=g).to(device, dtype)
    t = torch.tensor([10.0, 500.0], device=device)
    ctx = torch.randn(2, 77, 768, generator=g).to(device, dtype)
    return x, t, ctx


def call(model, which, x, t, ctx):
    if which == "diffusers":
        return model(x, t, encoder_hidden_states=ctx, return_dict=False)[0]
    return model(x, t, ctx)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_pair(case, device, dtype, compile_: bool, repeats: int, warmup: int):
    models = {w: build(case, w, device, dtype) for w in ("ours", "diffusers")}
    x, t, ctx = inputs(case, device, dtype)
    fns = {}
    for w, m in models.items():
        fn = (lambda m, w: (lambda: call(m, w, x, t, ctx)))(m, w)
        fns[w] = torch.compile(fn) if compile_ else fn
    times = {w: [] for w in fns}
    cpu_times = {w: [] for w in fns}  # process CPU time: steadier than wall time on a shared machine
    peak = {}
    with torch.no_grad():
        out = {w: fns[w]() for w in fns}  # first call (compiles)
        diff = (out["ours"].float() - out["diffusers"].float()).abs().max().item()
        for _ in range(warmup):
            for w in fns:
                fns[w]()
        for _ in range(repeats):
            for w in fns:
                _sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                fns[w]()
                _sync(device)
                times[w].append(time.perf_counter() - t0)
                cpu_times[w].append(time.process_time() - c0)
        if device == "cuda":
            for w in fns:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                fns[w]()
                torch.cuda.synchronize()
                peak[w] = (torch.cuda.max_memory_allocated() - base) / 2**20
    med = {w: statistics.median(v) * 1000 for w, v in times.items()}
    cpu = {w: statistics.median(v) * 1000 for w, v in cpu_times.items()}
    return med, cpu, peak, diff


def memory_probe(case: str, which: str) -> float:
    """Run in a fresh process: extra peak RSS (MiB) of one fp32 CPU forward."""
    model = build(case, which, "cpu", torch.float32)
    x, t, ctx = inputs(case, "cpu", torch.float32)
    with torch.no_grad():  # tiny warm-up: lazy imports and one-time buffers are not the forward's memory
        call(model, which, x[:1, :, :8, :8], t[:1], ctx[:1])
    before = rss_mb()
    reset_peak()  # this process's own peak from here (ru_maxrss would include the parent's)
    with torch.no_grad():
        call(model, which, x, t, ctx)
    return peak_rss_mb() - before


def cpu_peak_memory(case: str) -> dict:
    out = {}
    for which in ("ours", "diffusers"):
        r = subprocess.run([sys.executable, __file__, "--memory-probe", which, "--case", case],
                           capture_output=True, text=True, check=True)
        out[which] = float(r.stdout.strip().splitlines()[-1])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--cases", default="cpu-reduced-sd15,cuda-sd15")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "unet.json"))
    ap.add_argument("--memory-probe", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_probe:
        print(memory_probe(args.case, args.memory_probe))
        return
    if args.repeats < 1:
        raise SystemExit(f"--repeats={args.repeats} must be >= 1")

    import diffusers

    results = {"load_average_at_start": list(__import__("os").getloadavg()), "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
               "machine": platform.machine(), "cpu_threads": torch.get_num_threads(),
               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
               "repeats": args.repeats, "cases": {}}
    for case in args.cases.split(","):
        if case == "cuda-sd15":
            device, dtype = "cuda", torch.bfloat16
            if not torch.cuda.is_available():
                results["cases"][case] = {"skipped": "no CUDA device"}
                print(f"{case}: skipped (no CUDA device)")
                continue
        elif case == "cpu-reduced-sd15":
            device, dtype = "cpu", torch.float32
        else:
            raise SystemExit(f"unknown case {case!r}; known: cpu-reduced-sd15, cuda-sd15")
        entry = {"device": device, "dtype": str(dtype).removeprefix("torch."),
                 "config": _config(case).to_dict(), "modes": {}}
        for mode in ("eager",) + (() if args.no_compile else ("compile",)):
            try:
                med, cpu, peak, diff = time_pair(case, device, dtype, mode == "compile", args.repeats, args.warmup)
            except Exception as exc:  # e.g. no C++ compiler for inductor: record, do not hide
                entry["modes"][mode] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                results["cases"][case] = entry
                _write(args.out, results)
                print(f"{case} {mode}: failed: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            if device == "cpu" and mode == "eager":
                peak = cpu_peak_memory(case)
            m = {"ours_ms": round(med["ours"], 3), "diffusers_ms": round(med["diffusers"], 3),
                 "time_ratio": round(med["ours"] / med["diffusers"], 3), "max_abs_diff": diff}
            if device == "cpu":
                m.update({"ours_cpu_ms": round(cpu["ours"], 3), "diffusers_cpu_ms": round(cpu["diffusers"], 3),
                          "cpu_time_ratio": round(cpu["ours"] / cpu["diffusers"], 3)})
            if peak:
                m.update({"ours_peak_mib": round(peak["ours"], 1), "diffusers_peak_mib": round(peak["diffusers"], 1),
                          "memory_ratio": round(peak["ours"] / max(peak["diffusers"], 1e-9), 3)})
            entry["modes"][mode] = m
            mem = f", peak {m['ours_peak_mib']} vs {m['diffusers_peak_mib']} MiB" if peak else ""
            print(f"{case} {mode}: ours {m['ours_ms']:.1f} ms, diffusers {m['diffusers_ms']:.1f} ms, "
                  f"ratio {m['time_ratio']:.3f}"
                  + (f" (CPU-time ratio {m['cpu_time_ratio']:.3f})" if device == "cpu" else "") + f"{mem} (max |diff| {diff:.2e})")
            results["cases"][case] = entry
            _write(args.out, results)  # after every mode: a long compile run never loses the eager numbers
        results["cases"][case] = entry
    _write(args.out, results)
    print(f"wrote {args.out}")


def _write(path, results):
    from _results import write_results

    write_results(path, results)


if __name__ == "__main__":
    main()
