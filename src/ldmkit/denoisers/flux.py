"""FLUX.1's transformer (Black Forest Labs 2024): a rectified-flow denoiser over packed latent tokens.

    z [B, 16, H, W] -> pack 2x2 patches -> tokens [B, (H/2)(W/2), 64] -> x_embedder          = img
    T5 states [B, L_txt, joint_attention_dim] -> context_embedder                             = txt
    sinusoid(1000 t) -> MLP  (+ sinusoid(1000 g) -> MLP, FLUX.1-dev)  + MLP(CLIP pooled)       = c
    N double-stream blocks (img, txt) -> M single-stream blocks over [txt; img] -> AdaLN(c) -> Linear
    -> velocity tokens [B, (H/2)(W/2), 64] -> unpack -> [B, 16, H, W]

Double-stream block (MM-DiT, as in SD3): each stream has its own AdaLN-Zero, q/k/v, output projection and
MLP; the queries, keys and values of both streams meet in one attention over [txt; img]. Single-stream
block: one sequence, attention and MLP side by side from one modulated norm, their outputs concatenated
into one projection. Queries and keys are RMS-normalised per head. Positions are 3-axis rotary
embeddings: every token has ids (t, row, col) (text tokens all zero, image tokens (0, row, col)); the head
is split into `axes_dims_rope` parts, each rotated by its own axis' id.

Parameter names are diffusers' FluxTransformer2DModel's, so its weights load with the identity key map.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.nn.blocks import run_block
from ldmkit.nn.embeddings import TimestepEmbedding, timestep_embedding
from ldmkit.nn.transformer import FeedForward

ROPE_THETA = 10000
MLP_RATIO = 4
TIME_CHANNELS = 256  # sinusoid width of the timestep and guidance embeddings
_DIFFUSERS_META = {"_class_name", "_diffusers_version", "_name_or_path"}


@dataclass(frozen=True)
class FluxConfig:
    """diffusers' FluxTransformer2DModel config: its field names and defaults (FLUX.1-schnell's layout)."""
    patch_size: int = 1  # the output holds patch_size^2 * out_channels per token; FLUX packs 2x2 outside
    in_channels: int = 64  # 16 latent channels x a 2x2 patch (pack_latents)
    out_channels: int | None = None  # default in_channels
    num_layers: int = 19  # double-stream blocks
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096  # text token width (T5-XXL)
    pooled_projection_dim: int = 768  # pooled text width (CLIP-L)
    guidance_embeds: bool = False  # FLUX.1-dev's distilled guidance embedding (schnell has none)
    axes_dims_rope: tuple = (16, 56, 56)  # rotary dims per id axis (t, row, col); they sum to the head dim

    def __post_init__(self):
        if isinstance(self.axes_dims_rope, list):  # from JSON
            object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
        self._check_values()
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        if any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope={list(self.axes_dims_rope)} must hold even numbers (rotary pairs)")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"axes_dims_rope={list(self.axes_dims_rope)} must sum to "
                             f"attention_head_dim={self.attention_head_dim}")

    def _check_values(self) -> None:
        """Types and sane ranges of every field (a config read from JSON may hold anything)."""
        from ldmkit.errors import check_int, check_ints

        big = 1 << 16
        check_int("patch_size", self.patch_size, 1, 64)
        check_int("in_channels", self.in_channels, 1, big)
        check_int("out_channels", self.out_channels, 1, big, optional=True)
        check_int("num_layers", self.num_layers, 0, 1024)
        check_int("num_single_layers", self.num_single_layers, 0, 1024)
        check_int("attention_head_dim", self.attention_head_dim, 2, 4096)
        check_int("num_attention_heads", self.num_attention_heads, 1, 1024)
        check_int("joint_attention_dim", self.joint_attention_dim, 1, big)
        check_int("pooled_projection_dim", self.pooled_projection_dim, 1, big)
        check_ints("axes_dims_rope", list(self.axes_dims_rope), 2, 4096, max_len=8)
        if not isinstance(self.guidance_embeds, bool):
            raise ValueError(f"guidance_embeds={self.guidance_embeds!r} must be true or false")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FluxConfig":
        """Our config.json or a diffusers transformer/config.json (its `_class_name` etc. are ignored)."""
        from ldmkit.io.files import config_from_dict

        return config_from_dict(cls, {k: v for k, v in d.items() if k not in _DIFFUSERS_META})


_TINY = dict(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
             joint_attention_dim=32, pooled_projection_dim=24, axes_dims_rope=(4, 6, 6))
PRESETS: dict[str, FluxConfig] = {
    "flux-dev": FluxConfig(guidance_embeds=True),  # FLUX.1-dev: 11,901,408,320 parameters
    "flux-schnell": FluxConfig(),  # FLUX.1-schnell: 11,891,178,560 parameters
    "flux-tiny": FluxConfig(guidance_embeds=True, **_TINY),  # dev's layout at CPU-test size
    "flux-tiny-schnell": FluxConfig(**_TINY),
}


# ---- latent packing and position ids (diffusers' FluxPipeline._pack_latents & co) ----

def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] latents -> [B, (H/2)(W/2), 4C] tokens, one per 2x2 patch (row-major), channels (c, dy, dx)."""
    if z.ndim != 4 or z.shape[-2] % 2 or z.shape[-1] % 2:
        raise ValueError(f"latents of shape {tuple(z.shape)} cannot be packed: expected [B, C, H, W] with even H and W")
    b, c, h, w = z.shape
    z = z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # [B, H/2, W/2, C, 2, 2]
    return z.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, (h/2)(w/2), 4C] tokens -> [B, C, h, w] latents; h, w are the latent (not pixel) height and width."""
    if x.ndim != 3 or h % 2 or w % 2 or x.shape[1] != (h // 2) * (w // 2) or x.shape[2] % 4:
        raise ValueError(f"tokens of shape {tuple(x.shape)} cannot be unpacked to {h}x{w} latents: expected "
                         f"[B, {(h // 2) * (w // 2)}, 4C] and even h, w")
    b, _, c4 = x.shape
    x = x.reshape(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # [B, C, h/2, 2, w/2, 2]
    return x.reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[h*w, 3] position ids (0, row, col) of an h x w grid of packed tokens (latent size / 2), row-major."""
    rows = torch.arange(h, device=device)[:, None].expand(h, w)
    cols = torch.arange(w, device=device)[None, :].expand(h, w)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(h * w, 3).to(dtype)


