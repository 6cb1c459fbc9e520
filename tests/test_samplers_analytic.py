"""Samplers against closed form: Gaussian data has an exact denoiser and an exact ODE solution.

Data x0 ~ N(mu_d, s_d^2) independently per dimension d. With x_t = a x0 + sigma eps:
    E[x0 | x_t] = mu + a s^2 / (a^2 s^2 + sigma^2) (x_t - a mu)
(the optimal denoiser; the samplers get it through ``Denoiser`` from the optimal network of each
prediction type, so the wrapper is tested on the way). The probability-flow ODE between Gaussians is
linear, so its solution from x_T is the monotone affine map
    x0* = mu + s (x_T - a_T mu) / sqrt(a_T^2 s^2 + sigma_T^2).
Every sampler must recover the data mean/std from 4096 samples (tolerance: 4 standard errors + a
discretisation allowance); deterministic samplers must converge to x0* as steps grow, Euler at first order
and Heun / DPM-Solver++(2M) at second order. Run with -s to print the errors and ratios.
"""

from __future__ import annotations

import pytest
import torch

from ldmkit.diffusion import (SAMPLERS, DiscreteSchedule, FlowSchedule, convert, noise_to, plan,
                              sample, sampler_names)

N, D = 4096, 4
MU = torch.linspace(-1.0, 1.0, D, dtype=torch.float64).reshape(1, D, 1, 1)
SD = torch.linspace(0.5, 1.5, D, dtype=torch.float64).reshape(1, D, 1, 1)  # like scaled SD latents


def optimal_network(schedule, prediction):
    """The Bayes-optimal network of a prediction type: sees x_in = a x0 + sigma eps at timestep t."""
    def network(x, t):
        assert t.shape == (x.shape[0],) and (t == t[0]).all()
        t = t[0].double()  # one level per call: scalar coefficients keep this test fast
        if isinstance(schedule, FlowSchedule):
            a, sg = 1 - t / schedule.num_train_timesteps, t / schedule.num_train_timesteps
        else:
            a, sg = schedule.alpha_sigma(t)
        x0 = MU + a * SD**2 / (a**2 * SD**2 + sg**2) * (x - a * MU)
        return convert(x0, "x0", prediction, x, a, sg)

    return network


def start_state(schedule, sigma0, seed=0):
    """Exact marginal at the first level: x_T = noise_to(x0 ~ data, eps, sigma0)."""
    g = torch.Generator().manual_seed(seed)
    x0 = MU + SD * torch.randn(N, D, 1, 1, generator=g, dtype=torch.float64)
    return noise_to(x0, torch.randn(N, D, 1, 1, generator=g, dtype=torch.float64), sigma0)


def _a_sigma(schedule, level):
    """(alpha, sigma) of the samplers' VP state at k-sigma ``level``."""
    if level == float("inf"):
        return 0.0, 1.0
    return 1 / (1 + level**2) ** 0.5, level / (1 + level**2) ** 0.5


def exact_solution(schedule, x_T, p):
    """Exact ODE transport from p.sigmas[0] to the last nonzero level, then the exact denoiser.

    Every deterministic sampler here ends with x0_pred at its last nonzero level (the step to sigma 0 is
    the denoised estimate), so this isolates the ODE integration error, which must vanish at the method's
    order. (The data themselves are only recovered up to that last level's noise; see the moments test.)
    """
    a0, s0 = _a_sigma(schedule, float(p.sigmas[0]))
    a1, s1 = _a_sigma(schedule, float(p.sigmas[-2]))
    std0, std1 = (a0**2 * SD**2 + s0**2) ** 0.5, (a1**2 * SD**2 + s1**2) ** 0.5
    x1 = a1 * MU + std1 * (x_T - a0 * MU) / std0
    return MU + a1 * SD**2 / std1**2 * (x1 - a1 * MU)


SD15 = DiscreteSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
SD15_EPS, SD15_V = (SD15, "eps"), (SD15, "v")  # (schedule, prediction) pairs


def _run(name, case, steps, seed=0, start=0, level=None, **opts):
    schedule, prediction = case
    p = plan(name, schedule, steps)
    x_T = start_state(schedule, float(p.sigmas[start] if level is None else level), seed)
    g = torch.Generator().manual_seed(seed + 1)
    out = sample(name, optimal_network(schedule, prediction), x_T, schedule, prediction, steps, start=start,
                 generator=g, **opts)
    return x_T, out, p


