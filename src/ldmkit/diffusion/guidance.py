"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around the network.

    model = cfg(model_fn, cond, uncond, scale=7.5, rescale=0.0)      # model(x, t) -> output
    denoise = Denoiser(model, schedule, "eps", plan)                # -> D(x, sigma) -> x0
    x0 = SAMPLERS["euler"].fn(denoise, noise, plan.sigmas)

``model_fn(x, t, cond)`` is called once per step on the batch [uncond; cond]: x and t are repeated,
and the two conditionings are concatenated along dim 0. A conditioning may be a tensor, None, a
dict / list / tuple of those, or a dataclass whose fields are those (e.g.
``ldmkit.conditioning.Conditioning``); tensors with batch 1 are broadcast to x's batch. Anything
else (strings, numbers) must be equal in cond and uncond and is passed through.

The guided output is u + scale (c - u) in whatever the model predicts (eps, v, x0 or flow
velocity). ``rescale`` > 0 applies Lin et al. 2023 (eq. 15-16, diffusers' ``rescale_noise_cfg``):
match the guided output's per-sample std to the conditional one, then blend by ``rescale``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch


def _expand(v: torch.Tensor, batch: int, where: str) -> torch.Tensor:
    if v.dim() == 0:
        raise ValueError(f"conditioning {where} is a 0-d tensor; it needs a batch dimension")
    if v.shape[0] == batch:
        return v
    if v.shape[0] == 1:
        return v.expand(batch, *v.shape[1:])
    raise ValueError(f"conditioning {where} has batch {v.shape[0]}, expected 1 or {batch} (the batch of x)")


def concat_conditions(uncond: Any, cond: Any, batch: int, where: str = "") -> Any:
    """[uncond; cond] along dim 0, recursing through dicts, lists, tuples and dataclasses."""
    if uncond is None and cond is None:
        return None
    if isinstance(uncond, torch.Tensor) and isinstance(cond, torch.Tensor):
        u, c = _expand(uncond, batch, where or "tensor"), _expand(cond, batch, where or "tensor")
        if u.shape[1:] != c.shape[1:]:
            raise ValueError(f"cond{where} has shape {tuple(c.shape)} but uncond{where} has {tuple(u.shape)}; "
                             "they must agree except in the batch dimension")
        return torch.cat([u, c.to(u.dtype)])
    if isinstance(uncond, dict) and isinstance(cond, dict):
        if set(uncond) != set(cond):
            raise ValueError(f"cond{where} keys {sorted(cond)} differ from uncond keys {sorted(uncond)}")
        return {k: concat_conditions(uncond[k], cond[k], batch, f"{where}[{k!r}]") for k in cond}
    if isinstance(uncond, (list, tuple)) and isinstance(cond, (list, tuple)) and type(uncond) is type(cond):
        if len(uncond) != len(cond):
            raise ValueError(f"cond{where} has {len(cond)} items but uncond has {len(uncond)}")
        return type(cond)(concat_conditions(u, c, batch, f"{where}[{i}]") for i, (u, c) in enumerate(zip(uncond, cond)))
    if dataclasses.is_dataclass(cond) and type(uncond) is type(cond):
        fields = {f.name: concat_conditions(getattr(uncond, f.name), getattr(cond, f.name), batch,
                                            f"{where}.{f.name}")
                  for f in dataclasses.fields(cond) if f.init}
        return type(cond)(**fields)
    if uncond == cond and not isinstance(cond, torch.Tensor):
        return cond
    raise ValueError(f"cannot batch cond{where} of type {type(cond).__name__} with uncond of type "
                     f"{type(uncond).__name__}; use tensors, None, dicts, lists or dataclasses of them")


def rescale_cfg(guided: torch.Tensor, cond_out: torch.Tensor, rescale: float) -> torch.Tensor:
    """Lin et al. 2023: blend the guided output with itself rescaled to the conditional output's std."""
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance rescale={rescale} is outside the allowed range [0, 1]")
    dims = list(range(1, guided.dim()))
    std_cond = cond_out.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_cond / std_guided)
    return rescale * rescaled + (1 - rescale) * guided


def cfg(model_fn: Callable, cond: Any, uncond: Any, scale: float, rescale: float = 0.0) -> Callable:
    """Turn ``model_fn(x, t, cond)`` into ``model(x, t)`` with classifier-free guidance."""
    if not scale >= 0:
        raise ValueError(f"guidance scale={scale} must be >= 0")
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance rescale={rescale} is outside the allowed range [0, 1]")

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        if scale == 1.0:
            return model_fn(x, t, _only(cond, B))
        both = concat_conditions(uncond, cond, B)
        t2 = torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.dim() > 0 else t
        out = model_fn(torch.cat([x, x]), t2, both)
        if out.shape[0] != 2 * B:
            raise ValueError(f"model_fn returned batch {out.shape[0]} for an input batch of {2 * B}")
        u, c = out.chunk(2)
        guided = u + scale * (c - u)
        return rescale_cfg(guided, c, rescale) if rescale > 0 else guided

    return model


def _only(cond: Any, batch: int) -> Any:
    """The conditional input alone (scale == 1), with batch-1 tensors broadcast like in the pair."""
    if isinstance(cond, torch.Tensor):
        return _expand(cond, batch, "tensor")
    if isinstance(cond, dict):
        return {k: _only(v, batch) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(_only(v, batch) for v in cond)
    if dataclasses.is_dataclass(cond):
        return type(cond)(**{f.name: _only(getattr(cond, f.name), batch) for f in dataclasses.fields(cond) if f.init})
    return cond
