"""Method "autoencoder" (`ldm train-autoencoder`): the stage-1 perceptual autoencoder with its PatchGAN.

One step, two phases on the shared loop:
    main           x_rec, aux = autoencoder(x) (posterior sample / VQ lookup)
                   L_G = rec + w_p LPIPS + w_kl KL (or w_vq L_vq) + lambda * L_gan   -> AdamW(autoencoder)
    discriminator  L_D = hinge / non-saturating on D(x), D(sg[x_rec])              -> AdamW(discriminator)
                   (from `disc_start` on, when the discriminator is enabled)
The EMA covers the autoencoder. At the end RUN/autoencoder/ holds the EMA weights with the latent
`scaling_factor` / `shift_factor` measured on the training images, RUN/summary.json the held-out
reconstruction metrics. Data order: epoch e is a permutation seeded by (seed, e) and every image's
augmentation draws from a seed of (seed, step, position), so resume is exact.
"""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ldmkit.autoencoder.losses import LPIPS, AutoencoderLoss, LossConfig
from ldmkit.autoencoder.model import PRESETS, Autoencoder
from ldmkit.data.sets import build_datasets
from ldmkit.errors import UserError
from ldmkit.training.config import TrainConfig, option
from ldmkit.training.loop import Method, Run

LOSS_TERMS = ("rec", "lpips", "kl", "vq", "g", "d", "total")  # plotted; other logs are diagnostics


@dataclass(frozen=True)
class AETrainConfig(TrainConfig):
    out: str = option("", "run folder: config.json, checkpoints/, samples/, loss.csv, autoencoder/, "
                      "summary.json (required)", resume=True)
    data: str = option("", "an image folder (PNG/JPEG, recursive), 'fashion-mnist' or 'shapes'")
    preset: str = option("tiny-kl-f4", "autoencoder preset (ldmkit.autoencoder.model.PRESETS)",
                         choices=tuple(PRESETS))
    size: int | None = option(None, "image size (default: the preset's; 32 for fashion-mnist)", lo=8, hi=8192)
    # the architecture differs from the preset's where these are set
    channels: int | None = option(None, "base width (default: the preset's)", lo=1, hi=4096)
    ch_mult: tuple[int, ...] | None = option(None, "width multiplier per level; the factor f is 2^(levels-1) "
                                             "(default: the preset's)", lo=1, hi=64)
    num_res_blocks: int | None = option(None, "residual blocks per level (default: the preset's)", lo=1, hi=16)
    latent_channels: int | None = option(None, "latent channels c (default: the preset's)", lo=1, hi=1024)
    image_channels: int | None = option(None, "image channels: 1 for grey images, 3 for RGB (default: the "
                                        "preset's)", choices=(None, 1, 3))
    norm_groups: int | None = option(None, "GroupNorm groups (default: the preset's)", lo=1, hi=1024)
    mid_attention: bool | None = option(None, "self-attention in the middle blocks (default: the preset's)")
    num_codes: int | None = option(None, "VQ codebook size (default: the preset's)", lo=2, hi=1 << 20)
    holdout: int = option(16, "held-out images of an image folder (grids and metrics)", lo=1)
    stats_samples: int = option(256, "images the latent scaling factor is measured on", lo=1)
    eval_images: int = option(256, "held-out images scored at the end (summary.json)", lo=1)
    num_workers: int = option(0, "data-loading worker processes", lo=0, hi=64, resume=True)
    perceptual_net: str | None = option(None, "a classifier folder from `ldm train-classifier`: the perceptual term "
                                        "compares its features instead of LPIPS-VGG16's (for when VGG16's weights "
                                        "are not at hand; a network trained here on the data)")
    vgg_weights: str | None = option(None, "VGG16 weights for LPIPS (torchvision's vgg16-397923af.pth; default: "
                                     "$LDMKIT_VGG16_WEIGHTS or the torch hub cache)")
    rec_loss: str = option("l1", "pixel reconstruction loss", choices=("l1", "l2"))
    perceptual_weight: float = option(1.0, "weight of LPIPS (0 disables it)", lo=0)
    kl_weight: float = option(1e-6, "weight of the KL term (KL bottlenecks)", lo=0)
    vq_weight: float = option(1.0, "weight of the VQ codebook + commitment terms", lo=0)
    disc_weight: float = option(0.5, "weight of the adversarial term (0 disables the discriminator)", lo=0)
    disc_start: int = option(0, "first step with the adversarial term and discriminator updates", lo=0)
    disc_loss: str = option("hinge", "discriminator loss", choices=("hinge", "non-saturating"))
    disc_layers: int = option(3, "PatchGAN stride-2 stages", lo=1, hi=8)
    disc_channels: int = option(64, "PatchGAN base width", lo=1, hi=4096)
    disc_lr: float | None = option(None, "discriminator learning rate (default: --lr)", lo=0, lo_open=True)
    # the loop's defaults, as stage 1 trains
    batch_size: int = option(16, "global batch per optimiser step (all processes, all accumulation micro-steps)",
                             lo=1)
    adam_betas: tuple[float, float] = option((0.5, 0.9), "AdamW betas (GAN training favours a low beta1)", lo=0, hi=1)
    weight_decay: float = option(0.0, "AdamW weight decay (not on norms and biases)", lo=0)
    lr_schedule: str = option("constant", "after warm-up: constant, or cosine to 0 at the last step",
                              choices=("constant", "cosine"))
    warmup_steps: int = option(0, "linear learning-rate warm-up steps", lo=0)

    def loss_config(self) -> LossConfig:
        return LossConfig(rec_loss=self.rec_loss, perceptual_weight=self.perceptual_weight, kl_weight=self.kl_weight,
                          vq_weight=self.vq_weight, disc_weight=self.disc_weight, disc_start=self.disc_start,
                          disc_loss=self.disc_loss, disc_layers=self.disc_layers, disc_channels=self.disc_channels)

    def model_config(self):
        """The preset with this run's architecture settings and image size."""
        changes = {k: getattr(self, k) for k in ("channels", "ch_mult", "num_res_blocks", "latent_channels",
                                                 "norm_groups", "mid_attention", "num_codes")
                   if getattr(self, k) is not None}
        if self.image_channels is not None:
            changes.update(in_channels=self.image_channels, out_channels=self.image_channels)
        cfg = dataclasses.replace(PRESETS[self.preset], **changes)
        size = self.size or (32 if self.data == "fashion-mnist" else cfg.sample_size)
        return dataclasses.replace(cfg, sample_size=size)


