"""The one training loop. A *method* (`training/methods/`) says what a batch is, which parameters
train and what the loss is; this file does everything else, the same way for every method:

    model = method.build(run)                      trainable module (frozen parts inside, untouched)
    ema, optimisers, LR schedules, grad scaler     from TrainConfig
    wrapped = DDP / FSDP (model)                    under torchrun; a plain module otherwise
    for step, micro_batches in method.batches(start):
        for phase in method.phases(step):          usually one ("main"); a GAN adds "discriminator"
            for batch in micro_batches:            gradient accumulation
                loss = method.loss(wrapped, batch, phase, step);  (loss / n).backward()
            skip the update if any rank saw NaN/inf, else clip, optimiser step
        ema.update(); LR step; log; checkpoint / sample grid every N steps
    method.export(EMA weights)                      the model folder

Determinism: a method draws everything random about a step from (seed, step) for the whole global
batch and hands each rank its rows, so a step is a pure function of (weights, seed, step): N
processes compute one process's update, and a resumed run repeats an uninterrupted one bit for bit
(checkpoints hold model, EMA, optimisers, schedules, scaler and every RNG state; written atomically
by rank 0). Checkpoints hold only the trained parameters; frozen weights come from where `build`
took them.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import math
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ldmkit.errors import UserError
from ldmkit.io.files import FolderLock, read_json, remove_stale_temporaries, write_json
from ldmkit.training import common, distributed
from ldmkit.training.config import TrainConfig, check, from_dict, resume_changes, to_dict
from ldmkit.util import progress

RUN_FILES = ("config.json", "checkpoints", "samples", "loss.csv", "loss.png")  # what a run writes besides outputs


class TrainingDiverged(UserError):
    """The loss stayed NaN/inf for too many consecutive steps."""


@dataclass
class Run:
    """What a method may know about the run it is built for."""

    config: TrainConfig
    ctx: distributed.DistContext
    micro_batch: int  # rows of one micro-batch on this rank
    init: dict | None  # weights to start from (`--init-from`), as `load_init` gives them
    resumed: bool
    resume_state: dict | None = None  # the resumed checkpoint's `Method.state()`


class Method:
    """Base class of training methods; see `methods/ldm.py` for a complete one."""

    name = ""
    summary = ""  # one sentence for `ldm train --help`
    config: TrainConfig
    outputs: tuple = ("model",)  # files / folders `export` writes into the run folder
    plotted: tuple | None = None  # logged values drawn in loss.png (None: all but lr, grad norms, skips)
    seconds_per_step: float | None = None  # set by the Trainer before `export` (this session's steps)
    average = None  # the run's EMA (`common.EMA`) once the Trainer made it: a consistency target trains against it

    def build(self, run: Run) -> nn.Module:
        """The module trained (and EMA-averaged, checkpointed); its frozen parameters stay frozen."""
        raise NotImplementedError

    def batches(self, start: int):
        """Per step from `start` on: the list of this rank's micro-batches."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch, phase: str, step: int) -> tuple[torch.Tensor, dict]:
        """One micro-batch through `model` (the wrapped module: call it once): (loss, float logs)."""
        raise NotImplementedError

    def phases(self, step: int) -> tuple[str, ...]:
        return ("main",)

    def param_groups(self, model: nn.Module) -> dict[str, list[dict]]:
        """AdamW parameter groups per optimiser: no weight decay on norms, biases and embeddings."""
        decay, plain = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                no_decay = p.ndim < 2 or "norm" in name or "embedding" in name.split(".")[-2:]
                (plain if no_decay else decay).append(p)
        return {"main": [{"params": decay, "weight_decay": self.config.weight_decay},
                         {"params": plain, "weight_decay": 0.0}]}

    def averaged(self, model: nn.Module) -> nn.Module:
        """The part of the module whose EMA is kept and exported (default: all of it)."""
        return model

    def probe_batches(self, batch) -> list:
        """Variants of a micro-batch that together reach every parameter a step can reach (DDP's
        unused-parameter probe), e.g. with and without condition dropout."""
        return [batch]

    def compile(self, model: nn.Module) -> None:
        model.compile()

    def state(self) -> dict:
        """Extra state a checkpoint keeps (checked or restored by `load_state`)."""
        return {}

    def load_state(self, state: dict) -> None:
        pass

    def describe(self) -> dict:
        """What config.json records about the run besides the config (shapes, sizes)."""
        return {}

    def samples(self, model: nn.Module, path: Path, step: int) -> None:
        """A sample grid from the averaged weights (rank 0)."""

    def export(self, model: nn.Module, folder: Path) -> Path:
        """The final model (averaged weights) in `folder`; returns what `ldm train` reports."""
        raise NotImplementedError

    def usage(self, result: Path) -> str:
        """The line `ldm train` prints at the end: what was written and how to use it."""
        return f"model written to {result} (load with: ldm sample --model {result} ...)"


