"""Stage 2: train a latent diffusion model on cached latents.

The loop, top to bottom (nanoGPT style, nothing hidden in a framework):

    latents z0 (cached posterior mean/std, sampled)  ─┐
    t ~ p(t), noise ~ N(0, I)  ─ q_sample ─▶ z_t ─────┼▶ denoiser(z_t, t, tau(y)) ─▶ loss vs target
    captions / labels ─ conditioner (condition dropout) ┘

* `TrainConfig` records everything needed to rebuild the run; it is written to
  `OUT/config.json` and is what `--resume` reads back.
* Batches: `batch_size` is the global batch of one optimiser step (all ranks,
  all accumulation micro-steps). Indices come from a DistributedSampler, and the
  randomness of a step (timesteps, noise, posterior samples, condition dropout)
  is drawn for the whole global batch from a generator seeded by (seed, step),
  each rank taking its rows. So a step is a pure function of (weights, seed,
  step): a resumed run repeats an uninterrupted one exactly, and N processes
  compute the same update as one process with the same global batch.
* Checkpoints (`OUT/checkpoints/step_XXXXXXX.pt`, `latest.pt`, written
  atomically by rank 0) hold model, EMA, optimiser, LR scheduler, grad scaler,
  RNG states and the data position.
* At the end `OUT/model/` is a model folder (docs/internals.md) holding the
  EMA weights, loadable by `ldm sample --model OUT/model`.
* Spatial conditioning (`spatial`: the LDM paper's concatenation, as SD's inpainting and x4
  upscaler models) appends a spatially aligned input to z_t, built per step from the
  images / segmentation maps stored in the latent cache, exactly as the pipelines build it:
    inpaint   [z_t, mask, latents of the masked image]  masks drawn per step (rectangles and
              strokes, some samples fully masked, some unmasked); the masked image is encoded
              by the frozen autoencoder (posterior mode) as `ldm inpaint` does
    upscale   [z_t, low-res image]  the image downsampled to the latent size; UNets without
              class conditioning also get a noise augmentation level as class label (x4-upscaler
              contract of `ldm upscale`)
    semantic  [z_t, one-hot segmentation map at latent size]
  Condition dropout drops only the text / class condition: the spatial input stays in both
  CFG branches, as the pipelines sample. Mask and noise-level draws come from the step
  generator, so resume stays exact.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ldmkit.training import common
from ldmkit.training import distributed as distrib

OBJECTIVES = ("eps", "v", "x0", "flow")
DENOISERS = ("unet", "dit")
CONDITIONINGS = ("text", "class", "none")
SPATIAL_KINDS = ("inpaint", "upscale", "semantic")
NOISE_LEVELS = 1000  # upscale noise-augmentation levels (class table size, as SD's x4 upscaler)
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("no", "bf16", "fp16")


class TrainingDiverged(RuntimeError):
    """The loss stayed NaN/inf for too many consecutive steps."""


@dataclass(frozen=True)
class TrainConfig:
    # data + frozen stage 1
    latents: str = ""  # latent cache folder written by ldmkit.data.latents
    autoencoder: str = ""  # frozen autoencoder component folder
    out: str = "runs/ldm"
    # model
    denoiser: str = "unet"  # "unet" | "dit"
    preset: str = "tiny"  # a key of ldmkit.denoisers.{unet,dit}.PRESETS
    conditioning: str = "text"  # "text" | "class" | "none"
    text_encoder: str = "tiny"  # preset of the trainable text transformer, or "minilm" (frozen, pretrained)
    text_encoder_layer: int | None = None  # minilm: read the hidden states after this layer (None: the last)
    objective: str = "eps"  # "eps" | "v" | "x0" | "flow"
    schedule: str = "scaled_linear"  # noise schedule name (ignored for "flow")
    num_train_timesteps: int = 1000
    loss_weighting: str = "uniform"  # "uniform" | "min_snr"
    timestep_sampling: str = "auto"  # "auto" (flow: logit_normal, else uniform) | "uniform" | "stratified"
    #                                  | "logit_normal" (ldmkit.diffusion.objectives.sample_timesteps)
    sample_posterior: bool = True  # z0 = mean + std * eps (else the posterior mean)
    spatial: str | None = None  # None | "inpaint" | "upscale" | "semantic": input concatenated to z_t
    noise_level_max: int = 350  # upscale with a UNet: low-res input noised to a level in [0, this]
    position_features: bool = False  # UNet: pixel coordinates fed to conv_in's output and every attention block
    context_adapter_layers: int = 0  # UNet: trainable self-attention layers over the context (frozen encoders)
    init_from: str | None = None  # start from the model + EMA weights of another run's checkpoint (fine-tuning)
    stage1_latents: str | None = None  # a recaptioned copy of `latents` whose captions the first steps read
    stage1_steps: int = 0  # how many steps read them (a caption curriculum; 0 = none)
    word_drop: float = 0.0  # each `drop_words` occurrence leaves a caption as drawn (not stage 1's) with this p
    drop_words: tuple = ()  # words word_drop may remove (e.g. attribute words, so the rest must carry the meaning)
    # optimisation
    steps: int = 1000
    batch_size: int = 32  # global batch per optimiser step
    grad_accum: int = 1
    lr: float = 1e-4
    lr_schedule: str = "cosine"
    warmup_steps: int = 100
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # 0 disables clipping
    ema_decay: float = 0.999
    ema_warmup: bool = True  # decay ramps as min(decay, (1+n)/(10+n)) (training.common.EMA)
    cond_drop: float = 0.1  # probability of replacing a condition by the null one
    precision: str = "no"  # "no" | "bf16" | "fp16" (fp16 needs CUDA)
    compile: bool = False
    seed: int = 0
    max_bad_steps: int = 10  # consecutive NaN/inf steps before stopping
    # bookkeeping
    checkpoint_every: int = 500
    sample_every: int = 500
    log_every: int = 10
    sample_prompts: tuple = ()  # captions (text) or labels (class); default: first of the data set
    sample_seeds: tuple = (0,)
    sample_sampler: str = "ddim"
    sample_steps: int = 20
    guidance: float = 4.0
    # runtime (not part of the numerics)
    device: str | None = None
    strategy: str = "ddp"  # "ddp" | "fsdp" under torchrun
    progress: bool = True

    def validate(self) -> None:
        def one_of(name, value, allowed):
            if value not in allowed:
                raise ValueError(f"{name} {value!r} is not one of {allowed}")

        one_of("objective", self.objective, OBJECTIVES)
        one_of("denoiser", self.denoiser, DENOISERS)
        one_of("conditioning", self.conditioning, CONDITIONINGS)
        one_of("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        one_of("precision", self.precision, PRECISIONS)
        one_of("strategy", self.strategy, distrib.STRATEGIES)
        if self.spatial is not None:
            one_of("spatial", self.spatial, SPATIAL_KINDS)
        if (self.position_features or self.context_adapter_layers) and self.denoiser != "unet":
            raise ValueError("position_features and context_adapter_layers are UNet options; "
                             f"denoiser is {self.denoiser!r}")
        if self.stage1_steps < 0:
            raise ValueError(f"stage1_steps must be >= 0, got {self.stage1_steps}")
        if bool(self.stage1_latents) != (self.stage1_steps > 0):
            raise ValueError("stage1_latents and stage1_steps go together: a recaptioned cache and a step count")
        if self.stage1_steps and self.conditioning != "text":
            raise ValueError("stage1_latents replaces captions; it needs conditioning 'text'")
        from ldmkit.diffusion.objectives import TIMESTEP_SAMPLING

        if self.timestep_sampling not in ("auto", *TIMESTEP_SAMPLING):
            raise ValueError(f"timestep_sampling must be 'auto' or one of {TIMESTEP_SAMPLING}, "
                             f"got {self.timestep_sampling!r}")
        if self.text_encoder_layer is not None and (self.conditioning != "text" or self.text_encoder != "minilm"):
            raise ValueError("text_encoder_layer picks a hidden layer of the frozen minilm encoder; it needs "
                             f"conditioning 'text' and text_encoder 'minilm', got {self.conditioning!r} / "
                             f"{self.text_encoder!r}")
        if not 0.0 <= self.word_drop < 1.0:
            raise ValueError(f"word_drop must be in [0, 1), got {self.word_drop}")
        if self.word_drop and not self.drop_words:
            raise ValueError("word_drop needs drop_words: the words it may remove from captions")
        if self.word_drop and self.conditioning != "text":
            raise ValueError("word_drop removes words from captions; it needs conditioning 'text'")
        if any(not isinstance(w, str) or not w or any(ch.isspace() for ch in w) for w in self.drop_words):
            raise ValueError(f"drop_words must be single words, got {list(self.drop_words)}")
        if self.context_adapter_layers < 0:
            raise ValueError(f"context_adapter_layers must be >= 0, got {self.context_adapter_layers}")
        if self.context_adapter_layers and self.conditioning == "none":
            raise ValueError("context_adapter_layers needs a conditioning with a context (text or class)")
        if not 0 <= self.noise_level_max < NOISE_LEVELS:
            raise ValueError(f"noise_level_max must be in [0, {NOISE_LEVELS - 1}], got {self.noise_level_max}")
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "sample_every", "log_every",
                     "max_bad_steps", "num_train_timesteps", "sample_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.cond_drop < 1.0:
            raise ValueError(f"cond_drop must be in [0, 1), got {self.cond_drop}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        if self.guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {self.guidance}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        d["drop_words"] = list(self.drop_words)
        d["sample_prompts"] = list(self.sample_prompts)
        d["sample_seeds"] = list(self.sample_seeds)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}")
        d = dict(d)
        for key in ("adam_betas", "drop_words", "sample_prompts", "sample_seeds"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


# --------------------------------------------------------------------------- pieces


class Stage2(nn.Module):
    """Denoiser + (trainable) conditioner as one module, so DDP/EMA/optimiser see both."""

    def __init__(self, denoiser: nn.Module, conditioner: nn.Module | None):
        super().__init__()
        self.denoiser = denoiser
        self.conditioner = conditioner

    def encode(self, conditions, drop: torch.Tensor | None = None):
        """Conditioning for a batch; rows where `drop` is True get the null condition."""
        if self.conditioner is None:
            return None
        from ldmkit.conditioning.base import mix, trim_padding

        cond = self.conditioner.encode(list(conditions))
        if drop is not None and bool(drop.any()):
            cond = mix(cond, self.conditioner.null(len(conditions)), ~drop)
        return trim_padding(cond)[0]

    def predict(self, x, t, cond):
        if cond is None:
            return self.denoiser(x, t)
        return self.denoiser(cond.denoiser_input(x), t, **cond.denoiser_kwargs())

    def forward(self, x, t, conditions=None, drop=None, concat=None, labels=None):
        """`concat` [B, C, h, w]: spatial input appended to x; `labels` [B]: noise levels given as class
        labels (upscale). Both stay as they are where `drop` nulls the text / class condition."""
        cond = self.encode(conditions, drop) if conditions is not None else None
        if concat is not None or labels is not None:
            from ldmkit.conditioning.base import Conditioning

            extra = Conditioning(concat=concat, class_labels=labels)
            cond = extra if cond is None else cond.merge(extra)
        return self.predict(x, t, cond)


def lr_lambda(step: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the base LR: linear warm-up, then constant or cosine to 0."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator that draws all randomness of one optimiser step."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + 12345) % (2**63 - 1))


# --------------------------------------------------------------------------- the trainer


class LDMTrainer:
    """Builds every piece of a run from a TrainConfig, then `run()` trains it.

    The pieces are attributes (`model`, `optimizer`, `scheduler`, `ema`, `data`,
    `schedule`, `autoencoder`) so tests and notebooks can look inside; the loop
    itself is `run()` + `train_step()`.
    """

    def __init__(self, config: TrainConfig, ctx: distrib.DistContext | None = None,
                 data: "LatentData | None" = None, resume: str | os.PathLike | None = None):
        """``resume``: the checkpoint `run()` continues from (it may also be passed to `run`). Given
        here, a run started ``--init-from CKPT`` does not read CKPT again: the resumed checkpoint holds
        the weights and a word-level encoder's vocabulary."""
        config.validate()
        self.resume = resume
        self.config = c = config
        self.ctx = ctx or distrib.init(c.device)
        self.device = self.ctx.device
        self.out = Path(c.out)
        micro, rem = divmod(c.batch_size, self.ctx.world_size * c.grad_accum)
        if rem or micro < 1:
            raise ValueError(f"batch_size {c.batch_size} must be a positive multiple of world_size x grad_accum "
                             f"= {self.ctx.world_size} x {c.grad_accum}")
        self.micro_batch = micro
        if c.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("precision 'fp16' needs a CUDA device; use 'bf16' or 'no' on CPU")

        self.data = (data if data is not None else open_latents(c.latents)).for_conditioning(c.conditioning)
        self.autoencoder = load_frozen_autoencoder(c.autoencoder, self.device)
        check_cache_matches(self.data, self.autoencoder, c.latents, c.autoencoder)
        self.spatial = build_spatial(c, self.data, self.autoencoder)
        self.noise_labels = uses_noise_labels(c)
        self.schedule = make_schedule(c)
        init_state = None
        self._resume_state = None  # the resumed checkpoint when read here already (load_checkpoint reuses it)
        if c.init_from:
            from ldmkit.training.common import load_training_state

            init_state = load_training_state(resume if resume else c.init_from, map_location="cpu")
            if resume:
                self._resume_state = init_state
        self.stage1_captions = self._stage1_captions() if c.stage1_steps else None
        # word_drop draws one number per word position of the longest caption as drawn (stage 1's stay whole)
        self.max_caption_words = (max((len(str(t).split()) for t in set(self.data.captions or ())), default=0)
                                  if c.word_drop else 0)
        self.conditioner = build_conditioner(c, self.data, init_state, self.stage1_captions)
        self.denoiser = build_denoiser(c, self.data, self.conditioner, self.spatial)
        torch.manual_seed(c.seed)  # nothing below draws; kept so model init order changes stay seeded
        self.model = Stage2(self.denoiser, self.conditioner).to(self.device)

        from ldmkit.training.common import EMA

        # under FSDP the EMA is sharded like the model (built after wrapping, from a shapes-only copy)
        sharded_ema = c.strategy == "fsdp" and self.ctx.distributed
        ema_template = distrib.meta_copy(self.model) if sharded_ema else None
        self.ema = None if sharded_ema else EMA(self.model, decay=c.ema_decay, warmup=c.ema_warmup)
        if init_state is not None and not resume:
            self._init_from(init_state, c.init_from)
        self.sampler = torch.utils.data.DistributedSampler(
            _Len(len(self.data)), num_replicas=self.ctx.world_size, rank=self.ctx.rank, shuffle=True,
            seed=c.seed, drop_last=True)
        per_rank = len(self.sampler)
        self.steps_per_epoch = per_rank // (micro * c.grad_accum)
        if self.steps_per_epoch < 1:
            raise ValueError(f"the latent cache holds {len(self.data)} items: too few for a global batch of "
                             f"{c.batch_size}")
        self.step = 0
        self.bad_steps = 0  # total skipped steps
        self.bad_streak = 0  # consecutive skipped steps
        self._epoch_cache: tuple[int, list[int]] | None = None

        # weight-decay groups from the real shapes, before FSDP turns parameters into flat shards
        # (it keeps the Parameter objects, so the same groups serve every strategy)
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "norm" in name or "embedding" in name.split(".")[-2:] else decay).append(p)
        groups = [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(c.precision)
        # DDP looks for parameters a step leaves unused only if a probe step finds some
        find_unused = bool(self.unused_parameters()) if self.ctx.distributed and c.strategy == "ddp" else True
        if c.compile:
            # the denoiser only, compiled in place: tokenisation and condition dropout stay eager
            # Python (compiling Stage2 whole recompiled for every new batch of captions), and the
            # state-dict names stay those of the plain module (no `_orig_mod.`)
            self.model.denoiser.compile()
        # FSDP shards each block as a unit of its own, except around a compiled denoiser: inductor
        # fails on the nested units' flat parameters there (torch 2.13), so the model is one unit
        self.wrapped = distrib.wrap(self.model, self.ctx, c.strategy, per_block=not c.compile,
                                    find_unused=find_unused)
        if sharded_ema:
            self.ema = distrib.ShardedEMA(self.wrapped, self.ctx, ema_template, c.ema_decay, c.ema_warmup)
            if init_state is not None and not resume:
                self._init_ema(init_state)
        # fused AdamW (one kernel over all tensors) on CUDA and CPU: on CPU it cut the demo-shape
        # step (tiny UNet, batch 64) from 0.41-0.43 s to 0.36 s against the per-tensor loop
        fused = self.device.type in ("cuda", "cpu")
        self.optimizer = torch.optim.AdamW(groups, lr=c.lr, betas=tuple(c.adam_betas), fused=fused or None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, c.warmup_steps, c.steps, c.lr_schedule))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=c.precision == "fp16")

    # ---- data -------------------------------------------------------------------------
    def _rank_indices(self, epoch: int) -> list[int]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            self.sampler.set_epoch(epoch)
            self._epoch_cache = (epoch, list(iter(self.sampler)))
        return self._epoch_cache[1]

    def data_position(self, step: int) -> dict:
        epoch, k = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "index": k * self.micro_batch * self.config.grad_accum}

    def batch_indices(self, step: int, micro: int) -> list[int]:
        pos = self.data_position(step)
        start = pos["index"] + micro * self.micro_batch
        return self._rank_indices(pos["epoch"])[start:start + self.micro_batch]

    def global_rows(self, micro: int) -> torch.Tensor:
        """Rows of the step's global random draws used by this rank's micro-batch `micro`.

        DistributedSampler hands rank r the permutation positions r, r+W, r+2W...,
        so this rank's j-th sample of micro-batch a sits at global position
        (a*m + j)*W + r of the step: the same position a 1-process run gives it.
        """
        m, w = self.micro_batch, self.ctx.world_size
        return (micro * m + torch.arange(m)) * w + self.ctx.rank

    # ---- one optimiser step ------------------------------------------------------------
    def draw(self, step: int) -> dict:
        """All randomness of optimiser step `step`, for the whole global batch (CPU, then device)."""
        c, g = self.config, step_generator(self.config.seed, step)
        shape = (c.batch_size, *self.data.latent_shape)
        post = torch.randn(shape, generator=g)
        noise = torch.randn(shape, generator=g)
        t = sample_timesteps(self.schedule, c, c.batch_size, g)
        drop = torch.rand(c.batch_size, generator=g) < c.cond_drop
        out = {"post": post, "noise": noise, "t": t, "drop": drop}
        if c.spatial == "inpaint":
            out["mask"] = random_masks(c.batch_size, *self.data.image_shape[1:], generator=g)
        if self.noise_labels:
            out["level"] = torch.randint(0, c.noise_level_max + 1, (c.batch_size,), generator=g)
            out["lr_noise"] = torch.randn(c.batch_size, 3, *self.data.latent_shape[1:], generator=g)
        if c.word_drop:  # one draw per word position of the longest caption (drawn last: other runs unchanged)
            out["word_u"] = torch.rand(c.batch_size, self.max_caption_words, generator=g)
        return out

    @torch.no_grad()
    def spatial_input(self, batch: dict, draws: dict, rows: torch.Tensor):
        """(concat [b, C, h, w], labels [b] or None) of a micro-batch: what the pipelines concatenate."""
        c, size = self.config, self.data.latent_shape[1:]
        if c.spatial == "semantic":
            seg = batch["segmentation"].long()
            return self.spatial.encode([{"segmentation": m} for m in seg], size).concat.to(self.device), None
        from ldmkit.data.latents import uint8_to_image

        image = uint8_to_image(batch["image"]).to(self.device)
        if c.spatial == "inpaint":
            mask = draws["mask"][rows].to(self.device)
            masked = self.autoencoder.encode_latents(image * (1 - mask), sample=False).float()
            return self.spatial.encode([{"mask": m, "masked_latents": z} for m, z in zip(mask, masked)]).concat, None
        low = low_res_input(image, size)
        labels = None
        if self.noise_labels:
            labels = draws["level"][rows].to(self.device)
            low = augment_low_res(low, labels, draws["lr_noise"][rows].to(self.device))
        return self.spatial.encode([{"image": x} for x in low], size).concat, labels

    def micro_loss(self, step: int, micro: int, draws: dict, model: nn.Module | None = None) -> torch.Tensor:
        """The loss of micro-batch `micro` of step `step` through `model` (default: the wrapped model)."""
        c = self.config
        model = model if model is not None else self.wrapped
        idx = self.batch_indices(step, micro)
        rows = self.global_rows(micro)
        batch = self.data.get(idx)
        if self.stage1_captions is not None and step < c.stage1_steps:  # caption curriculum, first stage
            batch["conditions"] = [self.stage1_captions[i] for i in idx]
        elif c.word_drop:  # the captions as drawn (a curriculum's first stage reads its own as they are)
            keep = (draws["word_u"][rows] >= c.word_drop).tolist()
            batch["conditions"] = [drop_words(text, c.drop_words, k) for text, k in zip(batch["conditions"], keep)]
        mean, std = batch["mean"].to(self.device), batch["std"].to(self.device)
        if c.sample_posterior:
            z0 = mean + std * draws["post"][rows].to(self.device, mean.dtype)
        else:
            z0 = mean
        noise = draws["noise"][rows].to(self.device, z0.dtype)
        t = draws["t"][rows]
        conditions = batch.get("conditions") if self.conditioner is not None else None
        drop = draws["drop"][rows].to(self.device) if conditions is not None and c.cond_drop > 0 else None
        concat, labels = self.spatial_input(batch, draws, rows) if self.spatial is not None else (None, None)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            def model_fn(x, tt):
                if concat is None and labels is None:
                    return model(x, tt, conditions, drop)
                return model(x, tt, conditions, drop, concat=concat, labels=labels)
            loss = diffusion_loss(model_fn, z0, t, noise, self.schedule, c)
        return loss.float()

    def unused_parameters(self) -> list[str]:
        """Names of the trainable parameters a training step of this run may leave unreached (any
        rank's; DDP needs find_unused_parameters for them), found by a forward and backward of
        step 0's first micro-batch on the plain model: once with no condition dropped and, with
        condition dropout, once with all dropped. Gradients are cleared and the global RNG state
        restored afterwards, so the run itself is unchanged. Collective in a distributed run."""
        c = self.config
        rng = common.rng_state()
        draws = self.draw(0)
        patterns = [torch.zeros_like(draws["drop"])] + ([torch.ones_like(draws["drop"])] if c.cond_drop > 0 else [])
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        unused: set[str] = set()
        self.model.train()
        try:
            for drop in patterns:
                self.model.zero_grad(set_to_none=True)
                self.micro_loss(0, 0, {**draws, "drop": drop}, model=self.model).backward()
                unused |= {n for n, p in trainable if p.grad is None}
        finally:
            self.model.zero_grad(set_to_none=True)
            common.set_rng_state(rng)
        # every rank must build DDP the same way: all take the union of what any rank found
        names = [n for n, _ in trainable]
        flags = torch.tensor([float(n in unused) for n in names], device=self.device)
        flags = self.ctx.all_reduce_max(flags) if names else flags
        return [n for n, f in zip(names, flags.tolist()) if f > 0]

    def train_step(self) -> dict:
        """One optimiser step (with accumulation). Returns {'loss', 'grad_norm', 'skipped', 'lr'}."""
        c, step = self.config, self.step
        self.model.train()
        draws = self.draw(step)
        total = torch.zeros((), device=self.device)
        finite = True
        for a in range(c.grad_accum):
            last = a == c.grad_accum - 1
            with distrib.no_sync(self.wrapped, not last):
                loss = self.micro_loss(step, a, draws)
                bad = not bool(torch.isfinite(loss))
                finite = finite and not bad
                self.scaler.scale(loss / c.grad_accum if not bad else loss.nan_to_num(0.0) * 0.0).backward()
            total += loss.detach().nan_to_num(float("inf")) / c.grad_accum
        # every rank must agree on skipping, or DDP deadlocks on the next all-reduce
        bad_flag = self.ctx.all_reduce_max(torch.tensor(0.0 if finite else 1.0, device=self.device))
        self.scaler.unscale_(self.optimizer)
        grad_norm = self._clip()
        if bool(bad_flag > 0) or not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler.is_enabled():  # let the scaler back off
                self.scaler.update(self.scaler.get_scale() / 2)
            self.bad_steps += 1
            self.bad_streak += 1
            skipped = True
            if self.bad_streak >= c.max_bad_steps:
                raise TrainingDiverged(
                    f"loss was NaN/inf for {self.bad_streak} consecutive steps (up to step {step + 1}; "
                    f"{self.bad_steps} skipped in total). Lower --lr, use --precision no/bf16, or check the "
                    f"latent cache {c.latents} for non-finite values. The last checkpoint is in {self.out}.")
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.ema.update(self.model)  # under FSDP each rank averages its own shards
            self.bad_streak = 0
            skipped = False
        lr = self.scheduler.get_last_lr()[0]
        with warnings.catch_warnings():  # a skipped first step makes torch warn about the call order
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        self.step += 1
        loss_value = float(self.ctx.all_reduce_mean(total))
        return {"loss": loss_value, "grad_norm": grad_norm, "skipped": skipped, "lr": lr}

    def _clip(self) -> float:
        params = [p for p in self.wrapped.parameters() if p.grad is not None]
        if not params:
            return 0.0
        if self.config.grad_clip > 0:
            if hasattr(self.wrapped, "clip_grad_norm_"):  # FSDP shards the norm
                return float(self.wrapped.clip_grad_norm_(self.config.grad_clip))
            return float(torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip))
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))

    # ---- checkpoints ---------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoints"

    def state_dict(self) -> dict:
        """Everything `--resume` needs (gathered on all ranks; only rank 0 writes it)."""
        return {
            "step": self.step,
            "model": distrib.full_state_dict(self.wrapped, self.ctx),
            "ema": self.ema.state_dict(),
            "optimizer": distrib.optimizer_state_dict(self.wrapped, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": common.rng_state(),
            "data_position": self.data_position(self.step),
            "bad_steps": self.bad_steps,
            "bad_streak": self.bad_streak,
            "world_size": self.ctx.world_size,
            "config": self.config.to_dict(),
            **_text_encoder_state(self.conditioner),
        }

    def save_checkpoint(self) -> Path | None:
        from ldmkit.training.common import prune_checkpoints, save_training_state

        state = self.state_dict()  # collective under FSDP: every rank calls it
        path = None
        if self.ctx.is_main:
            path = self.checkpoint_dir / f"step-{self.step}.pt"
            save_training_state(path, state)
            prune_checkpoints(self.checkpoint_dir, keep=2)
        self.ctx.barrier()
        return path

    def _stage1_captions(self) -> list[str]:
        """The first stage's captions: those of ``stage1_latents``, which must hold this cache's latents."""
        c = self.config
        other = open_latents(c.stage1_latents)
        if len(other) != len(self.data) or not torch.equal(other.mean, self.data.mean):
            raise ValueError(f"stage1_latents {c.stage1_latents} must hold the same latents as {c.latents} in the "
                             "same order (only the captions may differ; ldmkit.data.latents.recaption makes one)")
        if not other.captions:
            raise ValueError(f"stage1_latents {c.stage1_latents} holds no captions")
        return list(other.captions)

    def _init_from(self, state: dict, path: str | os.PathLike) -> None:
        """Model and EMA weights from another run's checkpoint; optimiser, LR schedule, step and data
        order start fresh (a new stage of training, e.g. fine-tuning on other captions). A trainable
        word-level text encoder keeps that run's vocabulary (build_conditioner)."""
        for key in ("model", "ema"):
            if key not in state:
                raise ValueError(f"--init-from {path}: not an `ldm train` checkpoint (no {key!r} entry)")
        mine = self.model.state_dict()
        missing = sorted(set(mine) - set(state["model"]))
        unexpected = sorted(set(state["model"]) - set(mine))
        wrong = sorted(k for k in set(mine) & set(state["model"]) if mine[k].shape != state["model"][k].shape)
        if missing or unexpected or wrong:
            raise ValueError(f"--init-from {path}: the checkpoint's model does not fit this run's "
                             f"(missing {missing[:4]}{'...' if len(missing) > 4 else ''}, unexpected "
                             f"{unexpected[:4]}{'...' if len(unexpected) > 4 else ''}, other shapes {wrong[:4]}); "
                             "use the same denoiser, preset, conditioning and text encoder")
        self.model.load_state_dict(state["model"])
        if self.ema is not None:  # a sharded EMA is loaded after wrapping
            self._init_ema(state)

    def _init_ema(self, state: dict) -> None:
        self.ema.load_state_dict(state["ema"])
        self.ema.decay, self.ema.warmup = self.config.ema_decay, self.config.ema_warmup  # this run's EMA settings

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        from ldmkit.training.common import load_training_state

        if self._resume_state is not None and path == self.resume:
            state, self._resume_state = self._resume_state, None
        else:
            state = load_training_state(path, map_location="cpu")
        saved = TrainConfig.from_dict(state["config"])
        changed = [k for k in NUMERIC_FIELDS if getattr(saved, k) != getattr(self.config, k)]
        if changed:
            raise ValueError(f"cannot resume from {path}: the run was started with different {changed} "
                             f"(saved: {[getattr(saved, k) for k in changed]})")
        distrib.load_full_state_dict(self.wrapped, state["model"])
        self.ema.load_state_dict(state["ema"])
        distrib.load_optimizer_state_dict(self.wrapped, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        common.set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.bad_steps, self.bad_streak = int(state["bad_steps"]), int(state["bad_streak"])
        if state["data_position"] != self.data_position(self.step):
            raise ValueError(f"checkpoint {path} data position {state['data_position']} does not match step "
                             f"{self.step} with this data set (expected {self.data_position(self.step)}); "
                             "the latent cache changed since the run started")

    # ---- the loop --------------------------------------------------------------------------
    def run(self, resume: str | os.PathLike | None = None) -> Path:
        """Train to `config.steps`, checkpointing, logging and sampling on the way; returns the model folder."""
        from ldmkit.io.format import write_json
        from ldmkit.training.common import LossLog, progress

        c = self.config
        resume = resume or self.resume
        if resume:
            self.load_checkpoint(resume)
        if self.ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(self.out / "config.json", {"training": c.to_dict(), "world_size": self.ctx.world_size,
                                                   "schedule": self.schedule.to_dict(),
                                                   "denoiser": dataclasses.asdict(self.denoiser.config),
                                                   "conditioner": _config_dict(self.conditioner),
                                                   "spatial": _config_dict(self.spatial),
                                                   "latent_shape": list(self.data.latent_shape),
                                                   "num_items": len(self.data)})
        log = LossLog(self.out / "loss.csv", resume_step=self.step) if self.ctx.is_main else None
        bar = progress(total=c.steps, desc="ldm train", initial=self.step, unit="step",
                       disable=not (self.ctx.is_main and c.progress))
        t0, done0 = time.time(), self.step
        while self.step < c.steps:
            info = self.train_step()
            s = self.step
            if log is not None:
                log.append(s, loss=info["loss"], lr=info["lr"])
            bar.update(1)
            if s % c.log_every == 0 or s == c.steps:
                bar.set_postfix(loss=f"{info['loss']:.4f}", lr=f"{info['lr']:.2e}", skipped=self.bad_steps,
                                refresh=False)
            if s % c.checkpoint_every == 0 or s == c.steps:
                self.save_checkpoint()
                if log is not None:
                    log.plot(self.out / "loss.png")
            if s % c.sample_every == 0 or s == c.steps:
                self.sample_grid(self.out / "samples" / f"step_{s:07d}.png")
        bar.close()
        self.elapsed = time.time() - t0
        self.steps_done = self.step - done0
        folder = self.out / "model"
        model = self.ema_model() if isinstance(self.ema, distrib.ShardedEMA) else None  # collective
        if self.ctx.is_main:
            self.export(folder, model)
        self.ctx.barrier()
        return folder

    # ---- outputs ---------------------------------------------------------------------------
    def ema_model(self) -> Stage2 | None:
        """A copy of the Stage2 module holding the EMA weights (eval mode, CPU-safe). Collective under
        FSDP (the EMA is gathered from the ranks' shards): every rank calls it, and ranks that receive
        no tensors (non-zero ranks on CUDA) get None."""
        if isinstance(self.ema, distrib.ShardedEMA):
            return self.ema.module
        import copy

        return copy.deepcopy(self.ema.module).eval()

    @torch.no_grad()
    def sample_grid(self, path: Path) -> None:
        """Fixed prompts x fixed seeds with the EMA weights and CFG, through the sampling
        Pipeline: one PNG grid, a row per seed (rank 0 draws; every rank calls it)."""
        if not (self.ctx.is_main or isinstance(self.ema, distrib.ShardedEMA)):
            return
        model = self.ema_model()  # collective under FSDP
        if not self.ctx.is_main:
            return
        from ldmkit.io.images import make_grid, save_png

        c = self.config
        if c.spatial is not None:
            images, prompts = self.spatial_samples(model)
        else:
            prompts = list(c.sample_prompts) or self.data.default_prompts(4)
            pipe = make_pipeline(model, self.autoencoder, self.schedule, c, self.data.latent_shape)
            images = []
            for seed in c.sample_seeds:
                kw = {"class_label": prompts} if c.conditioning == "class" else {"prompt": prompts or None}
                if c.conditioning == "none":
                    kw = {}
                res = pipe.text2img(num=len(prompts) or 1, seed=seed, batch_size=max(1, len(prompts)),
                                    progress=False, **kw)
                # text2img gives image i the seed `seed + i`; a row shares one seed base per row
                images += [r.image for r in res]
        save_png(make_grid(images, nrow=max(1, len(prompts))), path,
                 {"step": self.step, "prompts": json.dumps([str(p) for p in prompts]),
                  "seeds": json.dumps(list(c.sample_seeds)), "guidance": c.guidance,
                  "sampler": c.sample_sampler, "steps": c.sample_steps})

    def spatial_samples(self, model: Stage2, n: int = 4) -> tuple[list, list]:
        """Sample-grid images of a spatial run: the first `n` cached items regenerated from their
        spatial input with their own caption / label (first row: the inputs -- masked image,
        low-res image, coloured map -- then a row per sample seed). Inpainting repaints the middle
        of each image; all kinds run through the pipeline tasks `ldm inpaint` / `ldm upscale` /
        `ldm semantic` run."""
        from ldmkit.data.latents import uint8_to_image
        from ldmkit.io.images import tensor_to_pil

        c = self.config
        n = min(n, len(self.data))
        batch = self.data.get(list(range(n)))
        conds = batch.get("conditions") or [None] * n
        settings = dict(sampler=c.sample_sampler, steps=c.sample_steps, progress=False)

        def kw(cond):
            return {"class_label": cond} if c.conditioning == "class" else (
                {"prompt": cond} if c.conditioning == "text" else {})

        pipe = make_pipeline(model, self.autoencoder, self.schedule, c, self.data.latent_shape)
        if c.spatial == "semantic":
            seg = batch["segmentation"].long()
            inputs = [tensor_to_pil(x) for x in segmentation_colours(seg)]
            outputs = []
            for seed in c.sample_seeds:  # image k: map k, condition k, seed + k
                res = pipe.semantic2img(seg, num=n, seed=seed, batch_size=n, **kw(conds), **settings)
                outputs += [r.image for r in res]
            return inputs + outputs, conds
        images = uint8_to_image(batch["image"])
        inputs, outputs = [], [[] for _ in c.sample_seeds]
        for k in range(n):
            if c.spatial == "inpaint":
                mask = centre_mask(*images.shape[-2:])
                inputs.append(tensor_to_pil(images[k] * (1 - mask[0])))
                for r, seed in enumerate(c.sample_seeds):
                    res = pipe.inpaint(images[k], mask, seed=seed + k, **kw(conds[k]), **settings)
                    outputs[r].append(res[0].image)
            else:
                low = low_res_input(images[k:k + 1], self.data.latent_shape[1:])[0]
                f = self.autoencoder.downsample_factor
                inputs.append(tensor_to_pil(torch.nn.functional.interpolate(low[None], scale_factor=f)[0]))
                for r, seed in enumerate(c.sample_seeds):
                    res = pipe.upscale(low, seed=seed + k, **kw(conds[k]), **settings)
                    outputs[r].append(res[0].image)
        return inputs + [im for row in outputs for im in row], conds

    def export(self, folder: Path, model: Stage2 | None = None) -> Path:
        """The EMA weights (`model`, default `ema_model()`) as a model folder that `ldm sample
        --model` loads."""
        from ldmkit.io.format import save_model

        model = (model or self.ema_model()).to("cpu")
        c = self.config
        index = {
            "schedule": self.schedule.to_dict(),
            "objective": c.objective,
            "conditioning": c.conditioning,
            "concat": c.spatial,
            "latent_size": list(self.data.latent_shape[1:]),
            "defaults": model_defaults(c),
            "training": {"steps": self.step, "world_size": self.ctx.world_size, "config": c.to_dict()},
        }
        components = {"autoencoder": self.autoencoder.to("cpu"), "denoiser": model.denoiser,
                      "conditioner": model.conditioner, "spatial": self.spatial}
        save_model(folder, components, index)
        self.autoencoder.to(self.device)
        return folder


# fields whose change would make a resumed run differ from the uninterrupted one
NUMERIC_FIELDS = ("latents", "autoencoder", "denoiser", "preset", "conditioning", "text_encoder", "objective",
                  "schedule", "num_train_timesteps", "loss_weighting", "timestep_sampling", "sample_posterior",
                  "batch_size", "grad_accum", "lr", "lr_schedule", "warmup_steps", "weight_decay", "adam_betas",
                  "grad_clip", "ema_decay", "ema_warmup", "cond_drop", "precision", "seed", "spatial",
                  "noise_level_max", "position_features", "context_adapter_layers", "init_from", "stage1_latents",
                  "stage1_steps", "word_drop", "drop_words", "text_encoder_layer")


def drop_words(text: str, words, keep) -> str:
    """``text`` without the occurrences of ``words`` whose word position i has a false ``keep[i]``
    (a word at a position past ``keep`` stays). Words are split on whitespace and compared whole and
    case-sensitively; the rest of the caption keeps its order: "a red circle above a blue square"
    with "red" dropped is "a circle above a blue square"."""
    parts = text.split()
    kept = [w for i, w in enumerate(parts) if w not in words or i >= len(keep) or keep[i]]
    return " ".join(kept) if len(kept) != len(parts) else text


class _Len(torch.utils.data.Dataset):
    """A length-only data set for DistributedSampler (indices only; data comes from the cache)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):  # pragma: no cover - never read
        return i


def _config_dict(module) -> dict | None:
    if module is None:
        return None
    cfg = getattr(module, "config", None)
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg


# --------------------------------------------------------------------------- building blocks of a run


def make_schedule(c: TrainConfig):
    """The noise schedule of the run: a DiscreteSchedule with the objective as prediction
    type, or a FlowSchedule for objective "flow"."""
    from ldmkit.diffusion.schedules import DiscreteSchedule, FlowSchedule

    if c.objective == "flow":
        return FlowSchedule(num_train_timesteps=c.num_train_timesteps)
    betas = {"scaled_linear": (0.00085, 0.012)}.get(c.schedule, (1e-4, 0.02))
    return DiscreteSchedule(beta_schedule=c.schedule, num_train_timesteps=c.num_train_timesteps,
                            beta_start=betas[0], beta_end=betas[1],
                            timestep_spacing="trailing" if c.schedule != "scaled_linear" else "leading",
                            steps_offset=0 if c.schedule != "scaled_linear" else 1)


def sample_timesteps(schedule, c: TrainConfig, n: int, generator: torch.Generator) -> torch.Tensor:
    from ldmkit.diffusion.objectives import sample_timesteps as draw

    method = c.timestep_sampling
    if method == "auto":
        method = "logit_normal" if c.objective == "flow" else "uniform"
    return draw(schedule, n, generator, method=method)


def diffusion_loss(model_fn, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, schedule,
                   c: TrainConfig) -> torch.Tensor:
    """Mean weighted loss of one micro-batch: noise z0 to t, predict, compare with the objective's target."""
    from ldmkit.diffusion.forward import q_sample
    from ldmkit.diffusion.objectives import model_timestep, training_loss

    z_t = q_sample(schedule, z0, noise, t)
    t_model = model_timestep(schedule, t).to(z0.device, torch.float32)
    out = model_fn(z_t, t_model)
    return training_loss(schedule, c.objective, out, z0, noise, t, weighting=c.loss_weighting).mean()


def load_frozen_autoencoder(folder: str, device: torch.device) -> nn.Module:
    from ldmkit.io.format import load_component

    if not folder:
        raise ValueError("autoencoder: a component folder is required (e.g. the `autoencoder` folder that "
                         "`ldm train-autoencoder` writes)")
    ae = load_component(folder, device=device)
    ae.requires_grad_(False)
    return ae.eval()


# trainable text transformer sizes (width always equals the denoiser's cross_attention_dim)
TEXT_ENCODERS: dict[str, dict] = {
    "tiny": dict(depth=1, heads=2),
    "small": dict(depth=2, heads=4),
    "base": dict(depth=4, heads=8),
}
# frozen pretrained encoders (weights from an installed package; the denoiser attends to their width)
FROZEN_TEXT_ENCODERS = ("minilm",)


def _text_encoder_state(conditioner) -> dict:
    """A trainable word-level text encoder's vocabulary and config, kept in checkpoints so that a
    run started ``--init-from`` one keeps the same word ids (its captions may differ)."""
    from ldmkit.conditioning import TransformerTextEncoder

    if not isinstance(conditioner, TransformerTextEncoder):
        return {}
    return {"text_encoder": {"vocab": conditioner.tokenizer.get_vocab(),
                             "config": dataclasses.asdict(conditioner.config)}}


def build_conditioner(c: TrainConfig, data, init_state: dict | None = None,
                      extra_captions: list[str] | None = None) -> nn.Module | None:
    """A fresh conditioner for the run: the LDM paper's trainable text transformer with a word
    vocabulary from the training captions (or the one of the ``--init-from`` checkpoint), a
    class-label table, or None."""
    if c.conditioning == "none":
        return None
    cross_dim = _cross_dim(c)
    torch.manual_seed(c.seed + 1)
    if c.conditioning == "class":
        from ldmkit.conditioning import ClassConditioner, ClassConfig

        if data.num_classes is None:
            raise ValueError(f"conditioning 'class' needs class labels in the latent cache {c.latents}")
        # UNets with cross-attention also get a one-token class context (the LDM paper's class model)
        has_cross = c.denoiser == "unet" and _denoiser_preset(c).has_cross_attention
        return ClassConditioner(ClassConfig(num_classes=data.num_classes, context_dim=cross_dim if has_cross else None,
                                            class_names=tuple(data.class_names or ())))
    from ldmkit.conditioning import TransformerTextEncoder

    if c.text_encoder not in TEXT_ENCODERS and c.text_encoder not in FROZEN_TEXT_ENCODERS:
        raise ValueError(f"text_encoder {c.text_encoder!r} is not one of "
                         f"{sorted(TEXT_ENCODERS) + list(FROZEN_TEXT_ENCODERS)}")
    captions = data.captions
    if not captions:
        raise ValueError(f"conditioning 'text' needs captions in the latent cache {c.latents}")
    captions = list(captions) + list(extra_captions or [])  # a word vocabulary covers both caption stages
    longest = max(len(str(t).split()) for t in set(captions))
    if c.text_encoder == "minilm":
        from ldmkit.conditioning import BertTextEncoder

        # word pieces ~ 1.3 per word, plus [CLS]/[SEP]; room for longer prompts at sampling time
        return BertTextEncoder.from_pretrained(max_length=max(16, 2 * longest + 8), use_mask=True,
                                               hidden_layer=c.text_encoder_layer)
    if init_state is not None and "text_encoder" in init_state:
        from ldmkit.conditioning.text import TransformerTextConfig, word_tokenizer_from_vocab

        saved = init_state["text_encoder"]
        return TransformerTextEncoder(TransformerTextConfig(**saved["config"]),
                                      word_tokenizer_from_vocab(saved["vocab"]))
    return TransformerTextEncoder.from_captions(sorted(set(captions)), width=cross_dim,
                                                max_length=max(8, longest + 4), **TEXT_ENCODERS[c.text_encoder])


def _denoiser_preset(c: TrainConfig):
    if c.denoiser == "unet":
        from ldmkit.denoisers.unet import PRESETS
    else:
        from ldmkit.denoisers.dit import PRESETS
    if c.preset not in PRESETS:
        raise ValueError(f"{c.denoiser} preset {c.preset!r} is not one of {sorted(PRESETS)}")
    return PRESETS[c.preset]


def build_denoiser(c: TrainConfig, data, conditioner, spatial=None) -> nn.Module:
    """The preset, fitted to the latents (channels, size), the conditioning and the spatial input
    (in_channels = latent channels + spatial channels)."""
    cfg = _denoiser_preset(c)
    ch, h, w = data.latent_shape
    extra = spatial.channels if spatial is not None else 0
    torch.manual_seed(c.seed)
    if c.denoiser == "unet":
        from ldmkit.denoisers.unet import UNet

        changes = dict(in_channels=ch + extra, out_channels=ch, sample_size=h)
        if c.position_features:
            changes["position_features"] = True
        if c.context_adapter_layers:
            changes["context_adapter_layers"] = c.context_adapter_layers
        if c.conditioning == "text":  # a frozen encoder sets the width the cross-attention reads
            changes["cross_attention_dim"] = _cross_dim(c, conditioner)
        if c.conditioning == "class":
            changes["num_class_embeds"] = data.num_classes + 1
        elif uses_noise_labels(c):  # the x4 upscaler's noise level enters as a class label
            changes["num_class_embeds"] = NOISE_LEVELS
        if c.conditioning == "none":  # no context: the same levels without cross-attention
            changes.update(down_block_types=tuple("DownBlock2D" for _ in cfg.down_block_types),
                           up_block_types=tuple("UpBlock2D" for _ in cfg.up_block_types),
                           mid_block_type="UNetMidBlock2D" if cfg.mid_block_type else None)
        return UNet(dataclasses.replace(cfg, **changes))
    from ldmkit.denoisers.dit import DiT

    changes = dict(in_channels=ch + extra, out_channels=ch, learn_sigma=False, sample_size=h,
                   num_classes=data.num_classes if c.conditioning == "class" else None,
                   cross_attention_dim=_cross_dim(c, conditioner) if c.conditioning == "text" else None)
    return DiT(dataclasses.replace(cfg, **changes))


def _cross_dim(c: TrainConfig, conditioner=None) -> int:
    """Width of the conditioning sequence the denoiser attends to: a frozen pretrained encoder's
    hidden size, else the preset's (which the trainable encoder is built to)."""
    if c.conditioning == "text" and c.text_encoder in FROZEN_TEXT_ENCODERS and conditioner is not None:
        return conditioner.model.config.hidden_size
    cfg = _denoiser_preset(c)
    if c.denoiser == "unet":
        return cfg.cross_attention_dim
    return cfg.cross_attention_dim or cfg.hidden_size


def model_defaults(c: TrainConfig) -> dict:
    """model_index.json "defaults" of an exported run."""
    d = {"sampler": c.sample_sampler, "steps": c.sample_steps, "guidance": c.guidance}
    if uses_noise_labels(c):
        d["noise_level"] = min(20, c.noise_level_max)  # the x4 upscaler's default, within the trained range
    return d


def make_pipeline(model: Stage2, autoencoder: nn.Module, schedule, c: TrainConfig, latent_shape):
    """A sampling Pipeline (ldmkit.pipelines) over the given weights: what `ldm sample`, `ldm inpaint`,
    `ldm upscale` or `ldm semantic` will run."""
    from ldmkit.pipelines import Pipeline

    return Pipeline(autoencoder, model.denoiser, schedule, model.conditioner, prediction=c.objective,
                    conditioning=c.conditioning,
                    concat=c.spatial, latent_size=list(latent_shape[1:]), defaults=model_defaults(c))


# --------------------------------------------------------------------------- spatial conditioning

MASK_FULL = 0.25  # share of inpainting samples with everything masked (also learns plain generation)
MASK_NONE = 0.10  # share with nothing masked


def uses_noise_labels(c: TrainConfig) -> bool:
    """Upscale runs whose denoiser takes the low-res noise level as class label: what `ldm upscale`
    assumes of a UNet with a class embedding and no class conditioning."""
    return c.spatial == "upscale" and c.denoiser == "unet" and c.conditioning != "class" and c.noise_level_max > 0


def build_spatial(c: TrainConfig, data, autoencoder: nn.Module):
    """The SpatialConditioner of a run (None without `spatial`), after checking that the latent cache
    holds what it is built from, at the size the autoencoder encodes to the cached latents."""
    if c.spatial is None:
        return None
    from ldmkit.conditioning import SpatialConditioner, SpatialConfig

    ch, h, w = data.latent_shape
    where = f"the latent cache {c.latents}" if c.latents and c.latents != "memory" else "the latent data"
    if c.spatial == "semantic":
        if data.segmentation is None:
            raise ValueError(f"spatial 'semantic' needs segmentation maps, but {where} has none; rebuild it "
                             "with `ldm cache-latents --segmentation ...` (data sets with maps: shapes)")
        size = tuple(data.segmentation.shape[-2:])
        num_classes = len(data.segmentation_classes or ()) or int(data.segmentation.max()) + 1
    else:
        if data.images is None:
            raise ValueError(f"spatial {c.spatial!r} needs the source images, but {where} stores none; rebuild "
                             "it with `ldm cache-latents --store-images ...`")
        size = tuple(data.images.shape[-2:])
        num_classes = 0
    f = autoencoder.downsample_factor
    if size != (h * f, w * f):
        raise ValueError(f"{where} holds {size[0]}x{size[1]} images/maps but {h}x{w} latents; with the "
                         f"autoencoder's factor {f} they must be {h * f}x{w * f}")
    if c.spatial == "inpaint" and autoencoder.latent_channels != ch:
        raise ValueError(f"the autoencoder makes {autoencoder.latent_channels}-channel latents, the cache holds {ch}")
    return SpatialConditioner(SpatialConfig(c.spatial, latent_channels=ch, num_classes=num_classes,
                                            latent_size=(h, w)))


def random_masks(n: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """SD-inpainting-style training masks [n, 1, H, W] in {0, 1} (1 = repaint): a share MASK_FULL
    fully masked, MASK_NONE unmasked, the rest 1-3 random rectangles and thick polyline strokes."""
    masks = torch.zeros(n, 1, height, width)
    yy, xx = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    side = min(height, width)

    def uniform(lo, hi):
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    for i in range(n):
        u = uniform(0, 1)
        if u < MASK_FULL:
            masks[i] = 1
            continue
        if u < MASK_FULL + MASK_NONE:
            continue
        m = masks[i, 0]
        for _ in range(int(torch.randint(1, 4, (), generator=generator))):
            if uniform(0, 1) < 0.5:  # rectangle covering 10-60 % of each side
                rh, rw = uniform(0.1, 0.6) * height, uniform(0.1, 0.6) * width
                y0, x0 = uniform(0, height - rh), uniform(0, width - rw)
                m[(yy >= y0) & (yy < y0 + rh) & (xx >= x0) & (xx < x0 + rw)] = 1
                continue
            # stroke: 1-4 segments of a random walk, 5-15 % of the side thick
            r = uniform(0.025, 0.075) * side
            y, x = uniform(0, height), uniform(0, width)
            for _ in range(int(torch.randint(1, 5, (), generator=generator))):
                angle, length = uniform(0, 2 * math.pi), uniform(0.1, 0.5) * side
                y1 = min(max(y + length * math.sin(angle), 0.0), float(height))
                x1 = min(max(x + length * math.cos(angle), 0.0), float(width))
                dy, dx = y1 - y, x1 - x
                # distance of every pixel centre to the segment (y, x) -> (y1, x1)
                s = ((yy - y) * dy + (xx - x) * dx) / max(dy * dy + dx * dx, 1e-8)
                s = s.clamp(0, 1)
                m[(yy - y - s * dy) ** 2 + (xx - x - s * dx) ** 2 <= r * r] = 1
                y, x = y1, x1
    return masks


def centre_mask(height: int, width: int) -> torch.Tensor:
    """[1, 1, H, W]: the middle half of the image masked (sample grids of inpainting runs)."""
    m = torch.zeros(1, 1, height, width)
    m[..., height // 4: height - height // 4, width // 4: width - width // 4] = 1
    return m


def low_res_input(images: torch.Tensor, latent_size) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> the low-resolution input `ldm upscale` gets: downsampled to the
    latent size (SpatialConditioner's bicubic with antialiasing), rounded to 8 bits like an image file."""
    from ldmkit.conditioning.spatial import resize_image
    from ldmkit.data.latents import image_to_uint8, uint8_to_image

    return uint8_to_image(image_to_uint8(resize_image(images, tuple(latent_size))))


def augment_low_res(low: torch.Tensor, levels: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The x4 upscaler's noise augmentation, as `ldm upscale` applies it: the low-res image put at
    level `levels[i]` of a linear DDPM schedule with NOISE_LEVELS steps (level 0 = unchanged)."""
    from ldmkit.diffusion.forward import q_sample
    from ldmkit.diffusion.schedules import make_schedule as named_schedule

    noisy = q_sample(named_schedule("linear", num_train_timesteps=NOISE_LEVELS), low, noise, levels)
    return torch.where((levels > 0).view(-1, 1, 1, 1), noisy.to(low.dtype), low)


def load_semantic(folder, device="cpu") -> tuple:
    """A semantic-synthesis model folder (model_index.json concat "semantic", written by `ldm train
    --spatial semantic`) as (Stage2, autoencoder, schedule, spatial conditioner) for `sample_semantic`.
    Loads through `ldmkit.pipelines.load`; `load(folder).semantic2img(...)` is the direct way."""
    from ldmkit.pipelines import load

    pipe = load(folder, device=device, dtype=torch.float32)
    if pipe.concat != "semantic":
        raise ValueError(f"{folder} is not a semantic-synthesis model (concat={pipe.concat!r}); "
                         "load it with ldmkit.pipelines.load")
    return Stage2(pipe.denoiser, pipe.conditioner).eval(), pipe.autoencoder, pipe.schedule, pipe.spatial


# a colour per segmentation class for sample grids (background white)
_SEG_PALETTE = torch.tensor([[255, 255, 255], [230, 30, 30], [40, 70, 220], [30, 170, 50], [240, 220, 20],
                             [150, 60, 200], [20, 200, 200], [250, 140, 20], [0, 0, 0]], dtype=torch.float32)


def segmentation_colours(seg: torch.Tensor) -> torch.Tensor:
    """[B, H, W] class map -> [B, 3, H, W] in [-1, 1] with a fixed colour per class (sample grids)."""
    colours = _SEG_PALETTE[seg.long() % len(_SEG_PALETTE)]
    return colours.permute(0, 3, 1, 2) / 127.5 - 1


@torch.no_grad()
def sample_semantic(model: Stage2, autoencoder: nn.Module, schedule, spatial, segmentation: torch.Tensor,
                    conditions: list | None = None, *, seed: int = 0, sampler: str = "ddim", steps: int = 20,
                    guidance: float = 4.0) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] (8-bit values) from integer maps [B, H, W]: `Pipeline.semantic2img`
    (`ldm semantic`) over these modules. Image i gets map i, conditions[i] (captions / labels; None for
    an unconditional model) and seed + i; the map stays in both CFG branches."""
    from ldmkit.io.images import pil_to_tensor
    from ldmkit.pipelines import Pipeline

    seg = torch.as_tensor(segmentation)
    seg = seg[None] if seg.dim() == 2 else seg
    if (conditions is None) != (model.conditioner is None):
        raise ValueError("pass conditions exactly when the model has a conditioner (text / class)")
    kind = "none" if model.conditioner is None else (
        "class" if model.conditioner.component_type == "class" else "text")
    pipe = Pipeline(autoencoder, model.denoiser, schedule, model.conditioner, conditioning=kind, concat="semantic",
                    spatial=spatial)
    kw = {"class_label": list(conditions)} if kind == "class" else (
        {"prompt": list(conditions)} if kind == "text" else {})
    res = pipe.semantic2img(seg, num=len(seg), seed=seed, sampler=sampler, steps=steps, guidance=guidance,
                            batch_size=len(seg), progress=False, **kw)
    return torch.stack([pil_to_tensor(r.image) for r in res])


class LatentData:
    """Cached latents as the trainer reads them: posterior mean/std [N, c, h, w] plus the
    condition of each item (captions for text runs, integer labels for class runs) and what
    spatial inputs are built from (`images` uint8 [N, 3, H, W], `segmentation` [N, H, W] with
    `segmentation_classes`), when the cache stores them.

    `open_latents(path)` builds one from a latent cache folder (ldmkit.data.latents); tests and
    scripts can also build one from tensors.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor | None = None, captions: list[str] | None = None,
                 labels: torch.Tensor | None = None, class_names: list[str] | None = None,
                 images: torch.Tensor | None = None, segmentation: torch.Tensor | None = None,
                 segmentation_classes: list[str] | None = None):
        if mean.dim() != 4:
            raise ValueError(f"latent means have shape {tuple(mean.shape)}; expected [N, c, h, w]")
        self.mean = mean.float()
        self.std = torch.zeros_like(self.mean) if std is None else std.float()
        if self.std.shape != self.mean.shape:
            raise ValueError(f"latent std {tuple(self.std.shape)} does not match mean {tuple(self.mean.shape)}")
        n = mean.shape[0]
        if captions is not None and len(captions) != n:
            raise ValueError(f"{len(captions)} captions for {n} latents")
        if labels is not None and len(labels) != n:
            raise ValueError(f"{len(labels)} labels for {n} latents")
        self.captions = list(captions) if captions is not None else None
        self.labels = torch.as_tensor(labels, dtype=torch.long) if labels is not None else None
        self.class_names = list(class_names) if class_names else None
        self.condition_kind = "text" if captions is not None else ("class" if labels is not None else "none")
        if images is not None and (images.dtype != torch.uint8 or images.dim() != 4 or len(images) != n):
            raise ValueError(f"images must be uint8 [{n}, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        if segmentation is not None and (segmentation.is_floating_point() or segmentation.dim() != 3
                                         or len(segmentation) != n):
            raise ValueError(f"segmentation maps must be integer [{n}, H, W], got {segmentation.dtype} "
                             f"{tuple(segmentation.shape)}")
        self.images = images
        self.segmentation = segmentation
        self.segmentation_classes = list(segmentation_classes) if segmentation_classes else None

    def __len__(self) -> int:
        return self.mean.shape[0]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.mean.shape[1:])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """[3, H, W] of the stored images (or [1, H, W] of the maps)."""
        if self.images is not None:
            return tuple(self.images.shape[1:])
        if self.segmentation is not None:
            return (1, *self.segmentation.shape[1:])
        raise ValueError("the latent data stores no images or segmentation maps")

    @property
    def num_classes(self) -> int | None:
        if self.labels is None:
            return None
        return len(self.class_names) if self.class_names else int(self.labels.max()) + 1

    def for_conditioning(self, kind: str) -> "LatentData":
        if kind == "text" and self.captions is None:
            raise ValueError("conditioning 'text' needs captions, but the latent cache has none")
        if kind == "class" and self.labels is None:
            raise ValueError("conditioning 'class' needs labels, but the latent cache has none")
        self.condition_kind = kind
        return self

    def get(self, indices: list[int]) -> dict:
        idx = torch.as_tensor(indices, dtype=torch.long)
        out = {"mean": self.mean[idx], "std": self.std[idx]}
        if self.condition_kind == "text":
            out["conditions"] = [self.captions[i] for i in indices]
        elif self.condition_kind == "class":
            out["conditions"] = self.labels[idx].tolist()
        if self.images is not None:
            out["image"] = self.images[idx]
        if self.segmentation is not None:
            out["segmentation"] = self.segmentation[idx]
        return out

    def default_prompts(self, n: int) -> list:
        """The first `n` distinct conditions of the data set (for sample grids)."""
        if self.condition_kind == "none":
            return []
        pool = self.captions if self.condition_kind == "text" else self.labels.tolist()
        seen = []
        for p in pool:
            if p not in seen:
                seen.append(p)
            if len(seen) == n:
                break
        return seen


def open_latents(path: str) -> LatentData:
    """A latent cache folder (ldmkit.data.latents.encode_dataset) as LatentData (already scaled)."""
    from ldmkit.data.latents import CachedLatents

    if not path:
        raise ValueError("latents: a latent cache folder is required (see ldmkit.data.latents.encode_dataset)")
    cache = CachedLatents(path, sample=False)
    data = LatentData(cache.mean, cache.std, captions=cache.captions, labels=cache.labels,
                      class_names=cache.class_names, images=cache.images, segmentation=cache.segmentation,
                      segmentation_classes=cache.segmentation_classes)
    data.index = cache.index
    return data


def check_cache_matches(data: LatentData, autoencoder: nn.Module, latents: str, autoencoder_path: str) -> None:
    """Refuse a cache encoded with other autoencoder weights than the ones samples are decoded with."""
    index = getattr(data, "index", None)
    if not index:
        return
    from ldmkit.data.latents import weights_sha256

    want = (index.get("autoencoder") or {}).get("weights_sha256")
    if want and want != weights_sha256(autoencoder):
        raise ValueError(f"latent cache {latents} was encoded with different autoencoder weights than "
                         f"{autoencoder_path}; rebuild the cache or pass the autoencoder it was made with")