class AutoencoderTraining(nn.Module):
    """The autoencoder and its loss (discriminator, frozen LPIPS) as one module: one forward per phase."""

    def __init__(self, autoencoder: Autoencoder, loss: AutoencoderLoss):
        super().__init__()
        self.autoencoder, self.loss = autoencoder, loss

    def forward(self, x: torch.Tensor, phase: str, step: int, x_rec: torch.Tensor | None = None):
        if phase == "main":
            x_rec, aux = self.autoencoder(x)
            loss, logs = self.loss.generator_loss(x, x_rec, aux, step, last_layer=self.autoencoder.last_layer)
            return loss, logs, x_rec.detach()
        loss, logs = self.loss.discriminator_loss(x, x_rec, step)
        return loss, logs, None


class AutoencoderMethod(Method):
    name = "autoencoder"
    summary = "a stage-1 KL or VQ autoencoder with LPIPS and a PatchGAN discriminator."
    outputs = ("autoencoder", "summary.json")
    plotted = LOSS_TERMS

    def __init__(self, config: AETrainConfig):
        config.loss_config()  # validates the loss settings
        self.config = config

    def build(self, run: Run) -> nn.Module:
        c = self.config
        self.ctx, self.micro, self.device = run.ctx, run.micro_batch, run.ctx.device
        model_cfg = c.model_config()
        self.train_data, self.heldout = build_datasets(c.data, model_cfg.sample_size, model_cfg.in_channels,
                                                       c.holdout, c.seed)
        self.lpips, self.perceptual = perceptual_term(c, self.device, self.ctx.is_main)
        model = AutoencoderTraining(Autoencoder(model_cfg), AutoencoderLoss(c.loss_config(), model_cfg.out_channels,
                                                                            self.perceptual))
        if run.init:
            from ldmkit.training.methods.ldm_parts import load_weights

            load_weights(model, _init_state(run.init), c.init_from)
        self._recon: dict[int, torch.Tensor] = {}
        return model

    def averaged(self, model):
        return model.autoencoder

    def phases(self, step):
        gan = self.config.disc_weight > 0 and step >= self.config.disc_start
        return ("main", "discriminator") if gan else ("main",)

    def param_groups(self, model):
        c = self.config
        groups = {"main": super().param_groups(model.autoencoder)["main"]}
        if model.loss.discriminator is not None:
            groups["discriminator"] = [{"params": list(model.loss.discriminator.parameters()),
                                        "weight_decay": c.weight_decay, "lr": c.disc_lr or c.lr}]
        return groups

    def batches(self, start: int):
        """This rank's rows of each step's global batch, split into micro-batches."""
        c, w, r = self.config, self.ctx.world_size, self.ctx.rank
        steps = _StepRows(len(self.train_data), c.batch_size, c.seed, start, r, w)  # this rank's block of rows
        loader = torch.utils.data.DataLoader(_SeededItems(self.train_data), batch_sampler=steps,
                                             num_workers=c.num_workers, collate_fn=_stack_images,
                                             pin_memory=self.device.type == "cuda",
                                             # its own generator: making the iterator must not draw from the
                                             # global RNG (exact resume)
                                             generator=torch.Generator().manual_seed(c.seed))
        for x in loader:
            yield [{"x": part, "k": k} for k, part in enumerate(x.to(self.device, non_blocking=True).split(self.micro))]

    def loss(self, model, batch, phase, step):
        loss, logs, x_rec = model(batch["x"], phase, step, self._recon.pop(batch["k"], None))
        if phase == "main" and "discriminator" in self.phases(step):
            self._recon[batch["k"]] = x_rec  # the discriminator phase judges these reconstructions
        return loss, logs

    def state(self) -> dict:
        out = {"data": {"train": len(self.train_data), "heldout": len(self.heldout)}}
        if self.config.perceptual_net and self.perceptual is not None:
            from ldmkit.util import weights_sha256

            out["perceptual_net_sha256"] = weights_sha256(self.perceptual.net)
        return out

    def load_state(self, state: dict) -> None:
        if state.get("perceptual_net_sha256", "") != self.state().get("perceptual_net_sha256", ""):
            raise UserError(f"--perceptual-net {self.config.perceptual_net}: another network than the run started "
                            "with; resume with that classifier")
        want = {"train": len(self.train_data), "heldout": len(self.heldout)}
        if state.get("data") and state["data"] != want:
            raise UserError(f"the training data changed since the run started ({state['data']} images then, "
                            f"{want} now); resume on the same data")

    def describe(self) -> dict:
        return {"autoencoder": dataclasses.asdict(self.config.model_config()),
                "data": {"train": len(self.train_data), "heldout": len(self.heldout)}}

    @torch.no_grad()
    def samples(self, model: Autoencoder, path: Path, step: int) -> None:
        """Held-out originals (top) over their reconstructions (bottom)."""
        from ldmkit.autoencoder.evaluation import image_batch
        from ldmkit.io.images import make_grid, save_png

        x = image_batch(self.heldout, range(min(8, len(self.heldout)))).to(self.device)
        x_rec = model.decode(model.encode(x).mode()).float().clamp(-1, 1)
        save_png(make_grid(torch.cat([x, x_rec]).cpu(), nrow=len(x)), path,
                 {"step": step, "rows": "originals over reconstructions (held-out)"})

    def export(self, model: Autoencoder, out: Path) -> Path:
        """The autoencoder with its latent statistics, and summary.json with its held-out metrics."""
        from ldmkit.autoencoder.evaluation import evaluate, latent_statistics
        from ldmkit.io.format import save_component
        from ldmkit.io.files import write_json

        c = self.config
        stats = latent_statistics(model, self.train_data, c.stats_samples, seed=c.seed, device=self.device)
        model.config = dataclasses.replace(model.config, scaling_factor=stats["scaling_factor"],
                                           shift_factor=stats["shift_factor"])
        metrics = evaluate(model, self.heldout, num_images=min(len(self.heldout), c.eval_images), lpips=self.lpips,
                           device=self.device)
        folder = save_component(model.to("cpu"), out / "autoencoder")
        model.to(self.device)
        write_json(out / "summary.json", {"preset": c.preset, "steps": c.steps, "latent_statistics": stats,
                                          "heldout": metrics, "autoencoder": str(folder),
                                          "seconds_per_step": getattr(self, "seconds_per_step", None)})
        return folder

    def usage(self, result: Path) -> str:
        return f"autoencoder written to {result} (summary in {Path(self.config.out) / 'summary.json'})"


