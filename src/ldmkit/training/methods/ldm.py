"""Method "ldm": a latent diffusion model trained on latents cached from a frozen autoencoder.

    latents z0 = mean + std * eps (cached posterior) ──┐
    t ~ p(t), noise ─ q_sample ─▶ z_t ─────────────────┼─▶ denoiser([z_t, spatial], t, tau(y)) ─▶ loss vs target
    captions / labels ─ conditioner (condition dropout) ┘

* The denoiser is a UNet or a DiT from a preset, fitted to the latents (channels, size), the
  conditioning (text: cross-attention width of the text encoder; class: a label table) and the
  spatial input; the objective is eps / v / x0 / flow (`ldmkit.diffusion`).
* Batches: a permutation per epoch, cut into global batches; everything random about a step
  (posterior samples, noise, timesteps, condition dropout, masks) is drawn for the whole global batch
  from a generator seeded by (seed, step), each rank taking its rows -- so resume is exact, and N
  processes with A accumulation steps compute bit for bit the update of one process with N * A.
* Spatial conditioning (`spatial`, the LDM paper's concatenation) appends to z_t what the pipelines
  append, built per step from the images / maps stored in the cache: inpaint [mask, latents of the
  masked image] (masks drawn per step), upscale [low-res image] (+ its noise level as class label for
  UNets without class conditioning, as SD's x4 upscaler), semantic [one-hot map]. Condition dropout
  drops only the text / class condition: the spatial input stays in both CFG branches.
* Output: RUN/model, a model folder with the EMA weights (`ldm sample --model RUN/model`).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ldmkit.conditioning import spatial as sp
from ldmkit.conditioning.base import Conditioning, mix, trim_padding
from ldmkit.data.latents import LatentData, check_cache_matches, open_latents
from ldmkit.diffusion import (TIMESTEP_SAMPLING, DiscreteSchedule, FlowSchedule, model_timestep, q_sample,
                              sample_timesteps, sampler_names, training_loss)
from ldmkit.errors import UserError
from ldmkit.training.config import TrainConfig, option
from ldmkit.training.loop import Method, Run

DENOISERS = ("unet", "dit")
CONDITIONINGS = ("text", "class", "none")
TEXT_ENCODERS = {"tiny": dict(depth=1, heads=2), "small": dict(depth=2, heads=4), "base": dict(depth=4, heads=8)}
FROZEN_TEXT_ENCODERS = ("minilm",)  # weights from an installed package; the denoiser reads their width


@dataclass(frozen=True)
class LDMConfig(TrainConfig):
    out: str = option("", "run folder: config.json, checkpoints/, samples/, loss.csv, loss.png, model/ (required)",
                      resume=True)
    latents: str = option("", "latent cache folder (`ldm cache-latents`)")
    autoencoder: str = option("", "the frozen autoencoder the cache was encoded with (a component folder)")
    denoiser: str = option("unet", "network: unet (SD-compatible) or dit", choices=DENOISERS)
    preset: str = option("tiny", "denoiser preset (ldmkit.denoisers.unet / dit PRESETS)")
    conditioning: str = option("text", "text (captions), class (labels) or none", choices=CONDITIONINGS)
    text_encoder: str = option("tiny", "trainable text transformer (tiny, small, base) or minilm (frozen "
                               "all-MiniLM-L6-v2)", choices=tuple(TEXT_ENCODERS) + FROZEN_TEXT_ENCODERS)
    text_encoder_layer: int | None = option(None, "minilm: read the hidden states after this layer (0 = the token "
                                            "embeddings; default: the last)", lo=0, hi=6)
    normalize_text: bool = option(False, "lower-case captions and prompts and drop their punctuation before "
                                  "encoding (recorded in the model, so sampling does the same)")
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
    sample_posterior: bool = option(True, "z0 = mean + std * eps from the cached posterior (else its mean)")
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

    def validate(self) -> None:
        """The rules between fields (each field's own rules are checked by `config.check`)."""
        unet_only = [n for n in ("context_adapter_layers", "position_features") if getattr(self, n)]
        if unet_only and self.denoiser != "unet":
            raise UserError(f"{', '.join(unet_only)} extend a UNet; denoiser is {self.denoiser!r}")
        if self.context_adapter_layers and self.conditioning == "none":
            raise UserError("context_adapter_layers re-mixes a condition's tokens; conditioning is 'none'")
        if self.text_encoder_layer is not None and (self.conditioning, self.text_encoder) != ("text", "minilm"):
            raise UserError("text_encoder_layer picks a layer of the frozen minilm encoder; it needs conditioning "
                            f"'text' and text_encoder 'minilm', got {self.conditioning!r} / {self.text_encoder!r}")
        flow = self.objective == "flow"
        valid = sampler_names(FlowSchedule() if flow else DiscreteSchedule())
        if self.sampler not in valid:
            raise UserError(f"sampler {self.sampler!r} does not fit objective {self.objective!r}; use one of {valid}")
        preset_table(self.denoiser, self.preset)


def preset_table(denoiser: str, preset: str):
    from ldmkit.denoisers.dit import PRESETS as DIT
    from ldmkit.denoisers.unet import PRESETS as UNET

    table = UNET if denoiser == "unet" else DIT
    if preset not in table:
        raise UserError(f"{denoiser} preset {preset!r} is not one of {sorted(table)}")
    return table[preset]


class Stage2(nn.Module):
    """Denoiser + conditioner as one module, so DDP, the EMA and the optimiser see both."""

    def __init__(self, denoiser: nn.Module, conditioner: nn.Module | None):
        super().__init__()
        self.denoiser, self.conditioner = denoiser, conditioner

    def forward(self, x, t, conditions=None, drop=None, concat=None, labels=None):
        """`drop` [B] nulls the text / class condition of those rows; `concat` [B, C, h, w] (spatial input)
        and `labels` [B] (upscale noise levels) stay as they are."""
        cond = Conditioning()
        if self.conditioner is not None:
            cond = self.conditioner.encode(list(conditions))
            if drop is not None and bool(drop.any()):
                cond = mix(cond, self.conditioner.null(len(conditions)), ~drop)
            cond = trim_padding(cond)[0]
        if concat is not None or labels is not None:
            cond = cond.merge(Conditioning(concat=concat, class_labels=labels))
        return self.denoiser(cond.denoiser_input(x), t, **cond.denoiser_kwargs())


class LDM(Method):
    """Train a denoiser (and a trainable text encoder) on cached latents. `data` replaces the cache
    (tests, scripts); `caption_transform(captions, step) -> captions` rewrites each micro-batch's
    captions before encoding (a recipe's caption augmentation; it must be a pure function of its
    arguments so that resume stays exact)."""

    name = "ldm"
    summary = "a latent diffusion model (UNet or DiT; text, class or no conditioning) on latents cached from a frozen autoencoder."
    outputs = ("model",)

    def __init__(self, config: LDMConfig, data: LatentData | None = None,
                 caption_transform: Callable[[list[str], int], list[str]] | None = None):
        config.validate()
        self.config, self._data, self.caption_transform = config, data, caption_transform

    # ---- building ---------------------------------------------------------------------------
    def build(self, run: Run) -> nn.Module:
        c = self.config
        self.ctx, self.micro, self.device = run.ctx, run.micro_batch, run.ctx.device
        where = f"the latent cache {c.latents}" if c.latents else "the latent data"
        self.data = self._data if self._data is not None else open_latents(c.latents)
        self.data.check_conditioning(c.conditioning, where)
        self.autoencoder = load_frozen_autoencoder(c.autoencoder, self.device)
        check_cache_matches(self.data, self.autoencoder, where, c.autoencoder)
        self.spatial = build_spatial(c, self.data, self.autoencoder, where)
        self.noise_labels = uses_noise_labels(c)
        self.schedule = make_schedule(c)
        self.steps_per_epoch = len(self.data) // c.batch_size
        if self.steps_per_epoch < 1:
            raise UserError(f"{where} holds {len(self.data)} items: too few for a global batch of {c.batch_size}")
        extra = (run.resume_state or {}) if run.resumed else (run.init or {}).get("extra") or {}
        init_modules = _init_modules(run.init) if run.init and "folder" in run.init else {}
        conditioner = init_modules.get("conditioner_module") or build_conditioner(c, self.data, extra)
        denoiser = build_denoiser(c, self.data, conditioner, self.spatial)
        model = Stage2(denoiser, conditioner)
        if run.init:
            load_weights(model, _init_weights(run.init, init_modules), c.init_from)
        self.model = model
        return model

    # ---- batches ----------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> list[int]:
        """The order epoch `epoch` visits the items in (a permutation seeded by (seed, epoch))."""
        return torch.randperm(len(self.data), generator=torch.Generator().manual_seed(self.config.seed + epoch)).tolist()

    def draw(self, step: int) -> dict:
        """All randomness of optimiser step `step`, for the whole global batch (CPU)."""
        c = self.config
        g = torch.Generator().manual_seed((c.seed * 1_000_003 + step * 7919 + 12345) % (2**63 - 1))
        shape = (c.batch_size, *self.data.latent_shape)
        method = c.timestep_sampling if c.timestep_sampling != "auto" else (
            "logit_normal" if c.objective == "flow" else "uniform")
        out = {"post": torch.randn(shape, generator=g), "noise": torch.randn(shape, generator=g),
               "t": sample_timesteps(self.schedule, c.batch_size, g, method=method),
               "drop": torch.rand(c.batch_size, generator=g) < c.cond_drop}
        if c.spatial == "inpaint":
            out["mask"] = sp.random_masks(c.batch_size, *self._image_size(), generator=g)
        if self.noise_labels:
            out["level"] = torch.randint(0, c.noise_level_max + 1, (c.batch_size,), generator=g)
            out["lr_noise"] = torch.randn(c.batch_size, 3, *self.data.latent_shape[1:], generator=g)
        return out

    def batches(self, start: int):
        """Step k of an epoch is the k-th block of `batch_size` items of its order; the block splits into
        W x accum micro-batches of m rows, rank r taking the accum micro-batches r*accum ... (r+1)*accum - 1
        -- so one process with W*accum accumulation steps computes the very same micro-batches."""
        c, m = self.config, self.micro
        first = self.ctx.rank * c.grad_accum
        order: tuple[int, list[int]] | None = None
        for step in itertools.count(start):
            epoch, k = divmod(step, self.steps_per_epoch)
            if order is None or order[0] != epoch:
                order = (epoch, self._epoch_order(epoch))
            draws = self.draw(step)
            micro_batches = []
            for a in range(first, first + c.grad_accum):
                rows = torch.arange(a * m, (a + 1) * m)  # rows of the step's global batch and draws
                idx = order[1][k * c.batch_size + a * m: k * c.batch_size + (a + 1) * m]
                micro_batches.append(self.micro_batch(idx, rows, draws, step))
            yield micro_batches

    def micro_batch(self, idx: list[int], rows: torch.Tensor, draws: dict, step: int) -> dict:
        c, dev, data = self.config, self.device, self.data
        ix = torch.as_tensor(idx, dtype=torch.long)
        mean, std = data.mean[ix].to(dev), data.std[ix].to(dev)
        z0 = mean + std * draws["post"][rows].to(dev) if c.sample_posterior else mean
        conditions = data.conditions(c.conditioning, idx)
        if conditions is not None and c.conditioning == "text" and self.caption_transform is not None:
            conditions = list(self.caption_transform(conditions, step))
        batch = {"z0": z0, "noise": draws["noise"][rows].to(dev), "t": draws["t"][rows], "conditions": conditions,
                 "drop": draws["drop"][rows].to(dev) if conditions is not None and c.cond_drop > 0 else None,
                 "concat": None, "labels": None}
        if self.spatial is not None:
            batch["concat"], batch["labels"] = self.spatial_input(ix, draws, rows)
        return batch

    def _image_size(self) -> tuple[int, int]:
        f = self.autoencoder.downsample_factor
        return self.data.latent_shape[1] * f, self.data.latent_shape[2] * f

    @torch.no_grad()
    def spatial_input(self, ix: torch.Tensor, draws: dict, rows: torch.Tensor):
        """(concat [b, C, h, w], labels [b] or None) of a micro-batch: what the pipelines concatenate."""
        kind, size = self.config.spatial, self.data.latent_shape[1:]
        if kind == "semantic":
            maps = self.data.segmentation[ix].long()
            return sp.one_hot_map(maps, self.spatial.config.num_classes, size).to(self.device), None
        image = self.data.images[ix].float().div(127.5).sub(1).to(self.device)
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
        c = self.config
        z_t = q_sample(self.schedule, batch["z0"], batch["noise"], batch["t"])
        t = model_timestep(self.schedule, batch["t"]).to(self.device, torch.float32)
        out = model(z_t, t, batch["conditions"], batch["drop"], batch["concat"], batch["labels"])
        loss = training_loss(self.schedule, c.objective, out, batch["z0"], batch["noise"], batch["t"],
                             weighting=c.loss_weighting).mean()
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
        return {"data": self.data.fingerprint(), **_text_encoder_state(self.model.conditioner)}

    def load_state(self, state: dict) -> None:
        if state.get("data") and state["data"] != self.data.fingerprint():
            raise UserError("the latent data changed since the run started (other items, shapes or values); "
                            "resume on the cache the run was started with")

    def describe(self) -> dict:
        conditioner = self.model.conditioner
        return {"schedule": self.schedule.to_dict(), "denoiser": _config_dict(self.model.denoiser),
                "conditioner": _config_dict(conditioner), "spatial": _config_dict(self.spatial),
                "latent_shape": list(self.data.latent_shape), "num_items": len(self.data)}

    def pipeline(self, model: Stage2):
        """A sampling Pipeline over these weights: what `ldm sample` (inpaint, upscale, semantic) will run."""
        from ldmkit.pipelines import Pipeline

        c = self.config
        return Pipeline(self.autoencoder, model.denoiser, self.schedule, model.conditioner, prediction=c.objective,
                        conditioning=c.conditioning, concat=c.spatial, latent_size=list(self.data.latent_shape[1:]),
                        defaults=self.defaults(), spatial=self.spatial)

    def defaults(self) -> dict:
        d = {"sampler": self.config.sampler, "steps": self.config.sample_steps, "guidance": self.config.guidance}
        if self.noise_labels:
            d["noise_level"] = min(20, self.config.noise_level_max)  # the x4 upscaler's default, within range
        return d

    def samples(self, model: Stage2, path: Path, step: int) -> None:
        """Fixed prompts x fixed seeds through the sampling pipeline: a row per seed (spatial runs: the
        first cached items regenerated from their spatial input, the inputs in the first row)."""
        from ldmkit.io.images import make_grid, save_png

        c = self.config
        pipe = self.pipeline(model)
        settings = dict(sampler=c.sampler, steps=c.sample_steps, guidance=c.guidance, progress=False)
        if c.spatial is not None:
            images, prompts = spatial_grid(self, pipe, settings)
        else:
            prompts = list(c.sample_prompts) or self.data.first_conditions(c.conditioning, 4)
            kw = {"class_label": prompts} if c.conditioning == "class" else (
                {"prompt": prompts} if c.conditioning == "text" else {})
            images = [r.image for seed in c.sample_seeds
                      for r in pipe.text2img(num=max(1, len(prompts)), seed=seed, batch_size=max(1, len(prompts)),
                                             **kw, **settings)]
        save_png(make_grid(images, nrow=max(1, len(prompts))), path,
                 {"step": step, "prompts": json.dumps([str(p) for p in prompts]),
                  "seeds": json.dumps(list(c.sample_seeds)), "guidance": c.guidance, "sampler": c.sampler,
                  "steps": c.sample_steps})

    def export(self, model: Stage2, out: Path) -> Path:
        """The averaged weights as a model folder `ldm sample --model` loads."""
        from ldmkit.io.format import save_model
        from ldmkit.training.config import to_dict

        c = self.config
        index = {"schedule": self.schedule.to_dict(), "objective": c.objective, "conditioning": c.conditioning,
                 "concat": c.spatial, "latent_size": list(self.data.latent_shape[1:]), "defaults": self.defaults(),
                 "training": {"method": self.name, "config": to_dict(c)}}
        components = {"autoencoder": self.autoencoder, "denoiser": model.denoiser, "conditioner": model.conditioner,
                      "spatial": self.spatial}
        return save_model(out / "model", components, index)


def spatial_grid(method: LDM, pipe, settings: dict, n: int = 4) -> tuple[list, list]:
    """Sample-grid images of a spatial run: the first `n` cached items regenerated from their spatial
    input with their own condition -- first row the inputs (masked image, low-res image, coloured map),
    then a row per seed -- through the tasks `ldm inpaint` / `ldm upscale` / `ldm semantic` run."""
    from ldmkit.io.images import tensor_to_pil

    c, data = method.config, method.data
    n = min(n, len(data))
    conds = data.conditions(c.conditioning, list(range(n))) or [None] * n

    def kw(cond):
        return {"class_label": cond} if c.conditioning == "class" else (
            {"prompt": cond} if c.conditioning == "text" else {})

    if c.spatial == "semantic":
        seg = data.segmentation[:n].long()
        outputs = [r.image for seed in c.sample_seeds
                   for r in pipe.semantic2img(seg, num=n, seed=seed, batch_size=n, **kw(conds), **settings)]
        return [tensor_to_pil(x) for x in sp.segmentation_colours(seg)] + outputs, conds
    images = data.images[:n].float() / 127.5 - 1
    inputs, outputs = [], [[] for _ in c.sample_seeds]
    for k in range(n):
        if c.spatial == "inpaint":
            mask = sp.centre_mask(*images.shape[-2:])
            inputs.append(tensor_to_pil(images[k] * (1 - mask[0])))
            for row, seed in zip(outputs, c.sample_seeds):
                row.append(pipe.inpaint(images[k], mask, seed=seed + k, **kw(conds[k]), **settings)[0].image)
        else:
            low = sp.low_res_input(images[k:k + 1], data.latent_shape[1:])[0]
            f = method.autoencoder.downsample_factor
            inputs.append(tensor_to_pil(torch.nn.functional.interpolate(low[None], scale_factor=f)[0]))
            for row, seed in zip(outputs, c.sample_seeds):
                row.append(pipe.upscale(low, seed=seed + k, **kw(conds[k]), **settings)[0].image)
    return inputs + [im for row in outputs for im in row], conds


# --------------------------------------------------------------------------- the pieces of a run
def make_schedule(c: LDMConfig):
    """A DiscreteSchedule (SD's offsets for scaled_linear, trailing spacing otherwise) or a FlowSchedule."""
    if c.objective == "flow":
        return FlowSchedule(num_train_timesteps=c.num_train_timesteps)
    betas = {"scaled_linear": (0.00085, 0.012)}.get(c.schedule, (1e-4, 0.02))
    sd = c.schedule == "scaled_linear"
    return DiscreteSchedule(beta_schedule=c.schedule, num_train_timesteps=c.num_train_timesteps, beta_start=betas[0],
                            beta_end=betas[1], timestep_spacing="leading" if sd else "trailing",
                            steps_offset=1 if sd else 0)


def load_frozen_autoencoder(folder: str, device) -> nn.Module:
    from ldmkit.io.format import load_component

    if not folder:
        raise UserError("--autoencoder: a component folder is required (the autoencoder/ folder "
                        "`ldm train-autoencoder` writes)")
    ae = load_component(folder, device=device)
    return ae.requires_grad_(False).eval()


def uses_noise_labels(c: LDMConfig) -> bool:
    """Upscale runs whose UNet takes the low-res noise level as class label (SD x4 upscaler's contract)."""
    return c.spatial == "upscale" and c.denoiser == "unet" and c.conditioning != "class" and c.noise_level_max > 0


def build_spatial(c: LDMConfig, data: LatentData, autoencoder: nn.Module, where: str):
    """The run's SpatialConditioner (None without `spatial`), after checking the cache holds what it
    is built from, at the size the autoencoder encodes to the cached latents."""
    if c.spatial is None:
        return None
    ch, h, w = data.latent_shape
    if c.spatial == "semantic":
        if data.segmentation is None:
            raise UserError(f"spatial 'semantic' needs segmentation maps, but {where} has none; rebuild it with "
                            "`ldm cache-latents --segmentation ...` (shapes) or `--maps DIR` (an image folder)")
        size = tuple(data.segmentation.shape[-2:])
        num_classes = len(data.segmentation_classes or ()) or int(data.segmentation.max()) + 1
    else:
        if data.images is None:
            raise UserError(f"spatial {c.spatial!r} needs the source images, but {where} stores none; rebuild it "
                            "with `ldm cache-latents --store-images ...`")
        size, num_classes = tuple(data.images.shape[-2:]), 0
    f = autoencoder.downsample_factor
    if size != (h * f, w * f):
        raise UserError(f"{where} holds {size[0]}x{size[1]} images/maps but {h}x{w} latents; with the "
                        f"autoencoder's factor {f} they must be {h * f}x{w * f}")
    if c.spatial == "inpaint" and autoencoder.latent_channels != ch:
        raise UserError(f"the autoencoder makes {autoencoder.latent_channels}-channel latents, the cache holds {ch}")
    return sp.SpatialConditioner(sp.SpatialConfig(c.spatial, latent_channels=ch, num_classes=num_classes,
                                                  latent_size=(h, w)))


def build_conditioner(c: LDMConfig, data: LatentData, extra: dict) -> nn.Module | None:
    """A fresh conditioner: a class-label table, the frozen MiniLM, or the LDM paper's trainable text
    transformer with a word vocabulary from the captions (or the one `extra` recorded: a resumed run's,
    an `--init-from` checkpoint's)."""
    if c.conditioning == "none":
        return None
    torch.manual_seed(c.seed + 1)
    if c.conditioning == "class":
        from ldmkit.conditioning import ClassConditioner, ClassConfig

        # UNets with cross-attention also get a one-token class context (the LDM paper's class model)
        cross = c.denoiser == "unet" and preset_table(c.denoiser, c.preset).has_cross_attention
        return ClassConditioner(ClassConfig(num_classes=data.num_classes, class_names=tuple(data.class_names or ()),
                                            context_dim=_cross_dim(c) if cross else None))
    longest = max(len(str(t).split()) for t in set(data.captions))
    if c.text_encoder == "minilm":
        from ldmkit.conditioning import BertTextEncoder

        # word pieces ~ 1.3 per word, plus [CLS]/[SEP]; room for longer prompts at sampling time
        return BertTextEncoder.from_pretrained(max_length=max(16, 2 * longest + 8), use_mask=True,
                                               hidden_layer=c.text_encoder_layer, normalize=c.normalize_text)
    from ldmkit.conditioning.text import TransformerTextConfig, TransformerTextEncoder, word_tokenizer_from_vocab

    if "text_encoder" in extra:
        saved = extra["text_encoder"]
        return TransformerTextEncoder(TransformerTextConfig(**saved["config"]), word_tokenizer_from_vocab(saved["vocab"]))
    return TransformerTextEncoder.from_captions(sorted(set(data.captions)), width=_cross_dim(c),
                                                max_length=max(8, longest + 4), normalize=c.normalize_text,
                                                **TEXT_ENCODERS[c.text_encoder])


def _cross_dim(c: LDMConfig, conditioner=None) -> int:
    """Width of the token sequence the denoiser attends to: a frozen encoder's hidden size, else the preset's."""
    if c.conditioning == "text" and c.text_encoder in FROZEN_TEXT_ENCODERS and conditioner is not None:
        return conditioner.model.config.hidden_size
    cfg = preset_table(c.denoiser, c.preset)
    return cfg.cross_attention_dim if c.denoiser == "unet" else (cfg.cross_attention_dim or cfg.hidden_size)


def build_denoiser(c: LDMConfig, data: LatentData, conditioner, spatial) -> nn.Module:
    """The preset fitted to the latents (channels, size), the conditioning and the spatial input."""
    cfg = preset_table(c.denoiser, c.preset)
    ch, h, _ = data.latent_shape
    extra = spatial.channels if spatial is not None else 0
    torch.manual_seed(c.seed)
    if c.denoiser == "dit":
        from ldmkit.denoisers.dit import DiT

        return DiT(dataclasses.replace(cfg, in_channels=ch + extra, out_channels=ch, learn_sigma=False, sample_size=h,
                                       num_classes=data.num_classes if c.conditioning == "class" else None,
                                       cross_attention_dim=_cross_dim(c, conditioner) if c.conditioning == "text"
                                       else None))
    from ldmkit.denoisers.unet import UNet

    changes = dict(in_channels=ch + extra, out_channels=ch, sample_size=h)
    if c.conditioning == "text":
        changes["cross_attention_dim"] = _cross_dim(c, conditioner)
    if c.conditioning == "class":
        changes["num_class_embeds"] = data.num_classes + 1
    elif uses_noise_labels(c):  # the x4 upscaler's noise level enters as a class label
        changes["num_class_embeds"] = sp.NOISE_LEVELS
    if c.conditioning == "none":  # no context: the same levels without cross-attention
        changes.update(down_block_types=tuple("DownBlock2D" for _ in cfg.down_block_types),
                       up_block_types=tuple("UpBlock2D" for _ in cfg.up_block_types),
                       mid_block_type="UNetMidBlock2D" if cfg.mid_block_type else None)
    unet = UNet(dataclasses.replace(cfg, **changes))
    if not (c.context_adapter_layers or c.position_features):
        return unet
    from ldmkit.denoisers.extensions import ExtendedUNet, ExtendedUNetConfig

    return ExtendedUNet(ExtendedUNetConfig(unet=unet.config, context_adapter_layers=c.context_adapter_layers,
                                           position_features=c.position_features), unet=unet)


def _init_modules(init: dict) -> dict:
    """From an `--init-from` model folder: its denoiser and conditioner weights, and its conditioner
    itself when that is a trainable word-level encoder (its vocabulary must be kept)."""
    from ldmkit.conditioning import TransformerTextEncoder
    from ldmkit.io import load_model

    _, comps = load_model(init["folder"], device="cpu")
    out = {"denoiser": comps.get("denoiser"), "conditioner": comps.get("conditioner")}
    if isinstance(out["conditioner"], TransformerTextEncoder):
        out["conditioner_module"] = out["conditioner"]
    return out


def _init_weights(init: dict, modules: dict) -> dict:
    if "folder" not in init:  # a checkpoint: its averaged weights where it has them
        return (init.get("ema") or {}).get("weights") or init["model"]
    state = {f"denoiser.{k}": v for k, v in modules["denoiser"].state_dict().items()}
    if modules.get("conditioner") is not None:
        state.update({f"conditioner.{k}": v for k, v in modules["conditioner"].state_dict().items()})
    return state


def load_weights(model: nn.Module, state: dict, source: str) -> None:
    """Start `model` from `state`: every trained parameter must be there with its shape (frozen ones may
    be absent: they come from where the run took them)."""
    mine = model.state_dict()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(trained - set(state))
    unexpected = sorted(set(state) - set(mine))
    shapes = sorted(k for k in set(mine) & set(state) if mine[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        raise UserError(f"--init-from {source}: its weights do not fit this run's model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}, other shapes {shapes[:3]}); use the same denoiser, preset, "
                        "conditioning, text encoder and extensions")
    model.load_state_dict({k: v for k, v in state.items() if k in mine}, strict=False)


def _text_encoder_state(conditioner) -> dict:
    """A trainable word-level encoder's vocabulary and config (kept in checkpoints, so a run started
    `--init-from` one, or resumed, keeps the word ids)."""
    from ldmkit.conditioning import TransformerTextEncoder

    if not isinstance(conditioner, TransformerTextEncoder):
        return {}
    return {"text_encoder": {"vocab": conditioner.tokenizer.get_vocab(), "config": dataclasses.asdict(conditioner.config)}}


def _config_dict(module) -> dict | None:
    cfg = getattr(module, "config", None)
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str)) if dataclasses.is_dataclass(cfg) else None
