"""Method "lcm" (`ldm distill --method lcm --teacher MODEL`): latent consistency distillation (Luo et al.
2023) of a pretrained model into a student that samples in 1-8 steps with the LCM sampler -- a whole
UNet that reads the guidance scale, or a LoRA of the teacher (LCM-LoRA, Luo et al. 2023b).

    z0, noise ─ q_sample(t) ─▶ x_t ─┬─▶ student  f(x_t, t, w) = c_skip(t) x_t + c_out(t) x0(x_t, t, w) ─────┐
                                    └─▶ teacher with CFG w: one DDIM step t ─▶ t - k ─▶ x_prev           Huber
                                        target f⁻(x_prev, t - k, w)  (the EMA of the student) ◀──────────────┘

* t is drawn from the teacher's DDIM grid of --num-ddim-timesteps steps (T = 1000, 50: t = 19, 39, ..., 999;
  the skipping-step solver jumps k = T / 50 = 20 training timesteps, to 0 at the first); LCMScheduler's
  `original_inference_steps` is that grid, so the student samples on it.
* c_skip, c_out: the consistency boundary condition (f = x at t = 0) with sigma_data 0.5 and the timestep
  scaled by --timestep-scaling (10), as diffusers' LCM scripts.
* Full students get a guidance input (`UNet.add_guidance_input`, zero-initialised, so step 0 is the teacher):
  w ~ U(--distill-guidance) per sample; sampling reads the scale the user asks for, one UNet call per step
  (diffusers' LatentConsistencyModelPipeline runs the exported folder). The target network is the run's EMA
  of the student (--ema-decay 0.95, without warm-up; it is also what is exported).
* LoRA students (--lora-rank R): the teacher is the same network with its LoRA layers switched off; with
  --ema-decay 0 the target is the student itself without gradients, as in diffusers' LCM-LoRA script. The
  LoRA loads into diffusers (`load_lora_weights`) and AUTOMATIC1111 / ComfyUI (--lora-format kohya).
* Unconditional teachers have no guidance: the student gets no guidance input and the teacher no CFG.
"""
from __future__ import annotations

import copy
import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ldmkit.errors import UserError
from ldmkit.training.config import option
from ldmkit.training.methods.finetune import attach_lora, extract_lora, lora_file_name, lora_metadata
from ldmkit.training.methods.ldm import LDM, LDMConfig
from ldmkit.training.methods.ldm_parts import Stage2, enable_gradient_checkpointing

LCM_LORA_TARGETS = ("attn", "ff", "proj", "conv", "time_emb_proj")  # diffusers' LCM-LoRA layers
SIGMA_DATA = 0.5