def perceptual_term(c: AETrainConfig, device, say: bool) -> tuple:
    """(LPIPS or None, the perceptual module the loss uses or None): --perceptual-net's classifier features when
    given, else LPIPS-VGG16 when its weights are found; one line says what the run trains with."""
    import sys

    if c.perceptual_weight <= 0:
        return None, None
    if c.perceptual_net:
        from ldmkit.autoencoder.losses import FeaturePerceptual
        from ldmkit.metrics.classifier import load_classifier

        net, meta = load_classifier(c.perceptual_net, device=device)
        if say:
            print(f"train-autoencoder: perceptual term: the features of classifier {c.perceptual_net} (`ldm "
                  f"train-classifier` on {meta.get('dataset', '?')}, test accuracy {meta.get('accuracy', '?')}), not "
                  f"LPIPS; weight {c.perceptual_weight}", file=sys.stderr)
        lpips = LPIPS.from_pretrained(c.vgg_weights, device=device, quiet=True)  # still reported when present
        return lpips, FeaturePerceptual(net, str(c.perceptual_net)).to(device)
    lpips = LPIPS.from_pretrained(c.vgg_weights, device=device)  # warns when VGG16 is missing: no perceptual term
    if lpips is not None and say:
        print(f"train-autoencoder: perceptual term: LPIPS-VGG16, weight {c.perceptual_weight}", file=sys.stderr)
    return lpips, lpips


