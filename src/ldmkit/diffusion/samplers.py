"""Samplers: one function each, over a ``denoise(x, t) -> model output`` callable.

Every sampler has the signature

    fn(denoise, x_T, schedule, steps, *, generator=None, callback=None, start=0, spacing=None, **opts) -> x_0

* ``x_T`` and every state handed to ``denoise``/``callback`` are in the model-input convention
  ``x = alpha x0 + sigma_vp eps`` (flow: ``(1 - s) x0 + s eps``); ``denoise`` gets ``t`` as a float
  tensor [B] (discrete timestep, flow: s * T) and returns the schedule's prediction type.
* ``plan(name, schedule, steps)`` says where a sampler evaluates the model (``timesteps``) and the noise
  level before each step (``sigmas``, one longer; k-diffusion sigma, or flow time s). Step ``i`` moves
  the state from ``sigmas[i]`` to ``sigmas[i + 1]``; ``start`` skips the first steps (img2img).
* ``callback(i, sigma, x, x0_pred)`` runs after step ``i`` with the new state at level ``sigma``; a
  returned tensor replaces the state (inpainting re-imposes the known region that way).
* Stochastic samplers draw ``torch.randn(x.shape, generator, dtype=x.dtype)`` once per step, in the
  order diffusers' schedulers do, so seeded trajectories match diffusers'.

The Euler family (euler, euler_a, heun) integrates the probability-flow ODE in the k-diffusion
variable ``x0 + sigma eps`` (= model input * sqrt(sigma^2 + 1)); that scaling stays inside the
sampler. DPM-Solver++ works in the VP variable with lambda = log(alpha / sigma_vp), as its paper.
Timestep grids follow diffusers' schedulers sampler by sampler (they differ; see ``plan``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .forward import convert
from .schedules import (SPACINGS, DiscreteSchedule, FlowSchedule, check_steps, spaced_timesteps,
                        vp_of_sigma)

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Plan:
    timesteps: torch.Tensor  # [n] float64, the model timestep of each step
    sigmas: torch.Tensor  # [n + 1] float64, noise level before each step; sigmas[-1] is the final level


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 eq. 5: n levels from sigma_max to sigma_min, even in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def plan(name: str, schedule, steps: int, spacing: str | None = None, **opts) -> Plan:
    """Timesteps and noise levels a sampler visits (diffusers' grid for the matching scheduler).

    ddpm/ddim: rounded grid including t=0, final level clean (ddim with set_alpha_to_one=False ends at
    t=0's level). euler/euler_a/heun: unrounded grid (fractional t for linspace), sigma interpolated,
    final 0. dpmpp_2m: grid of steps+1 points without the cleanest, final 0; _karras: Karras sigmas
    between the schedule's extremes, the model called at the rounded t of each sigma.
    flow_*: s = shift(linspace(1, shift(1/T), steps)) then 0, as diffusers/SD3 do.
    """
    get_sampler(name)
    T = schedule.num_train_timesteps
    check_steps(steps, T)
    if spacing is not None and spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")
    _check_schedule(name, schedule)
    zero = torch.zeros(1, dtype=torch.float64)
    if isinstance(schedule, FlowSchedule):
        s = torch.linspace(1.0, float(schedule.shift_sigma(1.0 / T)), steps, dtype=torch.float64)
        s = schedule.shift_sigma(s)
        return Plan(s * T, torch.cat([s, zero]))
    spacing = spacing or schedule.timestep_spacing
    offset = schedule.steps_offset
    if name in ("ddpm", "ddim"):
        ts = spaced_timesteps(T, steps, spacing, offset)
        final = zero
        if name == "ddim" and not opts.get("set_alpha_to_one", True):
            final = schedule.sigmas[:1].clone()
        return Plan(ts, torch.cat([schedule.sigma_at(ts), final]))
    if name == "dpmpp_2m_karras":
        sig = schedule._finite_log_sigmas.exp()
        sigmas = karras_sigmas(float(sig[0]), float(sig[-1]), steps)
        return Plan(schedule.t_at(sigmas).round(), torch.cat([sigmas, zero]))
    ts = spaced_timesteps(T, steps, spacing, offset, rounded=name == "dpmpp_2m", drop_zero=name == "dpmpp_2m")
    return Plan(ts, torch.cat([schedule.sigma_at(ts), zero]))


def img2img_start(steps: int, strength: float) -> int:
    """First step index for img2img: strength 1 runs all steps, 0 none (diffusers' int(steps * strength))."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be a positive integer")
    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength={strength} is outside the allowed range [0, 1]")
    return steps - min(int(steps * strength), steps)


# ---------------------------------------------------------------- helpers


def _check_schedule(name: str, schedule) -> None:
    want = FlowSchedule if name.startswith("flow_") else DiscreteSchedule
    if not isinstance(schedule, want):
        raise ValueError(f"sampler {name!r} needs a {want.__name__}, got {type(schedule).__name__}")


def _setup(name, x_T, schedule, steps, start, spacing, opts):
    if not isinstance(x_T, torch.Tensor) or x_T.dim() < 1:
        raise ValueError(f"x_T must be a tensor with a batch dimension, got {type(x_T).__name__}")
    p = plan(name, schedule, steps, spacing, **opts)
    n = len(p.timesteps)
    if not isinstance(start, int) or not 0 <= start <= n:
        raise ValueError(f"start={start!r} must be an integer in [0, {n}] (steps={steps})")
    return p


def _call(denoise: Denoise, x: torch.Tensor, t: float) -> torch.Tensor:
    tdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = denoise(x, torch.full((x.shape[0],), float(t), dtype=tdtype, device=x.device))
    if out.shape != x.shape:
        raise ValueError(f"denoise returned shape {tuple(out.shape)}, expected {tuple(x.shape)} (same as x)")
    return out


def _randn(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # drawn on the generator's device so a CPU generator gives the same numbers for CUDA runs
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _callback(callback, i, sigma, x, x0, to_model=1.0):
    """Report the state in model convention (x * to_model); map a returned replacement back."""
    if callback is None:
        return x
    ret = callback(i, float(sigma), x * to_model if to_model != 1.0 else x, x0)
    if ret is None:
        return x
    if ret.shape != x.shape:
        raise ValueError(f"callback returned shape {tuple(ret.shape)}, expected {tuple(x.shape)}")
    return ret / to_model if to_model != 1.0 else ret


def _vp_x0_eps(schedule, out, x, t):
    """x0 and eps from a model output at discrete timestep t, for a VP state x."""
    abar = schedule.alphas_cumprod[int(t)]
    a, s = float(abar.sqrt()), float((1 - abar).sqrt())
    kind = schedule.prediction_type
    if a == 0.0 and kind == "eps":
        raise ValueError(f"timestep {int(t)} has zero SNR (rescale_zero_terminal_snr): x0 cannot be recovered "
                         "from an eps prediction there; use prediction_type 'v' or a spacing that avoids t=T-1")
    return convert(out, kind, "x0", x, a, s), convert(out, kind, "eps", x, a, s)


def _ve_denoised(schedule, out, x_ve, sigma: float):
    """Denoised x0 from a model output, for the k-diffusion state x_ve = x0 + sigma eps."""
    kind = schedule.prediction_type
    if kind == "eps":
        return x_ve - sigma * out
    if kind == "v":
        return out * (-sigma / (sigma**2 + 1) ** 0.5) + x_ve / (sigma**2 + 1)
    return out


def _clip(x0, clip_x0):
    return x0 if clip_x0 is None else x0.clamp(-clip_x0, clip_x0)


# ---------------------------------------------------------------- DDPM family (VP state)


def sample_ddpm(denoise, x_T, schedule, steps, *, generator=None, callback=None, start=0, spacing=None,
                clip_x0: float | None = None):
    """Ancestral sampling from the posterior q(x_prev | x_t, x0_pred), variance fixed-small (DDPM eq. 7)."""
    p = _setup("ddpm", x_T, schedule, steps, start, spacing, {})
    ts, ac = p.timesteps, schedule.alphas_cumprod
    x = x_T
    for i in range(start, len(ts)):
        t = int(ts[i])
        out = _call(denoise, x, t)
        x0, _ = _vp_x0_eps(schedule, out, x, t)
        x0 = _clip(x0, clip_x0)
        a_t = ac[t]
        a_p = ac[int(ts[i + 1])] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
        step_alpha = a_t / a_p
        c0 = float(a_p.sqrt() * (1 - step_alpha) / (1 - a_t))
        ct = float(step_alpha.sqrt() * (1 - a_p) / (1 - a_t))
        x = c0 * x0 + ct * x
        if t > 0:
            var = float(((1 - a_p) / (1 - a_t) * (1 - step_alpha)).clamp(min=1e-20))
            x = x + var**0.5 * _randn(x, generator)
        x = _callback(callback, i, p.sigmas[i + 1], x, x0)
    return x


def sample_ddim(denoise, x_T, schedule, steps, *, generator=None, callback=None, start=0, spacing=None,
                eta: float = 0.0, set_alpha_to_one: bool = True, clip_x0: float | None = None):
    """DDIM (Song et al. 2021 eq. 12): eta=0 deterministic, eta=1 the DDPM posterior.

    The step goes to the next timestep of the plan (diffusers' DDIMScheduler uses t - T//steps, which
    is the same grid for "leading" and for "trailing" when steps divides T). After the last step the
    level is clean (``set_alpha_to_one``) or that of t=0 (SD's configs).
    """
    if not eta >= 0:
        raise ValueError(f"eta={eta} must be >= 0")
    p = _setup("ddim", x_T, schedule, steps, start, spacing, {"set_alpha_to_one": set_alpha_to_one})
    ts, ac = p.timesteps, schedule.alphas_cumprod
    final = torch.tensor(1.0, dtype=torch.float64) if set_alpha_to_one else ac[0]
    x = x_T
    for i in range(start, len(ts)):
        t = int(ts[i])
        out = _call(denoise, x, t)
        x0, eps = _vp_x0_eps(schedule, out, x, t)
        if clip_x0 is not None:
            x0 = _clip(x0, clip_x0)
            eps = (x - ac[t].sqrt().item() * x0) / (1 - ac[t]).sqrt().item()
        a_t = ac[t]
        a_p = ac[int(ts[i + 1])] if i + 1 < len(ts) else final
        std = eta * float(((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)).sqrt())
        x = float(a_p.sqrt()) * x0 + max(float(1 - a_p) - std**2, 0.0) ** 0.5 * eps
        if eta > 0:
            x = x + std * _randn(x, generator)
        x = _callback(callback, i, p.sigmas[i + 1], x, x0)
    return x


# ---------------------------------------------------------------- Euler family (k-diffusion state)


def _ve_start(x_T, p, start):
    return x_T * float((p.sigmas[start] ** 2 + 1).sqrt())


def _ve_end(x, p):
    return x / float((p.sigmas[-1] ** 2 + 1).sqrt())


def _ve_model(denoise, schedule, x_ve, sigma, t):
    out = _call(denoise, x_ve / (sigma**2 + 1) ** 0.5, t)
    return _ve_denoised(schedule, out, x_ve, sigma)


def sample_euler(denoise, x_T, schedule, steps, *, generator=None, callback=None, start=0, spacing=None):
    """Euler on the probability-flow ODE dx/dsigma = (x - x0_pred) / sigma (Karras et al. 2022, Alg. 1)."""
    p = _setup("euler", x_T, schedule, steps, start, spacing, {})
    if start == len(p.timesteps):
        return x_T
    x = _ve_start(x_T, p, start)
    for i in range(start, len(p.timesteps)):
        sigma, sigma_next = float(p.sigmas[i]), float(p.sigmas[i + 1])
        x0 = _ve_model(denoise, schedule, x, sigma, p.timesteps[i])
        d = (x - x0) / sigma
        x = x + d * (sigma_next - sigma)
        x = _callback(callback, i, sigma_next, x, x0, 1 / (sigma_next**2 + 1) ** 0.5)
    return _ve_end(x, p)


def sample_euler_a(denoise, x_T, schedule, steps, *, generator=None, callback=None, start=0, spacing=None,
                   s_noise: float = 1.0):
    """Euler ancestral: an Euler step down to sigma_down, then fresh noise of std sigma_up back up.

    sigma_up = sqrt(sn^2 (s^2 - sn^2) / s^2), sigma_down = sqrt(sn^2 - sigma_up^2) keep the marginal
    variance of the DDPM posterior (k-diffusion's get_ancestral_step with eta=1).
    """
    p = _setup("euler_a", x_T, schedule, steps, start, spacing, {})
    if start == len(p.timesteps):
        return x_T
    x = _ve_start(x_T, p, start)
    for i in range(start, len(p.timesteps)):
        sigma, sigma_next = float(p.sigmas[i]), float(p.sigmas[i + 1])
        x0 = _ve_model(denoise, schedule, x, sigma, p.timesteps[i])
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        x = x + (x - x0) / sigma * (sigma_down - sigma)
        x = x + _randn(x, generator) * (s_noise * sigma_up)
        x = _callback(callback, i, sigma_next, x, x0, 1 / (sigma_next**2 + 1) ** 0.5)
    return _ve_end(x, p)


def sample_heun(denoise, x_T, schedule, steps, *, generator=None, callback=None, start=0, spacing=None):
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1); the last step (to sigma 0) is plain Euler.

    Costs 2 * steps - 1 model evaluations.
    """
    p = _setup("heun", x_T, schedule, steps, start, spacing, {})
    if start == len(p.timesteps):
        return x_T
    x = _ve_start(x_T, p, start)
    for i in range(start, len(p.timesteps)):
        sigma, sigma_next = float(p.sigmas[i]), float(p.sigmas[i + 1])
        x0 = _ve_model(denoise, schedule, x, sigma, p.timesteps[i])
        d = (x - x0) / sigma
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_mid = x + d * dt
            x0_mid = _ve_model(denoise, schedule, x_mid, sigma_next, p.timesteps[i + 1])
            d_mid = (x_mid - x0_mid) / sigma_next
            x = x + (d + d_mid) / 2 * dt
        x = _callback(callback, i, sigma_next, x, x0, 1 / (sigma_next**2 + 1) ** 0.5)
    return _ve_end(x, p)


# ---------------------------------------------------------------- DPM-Solver++ (VP state)


def _dpmpp_2m(name, denoise, x_T, schedule, steps, generator, callback, start, spacing):
    p = _setup(name, x_T, schedule, steps, start, spacing, {})
    kind = schedule.prediction_type
    x, x0_prev, h_prev = x_T, None, None
    for i in range(start, len(p.timesteps)):
        sigma, sigma_next = p.sigmas[i], p.sigmas[i + 1]
        a_s, s_s = (float(v) for v in vp_of_sigma(sigma))
        out = _call(denoise, x, p.timesteps[i])
        x0 = convert(out, kind, "x0", x, a_s, s_s)
        if sigma_next == 0:
            x = x0  # the exponential integrator's limit at lambda = +inf
        else:
            a_t, s_t = (float(v) for v in vp_of_sigma(sigma_next))
            h = float(torch.log(sigma) - torch.log(sigma_next))  # lambda_t - lambda_s
            phi = -torch.expm1(torch.tensor(-h, dtype=torch.float64)).item()  # 1 - e^{-h}
            if x0_prev is None:
                d = x0
            else:
                r = h_prev / h
                d = x0 + (x0 - x0_prev) / (2 * r)
            x = (s_t / s_s) * x + a_t * phi * d
            h_prev = h
        x0_prev = x0
        x = _callback(callback, i, sigma_next, x, x0)
    return x


def sample_dpmpp_2m(denoise, x_T, schedule, steps, *, generator=None, callback=None, start=0, spacing=None):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): multistep 2nd order in the data prediction x0.

    x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^{-h}) D, D = x0 + (x0 - x0_prev) / (2 r),
    r = h_prev / h, h = lambda_t - lambda_s; first order on the first step, x0 on the last.
    """
    return _dpmpp_2m("dpmpp_2m", denoise, x_T, schedule, steps, generator, callback, start, spacing)


def sample_dpmpp_2m_karras(denoise, x_T, schedule, steps, *, generator=None, callback=None, start=0,
                           spacing=None):
    """DPM-Solver++(2M) on Karras et al.'s sigma grid (rho = 7), the popular "DPM++ 2M Karras"."""
    return _dpmpp_2m("dpmpp_2m_karras", denoise, x_T, schedule, steps, generator, callback, start, spacing)


# ---------------------------------------------------------------- flow matching


def sample_flow_euler(denoise, x_T, schedule, steps, *, generator=None, callback=None, start=0, spacing=None):
    """Euler on dx/ds = u(x, s) from s = 1 (noise) to 0 (data), the model predicting u = eps - x0."""
    p = _setup("flow_euler", x_T, schedule, steps, start, spacing, {})
    x = x_T
    for i in range(start, len(p.timesteps)):
        s, s_next = float(p.sigmas[i]), float(p.sigmas[i + 1])
        u = _call(denoise, x, p.timesteps[i])
        x0 = x - s * u
        x = x + (s_next - s) * u
        x = _callback(callback, i, s_next, x, x0)
    return x


def sample_flow_heun(denoise, x_T, schedule, steps, *, generator=None, callback=None, start=0, spacing=None):
    """Heun on the flow ODE; the last step (to s = 0) is Euler. 2 * steps - 1 model evaluations."""
    p = _setup("flow_heun", x_T, schedule, steps, start, spacing, {})
    x = x_T
    T = schedule.num_train_timesteps
    for i in range(start, len(p.timesteps)):
        s, s_next = float(p.sigmas[i]), float(p.sigmas[i + 1])
        u = _call(denoise, x, p.timesteps[i])
        x0 = x - s * u
        x_next = x + (s_next - s) * u
        if s_next > 0:
            u_next = _call(denoise, x_next, s_next * T)
            x_next = x + (s_next - s) * (u + u_next) / 2
        x = _callback(callback, i, s_next, x_next, x0)
    return x


SAMPLERS: dict[str, Callable] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_a": sample_euler_a,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_karras": sample_dpmpp_2m_karras,
    "flow_euler": sample_flow_euler,
    "flow_heun": sample_flow_heun,
}

# samplers whose result does not depend on the generator
DETERMINISTIC = ("ddim", "euler", "heun", "dpmpp_2m", "dpmpp_2m_karras", "flow_euler", "flow_heun")


def sampler_names(schedule=None) -> list[str]:
    """Valid sampler names (only those that fit the schedule's kind when one is given)."""
    names = list(SAMPLERS)
    if schedule is not None:
        flow = isinstance(schedule, FlowSchedule)
        names = [n for n in names if n.startswith("flow_") == flow]
    return names


def get_sampler(name: str) -> Callable:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(sampler_names())}")
    return SAMPLERS[name]
