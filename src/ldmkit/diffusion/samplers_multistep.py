"""Deterministic multistep samplers: LMS, PNDM / PLMS, DEIS, UniPC (registered in ``samplers.SAMPLERS``).

Each reuses the network evaluations of earlier steps through a polynomial in some time variable and
matches one diffusers scheduler step by step:

    lms    LMSDiscreteScheduler     Adams-Bashforth in sigma on dx/dsigma = (x - D) / sigma (x0 + sigma eps)
    pndm   PNDMScheduler            Adams-Bashforth on eps, each step DDIM's transfer (Liu et al. 2022)
    deis   DEISMultistepScheduler   Lagrange polynomial in log sigma of eps (Zhang & Chen 2023, "logrho")
    unipc  UniPCMultistepScheduler  predictor-corrector on x0 in lambda = -log sigma (Zhao et al. 2023)

The contract (state, sigmas, callback, noise) is the one in ``samplers``.
"""

from __future__ import annotations

import math

import torch

from .sampler_parts import _ab, _check_choice, _check_order, _done, _finite, _levels, _ve

# 3-point Gauss-Legendre on [-1, 1]: exact for polynomials up to degree 5 (LMS integrates degree <= 3)
_GAUSS = ((-math.sqrt(0.6), 5 / 9), (0.0, 8 / 9), (math.sqrt(0.6), 5 / 9))


def _lms_coefficient(lv: list[float], i: int, order: int, j: int) -> float:
    """Integral from lv[i] to lv[i + 1] of the Lagrange basis polynomial through lv[i], ..., lv[i - order + 1]
    that is 1 at lv[i - j] (diffusers' / k-diffusion's ``linear_multistep_coeff``, there by quadrature)."""
    def basis(tau):
        prod = 1.0
        for k in range(order):
            if k != j:
                prod *= (tau - lv[i - k]) / (lv[i - j] - lv[i - k])
        return prod

    a, b = lv[i], lv[i + 1]
    return (b - a) / 2 * sum(w * basis((b - a) / 2 * u + (a + b) / 2) for u, w in _GAUSS)


def sample_lms(denoise, x, sigmas, *, generator=None, callback=None, order: int = 4):
    """Linear multistep (k-diffusion's sample_lms, diffusers' LMSDiscreteScheduler): Adams-Bashforth of
    order up to ``order`` in sigma on the derivatives d = (x - D) / sigma of the last steps."""
    _check_order("order", order, 4)
    lv = _levels(sigmas)
    _finite(lv, "lms")
    x = x * _ve(lv[0])
    ds: list[torch.Tensor] = []
    for i in range(len(lv) - 1):
        x0 = denoise(x / _ve(lv[i]), lv[i])
        ds = (ds + [(x - x0) / lv[i]])[-order:]
        cur = min(i + 1, order)
        x = x + sum(_lms_coefficient(lv, i, cur, j) * d for j, d in enumerate(reversed(ds)))
        x = _done(callback, i, lv[i + 1], x, x0, 1 / _ve(lv[i + 1]))
    return x / _ve(lv[-1])


# ---------------------------------------------------------------- PNDM / PLMS


def _eps(x, x0, sigma):
    a, s = _ab(sigma)
    return (x - a * x0) / s


def _output(x, x0, sigma, variable):
    """What PNDM extrapolates: eps, or v = a eps - s x0, of state x at sigma with denoised estimate x0."""
    e = _eps(x, x0, sigma)
    if variable == "eps":
        return e
    a, s = _ab(sigma)
    return a * e - s * x0


def _transfer(x, sigma, sigma_next, m, variable="eps"):
    """DDIM's step (PNDM's eq. 9) with a given eps -- or v, read as eps at the step's start: a v + s x:
    x' = a' (x - s eps) / a + s' eps."""
    (a, s), (a_n, s_n) = _ab(sigma), _ab(sigma_next)
    eps = m if variable == "eps" else a * m + s * x
    return (a_n / a) * (x - s * eps) + s_n * eps


def _adams_bashforth(ets: list) -> torch.Tensor:
    if len(ets) == 1:
        return ets[-1]
    if len(ets) == 2:
        return (3 * ets[-1] - ets[-2]) / 2
    if len(ets) == 3:
        return (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
    return (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4]) / 24


