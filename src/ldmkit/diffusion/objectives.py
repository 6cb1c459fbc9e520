"""Training objectives: which timesteps to train on, what the network should output, how to weight it.

A training step with any schedule reads:

    t = sample_timesteps(schedule, B, generator)
    x_t = q_sample(schedule, x0, noise, t)
    out = model(x_t, model_timestep(schedule, t), ...)
    loss = training_loss(schedule, prediction, out, x0, noise, t).mean()

Targets: eps -> noise, x0 -> x0, v -> alpha eps - sigma x0, flow -> eps - x0.

Min-SNR-gamma (Hang et al. 2023) caps the weight of easy, low-noise timesteps. It is
defined on the x0-space loss: w_x0 = min(SNR, gamma). The same weighting expressed
for a network trained on another target divides by that target's own SNR factor:
eps-loss = SNR * x0-loss, so w_eps = min(SNR, gamma) / SNR; v-loss = (SNR + 1) *
x0-loss, so w_v = min(SNR, gamma) / (SNR + 1); flow velocity u: x0 = x_t - s u, so
u-loss = x0-loss / s^2 and w_flow = min(SNR, gamma) * s^2 with SNR = ((1 - s) / s)^2.
"""

from __future__ import annotations

import torch

from .forward import _check_same_shape, coefficients
from .schedules import PREDICTIONS, FlowSchedule, Schedule, prediction_name

OBJECTIVES = PREDICTIONS
WEIGHTINGS = ("uniform", "min_snr")
TIMESTEP_SAMPLING = ("uniform", "stratified", "logit_normal")


def sample_timesteps(schedule: Schedule, batch: int, generator: torch.Generator | None = None, device=None,
                     method: str = "uniform", mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Training timesteps: long in [0, T) for discrete schedules, float s in (0, 1) for flow.

    "stratified": one uniform draw inside each of the ``batch`` equal strata of [0, 1), in a random
    order -- every batch covers all noise levels evenly, which lowers the variance of the batch loss
    (the low-discrepancy sampler of Kingma et al. 2021, "Variational Diffusion Models"); each draw
    is still marginally uniform, so the expected loss is unchanged.
    "logit_normal" (SD3): s = sigmoid(N(mean, std)); for discrete schedules it is mapped to
    round(s * (T - 1)). Flow times are then shifted with the schedule's ``shift``.
    The draw happens on the generator's device (CPU when None) and is moved to ``device``.
    """
    if method not in TIMESTEP_SAMPLING:
        raise ValueError(f"unknown timestep sampling {method!r}; expected one of {TIMESTEP_SAMPLING}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch={batch!r} must be a positive integer")
    gdev = generator.device if generator is not None else "cpu"
    if method == "uniform":
        u = torch.rand(batch, generator=generator, device=gdev, dtype=torch.float64)
    elif method == "stratified":
        order = torch.randperm(batch, generator=generator, device=gdev).to(torch.float64)
        u = (order + torch.rand(batch, generator=generator, device=gdev, dtype=torch.float64)) / batch
    else:
        if not std > 0:
            raise ValueError(f"logit-normal std={std} must be > 0")
        u = torch.sigmoid(mean + std * torch.randn(batch, generator=generator, device=gdev, dtype=torch.float64))
    if isinstance(schedule, FlowSchedule):
        s = schedule.shift_sigma(u.cpu()).clamp(1e-5, 1.0)
        return s.to(device=device, dtype=torch.float32)
    T = schedule.num_train_timesteps
    if method != "logit_normal":
        t = (u * T).floor().clamp(max=T - 1)
    else:
        t = (u * (T - 1)).round()
    return t.long().to(device)


def model_timestep(schedule: Schedule, t) -> torch.Tensor:
    """What the network is conditioned on: the discrete t itself, or s * T for flow (as SD3)."""
    return schedule.model_timestep(t)


def training_target(schedule: Schedule, prediction: str, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
    """What a network predicting ``prediction`` should output for x_t = q_sample(schedule, x0, noise, t)."""
    _check_same_shape(x0=x0, noise=noise)
    kind = prediction_name(prediction)
    if kind == "eps":
        return noise
    if kind == "x0":
        return x0
    if kind == "flow":
        return noise - x0
    a, s = coefficients(schedule, t, x0)
    return a * noise - s * x0


def snr(schedule: Schedule, t) -> torch.Tensor:
    """Signal-to-noise ratio alpha^2 / sigma^2 at t (float64, inf at a clean level)."""
    a, s = schedule.alpha_sigma(torch.as_tensor(t).detach().cpu())
    return a**2 / s**2


def loss_weight(schedule: Schedule, prediction: str, t, weighting: str = "uniform", gamma: float = 5.0) -> torch.Tensor:
    """Per-sample loss weight [B] (float64) for a network predicting ``prediction``."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {WEIGHTINGS}")
    t = torch.as_tensor(t).detach().cpu()
    if weighting == "uniform":
        return torch.ones(t.shape, dtype=torch.float64)
    if not gamma > 0:
        raise ValueError(f"min-SNR gamma={gamma} must be > 0")
    r = snr(schedule, t)
    capped = torch.minimum(r, torch.full_like(r, gamma))
    kind = prediction_name(prediction)
    if kind == "x0":
        return capped
    if kind == "eps":
        return capped / r
    if kind == "v":
        return capped / (r + 1)
    s = torch.as_tensor(t, dtype=torch.float64)  # flow: ||u - u*|| = ||x0 - x0*|| / s
    return capped * s**2


def training_loss(schedule: Schedule, prediction: str, model_output: torch.Tensor, x0: torch.Tensor,
                  noise: torch.Tensor, t, weighting: str = "uniform", gamma: float = 5.0) -> torch.Tensor:
    """Per-sample weighted MSE [B] between the network output and its target (float32 or wider)."""
    _check_same_shape(model_output=model_output, x0=x0, noise=noise)
    target = training_target(schedule, prediction, x0, noise, t)
    err = (model_output.float() - target.float()) ** 2
    per_sample = err.reshape(err.shape[0], -1).mean(1)
    w = loss_weight(schedule, prediction, t, weighting, gamma)
    if w.dim() == 0:
        w = w.expand(per_sample.shape[0])
    if w.shape[0] != per_sample.shape[0]:
        raise ValueError(f"t has {w.shape[0]} entries but the batch has {per_sample.shape[0]} samples")
    return per_sample * w.to(device=per_sample.device, dtype=per_sample.dtype)