def text_ids(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[n, 3] position ids of n text tokens: all zero (FLUX gives text no position of its own)."""
    return torch.zeros(n, 3, device=device, dtype=dtype)


# ---- rotary position embedding ----

def rope_angles(ids: torch.Tensor, axes_dims: tuple, theta: float = ROPE_THETA) -> tuple[torch.Tensor, torch.Tensor]:
    """[L, n_axes] ids -> (cos, sin), each [L, head_dim / 2] float32: axis i's ids times its frequencies
    theta^(-2j / d_i), j < d_i / 2, the axes' angles concatenated. Angles in float64 where the device has it."""
    dtype = torch.float32 if ids.device.type in ("mps", "npu") else torch.float64
    angles = []
    for i, d in enumerate(axes_dims):
        freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=dtype, device=ids.device) / d)  # [d/2]
        angles.append(ids[:, i].to(dtype)[:, None] * freqs[None, :])  # [L, d/2]
    a = torch.cat(angles, dim=-1)
    return a.cos().float(), a.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[2j], x[2j+1]) of [B, L, H, D] queries/keys by angle j of its token (in float32)."""
    xr, xi = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # [B, L, H, D/2] each
    cos, sin = cos[:, None, :], sin[:, None, :]  # [L, 1, D/2]
    out = torch.stack([xr * cos - xi * sin, xi * cos + xr * sin], dim=-1)  # [B, L, H, D/2, 2]
    return out.flatten(-2).to(x.dtype)


def _clip_fp16(x: torch.Tensor) -> torch.Tensor:
    """float16 activations clamped to its finite range, as diffusers does after each block (no inf in fp16)."""
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


# ---- layers ----

class AdaLN(nn.Module):
    """LayerNorm without affine, and SiLU(c) -> `n` modulation vectors [B, 1, D] (diffusers' AdaLayerNormZero
    for n=6, AdaLayerNormZeroSingle for 3, AdaLayerNormContinuous for 2 -- the last in (scale, shift) order)."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.linear = nn.Linear(dim, n * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.n = n

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(c))[:, None, :].chunk(self.n, dim=-1)


