"""DeepCache-style feature caching (`--cache-interval N --cache-branch K`): what it buys and what it costs.

1. The bundled demo-shapes model (its UNet: 2 levels, 32 / 64 channels, one layer each, 8x8 latents; 4 skips,
   branches 0-2): 200 held-out prompts (examples/shapes `eval_prompts("heldout", 200, 7)`), seeds 5000 + i,
   DPM++ 2M, 20 steps, guidance 3, batches of 50. For every (interval, branch): wall time per image, the
   time per image spent in the denoiser (the extended UNet: its context adapter + the UNet) and in the UNet
   alone, the match rate of the shapes analyser (`metrics.shapes_analysis.adherence_report`), how many
   prompts changed verdict against the uncached images, and the mean absolute pixel difference to them
   (0-255). Each batch runs every setting in turn, `--passes` times; a batch's time is its fastest pass.
2. An SD1.5-shaped UNet (4 levels, widths 64 / 128 / 256 / 256, 2 layers per level, 77x768 context) with
   random weights at 64x64 latents, batch 2 (one CFG step): the time of a full forward and of a partial one
   per branch, and the UNet time per step that gives for each interval (N full-forward times over one full
   and N - 1 partial forwards). Forwards interleave over the branches; times are the fastest of `--repeats`.

CPU, one thread (steadier on a shared machine).

    python benchmarks/feature_cache.py [--n 200] [--passes 3] [--repeats 3] [--out benchmarks/results/feature_cache.json]
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "examples" / "shapes"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_results  # noqa: E402

SETTINGS = [(1, 0)] + [(n, b) for b in (0, 1, 2) for n in (2, 3, 5)]  # (interval, branch); (1, 0) = off
SAMPLING = dict(sampler="dpmpp_2m", steps=20, guidance=3.0, seed=5000, batch_size=50, progress=False)


class Clock:
    """Seconds spent inside a module's forward (pre / post hooks)."""

    def __init__(self, module):
        self.total, self._t0 = 0.0, 0.0
        module.register_forward_pre_hook(self._start)
        module.register_forward_hook(self._stop)

    def _start(self, module, args):
        self._t0 = time.perf_counter()

    def _stop(self, module, args, out):
        self.total += time.perf_counter() - self._t0


def run_batch(pipe, prompts, seed, interval, branch, clocks) -> dict:
    """One batch of images with one setting: its images and seconds (wall, in the denoiser, in the UNet)."""
    for c in clocks.values():
        c.total = 0.0
    t0 = time.perf_counter()
    results = pipe.text2img(prompt=prompts, num=len(prompts), cache_interval=interval, cache_branch=branch,
                            **{**SAMPLING, "seed": seed, "batch_size": len(prompts)})
    return {"wall": time.perf_counter() - t0, **{k: c.total for k, c in clocks.items()},
            "images": [r.image for r in results]}


def timed_runs(pipe, prompts, passes: int, clocks) -> dict:
    """{setting: (images, {clock: seconds per image})}: every batch runs every setting in turn, `passes`
    times; a batch's time is its fastest pass (machine load only ever adds time)."""
    batch = SAMPLING["batch_size"]
    images = {s: [] for s in SETTINGS}
    best = {s: {} for s in SETTINGS}
    for p in range(passes):
        for lo in range(0, len(prompts), batch):
            for s in SETTINGS:
                r = run_batch(pipe, prompts[lo:lo + batch], SAMPLING["seed"] + lo, *s, clocks)
                if p == 0:
                    images[s] += r.pop("images")
                for k in ("wall", "denoiser", "unet"):
                    best[s][(k, lo)] = min(best[s].get((k, lo), float("inf")), r[k])
        print(f"pass {p + 1}: " + ", ".join(f"{s}: {sum(v for (k, _), v in best[s].items() if k == 'wall'):.1f}s"
                                              for s in SETTINGS), flush=True)
    n = len(prompts)
    return {s: (images[s], {k: sum(v for (kk, _), v in best[s].items() if kk == k) / n
                            for k in ("wall", "denoiser", "unet")}) for s in SETTINGS}