# every registered sampler on its own grid, and DPM++ 2M on Karras' (the other sigma kinds: test_samplers_new);
# the samplers of issue 23 with eps only (the prediction types meet them through the same Denoiser); LCM needs
# a consistency function rather than a denoiser (test_samplers_new)
NEW = ("pndm", "lms", "dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_sde", "unipc", "deis")
CASES = [(name, case, opts) for name in sampler_names(kinds=False) + ["dpmpp_2m_karras"]
         if not name.startswith("flow_") and name != "lcm"
         for case in ((SD15_EPS,) if name in NEW else (SD15_EPS, SD15_V))
         for opts in ([{}, {"eta": 1.0}] if name == "ddim" else [{}])]
CASES += [(name, (FlowSchedule(shift=s), "flow"), {}) for name in ("flow_euler", "flow_heun") for s in (1.0, 3.0)]


@pytest.mark.parametrize("name,schedule,opts", CASES,
                         ids=[f"{n}-{c[1]}{'-eta1' if o else ''}" for n, c, o in CASES])
def test_sampler_recovers_gaussian_moments(name, schedule, opts):
    # Ancestral samplers draw x_prev from q(x_prev | x_t, x0_pred), which ignores Var[x0 | x_t]: they
    # under-disperse by O(step size) (Bao et al. 2022) -- 50 steps lose ~5% of the std here -- so they get
    # 250 steps; the deterministic ones follow the ODE and need 50.
    stochastic = name in ("ddpm", "euler_a") or opts.get("eta", 0) > 0
    steps = 250 if stochastic else 50
    _, out, _ = _run(name, schedule, steps, **opts)
    mean, std = out.mean(dim=(0, 2, 3)), out.std(dim=(0, 2, 3))
    mu, sd = MU.flatten(), SD.flatten()
    se_mean, se_std = sd / N**0.5, sd / (2 * N) ** 0.5
    # 4 standard errors of the estimate + 0.02 for discretisation: 50 steps, and the samplers stop at the
    # denoised estimate of their last level (DPM-Solver's is t=20, sigma 0.13: shrinks the std by ~1-2%)
    assert ((mean - mu).abs() <= 4 * se_mean + 0.02).all(), f"{name}: mean {mean} vs {mu}"
    assert ((std - sd).abs() <= 4 * se_std + 0.02).all(), f"{name}: std {std} vs {sd}"


def ode_error(name, schedule, steps):
    x_T, out, p = _run(name, schedule, steps)
    return (out - exact_solution(schedule, x_T, p)).abs().max().item()


@pytest.mark.parametrize("schedule", [SD15_EPS, SD15_V, (FlowSchedule(shift=3.0), "flow")], ids=["eps", "v", "flow"])
def test_deterministic_samplers_converge_and_second_order_beats_euler(schedule):
    flow = isinstance(schedule[0], FlowSchedule)
    names = ("flow_euler", "flow_heun") if flow else ("ddim", "euler", "heun", "dpmpp_2m")
    grid = (5, 10, 20, 40)
    err = {n: [ode_error(n, schedule, k) for k in grid] for n in names}
    for n in names:
        print(f"{schedule[1]:4s} {n:10s} max|x - x0*| at steps {grid}: "
              + ", ".join(f"{e:.2e}" for e in err[n])
              + f"; ratio err(20)/err(40) = {err[n][2] / err[n][3]:.2f}")
    euler = "flow_euler" if flow else "euler"
    # first order: halving the step halves the error; second order (Heun): quarters it
    for n in (euler, "flow_heun" if flow else "heun") + (() if flow else ("ddim",)):
        assert all(a > b for a, b in zip(err[n], err[n][1:])), f"{n} does not converge: {err[n]}"
    assert 1.6 < err[euler][2] / err[euler][3] < 2.6
    heun = "flow_heun" if flow else "heun"
    assert err[heun][2] / err[heun][3] > 3.0, f"{heun} is not second order: {err[heun]}"
    if not flow:
        # DDIM is the exact exponential integrator of the same ODE in (sigma, x/alpha): Euler in disguise
        torch.testing.assert_close(torch.tensor(err["ddim"]), torch.tensor(err["euler"]), rtol=0.05, atol=0)
        # DPM-Solver++(2M) is second order in the middle of the trajectory, but on diffusers' uniform-t grid
        # its last step always spans sigma ratio ~sqrt(2) (t from 2T/n to T/n), so the total error decays
        # slower than 1/n^2 (ratios ~1.8); it is still far below Euler's at every step count >= 10.
        dpm = err["dpmpp_2m"]
        assert dpm[-1] < dpm[0] / 10, f"dpmpp_2m does not converge: {dpm}"
        assert all(d < e / 5 for d, e in zip(dpm[1:], err[euler][1:])), f"dpmpp_2m not better than euler: {dpm}"
    for n in ((heun,) if flow else (heun, "dpmpp_2m")):
        print(f"{schedule[1]:4s} error ratio {euler}/{n} at steps {grid}: "
              + ", ".join(f"{e / h:.1f}" for e, h in zip(err[euler], err[n])))
        assert err[n][2] < err[euler][2] / 5, f"{n} not clearly better than {euler} at 20 steps"


