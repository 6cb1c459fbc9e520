"""Pieces of the training loop that are not the loop: the EMA of the trained weights, training-state
files with exact RNG restore, and the loss log with its curve."""
from __future__ import annotations

import contextlib
import csv
import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ldmkit.errors import UserError
from ldmkit.io.files import atomic_write
from ldmkit.util import unwrap


class EMA:
    """Exponential moving average of a module's trainable parameters.

    The shadow copies live beside the parameters they average (whatever the parameters hold: whole
    tensors, or this rank's shards under FSDP), so frozen parts (a pretrained text encoder, a
    base model under LoRA) cost nothing and an FSDP run averages its shards without communication.
    `swapped()` puts the averages into the module for a block (sample grids, export, checkpoints)
    and restores the training weights afterwards. With `warmup` the decay ramps as
    min(decay, (1 + n) / (10 + n)), so early averages are not dominated by the initialisation.
    """

    def __init__(self, module: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay={decay}; must be in [0, 1)")
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        named = [(n, p) for n, p in unwrap(module).named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        with torch.no_grad():
            self.shadow = [p.detach().clone() for p in self.params]

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self) -> None:
        if self.shadow:  # one multi-tensor kernel instead of a lerp per tensor
            torch._foreach_lerp_(self.shadow, [p.detach().to(s.dtype) for s, p in zip(self.shadow, self.params)],
                                 1.0 - self.current_decay())
        self.num_updates += 1

    @contextlib.contextmanager
    def swapped(self):
        """The module holds the averaged weights inside the block."""
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.params]
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    @torch.no_grad()
    def take_from_module(self) -> None:
        """Shadows := the module's current parameters (after loading averaged weights into it)."""
        for s, p in zip(self.shadow, self.params):
            s.copy_(p)

    def settings(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates}


# ----------------------------------------------------------------------------- seeds and RNG
def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every global RNG's state in a form torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[2] if random.getstate()[2] is not None else -1],
        "python_version": random.getstate()[0],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    gauss = py[-1]
    random.setstate((state["python_version"], tuple(int(v) for v in py[:-1]), None if gauss == -1 else gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- training state files
def save_training_state(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """torch.save a dict of tensors / plain values atomically (temp file, fsync, rename)."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_training_state(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """A training-state file, read with weights_only=True (no arbitrary unpickling)."""
    from ldmkit.io.files import load_torch_file

    state = load_torch_file(path, "training state", map_location)
    if not isinstance(state, dict):
        raise UserError(f"training state {path} holds a {type(state).__name__}, not a checkpoint")
    return state


def latest_checkpoint(folder: str | os.PathLike, pattern: str = "step-*.pt") -> Path | None:
    """The checkpoint with the highest step number in `folder` (files named step-<N>.pt)."""
    best, best_step = None, -1
    for p in Path(folder).glob(pattern):
        try:
            step = int(p.stem.split("-")[-1])
        except ValueError:
            continue
        if step > best_step:
            best, best_step = p, step
    return best


def prune_checkpoints(folder: str | os.PathLike, keep: int, pattern: str = "step-*.pt") -> None:
    """Keep the `keep` newest step-<N>.pt files."""
    if keep <= 0:
        return
    files = sorted(Path(folder).glob(pattern), key=lambda p: int(p.stem.split("-")[-1]) if p.stem.split("-")[-1].isdigit() else -1)
    for p in files[:-keep]:
        p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- loss log
class LossLog:
    """Append-only CSV of (step, named values) plus a PNG of the curves.

    On resume, rows after the resumed step are dropped so the log matches the
    weights being continued.
    """

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None):
        self.path = Path(path)
        self.rows: list[dict[str, float]] = []
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                for row in csv.DictReader(f):
                    if int(float(row["step"])) <= resume_step:
                        self.rows.append({k: float(v) for k, v in row.items() if v not in ("", None)})
        self._rewrite()

    def _columns(self) -> list[str]:
        cols: list[str] = ["step"]
        for row in self.rows:
            cols += [k for k in row if k not in cols]
        return cols

    def _rewrite(self) -> None:
        cols = self._columns()

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=cols)
                w.writeheader()
                w.writerows(self.rows)

        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, write)

    def append(self, step: int, **values: float) -> None:
        row = {"step": float(step), **{k: float(v) for k, v in values.items()}}
        new_columns = any(k not in self._columns() for k in row)
        self.rows.append(row)
        if new_columns or not self.path.is_file():
            self._rewrite()
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self._columns()).writerow(row)

    def plot(self, path: str | os.PathLike, title: str = "training loss", smoothing: float = 0.9,
             keys: tuple | None = None) -> Path | None:
        """Raw values faint, exponentially smoothed values bold; log y axis where all values are positive.
        `keys`: the columns drawn (default: all but learning rates, gradient norms and skip marks)."""
        if not self.rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        wanted = keys
        keys = [k for k in self._columns() if k != "step" and (k in wanted if wanted is not None else
                                                               not k.startswith(("lr", "grad_norm", "skipped")))]
        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
        positive = True
        for key in keys:
            pts = [(r["step"], r[key]) for r in self.rows if key in r and math.isfinite(r[key])]
            if not pts:
                continue
            steps, vals = zip(*pts)
            positive &= min(vals) > 0
            smooth, acc = [], vals[0]
            for v in vals:
                acc = smoothing * acc + (1 - smoothing) * v
                smooth.append(acc)
            line, = ax.plot(steps, vals, alpha=0.25, linewidth=0.8)
            ax.plot(steps, smooth, color=line.get_color(), linewidth=1.6, label=key)
        if positive:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        buf_path = Path(path)

        def write(tmp: str) -> None:
            fig.savefig(tmp, format="png")

        atomic_write(buf_path, write)
        plt.close(fig)
        return buf_path
