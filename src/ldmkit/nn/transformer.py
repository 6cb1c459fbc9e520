"""Transformer pieces shared by the denoisers: GEGLU, FeedForward,
BasicTransformerBlock and the spatial transformer Transformer2D.

Parameter names follow diffusers (``attention.py`` / ``transformer_2d.py``) so
Stable Diffusion UNet weights load with an identity key map:

    Transformer2D:          norm, proj_in, transformer_blocks.K, proj_out
    BasicTransformerBlock:  norm1, attn1, norm2, attn2, norm3, ff
    FeedForward:            ff.net.0.proj (GEGLU / GELU projection), ff.net.2

The spatial transformer is the LDM paper's cross-attention mechanism: queries
come from the image features, keys and values from the conditioning sequence
``context`` (tau_theta(y)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.nn.attention import Attention

FF_ACTIVATIONS = ("geglu", "gelu", "gelu-approximate")


class _GEGLUFunction(torch.autograd.Function):
    """``h * gelu(gate)`` with ``h = linear(x, weight[:inner])``, ``gate = linear(x, weight[inner:])``:
    the product of ``linear(x, weight).chunk(2)``, computed as two GEMMs into contiguous halves, with
    a hand-written backward. Autograd over the chunked projection would run every elementwise op on
    strided halves (2-3x slower on CPU than on contiguous memory), keep ``gelu(gate)`` alive until
    the backward and concatenate the two input gradients there (the backward of ``chunk``). Here
    ``gelu(gate)`` is recomputed, the gradients of the halves go straight into their GEMMs and into
    row blocks of the weight gradient: on CPU a GEGLU forward + backward takes 15-20 % less time
    (one thread; 64x64x32 -> 128 and 2x4096x320 -> 1280 tokens x features) and keeps one
    [N, inner] activation less. Under autocast the projections run in the autocast dtype, as
    ``nn.Linear`` would."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        device_type = x.device.type
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        inner = weight.shape[0] // 2
        with torch.autocast(device_type, enabled=False):
            hidden = F.linear(x, weight[:inner], None if bias is None else bias[:inner])
            gate = F.linear(x, weight[inner:], None if bias is None else bias[inner:])
            out = F.gelu(gate).mul_(hidden)
        ctx.save_for_backward(x, weight, hidden, gate)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, hidden, gate = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        inner = hidden.shape[-1]
        grad = grad.to(hidden.dtype)
        grad_hidden = F.gelu(gate).mul_(grad).reshape(-1, inner)
        grad_gate = torch.mul(grad, hidden)
        torch.ops.aten.gelu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
        grad_gate = grad_gate.reshape(-1, inner)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            if hidden.dtype in (torch.float16, torch.bfloat16):  # one GEMM: a single rounding of the sum
                grad_x = torch.cat([grad_hidden, grad_gate], dim=1) @ weight
            else:
                grad_x = torch.mm(grad_hidden, weight[:inner]).addmm_(grad_gate, weight[inner:])
            grad_x = grad_x.view(x.shape).to(x_dtype)
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1])
            grad_w = torch.empty_like(weight)
            torch.mm(grad_hidden.t(), x2, out=grad_w[:inner])
            torch.mm(grad_gate.t(), x2, out=grad_w[inner:])
            grad_w = grad_w.to(w_dtype)
        if b_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = torch.cat([grad_hidden.sum(0), grad_gate.sum(0)]).to(b_dtype)
        return grad_x, grad_w, grad_b


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): ``proj(x) -> (h, gate)``, ``h * gelu(gate)``."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a plain Linear only: an adapter wrapping `proj` (peft's LoRA layer) must run its own forward
        if type(self.proj) is nn.Linear and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return _GEGLUFunction.apply(x, self.proj.weight, self.proj.bias)
        hidden, gate = self.proj(x).chunk(2, dim=-1)  # inference, and inductor, which fuses this itself
        return hidden * F.gelu(gate)


