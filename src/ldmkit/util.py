"""Small helpers every package uses, each written once: hashes, dtype names, unwrapping a
trained module, progress bars."""
from __future__ import annotations

import hashlib
import os
from typing import Iterable

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """"float16" / "fp16" / "bf16" ... -> torch dtype (None and dtypes pass through)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes (A1111's model hash is the first 10 hex digits of it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-d too (BN counters)
    return h.hexdigest()


def weights_sha256(module: nn.Module) -> str:
    """`tensors_sha256` of a module's state dict."""
    return tensors_sha256(module.state_dict())


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / FSDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ == "FullyShardedDataParallel":
            model = model.module
        else:
            return model


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str = "", initial: int = 0,
             disable: bool = False, unit: str = "it", leave: bool = True):
    """A tqdm bar (rate and ETA shown), silent when `disable` (non-zero ranks, --no-progress)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, initial=initial, disable=disable, unit=unit, leave=leave,
                dynamic_ncols=True, smoothing=0.1)
