"""The speed / quality frontier of generation on the bundled demo-shapes model, against diffusers' scheduler.

1. Quality vs wall time per image. The teacher (`demo-shapes`) and its LCM student (examples/shapes/lcm_distill.py,
   `--student`) generate for 400 prompts (200 training + 200 held-out compositions, `demo.eval_prompts(set, 200,
   7)`; seeds 5000 + i; guidance 3; batches of 50); quality is the shapes analyser's match rate
   (`metrics.shapes_analysis`, with its binomial standard error). Settings:
   * diffusers: `DPMSolverMultistepScheduler` (DPM++ 2M, the config diffusers writes for this schedule) stepping
     the same network -- the loop of `StableDiffusionPipeline.__call__` (scale_model_input, CFG pair, step); the
     denoiser is ldmkit's module (diffusers has no class for the demo's extended UNet / MiniLM conditioner; UNet
     parity and speed are level, benchmarks/unet_vs_diffusers.py) -- at 10 / 20 / 25 / 50 steps;
   * ldmkit: DPM++ 2M at 10 / 20 / 25, UniPC at 10, DPM++ 2M 20 steps with feature caching (interval 3), the
     LCM student at 1 / 2 / 4 / 8 steps, and the student at 4 steps with the tiny decoder (`--tiny-decoder`).
   Every batch runs every setting in turn, `--passes` times; a batch's time is its fastest pass; a setting's
   time per image is the sum over batches / 400 (sampling + decoding; prompt encoding included).
2. Sampler overhead per step: each sampler's own arithmetic (a network that costs nothing, x -> 0.1 x, on a
   [1, 4, 64, 64] latent, 25 steps) against the matching diffusers scheduler's `step` loop.

Writes benchmarks/results/frontier.json and docs/images/frontier.png. CPU, all threads of the machine.

    python benchmarks/frontier.py [--student outputs/lcm/run/model] [--tiny outputs/tiny/tiny_decoder] [--n 200]
    python benchmarks/frontier.py --model fashion-mnist [--student outputs/fmnist-lcm/model] [--tiny DIR]
        [--only "LCM 4" "25"]                                                                  # -> frontier_fmnist.*

3. The same for the bundled Fashion-MNIST class model (`--model fashion-mnist`) and its LCM student
   (examples/fashion_mnist/lcm_distill.py): 1,000 class-balanced samples per setting at the model's default
   guidance, quality = FID in its own classifier's features against 1,000 test images (bootstrap error;
   the real-vs-real floor drawn as a line), class accuracy, precision / recall.
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "examples" / "shapes"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_results  # noqa: E402

GUIDANCE, SEED, BATCH = 3.0, 5000, 50


def diffusers_loop(pipe, prompts, seed: int, steps: int, guidance: float = GUIDANCE):
    """DPM++ 2M as diffusers runs it: its scheduler's timesteps and `step`, the CFG pair per step (`prompts`:
    captions, or class labels of a class model)."""
    from diffusers import DPMSolverMultistepScheduler

    from ldmkit.diffusion import cfg
    from ldmkit.io.diffusers_schedulers import schedule_to_diffusers
    from ldmkit.pipelines.base import Settings

    config = schedule_to_diffusers(pipe.schedule.to_dict(), "dpmpp_2m", None, pipe.prediction)
    sched = DPMSolverMultistepScheduler.from_config(config)
    sched.set_timesteps(steps)
    with torch.no_grad():
        cond, uncond = pipe._encode(list(prompts), None)
        seeds = [seed + i for i in range(len(prompts))]
        x = pipe.noise(pipe.generators(seeds), (pipe.latent_channels, *pipe.latent_size)) * sched.init_noise_sigma
        model = cfg(pipe.model_fn(None, None, None), cond, uncond, guidance)
        for t in sched.timesteps:
            out = model(sched.scale_model_input(x, t), t.float().expand(x.shape[0]))
            x = sched.step(out, t, x).prev_sample
        images = pipe.decode(x, Settings("dpmpp_2m", steps, guidance))
    from ldmkit.io.images import tensor_to_pil

    return [tensor_to_pil(im) for im in images]


def settings(teacher, student, tiny, key: str = "prompt", guidance: float = GUIDANCE) -> dict:
    """name -> (function(conditions, seed) -> images, network evaluations per image); `key` is the pipelines'
    argument the conditions go to (prompt, class_label)."""
    def ours(pipe, sampler, steps, **kw):
        return lambda conds, seed: [r.image for r in pipe.text2img(
            **{key: conds}, num=len(conds), seed=seed, sampler=sampler, steps=steps, guidance=guidance,
            batch_size=len(conds), progress=False, **kw)]

    pair = 1 if guidance == 1.0 else 2  # network evaluations per step: CFG's pair, one without guidance
    out = {f"diffusers DPM++ 2M {n}": ((lambda n: lambda c, s: diffusers_loop(teacher, c, s, n, guidance))(n),
                                       pair * n) for n in (10, 20, 25, 50)}
    out.update({f"ldmkit DPM++ 2M {n}": (ours(teacher, "dpmpp_2m", n), pair * n) for n in (10, 20, 25)})
    out["ldmkit UniPC 10"] = (ours(teacher, "unipc", 10), pair * 10)
    out["ldmkit DPM++ 2M 20, cache 3"] = (ours(teacher, "dpmpp_2m", 20, cache_interval=3), pair * 20)
    if student is not None:
        out.update({f"ldmkit LCM {n}": (ours(student, "lcm", n), n) for n in (1, 2, 4, 8)})
        if tiny is not None:
            out["ldmkit LCM 4, tiny decoder"] = (ours(student, "lcm", 4, fast_decode=True), 4)
    return out


def timed(runs: dict, conditions: list, passes: int, batch: int) -> tuple[dict, dict]:
    """(images per setting, {setting: {batch start: fastest seconds}}): every batch runs every setting in turn,
    `passes` times; a batch's time is its fastest pass (machine load only ever adds time)."""
    runs[next(iter(runs))][0](conditions[:8], SEED)  # warm-up
    images = {k: [] for k in runs}
    best: dict = {k: {} for k in runs}
    for p in range(passes):
        for lo in range(0, len(conditions), batch):
            for name, (fn, _) in runs.items():
                t0 = time.perf_counter()
                out = fn(conditions[lo:lo + batch], SEED + lo)
                best[name][lo] = min(best[name].get(lo, math.inf), time.perf_counter() - t0)
                if p == 0:
                    images[name] += out
        print(f"pass {p + 1} done", flush=True)
    return images, best


