"""Noise schedules: how much signal and noise each training timestep holds.

Two families:

* ``DiscreteSchedule`` -- the DDPM family (linear, scaled-linear as Stable
  Diffusion uses, cosine of Nichol & Dhariwal). A table of ``T`` betas; the
  forward process is ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``.
  The k-diffusion view of the same process is ``x0 + sigma eps`` with
  ``sigma = sqrt((1 - abar) / abar)``; samplers of the Euler family work with
  that sigma, and it is the "noise level" the samplers report.
* ``FlowSchedule`` -- rectified flow (SD3): ``x_s = (1 - s) x0 + s eps`` for
  continuous ``s`` in [0, 1]; the network sees ``s * T``. ``shift`` moves
  sampling time towards the noisy end (``shift * s / (1 + (shift - 1) s)``).

Tables are float64. The numbers follow diffusers' schedulers (its
``beta_schedule`` names are accepted) so that SD-format weights see the noise
levels they were trained with. What a network predicts (eps, v, x0, flow
velocity) is not part of the schedule: ``ldmkit.diffusion.denoiser`` turns any
prediction into the denoised estimate the samplers work with.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import cached_property

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
SPACINGS = ("leading", "trailing", "linspace")
_ALIASES = {"squaredcos_cap_v2": "cosine"}


def _check_choice(what: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(map(repr, allowed))}")


def cosine_betas(num_train_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021): abar(t) = cos^2(((t/T + s)/(1 + s)) pi/2), betas clipped at max_beta."""

    def abar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    T = num_train_timesteps
    return torch.tensor([min(1 - abar((i + 1) / T) / abar(i / T), max_beta) for i in range(T)], dtype=torch.float64)


def rescale_to_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Alg. 1: shift/scale sqrt(abar) so the last step is pure noise, the first unchanged."""
    sqrt_abar = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def spaced_timesteps(T: int, steps: int, spacing: str, steps_offset: int = 0, *, rounded: bool = True,
                     drop_zero: bool = False) -> torch.Tensor:
    """Descending sampling timesteps, as diffusers' ``timestep_spacing`` (Lin et al. 2023, Table 2).

    ``leading``: multiples of T//steps from 0 (+ steps_offset); ``trailing``: from T-1 down in steps of
    T/steps; ``linspace``: evenly from T-1 to 0 (rounded unless ``rounded=False``, as Euler-family
    schedulers keep fractional timesteps). ``drop_zero`` builds a grid of steps+1 points and drops the
    cleanest one (DPM-Solver: the last step then lands on sigma 0 instead of visiting t=0).
    """
    check_steps(steps, T)
    _check_choice("timestep spacing", spacing, SPACINGS)
    n = steps + 1 if drop_zero else steps
    if spacing == "linspace":
        ts = torch.linspace(0, T - 1, n, dtype=torch.float64)
        if rounded:
            ts = ts.round()
        ts = ts.flip(0)
    elif spacing == "leading":
        ratio = T // n
        ts = (torch.arange(n, dtype=torch.float64) * ratio).flip(0) + steps_offset
        if ts[0] >= T:
            raise ValueError(f"steps={steps} with 'leading' spacing and steps_offset={steps_offset} reaches "
                             f"timestep {int(ts[0])}, outside [0, {T}); use fewer steps or another spacing")
    else:  # trailing
        ratio = T / steps
        ts = torch.round(torch.arange(float(T), 0, -ratio, dtype=torch.float64)) - 1
        return ts[:steps]
    return ts[:steps] if drop_zero else ts


def check_steps(steps, T: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= T:
        raise ValueError(f"steps={steps!r} must be an integer in [1, {T}] (the schedule's num_train_timesteps)")


@dataclass(frozen=True)
class DiscreteSchedule:
    beta_schedule: str = "linear"
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    rescale_zero_terminal_snr: bool = False
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    kind: str = field(default="discrete", init=False)

    def __post_init__(self):
        object.__setattr__(self, "beta_schedule", _ALIASES.get(self.beta_schedule, self.beta_schedule))
        _check_choice("beta schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice("timestep spacing", self.timestep_spacing, SPACINGS)
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps={self.num_train_timesteps!r} must be an integer >= 2")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(f"beta_start={self.beta_start}, beta_end={self.beta_end}: need 0 < start <= end < 1")
        if not 0 <= self.steps_offset < self.num_train_timesteps:
            raise ValueError(f"steps_offset={self.steps_offset} must be in [0, {self.num_train_timesteps})")

    # ---- tables (float64, computed once) ----
    @cached_property
    def betas(self) -> torch.Tensor:
        T = self.num_train_timesteps
        if self.beta_schedule == "linear":
            b = torch.linspace(self.beta_start, self.beta_end, T, dtype=torch.float64)
        elif self.beta_schedule == "scaled_linear":
            b = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, T, dtype=torch.float64) ** 2
        else:
            b = cosine_betas(T)
        return rescale_to_zero_terminal_snr(b) if self.rescale_zero_terminal_snr else b

    @cached_property
    def alphas(self) -> torch.Tensor:
        return 1 - self.betas

    @cached_property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.cumprod(self.alphas, 0)

    @cached_property
    def sigmas(self) -> torch.Tensor:
        """k-diffusion noise level per timestep; the last one is inf under zero terminal SNR."""
        return _sigma_of_abar(self.alphas_cumprod)

    @cached_property
    def log_snr(self) -> torch.Tensor:
        abar = self.alphas_cumprod
        return torch.log(abar) - torch.log1p(-abar)

    @cached_property
    def _finite_log_sigmas(self) -> torch.Tensor:
        # zero terminal SNR: diffusers clamps abar[-1] to 2**-24 so the first sigma stays finite
        abar = self.alphas_cumprod.clone()
        if self.rescale_zero_terminal_snr:
            abar[-1] = 2.0**-24
        return _sigma_of_abar(abar).log()

    # ---- conversions ----
    def sigma_at(self, t) -> torch.Tensor:
        """Timestep (may be fractional) -> sigma, interpolating linearly in sigma as diffusers does."""
        t = torch.as_tensor(t, dtype=torch.float64)
        _check_range("timestep t", t, 0, self.num_train_timesteps - 1)
        sig = self._finite_log_sigmas.exp()
        lo = t.floor().long().clamp(max=self.num_train_timesteps - 2)
        w = t - lo
        return (1 - w) * sig[lo] + w * sig[lo + 1]

    def t_at(self, sigma) -> torch.Tensor:
        """Sigma -> fractional timestep, interpolating in log-sigma (diffusers' / k-diffusion's sigma_to_t)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        log_sigmas = self._finite_log_sigmas
        log_sigma = sigma.clamp(min=1e-10).log()
        dists = log_sigma - log_sigmas.reshape(-1, *([1] * log_sigma.dim()))
        lo = (dists >= 0).cumsum(0).argmax(0).clamp(max=len(log_sigmas) - 2)
        low, high = log_sigmas[lo], log_sigmas[lo + 1]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        return (1 - w) * lo + w * (lo + 1)

    def alpha_sigma(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(abar_t), sqrt(1 - abar_t)) at integer or fractional t (fractional via sigma_at)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if torch.all(t == t.round()):
            _check_range("timestep t", t, 0, self.num_train_timesteps - 1)
            abar = self.alphas_cumprod[t.long()]
            return abar.sqrt(), (1 - abar).sqrt()
        return vp_of_sigma(self.sigma_at(t))

    def model_timestep(self, t) -> torch.Tensor:
        return torch.as_tensor(t, dtype=torch.float64)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kind"] = "discrete"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DiscreteSchedule":
        return cls(**_fields(cls, d, "discrete"))


