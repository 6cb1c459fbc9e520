"""Training configs: frozen dataclasses whose fields say everything about themselves.

Each field is declared with `option(default, help, ...)`: its help text, its allowed choices or range,
and whether it may change when a run is resumed (`resume=True`: bookkeeping such as the step count
or the checkpoint interval; everything else would make the resumed run differ from an uninterrupted
one). From that one declaration come

* the `ldm` flags (`add_flags`: `--field-name`, typed from the annotation, help and choices shown),
* the checks of every value, from the command line or a JSON file (`check`: type, range, choices),
* the `--resume` rule (`resume_changes`).

`TrainConfig` is the loop's vocabulary, shared by every method; a method's config subclasses it and
adds its own fields (`methods/ldm.py`, `methods/autoencoder.py`), so both stages use the same names
for the same things.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldmkit.errors import UserError


def option(default: Any, help: str, *, choices: tuple | None = None, lo: float | None = None,
           hi: float | None = None, lo_open: bool = False, resume: bool = False, flag: str | None = None):
    """A config field: `default`, the flag's `help`, allowed `choices` or range [`lo`, `hi`] (`lo_open`:
    (lo, hi]), and whether it may change on `--resume`. `flag` overrides the flag's name."""
    meta = {"help": help, "choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open, "resume": resume, "flag": flag}
    if isinstance(default, (list, dict, set)):
        raise TypeError("config defaults must be immutable (use a tuple)")
    return field(default=default, metadata=meta)


def _kind(annotation) -> tuple[type, bool, int | None]:
    """(element type, optional, tuple length) of a field annotation such as `int`, `str | None`,
    `tuple[float, float]` (length 2) or `tuple[str, ...]` (length -1: any); length None: no tuple."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    if optional:
        annotation = next(a for a in args if a is not type(None))
    if typing.get_origin(annotation) is tuple:
        inner = typing.get_args(annotation)
        if not inner or Ellipsis in inner:
            return (inner[0] if inner else str), optional, -1
        return inner[0], optional, len(inner)
    return annotation, optional, None


def fields_of(cls) -> dict[str, tuple[dataclasses.Field, Any]]:
    """{name: (field, resolved annotation)} of a config class, in declaration order."""
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


# ----------------------------------------------------------------------------- checking values
def _check_one(name: str, value, typ: type, meta: dict) -> None:
    what = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}.get(typ, typ.__name__)
    ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
          str: lambda v: isinstance(v, str),
          bool: lambda v: isinstance(v, bool)}[typ](value)
    if not ok:
        raise UserError(f"{name}={value!r} must be {what}")
    if meta["choices"] is not None and value not in meta["choices"]:
        raise UserError(f"{name}={value!r} must be one of {list(c for c in meta['choices'] if c is not None)}")
    lo, hi = meta["lo"], meta["hi"]
    if lo is not None and (value <= lo if meta["lo_open"] else value < lo) or hi is not None and value > hi:
        rng = f"{'(' if meta['lo_open'] else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise UserError(f"{name}={value!r} is outside the allowed range {rng}")


def check(config) -> None:
    """Every field of `config` against its annotation, choices and range (one-line UserError naming it)."""
    for name, (f, annotation) in fields_of(type(config)).items():
        value = getattr(config, name)
        typ, optional, length = _kind(annotation)
        if value is None:
            if not optional:
                raise UserError(f"{name} must be set (got null)")
            continue
        if length is None:
            _check_one(name, value, typ, f.metadata)
            continue
        if not isinstance(value, tuple):
            raise UserError(f"{name}={value!r} must be a list")
        if length > 0 and len(value) != length:
            raise UserError(f"{name}={list(value)!r} must hold {length} values")
        for v in value:
            _check_one(name, v, typ, f.metadata)


def from_dict(cls, data, where: str = "config"):
    """Build `cls` from a JSON object: unknown keys, wrong types and out-of-range values are refused
    by name; lists become tuples."""
    if not isinstance(data, dict):
        raise UserError(f"{where} must hold a JSON object of settings, got {type(data).__name__}")
    known = fields_of(cls)
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise UserError(f"{where} has unknown settings {unknown}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    for k, v in values.items():  # JSON has one number type: a whole float is fine for an int field
        typ, _, length = _kind(known[k][1])
        if typ is int and length is None and isinstance(v, float) and v.is_integer():
            values[k] = int(v)
    config = cls(**values)
    check(config)
    return config


def to_dict(config) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def read_config_file(path: str | Path, cls) -> dict:
    """Settings from a JSON file: a run's config.json (its "config" object) or a plain object of fields."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"--config: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UserError(f"--config: {path} is not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"--config: {path} is not valid JSON: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict) and "method" in data:
        data = data["config"]
    if not isinstance(data, dict):
        raise UserError(f"--config: {path} must hold a JSON object of settings, got {type(data).__name__}")
    unknown = sorted(set(data) - set(fields_of(cls)))
    if unknown:
        raise UserError(f"--config: {path} has unknown settings {unknown}")
    return data


def resume_changes(saved, given: dict) -> list[str]:
    """Fields in `given` that differ from the `saved` run's and may not change on resume."""
    known = fields_of(type(saved))
    return sorted(k for k, v in given.items()
                  if k in known and not known[k][0].metadata["resume"] and getattr(saved, k) != v)


# ----------------------------------------------------------------------------- flags
def _flag(name: str, f) -> str:
    return "--" + (f.metadata.get("flag") or name.replace("_", "-"))


def add_flags(parser: argparse.ArgumentParser, cls, title: str | None = None) -> None:
    """One flag per field of `cls`, typed from its annotation; unset flags are absent from the
    namespace (so `given` can tell them from defaults)."""
    group = parser.add_argument_group(title) if title else parser
    for name, (f, annotation) in fields_of(cls).items():
        typ, optional, length = _kind(annotation)
        meta = f.metadata
        text = meta["help"].replace("%", "%%")
        if "default" not in text and not (f.default == "" and "required" in text):
            text += f" (default: {_show(f.default)})"
        kw: dict[str, Any] = dict(dest=name, default=argparse.SUPPRESS, help=text)
        if typ is bool and length is None:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = {int: _int, float: _float, str: str}[typ]
            if meta["choices"] is not None:
                kw["choices"] = [c for c in meta["choices"] if c is not None]
            else:
                kw["metavar"] = {int: "N", float: "X", str: "TEXT"}[typ]
            if length is not None:
                kw["nargs"] = "+" if length < 0 else length
        group.add_argument(_flag(name, f), **kw)


def _show(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return " ".join(map(str, value)) or "none"
    return str(value)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def given(args: argparse.Namespace, cls) -> dict:
    """The fields of `cls` the command line set, as config values (lists become tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in fields_of(cls)}


# ----------------------------------------------------------------------------- the loop's vocabulary
PRECISIONS = ("no", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine")
STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class TrainConfig:
    """What the training loop itself needs; every method's config extends it."""

    out: str = option("", "run folder: config.json, checkpoints/, samples/, loss.csv, loss.png, the final "
                      "model (required)", resume=True)
    steps: int = option(1000, "optimiser steps in all (a resumed run continues to this)", lo=1, resume=True)
    batch_size: int = option(32, "global batch per optimiser step (all processes, all accumulation micro-steps)",
                             lo=1)
    grad_accum: int = option(1, "micro-steps accumulated into one optimiser step", lo=1)
    lr: float = option(1e-4, "peak learning rate of AdamW", lo=0, lo_open=True)
    lr_schedule: str = option("cosine", "after warm-up: constant, or cosine to 0 at the last step",
                              choices=LR_SCHEDULES)
    warmup_steps: int = option(100, "linear learning-rate warm-up steps", lo=0)
    weight_decay: float = option(0.01, "AdamW weight decay (not on norms, biases and embeddings)", lo=0)
    adam_betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas", lo=0, hi=1)
    grad_clip: float = option(1.0, "max gradient norm (0 disables clipping)", lo=0)
    ema_decay: float = option(0.999, "EMA decay of the trained weights, which are exported (0 disables the EMA)",
                              lo=0, hi=0.999999)
    ema_warmup: bool = option(True, "ramp the EMA decay as min(decay, (1+n)/(10+n)) over the first updates")
    precision: str = option("no", "autocast: no, bf16, or fp16 (CUDA; with a gradient scaler)",
                            choices=PRECISIONS)
    compile: bool = option(False, "torch.compile the network", resume=True)
    seed: int = option(0, "seed of every random draw (weights, data order, noise)", lo=0)
    max_bad_steps: int = option(10, "consecutive NaN/inf steps tolerated before the run stops", lo=1, resume=True)
    checkpoint_every: int = option(500, "steps between checkpoints (one is always written at the end)", lo=1,
                                   resume=True)
    keep_checkpoints: int = option(2, "newest checkpoints kept", lo=1, resume=True)
    sample_every: int = option(500, "steps between sample grids (one is always made at the end)", lo=1,
                               resume=True)
    log_every: int = option(10, "steps between progress-bar updates of the loss", lo=1, resume=True)
    init_from: str | None = option(None, "start from these weights with a fresh optimiser, LR schedule and step "
                                   "count: another run's checkpoint (.pt), or a model to fine-tune (an ldmkit or "
                                   "diffusers folder, an original single file, a bundled name)")
    device: str | None = option(None, "cpu, cuda or cuda:N (default: cuda when available)", resume=True)
    strategy: str = option("ddp", "data parallelism under torchrun: ddp, or fsdp (sharded weights)",
                           choices=STRATEGIES, resume=True)
    threads: int | None = option(None, "torch CPU threads (default: torch's choice)", lo=1, resume=True)
    progress: bool = option(True, "show a progress bar", resume=True)