class GELU(nn.Module):
    """Linear projection followed by GELU (``approximate="tanh"`` for DiT)."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str = "none", bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=bias)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class FeedForward(nn.Module):
    """``net = [activation projection, dropout, linear]`` as in diffusers."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4,
                 activation: str = "geglu", dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if activation not in FF_ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not one of {FF_ACTIVATIONS}")
        inner = int(dim * mult)
        if activation == "geglu":
            act: nn.Module = GEGLU(dim, inner, bias=bias)
        else:
            act = GELU(dim, inner, approximate="tanh" if activation == "gelu-approximate" else "none", bias=bias)
        self.net = nn.ModuleList([act, nn.Dropout(dropout), nn.Linear(inner, dim_out or dim, bias=bias)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention, GEGLU MLP.

    ``cross_attention_dim=None`` drops the cross-attention (``norm2``/``attn2``
    are then absent), which gives a plain self-attention block.
    ``only_cross_attention`` makes attn1 attend to the context too (SD x4 upscaler).
    """

    def __init__(self, dim: int, heads: int, dim_head: int, cross_attention_dim: int | None = None,
                 dropout: float = 0.0, attention_bias: bool = False, upcast_attention: bool = False,
                 norm_eps: float = 1e-5, ff_activation: str = "geglu", only_cross_attention: bool = False,
                 ff_mult: int = 4):
        super().__init__()
        if only_cross_attention and cross_attention_dim is None:
            raise ValueError("only_cross_attention=True needs a cross_attention_dim")
        self.only_cross_attention = only_cross_attention
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn1 = Attention(dim, cross_attention_dim=cross_attention_dim if only_cross_attention else None,
                               heads=heads, dim_head=dim_head, bias=attention_bias, upcast=upcast_attention)
        if cross_attention_dim is not None:
            self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
            self.attn2 = Attention(dim, cross_attention_dim=cross_attention_dim, heads=heads, dim_head=dim_head,
                                   bias=attention_bias, upcast=upcast_attention)
        else:
            self.norm2 = None
            self.attn2 = None
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps)
        self.ff = FeedForward(dim, mult=ff_mult, activation=ff_activation, dropout=dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, self_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``context_mask`` [B, L] masks cross-attention keys, ``self_mask`` [B, N] self-attention keys
        (True = attend); the UNet uses neither for self-attention, the text encoder masks padding."""
        x = x + self.attn1(self.norm1(x), context=context if self.only_cross_attention else None, mask=self_mask)
        if self.attn2 is not None:
            x = x + self.attn2(self.norm2(x), context=context, mask=context_mask)
        return x + self.ff(self.norm3(x))


class Transformer2D(nn.Module):
    """Spatial transformer: GroupNorm, proj_in, ``depth`` transformer blocks, proj_out, residual.

    ``use_linear_projection`` picks Linear (SD2) or 1x1 Conv (SD1) projections;
    the two are applied on opposite sides of the NCHW <-> [B, HW, C] reshape,
    exactly as diffusers does, so either weight layout loads unchanged.
    """

    def __init__(self, in_channels: int, heads: int, dim_head: int, depth: int = 1,
                 cross_attention_dim: int | None = None, groups: int = 32, dropout: float = 0.0,
                 use_linear_projection: bool = False, upcast_attention: bool = False,
                 attention_bias: bool = False, only_cross_attention: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(groups, in_channels, eps=1e-6)
        if use_linear_projection:
            self.proj_in: nn.Module = nn.Linear(in_channels, inner)
            self.proj_out: nn.Module = nn.Linear(inner, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner, 1)
            self.proj_out = nn.Conv2d(inner, in_channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, cross_attention_dim=cross_attention_dim,
                                  dropout=dropout, attention_bias=attention_bias,
                                  upcast_attention=upcast_attention, only_cross_attention=only_cross_attention)
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        residual = x
        x = self.norm(x)
        if self.use_linear_projection:
            x = self.proj_in(x.permute(0, 2, 3, 1).reshape(b, h * w, -1))
        else:
            x = self.proj_in(x)
            x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1)
        for block in self.transformer_blocks:
            x = block(x, context, context_mask)
        # back to NCHW in memory too: a channels-last view would make the sum channels-last, and every
        # later convolution would convert its weights to match (a copy per conv, forward and backward)
        if self.use_linear_projection:
            x = self.proj_out(x).reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
        else:
            x = self.proj_out(x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous())
        return x + residual


class ContextAdapter(nn.Module):
    """Trainable self-attention layers over the conditioning tokens, in front of cross-attention.

    ``proj_in`` to ``width``, ``layers`` pre-norm blocks (biased self-attention with the context's key
    mask, GELU MLP of ``ff_mult * width``), LayerNorm, ``proj_out`` back to the context width, added
    to the input. ``proj_out`` starts at zero, so a fresh adapter passes the context through
    unchanged. A frozen sentence encoder's token states barely encode some distinctions a denoiser needs (which object of
    "a red circle to the left of a blue square" is the subject, combined with the relation); these
    layers let the denoiser's training build them.
    """

    def __init__(self, dim: int, width: int = 128, layers: int = 2, heads: int = 4, ff_mult: int = 2):
        super().__init__()
        if layers < 1 or width % heads:
            raise ValueError(f"context adapter needs layers >= 1 and width divisible by heads, got "
                             f"layers={layers}, width={width}, heads={heads}")
        self.proj_in = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(BasicTransformerBlock(width, heads, width // heads, ff_activation="gelu",
                                                          attention_bias=True, ff_mult=ff_mult)
                                    for _ in range(layers))
        self.norm_out = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, dim)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.proj_in(context)
        for block in self.blocks:
            h = block(h, self_mask=mask)
        return context + self.proj_out(self.norm_out(h))
