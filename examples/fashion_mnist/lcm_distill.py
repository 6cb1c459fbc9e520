"""A 1-8 step LCM student of the bundled `fashion-mnist` model (`ldm distill`, no special code).

    python examples/fashion_mnist/lcm_distill.py --latents outputs/fmnist/latents --out outputs/fmnist-lcm

The latent cache is the recipe's (examples/fashion_mnist/recipe.py writes it; `ldm cache-latents --autoencoder
... --data fashion-mnist` makes one). The student reads the guidance scale (a 64-wide input); it distils the
teacher over guidance 1-3 around the teacher's best. `ldm sample --model OUT/model --sampler lcm --steps 4`
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
    p.add_argument("--latents", default="outputs/fmnist/latents")
    p.add_argument("--out", default="outputs/fmnist-lcm")
    p.add_argument("--steps", type=int, default=1000)
    args = p.parse_args(argv)
    resume = ["--resume"] if (Path(args.out) / "checkpoints").is_dir() else []
    return ldm(DISTILL + ["--latents", args.latents, "--out", args.out, "--steps", str(args.steps)] + resume)


if __name__ == "__main__":
    raise SystemExit(main())
