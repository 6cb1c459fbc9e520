"""The denoiser: a network's raw output, whatever it predicts, turned into one function

    D(x, sigma) -> x0

that every sampler works with (k-diffusion's ``external.py`` idea). ``x`` is the samplers' one
variable, the variance-preserving state at noise level ``sigma`` (0 = clean, inf = pure noise):

    x = (x0 + sigma eps) / sqrt(1 + sigma^2)

A schedule family says what the network sees for that state; a prediction type says how its output
gives x0. Both are small tables (sgm's ``denoiser_scaling.py`` idea):

    schedule   network input x_in            (alpha, sigma) of x_in        timestep t
    discrete   x                              (1, sigma) / sqrt(1+sigma^2)  the plan's t at sigma (else t_at)
    flow       x * sqrt((1-s)^2 + s^2)        (1 - s, s), s = sigma/(1+sigma)   s * T

    prediction  x0 from the output `out` of x_in = alpha x0 + sigma eps
    eps         (x_in - sigma out) / alpha
    v           alpha x_in - sigma out          (alpha^2 + sigma^2 = 1)
    x0          out
    flow        x_in - sigma out                (alpha = 1 - sigma)

Samplers never see a prediction type; classifier-free guidance wraps the network before this
(``guidance.cfg``), so its rescale acts on what the network predicts, as diffusers does.
"""
from __future__ import annotations

from typing import Callable

import torch

from .forward import convert
from .schedules import FlowSchedule, Schedule, flow_time, prediction_name, vp_of_sigma

Network = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Denoiser:
    """``D(x, sigma) -> x0`` from ``model(x_in, t) -> output`` (see the module docstring).

    ``plan``: the sampler's plan (``samplers.plan``); at its noise levels the network is called at
    the plan's own timesteps (diffusers' grids round or interpolate t in their own ways), elsewhere
    at the schedule's ``t_at(sigma)``. ``clip``: clamp x0 to [-clip, clip] (diffusers' clip_sample).
    """

    def __init__(self, model: Network, schedule: Schedule, prediction: str, plan=None, clip: float | None = None):
        self.model, self.schedule, self.prediction = model, schedule, prediction_name(prediction)
        self.flow = isinstance(schedule, FlowSchedule)
        if self.flow != (self.prediction == "flow"):
            raise ValueError(f"prediction {self.prediction!r} does not fit a {type(schedule).__name__}: flow "
                             "schedules go with flow-velocity networks, discrete ones with eps / v / x0")
        if clip is not None and not clip > 0:
            raise ValueError(f"clip_x0={clip} must be > 0")
        self.plan, self.clip = plan, clip
        # a discrete plan's levels -> its timesteps (the first, as `_timestep` picks): the common call, one plan
        # level for the whole batch, then costs no tensor ops
        self._plan_t = {}
        if plan is not None and not self.flow:
            for level, t in zip(plan.sigmas[:-1].tolist(), plan.timesteps.double().tolist()):
                self._plan_t.setdefault(level, t)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Network timestep [B] (float64) for noise levels sigma [B]."""
        first = float(sigma[0]) if sigma.numel() else None
        if first in self._plan_t and (sigma.shape[0] == 1 or bool((sigma == first).all())):
            return torch.full(sigma.shape, self._plan_t[first], dtype=torch.float64)
        levels, where = torch.unique(sigma, return_inverse=True)  # one level per call in sampling
        return self._timestep(levels)[where]

    def _timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        T = self.schedule.num_train_timesteps
        if self.flow:
            return flow_time(sigma) * T
        finite = torch.where(torch.isinf(sigma), torch.zeros_like(sigma), sigma)
        t = torch.where(torch.isinf(sigma), torch.full_like(sigma, T - 1), self.schedule.t_at(finite))
        if self.plan is not None:  # the plan's own timestep where sigma is one of its levels
            levels, steps = self.plan.sigmas[:-1], self.plan.timesteps
            hit = sigma[:, None] == levels[None, :]
            t = torch.where(hit.any(1), steps[hit.double().argmax(1)], t)
        return t

    def input_coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_in, alpha, sigma_in) [B], float64: x_in = c_in x = alpha x0 + sigma_in eps."""
        if self.flow:
            s = flow_time(sigma)
            return ((1 - s) ** 2 + s**2).sqrt(), 1 - s, s
        alpha, sigma_vp = vp_of_sigma(sigma)
        return torch.ones_like(sigma), alpha, sigma_vp

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64).cpu().reshape(-1).expand(x.shape[0])
        c_in, alpha, sigma_in = self.input_coefficients(sigma)
        if self.prediction == "eps" and bool((alpha == 0).any()):
            raise ValueError("x0 cannot be recovered from an eps prediction at zero signal (sigma = inf, a "
                             "zero-terminal-SNR schedule's last timestep); use a v-prediction model or a "
                             "timestep spacing that avoids t = T-1")

        def col(v):  # [B] float64 -> [B, 1, 1, ...] in x's dtype and device
            return v.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))

        x_in = x * col(c_in) if self.flow else x
        t = self.timestep(sigma).to(device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
        out = self.model(x_in, t)
        if out.shape != x.shape:
            raise ValueError(f"the network returned shape {tuple(out.shape)}, expected {tuple(x.shape)} (as x)")
        x0 = convert(out.to(x.dtype), self.prediction, "x0", x_in, col(alpha), col(sigma_in))
        return x0 if self.clip is None else x0.clamp(-self.clip, self.clip)
