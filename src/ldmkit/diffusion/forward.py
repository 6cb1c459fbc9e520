"""The forward process q(x_t | x0) and the algebra between what a network can predict.

Every schedule writes its noisy sample as ``x_t = alpha_t x0 + sigma_t eps``:
DDPM family ``alpha = sqrt(abar)``, ``sigma = sqrt(1 - abar)``; flow
``alpha = 1 - s``, ``sigma = s``. From that one line:

* eps-prediction:  x0 = (x_t - sigma eps) / alpha
* v-prediction (Salimans & Ho, VP only): v = alpha eps - sigma x0,
  so x0 = alpha x_t - sigma v and eps = sigma x_t + alpha v
* flow velocity:   u = d x_t / ds = eps - x0, so x0 = x_t - s u, eps = x_t + (1 - s) u
* score:           grad log q(x_t) = -eps / sigma

Samplers see every schedule through one variable, the variance-preserving state at a noise
level sigma (k-diffusion's sigma: 0 = clean, inf = pure noise; flow time s is sigma / (1 + sigma)):
``x = (x0 + sigma eps) / sqrt(1 + sigma^2)`` -- ``noise_to`` puts data there.
"""

from __future__ import annotations

import torch

from .schedules import PREDICTIONS, DiscreteSchedule, Schedule, vp_of_sigma


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Scalar, [1] or [B] coefficients -> shape [B or 1, 1, 1, ...] in like's dtype/device."""
    v = torch.as_tensor(v).to(device=like.device, dtype=like.dtype)
    if v.dim() == 0:
        return v
    if v.dim() != 1 or v.shape[0] not in (1, like.shape[0]):
        raise ValueError(f"per-sample coefficients of shape {tuple(v.shape)} do not match batch {like.shape[0]}")
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def coefficients(schedule: Schedule, t, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) at timesteps t (discrete) or flow times t, broadcast against ``like``."""
    a, s = schedule.alpha_sigma(torch.as_tensor(t).detach().cpu())
    return _bcast(a, like), _bcast(s, like)


def _check_same_shape(**tensors) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {shapes}; these tensors must have the same shape")


def q_sample(schedule: Schedule, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
    """Sample q(x_t | x0) = alpha_t x0 + sigma_t eps, given the noise eps."""
    _check_same_shape(x0=x0, noise=noise)
    a, s = coefficients(schedule, t, x0)
    return a * x0 + s * noise


def noise_to(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """Clean x0 put at the samplers' noise level ``sigma`` (scalar or [B]; inf = pure noise):
    ``(x0 + sigma noise) / sqrt(1 + sigma^2)``. The img2img start and inpainting re-noising use it."""
    _check_same_shape(x0=x0, noise=noise)
    a, s = vp_of_sigma(sigma)
    return _bcast(a, x0) * x0 + _bcast(s, x0) * noise


def convert(output: torch.Tensor, from_type: str, to_type: str, x_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """Turn a prediction of one kind into another, given x_t = alpha x0 + sigma eps.

    alpha/sigma: scalars or tensors broadcastable against x_t. "v" assumes a VP path
    (alpha^2 + sigma^2 = 1); "flow" assumes alpha = 1 - sigma.
    """
    for name in (from_type, to_type):
        if name not in PREDICTIONS + ("score",):
            raise ValueError(f"unknown prediction type {name!r}; expected one of {PREDICTIONS + ('score',)}")
    _check_same_shape(output=output, x_t=x_t)
    if from_type == "eps":
        eps = output
        x0 = (x_t - sigma * eps) / alpha
    elif from_type == "x0":
        x0 = output
        eps = (x_t - alpha * x0) / sigma
    elif from_type == "v":
        x0 = alpha * x_t - sigma * output
        eps = sigma * x_t + alpha * output
    elif from_type == "flow":
        x0 = x_t - sigma * output
        eps = x_t + alpha * output
    else:  # score
        eps = -sigma * output
        x0 = (x_t - sigma * eps) / alpha
    if to_type == "x0":
        return x0
    if to_type == "eps":
        return eps
    if to_type == "v":
        return alpha * eps - sigma * x0
    if to_type == "flow":
        return eps - x0
    return -eps / sigma


def to_x0(schedule: Schedule, prediction: str, output, x_t, t):
    """The clean estimate from a network's ``prediction`` at training timestep t (discrete t or flow s)."""
    a, s = coefficients(schedule, t, x_t)
    return convert(output, prediction, "x0", x_t, a, s)


def posterior(schedule: DiscreteSchedule, x0: torch.Tensor, x_t: torch.Tensor, t, t_prev=None):
    """Mean and variance of q(x_{t_prev} | x_t, x0) (DDPM eq. 7; t_prev = -1 means the clean sample).

    With abar_p = abar(t_prev) and a = abar_t / abar_p (the step's alpha):
    mean = sqrt(abar_p) (1 - a) / (1 - abar_t) x0 + sqrt(a) (1 - abar_p) / (1 - abar_t) x_t,
    variance = (1 - abar_p) / (1 - abar_t) (1 - a).
    """
    if not isinstance(schedule, DiscreteSchedule):
        raise ValueError("posterior() needs a DiscreteSchedule (the flow path has no discrete chain)")
    _check_same_shape(x0=x0, x_t=x_t)
    t = torch.as_tensor(t, dtype=torch.long)
    t_prev = t - 1 if t_prev is None else torch.as_tensor(t_prev, dtype=torch.long)
    T = schedule.num_train_timesteps
    if t.numel() and (t.min() < 0 or t.max() >= T):
        raise ValueError(f"timestep t={t.tolist()} outside [0, {T})")
    if t_prev.numel() and (t_prev.min() < -1 or (t_prev >= t).any()):
        raise ValueError(f"t_prev={t_prev.tolist()} must be in [-1, t)")
    ac = schedule.alphas_cumprod
    abar_t = ac[t]
    abar_p = torch.where(t_prev >= 0, ac[t_prev.clamp(min=0)], torch.ones_like(abar_t))
    a = abar_t / abar_p
    c0 = abar_p.sqrt() * (1 - a) / (1 - abar_t)
    ct = a.sqrt() * (1 - abar_p) / (1 - abar_t)
    var = (1 - abar_p) / (1 - abar_t) * (1 - a)
    return _bcast(c0, x0) * x0 + _bcast(ct, x0) * x_t, _bcast(var, x0)
