"""Helper for tests/test_distributed.py: the LDM trainer with strategy="fsdp" on CPU / gloo.

    python -m torch.distributed.run --nproc_per_node 2 tests/_fsdp_worker.py steps  AE_DIR PREFIX
    python -m torch.distributed.run --nproc_per_node 2 tests/_fsdp_worker.py resume AE_DIR PREFIX
    python -m torch.distributed.run --nproc_per_node 2 tests/_fsdp_worker.py steps AE_DIR PREFIX ddp compile

`steps`: 3 optimiser steps, then the full (gathered) weights and EMA weights, the losses and how many
numbers this rank's EMA holds (optionally with
another strategy and/or `compile=True`).
`resume`: run A trains 4 steps with a checkpoint every 2 (`run()`, as `ldm train` does); run B
starts fresh and resumes from A's step-2 checkpoint to step 4; run C resumes the same checkpoint
under DDP; run D is a new run initialised from that checkpoint (`init_from`). Writes the runs' final
gathered weights (D's at its start) and the training-state files this rank wrote.
Output: PREFIX-rankR.pt per rank.
"""
import sys

import torch

from ldmkit.training import common, distributed
from ldmkit.training.ldm import LatentData, LDMTrainer, TrainConfig


def make_data() -> LatentData:
    g = torch.Generator().manual_seed(0)
    captions = ["a red circle", "a blue square", "a red circle above a blue square", "a green triangle"]
    return LatentData(torch.randn(32, 4, 8, 8, generator=g), 0.1 * torch.rand(32, 4, 8, 8, generator=g),
                      captions=[captions[i % 4] for i in range(32)])


def make_config(ae_dir: str, out: str, **kw) -> TrainConfig:
    base = dict(latents="memory", autoencoder=ae_dir, out=out, preset="tiny", text_encoder="tiny", steps=3,
                batch_size=8, lr=1e-3, warmup_steps=0, cond_drop=0.25, progress=False, seed=5, device="cpu",
                strategy="fsdp", sample_steps=2, sample_seeds=(0,), ema_decay=0.9)
    base.update(kw)
    return TrainConfig(**base)


def full_weights(trainer: LDMTrainer) -> dict:
    return {k: v.detach().clone() for k, v in distributed.full_state_dict(trainer.wrapped, trainer.ctx).items()}


def steps(ctx, ae_dir: str, prefix: str, strategy: str = "fsdp", compile: str = "") -> dict:
    cfg = make_config(ae_dir, prefix + "-steps", strategy=strategy, compile=compile == "compile")
    trainer = LDMTrainer(cfg, ctx, data=make_data())
    losses = [trainer.train_step()["loss"] for _ in range(trainer.config.steps)]
    blocks = tuple(distributed.fsdp_block_classes())
    sharded_ema = isinstance(trainer.ema, distributed.ShardedEMA)
    return {"weights": full_weights(trainer), "losses": torch.tensor(losses),
            "ema": {k: v.clone() for k, v in trainer.ema.state_dict()["weights"].items()},
            "ema_numel": sum(t.numel() for t in trainer.ema.shadow) if sharded_ema else -1,
            "sharded": distributed.is_sharded(trainer.wrapped),
            "fsdp_units": sum(type(m).__name__ == "FullyShardedDataParallel" for m in trainer.wrapped.modules()),
            "blocks": sum(isinstance(m, blocks) for m in trainer.wrapped.modules())}


def resume(ctx, ae_dir: str, prefix: str) -> dict:
    writes = []
    save = common.save_training_state

    def counting_save(path, state):  # the trainer imports it from common at call time
        writes.append(str(path))
        return save(path, state)

    common.save_training_state = counting_save
    try:
        a = LDMTrainer(make_config(ae_dir, prefix + "-a", steps=4, checkpoint_every=2), ctx, data=make_data())
        a.run()
        b = LDMTrainer(make_config(ae_dir, prefix + "-b", steps=4, checkpoint_every=2), ctx, data=make_data())
        b.run(resume=f"{prefix}-a/checkpoints/step-2.pt")
        # run C: the same FSDP checkpoint resumed under DDP (named -> numbered optimiser state)
        cfg = make_config(ae_dir, prefix + "-c", steps=4, checkpoint_every=2, strategy="ddp")
        c = LDMTrainer(cfg, ctx, data=make_data())
        c.load_checkpoint(f"{prefix}-a/checkpoints/step-2.pt")
        while c.step < cfg.steps:
            c.train_step()
        # run D: a new FSDP run that starts from A's step-2 weights and EMA (--init-from)
        d = LDMTrainer(make_config(ae_dir, prefix + "-d", init_from=f"{prefix}-a/checkpoints/step-2.pt"), ctx,
                       data=make_data())
        d_start = {"model": full_weights(d), "ema": d.ema.state_dict()}
    finally:
        common.save_training_state = save
    return {"a": full_weights(a), "b": full_weights(b), "c": full_weights(c), "writes": writes, "b_step": b.step,
            "d_start": d_start,
            "ema_a": {k: v.clone() for k, v in a.ema.module.state_dict().items()},
            "ema_b": {k: v.clone() for k, v in b.ema.module.state_dict().items()}}


def main(mode: str, ae_dir: str, prefix: str, *options: str) -> None:
    torch.set_num_threads(1)
    ctx = distributed.init("cpu")
    out = {"steps": steps, "resume": resume}[mode](ctx, ae_dir, prefix, *options)
    out["world_size"] = ctx.world_size
    torch.save(out, f"{prefix}-rank{ctx.rank}.pt")
    distributed.shutdown(ctx)


if __name__ == "__main__":
    main(*sys.argv[1:])