def frontier(args) -> dict:
    from demo import eval_prompts

    from ldmkit.metrics.shapes_analysis import adherence_report
    from ldmkit.pipelines import load

    teacher = load("demo-shapes")
    student = load(args.student) if Path(args.student).is_dir() else None
    if student is None:
        print(f"no student at {args.student}: run examples/shapes/lcm_distill.py first (LCM points left out)")
    elif Path(args.tiny).is_dir():
        student.load_tiny_decoder(args.tiny)
    runs = settings(teacher, student, student is not None and student.tiny_decoder)
    prompts = eval_prompts("train", args.n, 7) + eval_prompts("heldout", args.n, 7)
    images, best = timed(runs, prompts, args.passes, BATCH)
    rows = []
    for name, (_, nfe) in runs.items():
        rep = adherence_report(images[name], prompts)
        per_set = {}
        for k, part in (("train", slice(0, args.n)), ("heldout", slice(args.n, 2 * args.n))):
            per_set[k] = sum(s["match"] for s in rep["samples"][part]) / args.n
        m = rep["match_rate"]
        rows.append({"setting": name, "network_evaluations": nfe, "ms_per_image": 1e3 * sum(best[name].values()) / len(prompts),
                     "match_rate": m, "stderr": math.sqrt(m * (1 - m) / len(prompts)), **{f"match_{k}": v for k, v in per_set.items()}})
        print(f"{name:30s} {rows[-1]['ms_per_image']:7.2f} ms/image  match {100 * m:5.1f} % "
              f"(± {100 * rows[-1]['stderr']:.1f})", flush=True)
    return {"prompts": f"eval_prompts('train' and 'heldout', {args.n}, 7)", "guidance": GUIDANCE, "seed": SEED,
            "batch": BATCH, "passes": args.passes, "student": args.student if student is not None else None,
            "tiny_decoder": args.tiny if student is not None and student.tiny_decoder is not None else None,
            "rows": rows}


