"""The samplers of issue 23 against diffusers, step by step: PNDM / PLMS, LMS, UniPC, DEIS, DPM++ 2M SDE,
DPM++ 3M SDE, DPM++ SDE, LCM, and the Karras / exponential / beta sigmas of every sigma-based sampler.

The harness is test_samplers_parity's: SD's schedule, the same fake network (deterministic, nonlinear in
x and t), the same initial state and generator seed; after every step our state (the callback's, in the
VP variable) must equal diffusers' state converted to it, within
    max |ours - theirs| <= TOL * max(1, max |theirs|)     TOL = 1e-5 (float32-sized, relative)
Where diffusers does something the sampler deliberately does not (written next to each case), the case
either gives diffusers the corrected value (and the test says what) or is measured and bounded instead.
Stochastic samplers get the same generator; DPM++ SDE's Brownian-tree noise is replaced, in diffusers, by
the increments ldmkit makes from that generator (both have the Brownian law: tested separately).
Run with -s to print the deviations.
"""
from __future__ import annotations

import inspect
import math
import warnings
from collections import defaultdict

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ldmkit.diffusion import DiscreteSchedule, plan, sample  # noqa: E402
from ldmkit.diffusion.samplers import SAMPLERS, resolve_sampler, sampler_names, with_sigmas  # noqa: E402
from test_samplers_parity import SD, SHAPE, fake_model  # noqa: E402

TOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
S = diffusers.schedulers
MAX_REL: dict[str, float] = defaultdict(float)


class Fixed3MSDE(S.DPMSolverMultistepScheduler):
    """diffusers' sde-dpmsolver++ third-order update with the D2 term's "- 0.5" made "+ 0.5", as in
    k-diffusion's sample_dpmpp_3m_sde (the exact exponential-integrator weight; see samplers_sde)."""

    def multistep_dpm_solver_third_order_update(self, model_output_list, *args, sample=None, noise=None, **kw):
        x = super().multistep_dpm_solver_third_order_update(model_output_list, *args, sample=sample, noise=noise,
                                                            **kw)
        i = self.step_index
        ab = [self._sigma_to_alpha_sigma_t(self.sigmas[k]) for k in (i + 1, i, i - 1, i - 2)]
        lam = [torch.log(a) - torch.log(s) for a, s in ab]
        h, h0, h1 = lam[0] - lam[1], lam[1] - lam[2], lam[2] - lam[3]
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        r0, r1 = h0 / h, h1 / h
        d2 = ((m0 - m1) / r0 - (m1 - m2) / r1) / (r0 + r1)
        return x + ab[0][0] * d2


class SameNoise:
    """Stands in for DPMSolverSDEScheduler's BrownianTreeNoiseSampler: the increments sample_dpmpp_sde makes
    from its generator -- two normals per step, z1 for the half step, the Brownian combination for the full."""

    def __init__(self, seed: int, shape=SHAPE):
        self.g, self.shape, self.half = torch.Generator().manual_seed(seed), shape, None

    def __call__(self, sigma, sigma_next):
        if self.half is None:
            z1, z2 = torch.randn(self.shape, generator=self.g), torch.randn(self.shape, generator=self.g)
            self.half = (float(sigma), float(sigma_next), z1, z2)
            return z1
        s, mid, z1, z2 = self.half
        self.half = None
        l1, l2 = s - mid, mid - float(sigma_next)
        return (l1**0.5 * z1 + l2**0.5 * z2) / (l1 + l2) ** 0.5