@dataclass(frozen=True)
class LCMConfig(LDMConfig):
    init_from: str | None = option(None, "the teacher: a pretrained model (an ldmkit or diffusers folder, an "
                                   "original single file, a bundled name)", flag="teacher")
    steps: int = option(1000, "optimiser steps in all (a resumed run continues to this)", lo=1, resume=True)
    batch_size: int = option(8, "global batch per optimiser step", lo=1)
    lr: float = option(1e-5, "peak learning rate of AdamW (LoRA students: 1e-4 is usual)", lo=0, lo_open=True)
    lr_schedule: str = option("constant", "after warm-up: constant, or cosine to 0 at the last step",
                              choices=("constant", "cosine"))
    warmup_steps: int = option(0, "linear learning-rate warm-up steps", lo=0)
    ema_decay: float = option(0.95, "EMA decay of the student: the consistency target, and the exported weights "
                              "(0: the student itself is the target, as LCM-LoRA)", lo=0, hi=0.999999)
    ema_warmup: bool = option(False, "ramp the EMA decay over the first updates (LCM's target: a constant decay)")
    cond_drop: float = option(0.0, "not used: the teacher's unconditional branch gives the guidance", lo=0, hi=0)
    checkpoint_every: int = option(250, "steps between checkpoints (one is always written at the end)", lo=1,
                                   resume=True)
    sample_every: int = option(250, "steps between sample grids (one is always made at the end)", lo=1, resume=True)
    sample_sampler: str | None = option(None, "sampler of the grids and the student's default (default: lcm)",
                                        resume=True, flag="sampler")
    sample_steps: int = option(4, "sampler steps of the grids and the student's default", lo=1, hi=1000,
                               resume=True)
    guidance: float | None = option(None, "guidance of the grids and the student's default (default: the middle of "
                                    "--distill-guidance for a student with a guidance input, else 1: no CFG)",
                                    lo=0, hi=100, resume=True)
    distill_guidance: tuple[float, float] = option((4.0, 16.0), "range of the teacher's guidance scale, drawn "
                                                   "uniformly per sample (the LCM paper's w is scale - 1)", lo=0,
                                                   hi=100)
    guidance_input: int = option(256, "full students: width of the guidance input (diffusers' time_cond_proj_dim; "
                                 "0: none, the student learns the range's mix; else at least 4)", lo=0, hi=4096)
    num_ddim_timesteps: int = option(50, "steps of the teacher's DDIM grid (the skipping-step solver's jump is "
                                     "T / this)", lo=1, hi=1000)
    timestep_scaling: float = option(10.0, "timestep factor of the boundary scalings c_skip, c_out", lo=0,
                                     lo_open=True)
    loss_type: str = option("huber", "distance between student and target: huber (pseudo-Huber) or l2",
                            choices=("huber", "l2"))
    huber_c: float = option(0.001, "the pseudo-Huber loss's c", lo=0, lo_open=True)
    lora_rank: int = option(0, "distil into a LoRA of this rank (LCM-LoRA) instead of the whole UNet", lo=0, hi=1024)
    lora_alpha: float | None = option(None, "LoRA alpha (default: the rank)", lo=0, lo_open=True)
    lora_targets: tuple[str, ...] = option(LCM_LORA_TARGETS, "layers that get a LoRA (groups or module-name "
                                           "suffixes, as `ldm train --lora-targets`)")
    lora_dropout: float = option(0.0, "dropout on the LoRA branch's input", lo=0, hi=0.9)
    lora_format: str = option("diffusers", "LoRA file: diffusers or kohya (A1111, ComfyUI)",
                              choices=("diffusers", "kohya"), resume=True)

    def validate(self) -> None:
        super().validate()
        if not self.fine_tunes:
            raise UserError("lcm distils a pretrained model: give --teacher MODEL (an ldmkit or diffusers folder, an "
                            "original single file, or a bundled model name)")
        if not (self.data or self.latents):
            raise UserError("lcm needs training data: --data DIR (captioned images) or --latents CACHE")
        lo, hi = self.distill_guidance
        if lo > hi:
            raise UserError(f"--distill-guidance {lo} {hi}: the low end is above the high end")
        if self.train_text_encoder:
            raise UserError("lcm keeps the text encoder frozen; drop --train-text-encoder")
        if 0 < self.guidance_input < 4:
            raise UserError(f"--guidance-input {self.guidance_input}: 0 (none) or at least 4 (sinusoid pairs)")
        if self.strategy == "fsdp":
            raise UserError("lcm runs its teacher and target outside the wrapped student; use --strategy ddp")
        from ldmkit.adapters.lora import target_suffixes

        if self.lora_rank and target_suffixes(self.lora_targets)["text_encoder"]:
            raise UserError(f"--lora-targets {' '.join(self.lora_targets)}: lcm keeps the text encoder frozen; "
                            "give the denoiser's groups only (attn, ff, proj, conv, module names)")


class LCMStage(Stage2):
    """The student: the denoiser (with its guidance input, if it has one) under the frozen conditioner.
    `forward` takes encoded conditions, so the student, target and teacher share one encoding."""

    def forward(self, x, t, cond, guidance=None):
        kw = cond.kwargs_for(self.denoiser)
        if guidance is not None and getattr(self.denoiser, "guidance_mode", "cfg") == "distilled":
            kw["guidance"] = guidance
        return self.denoiser(cond.denoiser_input(x), t, **kw)


