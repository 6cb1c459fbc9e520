"""Stochastic samplers beyond the ancestral ones: DPM-Solver++ SDE (2M, 3M, the two-stage "SDE") and LCM's
multistep consistency sampling (registered in ``samplers.SAMPLERS``).

    dpmpp_2m_sde  DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")        (Lu et al. 2022)
    dpmpp_3m_sde  k-diffusion's sample_dpmpp_3m_sde (AUTOMATIC1111's "DPM++ 3M SDE")
    dpmpp_sde     DPMSolverSDEScheduler / k-diffusion's sample_dpmpp_sde, r = 1/2
    lcm           LCMScheduler (Luo et al. 2023)

Noise comes from the per-image generators (``samplers``: row k from generator k). dpmpp_sde draws two
normals per step and makes of them the two Brownian increments its stages need -- over [sigma', sigma]
and over its half [sigma_mid, sigma] -- with their exact joint law (what diffusers' and k-diffusion's
torchsde BrownianTree gives, from other random numbers).
"""

from __future__ import annotations

import math

from .sampler_parts import _ab, _check_choice, _done, _finite, _levels, _randn, _ve


def sample_dpmpp_2m_sde(denoise, x, sigmas, *, generator=None, callback=None, solver_type: str = "midpoint"):
    """DPM-Solver++(2M) SDE with eta = 1 (diffusers' sde-dpmsolver++ order 2, k-diffusion's
    sample_dpmpp_2m_sde): x' = (s'/s) e^-h x + a' (1 - e^-2h) D + s' sqrt(1 - e^-2h) z, h = log(sigma /
    sigma'), D = x0 + (x0 - x0_prev) / (2r) ("midpoint") or the Heun weight of that difference; first order
    on the first step, the denoised estimate on a step to sigma 0."""
    _check_choice("solver_type", solver_type, ("midpoint", "heun"))
    lv = _levels(sigmas)
    x0_prev = h_prev = None
    for i in range(len(lv) - 1):
        x0 = denoise(x, lv[i])
        if lv[i + 1] == 0:
            x = x0
        else:
            (_, s), (a_n, s_n) = _ab(lv[i]), _ab(lv[i + 1])
            h = math.log(lv[i]) - math.log(lv[i + 1])
            one = -math.expm1(-2 * h)  # 1 - e^-2h
            x_new = (s_n / s * math.exp(-h)) * x + a_n * one * x0
            if x0_prev is not None:
                d1 = (x0 - x0_prev) * (h / h_prev)
                weight = 0.5 * one if solver_type == "midpoint" else (one / (-2 * h) + 1)
                x_new = x_new + a_n * weight * d1
            x = x_new + s_n * math.sqrt(one) * _randn(x, generator)
            h_prev = h
        x0_prev = x0
        x = _done(callback, i, lv[i + 1], x, x0)
    return x


def sample_dpmpp_3m_sde(denoise, x, sigmas, *, generator=None, callback=None):
    """DPM-Solver++(3M) SDE with eta = 1, k-diffusion's sample_dpmpp_3m_sde (AUTOMATIC1111's DPM++ 3M SDE):
    the 2M SDE step with a third-order multistep correction phi_2 d1 - phi_3 d2 (h_eta = 2h). diffusers'
    sde-dpmsolver++ at solver_order 3 differs in one sign: it adds alpha' (phi_3-like - 0.5) D2 where the
    exact term is + 0.5 (its D2 weight is O(1) instead of O(h)); this is the exact one."""
    lv = _levels(sigmas)
    x0_1 = x0_2 = h_1 = h_2 = None
    for i in range(len(lv) - 1):
        x0 = denoise(x, lv[i])
        h = None
        if lv[i + 1] == 0:
            x = x0
        else:
            (_, s), (a_n, s_n) = _ab(lv[i]), _ab(lv[i + 1])
            h = math.log(lv[i]) - math.log(lv[i + 1])
            he = 2 * h
            one = -math.expm1(-he)
            det = (s_n / s * math.exp(-h)) * x + a_n * one * x0
            phi_2 = math.expm1(-he) / he + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (x0 - x0_1) / r0, (x0_1 - x0_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                det = det + a_n * (phi_2 * d1 - (phi_2 / he - 0.5) * d2)
            elif h_1 is not None:
                det = det + a_n * phi_2 * (x0 - x0_1) / (h_1 / h)
            x = det + s_n * math.sqrt(one) * _randn(x, generator)
        x0_1, x0_2, h_1, h_2 = x0, x0_1, h, h_1
        x = _done(callback, i, lv[i + 1], x, x0)
    return x


def _ancestral(sigma: float, sigma_next: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step with eta = 1 (k-diffusion's get_ancestral_step)."""
    up = min(sigma_next, (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - up**2) ** 0.5, up


def sample_dpmpp_sde(denoise, x, sigmas, *, generator=None, callback=None, s_noise: float = 1.0):
    """DPM-Solver++ SDE (k-diffusion's sample_dpmpp_sde with eta = 1, r = 1/2; diffusers'
    DPMSolverSDEScheduler): an ancestral exponential-integrator step to the midpoint sigma_mid =
    sqrt(sigma sigma'), the network there, then the full ancestral step with that estimate; the noise of the
    two stages is the Brownian motion's over [sigma_mid, sigma] and [sigma', sigma] (see the module).
    2 n - 1 network evaluations for n steps; the step to sigma 0 is Euler's (the denoised estimate)."""
    lv = _levels(sigmas)
    _finite(lv, "dpmpp_sde")
    x = x * _ve(lv[0])
    for i in range(len(lv) - 1):
        s, s_n = lv[i], lv[i + 1]
        x0 = denoise(x / _ve(s), s)
        if s_n == 0:
            x = x0
        else:
            s_mid = math.exp((math.log(s) + math.log(s_n)) / 2)
            z1, z2 = _randn(x, generator), _randn(x, generator)
            l1, l2 = s - s_mid, s_mid - s_n
            down, up = _ancestral(s, s_mid)
            x2 = (down / s) * x + (1 - down / s) * x0 + (s_noise * up) * z1
            x0_mid = denoise(x2 / _ve(s_mid), s_mid)
            down, up = _ancestral(s, s_n)
            noise = (math.sqrt(l1) * z1 + math.sqrt(l2) * z2) / math.sqrt(l1 + l2)
            x = (down / s) * x + (1 - down / s) * x0_mid + (s_noise * up) * noise
        x = _done(callback, i, s_n, x, x0, 1 / _ve(s_n))
    return x / _ve(lv[-1])


def sample_lcm(denoise, x, sigmas, *, generator=None, callback=None):
    """Multistep consistency sampling (LCMScheduler): the denoised estimate, noised afresh to the next level,
    x' = a' x0 + s' z; the last step returns the estimate. The network's boundary condition c_skip(t) x +
    c_out(t) x0 is left out: at LCM's timesteps (t >= 19 on SD's 50-step distillation grid) c_skip <= 7e-6."""
    lv = _levels(sigmas)
    for i in range(len(lv) - 1):
        x0 = denoise(x, lv[i])
        a_n, s_n = _ab(lv[i + 1])
        x = x0 if s_n == 0 else a_n * x0 + s_n * _randn(x, generator)
        x = _done(callback, i, lv[i + 1], x, x0)
    return x
