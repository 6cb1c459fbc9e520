"""Multi-head attention over scaled_dot_product_attention (self or cross), and the
single-head spatial self-attention of the autoencoder's middle block.

Parameter names follow diffusers (`to_q`, `to_k`, `to_v`, `to_out.0`, `group_norm`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """softmax(Q K^T / sqrt(d)) V with Q from `x` and K, V from `context` (or `x` for self-attention).

    `mask` is boolean [B, M] over the context tokens (True = attend). `upcast=True`
    computes the attention in float32 when the inputs are half precision. `processor` is None, or an
    adapter's module that adds attention over more keys and values before `to_out`,
    ``out = processor(self, q, out)`` (an IP-Adapter's image tokens: `adapters.ip_adapter`); diffusers keeps
    such weights under the same name (``attn2.processor.to_k_ip.0``).
    """

    def __init__(
        self,
        query_dim: int,
        cross_attention_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        bias: bool = False,
        out_bias: bool = True,
        upcast: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner = heads * dim_head
        context_dim = cross_attention_dim or query_dim
        self.heads = heads
        self.dim_head = dim_head
        self.upcast = upcast
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, bias=out_bias), nn.Dropout(dropout)])
        self.processor: nn.Module | None = None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Heads split, SDPA, heads merged: [B, N, H*D] x [B, M, H*D] -> [B, N, H*D]."""
        b, n, _ = q.shape
        m = k.shape[1]
        q = q.view(b, n, self.heads, self.dim_head).transpose(1, 2)
        k = k.view(b, m, self.heads, self.dim_head).transpose(1, 2)
        v = v.view(b, m, self.heads, self.dim_head).transpose(1, 2)
        attn_mask = None
        if mask is not None:
            if mask.shape != (b, m):
                raise ValueError(f"attention mask shape {tuple(mask.shape)}; expected (batch, tokens) = {(b, m)}")
            attn_mask = mask.to(torch.bool)[:, None, None, :]
        dtype = q.dtype
        if self.upcast and dtype in (torch.float16, torch.bfloat16):
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return out.to(dtype).transpose(1, 2).reshape(b, n, self.heads * self.dim_head)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q = self.to_q(x)
        out = self.attend(q, self.to_k(context), self.to_v(context), mask)
        if self.processor is not None:
            out = self.processor(self, q, out)
        return self.to_out[1](self.to_out[0](out))


class AttentionBlock2D(Attention):
    """Single-head self-attention over all pixels with a GroupNorm in front and a residual around it."""

    def __init__(self, channels: int, groups: int = 32, eps: float = 1e-6):
        super().__init__(channels, heads=1, dim_head=channels, bias=True, upcast=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        b, c, h, w = x.shape
        tokens = self.group_norm(x).view(b, c, h * w).transpose(1, 2)
        out = super().forward(tokens)
        return x + out.transpose(1, 2).reshape(b, c, h, w)
