"""Throughput and latency of `ldm serve` against a fresh `ldm sample` process per image.

Case: the bundled demo-shapes model (32x32, its default DPM++ 2M), one image per request, the same
steps everywhere. Three ways to make the images:

  process      `ldm sample` run once per image: Python start, imports, model load, one image
  server       `ldm serve` started once (its start-up timed apart), then one client, one request at a time
  4 clients    the same server, 4 clients sending at once (the queue runs one job at a time: the
               latency includes the wait)

Reported: requests per minute and latency (median, p90) of each, and the server's start-up time.

    python benchmarks/serve_throughput.py [--requests 24] [--process-images 6] [--steps 20] [--clients 4]
                                          [--device cpu] [--out benchmarks/results/serve_throughput.json]
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_results  # noqa: E402

PROMPT = "a red circle above a blue square"


def _stats(latencies: list[float], wall: float) -> dict:
    ordered = sorted(latencies)
    return {"requests": len(latencies), "wall_s": round(wall, 3),
            "requests_per_minute": round(60 * len(latencies) / wall, 1),
            "latency_median_s": round(statistics.median(ordered), 4),
            "latency_p90_s": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 4),
            "latency_mean_s": round(statistics.fmean(ordered), 4)}


def fresh_processes(n: int, steps: int, device: str, out: Path) -> dict:
    """One `ldm sample` process per image."""
    latencies = []
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ldmkit.cli", "sample", "--model", "demo-shapes", "--prompt", PROMPT,
                        "--steps", str(steps), "--seed", str(i), "--device", device, "--out", str(out),
                        "--no-progress"], check=True, capture_output=True)
        latencies.append(time.perf_counter() - t)
    return _stats(latencies, time.perf_counter() - t0)


def start_server(device: str, out: Path) -> tuple[subprocess.Popen, str, float]:
    import requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "ldmkit.cli", "serve", "--model", "demo-shapes", "--port",
                             str(port), "--device", device, "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"ldm serve exited with {proc.returncode}")
        try:
            if requests.get(url + "/", timeout=2).status_code == 200:
                return proc, url, time.perf_counter() - t0
        except requests.ConnectionError:
            time.sleep(0.1)
        if time.perf_counter() - t0 > 300:
            proc.kill()
            raise RuntimeError("ldm serve did not answer within 300 s")


def _one(url: str, steps: int, seed: int) -> float:
    import requests

    t = time.perf_counter()
    r = requests.post(url + "/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": steps, "seed": seed}, timeout=600)
    r.raise_for_status()
    assert len(r.json()["images"]) == 1
    return time.perf_counter() - t


def server_runs(url: str, n: int, steps: int, clients: int) -> tuple[dict, dict]:
    _one(url, steps, 0)  # warm-up
    t0 = time.perf_counter()
    sequential = [_one(url, steps, i) for i in range(n)]
    one = _stats(sequential, time.perf_counter() - t0)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        concurrent = list(pool.map(lambda i: _one(url, steps, i), range(n)))
    return one, _stats(concurrent, time.perf_counter() - t0)


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=24, help="requests per server measurement")
    p.add_argument("--process-images", type=int, default=6, help="images made by fresh processes")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_throughput.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        process = fresh_processes(args.process_images, args.steps, args.device, Path(tmp) / "process")
        proc, url, startup = start_server(args.device, Path(tmp) / "serve")
        try:
            one, many = server_runs(url, args.requests, args.steps, args.clients)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    results = {
        "benchmark": "serve_throughput",
        "case": {"model": "demo-shapes", "size": "32x32", "sampler": "dpmpp_2m (model default)", "steps": args.steps,
                 "images_per_request": 1, "device": args.device, "torch_threads": torch.get_num_threads()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "fresh_process_per_image": process,
        "server_startup_s": round(startup, 2),
        "server_one_client": one,
        f"server_{args.clients}_clients": many,
        "speedup_server_vs_process": round(one["requests_per_minute"] / process["requests_per_minute"], 1),
    }
    for name in ("fresh_process_per_image", "server_one_client", f"server_{args.clients}_clients"):
        r = results[name]
        print(f"{name:26s} {r['requests_per_minute']:8.1f} req/min   median {r['latency_median_s']:.3f} s   "
              f"p90 {r['latency_p90_s']:.3f} s")
    print(f"server start-up {startup:.1f} s; server vs process: {results['speedup_server_vs_process']}x")
    write_results(args.out, results)


if __name__ == "__main__":
    main()
