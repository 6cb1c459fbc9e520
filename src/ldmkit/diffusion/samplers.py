"""Samplers: each one short function over a denoiser ``D(x, sigma) -> x0`` and a grid of noise levels.

    fn(denoise, x, sigmas, *, generator=None, callback=None, **opts) -> x

* ``x`` is the variance-preserving state ``(x0 + sigma eps) / sqrt(1 + sigma^2)`` at ``sigmas[0]``
  (pure noise when sigmas[0] is inf); ``sigmas`` is a descending float64 tensor, ``sigmas[-1]`` the
  level the result is at (0 = clean). Step ``i`` moves the state from ``sigmas[i]`` to
  ``sigmas[i + 1]``; img2img passes the tail of a plan (``sigmas[start:]``).
* ``denoise`` is ``ldmkit.diffusion.denoiser.Denoiser`` (or any function with its contract): a
  sampler never sees what the network predicts.
* ``callback(i, sigma, x, x0)`` after step ``i``: the new state at level ``sigma = sigmas[i + 1]`` and
  the denoised estimate the step used; a returned tensor replaces the state (inpainting blends the
  known region in that way).
* Noise: ``generator`` is one ``torch.Generator`` or a list with one per image; row k of every draw
  comes from generator k, so an image depends on its own generator only (a seed gives the same image
  alone or inside a batch). Stochastic samplers draw once per step, in diffusers' order.

Each sampler integrates in the variable its method is written in (the Euler family in k-diffusion's
``x0 + sigma eps``, DPM-Solver++ and DDIM in the VP state, the flow samplers in the flow interpolant
``(1 - s) x0 + s eps``) and reports states in the VP variable. ``SAMPLERS`` registers each once: its
function, its grid (``plan``: where diffusers' matching scheduler evaluates the network) and whether
it draws noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .denoiser import Denoiser
from .schedules import (SPACINGS, DiscreteSchedule, FlowSchedule, check_steps, sigma_of_flow_time,
                        spaced_timesteps)

Denoise = Callable[[torch.Tensor, float], torch.Tensor]


# ---------------------------------------------------------------- helpers


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


# ---------------------------------------------------------------- DDPM / DDIM (VP state)


def sample_ddpm(denoise, x, sigmas, *, generator=None, callback=None):
    """Ancestral sampling from the posterior q(x_next | x, x0) with fixed-small variance (DDPM eq. 7)."""
    lv = _levels(sigmas)
    for i in range(len(lv) - 1):
        x0 = denoise(x, lv[i])
        a_t, a_p = _ab(lv[i])[0] ** 2, _ab(lv[i + 1])[0] ** 2  # alpha-bar now and next
        step = a_t / a_p
        x = (a_p**0.5 * (1 - step) / (1 - a_t)) * x0 + (step**0.5 * (1 - a_p) / (1 - a_t)) * x
        if lv[i + 1] > 0:
            x = x + ((1 - a_p) / (1 - a_t) * (1 - step)) ** 0.5 * _randn(x, generator)
        x = _done(callback, i, lv[i + 1], x, x0)
    return x


def sample_ddim(denoise, x, sigmas, *, generator=None, callback=None, eta: float = 0.0):
    """DDIM (Song et al. 2021, eq. 12): x_next = a' x0 + sqrt(s'^2 - std^2) eps + std z; eta = 0 is
    deterministic (Euler on the probability-flow ODE in x / alpha), eta = 1 the DDPM posterior."""
    if not eta >= 0:
        raise ValueError(f"eta={eta} must be >= 0")
    lv = _levels(sigmas)
    for i in range(len(lv) - 1):
        x0 = denoise(x, lv[i])
        (a, s), (a_n, s_n) = _ab(lv[i]), _ab(lv[i + 1])
        eps = (x - a * x0) / s
        std = eta * ((s_n**2 / s**2) * (1 - a**2 / a_n**2)) ** 0.5 if eta else 0.0
        x = a_n * x0 + max(s_n**2 - std**2, 0.0) ** 0.5 * eps
        if std > 0:
            x = x + std * _randn(x, generator)
        x = _done(callback, i, lv[i + 1], x, x0)
    return x


# ---------------------------------------------------------------- Euler family (k-diffusion's x0 + sigma eps)


def sample_euler(denoise, x, sigmas, *, generator=None, callback=None):
    """Euler on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, Alg. 2)."""
    lv = _levels(sigmas)
    _finite(lv, "euler")
    x = x * _ve(lv[0])
    for i in range(len(lv) - 1):
        sigma, sigma_n = lv[i], lv[i + 1]
        x0 = denoise(x / _ve(sigma), sigma)
        x = x + (x - x0) / sigma * (sigma_n - sigma)
        x = _done(callback, i, sigma_n, x, x0, 1 / _ve(sigma_n))
    return x / _ve(lv[-1])


def sample_euler_a(denoise, x, sigmas, *, generator=None, callback=None, s_noise: float = 1.0):
    """Euler ancestral: an Euler step down to sigma_down, then fresh noise of std sigma_up back up, with
    sigma_up^2 = sn^2 (s^2 - sn^2) / s^2 and sigma_down^2 = sn^2 - sigma_up^2 (k-diffusion, eta = 1)."""
    lv = _levels(sigmas)
    _finite(lv, "euler_a")
    x = x * _ve(lv[0])
    for i in range(len(lv) - 1):
        sigma, sigma_n = lv[i], lv[i + 1]
        x0 = denoise(x / _ve(sigma), sigma)
        up = (sigma_n**2 * (sigma**2 - sigma_n**2) / sigma**2) ** 0.5
        down = (sigma_n**2 - up**2) ** 0.5
        x = x + (x - x0) / sigma * (down - sigma)
        x = x + _randn(x, generator) * (s_noise * up)
        x = _done(callback, i, sigma_n, x, x0, 1 / _ve(sigma_n))
    return x / _ve(lv[-1])


def sample_heun(denoise, x, sigmas, *, generator=None, callback=None):
    """Heun's second-order method (Karras et al. 2022, Alg. 1); the step to sigma 0 is plain Euler.
    Costs 2 n - 1 network evaluations for n steps."""
    lv = _levels(sigmas)
    _finite(lv, "heun")
    x = x * _ve(lv[0])
    for i in range(len(lv) - 1):
        sigma, sigma_n = lv[i], lv[i + 1]
        x0 = denoise(x / _ve(sigma), sigma)
        d = (x - x0) / sigma
        x_next = x + d * (sigma_n - sigma)
        if sigma_n > 0:
            d_next = (x_next - denoise(x_next / _ve(sigma_n), sigma_n)) / sigma_n
            x_next = x + (d + d_next) / 2 * (sigma_n - sigma)
        x = _done(callback, i, sigma_n, x_next, x0, 1 / _ve(sigma_n))
    return x / _ve(lv[-1])


# ---------------------------------------------------------------- DPM-Solver++ (VP state)


def sample_dpmpp_2m(denoise, x, sigmas, *, generator=None, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), multistep second order in the data prediction:
    x' = (s'/s) x + a' (1 - e^-h) D, D = x0 + (x0 - x0_prev) / (2r), h = log(sigma / sigma'),
    r = h_prev / h; first order on the first step, the denoised estimate on a step to sigma 0."""
    lv = _levels(sigmas)
    x0_prev = h_prev = None
    for i in range(len(lv) - 1):
        x0 = denoise(x, lv[i])
        if lv[i + 1] == 0:
            x = x0  # the exponential integrator's limit at sigma' = 0
        else:
            (_, s), (a_n, s_n) = _ab(lv[i]), _ab(lv[i + 1])
            h = math.log(lv[i]) - math.log(lv[i + 1])
            d = x0 if x0_prev is None else x0 + (x0 - x0_prev) / (2 * h_prev / h)
            x = (s_n / s) * x + a_n * -math.expm1(-h) * d
            h_prev = h
        x0_prev = x0
        x = _done(callback, i, lv[i + 1], x, x0)
    return x


