"""Method "controlnet": train a ControlNet (`denoisers/controlnet.py`) for a frozen pretrained model.

    --control-data DIR
        images/...          the training images (captions: a .txt beside each image, or images/metadata.jsonl)
        conditioning/...    their control images, same relative paths (edges, label maps, poses ...)

    image ─ frozen autoencoder ─ q_sample ─▶ z_t ─┬─▶ ControlNet(z_t, t, control image, context) ─ residuals ─┐
                                                  └─▶ frozen UNet(z_t, t, context) + residuals ◀──────────────┘ ─▶ loss

The ControlNet starts as a copy of the UNet's encoder (`ControlNet.from_unet`; or `--controlnet`, to go
on training one) whose outputs pass zero-initialised convolutions, so step 0 computes exactly the base
model's prediction and loss. Only the ControlNet trains. A caption is replaced by the empty condition
with probability --cond-drop (0.5, as in the ControlNet paper), which makes the net read the control
image on its own. Control image and training image get the same crop and flip; the control image's
resolution is the image's (the conditioning embedder downsamples by the autoencoder's factor).
Output: RUN/controlnet, a diffusers ControlNetModel folder (`ldm sample --controlnet RUN/controlnet`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ldmkit.errors import UserError
from ldmkit.training.config import option
from ldmkit.training.methods.ldm import LDM, LDMConfig
from ldmkit.training.methods.ldm_parts import Stage2

EMBEDDING_STAGES = (16, 32, 96, 256)  # the conditioning embedder's channels (diffusers' default, 8x)


@dataclass(frozen=True)
class ControlTrainConfig(LDMConfig):
    # ControlNet defaults: small batches, a low constant rate, no EMA, half the captions dropped
    steps: int = option(1000, "optimiser steps in all (a resumed run continues to this)", lo=1, resume=True)
    batch_size: int = option(4, "global batch per optimiser step", lo=1)
    lr: float = option(1e-5, "peak learning rate of AdamW (the ControlNet paper's 1e-5)", lo=0, lo_open=True)
    lr_schedule: str = option("constant", "after warm-up: constant, or cosine to 0 at the last step",
                              choices=("constant", "cosine"))
    warmup_steps: int = option(0, "linear learning-rate warm-up steps", lo=0)
    ema_decay: float = option(0.0, "EMA decay of the ControlNet's weights, which are exported (0 disables the EMA)",
                              lo=0, hi=0.999999)
    cond_drop: float = option(0.5, "probability that a caption is replaced by the empty condition (teaches the "
                              "ControlNet to read the control image alone)", lo=0, hi=0.99)
    checkpoint_every: int = option(250, "steps between checkpoints (one is always written at the end)", lo=1,
                                   resume=True)
    sample_every: int = option(250, "steps between sample grids (one is always made at the end)", lo=1, resume=True)
    control_data: str = option("", "folder with images/ (captioned training images) and conditioning/ (their "
                               "control images, same relative paths)")
    controlnet: str = option("", "go on training this ControlNet (a diffusers ControlNet folder or an original "
                             "single file) instead of a new copy of the UNet's encoder")

    def validate(self) -> None:
        super().validate()
        if not self.fine_tunes:
            raise UserError("controlnet trains a ControlNet for a pretrained model: give --init-from MODEL (an "
                            "ldmkit or diffusers folder, an original single file, or a bundled model name)")
        if not self.control_data:
            raise UserError("controlnet: give --control-data DIR (images/ and conditioning/ with the same file names)")
        given = [f"--{n}" for n in ("data", "latents", "spatial") if getattr(self, n)]
        if given:
            raise UserError(f"controlnet reads its images from --control-data; drop {', '.join(given)}")
        if self.train_text_encoder:
            raise UserError("controlnet keeps the base model frozen; drop --train-text-encoder")


class ControlStage(Stage2):
    """The frozen denoiser and conditioner with the trained ControlNet: the UNet's prediction with the
    ControlNet's residuals added (what a pipeline with this ControlNet at scale 1 computes)."""

    def __init__(self, denoiser: nn.Module, conditioner: nn.Module | None, controlnet: nn.Module):
        super().__init__(denoiser, conditioner)
        self.controlnet = controlnet

    def forward(self, x, t, conditions=None, drop=None, control=None, time_ids=None):
        kw = self.condition(conditions, drop, time_ids=time_ids).denoiser_kwargs()
        adapt = getattr(self.denoiser, "adapt_context", None)  # an extended UNet's context adapter
        seen = {**kw, "context": adapt(kw["context"], kw["context_mask"])} if adapt is not None else kw
        res = self.controlnet(x, t, control, **seen)
        return self.denoiser(x, t, **kw, down_residuals=res.down, mid_residual=res.mid)


