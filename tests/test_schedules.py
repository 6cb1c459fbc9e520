"""Schedules, forward process, conversions, objectives and bad-input errors of ldmkit.diffusion."""

from __future__ import annotations

import math

import pytest
import torch

from ldmkit.diffusion import (DiscreteSchedule, Denoiser, FlowSchedule, convert, flow_time, get_sampler,
                              img2img_start, loss_weight, make_schedule, noise_to, plan, posterior, prediction_of,
                              q_sample, sample, sample_timesteps, schedule_from_dict, snr, spaced_timesteps, to_x0,
                              training_loss, training_target)

ALL_DISCRETE = [
    DiscreteSchedule("linear"),
    DiscreteSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012),
    DiscreteSchedule("cosine"),
    DiscreteSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_zero_terminal_snr=True),
]


# ---------------------------------------------------------------- tables


@pytest.mark.parametrize("name,dname", [("linear", "linear"), ("scaled_linear", "scaled_linear"),
                                        ("cosine", "squaredcos_cap_v2")])
@pytest.mark.parametrize("ztsnr", [False, True])
def test_betas_match_diffusers(name, dname, ztsnr):
    diffusers = pytest.importorskip("diffusers")
    kw = dict(beta_start=0.00085, beta_end=0.012) if name == "scaled_linear" else {}
    ours = DiscreteSchedule(name, rescale_zero_terminal_snr=ztsnr, **kw)
    ref = diffusers.DDPMScheduler(beta_schedule=dname, rescale_betas_zero_snr=ztsnr, **kw)
    # diffusers stores float32 tables; ours are float64. Its float32 rescale computes betas as
    # 1 - abar[t]/abar[t-1], which cancels to ~1e-3 relative for betas ~1e-4: compare absolutely there.
    tol = dict(rtol=2e-5, atol=5e-6) if ztsnr else dict(rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(ours.betas.float(), ref.betas, **tol)
    if name != "cosine":  # cosine's float32 cumprod loses ~1e-4 relative near t=T (1 - 0.999 cancellation)
        torch.testing.assert_close(ours.alphas_cumprod.float(), ref.alphas_cumprod, rtol=2e-5, atol=1e-6)


def test_zero_terminal_snr():
    s = DiscreteSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_zero_terminal_snr=True)
    plain = DiscreteSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert s.alphas_cumprod[-1].item() == 0.0
    assert plain.alphas_cumprod[-1].item() > 0.0
    assert torch.isinf(s.sigmas[-1]) and s.log_snr[-1].item() == -math.inf
    torch.testing.assert_close(s.alphas_cumprod[0], plain.alphas_cumprod[0])  # first step unchanged
    # samplers still get a finite first level (diffusers' 2**-24 clamp)
    assert math.isfinite(plan("euler", s, 10, spacing="trailing").sigmas[0].item())


@pytest.mark.parametrize("s", ALL_DISCRETE, ids=lambda s: s.beta_schedule + ("-ztsnr" if s.rescale_zero_terminal_snr else ""))
def test_snr_strictly_decreasing_and_tables_consistent(s):
    assert (s.log_snr[1:] < s.log_snr[:-1]).all()
    assert (s.betas > 0).all() and (s.betas <= 1).all()
    torch.testing.assert_close(s.alphas_cumprod, torch.cumprod(1 - s.betas, 0))
    fin = torch.isfinite(s.sigmas)
    torch.testing.assert_close(s.sigmas[fin] ** 2, ((1 - s.alphas_cumprod) / s.alphas_cumprod)[fin])
    torch.testing.assert_close(snr(s, torch.arange(10)), (s.log_snr[:10]).exp())


def test_t_sigma_conversions():
    s = ALL_DISCRETE[1]
    t = torch.arange(0, 1000, 37, dtype=torch.float64)
    torch.testing.assert_close(s.sigma_at(t), s.sigmas[t.long()])
    torch.testing.assert_close(s.t_at(s.sigmas[t.long()]), t)
    frac = torch.tensor([10.25, 500.75, 998.5], dtype=torch.float64)
    sig = s.sigma_at(frac)
    assert (sig > s.sigma_at(frac.floor())).all() and (sig < s.sigma_at(frac.ceil())).all()
    # sigma -> t interpolates in log-sigma, t -> sigma in sigma (both as diffusers): the round trip agrees to
    # second order in the per-step change of log-sigma (tiny except over the first few timesteps)
    torch.testing.assert_close(s.t_at(sig), frac, atol=1e-2, rtol=0)
    with pytest.raises(ValueError, match="outside the allowed range"):
        s.sigma_at(torch.tensor([1000.0]))