# ---------------------------------------------------------------- flow matching (flow interpolant)


def sample_flow_euler(denoise, x, sigmas, *, generator=None, callback=None):
    """Euler on dx/ds = u = (x - x0) / s in the flow variable (1 - s) x0 + s eps, from s = 1 to 0
    (diffusers' FlowMatchEulerDiscreteScheduler; for a flow network u is its velocity output)."""
    lv = _levels(sigmas)
    x = x * _flow_c(lv[0])
    for i in range(len(lv) - 1):
        s, s_n = _s(lv[i]), _s(lv[i + 1])
        x0 = denoise(x / _flow_c(lv[i]), lv[i])
        x = x + (s_n - s) * (x - x0) / s
        x = _done(callback, i, lv[i + 1], x, x0, 1 / _flow_c(lv[i + 1]))
    return x / _flow_c(lv[-1])


def sample_flow_heun(denoise, x, sigmas, *, generator=None, callback=None):
    """Heun in the flow variable (FlowMatchHeunDiscreteScheduler); the step to s = 0 is Euler."""
    lv = _levels(sigmas)
    x = x * _flow_c(lv[0])
    for i in range(len(lv) - 1):
        s, s_n = _s(lv[i]), _s(lv[i + 1])
        x0 = denoise(x / _flow_c(lv[i]), lv[i])
        u = (x - x0) / s
        x_next = x + (s_n - s) * u
        if s_n > 0:
            u_next = (x_next - denoise(x_next / _flow_c(lv[i + 1]), lv[i + 1])) / s_n
            x_next = x + (s_n - s) * (u + u_next) / 2
        x = _done(callback, i, lv[i + 1], x_next, x0, 1 / _flow_c(lv[i + 1]))
    return x / _flow_c(lv[-1])


