"""Multi-process training through torch.distributed, launched by `torchrun`.

The trainer runs unchanged as one process or under
`torchrun --nproc_per_node N`: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK and
the rendezvous variables, `init()` reads them and joins the process group
(gloo on CPU, nccl on CUDA). Models are wrapped in DistributedDataParallel, or
in FullyShardedDataParallel (`strategy="fsdp"`) when a model does not fit on
one GPU. Only rank 0 writes checkpoints, logs and images (`DistContext.is_main`).
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("ddp", "fsdp")


@dataclass
class DistContext:
    """Where this process sits in the job (world_size 1 for a plain run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: no process group (single process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of a tensor over all ranks (identity for a single process)."""
        if not self.distributed:
            return value
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world_size

    def all_reduce_max(self, value: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return value
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return value

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: str | None = None, backend: str | None = None, timeout_s: float = 1800.0) -> DistContext:
    """Join the process group when launched by torchrun; otherwise a 1-process context.

    `device`: "cpu", "cuda" or None (CUDA when available). Under torchrun with
    CUDA each process takes GPU LOCAL_RANK. `backend` defaults to nccl on CUDA
    and gloo on CPU.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device {device!r} is not supported; use 'cpu', 'cuda' or 'cuda:N'")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if not launched_by_torchrun():
        return DistContext(device=torch.device(device))
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        backend = backend or "nccl"
    else:
        dev = torch.device("cpu")
        backend = backend or "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext(rank=rank, world_size=world, local_rank=local, device=dev, backend=backend)


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, ctx: DistContext, strategy: str = "ddp") -> nn.Module:
    """Wrap `model` for data-parallel training (no-op for one process)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed strategy {strategy!r} is not one of {STRATEGIES}")
    if not ctx.distributed:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        kwargs = {"device_id": ctx.device} if ctx.device.type == "cuda" else {}
        return FSDP(model, use_orig_params=True, **kwargs)
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # find_unused_parameters: conditioners may not use every parameter (e.g. a null
    # embedding only reached through condition dropout).
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP / FSDP / torch.compile wrapper."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif type(model).__name__ == "FullyShardedDataParallel":
            model = model.module
        else:
            return model


def no_sync(model: nn.Module, active: bool):
    """Skip the gradient all-reduce on accumulation micro-steps (DDP and FSDP)."""
    if active and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def full_state_dict(model: nn.Module, ctx: DistContext) -> dict[str, torch.Tensor]:
    """The unsharded state dict of the plain module (gathered to rank 0 under FSDP)."""
    inner = model._orig_mod if hasattr(model, "_orig_mod") else model
    if type(inner).__name__ == "FullyShardedDataParallel":
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        cfg = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
        with FSDP.state_dict_type(inner, StateDictType.FULL_STATE_DICT, cfg):
            return inner.state_dict()
    return unwrap(model).state_dict()


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    inner = model._orig_mod if hasattr(model, "_orig_mod") else model
    if type(inner).__name__ == "FullyShardedDataParallel":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP.optim_state_dict(inner, optimizer)
    return optimizer.state_dict()


def load_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    inner = model._orig_mod if hasattr(model, "_orig_mod") else model
    if type(inner).__name__ == "FullyShardedDataParallel":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        state = FSDP.optim_state_dict_to_load(inner, optimizer, state)
    optimizer.load_state_dict(state)