# name -> (sampler, diffusers scheduler, its extra config, our options, which of its step outputs are steps)
SPECS = {
    "lms": ("lms", S.LMSDiscreteScheduler, {}, {}, None),
    "plms": ("pndm", S.PNDMScheduler, {"skip_prk_steps": True}, {}, "plms"),
    "pndm_prk": ("pndm", S.PNDMScheduler, {"skip_prk_steps": False}, {"skip_prk_steps": False}, "prk"),
    "unipc": ("unipc", S.UniPCMultistepScheduler, {}, {}, None),
    "unipc_order3": ("unipc", S.UniPCMultistepScheduler, {"solver_order": 3}, {"solver_order": 3}, None),
    "unipc_bh1": ("unipc", S.UniPCMultistepScheduler, {"solver_type": "bh1"}, {"solver_type": "bh1"}, None),
    "deis": ("deis", S.DEISMultistepScheduler, {}, {}, None),
    "deis_order3": ("deis", S.DEISMultistepScheduler, {"solver_order": 3}, {"solver_order": 3}, None),
    "dpmpp_2m_sde": ("dpmpp_2m_sde", S.DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}, {}, None),
    "dpmpp_2m_sde_heun": ("dpmpp_2m_sde", S.DPMSolverMultistepScheduler,
                          {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}, {"solver_type": "heun"}, None),
    "dpmpp_3m_sde": ("dpmpp_3m_sde", Fixed3MSDE, {"algorithm_type": "sde-dpmsolver++", "solver_order": 3,
                                                  "solver_type": "heun", "lower_order_final": False}, {}, None),
    "dpmpp_sde": ("dpmpp_sde", S.DPMSolverSDEScheduler, {}, {}, None),
    "lcm": ("lcm", S.LCMScheduler, {}, {}, None),
    "euler": ("euler", S.EulerDiscreteScheduler, {}, {}, None),
    "heun": ("heun", S.HeunDiscreteScheduler, {}, {}, None),
    "dpmpp_2m": ("dpmpp_2m", S.DPMSolverMultistepScheduler, {}, {}, None),
}
# DEIS-3's coefficients are differences of near-equal logs: diffusers' float32 loses ~2e-5 relative in them
# (float64 sigmas there: 5e-7), so it runs in float64 for that case
F64_REFERENCE = {"deis_order3"}
VE_STATE = {"lms", "dpmpp_sde", "euler", "heun"}  # diffusers keeps x0 + sigma eps for these
KIND_FLAGS = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas", "beta": "use_beta_sigmas"}


def run_diffusers(ref, steps, x, seed, select, first_t=None, noise=None, f64=False):
    ref.set_timesteps(steps)
    if f64:  # its sigma table and state in float64
        ref.sigmas, x = ref.sigmas.double(), x.double()
    if first_t is not None:
        ref.timesteps[0] = first_t
    if noise is not None:
        ref.noise_sampler = noise
    g = torch.Generator().manual_seed(seed)
    states = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k, t in enumerate(ref.timesteps):
            out = fake_model(ref.scale_model_input(x, t), t)
            kw = {"generator": g} if "generator" in inspect.signature(ref.step).parameters else {}
            x = ref.step(out, t, x, **kw).prev_sample
            # DPM++ SDE / Heun: a step ends after its second call, or with the last (Euler) one
            if getattr(ref, "state_in_first_order", True) or k == len(ref.timesteps) - 1:
                states.append(x)
    if select == "plms":  # the first call returns the Euler predictor; the second, the corrected first step
        return states[1:]
    if select == "prk":  # three Runge-Kutta steps of four calls each, then one call per step
        return [states[3], states[7], states[11]] + states[12:]
    return states


def compare(key, spec, pred, steps, spacing, kind=None, seed=5, diffusers_first_t=None):
    """Run both, compare after every step; returns the max relative deviation."""
    name, cls, extra, opts, select = SPECS[spec]
    if name == "dpmpp_sde":
        pytest.importorskip("torchsde")  # diffusers' DPMSolverSDEScheduler needs it
    extra = dict(extra, **({KIND_FLAGS[kind]: True} if kind else {}))
    dpred = {"eps": "epsilon", "v": "v_prediction"}[pred]
    ref = cls(num_train_timesteps=1000, prediction_type=dpred, timestep_spacing=spacing, steps_offset=1, **SD,
              **extra)
    torch.manual_seed(0)
    noise = torch.randn(SHAPE)
    ref.set_timesteps(steps)
    x_init = noise * ref.init_noise_sigma
    sampler = with_sigmas(name, kind)
    schedule = DiscreteSchedule(**SD, timestep_spacing=spacing, steps_offset=1)
    first_t = None
    if diffusers_first_t == "ours":
        first_t = plan(sampler, schedule, steps).timesteps[0].item()
    theirs = run_diffusers(ref, steps, x_init, seed, select, first_t, SameNoise(seed) if name == "dpmpp_sde" else None,
                           f64=spec in F64_REFERENCE)
    ve = name in VE_STATE
    s0 = float(ref.sigmas[0]) if ve else 0.0
    states, sigmas = [], []

    def cb(i, sigma, x, x0):
        states.append(x.clone())
        sigmas.append(sigma)

    if name == "pndm" and pred == "v":  # what diffusers' PNDM extrapolates for a v-prediction model
        opts = dict(opts, variable="v")
    sample(sampler, fake_model, x_init / (s0**2 + 1) ** 0.5, schedule, pred, steps,
           generator=torch.Generator().manual_seed(seed), callback=cb, **opts)
    if ve:
        states = [x * (s**2 + 1) ** 0.5 for x, s in zip(states, sigmas)]
    assert len(states) == len(theirs), f"{key}: {len(states)} steps vs diffusers' {len(theirs)}"
    worst = 0.0
    for a, b in zip(states, theirs):
        worst = max(worst, (a.double() - b.double()).abs().max().item() / max(1.0, b.abs().max().item()))
    MAX_REL[key] = max(MAX_REL[key], worst)
    return worst