# ---------------------------------------------------------------- grids


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


def _grid_ddpm(schedule, steps, spacing, set_alpha_to_one=True):
    """The integer grid of DDPM/DDIM, at the table's exact levels (inf where the SNR is zero); DDIM's
    ``set_alpha_to_one=False`` (SD's configs) ends at t = 0's level instead of clean."""
    ts = spaced_timesteps(schedule.num_train_timesteps, steps, spacing, schedule.steps_offset)
    final = schedule.sigmas[:1] if not set_alpha_to_one else torch.zeros(1, dtype=torch.float64)
    return Plan(torch.cat([schedule.sigmas[ts.long()], final]), ts)


def _grid_euler(schedule, steps, spacing):
    """Unrounded timesteps (fractional for "linspace"), sigma interpolated linearly, then 0."""
    ts = spaced_timesteps(schedule.num_train_timesteps, steps, spacing, schedule.steps_offset, rounded=False)
    return Plan(torch.cat([schedule.sigma_at(ts), torch.zeros(1, dtype=torch.float64)]), ts)


def _grid_dpmpp(schedule, steps, spacing):
    """steps + 1 rounded timesteps without the cleanest (the last step lands on sigma 0)."""
    ts = spaced_timesteps(schedule.num_train_timesteps, steps, spacing, schedule.steps_offset, drop_zero=True)
    return Plan(torch.cat([schedule.sigma_at(ts), torch.zeros(1, dtype=torch.float64)]), ts)


def _grid_karras(schedule, steps, spacing):
    """Karras sigmas between the schedule's extremes; the network runs at the rounded t of each."""
    sig = schedule._finite_log_sigmas.exp()
    sigmas = karras_sigmas(float(sig[0]), float(sig[-1]), steps)
    return Plan(torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)]), schedule.t_at(sigmas).round())


def _grid_flow(schedule, steps, spacing):
    """s = shift(linspace(1, shift(1/T), steps)) then 0, as diffusers' flow-matching schedulers."""
    T = schedule.num_train_timesteps
    s = schedule.shift_sigma(torch.linspace(1.0, float(schedule.shift_sigma(1.0 / T)), steps, dtype=torch.float64))
    return Plan(torch.cat([sigma_of_flow_time(s), torch.zeros(1, dtype=torch.float64)]), s * T)


GRIDS = {"ddpm": _grid_ddpm, "euler": _grid_euler, "dpmpp": _grid_dpmpp, "karras": _grid_karras, "flow": _grid_flow}


# ---------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Sampler:
    fn: Callable  # fn(denoise, x, sigmas, *, generator, callback, **options)
    grid: str  # a key of GRIDS
    stochastic: bool  # draws noise at every step (ddim only with eta > 0)
    label: str  # the name AUTOMATIC1111 shows
    options: tuple = ()  # keyword options of fn
    grid_options: tuple = ()  # keyword options of the grid

    @property
    def flow(self) -> bool:
        return self.grid == "flow"


