"""The two stage-1 bottlenecks: a diagonal Gaussian posterior (KL) and a vector quantiser (VQ).

KL (the Stable Diffusion VAE): the encoder predicts a mean and a log-variance
per latent element; the regulariser is KL(q(z|x) || N(0, I)), summed over the
latent elements of each sample:

    KL = 0.5 * sum(mean^2 + var - 1 - logvar)

VQ (VQGAN / the LDM paper's vq-f4, vq-f8): each latent vector z is replaced by
its nearest entry e_k of a K x d codebook. Gradients pass straight through
(z + (e_k - z).detach()); the codebook learns either from the codebook loss
||sg[z] - e||^2 or from exponential moving averages of the vectors assigned to
each code (k-means style, no codebook gradient); the encoder is pulled towards
its code by the commitment loss beta * ||z - sg[e]||^2. Codes unused for
`restart_after` training steps are restarted on random encoder outputs of the
current batch. In the LDM setup the quantiser belongs to the decoder, so the
diffusion model works on pre-quantisation latents.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))). `deterministic=True` (VQ) means std = 0."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor | None = None):
        self.mean = mean
        self.deterministic = logvar is None
        if logvar is None:
            logvar = torch.full_like(mean, -math.inf)
            self.logvar = logvar
            self.std = torch.zeros_like(mean)
            self.var = torch.zeros_like(mean)
        else:
            # Same clamp as the original VAE: keeps exp() finite early in training.
            self.logvar = logvar.clamp(-30.0, 20.0)
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> "DiagonalGaussian":
        """Split a [B, 2c, h, w] tensor into mean and log-variance halves."""
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return cls(mean, logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.deterministic:
            return self.mean
        gen_device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=gen_device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over the latent elements: shape [B]."""
        if self.deterministic:
            return self.mean.new_zeros(self.mean.shape[0])
        mean, var, logvar = self.mean.float(), self.var.float(), self.logvar.float()
        return 0.5 * (mean.pow(2) + var - 1.0 - logvar).flatten(1).sum(1)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup with a straight-through gradient.

    Args:
        num_codes: K, the codebook size.
        dim: d, the code dimension (= latent channels).
        beta: commitment weight.
        use_ema: learn the codebook by exponential moving averages instead of
            the codebook loss (then only the commitment term has gradients).
        ema_decay: decay of those averages.
        l2_normalize: cosine lookup: latents and codes are l2-normalised before
            the distance and the quantised output is the normalised code.
        restart_after: restart a code unused for this many training steps on a
            random latent of the batch (0 disables restarts).

    `forward(z)` returns (z_q, loss, info) where info holds `indices` [B, h, w],
    `perplexity` (exp of the entropy of the batch's code histogram) and `usage`
    (fraction of the K codes used in the batch).
    """

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25, use_ema: bool = False,
                 ema_decay: float = 0.99, l2_normalize: bool = False, restart_after: int = 0):
        super().__init__()
        if num_codes < 2:
            raise ValueError(f"num_codes={num_codes}: a codebook needs at least 2 codes")
        if not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay={ema_decay}: must be in (0, 1)")
        if restart_after < 0:
            raise ValueError(f"restart_after={restart_after}: must be >= 0 (0 disables restarts)")
        self.num_codes, self.dim, self.beta = num_codes, dim, beta
        self.use_ema, self.ema_decay = use_ema, ema_decay
        self.l2_normalize, self.restart_after = l2_normalize, restart_after
        self.embedding = nn.Embedding(num_codes, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_codes, 1.0 / num_codes)
        if use_ema:
            self.embedding.weight.requires_grad_(False)
            self.register_buffer("ema_count", torch.ones(num_codes))
            self.register_buffer("ema_sum", self.embedding.weight.detach().clone())
        # Steps since each code was last chosen (drives dead-code restarts).
        self.register_buffer("code_age", torch.zeros(num_codes, dtype=torch.long))

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, dim=1) if self.l2_normalize else w

    def lookup(self, flat: torch.Tensor) -> torch.Tensor:
        """Indices of the nearest codes for [N, d] vectors."""
        codes = self.codebook().to(flat.dtype)
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codes.t() + codes.pow(2).sum(1)[None]
        return dist.argmin(1)

    def forward(self, z: torch.Tensor):
        b, c, h, w = z.shape
        if c != self.dim:
            raise ValueError(f"latent has {c} channels but the codebook dimension is {self.dim}")
        in_dtype = z.dtype
        z = z.float()  # distances and codebook statistics in fp32, also under autocast
        if self.l2_normalize:
            z = F.normalize(z, dim=1)
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        indices = self.lookup(flat)
        z_q = self.codebook()[indices].view(b, h, w, c).permute(0, 3, 1, 2)

        commitment = F.mse_loss(z, z_q.detach())
        if self.use_ema:
            loss = self.beta * commitment
        else:
            loss = F.mse_loss(z_q, z.detach()) + self.beta * commitment

        counts = torch.bincount(indices, minlength=self.num_codes).float()
        if self.training and torch.is_grad_enabled():
            self._update(flat.detach(), indices, counts)

        probs = counts / counts.sum()
        perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
        usage = (counts > 0).float().mean()
        z_q = (z + (z_q - z).detach()).to(in_dtype)  # straight-through estimator
        info = {"indices": indices.view(b, h, w), "perplexity": perplexity, "usage": usage}
        return z_q, loss, info

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        if self.use_ema:
            d = self.ema_decay
            sums = torch.zeros_like(self.ema_sum).index_add_(0, indices, flat)
            self.ema_count.mul_(d).add_(counts, alpha=1 - d)
            self.ema_sum.mul_(d).add_(sums, alpha=1 - d)
            n = self.ema_count.sum()
            # Laplace smoothing keeps never-chosen codes from dividing by zero.
            count = (self.ema_count + 1e-5) / (n + self.num_codes * 1e-5) * n
            self.embedding.weight.copy_(self.ema_sum / count[:, None])
        self.code_age.add_(1)
        self.code_age[counts > 0] = 0
        if self.restart_after > 0:
            dead = (self.code_age >= self.restart_after).nonzero().flatten()
            if dead.numel():
                pick = torch.randint(0, flat.shape[0], (dead.numel(),), device=flat.device)
                self.embedding.weight[dead] = flat[pick].to(self.embedding.weight.dtype)
                if self.use_ema:
                    self.ema_sum[dead] = flat[pick]
                    self.ema_count[dead] = 1.0
                self.code_age[dead] = 0
