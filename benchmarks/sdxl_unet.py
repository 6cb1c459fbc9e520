"""SDXL's UNet: ldmkit vs diffusers on identical weights -- one sampling step (time and peak memory) and the
time to load an SDXL-sized UNet folder written by diffusers.

Step (CPU: SDXL's layout at two fifths of its widths -- 128-256-512 channels, 1 / 2 / 10 transformer layers,
2 / 4 / 8 heads of 64 as SDXL's -- with SDXL's full 2048-wide context and
1280 + 6 x 256 pooled / time-id features, a CFG batch of 2 at 32x32 latents; on CUDA the full SDXL UNet at
128x128 in bfloat16). Timing alternates ours / diffusers step by step and reports medians; peak memory
is measured in a fresh subprocess per model (CPU: peak RSS growth over one forward; CUDA: allocator peak).

Load: the full-size SDXL UNet (2.57 B parameters, float16 zeros: 5.1 GB) saved by diffusers'
`save_pretrained`, loaded by each side in a fresh process (ours: `io.diffusers_format`'s reader onto a
meta-device UNet; diffusers: `UNet2DConditionModel.from_pretrained(torch_dtype=float16)`): wall time until the module is built,
until every weight page has been read, and peak RSS. `--no-load` skips it (it writes 5 GB to --workdir).

    python benchmarks/sdxl_unet.py [--repeats 10] [--no-load] [--out benchmarks/results/sdxl_unet.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _memory import peak_rss_mb, reset_peak, rss_mb  # noqa: E402
from _results import write_results  # noqa: E402
from unet_vs_diffusers import twin_unet  # noqa: E402

from ldmkit.denoisers.unet import PRESETS  # noqa: E402

CPU_CASE = dict(block_out_channels=(128, 256, 512), attention_head_dim=(2, 4, 8))


def config(device: str):
    full = PRESETS["sdxl"]
    return full if device == "cuda" else dataclasses.replace(full, **CPU_CASE)


def inputs(device: str, dtype):
    size = 128 if device == "cuda" else 32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, size, size, generator=g)
    ctx = torch.randn(2, 77, 2048, generator=g)
    pooled = torch.randn(2, 1280, generator=g)
    ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2)
    t = torch.tensor([500, 500])
    return [v.to(device, dtype) if v.is_floating_point() and v is not ids else v.to(device) for v in (x, t, ctx, pooled)] \
        + [ids.to(device)]


def call(model, which: str, x, t, ctx, pooled, ids):
    if which == "diffusers":
        return model(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    return model(x, t, ctx, pooled=pooled, time_ids=ids)


def build(which: str, device: str, dtype):
    return twin_unet(config(device), 128, which).to(device=device, dtype=dtype).eval()


def step_times(device: str, dtype, repeats: int) -> tuple[dict, float]:
    models = {w: build(w, device, dtype) for w in ("ours", "diffusers")}
    args = inputs(device, dtype)
    times = {w: [] for w in models}
    with torch.no_grad():
        diff = float((call(models["ours"], "ours", *args) - call(models["diffusers"], "diffusers", *args)).abs().max())
        for _ in range(repeats):
            for w, m in models.items():
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                call(m, w, *args)
                if device == "cuda":
                    torch.cuda.synchronize()
                times[w].append(time.perf_counter() - t0)
    return {w: statistics.median(v) * 1000 for w, v in times.items()}, diff


def memory_probe(which: str, device: str) -> float:
    """In a fresh process: extra peak memory (MiB) of one forward."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build(which, device, dtype)
    args = inputs(device, dtype)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            call(model, which, *args)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with torch.no_grad():
        call(model, which, args[0][:1, :, :8, :8], args[1][:1], *(a[:1] for a in args[2:]))  # warm-up
    before = rss_mb()
    reset_peak()
    with torch.no_grad():
        call(model, which, *args)
    return peak_rss_mb() - before


