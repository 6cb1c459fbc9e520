"""Memory-bounded decoding of latents: batch slicing and spatial tiling.

Decoding is where large generations usually run out of memory: the decoder's
last blocks run at full image resolution with 128+ channels. Two remedies,
both pure wiring around `Autoencoder.decode_latents`:

- *slicing*: decode a big batch a few latents at a time (bit-identical to a
  one-shot decode, since every image is decoded independently);
- *tiling*: decode a large latent as overlapping tiles and blend the decoded
  tiles with linear ramps over the overlap. The decoder's receptive field and
  its group norms see only one tile, so the result is close to, not identical
  with, a one-shot decode; the overlap hides the seams.

`decode(ae, z)` picks tiling automatically when the latent is larger than
`tile_size` on either side.
"""
from __future__ import annotations

import torch

# Latent tile side (in latent pixels) above which `decode` tiles by default:
# 96 latents = 768 px for an f=8 autoencoder, comfortably inside CPU/GPU memory.
DEFAULT_TILE_SIZE = 96
DEFAULT_TILE_OVERLAP = 16


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size `tile` covering [0, length) with at least `overlap` shared."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)  # the last tile ends exactly at the border
    return starts


def _ramp(n: int, overlap_front: int, overlap_back: int, device, dtype) -> torch.Tensor:
    """1-D blending weight: rises linearly over the front overlap, falls over the back one."""
    w = torch.ones(n, device=device, dtype=dtype)
    if overlap_front > 0:
        w[:overlap_front] = torch.linspace(0, 1, overlap_front + 2, device=device, dtype=dtype)[1:-1]
    if overlap_back > 0:
        w[n - overlap_back:] = torch.linspace(1, 0, overlap_back + 2, device=device, dtype=dtype)[1:-1]
    return w


@torch.no_grad()
def decode_tiled(autoencoder, z: torch.Tensor, tile_size: int = DEFAULT_TILE_SIZE,
                 overlap: int = DEFAULT_TILE_OVERLAP) -> torch.Tensor:
    """Decode `z` [B,C,h,w] as overlapping `tile_size` latent tiles blended over `overlap` latents."""
    if tile_size < 2:
        raise ValueError(f"tile_size={tile_size} must be at least 2 latent pixels")
    if not 0 <= overlap < tile_size:
        raise ValueError(f"tile overlap={overlap} must be in [0, tile_size={tile_size})")
    b, _, h, w = z.shape
    th, tw = min(tile_size, h), min(tile_size, w)
    ys, xs = _tile_starts(h, th, overlap), _tile_starts(w, tw, overlap)
    out = weight = None
    f = None
    for yi, y in enumerate(ys):
        for xi, x in enumerate(xs):
            tile = autoencoder.decode_latents(z[:, :, y:y + th, x:x + tw])
            if out is None:
                f = tile.shape[-1] // tw
                out = torch.zeros(b, tile.shape[1], h * f, w * f, device=tile.device, dtype=torch.float32)
                weight = torch.zeros(1, 1, h * f, w * f, device=tile.device, dtype=torch.float32)
            # Overlap with the neighbour before/after, in pixels.
            oy0 = (ys[yi - 1] + th - y) * f if yi > 0 else 0
            oy1 = (y + th - ys[yi + 1]) * f if yi + 1 < len(ys) else 0
            ox0 = (xs[xi - 1] + tw - x) * f if xi > 0 else 0
            ox1 = (x + tw - xs[xi + 1]) * f if xi + 1 < len(xs) else 0
            wy = _ramp(th * f, oy0, oy1, tile.device, torch.float32)
            wx = _ramp(tw * f, ox0, ox1, tile.device, torch.float32)
            wt = (wy[:, None] * wx[None, :])[None, None]
            out[:, :, y * f:(y + th) * f, x * f:(x + tw) * f] += tile.float() * wt
            weight[:, :, y * f:(y + th) * f, x * f:(x + tw) * f] += wt
    return (out / weight).to(z.dtype if z.is_floating_point() else torch.float32)


@torch.no_grad()
def decode(autoencoder, z: torch.Tensor, batch_size: int | None = None,
           tile_size: int | None = None, overlap: int | None = None) -> torch.Tensor:
    """Decode latents with batch slicing (`batch_size` latents at a time; None = all) and
    tiling when the latent is larger than `tile_size` (None = DEFAULT_TILE_SIZE, 0 = never tile),
    tiles overlapping by `overlap` latents (None = min(DEFAULT_TILE_OVERLAP, tile_size // 4))."""
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"decode batch_size={batch_size} must be >= 1")
    tile = DEFAULT_TILE_SIZE if tile_size is None else int(tile_size)
    use_tiles = tile > 0 and max(z.shape[-2:]) > tile
    if overlap is None:
        overlap = min(DEFAULT_TILE_OVERLAP, tile // 4)
    step = batch_size or z.shape[0]
    parts = []
    for i in range(0, z.shape[0], step):
        chunk = z[i:i + step]
        parts.append(decode_tiled(autoencoder, chunk, tile, overlap) if use_tiles
                     else autoencoder.decode_latents(chunk))
    return torch.cat(parts, dim=0)


def check_fast(pipe, fast_decode) -> bool:
    """`fast_decode` as a bool; asking for it without a tiny decoder is an error naming the remedy."""
    if fast_decode and getattr(pipe, "tiny_decoder", None) is None:
        raise ValueError("fast_decode needs a tiny decoder: a model folder with a tiny_decoder/ component, or "
                         "--tiny-decoder PATH (`ldm train-tiny-decoder`, a TAESD file, a diffusers AutoencoderTiny)")
    return bool(fast_decode)


@torch.no_grad()
def fast(tiny, z: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Latents -> images in [-1, 1] through a tiny decoder (`autoencoder.tiny`), `batch_size` at a time."""
    p = next(tiny.parameters())
    step = batch_size or z.shape[0]
    out = [tiny(z[i:i + step].to(p.device, p.dtype)) for i in range(0, z.shape[0], step)]
    return torch.cat(out).float().clamp(-1, 1)