class LCM(LDM):
    name = "lcm"
    summary = ("latent consistency distillation of a teacher (--teacher MODEL) into a 1-8 step student: the whole "
               "UNet with a guidance input, or a LoRA (--lora-rank, LCM-LoRA).")
    route_flags = ("teacher",)

    @property
    def outputs(self) -> tuple:
        return (lora_file_name(self.config),) if self.config.lora_rank else ("model",)

    @property
    def sampler(self) -> str:
        return self.config.sample_sampler or "lcm"

    # ---- what trains ------------------------------------------------------------------------
    def adapt(self, model: Stage2) -> LCMStage:
        from ldmkit.diffusion import FlowSchedule

        c = self.config
        if isinstance(self.schedule, FlowSchedule):
            raise UserError(f"--teacher {c.init_from} is a flow-matching model; lcm distils discrete-time (eps / v / "
                            "x0) teachers (rectified-flow reflow is not implemented)")
        if self.spatial_kind is not None:
            raise UserError(f"--teacher {c.init_from} is a {self.spatial_kind} model; lcm distils text-to-image, "
                            "class and unconditional models")
        T = self.schedule.num_train_timesteps
        if c.num_ddim_timesteps > T:
            raise UserError(f"--num-ddim-timesteps {c.num_ddim_timesteps} is more than the teacher's {T} timesteps")
        self.skip = T // c.num_ddim_timesteps
        self.grid = torch.arange(1, c.num_ddim_timesteps + 1) * self.skip - 1  # 19, 39, ..., 999
        model.requires_grad_(False)
        self.teacher = None
        if getattr(model.denoiser, "guidance_mode", "cfg") != "cfg":
            raise UserError(f"--teacher {c.init_from} is already guidance-distilled (it reads the guidance scale); "
                            "distil a model that runs with classifier-free guidance")
        if c.lora_rank:
            self.lora_paths = attach_lora(model, c)  # the LoRA switched off is the teacher
        else:
            self.teacher = copy.deepcopy(model.denoiser).eval().to(self.device)
            if c.guidance_input and model.conditioner is not None:  # an unconditional teacher has no guidance
                add_guidance_input(model.denoiser, c.guidance_input, c.init_from)
            model.denoiser.requires_grad_(True)
        student = LCMStage(model.denoiser, model.conditioner)
        if c.gradient_checkpointing:
            enable_gradient_checkpointing(student)
        return student

    @contextlib.contextmanager
    def teacher_net(self):
        """The teacher's denoiser: a frozen copy, or the student with its LoRA switched off."""
        if self.teacher is not None:
            yield self.teacher
            return
        from ldmkit.adapters.lora import disabled

        with disabled(self.model.denoiser):
            yield self.model.denoiser

    def defaults(self) -> dict:
        """The student's sampling defaults: LCM on the distillation grid, the middle of the guidance range."""
        c = self.config
        guided = getattr(self.model.denoiser, "guidance_mode", "cfg") == "distilled"
        guidance = c.guidance if c.guidance is not None else (sum(c.distill_guidance) / 2 if guided else 1.0)
        out = {"sampler": self.sampler, "steps": c.sample_steps, "guidance": guidance}
        if self.sampler == "lcm":
            out["sampler_options"] = {"original_inference_steps": c.num_ddim_timesteps}
        return out

    # ---- batches ----------------------------------------------------------------------------
    def draw(self, step: int) -> dict:
        out = super().draw(step)
        c = self.config
        g = torch.Generator().manual_seed((c.seed * 1_000_037 + step * 15485863 + 7) % (2**63 - 1))
        out["index"] = torch.randint(0, c.num_ddim_timesteps, (c.batch_size,), generator=g)
        lo, hi = c.distill_guidance if self.model.conditioner is not None else (1.0, 1.0)
        out["guidance"] = lo + (hi - lo) * torch.rand(c.batch_size, generator=g)
        return out

    def micro_batch(self, idx, rows, draws, step):
        batch = super().micro_batch(idx, rows, draws, step)
        batch.update(index=draws["index"][rows], guidance=draws["guidance"][rows].to(self.device))
        return batch

    # ---- the loss ---------------------------------------------------------------------------
    def consistency(self, net, x, t, cond, guidance) -> torch.Tensor:
        """f(x, t) = c_skip(t) x + c_out(t) x0(x, t): the network's clean estimate under the boundary condition."""
        from ldmkit.diffusion import model_timestep
        from ldmkit.diffusion.forward import to_x0

        out = net(x, model_timestep(self.schedule, t).to(self.device, torch.float32), cond, guidance).float()
        x0 = to_x0(self.schedule, self.objective, out, x, t)
        c_skip, c_out = boundary(t, self.config.timestep_scaling, x)
        return c_skip * x + c_out * x0

    def null_condition(self, n: int, time_ids=None):
        """The teacher's unconditional branch: the conditioner's null condition (no caption is encoded)."""
        from ldmkit.conditioning.base import trim_padding

        null = trim_padding(self.model.conditioner.null(n))[0]
        return null if time_ids is None else null.replace(time_ids=time_ids.to(null.pooled))

    @torch.no_grad()
    def solver_step(self, x, t, t_prev, cond, null, guidance) -> torch.Tensor:
        """The teacher's DDIM step t -> t_prev under classifier-free guidance `guidance` (per row; `null`:
        the unconditional condition, None for an unconditional teacher)."""
        from ldmkit.diffusion import model_timestep, q_sample
        from ldmkit.diffusion.forward import coefficients, convert

        tt = model_timestep(self.schedule, t).to(self.device, torch.float32)
        with self.teacher_net() as net:
            out = net(cond.denoiser_input(x), tt, **cond.kwargs_for(net)).float()
            if null is not None:
                u = net(null.denoiser_input(x), tt, **null.kwargs_for(net)).float()
                out = u + guidance.view(-1, *[1] * (x.dim() - 1)) * (out - u)
        a, s = coefficients(self.schedule, t, x)
        x0, eps = convert(out, self.objective, "x0", x, a, s), convert(out, self.objective, "eps", x, a, s)
        return q_sample(self.schedule, x0, eps, t_prev)

    def loss(self, model, batch, phase, step):
        from ldmkit.diffusion import q_sample

        c = self.config
        t = self.grid[batch["index"]]
        t_prev = (t - self.skip).clamp(min=0)
        x = q_sample(self.schedule, batch["z0"], batch["noise"], t)
        g, conditions, time_ids = batch["guidance"], batch["conditions"], batch.get("time_ids")
        with torch.no_grad():  # the target first: the EMA swap may not touch weights a graph has saved
            cond = self.model.condition(conditions, None, time_ids=time_ids)
            null = None if self.model.conditioner is None else self.null_condition(x.shape[0], time_ids)
            x_prev = self.solver_step(x, t, t_prev, cond, null, g)
            with (self.average.swapped() if self.average is not None else contextlib.nullcontext()):
                target = self.consistency(self.model, x_prev, t_prev, cond, g)
        pred = self.consistency(model, x, t, cond, g)
        if c.loss_type == "huber":
            loss = (torch.sqrt((pred - target) ** 2 + c.huber_c ** 2) - c.huber_c).mean()
        else:
            loss = ((pred - target) ** 2).mean()
        return loss, {"loss": loss.detach()}

    # ---- bookkeeping and outputs ----------------------------------------------------------------
    def describe(self) -> dict:
        out = super().describe()
        out["trained_parameters"] = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        out["ddim_grid"] = [int(self.grid[0]), int(self.grid[-1]), self.skip]
        return out

    def usage(self, result: Path) -> str:
        c = self.config
        steps = f"--sampler lcm --steps {c.sample_steps}"
        if c.lora_rank:
            return (f"LCM-LoRA written to {result} (use it with: ldm sample --model {c.init_from} --lora {result} "
                    f"{steps} --guidance 1 ...)")
        return f"LCM student written to {result} (use it with: ldm sample --model {result} {steps} ...)"

    def export(self, model: LCMStage, out: Path) -> Path:
        c = self.config
        if c.lora_rank:
            from ldmkit.io.adapter_files import write_lora

            lora = extract_lora(model)
            meta = {**lora_metadata(self, lora), "ldmkit_method": "lcm",
                    "ldmkit_sampling": f"lcm, {c.sample_steps} steps, guidance 1"}
            return write_lora(out / lora_file_name(c), lora, c.lora_format, meta)
        return super().export(model, out)