SPACINGS = ("leading", "trailing", "linspace")
CASES = [(spec, pred, steps, spacing) for spec in ("lms", "unipc", "deis", "dpmpp_2m_sde", "dpmpp_sde")
         for pred in ("eps", "v") for steps in (10, 25) for spacing in SPACINGS]
CASES += [(spec, pred, 12, spacing) for spec in ("unipc_order3", "unipc_bh1", "deis_order3", "dpmpp_2m_sde_heun")
          for pred in ("eps", "v") for spacing in ("leading", "linspace")]
CASES += [("dpmpp_3m_sde", pred, steps, spacing) for pred in ("eps", "v") for steps in (10, 25) for spacing in SPACINGS]
# PNDM steps t -> t - T // steps, on its grid only when steps divides T ("leading" always): see the docs
CASES += [("plms", pred, steps, spacing) for pred in ("eps", "v") for steps in (10, 25, 50)
          for spacing in ("leading", "trailing")]
CASES += [("pndm_prk", pred, steps, "leading") for pred in ("eps", "v") for steps in (10, 20, 50)]  # even T // steps
CASES += [("lcm", pred, steps, "leading") for pred in ("eps", "v") for steps in (1, 2, 4, 8)]


@pytest.mark.parametrize("spec,pred,steps,spacing", CASES)
def test_new_sampler_matches_diffusers(spec, pred, steps, spacing):
    worst = compare(spec, spec, pred, steps, spacing)
    assert worst <= TOL, f"{spec}/{pred}/{steps}/{spacing}: max relative deviation {worst:.3g} > {TOL}"


