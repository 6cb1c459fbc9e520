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
  alone or inside a batch). Stochastic samplers draw at every step, in diffusers' order (DPM++ SDE twice).

Each sampler integrates in the variable its method is written in (the Euler family in k-diffusion's
``x0 + sigma eps``, DPM-Solver++ and DDIM in the VP state, the flow samplers in the flow interpolant
``(1 - s) x0 + s eps``) and reports states in the VP variable. This module holds the one-step families
(DDPM, DDIM, Euler, Heun, DPM-Solver++(2M), flow); ``samplers_multistep`` (LMS, PNDM, DEIS, UniPC) and
``samplers_sde`` (DPM++ 2M / 3M SDE, DPM++ SDE, LCM) the others; ``grids`` the plans.

``SAMPLERS`` registers each once: its function, its grid (``plan``: where diffusers' matching scheduler
evaluates the network), whether it draws noise and its AUTOMATIC1111 name. A sampler on a sigma-based
grid also comes as ``NAME_karras``, ``NAME_exponential`` and ``NAME_beta`` (``with_sigmas``), labelled as
A1111's older names were ("DPM++ 2M Karras"); ``resolve_sampler`` reads those labels back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch

from .denoiser import Denoiser
from .grids import GRIDS, SIGMA_GRIDS, SIGMA_KINDS, Plan, karras_sigmas  # noqa: F401 (re-exported)
from .sampler_parts import _ab, _done, _finite, _flow_c, _levels, _randn, _s, _ve
from .samplers_multistep import sample_deis, sample_lms, sample_pndm, sample_unipc
from .samplers_sde import sample_dpmpp_2m_sde, sample_dpmpp_3m_sde, sample_dpmpp_sde, sample_lcm
from .schedules import SPACINGS, DiscreteSchedule, FlowSchedule, check_steps

Denoise = Callable[[torch.Tensor, float], torch.Tensor]


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


# ---------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Sampler:
    fn: Callable  # fn(denoise, x, sigmas, *, generator, callback, **options)
    grid: str  # a key of GRIDS
    stochastic: bool  # draws noise at every step (ddim only with eta > 0)
    label: str  # the name AUTOMATIC1111 shows (its older form for a sigma kind: "DPM++ 2M Karras")
    options: tuple = ()  # keyword options of fn
    grid_options: tuple = ()  # keyword options of the grid
    sigmas: str | None = None  # the grid's sigma kind (a key of grids.SIGMA_KINDS), None for its own levels

    @property
    def flow(self) -> bool:
        return self.grid == "flow"

    @property
    def a1111(self) -> str:
        """AUTOMATIC1111's sampler name without the schedule type ("DPM++ 2M")."""
        return self.label[: -len(self.schedule_type) - 1] if self.schedule_type else self.label

    @property
    def schedule_type(self) -> str | None:
        """AUTOMATIC1111's "Schedule type" of the grid's sigma kind ("Karras"), None for the plain grid."""
        return SIGMA_KINDS[self.sigmas] if self.sigmas else None


_REGISTERED: dict[str, Sampler] = {  # each sampler once; the sigma kinds are added below
    "ddpm": Sampler(sample_ddpm, "ddpm", True, "DDPM"),
    "ddim": Sampler(sample_ddim, "ddpm", False, "DDIM", ("eta",), ("set_alpha_to_one",)),
    "pndm": Sampler(sample_pndm, "pndm", False, "PLMS", ("skip_prk_steps", "variable"),
                    ("set_alpha_to_one", "skip_prk_steps")),
    "euler": Sampler(sample_euler, "euler", False, "Euler"),
    "euler_a": Sampler(sample_euler_a, "euler", True, "Euler a", ("s_noise",)),
    "heun": Sampler(sample_heun, "euler", False, "Heun"),
    "lms": Sampler(sample_lms, "euler", False, "LMS", ("order",)),
    "dpmpp_2m": Sampler(sample_dpmpp_2m, "dpmpp", False, "DPM++ 2M"),
    "dpmpp_2m_sde": Sampler(sample_dpmpp_2m_sde, "dpmpp", True, "DPM++ 2M SDE", ("solver_type",)),
    "dpmpp_3m_sde": Sampler(sample_dpmpp_3m_sde, "dpmpp", True, "DPM++ 3M SDE"),
    "dpmpp_sde": Sampler(sample_dpmpp_sde, "euler", True, "DPM++ SDE", ("s_noise",)),
    "unipc": Sampler(sample_unipc, "unipc", False, "UniPC",
                     ("solver_order", "solver_type", "lower_order_final", "disable_corrector")),
    "deis": Sampler(sample_deis, "deis", False, "DEIS", ("solver_order", "lower_order_final")),
    "lcm": Sampler(sample_lcm, "lcm", True, "LCM", (), ("original_inference_steps",)),
    "flow_euler": Sampler(sample_flow_euler, "flow", False, "Euler"),
    "flow_heun": Sampler(sample_flow_heun, "flow", False, "Heun"),
}
SAMPLERS: dict[str, Sampler] = {}
for _name, _info in _REGISTERED.items():
    SAMPLERS[_name] = _info
    if _info.grid in SIGMA_GRIDS:
        for _kind, _type in SIGMA_KINDS.items():
            SAMPLERS[f"{_name}_{_kind}"] = replace(_info, label=f"{_info.label} {_type}", sigmas=_kind)