def test_spacings_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    for spacing in ("leading", "trailing", "linspace"):
        for steps in (1, 7, 10, 50, 999):
            ref = diffusers.DDPMScheduler(timestep_spacing=spacing, steps_offset=1)
            ref.set_timesteps(steps)
            ours = spaced_timesteps(1000, steps, spacing, steps_offset=1)
            assert ours.long().tolist() == ref.timesteps.tolist(), (spacing, steps)


def test_flow_schedule_shift_and_plan():
    f = FlowSchedule(shift=3.0)
    s = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(f.shift_sigma(s), 3 * s.double() / (1 + 2 * s.double()))
    p = plan("flow_euler", f, 8)
    s_grid = flow_time(p.sigmas)  # flow time of each level: starts at s = 1 (sigma = inf), ends clean
    assert s_grid[0].item() == 1.0 and p.sigmas[0].item() == math.inf and p.sigmas[-1].item() == 0.0
    assert (p.sigmas[1:] < p.sigmas[:-1]).all()
    torch.testing.assert_close(p.timesteps, s_grid[:-1] * 1000)


def test_serialisation_round_trip_and_factory():
    for s in ALL_DISCRETE + [FlowSchedule(shift=3.0)]:
        d = s.to_dict()
        back = schedule_from_dict(d)
        assert back == s and type(back) is type(s)
        assert type(s).from_dict(d) == s
    assert make_schedule("sd15").steps_offset == 1
    assert make_schedule("squaredcos_cap_v2").beta_schedule == "cosine"
    assert make_schedule("sd3").shift == 3.0
    # schedule dicts written before predictions left the schedule still load; the prediction is read apart
    old = {**DiscreteSchedule().to_dict(), "prediction_type": "v_prediction"}
    assert schedule_from_dict(old) == DiscreteSchedule() and prediction_of(old) == "v"
    assert prediction_of(FlowSchedule().to_dict()) == "flow" and prediction_of({}, "eps") == "eps"
    with pytest.raises(ValueError, match="unknown schedule 'quadratic'.*'linear'"):
        make_schedule("quadratic")
    with pytest.raises(ValueError, match="prediction type"):
        prediction_of({"prediction_type": "velocity"})
    with pytest.raises(ValueError, match="unknown schedule fields"):
        schedule_from_dict({"kind": "discrete", "beta": 3})
    with pytest.raises(ValueError, match="JSON object"):
        schedule_from_dict([1, 2])
    with pytest.raises(ValueError, match="timestep spacing"):
        DiscreteSchedule(timestep_spacing="even")
    with pytest.raises(ValueError, match="schedule kind"):
        schedule_from_dict({"kind": "vp-sde"})


# ---------------------------------------------------------------- forward process and conversions


@pytest.mark.parametrize("s", ALL_DISCRETE[:3] + [FlowSchedule(shift=2.0)], ids=["linear", "scaled", "cosine", "flow"])
def test_q_sample_moments(s):
    g = torch.Generator().manual_seed(0)
    n, mu, sd = 200_000, 0.7, 0.4
    x0 = mu + sd * torch.randn(n, 1, generator=g, dtype=torch.float64)
    noise = torch.randn(n, 1, generator=g, dtype=torch.float64)
    for t in ([10, 300, 999] if isinstance(s, DiscreteSchedule) else [0.05, 0.5, 0.95]):
        a, sg = (float(v) for v in s.alpha_sigma(torch.tensor(t)))
        xt = q_sample(s, x0, noise, torch.full((n,), t))
        mean_expected, std_expected = a * mu, (a**2 * sd**2 + sg**2) ** 0.5
        assert abs(xt.mean().item() - mean_expected) < 4 * std_expected / n**0.5
        assert abs(xt.std().item() / std_expected - 1) < 0.01


def test_conversions_round_trip():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(2, 4, 8, 8, generator=g,
                                                                                     dtype=torch.float64)
    a, s = 0.6, 0.8  # VP: a^2 + s^2 = 1
    xt = a * x0 + s * eps
    truth = {"x0": x0, "eps": eps, "v": a * eps - s * x0, "score": -eps / s}
    for src in truth:
        for dst in truth:
            torch.testing.assert_close(convert(truth[src], src, dst, xt, a, s), truth[dst])
    a, s = 0.3, 0.7  # flow: x_t = (1-s) x0 + s eps
    xt = a * x0 + s * eps
    torch.testing.assert_close(convert(eps - x0, "flow", "x0", xt, a, s), x0)
    torch.testing.assert_close(convert(eps - x0, "flow", "eps", xt, a, s), eps)
    torch.testing.assert_close(convert(x0, "x0", "flow", xt, a, s), eps - x0)


