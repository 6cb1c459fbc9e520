"""A 1-8 step LCM student of the bundled `fashion-mnist` model (`ldm distill`, no special code).

    python examples/fashion_mnist/lcm_distill.py --out outputs/fmnist-lcm

It first encodes the 60,000 training images with the bundled model's own autoencoder (`ldm cache-latents`,
2 min; a cache made with other autoencoder weights is refused), then distils (1,000 steps of batch 64,
11 min on the 2-core CPU). The student reads the guidance scale (a 64-wide input) and is distilled over
guidance 1-3 around the teacher's best (1). `ldm sample --model OUT/model --sampler lcm --steps 4`
samples it; `python benchmarks/frontier.py --model fashion-mnist` puts it on the speed / quality plot.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

DISTILL = ["distill", "--method", "lcm", "--teacher", "fashion-mnist", "--batch-size", "64", "--lr", "1e-4",
           "--lr-schedule", "cosine", "--warmup-steps", "50", "--grad-clip", "1.0", "--distill-guidance", "1", "3",
           "--guidance-input", "64", "--guidance", "2", "--sample-steps", "4", "--checkpoint-every", "500",
           "--sample-every", "1000", "--seed", "0"]


def main(argv=None) -> int:
    from ldmkit.cli import main as ldm

    p = argparse.ArgumentParser(prog="examples/fashion_mnist/lcm_distill.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--latents", default="outputs/fmnist-lcm-latents", help="latent cache (made here when missing)")
    p.add_argument("--out", default="outputs/fmnist-lcm")
    p.add_argument("--steps", type=int, default=1000)
    args = p.parse_args(argv)
    if not (Path(args.latents) / "index.json").is_file():
        from ldmkit.io import resolve_model_path

        code = ldm(["cache-latents", "--autoencoder", str(resolve_model_path("fashion-mnist") / "autoencoder"),
                    "--data", "fashion-mnist", "--out", args.latents])
        if code:
            return code
    resume = ["--resume"] if (Path(args.out) / "checkpoints").is_dir() else []
    return ldm(DISTILL + ["--latents", args.latents, "--out", args.out, "--steps", str(args.steps)] + resume)


if __name__ == "__main__":
    raise SystemExit(main())
