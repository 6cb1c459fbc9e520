"""The shared wiring of every generation task: check settings, encode conditions, sample, decode.

A pipeline holds the four pieces of a latent diffusion model

    autoencoder (stage 1)   conditioner (text / class / none)   denoiser (UNet / DiT)   schedule

and owns no math: noise comes from seeded generators, the sampler and the
classifier-free-guidance wrapper come from `ldmkit.diffusion`, the forward
process (`noise_to`) puts known latents at a noise level. The task modules
(text2img, img2img, inpaint, upscale, semantic) only say what the latents start from and
what is concatenated to the denoiser's input; `PipelineCore.generate` does the rest:

    for each batch of images:
        cond, uncond  = conditioner.encode(prompts), conditioner.encode(negatives) | null
        x_T           = per-image noise (image i: seed + i)  |  noise_to(z0, noise, sigma_start)
        D             = Denoiser(cfg(model_fn, cond, uncond, guidance), schedule, prediction, plan)
        z0            = sampler(D, x_T, plan.sigmas[start:], generator=per-image generators)
        images        = decode(z0)  (sliced / tiled)

Determinism: image i of a call has its own CPU generator seeded with seed + i: it draws the
image's starting noise (float32) and, for stochastic samplers (ddpm, euler_a, ddim with eta > 0),
the image's share of every step's noise. So an image depends on its seed only, not on the batch
it was made in or the device.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ldmkit.conditioning.base import trim_padding
from ldmkit.conditioning.prompt_syntax import encode_prompts, same_length
from ldmkit.diffusion import (Denoiser, cfg, get_sampler, img2img_start, noise_to, plan, prediction_name,
                              sampler_names, split_options)
from ldmkit.pipelines import feature_cache, vae_decode
from ldmkit.pipelines.control import ControlRun
from ldmkit.util import progress, weights_sha256

CONDITIONINGS = ("text", "class", "none")
CONCAT_KINDS = (None, "inpaint", "upscale", "semantic")


@dataclass
class Result:
    """One generated image with the settings that made it (the PNG text chunks)."""

    image: Any  # PIL.Image.Image
    metadata: dict


@dataclass
class Settings:
    """Sampling settings shared by every task; `Pipeline.settings(...)` fills the defaults."""

    sampler: str
    steps: int
    guidance: float
    guidance_rescale: float = 0.0
    height: int = 0
    width: int = 0
    batch_size: int = 4            # images per sampler run
    max_model_batch: int | None = None  # cap on the denoiser batch (CFG doubles it); None = no cap
    decode_batch: int | None = 1   # latents decoded at a time (sliced decode)
    vae_tile: int | None = None    # latent tile side for tiled decode; None = auto, 0 = never
    progress: bool = True
    sampler_options: dict = field(default_factory=dict)  # e.g. DDIM's set_alpha_to_one, clip_x0, eta
    micro: dict = field(default_factory=dict)  # SDXL micro-conditioning (conditioning.sdxl.MICRO); {} = defaults
    cache_interval: int = 1  # UNet feature caching: the whole UNet every N-th evaluation (pipelines.feature_cache)
    cache_branch: int = 0  # where it cuts the UNet (denoisers.feature_cache)
    fast_decode: bool = False  # decode with the pipeline's tiny decoder (pipelines.vae_decode.fast)


def _slice_cond(cond: Any, lo: int, hi: int, batch: int) -> Any:
    """Rows lo:hi of every batch-sized tensor inside a conditioning (dataclass/dict/list/tensor)."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond[lo:hi] if cond.dim() > 0 and cond.shape[0] == batch else cond
    if isinstance(cond, dict):
        return {k: _slice_cond(v, lo, hi, batch) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(_slice_cond(v, lo, hi, batch) for v in cond)
    if dataclasses.is_dataclass(cond):
        return type(cond)(**{f.name: _slice_cond(getattr(cond, f.name), lo, hi, batch)
                             for f in dataclasses.fields(cond) if f.init})
    return cond


def _repeat_to(t: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """A per-image tensor [B0, ...] repeated along dim 0 to the model batch (CFG gives 2 * B0)."""
    if t is None or t.shape[0] == batch:
        return t
    if batch % t.shape[0]:
        raise ValueError(f"cannot spread {t.shape[0]} conditioning rows over a batch of {batch}")
    return t.repeat(batch // t.shape[0], *([1] * (t.dim() - 1)))


def latent_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Pixel mask [B,1,H,W] in [0,1] (1 = repaint) -> latent mask: a latent cell is repainted
    when any of its f x f pixels is (max-pool), so every masked pixel gets regenerated."""
    return F.max_pool2d(mask, kernel_size=factor, stride=factor)


class PipelineCore:
    """The wiring every task shares (settings, conditions, seeded noise, sampling, decoding); the
    `Pipeline` users hold (`pipeline.py`) adds one method per task."""

    def __init__(self, autoencoder: torch.nn.Module, denoiser: torch.nn.Module, schedule,
                 conditioner: torch.nn.Module | None = None, *, prediction: str | None = None,
                 conditioning: str | None = None,
                 concat: str | None = None, defaults: dict | None = None, latent_size: Sequence[int] | None = None,
                 model_hash: str | None = None, model_name: str | None = None,
                 spatial: torch.nn.Module | None = None):
        self.autoencoder = autoencoder.eval()
        self.denoiser = denoiser.eval()
        self.conditioner = conditioner.eval() if conditioner is not None else None
        self.schedule = schedule
        flow = getattr(schedule, "kind", "discrete") == "flow"
        self.prediction = prediction_name(prediction or ("flow" if flow else "eps"))
        if (self.prediction == "flow") != flow:
            raise ValueError(f"a {self.prediction!r}-prediction denoiser does not fit a {schedule.kind} schedule")
        if conditioning is None:
            conditioning = "none" if conditioner is None else "text"
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning={conditioning!r} must be one of {CONDITIONINGS}")
        if conditioning != "none" and conditioner is None:
            raise ValueError(f"model conditioning is {conditioning!r} but the model has no conditioner component")
        if concat not in CONCAT_KINDS:
            raise ValueError(f"concat={concat!r} must be one of {CONCAT_KINDS}")
        self.conditioning = conditioning
        self.concat = concat
        self.spatial = spatial  # the model folder's `spatial` component (records the concat input)
        self.defaults = dict(defaults or {})
        cfg = denoiser.config
        self.latent_channels = autoencoder.latent_channels
        self.factor = autoencoder.downsample_factor
        train = latent_size or [getattr(cfg, "sample_size", None) or 8] * 2  # sample_size may be null
        self.latent_size = (int(train[0]), int(train[-1]))
        self.model_name = model_name
        self._model_hash = model_hash
        self.adapters: list[dict] = []  # LoRAs and embeddings loaded into this pipeline (PNG metadata)
        self.controlnets: list = []  # pipelines.control.Attached, in the order their images are given
        self.ip_adapter = None  # pipelines.image_prompt.Attached: an IP-Adapter with its image encoder
        self.refiner = None  # (PipelineCore, start fraction): SDXL's ensemble of experts (`Pipeline.load_refiner`)
        self.step_hook = None  # f(step, steps, x0) after every sampler step; an exception it raises stops sampling
        self.tiny_decoder = None  # autoencoder.tiny.TinyDecoder: fast decoding and previews
        extra = getattr(denoiser, "latent_in_channels", cfg.in_channels) - self.latent_channels  # FLUX: unpacked
        want = {None: 0, "inpaint": self.latent_channels + 1, "upscale": None, "semantic": None}[concat]
        if concat is None and extra != 0:
            raise ValueError(f"denoiser takes {cfg.in_channels} input channels but the autoencoder makes "
                             f"{self.latent_channels}-channel latents and model_index.json says concat=null")
        if want is not None and concat is not None and extra != want:
            raise ValueError(f"concat={concat!r} needs a denoiser with {self.latent_channels + want} input "
                             f"channels (latents + mask + masked-image latents), got {cfg.in_channels}")
        if concat == "upscale" and extra < 1:
            raise ValueError(f"concat='upscale' needs extra input channels for the low-resolution image; "
                             f"the denoiser takes {cfg.in_channels} = latent channels")
        # semantic synthesis: in_channels = latent channels + one one-hot channel per map class
        self.num_classes = extra if concat == "semantic" else 0
        if concat == "semantic":
            if extra < 1:
                raise ValueError(f"concat='semantic' needs one extra input channel per map class; the denoiser "
                                 f"takes {cfg.in_channels} = latent channels")
            sc = getattr(spatial, "config", None)
            if sc is not None and (sc.kind != "semantic" or sc.num_classes != extra):
                raise ValueError(f"the spatial component ({sc.kind!r}, {sc.num_classes} classes) does not fit a "
                                 f"semantic denoiser with {cfg.in_channels} = {self.latent_channels} latent + "
                                 f"{extra} map-class input channels")

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @property
    def is_dit(self) -> bool:
        return hasattr(self.denoiser.config, "patch_size")

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this: the autoencoder factor (x patch size for DiT)."""
        patch = getattr(self.denoiser, "latent_multiple", None)  # FLUX packs 2x2 latent patches
        return self.factor * (patch or (self.denoiser.config.patch_size if self.is_dit else 1))

    @property
    def model_hash(self) -> str:
        """First 10 hex digits of the sha256 of the denoiser weights file (A1111's convention)."""
        if self._model_hash is None:
            self._model_hash = weights_sha256(self.denoiser)[:10]
        return self._model_hash

    @property
    def tasks(self) -> list[str]:
        if self.concat == "upscale":
            return ["upscale"]
        if self.concat == "inpaint":
            return ["inpaint"]
        if self.concat == "semantic":
            return ["semantic2img"]
        return ["text2img", "img2img", "inpaint"]

    def to(self, device=None, dtype=None) -> "PipelineCore":
        for m in (self.autoencoder, self.denoiser, self.conditioner, *(u.net for u in self.controlnets),
                  self.ip_adapter, self.tiny_decoder):
            if m is not None:
                m.to(device=device, dtype=dtype)
        return self

    def require_task(self, task: str) -> None:
        if task not in self.tasks:
            kind = {"upscale": "a super-resolution", "inpaint": "an inpainting",
                    "semantic": "a semantic-synthesis"}.get(self.concat, "a generation")
            hint = " (give it a class map: `ldm semantic --map MAP.png`)" if self.concat == "semantic" else ""
            raise ValueError(f"this is {kind} model (concat={self.concat!r}); it supports {', '.join(self.tasks)}, "
                             f"not {task}{hint}")

    # ------------------------------------------------------------------ settings
    def settings(self, *, sampler=None, steps=None, guidance=None, guidance_rescale=None, height=None,
                 width=None, batch_size=None, max_model_batch=None, decode_batch=1, vae_tile=None,
                 progress=True, sampler_options=None, micro=None, cache_interval=None, cache_branch=None,
                 fast_decode=False) -> Settings:
        """Fill unset values from model_index.json "defaults" (then built-in ones) and check them all."""
        d = self.defaults
        flow = getattr(self.schedule, "kind", "discrete") == "flow"
        sampler = sampler or d.get("sampler") or ("flow_euler" if flow else "dpmpp_2m")
        valid = sampler_names(self.schedule)
        if sampler not in valid:
            raise ValueError(f"unknown sampler {sampler!r} for this model's {'flow' if flow else 'discrete'} "
                             f"schedule; valid samplers: {', '.join(valid)}")
        steps = int(steps if steps is not None else d.get("steps", 25))
        T = self.schedule.num_train_timesteps
        if not 1 <= steps <= T:
            raise ValueError(f"steps={steps} must be in [1, {T}]")
        cond = self.conditioning != "none"
        guidance = float(guidance if guidance is not None else d.get("guidance", 7.5 if cond else 1.0))
        if not cond or getattr(self.denoiser, "guidance_mode", "cfg") == "none":  # FLUX.1-schnell: none
            guidance = 1.0
        if not (guidance >= 0 and math.isfinite(guidance)):
            raise ValueError(f"guidance={guidance} must be a finite number >= 0")
        rescale = float(guidance_rescale if guidance_rescale is not None else d.get("guidance_rescale", 0.0))
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"guidance rescale={rescale} is outside the allowed range [0, 1]")
        m = self.size_multiple
        height = int(height if height is not None else d.get("height", self.latent_size[0] * self.factor))
        width = int(width if width is not None else d.get("width", self.latent_size[1] * self.factor))
        for name, v in (("height", height), ("width", width)):
            if v < m or v % m:
                raise ValueError(f"{name}={v} must be a positive multiple of {m} "
                                 f"(the autoencoder's downsample factor {self.factor}"
                                 + (f" x DiT patch size {self.denoiser.config.patch_size})" if self.is_dit else ")"))
        batch_size = int(batch_size if batch_size is not None else d.get("batch_size", 4))
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if max_model_batch is not None and int(max_model_batch) < 1:
            raise ValueError(f"max_model_batch={max_model_batch} must be >= 1")
        if decode_batch is not None and int(decode_batch) < 1:
            raise ValueError(f"decode_batch={decode_batch} must be >= 1")
        if vae_tile is not None and int(vae_tile) != 0 and int(vae_tile) < 4:
            raise ValueError(f"vae_tile={vae_tile} must be 0 (off) or >= 4 latent pixels")
        if sampler_options is None:  # the model's options belong to its default sampler (e.g. from diffusers)
            sampler_options = dict(d.get("sampler_options") or {}) if sampler == d.get("sampler") else {}
        return Settings(sampler, steps, guidance, rescale, height, width, batch_size, max_model_batch,
                        decode_batch, vae_tile, progress, dict(sampler_options), self._micro(micro),
                        **feature_cache.check(self.denoiser, cache_interval, cache_branch),
                        fast_decode=vae_decode.check_fast(self, fast_decode))

    def _micro(self, micro: dict | None) -> dict:
        """SDXL's micro-conditioning settings, checked (other models take none)."""
        micro = {k: v for k, v in (micro or {}).items() if v is not None}
        if not micro:
            return {}
        if getattr(self.denoiser.config, "addition_embed_type", None) != "text_time":
            raise ValueError(f"{', '.join(sorted(micro))}: micro-conditioning is for SDXL models; this model takes none")
        from ldmkit.conditioning.sdxl import check_micro

        scores = [k for k in micro if k.endswith("aesthetic_score")]
        readers = [self.conditioner] + ([self.refiner[0].conditioner] if self.refiner is not None else [])
        if scores and not any(getattr(getattr(c, "config", None), "requires_aesthetics_score", False) for c in readers):
            raise ValueError(f"{', '.join(scores)}: only an SDXL refiner reads an aesthetic score (load one with "
                             "--refiner, or use the refiner model)")
        return check_micro(micro)

    # ------------------------------------------------------------------ conditioning
    def conditions(self, prompt, class_label, count: int) -> list:
        """One condition per image (prompt strings, class ids/names, or None), checked against the model."""
        if self.conditioning == "none":
            if prompt not in (None, "", []) or class_label is not None:
                raise ValueError("this model is unconditional; it takes no prompt or class")
            return [None] * count
        if self.conditioning == "class":
            if prompt not in (None, "", []):
                raise ValueError("this model is class-conditional; pass a class (--class NAME|ID), not a prompt")
            if class_label is None:
                raise ValueError("this model is class-conditional; pass a class (--class NAME|ID)")
            labels = class_label if isinstance(class_label, (list, tuple)) else [class_label]
            labels = [int(c) if isinstance(c, str) and c.strip().lstrip("-").isdigit() else c for c in labels]
            return [labels[i % len(labels)] for i in range(count)]
        if class_label is not None:
            raise ValueError("this model is text-conditional; pass a prompt, not a class")
        prompts = prompt if isinstance(prompt, (list, tuple)) else [prompt or ""]
        prompts = [str(p) for p in prompts]  # the text conditioner truncates long ones with a warning
        return [prompts[i % len(prompts)] for i in range(count)]

    def _encode(self, conditions: list, negatives: list | None):
        """(cond, uncond) for a batch; uncond is the negative prompt's encoding or the null condition."""
        if self.conditioning == "none":
            return None, None
        text = self.conditioning == "text"  # prompts in A1111's syntax: weights, BREAK, chunks
        cond = encode_prompts(self.conditioner, list(conditions)) if text else self.conditioner.encode(list(conditions))
        mode = getattr(self.denoiser, "guidance_mode", "cfg")
        if mode != "cfg":  # FLUX.1: no classifier-free guidance, so no unconditional side
            if negatives is not None:
                from ldmkit.errors import UserError

                raise UserError(f"this model runs with {'distilled' if mode == 'distilled' else 'no'} guidance, not "
                                "classifier-free guidance: a negative prompt has nothing to act on")
            return cond, None
        if negatives is not None and text:
            uncond = encode_prompts(self.conditioner, list(negatives))
        else:
            uncond = self.conditioner.null(len(conditions))
        # masked trailing padding costs attention time, changes nothing
        return trim_padding(*same_length(cond, uncond))

    def _with_time_ids(self, cond, uncond, s: Settings) -> tuple:
        """SDXL: (cond, uncond) with their micro-conditioning ids (sizes, crop, aesthetic score)."""
        if cond is None or getattr(self.denoiser.config, "addition_embed_type", None) != "text_time":
            return cond, uncond
        from ldmkit.conditioning.sdxl import time_ids

        aesthetic = getattr(getattr(self.conditioner, "config", None), "requires_aesthetics_score", False)
        ids = [time_ids(s.height, s.width, s.micro, k == 1, aesthetic).to(self.device) for k in (0, 1)]
        return (cond.replace(time_ids=ids[0].expand(cond.batch_size, -1)),
                uncond.replace(time_ids=ids[1].expand(uncond.batch_size, -1)))

    # ------------------------------------------------------------------ the sampling loop
    @staticmethod
    def generators(seeds: Sequence[int]) -> list[torch.Generator]:
        """One CPU generator per image, seeded with its seed: it draws all of that image's noise."""
        return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]

    def noise(self, generators: Sequence[torch.Generator], shape: Sequence[int]) -> torch.Tensor:
        """Starting noise (float32): image i from generator i."""
        return torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float32)
                            for g in generators]).to(self.device)

    def model_fn(self, concat: torch.Tensor | None, labels: torch.Tensor | None,
                 max_batch: int | None, control=None, guidance: float | None = None) -> Callable:
        """`model_fn(x, t, cond)` for `diffusion.cfg`: concatenates the spatial inputs, runs the denoiser
        in chunks of at most `max_batch` rows (CFG batch chunking) and returns float32; `control` (a
        `pipelines.control.ControlRun`) adds its ControlNets' residuals; an IP-Adapter gets each chunk's
        image tokens (`Conditioning.image_tokens`); `guidance` is a distilled-guidance model's input (FLUX.1-dev)."""
        den, dtype, latent_c, ip = self.denoiser, self.dtype, self.latent_channels, self.ip_adapter

        def fn(x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
            B = x.shape[0]
            spatial = _repeat_to(concat, B)
            extra_labels = _repeat_to(labels, B)
            step = max_batch or B
            outs = []
            for lo in range(0, B, step):
                hi = min(lo + step, B)
                xi = x[lo:hi]
                latents = xi  # what a ControlNet sees: no spatial channels
                if spatial is not None:
                    xi = torch.cat([xi, spatial[lo:hi].to(xi.dtype)], dim=1)
                c = _slice_cond(cond, lo, hi, B)
                if getattr(c, "concat", None) is not None:  # spatial channels a conditioner supplies
                    xi = torch.cat([xi, c.concat.to(xi.dtype)], dim=1)
                kw = {}
                if c is not None:
                    ctx = getattr(c, "context", None)
                    kw["context"] = ctx.to(dtype) if ctx is not None else None
                    kw["context_mask"] = getattr(c, "mask", None)
                    kw["class_labels"] = getattr(c, "class_labels", None)
                    if getattr(c, "time_ids", None) is not None:  # SDXL: pooled text + micro-conditioning
                        kw["pooled"], kw["time_ids"] = c.pooled.to(dtype), c.time_ids
                    elif getattr(den, "takes_pooled", False):  # SD3's MM-DiT, FLUX
                        kw["pooled"] = c.pooled.to(dtype)
                if guidance is not None:
                    kw["guidance"] = guidance
                if extra_labels is not None:
                    kw["class_labels"] = extra_labels[lo:hi]
                tt = t[lo:hi] if isinstance(t, torch.Tensor) and t.dim() > 0 else t
                if control is not None:
                    kw.update(control.residuals(latents.to(dtype), tt, kw, lo, B))
                if ip is not None:
                    tokens = getattr(c, "image_tokens", None)
                    ip.adapter.use(tokens.to(dtype) if tokens is not None else None)
                out = den(xi.to(dtype), tt, **kw)
                outs.append(out[:, :latent_c].float())  # DiT with learn_sigma also outputs a variance half
            return torch.cat(outs)

        return fn

    @torch.no_grad()
    def sample_latents(self, s: Settings, conditions: list, negatives: list | None, seeds: Sequence[int], *,
                       z0: torch.Tensor | None = None, strength: float = 1.0, mask: torch.Tensor | None = None,
                       concat: torch.Tensor | Callable | None = None, labels: torch.Tensor | None = None,
                       control: list | None = None, guess_mode: bool = False,
                       image_tokens: tuple | None = None, stop: int | None = None,
                       resume: tuple | None = None, desc: str = "sampling") -> torch.Tensor:
        """Denoise one batch. `z0` (scaled latents) with `strength` < 1 starts part way (img2img);
        `mask` (latent, 1 = generate) re-imposes z0 outside it after every step (inpainting by blending);
        `control`: one control image per loaded ControlNet (`pipelines.control.prepare`); `image_tokens`: an
        image prompt's (tokens, unconditional tokens) for the IP-Adapter (`pipelines.image_prompt.prepare`);
        `concat` may be f(generators), called before the starting noise (x4 upscaler: diffusers' order).
        An ensemble of experts: `stop` ends the run before step `stop` (the latents at that noise level come
        back); `resume=(k, x)` starts at step k from the latents x, adding no noise."""
        h, w = s.height // self.factor, s.width // self.factor
        gens = self.generators(seeds)
        concat = concat(gens) if callable(concat) else concat
        z0 = z0(gens) if callable(z0) else z0  # img2img's posterior sample: before the noise (diffusers' order)
        noise = self.noise(gens, (self.latent_channels, h, w))
        sampler, fn_opts, den_opts, p = self._plan(s, h, w)
        start = img2img_start(s.steps, strength) if z0 is not None else 0
        if resume is not None:
            start = max(start, resume[0])
        end = len(p.timesteps) if stop is None else min(max(stop, start), len(p.timesteps))
        if z0 is not None:
            z0 = z0.to(self.device, torch.float32)
        if start >= len(p.timesteps) and resume is None:  # strength 0: nothing to denoise
            return z0.clone()
        sigma0 = p.sigmas[start]
        if resume is not None:
            x = resume[1].to(self.device, torch.float32)
        elif z0 is None or start == 0:
            x = noise  # full strength starts from pure noise, exactly as text-to-image
        else:
            x = noise_to(z0, noise, sigma0).float()
        if mask is not None:
            mask = mask.to(self.device, torch.float32)
            x = mask * x + (1 - mask) * noise_to(z0, noise, sigma0).float()
        if start >= end:  # an expert with no steps to run
            return x

        cond, uncond = self._with_time_ids(*self._encode(conditions, negatives), s)
        if image_tokens is not None:  # cfg pairs them as it pairs the text: [uncond; cond]
            cond, uncond = cond.replace(image_tokens=image_tokens[0]), uncond.replace(image_tokens=image_tokens[1])
        run = None
        if control is not None:
            guess = guess_mode or any(u.net.config.global_pool_conditions for u in self.controlnets)
            run = ControlRun(self.controlnets, control, guess, len(p.timesteps) - start, rows=len(seeds),
                             adapt_context=getattr(self.denoiser, "adapt_context", None))
        mode = getattr(self.denoiser, "guidance_mode", "cfg")  # FLUX.1: "distilled" (dev) or "none" (schnell)
        fn = feature_cache.wrap(self.denoiser, s, self.model_fn(concat, labels, s.max_model_batch, run,
                                                                s.guidance if mode == "distilled" else None))
        if cond is None or mode != "cfg":
            def network(x, t):
                return fn(x, t, cond)
        else:
            network = cfg(fn, cond, uncond, s.guidance, s.guidance_rescale)
        denoise = Denoiser(network, self.schedule, self.prediction, p, clip=den_opts.get("clip_x0"))

        bar = progress(total=end - start, desc=desc, leave=False, disable=not s.progress)

        def callback(i, sigma, x, x0_pred):
            bar.update(1)
            if self.step_hook is not None:  # progress, previews, interrupting (ldm serve)
                self.step_hook(i, end - start, x0_pred)
            if run is not None:
                run.step = i + 1
            if mask is None:
                return None
            known = noise_to(z0, noise, sigma).to(x.dtype)
            return mask * x + (1 - mask) * known

        try:
            out = sampler.fn(denoise, x, p.sigmas[start:end + 1], generator=gens, callback=callback, **fn_opts)
        finally:
            bar.close()
            if self.ip_adapter is not None:
                self.ip_adapter.adapter.use(None)
        if mask is not None and end == len(p.timesteps):  # the final level may not be exactly clean (DDIM)
            out = mask * out + (1 - mask) * z0
        return out

    def _plan(self, s: Settings, h: int, w: int) -> tuple:
        """(sampler, its options, the denoiser's options, the plan) of a run on h x w latents; a dynamically
        shifted flow schedule (FLUX) is shifted for the image's token count."""
        fn_opts, grid_opts, den_opts = split_options(s.sampler, s.sampler_options)
        schedule = self.schedule
        if getattr(schedule, "use_dynamic_shifting", False):
            patch = getattr(self.denoiser, "latent_multiple", None) or getattr(self.denoiser.config, "patch_size", 1)
            schedule = schedule.for_tokens((h // patch) * (w // patch))
        return get_sampler(s.sampler), fn_opts, den_opts, plan(s.sampler, schedule, s.steps, **grid_opts)

    def handover(self, s: Settings) -> int:
        """The step index at which the loaded refiner takes over (`handover_step`)."""
        p = self._plan(s, s.height // self.factor, s.width // self.factor)[3]
        from ldmkit.diffusion.grids import handover_step

        return handover_step(p.timesteps, self.schedule.num_train_timesteps, self.refiner[1])

    @torch.no_grad()
    def decode(self, z: torch.Tensor, s: Settings) -> torch.Tensor:
        """Latents -> images in [-1, 1], sliced by `s.decode_batch` and tiled per `s.vae_tile`."""
        from ldmkit.io.precision import decode_checked

        if s.fast_decode:
            return vae_decode.fast(self.tiny_decoder, z, s.decode_batch)
        # decode_checked: a float16 decode that overflows (SD's VAE does) is redone in float32
        x = decode_checked(self.autoencoder, z, lambda ae, lat: vae_decode.decode(
            ae, lat, batch_size=s.decode_batch, tile_size=s.vae_tile))
        return x.float().clamp(-1, 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images [B,3,H,W] in [-1,1] -> scaled latents: the posterior mode (deterministic), or a sample
        drawn with `generator`."""
        ae_dtype = next(self.autoencoder.parameters()).dtype
        x = images.to(self.device, ae_dtype)
        if generator is None:
            return self.autoencoder.encode_latents(x, sample=False).float()
        return self.autoencoder.encode_latents(x, generator=generator).float()

    def metadata(self, task: str, s: Settings, condition, negative, seed: int, **extra) -> dict:
        from ldmkit import __version__

        meta = {"task": task}
        if self.conditioning == "text":
            meta["prompt"] = condition
            meta["negative_prompt"] = negative or ""
        elif self.conditioning == "class":
            meta["class"] = condition
        meta.update({"seed": int(seed), "sampler": s.sampler, "steps": s.steps})
        if self.conditioning != "none":
            meta["guidance"] = s.guidance
            if s.guidance_rescale:
                meta["guidance_rescale"] = s.guidance_rescale
        meta["size"] = f"{s.width}x{s.height}"
        meta.update(feature_cache.metadata(s), **({"decoder": "tiny"} if s.fast_decode else {}))
        meta.update({k: v for k, v in extra.items() if v is not None})
        meta["model_hash"] = self.model_hash
        loras = [a for a in self.adapters if a["kind"] == "lora"]
        if loras:
            meta["loras"] = ", ".join(f"{a['name']}:{a['scale']:g}" for a in loras)
            meta["lora_hashes"] = ", ".join(f"{a['name']}: {a['hash']}" for a in loras)
        embeddings = [a for a in self.adapters if a["kind"] == "embedding"]
        if embeddings:
            meta["ti_hashes"] = ", ".join(f"{a['name']}: {a['hash']}" for a in embeddings)
        if self.model_name:
            meta["model"] = self.model_name
        for k, v in s.micro.items():  # SDXL micro-conditioning given by the user
            meta[k] = ", ".join(map(str, v)) if isinstance(v, tuple) else v
        if self.refiner is not None:
            refiner, start = self.refiner
            meta.update(refiner=refiner.model_name or "refiner", refiner_start=start, refiner_hash=refiner.model_hash)
        meta["version"] = f"ldmkit {__version__}"
        return meta

    def generate(self, task: str, s: Settings, conditions: list, negative, seed: int,
                 batch_inputs: Callable[[list[int]], dict], meta_extra: dict | None = None,
                 meta_of: Callable[[int], dict] | None = None) -> list[Result]:
        """Run all images in batches of `s.batch_size`: image i gets seed + i and conditions[i];
        `batch_inputs(indices)` gives the task's per-batch tensors (z0, strength, mask, concat, labels);
        `meta_extra` is metadata of every image, `meta_of(i)` that of image i only."""
        from ldmkit.io.images import tensor_to_pil

        n = len(conditions)
        negatives = None
        if negative is not None and self.conditioning == "text":
            negs = negative if isinstance(negative, (list, tuple)) else [negative]
            negatives = [str(negs[i % len(negs)]) for i in range(n)]
        results = []
        for lo in range(0, n, s.batch_size):
            idx = list(range(lo, min(lo + s.batch_size, n)))
            seeds = [seed + i for i in idx]
            inputs = batch_inputs(idx)
            conds, negs = [conditions[i] for i in idx], [negatives[i] for i in idx] if negatives else None
            desc = f"{task} {lo + 1}-{idx[-1] + 1}/{n}"
            if self.refiner is None:
                images = self.decode(self.sample_latents(s, conds, negs, seeds, desc=desc, **inputs), s)
            else:  # SDXL's ensemble of experts: the base's first steps, the refiner's last, in latent space
                refiner, k = self.refiner[0], self.handover(s)
                z = self.sample_latents(s, conds, negs, seeds, desc=desc, stop=k, **inputs)
                kept = {name: v for name, v in inputs.items() if name in ("z0", "strength", "mask")}
                z = refiner.sample_latents(s, conds, negs, seeds, desc=desc + " (refiner)", resume=(k, z), **kept)
                images = refiner.decode(z, s)
            for j, i in enumerate(idx):
                meta = self.metadata(task, s, conditions[i], negatives[i] if negatives else None, seed + i,
                                     **(meta_extra or {}), **(meta_of(i) if meta_of else {}))
                results.append(Result(tensor_to_pil(images[j]), meta))
        return results


def image_count(prompt, num: int | None) -> int:
    """Images one call makes: `num` if given, else one per prompt of a list, else 1."""
    n = num if num is not None else (len(prompt) if isinstance(prompt, (list, tuple)) and prompt else 1)
    if n < 1:
        raise ValueError(f"num={n} must be >= 1")
    return n
