"""The pieces every sampler shares: its variables, its noise, its callback (``samplers`` has the contract).

The samplers' state is the VP variable ``x = (x0 + sigma eps) / sqrt(1 + sigma^2)``; a method written in
another variable converts on the way in and out: ``_ve`` to k-diffusion's ``x0 + sigma eps``,
``_flow_c`` to the flow interpolant ``(1 - s) x0 + s eps``.
"""

from __future__ import annotations

import math

import torch


def _ab(sigma: float) -> tuple[float, float]:
    """(alpha, sigma_vp) of the VP state at k-sigma ``sigma``: x = alpha x0 + sigma_vp eps."""
    if math.isinf(sigma):
        return 0.0, 1.0
    a = 1.0 / math.sqrt(1.0 + sigma * sigma)
    return a, sigma * a


def _ve(sigma: float) -> float:
    """x0 + sigma eps = x_vp * sqrt(1 + sigma^2) (finite sigma)."""
    return math.sqrt(1.0 + sigma * sigma)


def _flow_c(sigma: float) -> float:
    """x_flow = x_vp * c at level sigma: c = sqrt((1 - s)^2 + s^2) with s = sigma / (1 + sigma)."""
    s = 1.0 if math.isinf(sigma) else sigma / (1.0 + sigma)
    return math.sqrt((1 - s) ** 2 + s * s)


def _s(sigma: float) -> float:
    return 1.0 if math.isinf(sigma) else sigma / (1.0 + sigma)


def _randn(x: torch.Tensor, generator) -> torch.Tensor:
    """Standard normal noise like x; row k from generator[k] when a list is given."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}: give one per image")
        return torch.cat([_randn(x[k:k + 1], g) for k, g in enumerate(generator)])
    device = generator.device if generator is not None else x.device  # a CPU generator: same numbers on CUDA
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _done(callback, i: int, sigma: float, x: torch.Tensor, x0: torch.Tensor, to_vp: float = 1.0) -> torch.Tensor:
    """Report the VP state (``x * to_vp``) after step i; a returned replacement comes back in x's variable."""
    if callback is None:
        return x
    ret = callback(i, float(sigma), x * to_vp if to_vp != 1.0 else x, x0)
    if ret is None:
        return x
    if ret.shape != x.shape:
        raise ValueError(f"callback returned shape {tuple(ret.shape)}, expected {tuple(x.shape)}")
    return ret / to_vp if to_vp != 1.0 else ret


def _levels(sigmas) -> list[float]:
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if sigmas.dim() != 1 or len(sigmas) < 1:
        raise ValueError(f"sigmas must be a 1-D tensor of noise levels, got shape {tuple(sigmas.shape)}")
    return sigmas.tolist()


def _finite(levels: list[float], name: str) -> None:
    if math.isinf(levels[0]):
        raise ValueError(f"sampler {name!r} integrates in x0 + sigma eps and cannot start at sigma = inf; "
                         "use ddim, dpmpp_2m or a flow sampler for this schedule")


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}")


def _check_order(name: str, value, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= hi:
        raise ValueError(f"{name}={value!r} must be an integer in [1, {hi}]")