def test_posterior_matches_gaussian_conditioning():
    s = ALL_DISCRETE[0]
    g = torch.Generator().manual_seed(2)
    x0, xt = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    t, tp = torch.tensor([500, 20, 1]), torch.tensor([400, 19, -1])
    mean, var = posterior(s, x0, xt, t, tp)
    ac = s.alphas_cumprod
    for k in range(3):
        ab_t = ac[t[k]]
        ab_p = ac[tp[k]] if tp[k] >= 0 else torch.tensor(1.0, dtype=torch.float64)
        # joint of (x_p, x_t) given x0: means (sqrt(ab_p) x0, sqrt(ab_t) x0), cov(x_p, x_t) = sqrt(ab_t/ab_p)(1-ab_p)
        c = (ab_t / ab_p).sqrt() * (1 - ab_p)
        m = ab_p.sqrt() * x0[k] + c / (1 - ab_t) * (xt[k] - ab_t.sqrt() * x0[k])
        v = (1 - ab_p) - c**2 / (1 - ab_t)
        torch.testing.assert_close(mean[k], m)
        torch.testing.assert_close(var[k].squeeze(), v, atol=1e-12, rtol=1e-6)


def test_noise_to_levels():
    s = ALL_DISCRETE[1]
    x0, n = torch.ones(1, 2), torch.zeros(1, 2)
    sig = s.sigmas[400]
    torch.testing.assert_close(noise_to(x0, n, sig), q_sample(s, x0, n, torch.tensor([400])))
    torch.testing.assert_close(noise_to(x0, n, 0.0), x0)
    torch.testing.assert_close(noise_to(x0, n + 2, math.inf), n + 2)  # pure noise
    # a flow state (1 - s) x0 + s eps is the VP state at sigma = s / (1 - s), scaled by sqrt((1-s)^2 + s^2)
    s_f = 0.25
    flow_state = (1 - s_f) * x0 + s_f * (n + 2)
    torch.testing.assert_close(noise_to(x0, n + 2, s_f / (1 - s_f)) * ((1 - s_f) ** 2 + s_f**2) ** 0.5, flow_state)


# ---------------------------------------------------------------- objectives


@pytest.mark.parametrize("pred", ["eps", "v", "x0", "flow"])
def test_min_snr_weight_is_the_x0_weight_in_every_parameterisation(pred):
    """w_pred * ||out - target||^2 == min(SNR, gamma) * ||x0_pred - x0||^2 for every prediction type."""
    s = FlowSchedule() if pred == "flow" else DiscreteSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(6, 2, 4, 4, generator=g), torch.randn(6, 2, 4, 4, generator=g)
    t = torch.tensor([0.02, 0.1, 0.3, 0.5, 0.8, 0.97]) if pred == "flow" else torch.tensor([0, 10, 100, 400, 800, 999])
    xt = q_sample(s, x0, noise, t)
    target = training_target(s, pred, x0, noise, t)
    assert training_loss(s, pred, target, x0, noise, t).abs().max().item() < 1e-12
    out = target + 0.1 * torch.randn(target.shape, generator=g)
    x0_err = ((to_x0(s, pred, out, xt, t) - x0) ** 2).reshape(6, -1).mean(1).double()
    r = snr(s, t)
    expected = torch.minimum(r, torch.full_like(r, 5.0)) * x0_err
    got = training_loss(s, pred, out, x0, noise, t, weighting="min_snr", gamma=5.0).double()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
    assert torch.all(loss_weight(s, pred, t) == 1)


def test_training_targets():
    x0, noise = torch.randn(2, 3), torch.randn(2, 3)
    s = DiscreteSchedule()
    a, sg = (float(v) for v in s.alpha_sigma(torch.tensor(100)))
    torch.testing.assert_close(training_target(s, "v", x0, noise, torch.tensor([100, 100])), a * noise - sg * x0)
    torch.testing.assert_close(training_target(FlowSchedule(), "flow", x0, noise, torch.tensor([0.3, 0.3])),
                               noise - x0)
    torch.testing.assert_close(training_target(s, "eps", x0, noise, torch.tensor([5, 6])), noise)
    torch.testing.assert_close(training_target(s, "x0", x0, noise, torch.tensor([5, 6])), x0)


