"""Helper for tests/test_distributed.py and tests/test_train_spatial.py: a few LDM steps, then this
rank's weights and losses.

    python -m torch.distributed.run --nproc_per_node 2 tests/_ddp_worker.py AE_DIR PREFIX [inpaint]
    python tests/_ddp_worker.py AE_DIR PREFIX [inpaint]      # the same run in one process

One process runs with twice the gradient accumulation of the two: it then computes the very same
micro-batches as the two ranks do (`LDM.batches`), so the two runs can be compared bit for bit.
``inpaint``: an inpainting LDM (spatial input, masks drawn per step) instead of a text-only one.
"""
import sys

import torch

from ldmkit.data.latents import LatentData
from ldmkit.training import distributed
from ldmkit.training.loop import Trainer
from ldmkit.training.methods.ldm import LDM, LDMConfig


def main(ae_dir: str, prefix: str, variant: str = "") -> None:
    torch.set_num_threads(1)
    ctx = distributed.init("cpu")
    g = torch.Generator().manual_seed(0)
    if variant == "inpaint":
        n, steps, captions = 16, 2, ["a red circle", "a blue square", "a green triangle", "a red square"]
    else:
        n, steps, captions = 32, 3, ["a red circle", "a blue square", "a red circle above a blue square",
                                     "a green triangle"]
    extra = {}
    mean, std = torch.randn(n, 4, 8, 8, generator=g), 0.1 * torch.rand(n, 4, 8, 8, generator=g)
    if variant == "inpaint":
        extra["images"] = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    data = LatentData(mean, std, captions=[captions[i % 4] for i in range(n)], **extra)
    cfg = LDMConfig(autoencoder=ae_dir, out=f"{prefix}-run", preset="tiny", text_encoder="tiny",
                    spatial="inpaint" if variant == "inpaint" else None, steps=steps, batch_size=8, lr=1e-3,
                    grad_accum=2 // ctx.world_size, warmup_steps=0, cond_drop=0.25, progress=False, seed=5,
                    device="cpu")
    method = LDM(cfg, data=data)
    trainer = Trainer(method, ctx)
    batches = method.batches(0)
    losses = [trainer.train_step(next(batches))["loss"] for _ in range(cfg.steps)]
    state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    torch.save({"weights": state, "losses": torch.tensor(losses, dtype=torch.float64),
                "world_size": ctx.world_size}, f"{prefix}-rank{ctx.rank}.pt")
    distributed.shutdown(ctx)


if __name__ == "__main__":
    main(*sys.argv[1:4])
