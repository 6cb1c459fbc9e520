"""Stage-1 losses: pixel reconstruction + LPIPS perceptual loss + PatchGAN adversarial loss.

Generator (autoencoder) objective, as in the LDM paper / VQGAN:

    L = |x - x_rec| (or squared)  +  w_p * LPIPS(x, x_rec)
        + w_kl * KL / (C*H*W)  (KL)   or   w_vq * L_vq  (VQ)
        + lambda * d_factor * L_gan                       (after disc_start)

    lambda = disc_weight * ||grad_last L_rec|| / (||grad_last L_gan|| + 1e-4)

measured at the decoder's last layer (clamped to [0, 1e4]). The KL sum is
divided by the number of image elements because the reconstruction term is a
per-element mean: this keeps the ratio of the two terms the LDM paper's
(sum-over-pixels NLL vs sum-over-latents KL), so its kl_weight 1e-6 carries over.

LPIPS: a VGG16 trunk (built here, torchvision's `features.N` layout, so the
standard `vgg16-397923af.pth` state dict loads), features at relu1_2, relu2_2,
relu3_3, relu4_3, relu5_3, unit-normalised over channels, squared differences
weighted by the calibrated 1x1 "lin" heads shipped by the `lpips` package
(`lpips/weights/v0.1/vgg.pth`), spatially averaged and summed.
The VGG16 backbone weights cannot be downloaded here: pass a path, set
$LDMKIT_VGG16_WEIGHTS, or place `vgg16-397923af.pth` in the torch hub cache;
otherwise training runs without the perceptual term (warned once).
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

VGG16_FILE = "vgg16-397923af.pth"
_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, stacklevel=3)


# ---------------------------------------------------------------- VGG16 / LPIPS

# torchvision's vgg16 "features": numbers are conv widths, "M" a 2x2 max-pool.
_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_LPIPS_TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3


class VGG16Features(nn.Module):
    """The convolutional trunk of VGG16 up to relu5_3, returning the five LPIPS taps."""

    def __init__(self):
        super().__init__()
        layers, cin = [], 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=False)]
                cin = v
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _LPIPS_TAPS:
                taps.append(x)
        return taps

    def load_torchvision_state_dict(self, state: dict) -> None:
        """Load a torchvision vgg16 state dict (classifier weights are ignored)."""
        from ldmkit.io.files import check_state_dict

        feats = {k: v for k, v in state.items() if k.startswith("features.")}
        check_state_dict(self, feats, "the VGG16 weights", strict=False)  # shapes, before load_state_dict
        missing, unexpected = self.load_state_dict(feats, strict=False)
        if missing or unexpected:
            raise ValueError(f"not a VGG16 state dict: missing {missing[:4]}, unexpected {unexpected[:4]}")


class _Lin(nn.Module):
    """1x1 conv head; the `model.1` name matches the lpips weight file (model.0 is dropout)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(0.0), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x):
        return self.model(x)


def lpips_heads_path() -> Path:
    """Path of the calibrated VGG heads inside the installed `lpips` package."""
    spec = importlib.util.find_spec("lpips")  # does not import lpips (which would import torchvision)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the `lpips` package is not installed (pip install --no-deps lpips)")
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / "vgg.pth"
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS heads not found at {path}")
    return path


