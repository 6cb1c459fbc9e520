"""Feature caching in the pipelines: `cache_interval` / `cache_branch` (`--cache-interval N --cache-branch K`).

    pipe.text2img("a red circle", steps=20, cache_interval=3)            # the UNet runs in full every 3rd call

Every sampling call (one batch of images) gets a fresh `denoisers.feature_cache.FeatureCache`, set on the
UNet only while the pipeline's model function runs, so the UNet is the plain one whenever caching is off
(interval 1, the default: the outputs are bit-identical). Interval N runs the whole UNet at network
evaluations 1, 1 + N, 1 + 2N, ... and only its shallow layers at the others (the module doc of
`denoisers.feature_cache` says what a branch and a step are). Only UNets have the skip connections this
reuses: a DiT, MM-DiT or FLUX transformer is refused. The images' metadata records the setting.

This module imports nothing heavy: the command line reads its flags before torch loads.
"""
from __future__ import annotations

from typing import Callable

MAX_INTERVAL = 1000


def add_flags(p) -> None:
    """--cache-interval and --cache-branch (ldm sample, img2img, inpaint)."""
    g = p.add_argument_group("feature caching (UNets; DeepCache-style)")
    g.add_argument("--cache-interval", type=int, default=None, metavar="N",
                   help="run the whole UNet at every N-th network evaluation; those between reuse its deep "
                   "features and run only the shallow layers (faster, slightly different images; 1 = off, the "
                   "default)")
    g.add_argument("--cache-branch", type=int, default=None, metavar="K",
                   help="where --cache-interval cuts the UNet: partial evaluations recompute conv_in and the first "
                   "K + 1 down layers, and the up layers that read them (0 = the shallowest cut and the fastest, "
                   "the default)")


def settings_of(args) -> dict:
    """The pipeline settings of the command-line flags."""
    return {"cache_interval": getattr(args, "cache_interval", None), "cache_branch": getattr(args, "cache_branch", None)}


def unet_of(denoiser):
    """The UNet inside a denoiser (itself, or an extended UNet's `.unet`), or None for a transformer."""
    from ldmkit.denoisers.unet import UNet

    for m in (denoiser, getattr(denoiser, "unet", None)):
        if isinstance(m, UNet):
            return m
    return None


def check(denoiser, interval, branch) -> dict:
    """{cache_interval, cache_branch}, checked against the denoiser (Settings fields)."""
    from ldmkit.errors import UserError

    interval = 1 if interval is None else interval
    if isinstance(interval, bool) or not isinstance(interval, int) or not 1 <= interval <= MAX_INTERVAL:
        raise UserError(f"cache_interval={interval!r} must be a whole number in [1, {MAX_INTERVAL}] (1 = off)")
    if interval == 1:
        return {"cache_interval": 1, "cache_branch": 0}
    unet = unet_of(denoiser)
    if unet is None:
        raise UserError(f"cache_interval={interval}: feature caching reuses a UNet's deep features; this model's "
                        f"denoiser is a {type(denoiser).__name__}, not a UNet")
    from ldmkit.denoisers.feature_cache import branches

    branch = 0 if branch is None else branch
    n = branches(unet)
    if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch < n:
        raise UserError(f"cache_branch={branch!r} must be in [0, {n - 1}] (this UNet has {n + 1} skip connections)")
    return {"cache_interval": interval, "cache_branch": branch}


def wrap(denoiser, s, fn: Callable) -> Callable:
    """The model function `fn(x, t, cond)` of one sampling call with settings `s`, caching when
    `s.cache_interval` > 1 (else `fn` itself)."""
    if getattr(s, "cache_interval", 1) <= 1:
        return fn
    from ldmkit.denoisers.feature_cache import FeatureCache

    check(denoiser, s.cache_interval, s.cache_branch)  # also a refiner's UNet, which the settings were not made for
    unet, cache = unet_of(denoiser), FeatureCache(s.cache_interval, s.cache_branch)

    def cached(x, t, cond):
        with cache.evaluation(unet):
            return fn(x, t, cond)

    return cached


def metadata(s) -> dict:
    """The PNG metadata of the setting (nothing when caching is off)."""
    if getattr(s, "cache_interval", 1) <= 1:
        return {}
    return {"cache_interval": s.cache_interval, "cache_branch": s.cache_branch}
