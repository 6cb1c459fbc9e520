"""Multi-process training through torch.distributed, launched by `torchrun`.

The trainer runs unchanged as one process or under
`torchrun --nproc_per_node N`: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK and
the rendezvous variables, `init()` reads them and joins the process group
(gloo on CPU, nccl on CUDA). Models are wrapped in DistributedDataParallel, or
in FullyShardedDataParallel (`strategy="fsdp"`) when a model does not fit on
one GPU. Only rank 0 writes checkpoints, logs and images (`DistContext.is_main`).

FSDP notes (torch 2.13, FSDP1 with `use_orig_params=True`):
* FSDP refuses a CPU-only process unless `device_id` names the CPU explicitly
  ("FSDP needs a non-CPU accelerator device, but no accelerator device is
  detected"), so `wrap` always passes `device_id=ctx.device`; that is what lets
  the 2-process gloo test run it on CPU.
* After wrapping, the original Parameter objects stay the optimiser's
  parameters but hold this rank's flat shard (1-D, often empty): anything that
  looks at shapes (weight-decay groups) must be decided before `wrap`, and
  anything that needs the whole tensors (export, sample grids) goes through
  `full_state_dict`. The EMA (`training.common.EMA`) averages whatever the
  parameters hold, so under FSDP it averages the shards in place and is
  gathered only when it is read.
* Checkpoints use torch.distributed.checkpoint.state_dict with
  full_state_dict=True: unsharded model weights under the plain module's names
  and an optimiser state keyed by parameter name. CPU offload of the gathered
  state (rank 0 only) is used on CUDA; on CPU it crashes the gloo ranks in this
  torch version and is pointless anyway, so every rank gathers the full dict.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ldmkit.util import unwrap

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


def wrap(model: nn.Module, ctx: DistContext, strategy: str = "ddp", per_block: bool = True,
         find_unused: bool = True) -> nn.Module:
    """Wrap `model` for data-parallel training (no-op for one process). Under FSDP with `per_block`
    every block of `fsdp_block_classes` is a unit of its own inside the root unit. Under DDP
    `find_unused` is DDP's find_unused_parameters: needed when a step may not reach every trainable
    parameter (without it the next step fails), at the cost of a walk of the autograd graph per step;
    the Trainer probes its model to decide (`Trainer._unused_parameters`)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed strategy {strategy!r} is not one of {STRATEGIES}")
    if not ctx.distributed:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        policy = ModuleWrapPolicy(fsdp_block_classes()) if per_block else None
        # device_id also on CPU: without it FSDP looks for an accelerator and refuses to run
        return FSDP(model, use_orig_params=True, device_id=ctx.device, auto_wrap_policy=policy)
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


def fsdp_block_classes() -> set[type[nn.Module]]:
    """The blocks FSDP shards as units of their own: each gathers its weights for its own forward
    and backward only, so a training step holds about one block's full weights at a time beside the
    shards."""
    from ldmkit.denoisers.dit import DiTBlock
    from ldmkit.nn.blocks import ResnetBlock2D
    from ldmkit.nn.transformer import Transformer2D

    return {ResnetBlock2D, Transformer2D, DiTBlock}


def no_sync(model: nn.Module, active: bool):
    """Skip the gradient all-reduce on accumulation micro-steps (DDP and FSDP)."""
    if active and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def _fsdp(model: nn.Module) -> nn.Module | None:
    """The FullyShardedDataParallel root under an optional torch.compile wrapper, or None."""
    inner = model._orig_mod if hasattr(model, "_orig_mod") else model
    return inner if type(inner).__name__ == "FullyShardedDataParallel" else None


def is_sharded(model: nn.Module) -> bool:
    return _fsdp(model) is not None


def _options(model: nn.Module):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    return StateDictOptions(full_state_dict=True, cpu_offload=not on_cpu)


def full_state_dict(model: nn.Module, ctx: DistContext) -> dict[str, torch.Tensor]:
    """The unsharded state dict of the plain module, under its own names (no `module.`,
    `_orig_mod.` or FSDP prefixes). Collective under FSDP: every rank must call it; on CUDA
    only rank 0 receives the tensors (offloaded to CPU), other ranks get an empty dict."""
    fsdp = _fsdp(model)
    if fsdp is not None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(fsdp, options=_options(fsdp))
    return unwrap(model).state_dict()


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load a `full_state_dict` into `model` (each FSDP rank keeps its shard of it); `strict=False`
    loads a part of the weights (e.g. only the trained ones) and leaves the rest as they are."""
    fsdp = _fsdp(model)
    if fsdp is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(fsdp, state, options=StateDictOptions(full_state_dict=True, strict=strict))
        return
    unwrap(model).load_state_dict(state, strict=strict)


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimiser state to checkpoint: `optimizer.state_dict()`, or under FSDP the
    unsharded state keyed by parameter name (collective: every rank must call it)."""
    fsdp = _fsdp(model)
    if fsdp is not None:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(fsdp, optimizer, options=_options(fsdp))
    return optimizer.state_dict()


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimiser's parameters in the order optimizer.state_dict() numbers them."""
    name_of = {id(p): n for n, p in unwrap(model).named_parameters()}
    return [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _renumber(state: dict, key_of) -> dict:
    return {"state": {key_of(k): v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [key_of(k) for k in g["params"]]} for g in state["param_groups"]]}


def load_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a state from `optimizer_state_dict`, whichever strategy wrote it: a DDP /
    single-process state (numbered parameters) and an FSDP state (named parameters) are
    converted into each other through the parameter order of the optimiser's groups, which
    the trainer builds the same way under every strategy."""
    names = _param_names(model, optimizer)
    by_name = any(isinstance(p, str) for g in state.get("param_groups", []) for p in g.get("params", []))
    fsdp = _fsdp(model)
    if fsdp is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if not by_name:
            state = _renumber(state, lambda i: names[i])
        set_optimizer_state_dict(fsdp, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    if by_name:
        index = {n: i for i, n in enumerate(names)}
        unknown = sorted({k for g in state["param_groups"] for k in g["params"]} - set(index))
        if unknown:
            raise ValueError(f"the checkpoint's optimiser state names parameters this model does not have: "
                             f"{unknown[:5]}")
        state = _renumber(state, lambda n: index[n])
    optimizer.load_state_dict(state)


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` whose parameters live on the meta device (shapes only, no memory);
    buffers are copied as they are (FSDP does not shard them, and the non-persistent ones are in no
    state dict to fill them from)."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in module.parameters()}
    memo.update({id(b): b.detach().clone() for b in module.buffers()})
    return copy.deepcopy(module, memo)
