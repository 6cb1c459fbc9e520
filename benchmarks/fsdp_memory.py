"""Peak memory per rank of FSDP training: one unit per block (what `--strategy fsdp` does) vs one
unit around the whole model (what it did before, and still does around a compiled denoiser).

Each mode runs the `Trainer` (method ldm) with strategy "fsdp" under `torch.distributed.run --nproc_per_node 2`
(gloo on CPU, nccl on CUDA) for a few steps of an SD1.5-layout UNet with halved widths
(160, 320, 640, 640; ~220 M parameters) on 32x32x4 latents, batch 2, a trainable `tiny` text
encoder of the UNet's cross-attention width. Every rank reports its peak RSS (a high-water mark:
it includes building the whole model before sharding; the EMA is sharded like the model; on CUDA also
torch.cuda.max_memory_allocated) and the step time.

    python benchmarks/fsdp_memory.py [--device cpu] [--steps 3] [--out benchmarks/results/fsdp_memory.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from _memory import peak_rss_mb  # this file's folder is on sys.path when run as a script

WIDTHS = (160, 320, 640, 640)


def worker(mode: str, ae_dir: str, out: str, steps: int, device: str) -> None:
    import torch

    import ldmkit.denoisers.unet as unet
    from ldmkit.data.latents import LatentData
    from ldmkit.training import LDM, LDMConfig, Trainer, distributed

    torch.set_num_threads(1)
    unet.PRESETS["bench-fsdp"] = dataclasses.replace(unet.PRESETS["sd15"], block_out_channels=WIDTHS)
    wrap = distributed.wrap
    distributed.wrap = lambda m, ctx, strategy="ddp", **kw: wrap(m, ctx, strategy, per_block=mode == "per_block")
    ctx = distributed.init(device)
    g = torch.Generator().manual_seed(0)
    data = LatentData(torch.randn(8, 4, 32, 32, generator=g), 0.1 * torch.rand(8, 4, 32, 32, generator=g),
                      captions=["a red circle", "a blue square"] * 4)
    cfg = LDMConfig(autoencoder=ae_dir, out=out, preset="bench-fsdp", text_encoder="tiny", steps=steps, batch_size=2,
                    lr=1e-4, warmup_steps=0, progress=False, device=device, strategy="fsdp", checkpoint_every=10_000,
                    sample_every=10_000)
    method = LDM(cfg, data=data)
    trainer = Trainer(method, ctx, overwrite=True)
    batches = method.batches(0)
    trainer.train_step(next(batches))  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(next(batches))
    step_s = (time.perf_counter() - t0) / steps
    row = {"mode": mode, "rank": ctx.rank, "step_s": round(step_s, 3),
           "peak_rss_mb": round(peak_rss_mb()),
           "fsdp_units": sum(type(m).__name__ == "FullyShardedDataParallel" for m in trainer.wrapped.modules())}
    if ctx.device.type == "cuda":
        row["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() // 2**20
    with open(f"{out}-rank{ctx.rank}.json", "w") as f:  # a file per rank: printed rows can interleave
        json.dump(row, f)
    distributed.shutdown(ctx)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/fsdp_memory.json")
    p.add_argument("--worker", nargs=3, metavar=("MODE", "AE_DIR", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(*args.worker, steps=args.steps, device=args.device)
        return 0

    import torch

    import ldmkit.denoisers.unet as unet
    from ldmkit.autoencoder.model import PRESETS, Autoencoder
    from ldmkit.io.format import save_component

    params = sum(q.numel() for q in unet.UNet(dataclasses.replace(unet.PRESETS["sd15"], block_out_channels=WIDTHS))
                 .parameters())
    result = {"device": args.device, "torch": torch.__version__, "machine": platform.machine(), "processes": 2,
              "unet_widths": list(WIDTHS), "unet_params_m": round(params / 1e6, 1), "batch": 2,
              "latent": [4, 32, 32], "steps": args.steps, "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        save_component(Autoencoder(PRESETS["tiny-kl-f4"]), os.path.join(tmp, "ae"))
        for mode in ("per_block", "whole"):
            env = dict(os.environ, OMP_NUM_THREADS="1")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   __file__, "--device", args.device, "--steps", str(args.steps),
                   "--worker", mode, os.path.join(tmp, "ae"), os.path.join(tmp, mode)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            rows = []
            for rank in range(2):
                with open(os.path.join(tmp, f"{mode}-rank{rank}.json")) as f:
                    rows.append(json.load(f))
            result["modes"][mode] = sorted(rows, key=lambda r: r["rank"])
            print(mode, rows)
    peak = {m: max(r["peak_rss_mb"] for r in rows) for m, rows in result["modes"].items()}
    result["peak_rss_ratio_per_block_vs_whole"] = round(peak["per_block"] / peak["whole"], 3)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"peak RSS per rank: per-block {peak['per_block']} MB, whole model {peak['whole']} MB "
          f"({result['peak_rss_ratio_per_block_vs_whole']:.2f}x); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