def lr_lambda(step: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the base LR: linear warm-up, then constant or cosine to 0."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def prepare_run_folder(out: Path, method: Method, resume: bool, overwrite: bool) -> FolderLock:
    """Lock OUT against a second writer; refuse to write over another run unless resuming or told to
    overwrite (then remove that run's files: checkpoints, samples, logs, outputs)."""
    lock = FolderLock(out, "training run").acquire()
    remove_stale_temporaries(out)
    remove_stale_temporaries(out / "checkpoints")
    existing = [n for n in RUN_FILES + tuple(method.outputs) if (out / n).exists()]
    if existing and not (resume or overwrite):
        lock.release()
        raise UserError(f"{out} already holds a run ({', '.join(existing)}); pass --resume to continue it, "
                        "--overwrite to replace it, or choose another --out")
    if overwrite and not resume:
        for n in existing:
            shutil.rmtree(out / n) if (out / n).is_dir() else (out / n).unlink()
    return lock


class Trainer:
    """Builds a run from a method (its config included), then `run()` trains it; the pieces (`model`,
    `wrapped`, `ema`, `optimizers`, `step`) are attributes so tests can look inside."""

    def __init__(self, method: Method, ctx: distributed.DistContext | None = None, resume: str | Path | None = None,
                 overwrite: bool = False):
        self.lock = None
        try:
            self._setup(method, ctx, resume, overwrite)
        except BaseException:  # a run that cannot start leaves its folder free (also to this process)
            if self.lock is not None:
                self.lock.release()
            raise

    def _setup(self, method: Method, ctx, resume, overwrite: bool) -> None:
        c = method.config
        check(c)
        if not c.out:
            raise UserError("--out is required: the run folder (config.json, checkpoints, logs, the model)")
        self.method, self.config = method, c
        self.ctx = ctx or distributed.init(c.device)
        self.device, self.out = self.ctx.device, Path(c.out)
        if c.threads:
            torch.set_num_threads(c.threads)
        micro, rem = divmod(c.batch_size, self.ctx.world_size * c.grad_accum)
        if rem or micro < 1:
            raise UserError(f"batch_size {c.batch_size} must be a positive multiple of processes x grad_accum "
                            f"= {self.ctx.world_size} x {c.grad_accum}")
        if c.precision == "fp16" and self.device.type != "cuda":
            raise UserError("precision 'fp16' needs a CUDA device; use 'bf16' or 'no' on CPU")
        self.lock = prepare_run_folder(self.out, method, resume is not None, overwrite) if self.ctx.is_main else None
        self.ctx.barrier()
        state = common.load_training_state(resume) if resume is not None else None
        # a fresh run starts from --init-from; a resumed one needs it again only when it names a model whose
        # frozen weights the checkpoints do not hold (a training checkpoint's weights are all in ours)
        init = load_init(c.init_from) if c.init_from and (state is None or not c.init_from.endswith(".pt")) else None
        torch.manual_seed(c.seed)
        run = Run(c, self.ctx, micro, init, state is not None, (state or {}).get("extra"))
        self.model = method.build(run).to(self.device)
        self.trained = {n for n, p in self.model.named_parameters() if p.requires_grad}
        if not self.trained:
            raise UserError(f"method {method.name!r} left no parameter to train")
        groups = method.param_groups(self.model)  # from the real shapes, before FSDP flattens them
        sharded = c.strategy == "fsdp" and self.ctx.distributed
        if sharded and len(groups) > 1:
            raise UserError(f"method {method.name!r} trains {len(groups)} optimisers; use --strategy ddp")
        self.template = distributed.meta_copy(self.model) if sharded else None  # whole shapes, for gathering
        find_unused = bool(self._unused_parameters()) if self.ctx.distributed and not sharded else True
        if c.compile:
            method.compile(self.model)
        self.wrapped = distributed.wrap(self.model, self.ctx, c.strategy, per_block=not c.compile,
                                        find_unused=find_unused)
        self.ema = common.EMA(method.averaged(self.model), c.ema_decay, c.ema_warmup) if c.ema_decay > 0 else None
        method.average = self.ema
        fused = self.device.type in ("cuda", "cpu") or None  # one kernel over all tensors
        self.optimizers = {k: torch.optim.AdamW(g, lr=g[0].get("lr", c.lr), betas=tuple(c.adam_betas), fused=fused)
                           for k, g in groups.items()}
        self.schedulers = {k: torch.optim.lr_scheduler.LambdaLR(
            o, lambda s: lr_lambda(s, c.warmup_steps, c.steps, c.lr_schedule)) for k, o in self.optimizers.items()}
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=c.precision == "fp16")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(c.precision)
        self.step, self.bad_steps, self.bad_streak = 0, 0, 0
        if state is not None:
            self.load(state, resume)

    # ---- one optimiser step -----------------------------------------------------------------
    def train_step(self, micro_batches: list) -> dict:
        """One optimiser step per phase over this rank's micro-batches; returns the averaged logs."""
        step = self.step
        self.model.train()
        logs: dict[str, float] = {}
        for phase in self.method.phases(step):
            opt = self.optimizers[phase]
            finite = True
            for k, batch in enumerate(micro_batches):
                with distributed.no_sync(self.wrapped, k < len(micro_batches) - 1), \
                        torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    loss, parts = self.method.loss(self.wrapped, batch, phase, step)
                    loss = loss.float()
                bad = not bool(torch.isfinite(loss))
                finite = finite and not bad
                self.scaler.scale(loss.nan_to_num(0.0) * 0.0 if bad else loss / len(micro_batches)).backward()
                for name, v in parts.items():
                    logs[name] = logs.get(name, 0.0) + float(v) / len(micro_batches)
            # every rank must agree on skipping, or DDP deadlocks on the next all-reduce
            skip = bool(self.ctx.all_reduce_max(torch.tensor(0.0 if finite else 1.0, device=self.device)) > 0)
            self.scaler.unscale_(opt)
            norm = self._clip(opt)
            if skip or not math.isfinite(norm):
                logs.update(self._skip(opt, step))
            else:
                self.scaler.step(opt)
                self.scaler.update()
                self.bad_streak = 0
            opt.zero_grad(set_to_none=True)
            logs[f"grad_norm_{phase}" if phase != "main" else "grad_norm"] = norm
        if self.ema is not None:
            self.ema.update()
        for name, sched in self.schedulers.items():
            logs["lr" if name == "main" else f"lr_{name}"] = sched.get_last_lr()[0]
            with warnings.catch_warnings():  # a skipped first step makes torch warn about the call order
                warnings.simplefilter("ignore", UserWarning)
                sched.step()
        self.step += 1
        keys = sorted(k for k in logs if not k.startswith(("lr", "grad_norm")))
        if keys:  # the mean over ranks of what each rank logged
            means = self.ctx.all_reduce_mean(torch.tensor([logs[k] for k in keys], dtype=torch.float64,
                                                          device=self.device))
            logs.update(zip(keys, means.tolist()))
        return logs

    def _skip(self, opt, step: int) -> dict:
        if self.scaler.is_enabled():  # let the scaler back off
            self.scaler.update(self.scaler.get_scale() / 2)
        self.bad_steps += 1
        self.bad_streak += 1
        if self.bad_streak >= self.config.max_bad_steps:
            raise TrainingDiverged(
                f"the loss was NaN/inf for {self.bad_streak} consecutive steps (up to step {step + 1}; "
                f"{self.bad_steps} skipped in all); lower --lr, use --precision no or bf16, or check the data "
                f"for non-finite values. The last checkpoint is in {self.out / 'checkpoints'}")
        return {"skipped": 1.0}

    def _clip(self, opt) -> float:
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return 0.0
        if self.config.grad_clip > 0:
            if hasattr(self.wrapped, "clip_grad_norm_"):  # FSDP: the norm over all shards
                return float(self.wrapped.clip_grad_norm_(self.config.grad_clip))
            return float(torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip))
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))

    # ---- the loop -----------------------------------------------------------------------------
    def run(self) -> Path:
        """Train to `config.steps`, checkpointing, logging and sampling on the way; returns the
        exported model folder (written before the last sample grid, so a failing grid loses nothing).
        The run folder's lock goes when it ends, however it ends."""
        try:
            return self._run()
        finally:
            if self.lock is not None:
                self.lock.release()

    def _run(self) -> Path:
        c, main = self.config, self.ctx.is_main
        if main:
            write_json(self.out / "config.json", {"method": self.method.name, "config": to_dict(c),
                                                   "world_size": self.ctx.world_size, **self.method.describe()})
        log = common.LossLog(self.out / "loss.csv", resume_step=self.step) if main else None
        bar = progress(total=c.steps, desc=f"ldm train {self.method.name}", initial=self.step, unit="step",
                       disable=not (main and c.progress))
        t0, first = time.time(), self.step
        try:
            # islice: no batch is drawn (captions transformed, spatial inputs encoded) past the last step
            for micro_batches in itertools.islice(self.method.batches(self.step), max(0, c.steps - self.step)):
                logs = self.train_step(micro_batches)
                s = self.step
                if log is not None:
                    log.append(s, **logs)
                bar.update(1)
                if s % c.log_every == 0 or s == c.steps:
                    shown = logs.get("loss", logs.get("total", float("nan")))  # the autoencoder logs "total"
                    bar.set_postfix(loss=f"{shown:.4f}", skipped=self.bad_steps, refresh=False)
                if s % c.checkpoint_every == 0 or s == c.steps:
                    self.save_checkpoint()
                    if log is not None:
                        log.plot(self.out / "loss.png", title=f"ldm train {self.method.name}", keys=self.method.plotted)
                if s % c.sample_every == 0 and s < c.steps:
                    self.sample_grid()
        finally:
            bar.close()
        self.seconds_per_step = (time.time() - t0) / max(1, self.step - first)
        self.method.seconds_per_step = self.seconds_per_step  # what a method's summary may report
        result = self.export()
        self.sample_grid()
        return result

    # ---- the averaged weights -------------------------------------------------------------------
    @contextlib.contextmanager
    def averaged(self):
        """The plain module with the EMA weights (training weights without an EMA) inside the block;
        collective under FSDP (gathered into a copy; ranks that receive no tensors get None)."""
        swap = self.ema.swapped() if self.ema is not None else contextlib.nullcontext()
        was_training = self.model.training
        with swap, torch.no_grad():
            if self.template is None:
                self.model.eval()
                try:
                    yield self.model
                finally:
                    self.model.train(was_training)
            else:
                full = distributed.full_state_dict(self.wrapped, self.ctx)
                module = None
                if full:
                    module = copy.deepcopy(self.template)
                    module.load_state_dict(full, assign=True)
                    module.eval()
                yield module

    def sample_grid(self) -> None:
        if not (self.ctx.is_main or self.template is not None):
            return
        with self.averaged() as model:
            if self.ctx.is_main and model is not None:
                self.method.samples(self.method.averaged(model), self.out / "samples" / f"step_{self.step:07d}.png",
                                    self.step)

    def export(self) -> Path:
        result = None
        if self.ctx.is_main or self.template is not None:
            with self.averaged() as model:
                if self.ctx.is_main and model is not None:
                    result = self.method.export(self.method.averaged(model), self.out)
        self.ctx.barrier()
        return result

    # ---- checkpoints ----------------------------------------------------------------------------
    def _trained_only(self, state: dict) -> dict:
        return {k: v for k, v in state.items() if k in self.trained}

    def state_dict(self) -> dict:
        """Everything `--resume` needs (collective under FSDP; only rank 0 writes it)."""
        model = self._trained_only(distributed.full_state_dict(self.wrapped, self.ctx))
        ema = None
        if self.ema is not None:
            with self.ema.swapped():  # copies: a plain module's state dict aliases the parameters swapped back below
                ema = {**self.ema.settings(), "weights": {k: v.detach().clone() for k, v in self._trained_only(
                    distributed.full_state_dict(self.wrapped, self.ctx)).items()}}
        return {"step": self.step, "method": self.method.name, "config": to_dict(self.config), "model": model,
                "ema": ema, "optimizers": {k: distributed.optimizer_state_dict(self.wrapped, o)
                                           for k, o in self.optimizers.items()},
                "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
                "scaler": self.scaler.state_dict(), "rng": common.rng_state(), "bad_steps": self.bad_steps,
                "bad_streak": self.bad_streak, "world_size": self.ctx.world_size, "extra": self.method.state()}

    def save_checkpoint(self) -> Path | None:
        state = self.state_dict()
        path = None
        if self.ctx.is_main:
            path = self.out / "checkpoints" / f"step-{self.step}.pt"
            common.save_training_state(path, state)
            common.prune_checkpoints(self.out / "checkpoints", keep=self.config.keep_checkpoints)
        self.ctx.barrier()
        return path

    def load(self, state: dict, path) -> None:
        if state.get("method") != self.method.name or not isinstance(state.get("config"), dict):
            raise UserError(f"{path} is not a checkpoint of an `ldm train --method {self.method.name}` run")
        saved = from_dict(type(self.config), state["config"], f"{path} config")
        changed = resume_changes(saved, dataclasses.asdict(self.config))
        if changed:
            raise UserError(f"cannot resume from {path}: the run was started with other {changed}")
        missing = sorted(self.trained - set(state["model"]))
        if missing:
            raise UserError(f"{path} does not hold this run's trained weights (e.g. {missing[:3]})")
        distributed.load_full_state_dict(self.wrapped, state["model"], strict=False)
        if self.ema is not None and state.get("ema") is not None:
            with self.ema.swapped():
                distributed.load_full_state_dict(self.wrapped, state["ema"]["weights"], strict=False)
                self.ema.take_from_module()
            self.ema.num_updates = int(state["ema"]["num_updates"])
        for k, o in self.optimizers.items():
            distributed.load_optimizer_state_dict(self.wrapped, o, state["optimizers"][k])
            self.schedulers[k].load_state_dict(state["schedulers"][k])
        self.scaler.load_state_dict(state["scaler"])
        self.method.load_state(state.get("extra") or {})
        common.set_rng_state(state["rng"])
        self.step, self.bad_steps, self.bad_streak = int(state["step"]), int(state["bad_steps"]), int(state["bad_streak"])

    # ---- DDP's unused parameters --------------------------------------------------------------
    def _unused_parameters(self) -> list[str]:
        """Trainable parameters a step may leave without a gradient, found by forward + backward of step
        0's first micro-batch (and the method's variants of it) on the plain model; gradients are
        cleared and the RNG restored afterwards. Collective: every rank builds DDP the same way."""
        rng = common.rng_state()
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        unused: set[str] = set()
        self.model.train()
        try:
            batch = next(iter(self.method.batches(0)))[0]
            for variant in self.method.probe_batches(batch):
                self.model.zero_grad(set_to_none=True)
                self.method.loss(self.model, variant, "main", 0)[0].backward()
                unused |= {n for n, p in trainable if p.grad is None}
        finally:
            self.model.zero_grad(set_to_none=True)
            common.set_rng_state(rng)
        flags = torch.tensor([float(n in unused) for n, _ in trainable], device=self.device)
        flags = self.ctx.all_reduce_max(flags) if len(flags) else flags
        return [n for (n, _), f in zip(trainable, flags.tolist()) if f > 0]


