"""Stage-1 autoencoder benchmark (not a test).

1. Train `tiny-kl-f4` (1-channel variant) on Fashion-MNIST padded to 32x32 for a fixed
   number of steps with the real training loop (`AutoencoderTrainer`), then report
   held-out (t10k) PSNR / SSIM and seconds per step.
2. Forward+backward time of the SD-shape `kl-f8` encoder+decoder vs diffusers'
   AutoencoderKL with identical weights (loaded with the identity key map),
   measured side by side in this process, alternating, median of --repeats.

    python benchmarks/autoencoder_bench.py --out benchmarks/results   # -> autoencoder.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def train_fashion_mnist(steps: int, batch_size: int, eval_images: int, seed: int) -> dict:
    from ldmkit.data.fashion_mnist import FashionMNIST, available
    from ldmkit.autoencoder.evaluation import evaluate
    from ldmkit.io.format import load_component
    from ldmkit.training import AETrainConfig, AutoencoderMethod, Trainer

    if not available():
        return {"skipped": "Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = AETrainConfig(
            data="fashion-mnist", out=tmp, preset="tiny-kl-f4", steps=steps, batch_size=batch_size, lr=1e-3,
            size=32, checkpoint_every=steps, sample_every=steps, log_every=50, stats_samples=256, seed=seed,
            device="cpu", perceptual_weight=0.0, disc_weight=0.0, ema_decay=0.999, image_channels=1)
        trainer = Trainer(AutoencoderMethod(cfg))
        folder = trainer.run()
        summary = json.loads((Path(tmp) / "summary.json").read_text())
        held = FashionMNIST("test", channels=1)
        metrics = evaluate(load_component(folder), held, num_images=eval_images, device="cpu")
        rows = (Path(tmp) / "loss.csv").read_text().splitlines()
        column = rows[0].split(",").index("rec")
        first, last = float(rows[1].split(",")[column]), float(rows[-1].split(",")[column])
    return {
        "preset": "tiny-kl-f4 (in/out channels 1)", "data": "Fashion-MNIST train, padded to 32x32",
        "steps": steps, "batch_size": batch_size, "lr": 1e-3,
        "losses": "L1 + 1e-6 KL (no LPIPS: VGG16 weights unavailable; no GAN for this fixed-step run)",
        "seconds_per_step": trainer.seconds_per_step,
        "l1_first_logged": first, "l1_last_logged": last,
        "heldout": {"split": "t10k", "num_images": metrics["num_images"],
                    "psnr_db": metrics["psnr"]["mean"], "psnr_stderr": metrics["psnr"]["stderr"],
                    "ssim": metrics["ssim"]["mean"], "ssim_stderr": metrics["ssim"]["stderr"]},
        "latent_statistics": summary["latent_statistics"],
    }


def _time_fwd_bwd(fn, params, x, repeats_out: list, n: int = 1) -> None:
    for _ in range(n):
        for p in params:
            p.grad = None
        t = time.perf_counter()
        out = fn(x)
        out.float().pow(2).mean().backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        repeats_out.append(time.perf_counter() - t)


def compare_diffusers(size: int, repeats: int, device: str) -> dict:
    try:
        from diffusers import AutoencoderKL
    except ImportError as exc:
        return {"skipped": f"diffusers not installed ({exc})"}
    from ldmkit.autoencoder.model import PRESETS, Autoencoder

    torch.manual_seed(0)
    cfg = PRESETS["kl-f8"]
    ref = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                        layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=size)
    ours = Autoencoder(cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.to(device).train()
    ours.to(device).train()
    x = torch.randn(1, 3, size, size, device=device)
    with torch.no_grad():
        diff = (ref.decode(ref.encode(x).latent_dist.mode()).sample - ours.decode(ours.encode(x).mode())).abs().max()

    def run_ref(inp):
        return ref.decode(ref.encode(inp).latent_dist.mode()).sample

    def run_ours(inp):
        return ours.decode(ours.encode(inp).mode())

    t_ref, t_ours = [], []
    _time_fwd_bwd(run_ref, list(ref.parameters()), x, [])   # warm-up
    _time_fwd_bwd(run_ours, list(ours.parameters()), x, [])
    for _ in range(repeats):  # alternate so load changes hit both sides
        _time_fwd_bwd(run_ref, list(ref.parameters()), x, t_ref)
        _time_fwd_bwd(run_ours, list(ours.parameters()), x, t_ours)
    med_ref, med_ours = statistics.median(t_ref), statistics.median(t_ours)
    return {"model": "kl-f8 (SD VAE shape, 83.7M params), encoder+decoder, random weights",
            "input": [1, 3, size, size], "device": device, "repeats": repeats,
            "max_abs_output_diff": float(diff),
            "ours_fwd_bwd_s_median": med_ours, "diffusers_fwd_bwd_s_median": med_ref,
            "ratio_ours_over_diffusers": med_ours / med_ref,
            "ours_all_s": t_ours, "diffusers_all_s": t_ref}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--eval-images", type=int, default=1000)
    ap.add_argument("--size", type=int, default=64, help="input size of the kl-f8 comparison")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="device of the kl-f8 comparison (the training part always runs on CPU)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"torch": torch.__version__, "python": platform.python_version(),
              "threads": torch.get_num_threads(), "command": " ".join(sys.argv)}
    t = time.perf_counter()
    result["fashion_mnist_tiny_kl_f4"] = train_fashion_mnist(args.steps, args.batch_size, args.eval_images, args.seed)
    result["kl_f8_vs_diffusers"] = compare_diffusers(args.size, args.repeats, args.device)
    result["total_seconds"] = time.perf_counter() - t
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "autoencoder.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