def demo_shapes(n: int, passes: int) -> dict:
    from demo import eval_prompts

    from ldmkit import pipelines
    from ldmkit.metrics.shapes_analysis import adherence_report

    pipe = pipelines.load("demo-shapes")
    clocks = {"denoiser": Clock(pipe.denoiser), "unet": Clock(getattr(pipe.denoiser, "unet", pipe.denoiser))}
    prompts = eval_prompts("heldout", n, 7)
    pipe.text2img(prompt=prompts[:8], num=8, **SAMPLING)  # warm-up
    runs = timed_runs(pipe, prompts, passes, clocks)
    base_images = runs[SETTINGS[0]][0]
    base = np.stack([np.asarray(im, dtype=np.float64) for im in base_images])
    base_report = adherence_report(base_images, prompts)
    rows = []
    for (interval, branch), (images, secs) in runs.items():
        report = adherence_report(images, prompts)
        pix = np.stack([np.asarray(im, dtype=np.float64) for im in images])
        flips = sum(a["match"] != b["match"] for a, b in zip(report["samples"], base_report["samples"]))
        rows.append({"interval": interval, "branch": branch if interval > 1 else None,
                     **{f"{k}_ms_per_image": v * 1e3 for k, v in secs.items()},
                     "match_rate": report["match_rate"], "verdicts_changed": int(flips),
                     "mean_abs_pixel_diff": float(np.abs(pix - base).mean()),
                     "max_abs_pixel_diff": float(np.abs(pix - base).max())})
    off = rows[0]
    for r in rows:
        for k in ("wall", "denoiser", "unet"):
            r[f"{k}_speedup"] = off[f"{k}_ms_per_image"] / r[f"{k}_ms_per_image"]
    return {"model": "demo-shapes", "prompts": f"eval_prompts('heldout', {n}, 7)", "sampling": SAMPLING,
            "passes": passes, "rows": rows}


def sd15_shape(repeats: int) -> dict:
    from ldmkit.denoisers.feature_cache import FeatureCache, branches
    from ldmkit.denoisers.unet import PRESETS, UNet, UNetConfig

    cfg = UNetConfig(**{**PRESETS["sd15"].to_dict(), "block_out_channels": (64, 128, 256, 256)})
    torch.manual_seed(0)
    unet = UNet(cfg).eval()
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 64, 64, generator=g), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768, generator=g)

    n = branches(unet)
    caches = {b: FeatureCache(10**6, b) for b in range(n)}  # after one full forward, partial ones only
    times = {k: [] for k in ["full", *caches]}
    with torch.no_grad():
        unet(x, t, ctx)  # warm-up
        for cache in caches.values():
            cache.next_call()
            unet.feature_cache = cache
            unet(x, t, ctx)
        unet.feature_cache = None
        for _ in range(repeats):  # interleaved: machine load hits every branch alike
            for k in times:
                cache = caches.get(k)
                if cache is not None:
                    cache.next_call()
                unet.feature_cache = cache
                t0 = time.perf_counter()
                unet(x, t, ctx)
                times[k].append(time.perf_counter() - t0)
                unet.feature_cache = None
    assert all(c.full_runs == 1 and c.partial_runs == repeats for c in caches.values())
    full = min(times["full"])
    rows = []
    for branch in caches:
        partial = min(times[branch])
        rows.append({"branch": branch, "partial_ms": partial * 1e3, "partial_over_full": partial / full,
                     **{f"speedup_interval_{k}": k * full / (full + (k - 1) * partial) for k in (2, 3, 5)}})
        print(f"sd15-shape branch {branch}: partial {partial * 1e3:.0f} ms vs full {full * 1e3:.0f} ms", flush=True)
    return {"unet": "sd15 layout, widths (64, 128, 256, 256), random weights", "latents": "2x4x64x64 (one CFG step)",
            "full_ms": full * 1e3, "repeats": repeats, "timing": "fastest of the repeats", "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200, help="prompts (images per setting)")
    ap.add_argument("--passes", type=int, default=3, help="timed passes over all settings")
    ap.add_argument("--repeats", type=int, default=3, help="forwards timed per branch (SD1.5 shape)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "feature_cache.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    results = {"demo_shapes": demo_shapes(args.n, args.passes), "sd15_shape": sd15_shape(args.repeats),
               "device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
               "python": platform.python_version(), "machine": platform.machine()}
    results["seconds"] = time.perf_counter() - t0
    write_results(args.out, results)


if __name__ == "__main__":
    main()