def find_vgg16_weights(path: str | os.PathLike | None = None) -> Path | None:
    """The VGG16 backbone file: `path`, else $LDMKIT_VGG16_WEIGHTS, else the torch hub cache."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"VGG16 weights file {p} " + ("is not a file" if p.exists() else "does not exist"))
        return p
    env = os.environ.get("LDMKIT_VGG16_WEIGHTS")
    if env:
        p = Path(env)
        if not p.is_file():
            raise FileNotFoundError(f"$LDMKIT_VGG16_WEIGHTS={env} does not exist")
        return p
    p = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE
    return p if p.is_file() else None


class LPIPS(nn.Module):
    """LPIPS distance with a VGG16 trunk; `forward(x, y)` (in [-1, 1]) -> [B, 1, 1, 1].

    Frozen: parameters have requires_grad False, but gradients flow to the inputs.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.net = VGG16Features()
        chans = (64, 128, 256, 512, 512)
        for i, ch in enumerate(chans):
            setattr(self, f"lin{i}", _Lin(ch))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # always in eval mode

    def load_heads(self, path: str | os.PathLike | None = None) -> None:
        from ldmkit.io.files import read_torch_weights

        state = read_torch_weights(path or lpips_heads_path(), "LPIPS heads file")
        heads = {k: v for k, v in state.items() if k.startswith("lin")}
        missing = [k for k in (f"lin{i}.model.1.weight" for i in range(5)) if k not in heads]
        if missing:
            raise ValueError(f"LPIPS heads file lacks {missing}")
        for i in range(5):
            getattr(self, f"lin{i}").model[1].weight.data.copy_(heads[f"lin{i}.model.1.weight"])

    @classmethod
    def from_pretrained(cls, vgg_weights: str | os.PathLike | None = None, device="cpu",
                        quiet: bool = False) -> "LPIPS | None":
        """Pretrained LPIPS, or None with a one-time warning (unless `quiet`) when the VGG16 file is absent."""
        path = find_vgg16_weights(vgg_weights)
        if path is None:
            if not quiet:
                _warn_once(
                    f"VGG16 weights ({VGG16_FILE}) not found in {Path(torch.hub.get_dir()) / 'checkpoints'} "
                    "and no path given (--vgg-weights or $LDMKIT_VGG16_WEIGHTS): LPIPS is unavailable, so this "
                    "run trains without a perceptual term (L1 / L2 only) and LPIPS is not reported; "
                    "--perceptual-net CLASSIFIER gives a perceptual term from a network trained here "
                    "(`ldm train-classifier`).")
            return None
        from ldmkit.io.files import read_torch_weights

        model = cls()
        try:
            model.net.load_torchvision_state_dict(read_torch_weights(path, "VGG16 weights file"))
        except ValueError as exc:
            if str(path) in str(exc):
                raise
            raise ValueError(f"VGG16 weights file {path}: {exc}") from None
        model.load_heads()
        return model.to(device)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = (x - self.shift) / self.scale
        y = (y - self.shift) / self.scale
        total = 0.0
        for i, (fx, fy) in enumerate(zip(self.net(x), self.net(y))):
            fx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fy = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            d = getattr(self, f"lin{i}")((fx - fy).pow(2))
            total = total + d.mean((2, 3), keepdim=True)
        return total


class FeaturePerceptual(nn.Module):
    """A perceptual distance from a network the project trains itself on the data (`ldm train-classifier`),
    for when VGG16's weights are not at hand: LPIPS's recipe without its calibrated heads (its "baseline"
    variant) -- each conv stage's activations (before pooling) unit-normalised over channels, squared
    differences summed over channels, averaged over positions, the stages weighted equally.
    `forward(x, y)` (in [-1, 1]) -> [B, 1, 1, 1]. Frozen, like LPIPS; gradients flow to the inputs."""

    def __init__(self, classifier: nn.Module, name: str = ""):
        super().__init__()
        self.net, self.name = classifier, name  # a metrics.classifier.FeatureClassifier: `_prepare`, `body`
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # BatchNorm keeps its running statistics

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, h = [], self.net._prepare(x)
        layers = list(self.net.body)
        for i, layer in enumerate(layers):
            h = layer(h)
            if isinstance(layer, nn.ReLU) and (i + 1 == len(layers) or isinstance(layers[i + 1], nn.MaxPool2d)):
                out.append(h)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for fx, fy in zip(self.taps(x), self.taps(y)):
            fx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fy = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + (fx - fy).pow(2).sum(1, keepdim=True).mean((2, 3), keepdim=True)
        return total


# ---------------------------------------------------------------- PatchGAN


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / VQGAN): strided 4x4 convs, one logit per overlapping patch.

    n_layers stride-2 stages (so the receptive field grows with n_layers), then a
    stride-1 stage and a 1-channel conv. BatchNorm as in the original.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"disc n_layers={n_layers}: must be >= 1")
        layers = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                       nn.BatchNorm2d(channels * mult), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)