def _init_state(init: dict) -> dict:
    """Autoencoder weights to start from: an autoencoder run's checkpoint, a component folder, or the
    autoencoder of a model in any format (ldmkit, diffusers, original single file)."""
    if "source" not in init:
        return (init.get("ema") or {}).get("weights") or init["model"]
    from ldmkit.io import load_model
    from ldmkit.io.format import is_ldmkit_model, load_component

    folder = Path(init["source"])
    if (folder / "config.json").is_file() and not is_ldmkit_model(folder):
        ae = load_component(folder)
    else:
        ae = load_model(folder, device="cpu", dtype=torch.float32)[1].get("autoencoder")
        if ae is None:
            raise UserError(f"--init-from {folder}: the model has no autoencoder")
    return {f"autoencoder.{k}": v for k, v in ae.state_dict().items()}


# ----------------------------------------------------------------------------- data
class _StepRows(torch.utils.data.Sampler):
    """Per step from `start`: this rank's block of the global batch (rows r*B/W ... (r+1)*B/W - 1), each
    (index, augmentation seed). Epoch e is a permutation seeded by (seed, e), so any step's batch is known
    in advance."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, rank: int, world: int):
        self.n, self.bs, self.seed, self.start, self.rank, self.world = n, batch_size, seed, start, rank, world
        self.per_epoch = max(1, n // batch_size)

    def batch(self, step: int) -> list[int]:
        epoch, pos = divmod(step, self.per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        if self.n < self.bs:  # tiny data: repeat the permutation
            perm = perm.repeat(math.ceil(self.bs / self.n))
        return perm[pos * self.bs:(pos + 1) * self.bs].tolist()

    def __iter__(self):
        step, share = self.start, self.bs // self.world
        while True:
            rows = list(enumerate(self.batch(step)))[self.rank * share:(self.rank + 1) * share]
            yield [(i, (self.seed * 1_000_003 + step) * 4099 + j) for j, i in rows]
            step += 1


class _SeededItems(torch.utils.data.Dataset):
    """dataset[(index, seed)]: augmentation (ImageFolder crops / flips) drawn from Random(seed)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        if hasattr(self.dataset, "item"):
            return self.dataset.item(index, rng=random.Random(seed))
        return self.dataset[index]


def _stack_images(items: list[dict]) -> torch.Tensor:
    return torch.stack([it["image"] for it in items])