def class_frontier(args) -> dict:
    """The Fashion-MNIST class model (`--model`) and its LCM student: 1,000 class-balanced samples per setting
    (seeds 5000 + i, batches of 100) scored like `ldm eval` -- FID, precision / recall and class accuracy in the
    model's own classifier's features against 1,000 test images -- with a bootstrap standard error of the FID
    (the generated set resampled 20 times) and the real-vs-real floor."""
    from ldmkit.io import resolve_model_path
    from ldmkit.io.images import pil_to_tensor
    from ldmkit.metrics.evaluate import class_accuracy, reference_images
    from ldmkit.metrics.features import extract_features, load_feature_network
    from ldmkit.metrics.fid import fid_from_features, precision_recall
    from ldmkit.pipelines import load

    teacher = load(args.model)
    guidance = float(teacher.defaults.get("guidance", GUIDANCE))
    student = load(args.student) if Path(args.student).is_dir() else None
    network = load_feature_network(str(resolve_model_path(args.model) / "eval_classifier"))
    real = reference_images("fashion-mnist", "test", limit=args.num)
    f_real = extract_features(network, real.images)
    labels = [i % 10 for i in range(args.num)]
    tiny = None
    if student is not None and args.tiny and Path(args.tiny).is_dir():
        student.load_tiny_decoder(args.tiny)
        tiny = student.tiny_decoder
    runs = settings(teacher, student, tiny, key="class_label", guidance=guidance)
    if args.only:  # a subset of the settings (names containing one of the given strings)
        runs = {k: v for k, v in runs.items() if any(o in k for o in args.only)}
    images, best = timed(runs, labels, args.passes, 100)
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, (_, nfe) in runs.items():
        x = torch.stack([pil_to_tensor(im.convert("RGB")) for im in images[name]])[:, :1]  # grey, as `ldm eval`
        f_fake = extract_features(network, x)
        fid = fid_from_features(f_real, f_fake)
        boot = [fid_from_features(f_real, f_fake[torch.randint(0, len(f_fake), (len(f_fake),), generator=g)])
                for _ in range(20)]
        precision, recall = precision_recall(f_real, f_fake, k=3)
        acc = class_accuracy(network, x, labels)["accuracy"]
        rows.append({"setting": name, "network_evaluations": nfe, "ms_per_image": 1e3 * sum(best[name].values()) / len(labels),
                     "fid": fid, "fid_bootstrap_std": float(torch.tensor(boot).std()), "precision": precision,
                     "recall": recall, "class_accuracy": acc, "class_accuracy_stderr": math.sqrt(acc * (1 - acc) / len(labels))})
        print(f"{name:30s} {rows[-1]['ms_per_image']:7.2f} ms/image  FID {fid:6.3f} (± {rows[-1]['fid_bootstrap_std']:.3f})  "
              f"accuracy {100 * acc:5.1f} %  P {precision:.3f} R {recall:.3f}", flush=True)
    return {"model": args.model, "student": args.student if student is not None else None, "guidance": guidance,
            "tiny_decoder": args.tiny if tiny is not None else None,
            "num": args.num, "seed": SEED, "batch": 100, "passes": args.passes, "rows": rows,
            "feature_network": network.describe()}