def embedding_stages(factor: int) -> tuple[int, ...]:
    """Conditioning-embedder channels that downsample a control image by `factor` (a power of 2)."""
    k = factor.bit_length() - 1
    if factor < 1 or 2 ** k != factor:
        raise UserError(f"the autoencoder's factor {factor} is not a power of 2; a ControlNet cannot match it")
    return (EMBEDDING_STAGES + (EMBEDDING_STAGES[-1],) * k)[:k + 1]


class ControlNetMethod(LDM):
    name = "controlnet"
    summary = ("a ControlNet for a frozen pretrained model (--init-from MODEL) from pairs of images and control "
               "images (--control-data DIR); step 0 is the base model exactly.")
    outputs = ("controlnet",)
    route_flags = ("control_data",)

    # ---- data ---------------------------------------------------------------------------------
    def open_data(self, source):
        from ldmkit.data.image_data import ImageData
        from ldmkit.training.methods import ldm_parts as parts

        c = self.config
        if source["concat"] is not None:
            raise UserError(f"--init-from {c.init_from} is a {source['concat']} model; ControlNets are trained for "
                            "text-to-image (or class / unconditional) models")
        root = Path(c.control_data)
        for sub in ("images", "conditioning"):
            if not (root / sub).is_dir():
                raise UserError(f"--control-data {root}: no {sub}/ folder (it holds images/ and conditioning/, "
                                "control images with their images' relative paths)")
        size = c.resolution or parts.default_resolution(source, self.autoencoder)
        data = ImageData.from_folder(root / "images", size, random_crop=c.random_crop, flip=c.random_flip,
                                     what="--control-data", controls=root / "conditioning")
        return data.bind(self.autoencoder), f"--control-data {root}"

    # ---- what trains ------------------------------------------------------------------------
    def adapt(self, model: Stage2) -> ControlStage:
        from ldmkit.denoisers.controlnet import ControlNet
        from ldmkit.io.controlnet_files import check_fits, read_controlnet

        c = self.config
        model.requires_grad_(False)
        unet = getattr(model.denoiser, "unet", model.denoiser)
        if not hasattr(unet, "skip_channels"):
            raise UserError(f"--init-from {c.init_from}: ControlNets need a UNet; the model's denoiser is a "
                            f"{type(model.denoiser).__name__}")
        stages = embedding_stages(self.autoencoder.downsample_factor)
        if c.controlnet:
            net = read_controlnet(c.controlnet)
            check_fits(net, model.denoiser, f"--controlnet {c.controlnet}")
            if net.factor != self.autoencoder.downsample_factor:
                raise UserError(f"--controlnet {c.controlnet}: it downsamples control images {net.factor}x, the "
                                f"model's autoencoder {self.autoencoder.downsample_factor}x")
        else:
            torch.manual_seed(c.seed)
            net = ControlNet.from_unet(unet, conditioning_embedding_out_channels=stages)
        net.requires_grad_(True).train()
        if c.gradient_checkpointing:
            for m in [*model.denoiser.modules(), *net.modules()]:
                if hasattr(m, "gradient_checkpointing"):
                    m.gradient_checkpointing = True
        return ControlStage(model.denoiser, model.conditioner, net)

    def micro_batch(self, idx, rows, draws, step):
        from ldmkit.training.methods.ldm_parts import encode_posterior

        c, dev = self.config, self.device
        items = self.data.items(idx, draws["aug"][rows].tolist())
        pixels, control = torch.stack([it["image"] for it in items]), torch.stack([it["control"] for it in items])
        mean, std = encode_posterior(self.autoencoder, pixels.to(dev))
        conditions = self.conditions_of(idx, rows, draws, step)
        return {"z0": mean + std * draws["post"][rows].to(dev) if c.sample_posterior else mean,
                "noise": draws["noise"][rows].to(dev), "t": draws["t"][rows], "conditions": conditions,
                "drop": draws["drop"][rows].to(dev) if conditions is not None and c.cond_drop > 0 else None,
                "control": control.to(dev), "time_ids": self.time_ids(items, len(idx)).to(dev) if self.text_time
                else None}

    def loss(self, model, batch, phase, step):
        from ldmkit.diffusion import model_timestep, q_sample, training_loss

        z_t = q_sample(self.schedule, batch["z0"], batch["noise"], batch["t"])
        t = model_timestep(self.schedule, batch["t"]).to(self.device, torch.float32)
        out = model(z_t, t, batch["conditions"], batch["drop"], batch["control"], batch["time_ids"])
        loss = training_loss(self.schedule, self.objective, out, batch["z0"], batch["noise"], batch["t"],
                             weighting=self.config.loss_weighting).mean()
        return loss, {"loss": loss.detach()}

    def compile(self, model):
        model.denoiser.compile()
        model.controlnet.compile()

    # ---- bookkeeping and outputs ----------------------------------------------------------------
    def describe(self) -> dict:
        out = super().describe()
        out["controlnet"] = self.model.controlnet.config.to_dict()
        out["trained_parameters"] = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return out

    def samples(self, model: ControlStage, path: Path, step: int, n: int = 4) -> None:
        """The first `n` items' control images (first row), then a row per seed generated from each
        control image and its caption through the pipeline `ldm sample --controlnet` runs."""
        from ldmkit.io.images import make_grid, save_png, tensor_to_pil
        from ldmkit.pipelines.control import Attached

        c = self.config
        n = min(n, len(self.data))
        pipe = self.pipeline(model)
        pipe.controlnets = [Attached(model.controlnet, "training")]
        _, controls = self.data.controls(range(n), [0] * n)
        prompts = self.data.conditions(self.conditioning, list(range(n))) or [None] * n
        kw = {"sampler": self.sampler, "steps": c.sample_steps, "guidance": c.guidance, "progress": False}
        rows = [[pipe.text2img(**({"prompt": p} if p is not None else {}), control_image=controls[k:k + 1],
                               seed=seed, **kw)[0].image for k, p in enumerate(prompts)] for seed in c.sample_seeds]
        images = [tensor_to_pil(x * 2 - 1) for x in controls] + [im for row in rows for im in row]
        save_png(make_grid(images, nrow=n), path, {"step": step, "prompts": str(prompts), "guidance": c.guidance,
                                                   "sampler": self.sampler, "steps": c.sample_steps})

    def usage(self, result: Path) -> str:
        return (f"ControlNet written to {result} (use it with: ldm sample --model {self.config.init_from} "
                f"--controlnet {result} --control-image IMG --prompt ...)")

    def export(self, model: ControlStage, out: Path) -> Path:
        from ldmkit.io.controlnet_files import write_controlnet

        c = self.config
        return write_controlnet(out / "controlnet", model.controlnet,
                                {"ldmkit_base_model": str(c.init_from), "ldmkit_steps": str(c.steps)})


__all__ = ["ControlNetMethod", "ControlStage", "ControlTrainConfig"]