def test_sample_timesteps():
    s = DiscreteSchedule()
    t = sample_timesteps(s, 50_000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999
    assert abs(t.double().mean().item() - 499.5) < 5
    assert torch.equal(t[:10], sample_timesteps(s, 50_000, torch.Generator().manual_seed(0))[:10])
    f = sample_timesteps(FlowSchedule(), 50_000, torch.Generator().manual_seed(0), method="logit_normal")
    assert f.min() > 0 and f.max() <= 1
    logit = torch.log(f / (1 - f).clamp(min=1e-7))
    assert abs(logit.mean().item()) < 0.03 and abs(logit.std().item() - 1) < 0.03
    shifted = sample_timesteps(FlowSchedule(shift=3.0), 50_000, torch.Generator().manual_seed(0), method="logit_normal")
    assert shifted.mean() > f.mean() + 0.1
    with pytest.raises(ValueError, match="timestep sampling"):
        sample_timesteps(s, 4, method="beta")


def test_stratified_timesteps_cover_every_stratum_once():
    s = DiscreteSchedule()
    g = torch.Generator().manual_seed(3)
    t = sample_timesteps(s, 8, g, method="stratified")
    assert sorted((t // 125).tolist()) == list(range(8))  # one timestep in each eighth of [0, 1000)
    assert not torch.equal(t, t.sort().values)  # shuffled across the batch (rows get random levels)
    # marginally uniform over many batches: the mean and the histogram match uniform sampling
    many = torch.cat([sample_timesteps(s, 16, g, method="stratified") for _ in range(4000)])
    assert abs(many.double().mean().item() - 499.5) < 5
    hist = torch.bincount(many // 100, minlength=10).double() / many.numel()
    assert torch.allclose(hist, torch.full((10,), 0.1, dtype=torch.float64), atol=0.006)
    # and the batch mean varies far less than with independent draws
    means = lambda method: torch.stack([sample_timesteps(s, 16, g, method=method).double().mean()
                                        for _ in range(500)]).std()
    assert means("stratified") < 0.3 * means("uniform")
    f = sample_timesteps(FlowSchedule(), 4, g, method="stratified")
    assert sorted((f * 4).floor().long().tolist()) == [0, 1, 2, 3]


# ---------------------------------------------------------------- bad input


def _network(x, t):
    return torch.zeros_like(x)


def test_bad_input_errors():
    s = DiscreteSchedule()
    x = torch.randn(1, 2, 4, 4)

    def run(name, schedule, steps, prediction="eps", network=_network, **kw):
        return sample(name, network, x, schedule, prediction, steps, **kw)

    with pytest.raises(ValueError, match=r"unknown sampler 'plms'.*euler"):
        get_sampler("plms")
    for steps in (0, 1001, 2.5):
        with pytest.raises(ValueError, match=r"steps=.* must be an integer in \[1, 1000\]"):
            run("euler", s, steps)
    for strength in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"strength=.* outside the allowed range \[0, 1\]"):
            img2img_start(10, strength)
    assert img2img_start(10, 1.0) == 0 and img2img_start(10, 0.0) == 10 and img2img_start(10, 0.35) == 7
    with pytest.raises(ValueError, match=r"steps=1000 with 'leading' spacing and steps_offset=1 reaches timestep 1000"):
        run("ddim", DiscreteSchedule(steps_offset=1), 1000)
    ztsnr = DiscreteSchedule(rescale_zero_terminal_snr=True, timestep_spacing="trailing")
    with pytest.raises(ValueError, match="eps prediction at zero signal"):
        run("ddim", ztsnr, 10)
    run("ddim", ztsnr, 10, prediction="v")  # v recovers x0 there
    with pytest.raises(ValueError, match=r"start=11 must be an integer in \[0, 10\]"):
        run("ddim", s, 10, start=11)
    with pytest.raises(ValueError, match="timestep spacing"):
        run("ddim", s, 10, spacing="uniform")
    with pytest.raises(ValueError, match="needs a FlowSchedule"):
        run("flow_euler", s, 10, prediction="flow")
    with pytest.raises(ValueError, match="needs a DiscreteSchedule"):
        run("euler", FlowSchedule(), 10, prediction="flow")
    with pytest.raises(ValueError, match="does not fit a FlowSchedule"):
        run("flow_euler", FlowSchedule(), 10, prediction="eps")
    with pytest.raises(ValueError, match="has no option"):
        run("euler", s, 10, eta=1.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        q_sample(s, x, torch.randn(1, 2, 4, 5), torch.tensor([3]))
    with pytest.raises(ValueError, match="network returned shape"):
        run("euler", s, 3, network=lambda x, t: x[:, :1])
    with pytest.raises(ValueError, match="callback returned shape"):
        run("dpmpp_2m", s, 3, callback=lambda i, sg, x, x0: x[0])
    with pytest.raises(ValueError, match="cannot start at sigma = inf"):
        get_sampler("euler").fn(Denoiser(_network, s, "v"), x, torch.tensor([math.inf, 1.0, 0.0]))
    with pytest.raises(ValueError, match="generators for a batch"):
        run("euler_a", s, 3, generator=[torch.Generator(), torch.Generator()])
    with pytest.raises(ValueError, match=r"timestep t=1000.* outside"):
        q_sample(s, x, x, torch.tensor([1000]))
    with pytest.raises(ValueError, match="batch"):
        q_sample(s, x, x, torch.tensor([3, 4, 5]))