def sample_pndm(denoise, x, sigmas, *, generator=None, callback=None, skip_prk_steps: bool = True,
                variable: str = "eps"):
    """Pseudo linear multistep (Liu et al. 2022; diffusers' PNDMScheduler): fourth-order Adams-Bashforth on
    eps, each step DDIM's transfer. ``skip_prk_steps`` (Stable Diffusion's configs; AUTOMATIC1111's PLMS)
    starts with a pseudo improved Euler step (one extra evaluation at the next level) and lower orders;
    without it three Runge-Kutta steps start it (4 evaluations each), and ``sigmas`` holds their midpoints
    interleaved (``plan``'s "pndm" grid): [s0, m0, s1, m1, s2, m2, s3, s4, ...]. A tail of that plan
    (img2img) is read the same way: its first six intervals are three Runge-Kutta steps.
    ``variable="v"`` extrapolates v = a eps - s x0 instead, converted to eps at each step's start (what
    diffusers does for v-prediction models; well conditioned where eps is not, near zero SNR)."""
    _check_choice("variable", variable, ("eps", "v"))
    lv = _levels(sigmas)
    _finite(lv, "pndm")
    out_at = lambda y, sigma: _output(y, denoise(y, sigma), sigma, variable)  # noqa: E731
    ets, pos, step = [], 0, 0
    if not skip_prk_steps:
        if len(lv) < 8:
            raise ValueError(f"{len(lv) - 4} steps: PNDM's Runge-Kutta warmup needs a plan of at least 4 steps "
                             "from its start (skip_prk_steps=True runs any tail)")
        for step in range(3):
            s0, sm, s1 = lv[pos], lv[pos + 1], lv[pos + 2]
            x0 = denoise(x, s0)
            m1 = _output(x, x0, s0, variable)
            m2 = out_at(_transfer(x, s0, sm, m1, variable), sm)
            m3 = out_at(_transfer(x, s0, sm, m2, variable), sm)
            m4 = out_at(_transfer(x, s0, s1, m3, variable), s1)
            ets.append(m1)
            x = _done(callback, step, s1, _transfer(x, s0, s1, (m1 + 2 * m2 + 2 * m3 + m4) / 6, variable), x0)
            pos += 2
        step += 1
    for i in range(pos, len(lv) - 1):
        s, s_n = lv[i], lv[i + 1]
        x0 = denoise(x, s)
        m = _output(x, x0, s, variable)
        if not ets and i + 2 < len(lv):  # pseudo improved Euler: average with the Euler prediction's
            m_next = out_at(_transfer(x, s, s_n, m, variable), s_n)
            ets, use = [m], (m + m_next) / 2
        else:
            ets = (ets + [m])[-4:]
            use = _adams_bashforth(ets)
        x = _done(callback, step, s_n, _transfer(x, s, s_n, use, variable), x0)
        step += 1
    return x


# ---------------------------------------------------------------- DEIS


def _log(v: float) -> float:
    return math.log(v) if v > 0 else -math.inf


def _deis_ind2(t, b, c):
    """Integral to t of the degree-1 Lagrange basis in log rho through (b: 1, c: 0) (diffusers' ind_fn)."""
    return 0.0 if t == 0 else t * (-_log(c) + _log(t) - 1) / (_log(b) - _log(c))


def _deis_ind3(t, b, c, d):
    if t == 0:
        return 0.0
    lt, lc, ld = _log(t), _log(c), _log(d)
    num = t * (lc * (ld - lt + 1) - ld * lt + ld + lt**2 - 2 * lt + 2)
    return num / ((_log(b) - lc) * (_log(b) - ld))


def sample_deis(denoise, x, sigmas, *, generator=None, callback=None, solver_order: int = 2,
                lower_order_final: bool = True):
    """DEIS-logrho multistep (Zhang & Chen 2023; diffusers' DEISMultistepScheduler): in x0 + rho eps
    (rho = sigma), eps extrapolated by its Lagrange polynomial in log rho through the last ``solver_order``
    levels and integrated exactly over [rho, rho']. Orders rise from 1; with fewer than 15 steps the last
    two steps drop to orders 1 and 2 (``lower_order_final``, diffusers' rule)."""
    _check_order("solver_order", solver_order, 3)
    lv = _levels(sigmas)
    _finite(lv, "deis")
    n = len(lv) - 1
    x = x * _ve(lv[0])
    hist: list[tuple[float, torch.Tensor]] = []
    for i in range(n):
        r, r_n = lv[i], lv[i + 1]
        x0 = denoise(x / _ve(r), r)
        hist = (hist + [(r, (x - x0) / r)])[-solver_order:]
        order = min(solver_order, i + 1)
        if lower_order_final and n < 15:
            order = 1 if i == n - 1 else min(order, 2) if i == n - 2 else order
        (r0, m0), rs = hist[-1], [h[0] for h in hist]
        if order == 1:
            x = x + (r_n - r0) * m0
        elif order == 2:
            r1, m1 = hist[-2]
            c1 = _deis_ind2(r_n, r0, r1) - _deis_ind2(r0, r0, r1)
            c2 = _deis_ind2(r_n, r1, r0) - _deis_ind2(r0, r1, r0)
            x = x + c1 * m0 + c2 * hist[-2][1]
        else:
            r1, r2 = rs[-2], rs[-3]
            c1 = _deis_ind3(r_n, r0, r1, r2) - _deis_ind3(r0, r0, r1, r2)
            c2 = _deis_ind3(r_n, r1, r2, r0) - _deis_ind3(r0, r1, r2, r0)
            c3 = _deis_ind3(r_n, r2, r0, r1) - _deis_ind3(r0, r2, r0, r1)
            x = x + c1 * m0 + c2 * hist[-2][1] + c3 * hist[-3][1]
        x = _done(callback, i, r_n, x, x0, 1 / _ve(r_n))
    return x / _ve(lv[-1])