def d_loss_hinge(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


def d_loss_nonsaturating(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())


def g_loss(fake: torch.Tensor, kind: str) -> torch.Tensor:
    """Generator side: hinge -> -E[D(x_rec)], non-saturating -> E[softplus(-D(x_rec))]."""
    return -fake.mean() if kind == "hinge" else F.softplus(-fake).mean()


def adaptive_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                    eps: float = 1e-4, max_weight: float = 1e4) -> torch.Tensor:
    """||grad_last rec_loss|| / (||grad_last gan_loss|| + eps), clamped to [0, max_weight], detached."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    w = g_rec.norm() / (g_gan.norm() + eps)
    return w.clamp(0.0, max_weight).detach()


# ---------------------------------------------------------------- the combined loss


@dataclass(frozen=True)
class LossConfig:
    rec_loss: str = "l1"               # "l1" or "l2"
    perceptual_weight: float = 1.0     # 0 disables LPIPS
    kl_weight: float = 1e-6
    vq_weight: float = 1.0
    disc_weight: float = 0.5           # 0 disables the discriminator
    disc_start: int = 0                # first step with the adversarial term (and D updates)
    disc_loss: str = "hinge"           # "hinge" or "non-saturating"
    disc_layers: int = 3
    disc_channels: int = 64

    def __post_init__(self):
        if self.rec_loss not in ("l1", "l2"):
            raise ValueError(f"rec_loss={self.rec_loss!r}: must be 'l1' or 'l2'")
        if self.disc_loss not in ("hinge", "non-saturating"):
            raise ValueError(f"disc_loss={self.disc_loss!r}: must be 'hinge' or 'non-saturating'")
        for name in ("perceptual_weight", "kl_weight", "vq_weight", "disc_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")
        if self.disc_start < 0:
            raise ValueError(f"disc_start={self.disc_start}: must be >= 0")


class AutoencoderLoss(nn.Module):
    """Holds the discriminator and (optional) LPIPS network; computes both sides' losses.

    `lpips=None` disables the perceptual term whatever perceptual_weight says.
    """

    def __init__(self, config: LossConfig, in_channels: int = 3, lpips: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.lpips = lpips if config.perceptual_weight > 0 else None
        self.discriminator = PatchDiscriminator(in_channels, config.disc_channels, config.disc_layers) \
            if config.disc_weight > 0 else None

    def gan_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.config.disc_start

    def _lpips_input(self, x):
        if not isinstance(self.lpips, LPIPS):  # a FeaturePerceptual reads the images as its classifier does
            return x
        return x if x.shape[1] == 3 else x.mean(1, keepdim=True).expand(-1, 3, -1, -1)

    def generator_loss(self, x: torch.Tensor, x_rec: torch.Tensor, aux: dict, step: int,
                       last_layer: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        c = self.config
        x, x_rec = x.float(), x_rec.float()
        rec = (x - x_rec).abs().mean() if c.rec_loss == "l1" else (x - x_rec).pow(2).mean()
        logs = {"rec": rec.detach()}
        nll = rec
        if self.lpips is not None:
            p = self.lpips(self._lpips_input(x), self._lpips_input(x_rec)).mean()
            logs["lpips"] = p.detach()
            nll = nll + c.perceptual_weight * p
        loss = nll
        if "kl" in aux:
            kl = aux["kl"].mean() / x[0].numel()
            # logged per latent element (nats), a scale comparable to the other terms
            logs["kl"] = (aux["kl"].mean() / aux["posterior"].mean[0].numel()).detach()
            loss = loss + c.kl_weight * kl
        if "vq_loss" in aux:
            logs.update(vq=aux["vq_loss"].detach(), perplexity=aux["perplexity"].detach(),
                        usage=aux["usage"].detach())
            loss = loss + c.vq_weight * aux["vq_loss"]
        if self.gan_active(step):
            self.discriminator.requires_grad_(False)
            g = g_loss(self.discriminator(x_rec).float(), c.disc_loss)
            self.discriminator.requires_grad_(True)
            if last_layer is not None and torch.is_grad_enabled():
                w = adaptive_weight(nll, g, last_layer) * c.disc_weight
            else:
                w = torch.tensor(c.disc_weight, device=x.device)
            loss = loss + w * g
            logs.update(g=g.detach(), d_weight=w.detach())
        logs["total"] = loss.detach()
        return loss, logs

    def discriminator_loss(self, x: torch.Tensor, x_rec: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        if not self.gan_active(step):
            raise ValueError(f"discriminator inactive at step {step} (disc_start={self.config.disc_start})")
        real = self.discriminator(x.detach()).float()
        fake = self.discriminator(x_rec.detach()).float()
        fn = d_loss_hinge if self.config.disc_loss == "hinge" else d_loss_nonsaturating
        loss = fn(real, fake)
        return loss, {"d": loss.detach(), "logits_real": real.mean().detach(),
                      "logits_fake": fake.mean().detach()}
