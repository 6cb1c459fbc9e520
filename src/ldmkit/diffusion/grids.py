"""Sampling grids: the noise levels a sampler visits and the network timestep at each.

A grid is ``fn(schedule, steps, spacing, **grid_options) -> Plan``: where diffusers' matching scheduler
evaluates the network, so that seeded runs match diffusers step by step. The families:

    ddpm    DDPM / DDIM: the integer timesteps of the spacing, at the table's exact levels
    pndm    the same for PNDM / PLMS; with its Runge-Kutta warmup the three midpoints are interleaved
    euler   Euler, Heun, LMS, DPM++ SDE: unrounded timesteps, sigma interpolated linearly in t
    dpmpp   DPM-Solver++ multistep (and UniPC, DEIS): steps + 1 rounded timesteps without the cleanest
    lcm     LCM: every k-th timestep of the distillation schedule (``original_inference_steps``)
    flow    rectified flow: shifted s in (0, 1]

``sigmas="karras" | "exponential" | "beta"`` replaces the levels of the euler / dpmpp families by
Karras et al.'s, log-uniform ones or a Beta(0.6, 0.6) quantile ramp (diffusers' ``use_karras_sigmas``,
``use_exponential_sigmas``, ``use_beta_sigmas``). Each family takes the ends and rounds the network
timesteps as its diffusers schedulers do: Euler-like ones span the spacing's own first and last level and
keep fractional timesteps; DPM-Solver-like ones span the whole table, round Karras timesteps (not for
cosine betas in DPM-Solver++) and truncate the others to integers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch

from .schedules import sigma_of_flow_time, spaced_timesteps

# a grid's sigma kind -> the schedule type AUTOMATIC1111 calls it
SIGMA_KINDS = {"karras": "Karras", "exponential": "Exponential", "beta": "Beta"}


@dataclass(frozen=True)
class Plan:
    """Where a sampler evaluates the network: ``sigmas`` [n + 1] (the level before each step, then the
    final level) and ``timesteps`` [n] (the network timestep diffusers' scheduler uses at each level)."""

    sigmas: torch.Tensor
    timesteps: torch.Tensor


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 eq. 5: n levels from sigma_max to sigma_min, even in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> torch.Tensor:
    """n levels from sigma_max to sigma_min, even in log sigma."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()


def beta_sigmas(sigma_min: float, sigma_max: float, n: int, a: float = 0.6, b: float = 0.6) -> torch.Tensor:
    """Lee et al. 2024 ("Beta Sampling is All You Need"): sigma_min + F^-1(1 - u) (sigma_max - sigma_min)
    for u even in [0, 1], F the Beta(a, b) distribution function (diffusers' use_beta_sigmas)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64).tolist()
    return torch.tensor([sigma_min + beta_ppf(1 - u, a, b) * (sigma_max - sigma_min) for u in ramp],
                        dtype=torch.float64)


def beta_ppf(q: float, a: float, b: float) -> float:
    """The Beta(a, b) quantile: the x with I_x(a, b) = q, by bisection (to float64 resolution)."""
    if q <= 0 or q >= 1:
        return float(min(max(q, 0.0), 1.0))
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if _betainc(a, b, mid) < q else (lo, mid)
    return (lo + hi) / 2


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) by its continued fraction (modified Lentz)."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast below the mean: use the symmetry
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny, f, c, d = 1e-300, 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -((a + m) * (a + b + m) * x) / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-16:
            break
    return front * (f - 1.0)


_KINDS = {"karras": karras_sigmas, "exponential": exponential_sigmas, "beta": beta_sigmas}


def _zero():
    return torch.zeros(1, dtype=torch.float64)


def _kind_levels(schedule, kind: str, lo: float, hi: float, steps: int, rounding: str) -> tuple:
    """(levels [steps], network timesteps [steps]) of a sigma kind between lo and hi."""
    if kind not in _KINDS:
        raise ValueError(f"unknown sigmas {kind!r}; expected one of {', '.join(SIGMA_KINDS)}")
    sigmas = _KINDS[kind](lo, hi, steps)
    t = schedule.t_at(sigmas)
    if rounding == "round":
        t = t.round()
    elif rounding == "trunc":  # diffusers casts fractional timesteps to int64
        t = (t + 1e-9).floor()
    return sigmas, t


def _grid_ddpm(schedule, steps, spacing, set_alpha_to_one=True):
    """The integer grid of DDPM/DDIM, at the table's exact levels (inf where the SNR is zero); DDIM's
    ``set_alpha_to_one=False`` (SD's configs) ends at t = 0's level instead of clean."""
    ts = spaced_timesteps(schedule.num_train_timesteps, steps, spacing, schedule.steps_offset)
    final = schedule.sigmas[:1] if not set_alpha_to_one else _zero()
    return Plan(torch.cat([schedule.sigmas[ts.long()], final]), ts)


def _grid_pndm(schedule, steps, spacing, set_alpha_to_one=False, skip_prk_steps=True):
    """PNDMScheduler: DDIM's grid (final level t = 0's unless set_alpha_to_one). Without skip_prk_steps
    the first three steps are Runge-Kutta steps through a midpoint (diffusers' t_next + (T // steps) // 2),
    interleaved: [t0, m0, t1, m1, t2, m2, t3, t4, ...] (``samplers_multistep.sample_pndm`` reads it so)."""
    p = _grid_ddpm(schedule, steps, spacing, set_alpha_to_one)
    if skip_prk_steps:
        return p
    if steps < 4:
        raise ValueError(f"steps={steps}: PNDM's Runge-Kutta warmup needs at least 4 steps "
                         "(or skip_prk_steps=True, as Stable Diffusion's config has)")
    half = schedule.num_train_timesteps // steps // 2
    mids = p.timesteps[1:4] + half
    ts = torch.stack([p.timesteps[:3], mids], 1).flatten()
    ts = torch.cat([ts, p.timesteps[3:]])
    return Plan(torch.cat([schedule.sigmas[ts.long()], p.sigmas[-1:]]), ts)


def _grid_euler(schedule, steps, spacing, sigmas=None):
    """Unrounded timesteps (fractional for "linspace"), sigma interpolated linearly, then 0; a sigma kind
    spans the first and last of those levels and keeps fractional timesteps."""
    ts = spaced_timesteps(schedule.num_train_timesteps, steps, spacing, schedule.steps_offset, rounded=False)
    levels = schedule.sigma_at(ts)
    if sigmas is not None:
        levels, ts = _kind_levels(schedule, sigmas, float(levels[-1]), float(levels[0]), steps, "none")
    return Plan(torch.cat([levels, _zero()]), ts)


def _grid_multistep(schedule, steps, spacing, sigmas=None, *, final="zero", karras_round="unless_cosine"):
    """steps + 1 rounded timesteps without the cleanest (the last step lands on sigma 0, or on t = 0's
    level for DEIS); a sigma kind spans the whole table (DEIS then ends on its last level again)."""
    if sigmas is None:
        ts = spaced_timesteps(schedule.num_train_timesteps, steps, spacing, schedule.steps_offset, drop_zero=True)
        levels = schedule.sigma_at(ts)
        last = schedule._finite_log_sigmas[:1].exp() if final == "sigma_min" else _zero()
        return Plan(torch.cat([levels, last]), ts)
    table = schedule._finite_log_sigmas.exp()
    rounding = "trunc"
    if sigmas == "karras":
        cosine = getattr(schedule, "beta_schedule", None) == "cosine"
        rounding = "none" if karras_round == "unless_cosine" and cosine else "round"
    levels, ts = _kind_levels(schedule, sigmas, float(table[0]), float(table[-1]), steps, rounding)
    return Plan(torch.cat([levels, levels[-1:] if final == "sigma_min" else _zero()]), ts)


def _grid_karras(schedule, steps, spacing):
    """DPM-Solver++'s Karras grid (kept under its old name)."""
    return _grid_multistep(schedule, steps, spacing, "karras")


def _grid_lcm(schedule, steps, spacing, original_inference_steps=50):
    """LCMScheduler: every k-th timestep (k = T // original_inference_steps, ending at k - 1) as in the
    distillation, ``steps`` of them evenly by index from the noisiest; the last step lands on sigma 0."""
    T, n0 = schedule.num_train_timesteps, original_inference_steps
    if not isinstance(n0, int) or isinstance(n0, bool) or not 1 <= n0 <= T:
        raise ValueError(f"original_inference_steps={n0!r} must be an integer in [1, {T}]")
    if steps > n0:
        raise ValueError(f"steps={steps}: LCM runs at most original_inference_steps={n0} steps "
                         "(the timesteps it was distilled on)")
    origin = (torch.arange(n0, 0, -1, dtype=torch.float64) * (T // n0) - 1)
    ts = origin[torch.floor(torch.arange(steps, dtype=torch.float64) * n0 / steps).long()]
    return Plan(torch.cat([schedule.sigmas[ts.long()], _zero()]), ts)


def _grid_flow(schedule, steps, spacing):
    """s = shift(linspace(1, shift(1/T), steps)) then 0, as diffusers' flow-matching schedulers; the FLUX grid
    (`schedule.grid == "flux"`, FluxPipeline's sigmas): linspace(1, 1/steps, steps), then the static shift or,
    with dynamic shifting, exp(mu) / (exp(mu) + 1/s - 1) for the image's mu (`schedule.mu`)."""
    T = schedule.num_train_timesteps
    if getattr(schedule, "grid", "scheduler") == "flux":
        s = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
        if schedule.use_dynamic_shifting:
            if schedule.mu is None:
                raise ValueError("a dynamically shifted flow schedule needs the image's mu (FlowSchedule.for_tokens)")
            s = math.exp(schedule.mu) / (math.exp(schedule.mu) + (1 / s - 1))
        else:
            s = schedule.shift_sigma(s)
    else:
        s = schedule.shift_sigma(torch.linspace(1.0, float(schedule.shift_sigma(1.0 / T)), steps, dtype=torch.float64))
    return Plan(torch.cat([sigma_of_flow_time(s), _zero()]), s * T)


GRIDS = {
    "ddpm": _grid_ddpm, "pndm": _grid_pndm, "euler": _grid_euler, "dpmpp": _grid_multistep,
    "unipc": partial(_grid_multistep, karras_round="always"),
    "deis": partial(_grid_multistep, final="sigma_min", karras_round="always"),
    "karras": _grid_karras, "lcm": _grid_lcm, "flow": _grid_flow,
}
SIGMA_GRIDS = ("euler", "dpmpp", "unipc", "deis")  # the grids a sigma kind applies to


def handover_step(timesteps, num_train_timesteps: int, start: float) -> int:
    """The step where the refiner takes over: the base runs the timesteps >= round(T - start * T)
    (diffusers' `denoising_end` / `denoising_start`)."""
    cutoff = int(round(num_train_timesteps - start * num_train_timesteps))
    return int((torch.as_tensor(timesteps) >= cutoff).sum())
