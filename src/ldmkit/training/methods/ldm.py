"""Method "ldm": a latent diffusion model trained on the latents of a frozen autoencoder -- from scratch,
or fine-tuning a pretrained model (`--init-from MODEL`).

    latents z0 = mean + std * eps (cached, or encoded per step) ─┐
    t ~ p(t), noise ─ q_sample ─▶ z_t ───────────────────────────┼─▶ denoiser([z_t, spatial], t, tau(y)) ─▶ loss
    captions / labels ─ conditioner (condition dropout) ─────────┘

* From scratch, the denoiser is a UNet or a DiT from a preset, fitted to the latents (channels, size),
  the conditioning (text: cross-attention width of the text encoder; class: a label table) and the
  spatial input; the objective is eps / v / x0 / flow (`ldmkit.diffusion`). `--init-from MODEL` (an
  ldmkit or diffusers folder, an original single file, a bundled name) fine-tunes that model instead:
  its denoiser, conditioner, autoencoder, schedule and prediction type are the run's.
* Data: a latent cache (`--latents`, `ldm cache-latents`) or an image folder (`--data`) encoded by the
  frozen autoencoder in every micro-batch (crops / flips drawn per step).
* Batches: a permutation per epoch, cut into global batches; everything random about a step
  (posterior samples, noise, timesteps, condition dropout, masks, crops) is drawn for the whole global
  batch from a generator seeded by (seed, step), each rank taking its rows -- so resume is exact, and
  N processes with A accumulation steps compute bit for bit the update of one process with N * A.
* Spatial conditioning (`spatial`, the LDM paper's concatenation) appends to z_t what the pipelines
  append, built per step from the images / maps of the data: inpaint [mask, latents of the masked
  image] (masks drawn per step), upscale [low-res image] (+ its noise level as class label for UNets
  without class conditioning, as SD's x4 upscaler), semantic [one-hot map]. Condition dropout drops
  only the text / class condition: the spatial input stays in both CFG branches.
* Output: RUN/model, a model folder with the EMA weights (`ldm sample --model RUN/model`).
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ldmkit.conditioning import spatial as sp
from ldmkit.data.latents import LatentData, check_cache_matches, open_latents
from ldmkit.diffusion import (TIMESTEP_SAMPLING, DiscreteSchedule, FlowSchedule, model_timestep, q_sample,
                              sample_timesteps, sampler_names, training_loss)
from ldmkit.errors import UserError
from ldmkit.util import weights_sha256
from ldmkit.training.config import TrainConfig, option
from ldmkit.training.loop import Method, Run
from ldmkit.training.methods import ldm_parts as parts
from ldmkit.training.methods.ldm_parts import (CONDITIONINGS, DENOISERS, FROZEN_TEXT_ENCODERS, TEXT_ENCODERS,
                                               Stage2)


@dataclass(frozen=True)
class LDMConfig(TrainConfig):
    out: str = option("", "run folder: config.json, checkpoints/, samples/, loss.csv, loss.png, model/ (required)",
                      resume=True)
    latents: str = option("", "latent cache folder (`ldm cache-latents`)")
    data: str = option("", "image folder (PNG/JPEG, captions in a .txt beside each image or metadata.jsonl / "
                       ".csv) encoded by the frozen autoencoder at every step; instead of --latents")
    resolution: int | None = option(None, "--data: side of the square crops trained on (default: the model's "
                                    "sample size, else 256)", lo=8, hi=16384)
    random_crop: bool = option(False, "--data: random instead of center crops")
    random_flip: bool = option(False, "--data: flip images horizontally at random")
    tokenizer: str = option("", "--init-from an original single file: its CLIP tokenizer folder (default: CLIP's)")
    prediction_type: str | None = option(None, "--init-from an original single file: what its UNet predicts "
                                         "(SD 2.x 768 models: v; default eps)", choices=(None, "eps", "v"))
    autoencoder: str = option("", "the frozen autoencoder (a component folder; the cache's, with --latents); "
                              "with --init-from MODEL the model's own")
    denoiser: str = option("unet", "network: unet (SD-compatible), dit, or mmdit (SD3's joint-attention transformer; "
                           "text only)", choices=DENOISERS)
    preset: str = option("tiny", "denoiser preset (ldmkit.denoisers.unet / dit / mmdit PRESETS)")
    conditioning: str = option("text", "text (captions), class (labels) or none", choices=CONDITIONINGS)
    text_encoder: str = option("tiny", "text encoder trained with the model: a word-level transformer (tiny, small, "
                               "base), a CLIP text transformer with CLIP's BPE tokenizer (clip-tiny, clip-small, "
                               "clip-base; exports to diffusers), or minilm (frozen all-MiniLM-L6-v2)",
                               choices=tuple(TEXT_ENCODERS) + tuple(f"clip-{k}" for k in TEXT_ENCODERS)
                               + FROZEN_TEXT_ENCODERS)
    text_encoder_from: str = option("", "take the (frozen) text encoder of this model instead (e.g. a Stable "
                                    "Diffusion folder's CLIP; the denoiser gets its width)")
    text_encoder_layer: int | None = option(None, "minilm: read the hidden states after this layer (0 = the token "
                                            "embeddings; default: the last)", lo=0, hi=6)
    normalize_text: bool = option(False, "lower-case captions and prompts and drop their punctuation before "
                                  "encoding (recorded in the model, so sampling does the same)")
    train_text_encoder: bool = option(False, "also train a pretrained (frozen by default) text encoder: CLIP, BERT")
    text_encoder_lr: float | None = option(None, "learning rate of a trained text encoder (default: --lr)", lo=0,
                                           lo_open=True)
    gradient_checkpointing: bool = option(False, "recompute the denoiser's activations in the backward pass: less "
                                          "memory for about a third more time")
    context_adapter_layers: int = option(0, "UNet extension: trainable self-attention layers over the text tokens "
                                         "before cross-attention", lo=0, hi=64)
    position_features: bool = option(False, "UNet extension: normalised pixel coordinates into conv_in's output "
                                     "and every attention block")
    objective: str = option("eps", "what the network predicts: eps, v, x0 or flow (rectified flow)",
                            choices=("eps", "v", "x0", "flow"))
    schedule: str = option("scaled_linear", "noise schedule (not for flow)", choices=("linear", "scaled_linear", "cosine"))
    num_train_timesteps: int = option(1000, "discrete timesteps of the schedule", lo=2, hi=100000)
    loss_weighting: str = option("uniform", "per-timestep loss weight: uniform or min_snr (gamma 5)",
                                 choices=("uniform", "min_snr"))
    timestep_sampling: str = option("auto", "training timesteps: auto (flow: logit_normal, else uniform), uniform, "
                                    "stratified (one per 1/B slice of each batch) or logit_normal",
                                    choices=("auto",) + TIMESTEP_SAMPLING)
    sample_posterior: bool = option(True, "z0 = mean + std * eps from the posterior (else its mean)")
    cond_drop: float = option(0.1, "probability that a sample's condition is dropped (classifier-free guidance)",
                              lo=0, hi=0.99)
    spatial: str | None = option(None, "input concatenated to z_t: inpaint, upscale or semantic (the cache needs "
                                 "images / maps)", choices=(None, "inpaint", "upscale", "semantic"))
    noise_level_max: int = option(350, "upscale: highest noise-augmentation level of the low-res input", lo=0,
                                  hi=sp.NOISE_LEVELS - 1)
    sample_prompts: tuple[str, ...] = option((), "captions (or class labels) of the sample grid (default: the "
                                             "first ones of the data)", resume=True)
    sample_seeds: tuple[int, ...] = option((0,), "a grid row per seed", lo=0, resume=True)
    sample_sampler: str | None = option(None, "sampler of the grids and the model's default (default: dpmpp_2m, "
                                        "flow_euler for flow)", resume=True, flag="sampler")
    sample_steps: int = option(20, "sampler steps of the grids and the model's default", lo=1, hi=1000, resume=True)
    guidance: float = option(4.0, "guidance of the grids and the model's default", lo=0, hi=100, resume=True)

    @property
    def sampler(self) -> str:
        return self.sample_sampler or ("flow_euler" if self.objective == "flow" else "dpmpp_2m")

    @property
    def fine_tunes(self) -> bool:
        """--init-from names a model, not a training checkpoint (a .pt file, `loop.load_init`): the network
        and its settings come from it."""
        return bool(self.init_from) and not self.init_from.endswith(".pt")

    def validate(self) -> None:
        """The rules between fields (each field's own rules are checked by `config.check`)."""
        unet_only = [n for n in ("context_adapter_layers", "position_features") if getattr(self, n)]
        if unet_only and self.denoiser != "unet":
            raise UserError(f"{', '.join(unet_only)} extend a UNet; denoiser is {self.denoiser!r}")
        if self.context_adapter_layers and self.conditioning == "none":
            raise UserError("context_adapter_layers re-mixes a condition's tokens; conditioning is 'none'")
        if self.text_encoder_layer is not None and (self.conditioning, self.text_encoder) != ("text", "minilm"):
            raise UserError("text_encoder_layer picks a layer of the frozen minilm encoder; it needs conditioning "
                            "'text' and text_encoder 'minilm', got {!r} / {!r}".format(self.conditioning,
                                                                                      self.text_encoder))
        if self.latents and self.data:
            raise UserError("--latents and --data are two sources of training data; give one")
        if self.text_encoder_from and self.conditioning != "text":
            raise UserError(f"text_encoder_from needs conditioning 'text', got {self.conditioning!r}")
        if not self.fine_tunes:
            check_sampler(self.sampler, self.objective)
        parts.preset_table(self.denoiser, self.preset)


def check_sampler(sampler: str, objective: str) -> None:
    valid = sampler_names(FlowSchedule() if objective == "flow" else DiscreteSchedule())
    if sampler not in valid:
        raise UserError(f"sampler {sampler!r} does not fit objective {objective!r}; use one of {valid}")


class LDM(Method):
    """Train a denoiser (and a trainable text encoder) on latents. `data` (a LatentData or ImageData)
    replaces the cache / image folder (tests, scripts); `caption_transform(captions, step) -> captions` rewrites each micro-batch's captions
    before encoding (a recipe's caption augmentation; it must be a pure function of its arguments so
    that resume stays exact)."""

    name = "ldm"
    summary = ("a latent diffusion model (UNet or DiT; text, class or no conditioning) on the latents of a frozen "
               "autoencoder, from scratch or fine-tuning a pretrained model (--init-from MODEL).")
    outputs = ("model",)

    def __init__(self, config: LDMConfig, data=None,
                 caption_transform: Callable[[list[str], int], list[str]] | None = None):
        config.validate()
        self.config, self._data, self.caption_transform = config, data, caption_transform

    # ---- building ---------------------------------------------------------------------------
    def build(self, run: Run) -> nn.Module:
        c = self.config
        self.ctx, self.micro, self.device = run.ctx, run.micro_batch, run.ctx.device
        options = {k: v for k, v in (("tokenizer", c.tokenizer), ("prediction_type", c.prediction_type)) if v}
        source = parts.load_source(run.init["source"], **options) if run.init and "source" in run.init else None
        if run.init and "checkpoint" in run.init:
            parts.check_checkpoint_init(run.init, c.init_from)
        self.source = source
        self.source_sha256 = weights_sha256(source["denoiser"]) if source else None
        self.autoencoder = source["autoencoder"] if source else parts.load_frozen_autoencoder(c.autoencoder)
        self.autoencoder = self.autoencoder.requires_grad_(False).eval().to(self.device)
        settings = source or parts.settings_of(c)
        self.objective, self.conditioning, self.spatial_kind = (settings["objective"], settings["conditioning"],
                                                                settings["concat"])
        self.schedule = settings["schedule"]
        self.data, where = self.open_data(source)
        self.data.check_conditioning(self.conditioning, where)
        check_sampler(self.sampler, self.objective)
        self.spatial = source["spatial"] if source else parts.build_spatial(c, self.data, self.autoencoder, where)
        if source and self.spatial_kind is not None:
            parts.check_spatial_data(self.spatial_kind, self.data, where)
        self.noise_labels = parts.uses_noise_labels(c) if source is None else parts.takes_noise_labels(
            source["denoiser"], self.spatial_kind)
        self.steps_per_epoch = len(self.data) // c.batch_size
        if self.steps_per_epoch < 1:
            raise UserError(f"{where} holds {len(self.data)} items: too few for a global batch of {c.batch_size}")
        if source is not None:
            model = Stage2(source["denoiser"], source["conditioner"])
        else:
            extra = (run.resume_state or {}) if run.resumed else (run.init or {}).get("extra") or {}
            conditioner = parts.build_conditioner(c, self.data, extra)
            model = Stage2(parts.build_denoiser(c, self.data, conditioner, self.spatial), conditioner)
            if run.init:
                parts.load_weights(model, (run.init.get("ema") or {}).get("weights") or run.init["model"],
                                   c.init_from)
        self.text_time = getattr(model.denoiser.config, "addition_embed_type", None) == "text_time"  # SDXL-shaped
        self.model = self.adapt(model)
        return self.model

    def open_data(self, source: dict | None):
        """(the training data, how errors name it): a latent cache or an image folder."""
        c = self.config
        if self._data is not None:
            data, where = self._data, "the training data"
        elif c.data:
            from ldmkit.data.image_data import ImageData

            size = c.resolution or parts.default_resolution(source, self.autoencoder)
            data = ImageData.from_folder(c.data, size, random_crop=c.random_crop, flip=c.random_flip)
            where = f"--data {c.data}"
        elif c.latents:
            data, where = open_latents(c.latents), f"the latent cache {c.latents}"
        else:
            raise UserError("training data: give --latents CACHE (`ldm cache-latents`) or --data IMAGE_FOLDER")
        if hasattr(data, "bind"):
            data.bind(self.autoencoder)
        else:
            check_cache_matches(data, self.autoencoder, where, c.autoencoder or c.init_from)
        return data, where

    def adapt(self, model: Stage2) -> Stage2:
        """What trains: everything built fresh; of a pretrained model the denoiser, and its text encoder
        with --train-text-encoder (a method that trains adapters overrides this)."""
        c = self.config
        conditioner = model.conditioner
        frozen_text = getattr(conditioner, "model", None) is not None and hasattr(conditioner, "trainable")
        if frozen_text and c.train_text_encoder:
            conditioner.model.requires_grad_(True)
        elif c.train_text_encoder:
            raise UserError(f"--train-text-encoder: the conditioner ({type(conditioner).__name__}) is not a "
                            "pretrained text encoder (it trains anyway when it is trainable)")
        if c.gradient_checkpointing:
            parts.enable_gradient_checkpointing(model)
        return model

    @property
    def sampler(self) -> str:
        return self.config.sample_sampler or ("flow_euler" if self.objective == "flow" else "dpmpp_2m")

    def param_groups(self, model: nn.Module) -> dict[str, list[dict]]:
        """AdamW groups; a trained pretrained text encoder at its own --text-encoder-lr."""
        groups = super().param_groups(model)
        lr = self.config.text_encoder_lr
        text = getattr(model.conditioner, "model", None)
        if lr is None or text is None:
            return groups
        ids = {id(p) for p in text.parameters()}
        main = [{**g, "params": [p for p in g["params"] if id(p) not in ids]} for g in groups["main"]]
        text_params = [p for p in text.parameters() if p.requires_grad]
        if not text_params:
            return groups
        return {"main": [g for g in main if g["params"]] + [{"params": text_params, "weight_decay": 0.0, "lr": lr}]}

    # ---- batches ----------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> list[int]:
        """The order epoch `epoch` visits the items in (a permutation seeded by (seed, epoch))."""
        return torch.randperm(len(self.data), generator=torch.Generator().manual_seed(self.config.seed + epoch)).tolist()

    def step_items(self, step: int) -> list[int]:
        """The items of step `step`'s global batch: the k-th block of `batch_size` of its epoch's order."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if getattr(self, "_order", (None,))[0] != epoch:
            self._order = (epoch, self._epoch_order(epoch))
        b = self.config.batch_size
        return self._order[1][k * b:(k + 1) * b]

    def draw(self, step: int) -> dict:
        """All randomness of optimiser step `step`, for the whole global batch (CPU)."""
        c = self.config
        g = torch.Generator().manual_seed((c.seed * 1_000_003 + step * 7919 + 12345) % (2**63 - 1))
        shape = (c.batch_size, *self.data.latent_shape)
        method = c.timestep_sampling if c.timestep_sampling != "auto" else (
            "logit_normal" if self.objective == "flow" else "uniform")
        out = {"post": torch.randn(shape, generator=g), "noise": torch.randn(shape, generator=g),
               "t": sample_timesteps(self.schedule, c.batch_size, g, method=method),
               "drop": torch.rand(c.batch_size, generator=g) < c.cond_drop}
        if self.spatial_kind == "inpaint":
            out["mask"] = sp.random_masks(c.batch_size, *self._image_size(), generator=g)
        if self.noise_labels:
            out["level"] = torch.randint(0, c.noise_level_max + 1, (c.batch_size,), generator=g)
            out["lr_noise"] = torch.randn(c.batch_size, 3, *self.data.latent_shape[1:], generator=g)
        if not isinstance(self.data, LatentData):  # crops and flips of images encoded per step
            out["aug"] = torch.randint(0, 2**62, (c.batch_size,), generator=g)
        return out

    def batches(self, start: int):
        """Step k's global batch splits into W x accum micro-batches of m rows, rank r taking the accum
        micro-batches r*accum ... (r+1)*accum - 1 -- so one process with W*accum accumulation steps
        computes the very same micro-batches."""
        c, m = self.config, self.micro
        first = self.ctx.rank * c.grad_accum
        for step in itertools.count(start):
            items, draws = self.step_items(step), self.draw(step)
            micro_batches = []
            for a in range(first, first + c.grad_accum):
                rows = torch.arange(a * m, (a + 1) * m)  # rows of the step's global batch and draws
                micro_batches.append(self.micro_batch(items[a * m:(a + 1) * m], rows, draws, step))
            yield micro_batches

    def micro_batch(self, idx: list[int], rows: torch.Tensor, draws: dict, step: int) -> dict:
        c, dev, data = self.config, self.device, self.data
        ix = torch.as_tensor(idx, dtype=torch.long)
        pixels, items = None, None
        if isinstance(data, LatentData):
            mean, std = data.mean[ix].to(dev), data.std[ix].to(dev)
        else:
            items = data.items(idx, draws["aug"][rows].tolist())
            pixels = torch.stack([it["image"] for it in items])
            mean, std = parts.encode_posterior(self.autoencoder, pixels.to(dev))
        z0 = mean + std * draws["post"][rows].to(dev) if c.sample_posterior else mean
        conditions = self.conditions_of(idx, rows, draws, step)
        batch = {"z0": z0, "noise": draws["noise"][rows].to(dev), "t": draws["t"][rows], "conditions": conditions,
                 "drop": draws["drop"][rows].to(dev) if conditions is not None and c.cond_drop > 0 else None,
                 "concat": None, "labels": None, "weight": self.row_weights(idx)}
        if self.spatial is not None:
            batch["concat"], batch["labels"] = self.spatial_input(ix, draws, rows, pixels)
        if self.text_time:
            batch["time_ids"] = self.time_ids(items, len(idx)).to(dev)
        return batch

    def time_ids(self, items: list | None, n: int) -> torch.Tensor:
        """SDXL's micro-conditioning of a micro-batch, as its paper trains it: each image's true size and
        crop corner, and the training size (a latent cache keeps no sizes: its own, uncropped); a
        refiner's aesthetic score is its sampling default, 6."""
        size = self._image_size()
        aesthetic = getattr(getattr(self.model.conditioner, "config", None), "requires_aesthetics_score", False)
        rows = []
        for k in range(n):
            original, crop = (items[k]["original_size"], items[k]["crop_top_left"]) if items else (size, (0, 0))
            rows.append(list(original) + list(crop) + ([6.0] if aesthetic else list(size)))
        return torch.tensor(rows, dtype=torch.float32)

    def conditions_of(self, idx: list[int], rows: torch.Tensor, draws: dict, step: int) -> list | None:
        """The captions / labels of a micro-batch's items (after the caption transform)."""
        conditions = self.data.conditions(self.conditioning, idx)
        if conditions is not None and self.conditioning == "text" and self.caption_transform is not None:
            conditions = list(self.caption_transform(conditions, step))
        return conditions

    def row_weights(self, idx: list[int]) -> torch.Tensor | None:
        """Per-row loss weights (None: all 1); the loss is the mean of weight x row loss."""
        return None

    def _image_size(self) -> tuple[int, int]:
        f = self.autoencoder.downsample_factor
        return self.data.latent_shape[1] * f, self.data.latent_shape[2] * f

    @torch.no_grad()
    def spatial_input(self, ix: torch.Tensor, draws: dict, rows: torch.Tensor, pixels: torch.Tensor | None = None):
        """(concat [b, C, h, w], labels [b] or None) of a micro-batch: what the pipelines concatenate."""
        kind, size = self.spatial_kind, self.data.latent_shape[1:]
        if kind == "semantic":
            maps = self.data.segmentation[ix].long()
            return sp.one_hot_map(maps, self.spatial.config.num_classes, size).to(self.device), None
        image = pixels if pixels is not None else self.data.images[ix].float().div(127.5).sub(1)
        image = image.to(self.device)
        if kind == "inpaint":
            mask = draws["mask"][rows].to(self.device)
            masked = self.autoencoder.encode_latents(image * (1 - mask), sample=False).float()
            return torch.cat([sp.resize_mask(mask, size).to(masked), masked], dim=1), None
        low, labels = sp.low_res_input(image, size), None
        if self.noise_labels:
            labels = draws["level"][rows].to(self.device)
            low = sp.augment_low_res(low, labels, draws["lr_noise"][rows].to(self.device))
        return low, labels

    # ---- the loss ---------------------------------------------------------------------------
    def loss(self, model, batch, phase, step):
        z_t = q_sample(self.schedule, batch["z0"], batch["noise"], batch["t"])
        t = model_timestep(self.schedule, batch["t"]).to(self.device, torch.float32)
        out = model(z_t, t, batch["conditions"], batch["drop"], batch["concat"], batch["labels"], batch.get("time_ids"))
        rows = training_loss(self.schedule, self.objective, out, batch["z0"], batch["noise"], batch["t"],
                             weighting=self.config.loss_weighting)
        weight = batch.get("weight")
        loss = (rows * weight.to(rows)).mean() if weight is not None else rows.mean()
        return loss, {"loss": loss.detach()}

    def probe_batches(self, batch):
        """Condition dropout may leave parts of a text encoder unused: probe with none and all dropped."""
        if batch["drop"] is None:
            return [batch]
        return [{**batch, "drop": torch.zeros_like(batch["drop"])}, {**batch, "drop": torch.ones_like(batch["drop"])}]

    def compile(self, model):
        # the denoiser only: tokenisation and condition dropout stay eager Python, and the state-dict
        # names stay those of the plain module (no `_orig_mod.`)
        model.denoiser.compile()

    # ---- bookkeeping and outputs ----------------------------------------------------------------
    def state(self) -> dict:
        return {"data": self.data.fingerprint(), "source_sha256": self.source_sha256,
                **parts.text_encoder_state(self.model.conditioner)}

    def load_state(self, state: dict) -> None:
        if state.get("data") and state["data"] != self.data.fingerprint():
            raise UserError("the training data changed since the run started (other items, shapes or values); "
                            "resume on the data the run was started with")
        if state.get("source_sha256") and state["source_sha256"] != self.source_sha256:
            raise UserError(f"--init-from {self.config.init_from} holds other weights than the model the run "
                            "started from; resume with that model")

    def describe(self) -> dict:
        conditioner = self.model.conditioner
        return {"schedule": self.schedule.to_dict(), "objective": self.objective, "conditioning": self.conditioning,
                "denoiser": parts.config_dict(self.model.denoiser), "conditioner": parts.config_dict(conditioner),
                "spatial": parts.config_dict(self.spatial), "latent_shape": list(self.data.latent_shape),
                "num_items": len(self.data)}

    def pipeline(self, model: Stage2):
        """A sampling Pipeline over these weights: what `ldm sample` (inpaint, upscale, semantic) will run."""
        from ldmkit.pipelines import Pipeline

        return Pipeline(self.autoencoder, model.denoiser, self.schedule, model.conditioner, prediction=self.objective,
                        conditioning=self.conditioning, concat=self.spatial_kind,
                        latent_size=list(self.data.latent_shape[1:]), defaults=self.defaults(), spatial=self.spatial)

    def defaults(self) -> dict:
        d = {"sampler": self.sampler, "steps": self.config.sample_steps, "guidance": self.config.guidance}
        if self.noise_labels:
            d["noise_level"] = min(20, self.config.noise_level_max)  # the x4 upscaler's default, within range
        return d

    def sample_prompts(self) -> list:
        return list(self.config.sample_prompts) or self.data.first_conditions(self.conditioning, 4)

    def samples(self, model: Stage2, path: Path, step: int) -> None:
        """Fixed prompts x fixed seeds through the sampling pipeline: a row per seed (spatial runs: the
        first items regenerated from their spatial input, the inputs in the first row)."""
        from ldmkit.io.images import make_grid, save_png

        c = self.config
        pipe = self.pipeline(model)
        guidance = self.defaults()["guidance"]
        settings = dict(sampler=self.sampler, steps=c.sample_steps, guidance=guidance, progress=False)
        if self.spatial_kind is not None:
            images, prompts = parts.spatial_grid(self, pipe, settings)
        else:
            prompts = self.sample_prompts()
            kw = {"class_label": prompts} if self.conditioning == "class" else (
                {"prompt": prompts} if self.conditioning == "text" else {})
            images = [r.image for seed in c.sample_seeds
                      for r in pipe.text2img(num=max(1, len(prompts)), seed=seed, batch_size=max(1, len(prompts)),
                                             **kw, **settings)]
        save_png(make_grid(images, nrow=max(1, len(prompts))), path,
                 {"step": step, "prompts": json.dumps([str(p) for p in prompts]),
                  "seeds": json.dumps(list(c.sample_seeds)), "guidance": guidance, "sampler": self.sampler,
                  "steps": c.sample_steps})

    def usage(self, result: Path) -> str:
        task = {"inpaint": "inpaint --image IMG --mask MASK", "upscale": "upscale --image LOWRES",
                "semantic": "semantic --map MAP.png"}.get(self.spatial_kind, "sample")
        return f"model written to {result} (load with: ldm {task} --model {result} ...)"

    def export(self, model: Stage2, out: Path) -> Path:
        """The averaged weights as a model folder `ldm sample --model` loads."""
        from ldmkit.io.format import save_model
        from ldmkit.training.config import to_dict

        index = {"schedule": self.schedule.to_dict(), "objective": self.objective, "conditioning": self.conditioning,
                 "concat": self.spatial_kind, "latent_size": list(self.data.latent_shape[1:]),
                 "defaults": self.defaults(), "training": {"method": self.name, "config": to_dict(self.config)}}
        components = {"autoencoder": self.autoencoder, "denoiser": model.denoiser, "conditioner": model.conditioner,
                      "spatial": self.spatial}
        return save_model(out / "model", components, index)
