"""DiT (Peebles & Xie 2023): a transformer denoiser over latent patches with AdaLN-Zero.

    x [B,C,H,W] -> patchify (conv p x p, stride p) + 2D sin-cos positions -> N DiT blocks -> final AdaLN
    -> linear -> unpatchify -> [B, out_channels, H, W]

Each block is modulated by c = MLP(sinusoid(t)) (+ class embedding): a zero-initialised linear maps
SiLU(c) to six vectors (shift, scale, gate for attention and for the MLP), so every block starts as the
identity and the network starts by predicting zeros. An optional cross-attention (norm2/attn2, as in
PixArt) attends to a text sequence; its output projection is zero-initialised too.

Parameter names follow diffusers' DiTTransformer2DModel (``pos_embed.proj``, ``transformer_blocks.I.
{norm1.linear, attn1.to_q/k/v/out.0, ff.net.0.proj, ff.net.2}``, ``proj_out_1``, ``proj_out_2``). One
real difference: diffusers gives every block its own timestep/class embedder (``norm1.emb``) although the
original DiT shares one; we share one (``time_embedding``, ``class_embedding``), see
``state_dict_from_diffusers`` for the key map.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.nn.attention import Attention
from ldmkit.nn.blocks import run_block
from ldmkit.nn.embeddings import TimestepEmbedding, timestep_embedding
from ldmkit.nn.transformer import FeedForward

POS_MODES = ("interpolate", "extend")


@dataclass(frozen=True)
class DiTConfig:
    in_channels: int = 4  # counts concatenated spatial conditions
    out_channels: int | None = None  # default in_channels, doubled when learn_sigma
    learn_sigma: bool = False  # output [prediction, variance interpolation v] as in iDDPM / DiT
    sample_size: int = 32  # training latent size: the positional grid base
    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int | None = 1000  # None: no class embedding; index num_classes is the null class
    cross_attention_dim: int | None = None  # set to attend to a text sequence
    time_freq_shift: int = 1  # diffusers' DiT uses downscale_freq_shift=1 (the original code 0)
    norm_eps: float = 1e-6
    pos_embed_mode: str = "interpolate"  # positions for other grid sizes: see pos_embed_2d

    def __post_init__(self):
        self._check_values()
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels * (2 if self.learn_sigma else 1))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size={self.hidden_size} must be a multiple of 4 (2D sin-cos positions)")
        if self.patch_size < 1 or self.sample_size % self.patch_size:
            raise ValueError(f"sample_size={self.sample_size} must be a multiple of patch_size={self.patch_size}")
        if self.depth < 1:
            raise ValueError(f"depth={self.depth} must be >= 1")
        if self.pos_embed_mode not in POS_MODES:
            raise ValueError(f"pos_embed_mode={self.pos_embed_mode!r} is not one of {POS_MODES}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes={self.num_classes} must be >= 1 or None")

    def _check_values(self) -> None:
        """Types and sane ranges of every field (a config read from JSON may hold anything)."""
        from ldmkit.errors import check_int, check_number, check_str

        big = 65536  # channels
        check_int("in_channels", self.in_channels, 1, big)
        check_int("out_channels", self.out_channels, 1, big, optional=True)
        check_int("sample_size", self.sample_size, 1, big)  # the positional grid: needed
        check_int("patch_size", self.patch_size, 1, 64)
        check_int("hidden_size", self.hidden_size, 4, big)
        check_int("depth", self.depth, 1, 1024)
        check_int("num_heads", self.num_heads, 1, big)
        check_number("mlp_ratio", self.mlp_ratio, 0.0, 64.0, lo_open=True)
        check_int("num_classes", self.num_classes, 1, 1 << 24, optional=True)
        check_int("cross_attention_dim", self.cross_attention_dim, 1, big, optional=True)
        check_int("time_freq_shift", self.time_freq_shift, 0, 1 << 16)
        check_number("norm_eps", self.norm_eps, 0.0, 1.0, lo_open=True)
        check_str("pos_embed_mode", self.pos_embed_mode, POS_MODES)
        if not isinstance(self.learn_sigma, bool):
            raise ValueError(f"learn_sigma={self.learn_sigma!r} must be true or false")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DiTConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**d)


_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
PRESETS: dict[str, DiTConfig] = {
    f"DiT-{size}/{p}": DiTConfig(hidden_size=h, depth=d, num_heads=n, patch_size=p, learn_sigma=True,
                                 sample_size=32, num_classes=1000)
    for size, (h, d, n) in _SIZES.items() for p in (2, 4, 8)
}
PRESETS.update({
    "tiny": DiTConfig(hidden_size=64, depth=2, num_heads=4, patch_size=2, sample_size=8, num_classes=10),
    "tiny-text": DiTConfig(hidden_size=64, depth=2, num_heads=4, patch_size=2, sample_size=8, num_classes=None,
                           cross_attention_dim=32),
    "small-text": DiTConfig(hidden_size=192, depth=6, num_heads=6, patch_size=2, sample_size=8,
                            num_classes=None, cross_attention_dim=128),
})


def pos_embed_2d(dim: int, h: int, w: int, base: int, mode: str = "interpolate",
                 device=None) -> torch.Tensor:
    """[h*w, dim] fixed 2D sin-cos positions; row-major tokens, first half encodes the column.

    ``mode="interpolate"`` (diffusers' behaviour) spreads any grid over the training range
    [0, base) per axis, so larger inputs see positions the model was trained on at finer
    spacing; ``"extend"`` keeps unit spacing (positions beyond the training grid are new).
    At the training grid size both give the original DiT table.
    """
    def axis(n):
        pos = torch.arange(n, dtype=torch.float64, device=device)
        return pos / (n / base) if mode == "interpolate" else pos

    omega = torch.arange(dim // 4, dtype=torch.float64, device=device) / (dim / 4)
    omega = 1.0 / 10000 ** omega

    def sincos(pos):  # [n] -> [n, dim/2]
        out = pos[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    ew, eh = sincos(axis(w)), sincos(axis(h))  # [w, dim/2], [h, dim/2]
    emb = torch.cat([ew[None, :, :].expand(h, w, -1), eh[:, None, :].expand(h, w, -1)], dim=-1)
    return emb.reshape(h * w, dim).float()


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens, plus fixed positions computed for the input's grid."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, base: int, mode: str):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.base, self.mode = base, mode
        self._cache: dict = {}

    def positions(self, h: int, w: int, device) -> torch.Tensor:
        key = (h, w, str(device))
        if key not in self._cache:
            self._cache[key] = pos_embed_2d(self.proj.out_channels, h, w, self.base, self.mode, device)
        return self._cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        _, _, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        return (tokens + self.positions(h, w, x.device)).to(x.dtype)


class LabelEmbedding(nn.Module):
    """Class table with one extra row, the null class (index ``num_classes``) used for CFG."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class AdaLNZero(nn.Module):
    """LayerNorm without affine; SiLU(c) -> 6 modulation vectors (zero-initialised linear)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.linear = nn.Linear(dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(c))[:, None, :].chunk(6, dim=-1)


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim, heads = cfg.hidden_size, cfg.num_heads
        self.norm1 = AdaLNZero(dim, cfg.norm_eps)
        self.attn1 = Attention(dim, heads=heads, dim_head=dim // heads, bias=True)
        if cfg.cross_attention_dim is not None:
            self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
            self.attn2 = Attention(dim, cross_attention_dim=cfg.cross_attention_dim, heads=heads,
                                   dim_head=dim // heads, bias=True)
        else:
            self.norm2 = self.attn2 = None
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=cfg.norm_eps)
        self.ff = FeedForward(dim, mult=cfg.mlp_ratio, activation="gelu-approximate")

    def forward(self, x, c, context=None, context_mask=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(c)
        x = x + gate_msa * self.attn1(self.norm1.norm(x) * (1 + scale_msa) + shift_msa)
        if self.attn2 is not None:
            x = x + self.attn2(self.norm2(x), context=context, mask=context_mask)
        return x + gate_mlp * self.ff(self.norm3(x) * (1 + scale_mlp) + shift_mlp)


class DiT(nn.Module):
    """``forward(x, t, context=None, class_labels=None, context_mask=None) -> [B, out_channels, H, W]``."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = c = config
        dim = c.hidden_size
        self.pos_embed = PatchEmbed(c.in_channels, dim, c.patch_size, c.sample_size // c.patch_size,
                                    c.pos_embed_mode)
        self.time_embedding = TimestepEmbedding(256, dim)
        self.class_embedding = LabelEmbedding(c.num_classes, dim) if c.num_classes is not None else None
        self.transformer_blocks = nn.ModuleList(DiTBlock(c) for _ in range(c.depth))
        self.gradient_checkpointing = False  # recompute each block in the backward pass
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.proj_out_1 = nn.Linear(dim, 2 * dim)
        self.proj_out_2 = nn.Linear(dim, c.patch_size ** 2 * c.out_channels)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """DiT initialisation: xavier linears, N(0, 0.02) embeddings, zeros where the paper says."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.pos_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.pos_embed.proj.bias)
        nn.init.normal_(self.time_embedding.linear_1.weight, std=0.02)
        nn.init.normal_(self.time_embedding.linear_2.weight, std=0.02)
        if self.class_embedding is not None:
            nn.init.normal_(self.class_embedding.embedding_table.weight, std=0.02)
        zero = [self.proj_out_1, self.proj_out_2]
        for block in self.transformer_blocks:
            zero.append(block.norm1.linear)  # AdaLN-Zero: gates start at 0, so the block is the identity
            if block.attn2 is not None:
                zero.append(block.attn2.to_out[0])  # cross-attention starts switched off
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def _check(self, x, context, class_labels, context_mask):
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected [B, {c.in_channels}, H, W]")
        if x.shape[-2] % c.patch_size or x.shape[-1] % c.patch_size:
            raise ValueError(f"latent size {tuple(x.shape[-2:])} must be a multiple of patch_size={c.patch_size}")
        if c.cross_attention_dim is not None:
            if context is None or context.ndim != 3 or context.shape[-1] != c.cross_attention_dim \
                    or context.shape[0] != x.shape[0]:
                got = None if context is None else tuple(context.shape)
                raise ValueError(f"context has shape {got}; expected [{x.shape[0]}, L, {c.cross_attention_dim}]")
            if context_mask is not None and tuple(context_mask.shape) != tuple(context.shape[:2]):
                raise ValueError(f"context_mask has shape {tuple(context_mask.shape)}; expected "
                                 f"{tuple(context.shape[:2])}")
        if c.num_classes is not None:
            if class_labels is None or class_labels.shape != (x.shape[0],):
                got = None if class_labels is None else tuple(class_labels.shape)
                raise ValueError(f"class_labels has shape {got}; expected [{x.shape[0]}] "
                                 f"(use {c.num_classes} for the null class)")
            lo, hi = int(class_labels.min()), int(class_labels.max())
            if lo < 0 or hi > c.num_classes:
                raise ValueError(f"class_labels range [{lo}, {hi}] is outside [0, {c.num_classes}]")

    def forward(self, x: torch.Tensor, t, context: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check(x, context, class_labels, context_mask)
        cfg = self.config
        b, _, H, W = x.shape
        p = cfg.patch_size
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0 or t.numel() == 1:
            t = t.reshape(1).expand(b)
        elif t.shape != (b,):
            raise ValueError(f"t has shape {tuple(t.shape)}; expected a scalar or [{b}]")
        c = self.time_embedding(timestep_embedding(t, 256, flip_sin_to_cos=True,
                                                   downscale_freq_shift=cfg.time_freq_shift).to(x.dtype))
        if self.class_embedding is not None:
            c = c + self.class_embedding(class_labels.to(x.device))
        if context_mask is not None:
            context_mask = context_mask.to(device=x.device, dtype=torch.bool)

        h = self.pos_embed(x)
        for block in self.transformer_blocks:
            h = run_block(block, h, c, context, context_mask, checkpoint=self.gradient_checkpointing and self.training)
        shift, scale = self.proj_out_1(F.silu(c))[:, None, :].chunk(2, dim=-1)
        h = self.proj_out_2(self.norm_out(h) * (1 + scale) + shift)
        # unpatchify: [B, (H/p)(W/p), p*p*C] -> [B, C, H, W]
        h = h.reshape(b, H // p, W // p, p, p, cfg.out_channels)
        return torch.einsum("nhwpqc->nchpwq", h).reshape(b, cfg.out_channels, H, W)


def state_dict_from_diffusers(sd: dict) -> dict:
    """diffusers DiTTransformer2DModel state dict -> ours.

    Identity except the per-block embedders ``transformer_blocks.I.norm1.emb.{timestep_embedder,
    class_embedder}``, which become our shared ``time_embedding`` / ``class_embedding`` (taken from
    block 0; diffusers' own final layer also uses block 0's). Blocks whose embedders differ from
    block 0's cannot be represented and raise ValueError.
    """
    out, shared = {}, {}
    for k, v in sd.items():
        parts = k.split(".")
        if len(parts) > 4 and parts[0] == "transformer_blocks" and parts[2:4] == ["norm1", "emb"]:
            rest = ".".join(parts[4:])
            rest = rest.replace("timestep_embedder.", "time_embedding.", 1)
            rest = rest.replace("class_embedder.", "class_embedding.", 1)
            if rest in shared and not torch.equal(shared[rest], v):
                raise ValueError(f"{k} differs from block 0's embedder; ldmkit's DiT shares one embedder")
            shared.setdefault(rest, v)
        else:
            out[k] = v
    out.update(shared)
    return out


def state_dict_to_diffusers(sd: dict, depth: int) -> dict:
    """Ours -> diffusers DiTTransformer2DModel: the shared embedders are copied into every block."""
    out = {}
    for k, v in sd.items():
        if k.startswith("time_embedding."):
            for i in range(depth):
                out[f"transformer_blocks.{i}.norm1.emb.timestep_embedder." + k[len("time_embedding."):]] = v
        elif k.startswith("class_embedding."):
            for i in range(depth):
                out[f"transformer_blocks.{i}.norm1.emb.class_embedder." + k[len("class_embedding."):]] = v
        else:
            out[k] = v
    return out
