"""Helper for tests/test_distributed.py: the LDM method with strategy="fsdp" on CPU / gloo.

    python -m torch.distributed.run --nproc_per_node 2 tests/_fsdp_worker.py steps  AE_DIR PREFIX
    python -m torch.distributed.run --nproc_per_node 2 tests/_fsdp_worker.py resume AE_DIR PREFIX
    python -m torch.distributed.run --nproc_per_node 2 tests/_fsdp_worker.py steps AE_DIR PREFIX ddp compile

`steps`: 3 optimiser steps, then the full (gathered) weights and EMA weights, the losses and how many
numbers this rank's EMA holds (optionally with another strategy and/or `compile=True`).
`resume`: run A trains 4 steps with a checkpoint every 2 (`run()`, as `ldm train` does); run B
resumes from A's step-2 checkpoint to step 4; run C resumes the same checkpoint under DDP; run D is a
new run initialised from that checkpoint (`init_from`). Writes the runs' final gathered weights (D's
at its start) and the training-state files this rank wrote.
Output: PREFIX-rankR.pt per rank.
"""
import sys

import torch

from ldmkit.data.latents import LatentData
from ldmkit.training import common, distributed
from ldmkit.training.loop import Trainer
from ldmkit.training.methods.ldm import LDM, LDMConfig


def make_data() -> LatentData:
    g = torch.Generator().manual_seed(0)
    captions = ["a red circle", "a blue square", "a red circle above a blue square", "a green triangle"]
    return LatentData(torch.randn(32, 4, 8, 8, generator=g), 0.1 * torch.rand(32, 4, 8, 8, generator=g),
                      captions=[captions[i % 4] for i in range(32)])


def make_config(ae_dir: str, out: str, **kw) -> LDMConfig:
    # grad_clip: large enough never to clip (FSDP computes the norm from the shards in another order)
    base = dict(autoencoder=ae_dir, out=out, preset="tiny", text_encoder="tiny", steps=3, batch_size=8, lr=1e-3,
                warmup_steps=0, cond_drop=0.25, progress=False, seed=5, device="cpu", strategy="fsdp",
                sample_steps=2, sample_seeds=(0,), ema_decay=0.9, grad_clip=1e6)
    base.update(kw)
    return LDMConfig(**base)


def full_weights(trainer: Trainer) -> dict:
    return {k: v.detach().clone() for k, v in distributed.full_state_dict(trainer.wrapped, trainer.ctx).items()}


def full_ema(trainer: Trainer) -> dict:
    with trainer.ema.swapped():
        return {k: v for k, v in full_weights(trainer).items() if k in trainer.trained}


def steps(ctx, ae_dir: str, prefix: str, strategy: str = "fsdp", compile: str = "") -> dict:
    method = LDM(make_config(ae_dir, prefix + "-steps", strategy=strategy, compile=compile == "compile"),
                 data=make_data())
    trainer = Trainer(method, ctx)
    batches = method.batches(0)
    losses = [trainer.train_step(next(batches))["loss"] for _ in range(trainer.config.steps)]
    blocks = tuple(distributed.fsdp_block_classes())
    return {"weights": full_weights(trainer), "losses": torch.tensor(losses, dtype=torch.float64),
            "ema": full_ema(trainer), "ema_numel": sum(t.numel() for t in trainer.ema.shadow),
            "sharded": distributed.is_sharded(trainer.wrapped),
            "fsdp_units": sum(type(m).__name__ == "FullyShardedDataParallel" for m in trainer.wrapped.modules()),
            "blocks": sum(isinstance(m, blocks) for m in trainer.wrapped.modules())}


def resume(ctx, ae_dir: str, prefix: str) -> dict:
    writes = []
    save = common.save_training_state

    def counting_save(path, state):  # the loop calls it through the module at call time
        writes.append(str(path))
        return save(path, state)

    common.save_training_state = counting_save
    step2 = f"{prefix}-a/checkpoints/step-2.pt"
    try:
        a = Trainer(LDM(make_config(ae_dir, prefix + "-a", steps=4, checkpoint_every=2), data=make_data()), ctx)
        a.run()
        b = Trainer(LDM(make_config(ae_dir, prefix + "-b", steps=4, checkpoint_every=2), data=make_data()), ctx,
                    resume=step2)
        b.run()
        # run C: the same FSDP checkpoint resumed under DDP (named -> numbered optimiser state)
        c = Trainer(LDM(make_config(ae_dir, prefix + "-c", steps=4, checkpoint_every=2, strategy="ddp"),
                        data=make_data()), ctx, resume=step2)
        c.run()
        # run D: a new FSDP run that starts from A's step-2 averaged weights (--init-from)
        d = Trainer(LDM(make_config(ae_dir, prefix + "-d", init_from=step2), data=make_data()), ctx)
        d_start = {"model": full_weights(d), "ema": full_ema(d)}
    finally:
        common.save_training_state = save
    return {"a": full_weights(a), "b": full_weights(b), "c": full_weights(c), "writes": writes, "b_step": b.step,
            "d_start": d_start, "ema_a": full_ema(a), "ema_b": full_ema(b)}


def main(mode: str, ae_dir: str, prefix: str, *options: str) -> None:
    torch.set_num_threads(1)
    ctx = distributed.init("cpu")
    out = {"steps": steps, "resume": resume}[mode](ctx, ae_dir, prefix, *options)
    out["world_size"] = ctx.world_size
    torch.save(out, f"{prefix}-rank{ctx.rank}.pt")
    distributed.shutdown(ctx)


if __name__ == "__main__":
    main(*sys.argv[1:])