class FluxAttention(nn.Module):
    """Attention with per-head RMS-normalised queries and keys and rotary positions.

    `context=True` (double-stream) gives the text stream its own projections (`add_q/k/v_proj`,
    `norm_added_q/k`, `to_add_out`): both streams attend jointly over [txt; img] and each gets its part
    of the output back. `pre_only=True` (single-stream) has no output projection: the block's `proj_out`
    follows.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context: bool, pre_only: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.norm_q = nn.RMSNorm(head_dim, eps=1e-6)
        self.norm_k = nn.RMSNorm(head_dim, eps=1e-6)
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = None if pre_only else nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
        if context:
            self.norm_added_q = nn.RMSNorm(head_dim, eps=1e-6)
            self.norm_added_k = nn.RMSNorm(head_dim, eps=1e-6)
            self.add_q_proj = nn.Linear(dim, inner)
            self.add_k_proj = nn.Linear(dim, inner)
            self.add_v_proj = nn.Linear(dim, inner)
            self.to_add_out = nn.Linear(inner, dim)

    def _qkv(self, x, to_q, to_k, to_v, norm_q, norm_k):
        """[B, L, dim] -> q, k, v [B, L, H, D], q and k RMS-normalised per head."""
        split = (self.heads, self.head_dim)
        return norm_q(to_q(x).unflatten(-1, split)), norm_k(to_k(x).unflatten(-1, split)), to_v(x).unflatten(-1, split)

    def forward(self, x: torch.Tensor, rope: tuple, context: torch.Tensor | None = None):
        """x [B, L, dim] (context [B, L_txt, dim] before it) -> [B, L, inner] (pre_only), or
        (image output [B, L, dim], text output [B, L_txt, dim])."""
        q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        if context is not None:
            cq, ck, cv = self._qkv(context, self.add_q_proj, self.add_k_proj, self.add_v_proj,
                                   self.norm_added_q, self.norm_added_k)
            q, k, v = torch.cat([cq, q], dim=1), torch.cat([ck, k], dim=1), torch.cat([cv, v], dim=1)  # [txt; img]
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # [B, H, L, D]
        out = out.transpose(1, 2).flatten(2)  # [B, L_all, inner]
        if context is None:
            return out if self.to_out is None else self.to_out[1](self.to_out[0](out))
        n = context.shape[1]  # contiguous halves: a strided input takes another GEMM path (bf16 rounds differently)
        img, txt = out[:, n:].contiguous(), out[:, :n].contiguous()
        return self.to_out[1](self.to_out[0](img)), self.to_add_out(txt)


class FluxTransformerBlock(nn.Module):
    """Double-stream block: per-stream AdaLN-Zero and MLP around one joint attention."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = AdaLN(dim, 6)
        self.norm1_context = AdaLN(dim, 6)
        self.attn = FluxAttention(dim, heads, head_dim, context=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, mult=MLP_RATIO, activation="gelu-approximate")
        self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff_context = FeedForward(dim, mult=MLP_RATIO, activation="gelu-approximate")

    def forward(self, img, txt, c, rope):
        """img [B, L_img, D], txt [B, L_txt, D], c [B, D] -> (img, txt)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.norm1(c)  # [B, 1, D] each
        cshift1, cscale1, cgate1, cshift2, cscale2, cgate2 = self.norm1_context(c)
        attn_img, attn_txt = self.attn(self.norm1.norm(img) * (1 + scale1) + shift1, rope,
                                       self.norm1_context.norm(txt) * (1 + cscale1) + cshift1)
        img = img + gate1 * attn_img
        img = img + gate2 * self.ff(self.norm2(img) * (1 + scale2) + shift2)
        txt = txt + cgate1 * attn_txt
        txt = txt + cgate2 * self.ff_context(self.norm2_context(txt) * (1 + cscale2) + cshift2)
        return img, _clip_fp16(txt)


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block: x + gate * proj_out([attention(h); GELU(proj_mlp(h))]), h = modulated LN(x)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm = AdaLN(dim, 3)
        self.proj_mlp = nn.Linear(dim, MLP_RATIO * dim)
        self.proj_out = nn.Linear(dim + MLP_RATIO * dim, dim)
        self.attn = FluxAttention(dim, heads, head_dim, context=False, pre_only=True)

    def forward(self, x, c, rope):
        """x [B, L_txt + L_img, D] (text first), c [B, D] -> same shape."""
        shift, scale, gate = self.norm(c)  # [B, 1, D] each
        h = self.norm.norm(x) * (1 + scale) + shift
        mlp = F.gelu(self.proj_mlp(h), approximate="tanh")  # [B, L, 4D]
        return _clip_fp16(x + gate * self.proj_out(torch.cat([self.attn(h, rope), mlp], dim=-1)))


class TimeTextEmbedding(nn.Module):
    """c = MLP(sinusoid(t)) (+ MLP(sinusoid(guidance))) + MLP(pooled text); `text_embedder` is PixArt's
    caption projection with SiLU, the same Linear-SiLU-Linear as a timestep MLP."""

    def __init__(self, dim: int, pooled_dim: int, guidance: bool):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(TIME_CHANNELS, dim)
        self.guidance_embedder = TimestepEmbedding(TIME_CHANNELS, dim) if guidance else None
        self.text_embedder = TimestepEmbedding(pooled_dim, dim)

    def forward(self, t: torch.Tensor, guidance: torch.Tensor | None, pooled: torch.Tensor) -> torch.Tensor:
        c = self.timestep_embedder(timestep_embedding(t, TIME_CHANNELS).to(pooled.dtype))
        if self.guidance_embedder is not None:
            c = c + self.guidance_embedder(timestep_embedding(guidance, TIME_CHANNELS).to(pooled.dtype))
        return c + self.text_embedder(pooled)


# ---- the network ----

class Flux(nn.Module):
    """``forward(hidden_states, timestep, guidance, pooled_projections, encoder_hidden_states, img_ids, txt_ids)
    -> [B, L_img, patch_size^2 * out_channels]`` (see module docstring and docs/denoisers.md)."""

    def __init__(self, config: FluxConfig):
        super().__init__()
        self.config = c = config
        dim = c.inner_dim
        self.time_text_embed = TimeTextEmbedding(dim, c.pooled_projection_dim, c.guidance_embeds)
        self.context_embedder = nn.Linear(c.joint_attention_dim, dim)
        self.x_embedder = nn.Linear(c.in_channels, dim)
        heads, head_dim = c.num_attention_heads, c.attention_head_dim
        self.transformer_blocks = nn.ModuleList(FluxTransformerBlock(dim, heads, head_dim)
                                                for _ in range(c.num_layers))
        self.single_transformer_blocks = nn.ModuleList(FluxSingleTransformerBlock(dim, heads, head_dim)
                                                       for _ in range(c.num_single_layers))
        self.norm_out = AdaLN(dim, 2)
        self.proj_out = nn.Linear(dim, c.patch_size ** 2 * c.out_channels)
        self.gradient_checkpointing = False  # recompute each block in the backward pass
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Initialisation for training from scratch (DiT's recipe; pretrained weights replace it): xavier
        linears with zero biases, N(0, 0.02) for the conditioning MLPs, zeros where noted below."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for mlp in self.time_text_embed.children():
            nn.init.normal_(mlp.linear_1.weight, std=0.02)
            nn.init.normal_(mlp.linear_2.weight, std=0.02)
        zero = [self.norm_out.linear,  # the final modulation starts neutral (scale 0, shift 0), as DiT's
                self.proj_out]  # the network starts by predicting zero velocity
        for block in self.transformer_blocks:
            zero.append(block.norm1.linear)  # AdaLN-Zero: image gates start at 0, the block is the identity
            zero.append(block.norm1_context.linear)  # the text stream's gates start at 0 too
        for block in self.single_transformer_blocks:
            zero.append(block.norm.linear)  # AdaLN-Zero: the gate starts at 0, the block is the identity
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def _per_sample(self, name: str, v, b: int, device) -> torch.Tensor:
        """A scalar or [B] tensor -> [B] on `device`."""
        v = torch.as_tensor(v, device=device)
        if v.numel() == 1:
            return v.reshape(1).expand(b)
        if tuple(v.shape) != (b,):
            raise ValueError(f"{name} has shape {tuple(v.shape)}; expected a scalar or [{b}]")
        return v

    def _check(self, x, guidance, pooled, txt, img_ids, txt_ids) -> None:
        c = self.config
        if x.ndim != 3 or x.shape[-1] != c.in_channels:
            raise ValueError(f"hidden_states has shape {tuple(x.shape)}; expected [B, L_img, {c.in_channels}] "
                             "(packed latents: pack_latents)")
        b, n_axes = x.shape[0], len(c.axes_dims_rope)
        if txt is None or txt.ndim != 3 or txt.shape[0] != b or txt.shape[-1] != c.joint_attention_dim:
            got = None if txt is None else tuple(txt.shape)
            raise ValueError(f"encoder_hidden_states has shape {got}; expected [{b}, L_txt, {c.joint_attention_dim}]")
        if pooled is None or tuple(pooled.shape) != (b, c.pooled_projection_dim):
            got = None if pooled is None else tuple(pooled.shape)
            raise ValueError(f"pooled_projections has shape {got}; expected [{b}, {c.pooled_projection_dim}]")
        for name, ids, n in (("img_ids", img_ids, x.shape[1]), ("txt_ids", txt_ids, txt.shape[1])):
            if ids is None or tuple(ids.shape) != (n, n_axes):
                got = None if ids is None else tuple(ids.shape)
                raise ValueError(f"{name} has shape {got}; expected [{n}, {n_axes}] (image_ids / text_ids)")
        if c.guidance_embeds and guidance is None:
            raise ValueError("guidance is None but this FLUX transformer has a guidance embedding (FLUX.1-dev): "
                             "pass the guidance scale")
        if not c.guidance_embeds and guidance is not None:
            raise ValueError("guidance was given but this FLUX transformer has no guidance embedding "
                             "(guidance_embeds=false, as FLUX.1-schnell): pass None")

    def forward(self, hidden_states: torch.Tensor, timestep, guidance, pooled_projections: torch.Tensor,
                encoder_hidden_states: torch.Tensor, img_ids: torch.Tensor, txt_ids: torch.Tensor) -> torch.Tensor:
        """hidden_states [B, L_img, in_channels] packed noisy latents; timestep and guidance scalars or [B]
        (timestep in [0, 1], both multiplied by 1000 inside, as diffusers); pooled_projections [B, P];
        encoder_hidden_states [B, L_txt, joint_attention_dim]; img_ids [L_img, 3], txt_ids [L_txt, 3]."""
        self._check(hidden_states, guidance, pooled_projections, encoder_hidden_states, img_ids, txt_ids)
        b, n_txt = hidden_states.shape[0], encoder_hidden_states.shape[1]
        img = self.x_embedder(hidden_states)  # [B, L_img, D]
        # diffusers scales in the activations' dtype (so bf16 rounds 1000 t the same way)
        t = self._per_sample("timestep", timestep, b, img.device).to(img.dtype) * 1000
        g = None if guidance is None else self._per_sample("guidance", guidance, b, img.device).to(img.dtype) * 1000
        c = self.time_text_embed(t, g, pooled_projections)  # [B, D]
        txt = self.context_embedder(encoder_hidden_states)  # [B, L_txt, D]
        ids = torch.cat([txt_ids, img_ids], dim=0).to(img.device)  # [L_txt + L_img, 3]
        rope = rope_angles(ids, self.config.axes_dims_rope)  # cos, sin [L_txt + L_img, head_dim / 2]

        ckpt = self.gradient_checkpointing and self.training
        for block in self.transformer_blocks:
            img, txt = run_block(block, img, txt, c, rope, checkpoint=ckpt)
        x = torch.cat([txt, img], dim=1)  # [B, L_txt + L_img, D]
        for block in self.single_transformer_blocks:
            x = run_block(block, x, c, rope, checkpoint=ckpt)
        scale, shift = self.norm_out(c)  # AdaLayerNormContinuous: scale first
        return self.proj_out(self.norm_out.norm(x[:, n_txt:]) * (1 + scale) + shift)  # [B, L_img, p^2 C_out]


class FluxModel(Flux):
    """FLUX.1 as a denoiser over latents, for the pipelines and the trainer: ``forward(x [B, 16, H, W], t, context,
    pooled, guidance=None) -> velocity [B, 16, H, W]`` -- packs 2x2 patches, makes the position ids, and
    takes the schedule's timesteps (flow time x 1000; FLUX reads flow time). The weights are `Flux`'s."""

    component_type = "flux"
    takes_pooled = True  # the CLIP pooled text enters the modulation
    latent_multiple = 2  # latent sides are packed in 2x2 patches

    @property
    def latent_in_channels(self) -> int:
        return self.config.in_channels // 4

    @property
    def guidance_mode(self) -> str:
        """"distilled" (FLUX.1-dev: the guidance scale is an input, no classifier-free guidance) or "none"
        (FLUX.1-schnell)."""
        return "distilled" if self.config.guidance_embeds else "none"

    def forward(self, x: torch.Tensor, t, context: torch.Tensor, pooled: torch.Tensor, guidance=None,
                class_labels=None, context_mask=None) -> torch.Tensor:
        # x: [B, C, H, W] latents (H, W even); context: [B, L, joint_attention_dim] T5 states; pooled: [B, 768]
        B, _, H, W = x.shape
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B).to(x.dtype) / 1000
        if guidance is not None:
            guidance = torch.as_tensor(guidance, device=x.device).reshape(-1).expand(B).to(x.dtype)
        tokens = super().forward(pack_latents(x), t, guidance, pooled.to(x.dtype), context.to(x.dtype),
                                 image_ids(H // 2, W // 2, x.device, x.dtype), text_ids(context.shape[1], x.device,
                                                                                         x.dtype))
        return unpack_latents(tokens, H, W)
