"""The f-sweep's summary: seeds pooled into means with 95 % intervals, the verdict on the LDM paper's ordering,
the plots and the markdown tables (benchmarks/fsweep.py writes the runs; this reads them)."""
from __future__ import annotations

import math
from pathlib import Path

METRICS = ("fid", "kid", "precision", "recall", "class_accuracy")
# two-sided 95 % quantiles of Student's t by degrees of freedom; more dof than listed: the nearest lower entry
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       15: 2.131, 20: 2.086, 30: 2.042}


def t95(dof: int) -> float:
    return T95[max(k for k in T95 if k <= dof)]


def interval(values: list[float]) -> dict:
    """Mean and the half-width of its 95 % t-interval over seeds (None with one seed)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "ci95": None, "n": n}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return {"mean": mean, "ci95": t95(n - 1) * sd / math.sqrt(n), "n": n}


def aggregate(runs: list[dict]) -> list[dict]:
    """Per f and compute point: every metric as mean +- 95 % interval over the seeds that reached the point."""
    rows = []
    for f in sorted({r["f"] for r in runs}):
        group = [r for r in runs if r["f"] == f]
        for k in range(min(len(r["points"]) for r in group)):
            pts = [r["points"][k] for r in group]
            row = {"f": f, "point": k, "step": pts[0]["step"], "train_gflop": pts[0]["train_gflop"],
                   "train_seconds": interval([p["train_seconds"] for p in pts])["mean"],
                   "seeds": [r["seed"] for r in group], "latent_shape": group[0]["latent_shape"],
                   "batch": group[0]["batch"]}
            row.update({m: interval([p[m] for p in pts]) for m in METRICS})
            rows.append(row)
    return rows


def _apart(a: dict, b: dict) -> bool:
    """True when the two 95 % intervals (both present) do not overlap."""
    return abs(a["mean"] - b["mean"]) > a["ci95"] + b["ci95"]


def verdict(rows: list[dict]) -> dict:
    """At each compute point: the factors ranked by mean FID, and whether the paper's ordering holds -- a mildly
    compressed latent space (f = 2 or 4) better than pixels (f = 1), and the strongest compression (f = 8) not
    the best -- with 'clearly' only where the 95 % intervals separate."""
    out = []
    for k in sorted({r["point"] for r in rows}):
        at = {r["f"]: r for r in rows if r["point"] == k}
        ranked = sorted(at, key=lambda f: at[f]["fid"]["mean"])
        entry = {"point": k, "train_gflop": at[ranked[0]]["train_gflop"], "ranked_by_fid": ranked,
                 "fid": {f: at[f]["fid"]["mean"] for f in ranked}}
        mild = [f for f in (2, 4) if f in at]
        if mild:
            best = min(mild, key=lambda f: at[f]["fid"]["mean"])
            for other, key in ((1, "latent_beats_pixels"), (8, "f8_capped")):
                if other in at:  # `other` behind the best mild factor: FID ratio > 1
                    a, b = at[other]["fid"], at[best]["fid"]
                    ratio = a["mean"] / b["mean"]
                    intervals = None not in (a["ci95"], b["ci95"])  # a single seed has none
                    entry[key] = {"mild_f": best, "fid_ratio": ratio, "holds": ratio > 1, "intervals": intervals,
                                  "clearly": ratio > 1 and intervals and _apart(a, b)}
        out.append(entry)
    return {"points": out, "summary": summary_line(out[-1]) if out else "no runs"}


def summary_line(last: dict) -> str:
    ranks = " < ".join(f"LDM-{f}" for f in last["ranked_by_fid"])
    parts = [f"after {last['train_gflop']:.0f} GFLOP, FID ranks {ranks}"]
    for key, text in (("latent_beats_pixels", "a latent space (LDM-{mild_f}) beats pixels"),
                      ("f8_capped", "LDM-8 trails the best mild factor (LDM-{mild_f})")):
        v = last.get(key)
        if v is None:
            continue
        if not v["holds"]:
            how = "NOT"
        elif v["clearly"]:
            how = "clearly (95 % intervals apart)"
        else:
            how = "within the intervals" if v["intervals"] else "yes, but one side has one seed (no interval)"
        parts.append(text.format(**v) + f": {how}, FID ratio {v['fid_ratio']:.2f}")
    return "; ".join(parts)


def _fmt(v: dict, digits: int) -> str:
    return f"{v['mean']:.{digits}f}" + ("" if v["ci95"] is None else f" ± {v['ci95']:.{digits}f}")


def plot(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    rows = result["summary"]
    for f in sorted({r["f"] for r in rows}):
        sel = [r for r in rows if r["f"] == f]
        xs = [r["train_gflop"] for r in sel]
        label = f"LDM-{f}" + (" (pixels)" if f == 1 else "")
        for ax, m in zip(axes, ("fid", "kid", "class_accuracy")):
            ax.errorbar(xs, [r[m]["mean"] for r in sel], yerr=[r[m]["ci95"] or 0.0 for r in sel], fmt="o-",
                        capsize=3, label=label)
    for ax, name in zip(axes, ("FID (own classifier features) - lower is better", "KID - lower is better",
                               "class accuracy of samples - higher is better")):
        ax.set_xlabel("denoiser training compute (GFLOP, forward+backward)")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend()
    prm = result["params"]
    counts = sorted({len(r["seeds"]) for r in rows})
    seeds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    fig.suptitle(f"Fashion-MNIST 32x32 class-conditional, equal FLOPs per model ({result['mode']} sizes, "
                 f"{prm['steps']} steps, {prm['num_eval']} samples per point, "
                 + (f"mean and 95 % interval over {seeds} seeds)" if counts[-1] > 1 else "one seed)"))
    fig.tight_layout()
    paths.append(out / "fsweep.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    if result.get("nfe"):
        paths.append(plot_nfe(result, out / "fsweep_nfe.png"))
    return paths


def plot_nfe(result: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    styles = {"ddim": "o-", "dpmpp_2m": "s-", "euler": "x--"}  # euler == ddim for eps models: dashed on top
    steps = sorted({r["nfe"] for r in result["nfe"]["rows"]})
    for sampler in ("ddim", "dpmpp_2m", "euler"):
        rows = [r for r in result["nfe"]["rows"] if r["sampler"] == sampler]
        axes[0].plot([r["nfe"] for r in rows], [r["fid"] for r in rows], styles[sampler], label=sampler)
        axes[1].plot([r["nfe"] for r in rows], [r["class_accuracy"] for r in rows], styles[sampler], label=sampler)
    for ax, name in zip(axes, ("FID (own features)", "class accuracy")):
        ax.set_xscale("log")
        ax.set_xticks(steps, [str(v) for v in steps])
        ax.minorticks_off()
        ax.set_xlabel("sampling steps (model evaluations per image, x2 with CFG)")
        ax.set_title(f"{name}, LDM-{result['nfe']['f']}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_table(result: dict) -> str:
    lines = []
    if result.get("real_baseline"):
        b = result["real_baseline"]
        lines += [f"Real-data floor ({result['params']['num_eval']} real training images scored the same way): "
                  f"FID {b['fid']:.3f}, KID {b['kid']:.4f}, precision {b['precision']:.2f}, "
                  f"recall {b['recall']:.2f}, accuracy {b['class_accuracy']:.3f}", ""]
    if result.get("stage1"):
        lines += ["| autoencoder | latent | steps | held-out PSNR (dB) | held-out SSIM |", "|---|---|---|---|---|"]
        for f, info in sorted(result["stage1"].items(), key=lambda kv: int(kv[0])):
            lines.append(f"| f={f} | {'x'.join(map(str, info['latent_shape']))} | {info['steps']} | "
                         f"{info['heldout_psnr']['mean']:.2f} | {info['heldout_ssim']['mean']:.3f} |")
        lines.append("")
    lines += ["| model | latent | batch | step | train GFLOP | train s | seeds | FID (mean ± 95 % interval) | KID | "
              "precision | recall | accuracy |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["summary"]:
        lines.append(f"| LDM-{r['f']} | {'x'.join(map(str, r['latent_shape']))} | {r['batch']} | {r['step']} | "
                     f"{r['train_gflop']:.0f} | {r['train_seconds']:.0f} | {len(r['seeds'])} | "
                     f"{_fmt(r['fid'], 2)} | {_fmt(r['kid'], 4)} | "
                     f"{_fmt(r['precision'], 2)} | {_fmt(r['recall'], 2)} | {_fmt(r['class_accuracy'], 3)} |")
    if result.get("verdict"):
        lines += ["", "Verdict: " + result["verdict"]["summary"] + "."]
    if result.get("missing"):
        lines += ["", "Not run yet (not in the table): " + ", ".join(result["missing"]) + "."]
    if result.get("nfe"):
        lines += ["", f"Sampler quality vs steps on LDM-{result['nfe']['f']} "
                  f"(guidance {result['params']['guidance']}):",
                  "", "| sampler | steps | FID | KID | accuracy | seconds |", "|---|---|---|---|---|---|"]
        for r in result["nfe"]["rows"]:
            lines.append(f"| {r['sampler']} | {r['steps']} | {r['fid']:.2f} | {r['kid']:.4f} | "
                         f"{r['class_accuracy']:.3f} | {r['seconds']} |")
    return "\n".join(lines)
