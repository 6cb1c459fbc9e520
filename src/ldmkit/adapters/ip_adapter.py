"""IP-Adapter (Ye et al. 2023): an image prompt for a frozen text-to-image UNet.

A CLIP image encoder embeds the image prompt; a small projection turns the embedding into a few tokens
of the UNet's context width; every cross-attention layer (attn2) gets its own key / value projections
of those tokens and adds a second attention to the text's, before its output projection:

    out = to_out(attention(q, k_text, v_text) + scale * attention(q, to_k_ip(tokens), to_v_ip(tokens)))

Two projections, with diffusers' module names (`models/embeddings.py`):

    basic  ImageProjection    image_embeds (Linear: CLIP image embedding -> n x context width) + norm;
                              fed the encoder's projected `image_embeds`, 4 tokens
    plus   Resampler          (diffusers' IPAdapterPlusImageProjection) learned `latents` queries attend
                              to proj_in(penultimate hidden states) through `layers`; proj_out + norm_out

Classifier-free guidance as diffusers: the unconditional half sees the projection of zero embeddings
(basic) or of the encoder's hidden states for an all-zero image (plus); `encode_image` returns both.

    adapter = IPAdapter(image_proj, [IPAttnProcessor(...) per cross-attention layer])
    attach(unet, adapter, scale)         # attn2.processor = adapter.layers[k], in diffusers' order
    adapter.use(tokens)                  # the tokens of the next denoiser call ([B, n, width])
    detach(unet)

Reading h94's files (`ip-adapter_sd15.safetensors`): io/ip_adapter_files.py.
"""
from __future__ import annotations

import torch
from torch import nn

from ldmkit.nn.attention import Attention
from ldmkit.nn.transformer import FeedForward


class ImageProjection(nn.Module):
    """The basic IP-Adapter's projection: one image embedding -> `num_tokens` context tokens."""

    def __init__(self, image_embed_dim: int, cross_attention_dim: int, num_tokens: int = 4):
        super().__init__()
        self.num_tokens = num_tokens
        self.image_embeds = nn.Linear(image_embed_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    @property
    def input_width(self) -> int:
        return self.image_embeds.in_features

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """[B, image_embed_dim] -> [B, num_tokens, cross_attention_dim]."""
        x = self.image_embeds(embeds.to(self.image_embeds.weight.dtype))
        return self.norm(x.reshape(embeds.shape[0], self.num_tokens, -1))


class ResamplerBlock(nn.Module):
    """Latent queries attend to [image features; latents], then a pre-norm GELU MLP; both residual."""

    def __init__(self, width: int, heads: int, dim_head: int = 64, ff_mult: int = 4):
        super().__init__()
        self.ln0 = nn.LayerNorm(width)
        self.ln1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads=heads, dim_head=dim_head, bias=False, out_bias=False)
        self.ff = nn.Sequential(nn.LayerNorm(width), FeedForward(width, mult=ff_mult, activation="gelu", bias=False))

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        queries = self.ln1(latents)
        latents = self.attn(queries, torch.cat([self.ln0(x), queries], dim=-2)) + latents
        return self.ff(latents) + latents


