"""Run every benchmark script, then write benchmarks/results/summary.md (`make bench`).

    python benchmarks/run_all.py                       # CPU-sized defaults of each script
    python benchmarks/run_all.py --device cuda         # passed through to every script
    python benchmarks/run_all.py --only unet_vs_diffusers sampler_nfe
    python benchmarks/run_all.py --summary-only        # just rebuild summary.md from the JSON files
    python benchmarks/run_all.py --with-fsweep         # also the (long) LDM f-sweep

Each `benchmarks/*.py` (except this file and the f-sweep) runs in its own
process with its own defaults and writes its JSON into benchmarks/results/
itself; `--device` is passed to a script whose source declares that option
(the others choose their device themselves, which the run table notes).  A
script that is missing, fails or times out is reported in the summary, never
fatal.  The summary collects every
`results/*.json`: ratios (any number whose key says ratio / speedup, plus
ours / diffusers where a result holds both) and the run table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXPECTED = ("autoencoder_bench", "unet_vs_diffusers", "pipeline_vs_diffusers", "train_step_vs_diffusers",
            "sampler_nfe", "lora_train_step", "controlnet_step")
NOT_BENCHMARKS = {"run_all", "fsweep"}  # fsweep is long (~25 min on CPU): --with-fsweep


def discover(with_fsweep: bool) -> list[str]:
    names = sorted(p.stem for p in HERE.glob("*.py") if not p.stem.startswith("_"))
    names = [n for n in names if n not in NOT_BENCHMARKS]
    return names + (["fsweep"] if with_fsweep and (HERE / "fsweep.py").is_file() else [])


def run_one(name: str, out: Path, device: str | None, timeout: float, logs: Path) -> dict:
    script = HERE / f"{name}.py"
    if not script.is_file():
        return {"script": name, "status": "missing", "seconds": 0.0, "log": None}
    src = script.read_text(encoding="utf-8", errors="replace")
    cmd = [sys.executable, str(script)]
    note = ""
    if device is not None:
        if '"--device"' in src or "'--device'" in src:
            cmd += ["--device", device]
        else:
            note = " (script has no --device option: it chose its own device)"
    log = logs / f"{name}.log"
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        with open(log, "w") as fh:
            fh.write("$ " + " ".join(cmd) + "\n")
            fh.flush()
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, env=env,
                                  cwd=HERE.parent)
        status = ("ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})") + note
    except subprocess.TimeoutExpired:
        status = f"timeout (> {timeout:.0f} s)"
    return {"script": name, "status": status, "seconds": round(time.perf_counter() - t0, 1),
            "log": str(log.relative_to(HERE.parent)) if log.is_relative_to(HERE.parent) else str(log)}


# ----------------------------------------------------------------------------- summary


def _label(i: int, item) -> str:
    """A list item's name in a key path: its name/case/... field when it has one, else its index."""
    if isinstance(item, dict):
        for k in ("name", "case", "config", "sampler", "model", "label", "id"):
            if isinstance(item.get(k), (str, int)) and not isinstance(item.get(k), bool):
                return str(item[k])
    return str(i)


def _numbers(obj, prefix=""):
    """(dotted key path, value) for every finite number in a JSON tree."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{prefix}[{_label(i, v)}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and math.isfinite(obj):
        yield prefix, float(obj)


def ratios(data) -> list[tuple[str, float]]:
    """Numbers whose key names a ratio/speedup, plus ours/diffusers for dicts holding both."""
    found = [(k, v) for k, v in _numbers(data) if any(w in k.rsplit(".", 1)[-1].lower()
                                                         for w in ("ratio", "speedup"))]
    seen = {k.rsplit(".", 1)[0] if "." in k else "" for k, _ in found}

    def walk(obj, prefix=""):
        if isinstance(obj, dict):
            ours = next((obj[k] for k in obj if k.lower().startswith("ours") and isinstance(obj[k], (int, float))), None)
            ref = next((obj[k] for k in obj if k.lower().startswith("diffusers") and isinstance(obj[k], (int, float))),
                       None)
            if ours is not None and ref and prefix not in seen:
                found.append((f"{prefix or '(top)'} ours/diffusers", float(ours) / float(ref)))
            for k, v in obj.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                walk(v, f"{prefix}[{_label(i, v)}]")

    walk(data)
    return found


def _fmt(v: float) -> str:
    if v == 0 or 1e-3 <= abs(v) < 1e5:
        return f"{v:.4g}"
    return f"{v:.3e}"


def _written(f: Path) -> float:
    """When a result file was written: its last commit's time while the file is as committed (a fresh
    checkout gives every file the checkout's mtime), else its mtime."""
    try:
        clean = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", f.name], cwd=f.parent,
                               capture_output=True, timeout=30).returncode == 0
        stamp = subprocess.run(["git", "log", "-1", "--format=%ct", "--", f.name], cwd=f.parent,
                               capture_output=True, text=True, timeout=30).stdout.strip()
        if clean and stamp:
            return float(stamp)
    except (OSError, subprocess.SubprocessError):
        pass
    return f.stat().st_mtime