def write_full_folder(folder: Path) -> None:
    """The full SDXL UNet in float16 zeros, written by diffusers (built on the meta device, then zeros)."""
    from diffusers import UNet2DConditionModel

    from ldmkit.io.diffusers_export import unet_config_to_diffusers

    cfg = {k: v for k, v in unet_config_to_diffusers(PRESETS["sdxl"].to_dict()).items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    unet.to_empty(device="cpu")
    unet.to(torch.float16)
    with torch.no_grad():
        for p in unet.parameters():
            p.zero_()
    unet.save_pretrained(folder, safe_serialization=True, max_shard_size="20GB")


def load_probe(which: str, folder: str) -> str:
    """In a fresh process: 'seconds seconds_with_every_page_read peak_rss_mib' of loading the UNet folder
    (the second time also reads a value from every 4 kB page of every weight: a memory-mapped file is
    only read when touched, so this is the time until the whole UNet is in memory)."""
    reset_peak()
    t0 = time.perf_counter()
    if which == "diffusers":
        from diffusers import UNet2DConditionModel

        model = UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float16)
    else:
        from ldmkit.denoisers.unet import UNet, UNetConfig
        from ldmkit.io.diffusers_format import UNET_WEIGHTS, _build_on_meta, _read_weights, unet_config_from_diffusers
        from ldmkit.io.files import read_json

        cfg = UNetConfig.from_dict(unet_config_from_diffusers(read_json(Path(folder) / "config.json")))
        model = _build_on_meta(lambda: UNet(cfg), _read_weights(Path(folder), UNET_WEIGHTS), "UNet", torch.float16)
    loaded = time.perf_counter() - t0
    with torch.no_grad():
        total = sum(float(p.reshape(-1)[::1024].float().sum()) for p in model.parameters())
    assert total == 0.0  # zeros, read
    return f"{loaded} {time.perf_counter() - t0} {peak_rss_mb()}"


def probe(*args: str) -> str:
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return r.stdout.strip().splitlines()[-1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-load", action="store_true", help="skip the 5 GB load-time measurement")
    ap.add_argument("--workdir", default=None, help="where the full-size folder is written (default: a temp dir)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sdxl_unet.json"))
    ap.add_argument("--memory-probe", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    ap.add_argument("--load-probe", nargs=2, metavar=("WHICH", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_probe:
        print(memory_probe(args.memory_probe, args.device))
        return 0
    if args.load_probe:
        print(load_probe(*args.load_probe))
        return 0
    import diffusers

    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    med, diff = step_times(dev, dtype, args.repeats)
    mem = {w: float(probe("--memory-probe", w, "--device", dev)) for w in ("ours", "diffusers")}
    cfg = config(dev)
    results = {"device": dev, "gpu": torch.cuda.get_device_name() if dev == "cuda" else None,
               "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
               "threads": torch.get_num_threads(), "load_average_at_start": list(os.getloadavg()),
               "step_case": {"block_out_channels": list(cfg.block_out_channels), "heads": list(cfg.heads),
                             "transformer_layers_per_block": list(cfg.transformer_layers_per_block),
                             "latent": 128 if dev == "cuda" else 32, "batch": 2, "dtype": str(dtype)},
               "repeats": args.repeats, "median_step_ms": med, "peak_memory_mib": mem, "max_abs_difference": diff,
               "ratios": {"time_ours_vs_diffusers": med["ours"] / med["diffusers"],
                          "memory_ours_vs_diffusers": mem["ours"] / mem["diffusers"]}}
    print(f"step: ours {med['ours']:.1f} ms, diffusers {med['diffusers']:.1f} ms; peak memory ours {mem['ours']:.0f} "
          f"MiB, diffusers {mem['diffusers']:.0f} MiB; max |diff| {diff:.1e}")
    if not args.no_load:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            write_full_folder(Path(tmp) / "unet")
            size = sum(f.stat().st_size for f in (Path(tmp) / "unet").iterdir())
            load = {}
            for w in ("ours", "diffusers", "ours", "diffusers"):  # twice each, interleaved: the page cache is warm
                s, touched, peak = map(float, probe("--load-probe", w, str(Path(tmp) / "unet")).split())
                load.setdefault(w, []).append({"seconds": s, "seconds_every_page_read": touched, "peak_rss_mib": peak})
        results["load"] = {"parameters": sum(p.numel() for p in _meta_unet().parameters()), "folder_bytes": size,
                           "runs": load, "ratio_seconds_ours_vs_diffusers":
                           min(r["seconds"] for r in load["ours"]) / min(r["seconds"] for r in load["diffusers"]),
                           "ratio_seconds_every_page_read_ours_vs_diffusers":
                           min(r["seconds_every_page_read"] for r in load["ours"])
                           / min(r["seconds_every_page_read"] for r in load["diffusers"])}
        print("load: " + ", ".join(f"{w} {min(r['seconds'] for r in v):.1f} s (every page read: "
                                   f"{min(r['seconds_every_page_read'] for r in v):.1f} s) / "
                                   f"{min(r['peak_rss_mib'] for r in v):.0f} MiB" for w, v in load.items()))
    write_results(args.out, results)
    return 0


def _meta_unet():
    from ldmkit.denoisers.unet import UNet

    with torch.device("meta"):
        return UNet(PRESETS["sdxl"])


if __name__ == "__main__":
    sys.exit(main())