class Resampler(nn.Module):
    """IP-Adapter Plus's projection: `latents` [1, n, width] read the encoder's hidden states."""

    def __init__(self, embed_dim: int, width: int, cross_attention_dim: int, depth: int, heads: int,
                 num_tokens: int, dim_head: int = 64, ff_mult: int = 4):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(1, num_tokens, width))
        self.proj_in = nn.Linear(embed_dim, width)
        self.proj_out = nn.Linear(width, cross_attention_dim)
        self.norm_out = nn.LayerNorm(cross_attention_dim)
        self.layers = nn.ModuleList(ResamplerBlock(width, heads, dim_head, ff_mult) for _ in range(depth))

    @property
    def input_width(self) -> int:
        return self.proj_in.in_features

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, L, embed_dim] -> [B, num_tokens, cross_attention_dim]."""
        latents = self.latents.repeat(hidden.shape[0], 1, 1)
        x = self.proj_in(hidden)
        for block in self.layers:
            latents = block(x, latents)
        return self.norm_out(self.proj_out(latents))


class IPAttnProcessor(nn.Module):
    """One cross-attention layer's image keys and values (`to_k_ip.0`, `to_v_ip.0`, as diffusers' processor
    names them); `Attention.forward` calls it with the layer, its queries and the text attention's output."""

    def __init__(self, cross_attention_dim: int, inner_dim: int, scale: float = 1.0):
        super().__init__()
        self.to_k_ip = nn.ModuleList([nn.Linear(cross_attention_dim, inner_dim, bias=False)])
        self.to_v_ip = nn.ModuleList([nn.Linear(cross_attention_dim, inner_dim, bias=False)])
        self.scale = scale
        self.tokens: torch.Tensor | None = None  # set per denoiser call (IPAdapter.use)

    def forward(self, attn: Attention, q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.tokens is None or self.scale == 0:  # as diffusers: scale 0 is the plain model
            return out
        tokens = self.tokens.to(q.dtype)
        extra = attn.attend(q, self.to_k_ip[0](tokens), self.to_v_ip[0](tokens))
        return out + self.scale * extra


class IPAdapter(nn.Module):
    """An image projection and one `IPAttnProcessor` per cross-attention layer (diffusers' order)."""

    def __init__(self, image_proj: nn.Module, layers: list[IPAttnProcessor]):
        super().__init__()
        self.image_proj = image_proj
        self.layers = nn.ModuleList(layers)

    @property
    def kind(self) -> str:
        return "plus" if isinstance(self.image_proj, Resampler) else "basic"

    @property
    def scale(self) -> float:
        return self.layers[0].scale if len(self.layers) else 0.0

    def set_scale(self, scale: float) -> None:
        for layer in self.layers:
            layer.scale = float(scale)

    def use(self, tokens: torch.Tensor | None) -> None:
        """The image tokens [B, n, width] the next denoiser call attends to (B = its batch); None: none."""
        for layer in self.layers:
            layer.tokens = tokens


def cross_attention_layers(unet: nn.Module) -> list[tuple[str, Attention]]:
    """(path, attn2) of every cross-attention layer in diffusers' `attn_processors` order -- down blocks,
    up blocks, then the mid block -- the order h94's files number them in (`ip_adapter.{2k + 1}`)."""
    levels = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    levels += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    if getattr(unet, "mid_block", None) is not None:
        levels.append(("mid_block", unet.mid_block))
    out = []
    for path, level in levels:
        for j, transformer in enumerate(getattr(level, "attentions", None) or []):
            for k, block in enumerate(transformer.transformer_blocks):
                if block.attn2 is not None:
                    out.append((f"{path}.attentions.{j}.transformer_blocks.{k}.attn2", block.attn2))
    return out


def attach(unet: nn.Module, adapter: IPAdapter) -> None:
    """Install the adapter's layers as the processors of the UNet's cross-attention layers (shapes must fit:
    `io.ip_adapter_files.check_fits`)."""
    layers = cross_attention_layers(unet)
    if len(layers) != len(adapter.layers):
        raise ValueError(f"the IP-Adapter has {len(adapter.layers)} cross-attention layers, the UNet {len(layers)}")
    for (_, attn), proc in zip(layers, adapter.layers):
        attn.processor = proc


def detach(unet: nn.Module) -> None:
    """The plain UNet again (every cross-attention layer without a processor)."""
    for _, attn in cross_attention_layers(unet):
        attn.processor = None


@torch.no_grad()
def encode_image(adapter: IPAdapter, encoder: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Preprocessed image prompts [k, 3, S, S] -> (tokens, unconditional tokens), each [1, k * n, width]: as
    diffusers' `encode_image` + the UNet's image projection (several images: their tokens in a row)."""
    if adapter.kind == "plus":
        cond = encoder(pixels, output_hidden_states=True).hidden_states[-2]
        uncond = encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
    else:
        cond = encoder(pixels).image_embeds
        uncond = torch.zeros_like(cond)
    dtype = next(adapter.image_proj.parameters()).dtype
    tokens = adapter.image_proj(torch.cat([uncond, cond]).to(dtype))  # one batch: [uncond; cond], as diffusers
    uncond_tokens, cond_tokens = tokens.chunk(2)
    width = tokens.shape[-1]
    return cond_tokens.reshape(1, -1, width), uncond_tokens.reshape(1, -1, width)


__all__ = ["IPAdapter", "IPAttnProcessor", "ImageProjection", "Resampler", "attach", "cross_attention_layers",
           "detach", "encode_image"]