def write_summary(out: Path, runs: list[dict]) -> Path:
    lines = ["# Benchmark summary", "",
             f"Written by `benchmarks/run_all.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
             "Ratios are measured side by side in one process by each script (see its JSON for the set-up); "
             "for times, ours/diffusers < 1 means ldmkit is faster. A result file older than this run "
             "comes from an earlier run (e.g. when its script failed or timed out now).", ""]
    if runs:
        lines += ["## Runs", "", "| script | status | seconds | log |", "|---|---|---|---|"]
        lines += [f"| {r['script']} | {r['status']} | {r['seconds']} | {r['log'] or '-'} |" for r in runs]
        missing = [n for n in EXPECTED if not any(r["script"] == n for r in runs)]
        if missing:
            lines += ["", "Expected but not present: " + ", ".join(f"`{m}.py`" for m in missing) + "."]
        lines.append("")
    files = sorted(p for p in out.glob("*.json"))
    if not files:
        lines += ["No result files in this folder yet.", ""]
    lines += ["## Ratios", "", "| result file (written, UTC) | quantity | value |", "|---|---|---|"]
    other: list[str] = []
    bad: list[str] = []
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            bad.append(f"- `{f.name}`: unreadable ({exc})")
            continue
        rs = ratios(data)
        written = time.strftime("%m-%d %H:%M", time.gmtime(_written(f)))
        lines += [f"| {f.name} ({written}) | {k} | {_fmt(v)} |" for k, v in rs]
        device = data.get("device") if isinstance(data, dict) else None
        nums = list(_numbers(data))
        other.append(f"### {f.name}" + (f" (device: {device})" if device else ""))
        other.append("")
        if nums:
            other += ["| quantity | value |", "|---|---|"]
            other += [f"| {k} | {_fmt(v)} |" for k, v in nums[:60]]
            if len(nums) > 60:
                other.append(f"| ... | {len(nums) - 60} more in the file |")
        other.append("")
    lines.append("")
    if bad:
        lines += ["Unreadable result files:", *bad, ""]
    lines += ["## All numbers", "", *other]
    path = out / "summary.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(HERE / "results"),
                    help="results folder the summary is built from (default benchmarks/results)")
    ap.add_argument("--device", default=None, help="passed to every script (e.g. cuda); default: each script's own")
    ap.add_argument("--only", nargs="*", default=None, help="run only these scripts (names without .py)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per script (default 1800)")
    ap.add_argument("--with-fsweep", action="store_true", help="also run benchmarks/fsweep.py (long)")
    ap.add_argument("--summary-only", action="store_true", help="do not run anything, rebuild summary.md")
    args = ap.parse_args(argv)
    if args.timeout <= 0:
        ap.error(f"--timeout must be > 0, got {args.timeout}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []
    if not args.summary_only:
        names = args.only if args.only is not None else discover(args.with_fsweep)
        names = list(dict.fromkeys(list(names) + ([] if args.only is not None else
                                                  [n for n in EXPECTED if n not in names])))
        logs = out / "logs"
        logs.mkdir(exist_ok=True)
        for name in names:
            print(f"[bench] {name} ...", flush=True)
            r = run_one(name, out, args.device, args.timeout, logs)
            print(f"[bench] {name}: {r['status']} ({r['seconds']} s)", flush=True)
            runs.append(r)
        (logs / "runs.json").write_text(json.dumps({"written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                                    "device": args.device, "runs": runs}, indent=2))
    elif (out / "logs" / "runs.json").is_file():  # keep the table of the last real run
        runs = json.loads((out / "logs" / "runs.json").read_text())["runs"]
    path = write_summary(out, runs)
    print(f"[bench] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
