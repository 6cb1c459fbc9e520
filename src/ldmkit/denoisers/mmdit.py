"""MM-DiT, the denoiser of Stable Diffusion 3 / 3.5 (Esser et al. 2024): image patches and text tokens in
one joint attention, each stream with its own weights; AdaLN modulation from timestep + pooled text.

    z [B, 16, H, W] -> patches (p x p) + fixed 2D sin-cos positions cropped from a max-size table
    t -> sinusoids -> MLP  +  pooled text -> MLP          = c          (the modulation input)
    text [B, L, joint_attention_dim] -> Linear            = ctx
    N joint blocks: per stream AdaLN-Zero(c); q, k, v of both streams attend together ([image; text]);
                    the last block keeps no text output (context_pre_only)
    AdaLN-continuous(c), Linear -> unpatchify -> velocity [B, 16, H, W]

SD3.5 adds RMS-normalised queries and keys (`qk_norm="rms_norm"`) and, in SD3.5 Medium, a second
image-only attention in the first blocks (`dual_attention_layers`). Parameter names are diffusers'
`SD3Transformer2DModel`'s, so its weights load with the identity key map.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.denoisers.dit import pos_embed_2d
from ldmkit.nn.embeddings import TimestepEmbedding, timestep_embedding
from ldmkit.nn.transformer import FeedForward


@dataclass(frozen=True)
class MMDiTConfig:
    """diffusers' SD3Transformer2DModel config (its field names and defaults: SD3 Medium's layout)."""
    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple = ()
    qk_norm: str | None = None

    def __post_init__(self):
        from ldmkit.errors import check_int

        for f in fields(self):
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        for name, hi in (("sample_size", 16384), ("patch_size", 64), ("in_channels", 1024), ("num_layers", 512),
                         ("attention_head_dim", 4096), ("num_attention_heads", 1024), ("joint_attention_dim", 1 << 16),
                         ("caption_projection_dim", 1 << 16), ("pooled_projection_dim", 1 << 16),
                         ("out_channels", 1024), ("pos_embed_max_size", 16384)):
            check_int(name, getattr(self, name), 1, hi)
        if self.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"qk_norm={self.qk_norm!r} is not supported (None or 'rms_norm')")
        bad = [i for i in self.dual_attention_layers if not isinstance(i, int) or not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"dual_attention_layers {bad} are not layer indices in [0, {self.num_layers})")
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(f"caption_projection_dim={self.caption_projection_dim} must equal heads x head width "
                             f"({self.inner_dim}): the text stream joins the image stream's attention")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MMDiTConfig":
        """Our config.json or a diffusers transformer/config.json (its `_class_name` etc. are ignored)."""
        from ldmkit.io.files import config_from_dict

        return config_from_dict(cls, {k: v for k, v in d.items() if not k.startswith("_")})


PRESETS: dict[str, MMDiTConfig] = {
    # SD3 Medium (2B): 24 blocks of 24 heads x 64, 192 x 192 position table.
    "sd3-medium": MMDiTConfig(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                              pos_embed_max_size=192),
    # SD3.5 Large (8B): 38 blocks of 38 heads, RMS-normalised q / k.
    "sd3.5-large": MMDiTConfig(num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                               pos_embed_max_size=192, qk_norm="rms_norm"),
    # SD3.5 Medium (2.5B): as SD3 Medium with q / k norms and an image-only attention in blocks 0-12.
    "sd3.5-medium": MMDiTConfig(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                                pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13))),
    # CPU-sized (`ldm train` fits channels and text widths to the data): train on the shapes set in minutes.
    "mmdit-tiny": MMDiTConfig(sample_size=8, num_layers=4, attention_head_dim=32, num_attention_heads=4,
                              joint_attention_dim=384, caption_projection_dim=128, pooled_projection_dim=384,
                              pos_embed_max_size=16),
    "mmdit-small": MMDiTConfig(sample_size=8, num_layers=6, attention_head_dim=32, num_attention_heads=6,
                               joint_attention_dim=384, caption_projection_dim=192, pooled_projection_dim=384,
                               pos_embed_max_size=16),
}


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim (eps 1e-6), computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * self.weight.float()).to(dtype)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class AdaLayerNormZero(nn.Module):
    """LayerNorm without affine, modulated by Linear(SiLU(c)) -> `chunks` vectors (6: shift / scale / gate
    for attention and MLP; SD3.5's dual blocks 9: a second shift / scale / gate for the image-only attention)."""

    def __init__(self, dim: int, chunks: int = 6):
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(dim, chunks * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple:
        m = self.linear(F.silu(c)).chunk(self.chunks, dim=1)
        h = self.norm(x)
        out = (_modulate(h, m[0], m[1]), m[2], m[3], m[4], m[5])
        return out + (_modulate(h, m[6], m[7]), m[8]) if self.chunks == 9 else out


class AdaLayerNormContinuous(nn.Module):
    """LayerNorm without affine, then x * (1 + scale) + shift with (scale, shift) = Linear(SiLU(c))."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(c).to(x.dtype)).chunk(2, dim=1)
        return _modulate(self.norm(x), shift, scale)


class JointAttention(nn.Module):
    """Image queries / keys / values (to_q, to_k, to_v) and text ones (add_*_proj) attend together; outputs
    split back (to_out.0 for the image, to_add_out for the text unless `context_pre_only`). Without text
    (`added=False`) a plain self-attention (SD3.5's attn2)."""

    def __init__(self, dim: int, heads: int, head_dim: int, qk_norm: bool, added: bool = True,
                 context_pre_only: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        self.norm_q = RMSNorm(head_dim) if qk_norm else None
        self.norm_k = RMSNorm(head_dim) if qk_norm else None
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
        if added:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, inner) for _ in range(3))
            self.norm_added_q = RMSNorm(head_dim) if qk_norm else None
            self.norm_added_k = RMSNorm(head_dim) if qk_norm else None
            self.to_add_out = None if context_pre_only else nn.Linear(inner, dim)

    def _heads(self, x: torch.Tensor, norm) -> torch.Tensor:  # [B, L, H*D] -> [B, H, L, D]
        x = x.unflatten(-1, (self.heads, -1)).transpose(1, 2)
        return norm(x) if norm is not None else x

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None = None):
        # x: [B, N, dim] image tokens; ctx: [B, L, dim] text tokens (or None)
        q, k, v = self._heads(self.to_q(x), self.norm_q), self._heads(self.to_k(x), self.norm_k), \
            self._heads(self.to_v(x), None)
        n = x.shape[1]
        if ctx is not None:
            q = torch.cat([q, self._heads(self.add_q_proj(ctx), self.norm_added_q)], dim=2)
            k = torch.cat([k, self._heads(self.add_k_proj(ctx), self.norm_added_k)], dim=2)
            v = torch.cat([v, self._heads(self.add_v_proj(ctx), None)], dim=2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # [B, N + L, H*D]
        img = self.to_out[1](self.to_out[0](out[:, :n]))
        if ctx is None:
            return img
        return img, (self.to_add_out(out[:, n:]) if self.to_add_out is not None else None)


class JointBlock(nn.Module):
    def __init__(self, c: MMDiTConfig, index: int):
        super().__init__()
        dim, self.pre_only = c.inner_dim, index == c.num_layers - 1
        self.dual = index in c.dual_attention_layers
        qk = c.qk_norm == "rms_norm"
        self.norm1 = AdaLayerNormZero(dim, 9 if self.dual else 6)
        self.norm1_context = AdaLayerNormContinuous(dim) if self.pre_only else AdaLayerNormZero(dim)
        self.attn = JointAttention(dim, c.num_attention_heads, c.attention_head_dim, qk, context_pre_only=self.pre_only)
        self.attn2 = JointAttention(dim, c.num_attention_heads, c.attention_head_dim, qk, added=False) if self.dual \
            else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, dim, activation="gelu-approximate")
        if not self.pre_only:
            self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.ff_context = FeedForward(dim, dim, activation="gelu-approximate")

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, c: torch.Tensor):
        # x: [B, N, dim]; ctx: [B, L, dim]; c: [B, dim]
        h, gate, shift_mlp, scale_mlp, gate_mlp, *second = self.norm1(x, c)
        if self.pre_only:
            hc = self.norm1_context(ctx, c)
        else:
            hc, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(ctx, c)
        attn, attn_ctx = self.attn(h, hc)
        x = x + gate[:, None] * attn
        if self.attn2 is not None:
            x = x + second[1][:, None] * self.attn2(second[0])
        x = x + gate_mlp[:, None] * self.ff(_modulate(self.norm2(x), shift_mlp, scale_mlp))
        if self.pre_only:
            return x, None
        ctx = ctx + c_gate[:, None] * attn_ctx
        ctx = ctx + c_gate_mlp[:, None] * self.ff_context(_modulate(self.norm2_context(ctx), c_shift_mlp, c_scale_mlp))
        return x, ctx