KIND_CASES = [(spec, kind, pred, spacing)
              for spec in ("euler", "heun", "lms", "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "deis")
              for kind in KIND_FLAGS for pred, spacing in (("eps", "leading"), ("v", "linspace"))]


@pytest.mark.parametrize("spec,kind,pred,spacing", KIND_CASES)
def test_sigma_kinds_match_diffusers_flags(spec, kind, pred, spacing):
    """--sigmas karras|exponential|beta against diffusers' use_karras / use_exponential / use_beta_sigmas.
    DPM-Solver++, UniPC and DEIS cast the first exponential / beta timestep, 998.99998 in float32, to 998;
    ours is the level's own 999, which diffusers gets here (the uncorrected difference is bounded below)."""
    dpm = spec in ("dpmpp_2m", "dpmpp_2m_sde", "unipc", "deis") and kind != "karras"
    worst = compare(f"{spec}_{kind}", spec, pred, 10, spacing, kind, diffusers_first_t="ours" if dpm else None)
    assert worst <= TOL, f"{spec}_{kind}/{pred}/{spacing}: max relative deviation {worst:.3g} > {TOL}"


def test_known_differences_are_small_and_bounded():
    """What is not copied from diffusers, measured (printed with -s) and bounded:
    * exponential / beta sigmas on DPM-Solver++ / UniPC / DEIS: diffusers' first timestep 998 (float32
      round-off cast to int) instead of the level's 999;
    * PNDM with "linspace" spacing (or T not a multiple of steps): diffusers steps to t - T // steps, off its
      own grid; ldmkit steps along the grid;
    * PNDM's Runge-Kutta warmup with an odd T // steps: diffusers moves to t - h // 2 but evaluates the
      network at t_next + h // 2; ldmkit uses the latter."""
    found = {
        "dpmpp_2m_exponential, first t 998": compare("x", "dpmpp_2m", "eps", 10, "leading", "exponential"),
        "unipc_beta, first t 998": compare("x", "unipc", "eps", 10, "leading", "beta"),
        "pndm, linspace": compare("x", "plms", "eps", 25, "linspace"),
        "pndm prk, T // steps odd (8 steps)": compare("x", "pndm_prk", "eps", 8, "leading"),
    }
    for k, v in found.items():
        print(f"known difference {k:36s} max rel {v:.3g}")
    assert found["dpmpp_2m_exponential, first t 998"] < 1e-3 and found["unipc_beta, first t 998"] < 1e-3
    assert found["pndm prk, T // steps odd (8 steps)"] < 1e-3
    assert max(found.values()) < 0.5  # same trajectories, not different samplers


def test_diffusers_3m_sde_sign_is_the_only_difference():
    """Unpatched, diffusers' third-order SDE update is off by alpha' D2 per step (its D2 weight is
    O(1), the exact one O(h)); patched (the case above) it matches to float32."""
    unpatched = SPECS["dpmpp_3m_sde"]
    SPECS["x3m"] = ("dpmpp_3m_sde", S.DPMSolverMultistepScheduler) + unpatched[2:]
    try:
        raw = compare("x", "x3m", "eps", 25, "leading")
    finally:
        del SPECS["x3m"]
    print(f"dpmpp_3m_sde vs diffusers' unpatched order-3 SDE: max rel {raw:.3g}")
    assert raw > 100 * TOL


def test_dpmpp_sde_noise_has_the_brownian_law():
    """The two stages' noise: each N(0, 1), correlated as Brownian increments over nested intervals,
    corr = sqrt((sigma - sigma_mid) / (sigma - sigma')); torchsde's tree (diffusers') gives the same."""
    pytest.importorskip("torchsde")
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

    s, s_n = 3.0, 0.5
    mid = math.sqrt(s * s_n)
    expect = math.sqrt((s - mid) / (s - s_n))
    tree = BrownianTreeNoiseSampler(torch.zeros(100_000, dtype=torch.float64), 0.1, 10.0, seed=3)
    a, b = tree(s, mid), tree(s, s_n)
    mine = SameNoise(3, (100_000,))
    c, d = mine(s, mid), mine(s, s_n)
    for x, y in ((a, b), (c.double(), d.double())):
        assert abs(x.std().item() - 1) < 0.01 and abs(y.std().item() - 1) < 0.01
        assert abs((x * y).mean().item() - expect) < 0.01


# ---------------------------------------------------------------- names


def test_names_aliases_and_sigma_kinds():
    assert resolve_sampler("DPM++ 2M Karras") == "dpmpp_2m_karras"
    assert resolve_sampler("dpm++ sde karras") == "dpmpp_sde_karras"
    assert resolve_sampler("Euler a") == "euler_a" and resolve_sampler("PLMS") == "pndm"
    assert resolve_sampler("UniPC") == "unipc" and resolve_sampler("LMS") == "lms" and resolve_sampler("DEIS") == "deis"
    assert resolve_sampler("DPM++ 2M SDE") == "dpmpp_2m_sde" and resolve_sampler("DPM++ 3M SDE") == "dpmpp_3m_sde"
    assert resolve_sampler("LCM") == "lcm" and resolve_sampler("DPM++ 2M SDE Exponential") == "dpmpp_2m_sde_exponential"
    assert resolve_sampler("Euler") == "euler" and resolve_sampler("Euler", flow=True) == "flow_euler"
    with pytest.raises(ValueError, match="unknown sampler 'DPM fast'"):
        resolve_sampler("DPM fast")
    assert with_sigmas("euler", "karras") == "euler_karras"
    assert with_sigmas("dpmpp_2m_karras", "karras") == "dpmpp_2m_karras"
    for name in ("ddim", "pndm", "lcm", "flow_euler"):
        with pytest.raises(ValueError, match=f"sampler '{name}' takes no sigmas"):
            with_sigmas(name, "karras")
    with pytest.raises(ValueError, match="already runs on karras"):
        with_sigmas("dpmpp_2m_karras", "beta")
    info = SAMPLERS["dpmpp_sde_karras"]
    assert (info.label, info.a1111, info.schedule_type) == ("DPM++ SDE Karras", "DPM++ SDE", "Karras")
    assert SAMPLERS["unipc"].schedule_type is None and SAMPLERS["unipc_beta"].a1111 == "UniPC"
    assert "euler_karras" in sampler_names() and "euler_karras" not in sampler_names(kinds=False)


def test_lcm_and_pndm_grids():
    sd = DiscreteSchedule(**SD, steps_offset=1)
    assert plan("lcm", sd, 4).timesteps.tolist() == [999, 759, 499, 259]
    with pytest.raises(ValueError, match="at most original_inference_steps=50"):
        plan("lcm", sd, 51)
    prk = plan("pndm", sd, 10, skip_prk_steps=False)
    assert prk.timesteps[:7].tolist() == [901, 851, 801, 751, 701, 651, 601] and len(prk.sigmas) == 14
    tail = sample("pndm", fake_model, torch.zeros(SHAPE), sd, "eps", 10, start=2, skip_prk_steps=False)
    assert torch.isfinite(tail).all()  # a tail's first six intervals serve as the three Runge-Kutta steps


def test_zz_report():
    assert MAX_REL, "no parity case ran"
    for k in sorted(MAX_REL):
        if k != "x":
            print(f"max rel |ours - diffusers| {k:28s} {MAX_REL[k]:.3g}")


# ---------------------------------------------------------------- closed form (test_samplers_analytic's Gaussian)


def _transport(x_T, s0, s1):
    """The probability-flow ODE's exact map between levels for Gaussian data (test_samplers_analytic)."""
    from test_samplers_analytic import MU, SD, _a_sigma

    (a0, q0), (a1, q1) = _a_sigma(None, s0), _a_sigma(None, s1)
    std0, std1 = (a0**2 * SD**2 + q0**2) ** 0.5, (a1**2 * SD**2 + q1**2) ** 0.5
    return a1 * MU + std1 * (x_T - a0 * MU) / std0


def ode_error(name, steps, **opts):
    """max |sampler - exact|: the exact ODE solution to the final level when the sampler integrates to it
    (LMS to 0; PNDM and DEIS to t = 0's level), else to the last level and then the exact denoiser."""
    from test_samplers_analytic import MU, SD, SD15_EPS, _a_sigma, _run

    x_T, out, p = _run(name, SD15_EPS, steps, **opts)
    s0, last, final = float(p.sigmas[0]), float(p.sigmas[-2]), float(p.sigmas[-1])
    if final > 0 or name.startswith("lms"):
        exact = _transport(x_T, s0, final)
    else:
        a1, q1 = _a_sigma(None, last)
        exact = MU + a1 * SD**2 / (a1**2 * SD**2 + q1**2) * (_transport(x_T, s0, last) - a1 * MU)
    return (out - exact).abs().max().item()


# sampler (options) -> least err(20) / err(40): the order shows on Karras' grid; on the uniform-t grids the
# last step (t from ~2T/n to T/n or 0) dominates, as test_samplers_analytic explains for DPM++ 2M
ORDERS = {"euler_karras": 1.6, "heun_karras": 3.5, "dpmpp_2m_karras": 3.5, "lms_karras": 6.0, "unipc_karras": 6.0,
          "deis_karras": 3.5, "deis_exponential": 3.5, "pndm": 2.8, "pndm-prk": 2.8}


def test_multistep_samplers_converge_at_their_order():
    grid = (10, 20, 40)
    err = {}
    for key in ORDERS:
        name, opts = (key, {}) if key != "pndm-prk" else ("pndm", {"skip_prk_steps": False})
        err[key] = [ode_error(name, k, **opts) for k in grid]
        print(f"{key:18s} max|x - x*| at steps {grid}: " + ", ".join(f"{e:.2e}" for e in err[key])
              + f"; err(20)/err(40) = {err[key][1] / err[key][2]:.2f}")
    for key, least in ORDERS.items():
        e = err[key]
        assert e[0] > e[1] > e[2], f"{key} does not converge: {e}"
        assert e[1] / e[2] > least, f"{key}: err(20)/err(40) = {e[1] / e[2]:.2f} <= {least}"
        if key != "euler_karras":
            assert e[1] < err["euler_karras"][1] / 5, f"{key} not clearly better than Euler at 20 steps"


@pytest.mark.parametrize("name", ["heun", "dpmpp_2m", "unipc"])
def test_every_sigma_kind_converges(name):
    for kind in ("karras", "exponential", "beta"):
        e = [ode_error(with_sigmas(name, kind), k) for k in (10, 40)]
        print(f"{with_sigmas(name, kind):22s} error at 10 / 40 steps: {e[0]:.2e} / {e[1]:.2e}")
        assert e[1] < e[0] / 4, f"{name} {kind}: {e}"  # (beta's linear-in-sigma ramp leaves big low steps)


def test_pndm_extrapolating_v_is_stable_near_zero_snr():
    """A cosine schedule starts at sigma ~2e4: there eps ~ x carries no information and PLMS's extrapolated
    eps, divided by alpha ~5e-5, blows up; v = a eps - s x0 ~ -x0 stays well conditioned (diffusers' PNDM
    extrapolates a v model's v)."""
    from test_samplers_analytic import SD, optimal_network, start_state

    schedule = DiscreteSchedule("cosine", timestep_spacing="trailing")
    net = optimal_network(schedule, "v")
    x_T = start_state(schedule, float(plan("pndm", schedule, 20).sigmas[0]))
    err = {}
    for variable in ("eps", "v"):
        out = sample("pndm", net, x_T, schedule, "v", 20, variable=variable)
        err[variable] = (out.std(dim=(0, 2, 3)) - SD.flatten()).abs().max().item()
    print(f"pndm on a cosine schedule, 20 steps: std error {err}")
    assert err["v"] < 0.1 < 1.0 < err["eps"]


def test_lcm_samples_the_data_with_the_exact_consistency_function():
    """LCM's network is a consistency function f(x_t, t) -> the ODE's x0. For Gaussian data it is the exact
    map; with it, LCM's x' = a' f(x) + s' z keeps every marginal exact, so 1, 2 or 4 steps give the data's
    moments (4 standard errors) -- and the Bayes denoiser instead (what LCM is not for) under-disperses."""
    from test_samplers_analytic import MU, N, SD, SD15, start_state

    def consistency(x, t):
        a, s = SD15.alpha_sigma(t[0].double())
        return MU + SD * (x - a * MU) / (a**2 * SD**2 + s**2) ** 0.5

    for steps in (1, 2, 4):
        x_T = start_state(SD15, float(plan("lcm", SD15, steps).sigmas[0]))
        out = sample("lcm", consistency, x_T, SD15, "x0", steps, generator=torch.Generator().manual_seed(steps))
        mean, std = out.mean(dim=(0, 2, 3)), out.std(dim=(0, 2, 3))
        assert ((mean - MU.flatten()).abs() <= 4 * SD.flatten() / N**0.5).all(), f"{steps}: mean {mean}"
        assert ((std - SD.flatten()).abs() <= 4 * SD.flatten() / (2 * N) ** 0.5).all(), f"{steps}: std {std}"


def test_3m_sde_converges_faster_than_diffusers_sign():
    """On the Gaussian, k-diffusion's 3M SDE weight (ours) recovers the data's std better at 20 and 40 Karras
    steps than diffusers' sde-dpmsolver++ order 3 with its D2 sign (the same run, that sign flipped)."""
    from test_samplers_analytic import SD, SD15_EPS, optimal_network, start_state

    schedule, _ = SD15_EPS
    net = optimal_network(schedule, "eps")
    for steps in (20, 40):
        errs = {}
        for cls in (S.DPMSolverMultistepScheduler, Fixed3MSDE):
            ref = cls(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                      algorithm_type="sde-dpmsolver++", solver_order=3, solver_type="heun",
                      lower_order_final=False, use_karras_sigmas=True)
            ref.set_timesteps(steps)
            x = start_state(schedule, float(ref.sigmas[0]))
            g = torch.Generator().manual_seed(2)
            for t in ref.timesteps:
                x = ref.step(net(x, t.double().expand(x.shape[0])), t, x, generator=g).prev_sample
            errs[cls.__name__] = (x.std(dim=(0, 2, 3)) - SD.flatten()).abs().max().item()
        print(f"3M SDE, {steps} Karras steps: std error {errs}")
        assert errs["Fixed3MSDE"] < errs["DPMSolverMultistepScheduler"] / 2