SAMPLERS: dict[str, Sampler] = {
    "ddpm": Sampler(sample_ddpm, "ddpm", True, "DDPM"),
    "ddim": Sampler(sample_ddim, "ddpm", False, "DDIM", ("eta",), ("set_alpha_to_one",)),
    "euler": Sampler(sample_euler, "euler", False, "Euler"),
    "euler_a": Sampler(sample_euler_a, "euler", True, "Euler a", ("s_noise",)),
    "heun": Sampler(sample_heun, "euler", False, "Heun"),
    "dpmpp_2m": Sampler(sample_dpmpp_2m, "dpmpp", False, "DPM++ 2M"),
    "dpmpp_2m_karras": Sampler(sample_dpmpp_2m, "karras", False, "DPM++ 2M Karras"),
    "flow_euler": Sampler(sample_flow_euler, "flow", False, "Euler"),
    "flow_heun": Sampler(sample_flow_heun, "flow", False, "Heun"),
}
DENOISER_OPTIONS = ("clip_x0",)  # sampler options that belong to the denoiser (diffusers' clip_sample)


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def sampler_names(schedule=None) -> list[str]:
    """Valid sampler names (only those that fit the schedule's kind when one is given)."""
    if schedule is None:
        return list(SAMPLERS)
    flow = isinstance(schedule, FlowSchedule)
    return [n for n, s in SAMPLERS.items() if s.flow == flow]


def split_options(name: str, options: dict | None) -> tuple[dict, dict, dict]:
    """A sampler's options split into (sampler fn, grid, denoiser) keywords; unknown ones are refused."""
    info, options = get_sampler(name), dict(options or {})
    unknown = sorted(set(options) - set(info.options) - set(info.grid_options) - set(DENOISER_OPTIONS))
    if unknown:
        allowed = list(info.options + info.grid_options + DENOISER_OPTIONS)
        raise ValueError(f"sampler {name!r} has no option(s) {unknown}; it takes {allowed}")
    pick = lambda names: {k: v for k, v in options.items() if k in names}  # noqa: E731
    return pick(info.options), pick(info.grid_options), pick(DENOISER_OPTIONS)


def plan(name: str, schedule, steps: int, spacing: str | None = None, **grid_options) -> Plan:
    """The noise levels and network timesteps sampler ``name`` visits in ``steps`` steps (the grid of
    diffusers' matching scheduler); ``spacing`` overrides the schedule's timestep spacing."""
    info = get_sampler(name)
    check_steps(steps, schedule.num_train_timesteps)
    want = FlowSchedule if info.flow else DiscreteSchedule
    if not isinstance(schedule, want):
        fits = ", ".join(sampler_names(schedule))
        raise ValueError(f"sampler {name!r} needs a {want.__name__}, got a {type(schedule).__name__} "
                         f"(samplers for it: {fits})")
    if spacing is not None and spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")
    unknown = sorted(set(grid_options) - set(info.grid_options))
    if unknown:
        raise ValueError(f"sampler {name!r}'s grid has no option(s) {unknown}")
    spacing = spacing or getattr(schedule, "timestep_spacing", None)
    return GRIDS[info.grid](schedule, steps, spacing, **grid_options)


def img2img_start(steps: int, strength: float) -> int:
    """First step index for img2img: strength 1 runs all steps, 0 none (diffusers' int(steps * strength))."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be a positive integer")
    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength={strength} is outside the allowed range [0, 1]")
    return steps - min(int(steps * strength), steps)


def sample(name: str, network, x, schedule, prediction: str, steps: int, *, start: int = 0, generator=None,
           callback=None, spacing: str | None = None, **options):
    """One call from a network ``network(x_in, t) -> output`` to a sample: the plan of sampler ``name``,
    the denoiser, then the sampler from level ``plan.sigmas[start]`` (``x`` is the state there).
    ``options`` are the sampler's, its grid's and the denoiser's (``split_options``)."""
    info = get_sampler(name)
    fn_opts, grid_opts, den_opts = split_options(name, options)
    p = plan(name, schedule, steps, spacing, **grid_opts)
    if not isinstance(start, int) or not 0 <= start <= steps:
        raise ValueError(f"start={start!r} must be an integer in [0, {steps}]")
    denoise = Denoiser(network, schedule, prediction, p, clip=den_opts.get("clip_x0"))
    return info.fn(denoise, x, p.sigmas[start:], generator=generator, callback=callback, **fn_opts)