class _PatchEmbed(nn.Module):
    """p x p patches -> tokens; positions: the centre crop of a fixed max-size 2D sin-cos table."""

    def __init__(self, c: MMDiTConfig):
        super().__init__()
        self.p, self.max = c.patch_size, c.pos_embed_max_size
        self.proj = nn.Conv2d(c.in_channels, c.inner_dim, c.patch_size, stride=c.patch_size)
        table = pos_embed_2d(c.inner_dim, self.max, self.max, base=c.sample_size // c.patch_size)
        self.register_buffer("pos_embed", table[None], persistent=True)  # [1, max*max, dim], in diffusers' weights

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h, w = z.shape[-2] // self.p, z.shape[-1] // self.p
        if h > self.max or w > self.max:
            raise ValueError(f"a {h}x{w} patch grid exceeds the position table's {self.max}x{self.max} "
                             f"(at most {self.max * self.p} latent pixels a side)")
        top, left = (self.max - h) // 2, (self.max - w) // 2
        pos = self.pos_embed.reshape(1, self.max, self.max, -1)[:, top:top + h, left:left + w].reshape(1, h * w, -1)
        return self.proj(z).flatten(2).transpose(1, 2) + pos.to(z.dtype)


class _TextProjection(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(d_in, d_out), nn.Linear(d_out, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class _TimeText(nn.Module):
    def __init__(self, c: MMDiTConfig):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, c.inner_dim)
        self.text_embedder = _TextProjection(c.pooled_projection_dim, c.inner_dim)

    def forward(self, t: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
        return self.timestep_embedder(freq.to(pooled.dtype)) + self.text_embedder(pooled)


class MMDiT(nn.Module):
    """``forward(x, t, context, pooled) -> velocity``; t in the schedule's timesteps (sigma x 1000)."""

    component_type = "mmdit"
    takes_pooled = True  # the pooled text enters every block's modulation

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = c = config
        self.pos_embed = _PatchEmbed(c)
        self.time_text_embed = _TimeText(c)
        self.context_embedder = nn.Linear(c.joint_attention_dim, c.caption_projection_dim)
        self.transformer_blocks = nn.ModuleList(JointBlock(c, i) for i in range(c.num_layers))
        self.norm_out = AdaLayerNormContinuous(c.inner_dim)
        self.proj_out = nn.Linear(c.inner_dim, c.patch_size ** 2 * c.out_channels)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, t, context: torch.Tensor, pooled: torch.Tensor,
                class_labels=None, context_mask=None) -> torch.Tensor:
        # x: [B, in_channels, H, W] latents; context: [B, L, joint_attention_dim]; pooled: [B, pooled_projection_dim]
        c, p = self.config, self.config.patch_size
        B, _, H, W = x.shape
        if H % p or W % p:
            raise ValueError(f"latent size {H}x{W} is not a multiple of the patch size {p}")
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B)
        h = self.pos_embed(x)  # [B, N, dim]
        cond = self.time_text_embed(t, pooled.to(h.dtype))  # [B, dim]
        ctx = self.context_embedder(context.to(h.dtype))  # [B, L, dim]
        for block in self.transformer_blocks:
            if self.gradient_checkpointing and self.training:
                h, ctx = torch.utils.checkpoint.checkpoint(block, h, ctx, cond, use_reentrant=False)
            else:
                h, ctx = block(h, ctx, cond)
        h = self.proj_out(self.norm_out(h, cond))  # [B, N, p*p*out]
        h = h.reshape(B, H // p, W // p, p, p, c.out_channels)
        return torch.einsum("nhwpqc->nchpwq", h).reshape(B, c.out_channels, H, W)


__all__ = ["MMDiT", "MMDiTConfig", "PRESETS"]