def overhead(steps: int = 25, repeats: int = 5) -> list[dict]:
    """Seconds per step of each sampler with a free network, ldmkit vs the diffusers scheduler."""
    import diffusers

    from ldmkit.diffusion import Denoiser, get_sampler, make_schedule, plan
    from ldmkit.io.diffusers_schedulers import SCHEDULER_OF_SAMPLER, schedule_to_diffusers

    schedule = make_schedule("scaled_linear")
    x0 = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    rows = []
    for name in ("ddim", "euler", "dpmpp_2m", "pndm", "lms", "unipc", "deis", "dpmpp_2m_sde", "dpmpp_sde",
                 "dpmpp_3m_sde", "lcm"):
        p = plan(name, schedule, steps)
        denoise = Denoiser(lambda x, t: 0.1 * x, schedule, "eps", p)
        info = get_sampler(name)
        cls = getattr(diffusers, SCHEDULER_OF_SAMPLER[name])
        sched = cls.from_config(schedule_to_diffusers(schedule.to_dict(), name, None, "eps"))

        def ours():
            info.fn(denoise, x0.clone() * float(p.sigmas[0]), p.sigmas, generator=torch.Generator().manual_seed(1))

        def theirs():
            sched.set_timesteps(steps)
            x = x0.clone() * sched.init_noise_sigma
            g = torch.Generator().manual_seed(1)
            for t in sched.timesteps:
                xi = sched.scale_model_input(x, t)
                kw = {"generator": g} if "generator" in sched.step.__code__.co_varnames else {}
                x = sched.step(0.1 * xi, t, x, **kw).prev_sample

        times = {}
        for label, fn in (("ldmkit", ours), ("diffusers", theirs)):
            fn()
            best = math.inf
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            times[label] = best
        evals = len(p.sigmas) - 1 if name != "dpmpp_sde" else 2 * (len(p.sigmas) - 1)
        rows.append({"sampler": name, "diffusers_scheduler": SCHEDULER_OF_SAMPLER[name], "steps": steps,
                     "ldmkit_us_per_step": 1e6 * times["ldmkit"] / steps,
                     "diffusers_us_per_step": 1e6 * times["diffusers"] / steps, "network_evaluations": evals})
        print(f"{name:14s} ldmkit {rows[-1]['ldmkit_us_per_step']:8.1f} us/step, diffusers "
              f"{rows[-1]['diffusers_us_per_step']:8.1f} us/step", flush=True)
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    diff = [r for r in rows if r["setting"].startswith("diffusers")]
    ax.errorbar([r["ms_per_image"] for r in diff], [100 * r["match_rate"] for r in diff],
                yerr=[100 * r["stderr"] for r in diff], fmt="s--", color="grey", label="diffusers DPM++ 2M (10/20/25/50)")
    groups = (("ldmkit DPM++ 2M", "o-", "tab:blue"), ("ldmkit LCM", "D-", "tab:red"))
    for prefix, fmt, colour in groups:
        sel = [r for r in rows if r["setting"].startswith(prefix) and "," not in r["setting"]]
        if sel:
            ax.errorbar([r["ms_per_image"] for r in sel], [100 * r["match_rate"] for r in sel],
                        yerr=[100 * r["stderr"] for r in sel], fmt=fmt, color=colour, label=prefix)
    for r in rows:
        if r["setting"].startswith("ldmkit") and ("," in r["setting"] or "UniPC" in r["setting"]):
            ax.errorbar([r["ms_per_image"]], [100 * r["match_rate"]], yerr=[100 * r["stderr"]], fmt="^",
                        label=r["setting"].removeprefix("ldmkit "))
    ref = next((r for r in diff if r["setting"].endswith(" 25")), None)
    if ref is not None:
        ax.axvline(ref["ms_per_image"] / 4, color="grey", lw=0.8, ls=":")
        ax.text(ref["ms_per_image"] / 4, 61, " 1/4 of diffusers' 25 steps", fontsize=8, color="grey")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks([4, 6, 10, 15, 25, 40, 60])
    ax.set_xlabel("wall time per image (ms, CPU, log scale)")
    ax.set_ylabel("prompt adherence (% of 400 prompts)")
    ax.set_ylim(60, 100)
    ax.set_title("demo-shapes: speed vs quality (guidance 3)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def plot_class(result: dict, path: Path) -> None:
    """FID (own classifier features, with its bootstrap error) against wall time per image."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    groups = (("diffusers DPM++ 2M", "s--", "grey"), ("ldmkit DPM++ 2M", "o-", "tab:blue"), ("ldmkit LCM", "D-", "tab:red"))
    for prefix, fmt, colour in groups:
        sel = [r for r in rows if r["setting"].startswith(prefix) and "," not in r["setting"]]
        if sel:
            ax.errorbar([r["ms_per_image"] for r in sel], [r["fid"] for r in sel], yerr=[r["fid_bootstrap_std"] for r in sel],
                        fmt=fmt, color=colour, label=prefix)
    for r in rows:
        if r["setting"].startswith("ldmkit") and ("," in r["setting"] or "UniPC" in r["setting"]):
            ax.errorbar([r["ms_per_image"]], [r["fid"]], yerr=[r["fid_bootstrap_std"]], fmt="^",
                        label=r["setting"].removeprefix("ldmkit "))
    ref = next((r for r in rows if r["setting"] == "diffusers DPM++ 2M 25"), None)
    if ref is not None:
        ax.axvline(ref["ms_per_image"] / 4, color="grey", lw=0.8, ls=":")
    if result.get("floor_fid") is not None:
        ax.axhline(result["floor_fid"], color="green", lw=0.8, ls=":", label="real-vs-real floor")
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis, ticks in ((ax.xaxis, [10, 15, 25, 40, 60, 80]), (ax.yaxis, [0.3, 0.5, 1, 2, 4])):
        axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_ticks(ticks)
    ax.set_xlabel("wall time per image (ms, CPU, log scale)")
    ax.set_ylabel("FID, own features (1,000 vs 1,000; lower is better)")
    ax.set_title(f"{result['model']}: speed vs quality (guidance {result['guidance']:g})")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo-shapes", help="demo-shapes (prompt adherence) or a Fashion-MNIST class "
                   "model with an eval_classifier/ (FID, class accuracy), e.g. fashion-mnist")
    p.add_argument("--student", default=None, help="the LCM student (default: outputs/lcm/run/model for demo-shapes, "
                   "outputs/fmnist-lcm/model otherwise)")
    p.add_argument("--tiny", default=None, help="a tiny decoder for the student (default for demo-shapes: "
                   "outputs/tiny/tiny_decoder)")
    p.add_argument("--only", nargs="+", default=None, help="class model: only the settings whose names contain one "
                   "of these strings")
    p.add_argument("--n", type=int, default=200, help="demo-shapes: prompts per set (training, held-out)")
    p.add_argument("--num", type=int, default=1000, help="class model: samples per setting")
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON (default: benchmarks/results/frontier.json, frontier_fmnist.json)")
    p.add_argument("--plot", default=None, help="plot (default: docs/images/frontier.png, frontier_fmnist.png)")
    p.add_argument("--plot-only", action="store_true", help="redraw the plot from --out's JSON")
    args = p.parse_args(argv)
    shapes = args.model == "demo-shapes"
    stem = "frontier" if shapes else "frontier_fmnist"
    args.out = args.out or str(ROOT / "benchmarks" / "results" / f"{stem}.json")
    args.plot = args.plot or str(ROOT / "docs" / "images" / f"{stem}.png")
    args.student = args.student or ("outputs/lcm/run/model" if shapes else "outputs/fmnist-lcm/model")
    args.tiny = args.tiny or ("outputs/tiny/tiny_decoder" if shapes else None)
    draw = plot if shapes else plot_class
    if args.plot_only:
        import json

        draw(json.loads(Path(args.out).read_text())["frontier"], Path(args.plot))
        return 0
    torch.manual_seed(0)
    result = {"device": "cpu", "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "frontier": frontier(args) if shapes else class_frontier(args)}
    if shapes:
        result["sampler_overhead"] = overhead()
    else:
        result["frontier"]["floor_fid"] = _floor_fid(args.model, args.num)
    import diffusers

    result["diffusers"] = diffusers.__version__
    write_results(args.out, result)
    draw(result["frontier"], Path(args.plot))
    return 0


def _floor_fid(model: str, n: int) -> float:
    """FID of n class-balanced real training images against the n test images, in the model's classifier."""
    from ldmkit.io import resolve_model_path
    from ldmkit.metrics.evaluate import real_floor
    from ldmkit.metrics.features import load_feature_network

    return real_floor(load_feature_network(str(resolve_model_path(model) / "eval_classifier")), "fashion-mnist", n)["fid"]


if __name__ == "__main__":
    raise SystemExit(main())