def load_init(source: str) -> dict:
    """What a run starts from: a `.pt` file is an `ldm train` checkpoint ({"model": trained weights, "ema":
    ..., "extra": ..., "config": ...}); anything else is a model in any format ({"source": path}), which
    a method fine-tunes (single-file models are .safetensors / .ckpt / .pth / .bin)."""
    p = Path(source)
    if p.suffix == ".pt":
        state = common.load_training_state(p)
        if "model" not in state or "method" not in state:
            raise UserError(f"--init-from {source}: not an `ldm train` checkpoint (a .pt file given to --init-from "
                            "is read as one; a model's single file is .safetensors or .ckpt)")
        return {"checkpoint": str(p), **state}
    from ldmkit.io import resolve_model_path

    return {"source": str(resolve_model_path(source))}


def train(method: Method, resume: str | Path | None = None, overwrite: bool = False) -> Path:
    """`Trainer(method).run()` as one process or under torchrun (joins and leaves the process group)."""
    ctx = distributed.init(method.config.device)
    try:
        return Trainer(method, ctx, resume=resume, overwrite=overwrite).run()
    finally:
        distributed.shutdown(ctx)


def saved_config(out: str | Path) -> tuple[str, dict]:
    """(method name, config dict) of the run in folder `out` (its config.json)."""
    data = read_json(Path(out) / "config.json")
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict) or not isinstance(data.get("method"), str):
        raise UserError(f"{out}/config.json is not an `ldm train` run config")
    return data["method"], data["config"]


__all__ = ["Method", "Run", "Trainer", "TrainingDiverged", "load_init", "lr_lambda", "saved_config", "train"]