@dataclass(frozen=True)
class FlowSchedule:
    num_train_timesteps: int = 1000
    shift: float = 1.0
    # FLUX's resolution-dependent shift (diffusers' use_dynamic_shifting): the sampling grid is
    # linspace(1, 1/n, n) moved by mu = linear in the image's token count, from base_shift at
    # base_image_seq_len tokens to max_shift at max_image_seq_len (`dynamic_mu`)
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    grid: str = "scheduler"  # the sampling grid: the scheduler's own, or "flux" (FluxPipeline's linspace(1, 1/n, n))
    mu: float | None = None  # a dynamic shift's value for one image size (`for_tokens`); not saved
    kind: str = field(default="flow", init=False)

    def __post_init__(self):
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps={self.num_train_timesteps!r} must be an integer >= 2")
        if not self.shift > 0:
            raise ValueError(f"shift={self.shift} must be > 0")
        if not isinstance(self.use_dynamic_shifting, bool):
            raise ValueError(f"use_dynamic_shifting={self.use_dynamic_shifting!r} must be true or false")
        if not (isinstance(self.base_image_seq_len, int) and isinstance(self.max_image_seq_len, int)
                and 0 < self.base_image_seq_len < self.max_image_seq_len):
            raise ValueError(f"base_image_seq_len={self.base_image_seq_len!r} and max_image_seq_len="
                             f"{self.max_image_seq_len!r} must be integers with 0 < base < max")
        for name in ("base_shift", "max_shift"):
            if not -100 < getattr(self, name) < 100:
                raise ValueError(f"{name}={getattr(self, name)!r} is outside (-100, 100)")
        if self.grid not in ("scheduler", "flux"):
            raise ValueError(f"grid={self.grid!r} must be 'scheduler' or 'flux'")

    def for_tokens(self, seq_len: int) -> "FlowSchedule":
        """This schedule for an image of `seq_len` denoiser tokens (its dynamic shift's mu set)."""
        import dataclasses

        return dataclasses.replace(self, mu=self.dynamic_mu(seq_len)) if self.use_dynamic_shifting else self

    def dynamic_mu(self, seq_len: int) -> float:
        """mu of an image of `seq_len` tokens (diffusers' calculate_shift)."""
        m = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        return seq_len * m + (self.base_shift - m * self.base_image_seq_len)

    def shift_sigma(self, s) -> torch.Tensor:
        s = torch.as_tensor(s, dtype=torch.float64)
        return self.shift * s / (1 + (self.shift - 1) * s)

    def alpha_sigma(self, s) -> tuple[torch.Tensor, torch.Tensor]:
        s = torch.as_tensor(s, dtype=torch.float64)
        _check_range("flow time s", s, 0, 1)
        return 1 - s, s

    def model_timestep(self, s) -> torch.Tensor:
        return torch.as_tensor(s, dtype=torch.float64) * self.num_train_timesteps

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("mu")  # per image size, not part of the model
        d["kind"] = "flow"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FlowSchedule":
        return cls(**_fields(cls, d, "flow"))