def boundary(t: torch.Tensor, scaling: float, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's c_skip(t), c_out(t) (sigma_data 0.5, timestep scaled): c_skip(0) = 1, c_out(0) = 0."""
    s = t.to(torch.float64) * scaling
    c_skip = SIGMA_DATA ** 2 / (s ** 2 + SIGMA_DATA ** 2)
    c_out = s / (s ** 2 + SIGMA_DATA ** 2).sqrt()
    shape = (-1,) + (1,) * (like.dim() - 1)
    return c_skip.to(like).view(shape), c_out.to(like).view(shape)


def add_guidance_input(denoiser: nn.Module, dim: int, teacher: str) -> None:
    """Give the teacher's UNet (inside an extended UNet too) a zero-initialised guidance input."""
    from dataclasses import replace

    from ldmkit.denoisers.unet import UNet

    unet = getattr(denoiser, "unet", denoiser)
    if not isinstance(unet, UNet):
        raise UserError(f"--teacher {teacher}: a guidance input is a UNet's; this denoiser is a "
                        f"{type(denoiser).__name__} (distil it with --guidance-input 0 or as a LoRA, --lora-rank)")
    unet.add_guidance_input(dim)
    if unet is not denoiser:  # an extended UNet records its UNet's config
        denoiser.config = replace(denoiser.config, unet=unet.config)


__all__ = ["LCM", "LCMConfig", "LCMStage", "boundary"]
