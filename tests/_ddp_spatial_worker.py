"""Helper for tests/test_train_spatial.py: a few inpainting-LDM steps, then this rank's weights and losses.

    python -m torch.distributed.run --nproc_per_node 2 tests/_ddp_spatial_worker.py AE_DIR OUT_FILE_PREFIX
    python tests/_ddp_spatial_worker.py AE_DIR OUT_FILE_PREFIX          # the same run in one process
"""
import sys

import torch

from ldmkit.training import distributed
from ldmkit.training.ldm import LatentData, LDMTrainer, TrainConfig


def main(ae_dir: str, prefix: str) -> None:
    torch.set_num_threads(1)
    ctx = distributed.init("cpu")
    g = torch.Generator().manual_seed(0)
    captions = ["a red circle", "a blue square", "a green triangle", "a red square"]
    data = LatentData(torch.randn(16, 4, 8, 8, generator=g), 0.1 * torch.rand(16, 4, 8, 8, generator=g),
                      captions=[captions[i % 4] for i in range(16)],
                      images=torch.randint(0, 256, (16, 3, 32, 32), generator=g, dtype=torch.uint8))
    cfg = TrainConfig(latents="memory", autoencoder=ae_dir, out=prefix + "-run", preset="tiny", text_encoder="tiny",
                      spatial="inpaint", steps=2, batch_size=8, lr=1e-3, warmup_steps=0, cond_drop=0.25,
                      progress=False, seed=5, device="cpu")
    trainer = LDMTrainer(cfg, ctx, data=data)
    losses = [trainer.train_step()["loss"] for _ in range(cfg.steps)]
    state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    torch.save({"weights": state, "losses": torch.tensor(losses), "world_size": ctx.world_size},
               f"{prefix}-rank{ctx.rank}.pt")
    distributed.shutdown(ctx)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