Schedule = DiscreteSchedule | FlowSchedule

# what a network may predict; a schedule dict written before predictions left the schedule may
# still name one (``prediction_of`` reads it)
PREDICTIONS = ("eps", "v", "x0", "flow")
_PREDICTION_ALIASES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def prediction_name(name: str) -> str:
    """"eps" | "v" | "x0" | "flow" (diffusers' "epsilon", "v_prediction", "sample" accepted)."""
    name = _PREDICTION_ALIASES.get(name, name)
    _check_choice("prediction type", name, PREDICTIONS)
    return name


def prediction_of(d: dict, default: str | None = None) -> str | None:
    """The prediction type an older schedule dict records (flow schedules: "flow"), else ``default``."""
    if not isinstance(d, dict):
        return default
    if d.get("kind") == "flow":
        return "flow"
    value = d.get("prediction_type")
    return prediction_name(value) if value is not None else default


def _fields(cls, d: dict, kind: str) -> dict:
    if not isinstance(d, dict):
        raise ValueError(f"a schedule must be a JSON object, got {type(d).__name__}")
    d = dict(d)
    d.pop("prediction_type", None)  # older model folders kept the prediction type here
    got = d.pop("kind", kind)
    if got != kind:
        raise ValueError(f"schedule kind {got!r} is not {kind!r}")
    known = {f.name for f in cls.__dataclass_fields__.values() if f.init}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown schedule fields {unknown}; known: {sorted(known)}")
    return d


def _sigma_of_abar(abar: torch.Tensor) -> torch.Tensor:
    return ((1 - abar) / abar).sqrt()


def vp_of_sigma(sigma) -> tuple[torch.Tensor, torch.Tensor]:
    """k-sigma -> (alpha, sigma_vp) with alpha = 1/sqrt(1+sigma^2), sigma_vp = sigma * alpha
    (sigma = inf, pure noise: (0, 1))."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    alpha = 1 / (sigma**2 + 1).sqrt()
    return alpha, torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma * alpha)


def flow_time(sigma) -> torch.Tensor:
    """k-sigma -> flow time s = sigma / (1 + sigma) (inf -> 1), the inverse of ``sigma = s / (1 - s)``."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1 + sigma))


def sigma_of_flow_time(s) -> torch.Tensor:
    """Flow time s in [0, 1] -> k-sigma s / (1 - s) (1 -> inf)."""
    s = torch.as_tensor(s, dtype=torch.float64)
    return torch.where(s >= 1, torch.full_like(s, math.inf), s / (1 - s).clamp(min=1e-300))


def _check_range(what: str, x: torch.Tensor, lo: float, hi: float) -> None:
    if x.numel() and (x.min() < lo or x.max() > hi):
        bad = x.min().item() if x.min() < lo else x.max().item()
        raise ValueError(f"{what}={bad} is outside the allowed range [{lo}, {hi}]")


SCHEDULES = ("linear", "scaled_linear", "cosine", "squaredcos_cap_v2", "flow")

PRESETS: dict[str, dict] = {
    "ddpm": dict(name="linear"),
    "sd15": dict(name="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1),
    "sd3": dict(name="flow", shift=3.0),
}


def make_schedule(name: str, **kw) -> Schedule:
    """Build a schedule by name ("linear", "scaled_linear", "cosine", "flow") or preset ("sd15", ...)."""
    if name in PRESETS:
        preset = dict(PRESETS[name])
        return make_schedule(preset.pop("name"), **{**preset, **kw})
    _check_choice("schedule", name, SCHEDULES + tuple(PRESETS))
    if name == "flow":
        return FlowSchedule(**kw)
    return DiscreteSchedule(beta_schedule=name, **kw)


def schedule_from_dict(d: dict) -> Schedule:
    if not isinstance(d, dict):
        raise ValueError(f"a schedule must be a JSON object, got {type(d).__name__}")
    kind = d.get("kind", "discrete")
    _check_choice("schedule kind", kind, ("discrete", "flow"))
    return (FlowSchedule if kind == "flow" else DiscreteSchedule).from_dict(d)