# ---------------------------------------------------------------- img2img start and callback contract


def _exact_from(schedule, x_start, level, last_level):
    a0, s0 = _a_sigma(schedule, level)
    a1, s1 = _a_sigma(schedule, last_level)
    std0, std1 = (a0**2 * SD**2 + s0**2) ** 0.5, (a1**2 * SD**2 + s1**2) ** 0.5
    x1 = a1 * MU + std1 * (x_start - a0 * MU) / std0
    return MU + a1 * SD**2 / std1**2 * (x1 - a1 * MU)


@pytest.mark.parametrize("name,schedule", [("heun", SD15_EPS), ("dpmpp_2m_karras", SD15_V), ("dpmpp_2m", SD15_EPS),
                                           ("flow_heun", (FlowSchedule(shift=3.0), "flow"))])
def test_img2img_start_level_is_consistent(name, schedule):
    """Starting at `start` from x0 noised to plan.sigmas[start] follows the exact ODE from that level;
    the same run started from the neighbouring level is clearly worse (so a level off by one fails).
    Second-order samplers only: Euler's own error at 40 steps (~0.1) would hide an off-by-one level."""
    from ldmkit.diffusion import img2img_start

    steps = 40
    start = img2img_start(steps, 0.5)
    p = plan(name, schedule[0], steps)
    errs = []
    for lvl in (p.sigmas[start], p.sigmas[start + 1]):
        x_T, out, _ = _run(name, schedule, steps, start=start, level=float(lvl))
        exact = _exact_from(schedule, x_T, float(lvl), float(p.sigmas[-2]))
        errs.append((out - exact).abs().max().item())
    print(f"{name}: img2img error {errs[0]:.2e}, with the level off by one {errs[1]:.2e}")
    assert errs[0] < 0.03 and errs[1] > 3 * errs[0]


@pytest.mark.parametrize("name", sampler_names(kinds=False) + ["dpmpp_2m_karras", "unipc_beta"])
def test_callback_replaces_state(name):
    case = (FlowSchedule(), "flow") if name.startswith("flow_") else SD15_EPS
    net = optimal_network(*case)
    x_T = start_state(case[0], float(plan(name, case[0], 6).sigmas[0]))[:8]
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731

    def run(callback=None):
        return sample(name, net, x_T, case[0], case[1], 6, generator=g(), callback=callback)

    plain = run()
    seen = []
    same = run(lambda i, s, x, x0: seen.append((i, s)) or x.clone())
    torch.testing.assert_close(same, plain, rtol=1e-12, atol=1e-12)
    assert [i for i, _ in seen] == list(range(6)) and seen[-1][1] == float(plan(name, case[0], 6).sigmas[-1])
    last = run(lambda i, s, x, x0: torch.full_like(x, 0.123) if i == 5 else None)
    torch.testing.assert_close(last, torch.full_like(last, 0.123), rtol=1e-12, atol=0)  # (via x0 + sigma eps)


@pytest.mark.parametrize("name", [n for n, s in SAMPLERS.items() if s.stochastic] + ["ddim"])
def test_per_image_generators_make_an_image_independent_of_its_batch(name):
    """Image k drawn with generator k is the same alone or in a batch with other images' generators."""
    case = SD15_EPS
    net = optimal_network(*case)
    x_T = start_state(case[0], float(plan(name, case[0], 8).sigmas[0]))[:3]
    opts = {"eta": 1.0} if name == "ddim" else {}
    batch = sample(name, net, x_T, case[0], case[1], 8,
                   generator=[torch.Generator().manual_seed(s) for s in (7, 8, 9)], **opts)
    alone = sample(name, net, x_T[1:2], case[0], case[1], 8, generator=[torch.Generator().manual_seed(8)], **opts)
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=1e-12)
    other = sample(name, net, x_T[1:2], case[0], case[1], 8, generator=[torch.Generator().manual_seed(1)], **opts)
    assert (other - alone).abs().max() > 1e-3  # the generator does matter