# ---------------------------------------------------------------- UniPC


def _lam(sigma: float) -> float:
    """lambda = log(alpha / sigma_vp) = -log sigma (inf at sigma 0, -inf at sigma inf)."""
    return -_log(sigma) if not math.isinf(sigma) else -math.inf


def _unipc(x, ms, lams, sigma, sigma_n, order, solver_type, x0_next=None):
    """One UniP (``x0_next`` None) or UniC step of the B(h) family in the data prediction, from x at
    ``sigma`` (its denoised estimate ms[-1], earlier ones before it) to ``sigma_n``; UniC also uses the
    estimate at sigma_n. diffusers' multistep_uni_p_bh_update / multistep_uni_c_bh_update."""
    (_, s), (a_n, s_n) = _ab(sigma), _ab(sigma_n)
    m0 = ms[-1]
    if sigma_n == 0:  # the limit of every order: the denoised estimate
        return m0
    h = _lam(sigma_n) - _lam(sigma)
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k, factorial = h_phi_1 / hh - 1, 1
    b_h = hh if solver_type == "bh1" else math.expm1(hh)
    rks = [(lams[-1 - k] - lams[-1]) / h for k in range(1, order)] + [1.0]
    d1s = [(ms[-1 - k] - m0) / rks[k - 1] for k in range(1, order)]
    R, b = [], []
    for i in range(1, order + 1):
        R.append([r ** (i - 1) for r in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    x_lin = (s_n / s) * x - a_n * h_phi_1 * m0
    if x0_next is None:  # predictor
        if not d1s:
            return x_lin
        rhos = [0.5] if order == 2 else _solve([r[:-1] for r in R[:-1]], b[:-1])
        return x_lin - a_n * b_h * sum(rho * d for rho, d in zip(rhos, d1s))
    rhos = [0.5] if order == 1 else _solve(R, b)
    res = sum((rho * d for rho, d in zip(rhos[:-1], d1s)), torch.zeros_like(x)) + rhos[-1] * (x0_next - m0)
    return x_lin - a_n * b_h * res


def _solve(R, b) -> list[float]:
    return torch.linalg.solve(torch.tensor(R, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)).tolist()


def sample_unipc(denoise, x, sigmas, *, generator=None, callback=None, solver_order: int = 2,
                 solver_type: str = "bh2", lower_order_final: bool = True, disable_corrector=()):
    """UniPC (Zhao et al. 2023; diffusers' UniPCMultistepScheduler with predict_x0): a UniP predictor of
    order ``solver_order`` (rising from 1; the last steps lower with ``lower_order_final``), then, once the
    network has seen the predicted state, a UniC corrector of the step just taken -- one evaluation per step.
    The callback sees the predicted state (what diffusers' step returns); the next step corrects it.
    ``disable_corrector``: step indices whose state is not corrected."""
    _check_order("solver_order", solver_order, 3)
    _check_choice("solver_type", solver_type, ("bh1", "bh2"))
    lv = _levels(sigmas)
    n = len(lv) - 1
    ms, lams, last_x, last_order = [], [], None, 1
    for i in range(n):
        x0 = denoise(x, lv[i])
        if i > 0 and (i - 1) not in disable_corrector:
            x = _unipc(last_x, ms, lams, lv[i - 1], lv[i], last_order, solver_type, x0_next=x0)
        ms, lams = (ms + [x0])[-solver_order:], (lams + [_lam(lv[i])])[-solver_order:]
        order = min(solver_order, n - i) if lower_order_final else solver_order
        last_x, last_order = x, min(order, i + 1)
        x = _done(callback, i, lv[i + 1], _unipc(x, ms, lams, lv[i], lv[i + 1], last_order, solver_type), x0)
    return x
