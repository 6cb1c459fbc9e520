"""What every conditioner returns and how conditions are dropped for classifier-free guidance.

A conditioner is an ``nn.Module`` with

    encode(conditions: list) -> Conditioning      one entry per sample
    null(batch_size) -> Conditioning              the unconditional input (CFG, condition dropout)
    drop(cond, p, generator=None) -> Conditioning each sample replaced by null with probability p

``Conditioning`` carries every way a condition reaches the denoiser: a token sequence for
cross-attention (``context`` [B, L, D] with optional key ``mask`` [B, L], True = attend), a pooled
vector, class labels [B] (added to the time embedding), and spatial channels ``concat`` [B, C, h, w]
that are concatenated to the noisy latent (``in_channels`` of the denoiser counts them), and an image
prompt's tokens (``image_tokens`` [B, n, D], an IP-Adapter's: ``adapters.ip_adapter``), and SDXL's
micro-conditioning ``time_ids`` [B, k] (with ``pooled``, into the UNet's time embedding).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch
from torch import nn

FIELDS = ("context", "pooled", "mask", "class_labels", "concat", "image_tokens", "time_ids")


@dataclass
class Conditioning:
    context: torch.Tensor | None = None  # [B, L, D]
    pooled: torch.Tensor | None = None  # [B, D]
    mask: torch.Tensor | None = None  # [B, L] bool, True = attend
    class_labels: torch.Tensor | None = None  # [B] long
    concat: torch.Tensor | None = None  # [B, C, h, w]
    image_tokens: torch.Tensor | None = None  # [B, n, D] an IP-Adapter's image-prompt tokens
    time_ids: torch.Tensor | None = None  # [B, k] SDXL's micro-conditioning (sizes, crop, aesthetic score)

    @property
    def batch_size(self) -> int:
        for name in FIELDS:
            v = getattr(self, name)
            if v is not None:
                return v.shape[0]
        return 0

    def to(self, device=None, dtype=None) -> "Conditioning":
        """Move every tensor; ``dtype`` applies to floating tensors only (masks, labels keep theirs)."""
        def move(v):
            if v is None:
                return None
            return v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else None)
        return Conditioning(**{n: move(getattr(self, n)) for n in FIELDS})

    def replace(self, **changes) -> "Conditioning":
        return dataclasses.replace(self, **changes)

    def merge(self, other: "Conditioning") -> "Conditioning":
        """Combine two conditionings with disjoint fields (e.g. text + inpainting channels)."""
        out = {}
        for n in FIELDS:
            a, b = getattr(self, n), getattr(other, n)
            if a is not None and b is not None:
                raise ValueError(f"both conditionings set {n!r}; merge needs disjoint fields")
            out[n] = a if a is not None else b
        return Conditioning(**out)

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        """Batch-concatenate (e.g. [uncond, cond] for one CFG forward pass)."""
        out = {}
        for n in FIELDS:
            vals = [getattr(c, n) for c in items]
            if all(v is None for v in vals):
                out[n] = None
            elif any(v is None for v in vals):
                raise ValueError(f"cannot concatenate conditionings where only some set {n!r}")
            else:
                out[n] = torch.cat(vals, dim=0)
        return Conditioning(**out)

    def denoiser_input(self, x: torch.Tensor) -> torch.Tensor:
        """The noisy latent with the spatial condition channels appended (if any)."""
        if self.concat is None:
            return x
        if self.concat.shape[-2:] != x.shape[-2:] or self.concat.shape[0] != x.shape[0]:
            raise ValueError(f"spatial condition {tuple(self.concat.shape)} does not match latent {tuple(x.shape)}")
        return torch.cat([x, self.concat.to(x.dtype)], dim=1)

    def denoiser_kwargs(self) -> dict:
        """Keyword arguments for ``UNet/DiT.forward`` besides x and t."""
        kw = {"context": self.context, "class_labels": self.class_labels, "context_mask": self.mask}
        if self.time_ids is not None:  # SDXL: the pooled text and the time ids enter the time embedding
            kw.update(pooled=self.pooled, time_ids=self.time_ids)
        return kw

    def kwargs_for(self, denoiser) -> dict:
        """`denoiser_kwargs`, plus the pooled text for denoisers that always take it (SD3's MM-DiT)."""
        kw = self.denoiser_kwargs()
        if getattr(denoiser, "takes_pooled", False):
            kw["pooled"] = self.pooled
        return kw


def trim_padding(*conds: Conditioning | None, multiple: int = 8) -> tuple:
    """Drop the context columns that every row of every conditioning masks out (trailing padding of
    a masked text encoder), cutting all of them to one shared length -- the last attended column,
    rounded up to a multiple of ``multiple`` so that compiled models see few distinct shapes -- so
    they still concatenate for CFG. Cross-attention gives masked keys zero weight, so the
    denoiser's output is unchanged while its key/value projections and attention run over, e.g.,
    16 instead of 64 tokens. Conditionings without a mask (CLIP, whose padding tokens are
    attended) come back as they are."""
    masks = [c.mask for c in conds if c is not None and c.context is not None and c.mask is not None]
    if not masks or len(masks) != sum(c is not None and c.context is not None for c in conds):
        return conds
    used = torch.zeros(masks[0].shape[1], dtype=torch.bool, device=masks[0].device)
    for m in masks:
        if m.shape[1] != used.shape[0]:
            return conds  # different lengths: leave them to the caller's checks
        used |= m.to(torch.bool).any(dim=0)
    hits = used.nonzero()
    length = int(hits.max()) + 1 if len(hits) else 1
    length = min(used.shape[0], -(-length // multiple) * multiple)
    if length == used.shape[0]:
        return conds
    # contiguous: every key / value projection would otherwise copy the strided view on its own
    return tuple(c if c is None or c.context is None else
                 c.replace(context=c.context[:, :length].contiguous(), mask=c.mask[:, :length]) for c in conds)


def mix(cond: Conditioning, null: Conditioning, keep: torch.Tensor) -> Conditioning:
    """Per-sample choice: cond where ``keep`` [B] is True, else null."""
    out = {}
    for n in FIELDS:
        a, b = getattr(cond, n), getattr(null, n)
        if a is None or b is None:
            if (a is None) != (b is None):
                raise ValueError(f"condition and null condition disagree on {n!r}")
            out[n] = None
            continue
        if a.shape[1:] != b.shape[1:]:
            raise ValueError(f"{n}: condition {tuple(a.shape)} and null {tuple(b.shape)} differ in shape")
        k = keep.to(a.device).view(-1, *([1] * (a.ndim - 1)))
        out[n] = torch.where(k, a, b.to(a.dtype))
    return Conditioning(**out)


class Conditioner(nn.Module):
    """Base class: subclasses implement ``encode`` and ``null``; dropout is shared."""

    component_type: str = ""

    def encode(self, conditions: list) -> Conditioning:
        raise NotImplementedError(f"{type(self).__name__} must implement encode")

    def null(self, batch_size: int) -> Conditioning:
        raise NotImplementedError(f"{type(self).__name__} must implement null")

    def forward(self, conditions: list) -> Conditioning:
        return self.encode(conditions)

    def drop(self, cond: Conditioning, p: float, generator: torch.Generator | None = None) -> Conditioning:
        """Condition dropout for CFG training: each sample becomes null with probability ``p``."""
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"condition dropout p={p} must be in [0, 1]")
        b = cond.batch_size
        if p == 0.0 or b == 0:
            return cond
        device = generator.device if generator is not None else "cpu"
        keep = torch.rand(b, generator=generator, device=device) >= p
        return mix(cond, self.null_like(cond), keep)

    def null_like(self, cond: Conditioning) -> Conditioning:
        """The null condition shaped like ``cond`` (same batch size)."""
        return self.null(cond.batch_size)


def check_batch(conditions, what: str) -> list:
    if isinstance(conditions, (str, bytes)) or not isinstance(conditions, (list, tuple)):
        raise ValueError(f"encode expects a list of {what} (one per sample), got {type(conditions).__name__}")
    if len(conditions) == 0:
        raise ValueError(f"encode got an empty list of {what}")
    return list(conditions)


def warn_truncated(prompts: list[str], lengths: list[int], max_length: int) -> None:
    long = [(p, n) for p, n in zip(prompts, lengths) if n > max_length]
    if long:
        p, n = long[0]
        warnings.warn(f"{len(long)} prompt(s) longer than max_length={max_length} tokens were truncated "
                      f"(e.g. {n} tokens: {p[:60]!r})", UserWarning, stacklevel=3)
