"""Method "tiny-decoder" (`ldm train-tiny-decoder`): distil a model's full decoder into a tiny one
(`autoencoder/tiny.py`, TAESD's layout) for fast decoding and previews.

    image x ─ frozen encoder ─ posterior sample ─▶ z (scaled, as the sampler's latents) ─┬─▶ full decoder ─▶ target
                                                                                         └─▶ tiny decoder ─▶ L1

The target is the full decoder's image of the same latent, not x: the tiny decoder learns to imitate the
decoder it replaces, errors and all, so fast and full decoding agree. The autoencoder comes from
--autoencoder (a component folder, or a model folder / bundled name: its autoencoder). Data: an image
folder, 'shapes' or 'fashion-mnist' (`data.sets.build_datasets`), with the autoencoder's batches and
seeds per step (exact resume). Output: RUN/tiny_decoder (a component folder; `ldm sample --tiny-decoder`,
or copied into a model folder as tiny_decoder/ for `--fast-decode`), RUN/summary.json with held-out PSNR
of the tiny against the full decoder.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ldmkit.errors import UserError
from ldmkit.training.config import TrainConfig, option
from ldmkit.training.loop import Method, Run


@dataclass(frozen=True)
class TinyTrainConfig(TrainConfig):
    out: str = option("", "run folder: config.json, checkpoints/, samples/, loss.csv, tiny_decoder/, summary.json "
                      "(required)", resume=True)
    autoencoder: str = option("", "the full autoencoder: a component folder, or a model (an ldmkit or diffusers "
                              "folder, a bundled name): its autoencoder")
    data: str = option("", "an image folder (PNG/JPEG, recursive), 'shapes' or 'fashion-mnist'")
    size: int | None = option(None, "image size (default: 256 for folders; 32 for shapes and fashion-mnist)", lo=8,
                              hi=8192)
    channels: int = option(64, "the tiny decoder's width (TAESD: 64)", lo=1, hi=4096)
    num_blocks: tuple[int, ...] | None = option(None, "blocks per level, one level per x2 of the autoencoder's "
                                                "factor plus one (default: 3 per level, 1 in the last; TAESD's "
                                                "3 3 3 1 for f = 8)", lo=0, hi=64)
    loss_type: str = option("l1", "distance to the full decoder's image", choices=("l1", "l2"))
    holdout: int = option(16, "held-out images of an image folder (grids and metrics)", lo=1)
    eval_images: int = option(256, "held-out images scored at the end (summary.json)", lo=1)
    steps: int = option(2000, "optimiser steps in all (a resumed run continues to this)", lo=1, resume=True)
    batch_size: int = option(16, "global batch per optimiser step", lo=1)
    lr: float = option(1e-3, "peak learning rate of AdamW", lo=0, lo_open=True)
    lr_schedule: str = option("cosine", "after warm-up: constant, or cosine to 0 at the last step",
                              choices=("constant", "cosine"))
    warmup_steps: int = option(100, "linear learning-rate warm-up steps", lo=0)
    weight_decay: float = option(0.0, "AdamW weight decay (not on norms and biases)", lo=0)
    ema_decay: float = option(0.999, "EMA decay of the tiny decoder's weights, which are exported (0: none)", lo=0,
                              hi=0.999999)

    def validate(self) -> None:
        if not self.autoencoder:
            raise UserError("train-tiny-decoder: give --autoencoder (a component folder or a model)")
        if not self.data:
            raise UserError("train-tiny-decoder: give --data (an image folder, 'shapes' or 'fashion-mnist')")


def load_autoencoder(path: str) -> nn.Module:
    """A frozen autoencoder from a component folder or a model (any format, a bundled name)."""
    from ldmkit.io import load_model, resolve_model_path
    from ldmkit.io.format import is_ldmkit_model, load_component

    folder = Path(path)
    if (folder / "config.json").is_file() and not is_ldmkit_model(folder) and not (folder / "model_index.json").is_file():
        ae = load_component(folder, device="cpu")
    else:
        ae = load_model(resolve_model_path(path), device="cpu", dtype=torch.float32)[1].get("autoencoder")
        if ae is None:
            raise UserError(f"--autoencoder {path}: the model has no autoencoder")
    if not hasattr(ae, "decode_latents"):
        raise UserError(f"--autoencoder {path}: a {type(ae).__name__}, not an autoencoder")
    return ae.requires_grad_(False).eval()


class TinyDecoderMethod(Method):
    name = "tiny-decoder"
    summary = "a tiny (TAESD-style) decoder distilled from a model's full decoder, for fast decoding and previews."
    outputs = ("tiny_decoder", "summary.json")

    def __init__(self, config: TinyTrainConfig):
        config.validate()
        self.config = config

    def build(self, run: Run) -> nn.Module:
        from ldmkit.autoencoder.tiny import TinyDecoder, TinyDecoderConfig
        from ldmkit.data.sets import build_datasets

        c = self.config
        self.ctx, self.micro, self.device = run.ctx, run.micro_batch, run.ctx.device
        self.autoencoder = load_autoencoder(c.autoencoder).to(self.device)
        f = self.autoencoder.downsample_factor
        levels = int(math.log2(f)) + 1
        if 2 ** (levels - 1) != f:
            raise UserError(f"--autoencoder {c.autoencoder}: its factor {f} is not a power of 2")
        blocks = c.num_blocks or (3,) * (levels - 1) + (1,)
        if len(blocks) != levels:
            raise UserError(f"--num-blocks {' '.join(map(str, blocks))}: {len(blocks)} levels, the autoencoder's "
                            f"factor {f} needs {levels}")
        size = c.size or (32 if c.data in ("shapes", "fashion-mnist") else 256)
        self.train_data, self.heldout = build_datasets(c.data, size, self.autoencoder.config.in_channels, c.holdout,
                                                       c.seed)
        cfg = TinyDecoderConfig(self.autoencoder.config.latent_channels, self.autoencoder.config.out_channels,
                                c.channels, tuple(blocks))
        torch.manual_seed(c.seed)
        return TinyDecoder(cfg)

    def batches(self, start: int):
        from ldmkit.training.methods.autoencoder import _SeededItems, _stack_images, _StepRows

        c, w, r = self.config, self.ctx.world_size, self.ctx.rank
        loader = torch.utils.data.DataLoader(_SeededItems(self.train_data), collate_fn=_stack_images,
                                             batch_sampler=_StepRows(len(self.train_data), c.batch_size, c.seed, start,
                                                                     r, w),
                                             generator=torch.Generator().manual_seed(c.seed))
        for step, x in enumerate(loader, start):
            g = torch.Generator().manual_seed((c.seed * 1_000_003 + step * 7919 + 17) % (2**63 - 1))
            z, target = self.latents_and_target(x.to(self.device), g)
            yield [{"z": zz, "target": tt} for zz, tt in zip(z.split(self.micro), target.split(self.micro))]

    @torch.no_grad()
    def latents_and_target(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """Scaled latents (a posterior sample; its mode without a generator) and the full decoder's images."""
        scaled = self.autoencoder.encode_latents(x, generator=generator, sample=generator is not None).float()
        return scaled, self.autoencoder.decode_latents(scaled).float().clamp(-1, 1)

    def loss(self, model, batch, phase, step):
        out = model(batch["z"]).float()
        d = out - batch["target"]
        loss = d.abs().mean() if self.config.loss_type == "l1" else (d ** 2).mean()
        mse = float((d.detach().clamp(-2, 2) ** 2).mean())
        return loss, {"loss": loss.detach(), "psnr": torch.tensor(10 * math.log10(4.0 / max(mse, 1e-10)))}

    def state(self) -> dict:
        from ldmkit.util import weights_sha256

        return {"autoencoder_sha256": weights_sha256(self.autoencoder)}

    def load_state(self, state: dict) -> None:
        want = state.get("autoencoder_sha256")
        if want and want != self.state()["autoencoder_sha256"]:
            raise UserError(f"--autoencoder {self.config.autoencoder} holds other weights than the run started with; "
                            "resume with that autoencoder")

    def describe(self) -> dict:
        return {"autoencoder": self.autoencoder.config.to_dict() if hasattr(self.autoencoder.config, "to_dict")
                else None, "train_images": len(self.train_data), "heldout_images": len(self.heldout)}

    @torch.no_grad()
    def samples(self, model, path: Path, step: int) -> None:
        """Held-out images through the full decoder (top) and the tiny one (bottom)."""
        from ldmkit.autoencoder.evaluation import image_batch
        from ldmkit.io.images import make_grid, save_png

        x = image_batch(self.heldout, range(min(8, len(self.heldout)))).to(self.device)
        z, full = self.latents_and_target(x)
        tiny = model(z).float().clamp(-1, 1)
        save_png(make_grid(torch.cat([full, tiny]).cpu(), nrow=len(x)), path,
                 {"step": step, "rows": "full decoder over tiny decoder (held-out)"})

    @torch.no_grad()
    def export(self, model, out: Path) -> Path:
        import time

        from ldmkit.autoencoder.evaluation import image_batch
        from ldmkit.io.files import write_json
        from ldmkit.io.format import save_component

        c = self.config
        n = min(len(self.heldout), c.eval_images)
        encode = self.autoencoder.encode_latents  # the posterior mode; both decoders are timed below
        warm = encode(image_batch(self.heldout, range(min(n, 4))).to(self.device), sample=False).float()
        model(warm), self.autoencoder.decode_latents(warm)  # CPU timings below (first-call costs excluded)
        errors, t_full, t_tiny = [], 0.0, 0.0
        for lo in range(0, n, 32):
            x = image_batch(self.heldout, range(lo, min(n, lo + 32))).to(self.device)
            z = encode(x, sample=False).float()
            t0 = time.perf_counter()
            full = self.autoencoder.decode_latents(z).float().clamp(-1, 1)
            t1 = time.perf_counter()
            tiny = model(z).float().clamp(-1, 1)
            t_full, t_tiny = t_full + t1 - t0, t_tiny + time.perf_counter() - t1
            errors.append(((tiny - full) ** 2).flatten(1).mean(1))
        mse = torch.cat(errors)
        psnr = (10 * torch.log10(4.0 / mse.clamp_min(1e-10))).mean().item()  # images in [-1, 1]: peak-to-peak 2
        folder = save_component(model.to("cpu"), out / "tiny_decoder")
        model.to(self.device)
        params = sum(p.numel() for p in model.parameters())
        full_params = sum(p.numel() for n_, p in self.autoencoder.named_parameters() if not n_.startswith("encoder"))
        write_json(out / "summary.json", {
            "heldout_images": n, "psnr_vs_full_decoder_db": round(psnr, 2), "parameters": params,
            "full_decoder_parameters": full_params, "decode_ms_per_image": {
                "full": round(1e3 * t_full / n, 3), "tiny": round(1e3 * t_tiny / n, 3)},
            "tiny_decoder": str(folder)})
        return folder

    def usage(self, result: Path) -> str:
        return (f"tiny decoder written to {result} (summary in {Path(self.config.out) / 'summary.json'}; use it "
                f"with: ldm sample --model MODEL --tiny-decoder {result} --fast-decode ...)")


__all__ = ["TinyDecoderMethod", "TinyTrainConfig"]
