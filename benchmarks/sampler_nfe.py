"""Samplers: accuracy per model evaluation (NFE), and per-step overhead ours vs diffusers.

1. Accuracy vs NFE. Data x0 ~ N(mu_d, s_d^2) per dimension has an exact denoiser E[x0 | x_t] and an exact
   probability-flow solution x0* = mu + s (x_T - a_T mu) / sqrt(a_T^2 s^2 + sigma_T^2). Each deterministic
   sampler runs 4096 samples from the same x_T with that denoiser; we record the RMS error to x0* (end to
   end, including each sampler's stop at its last nonzero level) against NFE, and the NFE each needs to
   reach an RMS error of 0.02, as a ratio to Euler's.
2. Overhead. A sampling loop with a trivial model (1x4x64x64 latent, 50 steps): ours vs the matching
   diffusers scheduler's set_timesteps/scale_model_input/step loop, timed alternately, median of repeats.

    python benchmarks/sampler_nfe.py [--out benchmarks/results/sampler_nfe.json] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ldmkit.diffusion import DiscreteSchedule, FlowSchedule, convert, noise_to, plan, sample  # noqa: E402

N, D = 4096, 4
MU = torch.linspace(-1.0, 1.0, D, dtype=torch.float64).reshape(1, D, 1, 1)
SD = torch.linspace(0.5, 1.5, D, dtype=torch.float64).reshape(1, D, 1, 1)
SD15 = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
STEPS = (5, 10, 15, 20, 30, 40, 60, 80, 120, 160)
TARGET_RMS = 0.02


def optimal_network(schedule, prediction):
    def network(x, t):
        t = t[0].double()
        if isinstance(schedule, FlowSchedule):
            a, sg = 1 - t / schedule.num_train_timesteps, t / schedule.num_train_timesteps
        else:
            a, sg = schedule.alpha_sigma(t)
        x0 = MU + a * SD**2 / (a**2 * SD**2 + sg**2) * (x - a * MU)
        return convert(x0, "x0", prediction, x, a, sg)

    return network


def rms_error(name, schedule, steps):
    p = plan(name, schedule, steps)
    lvl = float(p.sigmas[0])
    g = torch.Generator().manual_seed(0)
    x0 = MU + SD * torch.randn(N, D, 1, 1, generator=g, dtype=torch.float64)
    x_T = noise_to(x0, torch.randn(N, D, 1, 1, generator=g, dtype=torch.float64), lvl)  # the samplers' VP state
    a, s = (0.0, 1.0) if lvl == float("inf") else (1 / (1 + lvl**2) ** 0.5, lvl / (1 + lvl**2) ** 0.5)
    exact = MU + SD * (x_T - a * MU) / (a**2 * SD**2 + s**2) ** 0.5
    nfe = {"count": 0}
    prediction = "flow" if isinstance(schedule, FlowSchedule) else "eps"
    net = optimal_network(schedule, prediction)

    def counted(x, t):
        nfe["count"] += 1
        return net(x, t)

    out = sample(name, counted, x_T, schedule, prediction, steps)
    return nfe["count"], ((out - exact) ** 2).mean().sqrt().item()


def accuracy():
    results = {}
    for name in ("ddim", "euler", "heun", "dpmpp_2m", "dpmpp_2m_karras", "flow_euler", "flow_heun"):
        schedule = FlowSchedule(shift=3.0) if name.startswith("flow_") else DiscreteSchedule(**SD15)
        rows = [dict(zip(("steps", "nfe", "rms"), (k, *rms_error(name, schedule, k)))) for k in STEPS]
        hit = next((r["nfe"] for r in rows if r["rms"] <= TARGET_RMS), None)
        results[name] = {"schedule": schedule.to_dict(), "rows": rows, f"nfe_to_rms_{TARGET_RMS}": hit}
        print(f"{name:16s} " + "  ".join(f"{r['nfe']:3d}:{r['rms']:.2e}" for r in rows) + f"  -> NFE {hit}")
    for base, names in (("euler", ("heun", "dpmpp_2m", "dpmpp_2m_karras", "ddim")), ("flow_euler", ("flow_heun",))):
        b = results[base][f"nfe_to_rms_{TARGET_RMS}"]
        for n in names:
            h = results[n][f"nfe_to_rms_{TARGET_RMS}"]
            results[n][f"nfe_ratio_{base}_over_this"] = (b / h) if (b and h) else None
    return results


def fake(x, t):
    return 0.5 * torch.tanh(x)


def overhead(repeats: int):
    import diffusers

    S = diffusers.schedulers
    pairs = {
        "euler": lambda: S.EulerDiscreteScheduler(**_dcfg()),
        "dpmpp_2m": lambda: S.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **_dcfg()),
        "ddim": lambda: S.DDIMScheduler(clip_sample=False, set_alpha_to_one=True, **_dcfg()),
    }
    schedule = DiscreteSchedule(**SD15)
    x = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    out = {}
    for name, make in pairs.items():
        ours_t, theirs_t = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            sample(name, fake, x, schedule, "eps", 50)
            ours_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            sched = make()
            sched.set_timesteps(50)
            y = x * sched.init_noise_sigma
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for t in sched.timesteps:
                    y = sched.step(fake(sched.scale_model_input(y, t), t), t, y).prev_sample
            theirs_t.append(time.perf_counter() - t0)
        o, d = statistics.median(ours_t), statistics.median(theirs_t)
        out[name] = {"ours_s": o, "diffusers_s": d, "time_ratio_ours_over_diffusers": o / d}
        print(f"{name:10s} 50 steps: ours {o * 1e3:.1f} ms, diffusers {d * 1e3:.1f} ms, ratio {o / d:.2f}")
    return out


def _dcfg():
    return {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1,
            "timestep_spacing": "leading"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sampler_nfe.json"))
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    torch.set_num_threads(1)
    result = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor()},
        "accuracy_vs_nfe": accuracy(),
    }
    try:
        result["overhead_50_steps"] = overhead(args.repeats)
    except ImportError as exc:
        result["overhead_50_steps"] = f"skipped: {exc}"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