DENOISER_OPTIONS = ("clip_x0",)  # sampler options that belong to the denoiser (diffusers' clip_sample)


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(_REGISTERED)} (a sampler "
                         f"on a sigma grid also as NAME_{'/_'.join(SIGMA_KINDS)})")
    return SAMPLERS[name]


def sampler_names(schedule=None, kinds: bool = True) -> list[str]:
    """Valid sampler names (only those that fit the schedule's kind when one is given; without the
    ``_karras`` / ``_exponential`` / ``_beta`` forms when ``kinds`` is False)."""
    names = SAMPLERS if kinds else _REGISTERED
    if schedule is None:
        return list(names)
    flow = isinstance(schedule, FlowSchedule)
    return [n for n in names if SAMPLERS[n].flow == flow]


def base_name(name: str) -> str:
    """The registered sampler a name is a sigma kind of ("dpmpp_2m_karras" -> "dpmpp_2m")."""
    info = get_sampler(name)
    return name[: -len(info.sigmas) - 1] if info.sigmas else name


def with_sigmas(name: str, kind: str | None) -> str:
    """Sampler ``name`` on the levels of a sigma kind ("karras", "exponential", "beta"; None: unchanged)."""
    if kind is None:
        return name
    if kind not in SIGMA_KINDS:
        raise ValueError(f"unknown sigmas {kind!r}; expected one of {', '.join(SIGMA_KINDS)}")
    info = get_sampler(name)
    if info.sigmas not in (None, kind):
        raise ValueError(f"sampler {name!r} already runs on {info.sigmas} sigmas; give {base_name(name)!r} "
                         f"with sigmas {kind!r}")
    if info.grid not in SIGMA_GRIDS:
        fits = ", ".join(n for n, s in _REGISTERED.items() if s.grid in SIGMA_GRIDS)
        raise ValueError(f"sampler {name!r} takes no sigmas {kind!r}: its levels are its own {info.grid!r} "
                         f"grid's; samplers that take them: {fits}")
    return f"{base_name(name)}_{kind}"


def resolve_sampler(text: str, flow: bool = False) -> str:
    """A sampler name, or an AUTOMATIC1111 display name ("DPM++ 2M Karras", "Euler a", "PLMS", "LMS"),
    case-insensitively -> the sampler name; ``flow`` picks the flow samplers for "Euler" / "Heun"."""
    if text in SAMPLERS:
        return text
    key = " ".join(str(text).split()).lower()
    found = sorted((n for n, s in SAMPLERS.items() if key in (n, s.label.lower())),
                   key=lambda n: SAMPLERS[n].flow != flow)
    if not found:
        raise ValueError(f"unknown sampler {text!r}; expected one of {', '.join(_REGISTERED)}, a sigma kind of "
                         f"one (NAME_{'/_'.join(SIGMA_KINDS)}) or an AUTOMATIC1111 name such as "
                         "'DPM++ 2M Karras', 'Euler a', 'UniPC'")
    return found[0]


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
        fits = ", ".join(sampler_names(schedule, kinds=False))
        raise ValueError(f"sampler {name!r} needs a {want.__name__}, got a {type(schedule).__name__} "
                         f"(samplers for it: {fits})")
    if spacing is not None and spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")
    unknown = sorted(set(grid_options) - set(info.grid_options))
    if unknown:
        raise ValueError(f"sampler {name!r}'s grid has no option(s) {unknown}")
    spacing = spacing or getattr(schedule, "timestep_spacing", None)
    if info.sigmas is not None:
        grid_options["sigmas"] = info.sigmas
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
