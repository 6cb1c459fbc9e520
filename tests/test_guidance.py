"""Classifier-free guidance wrapper: one batched forward, the guidance formula, rescale, cond batching."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from ldmkit.diffusion import DiscreteSchedule, cfg, concat_conditions, rescale_cfg, sample


class CountingModel:
    """model_fn(x, t, cond) with cond a dict {"context": [B, L, D], "labels": [B] | None}."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, t, cond):
        self.batches.append(x.shape[0])
        assert t.shape == (x.shape[0],)
        ctx = cond["context"].mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        lab = 0 if cond["labels"] is None else cond["labels"].float().reshape(-1, 1, 1, 1)
        return torch.tanh(x) * (1 + ctx) + 0.1 * lab + t.reshape(-1, 1, 1, 1) / 1000


def _inputs(B=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 2, 4, 4, generator=g)
    t = torch.full((B,), 500.0)
    cond = {"context": torch.randn(B, 5, 8, generator=g), "labels": torch.arange(B)}
    uncond = {"context": torch.zeros(1, 5, 8), "labels": torch.zeros(1, dtype=torch.long)}  # batch 1: broadcast
    return x, t, cond, uncond


def test_cfg_one_forward_and_formula():
    x, t, cond, uncond = _inputs()
    model = CountingModel()
    out = cfg(model, cond, uncond, scale=7.5)(x, t)
    assert model.batches == [6]  # uncond and cond in one batch of 2B
    c = model(x, t, cond)
    u = model(x, t, {"context": uncond["context"].expand(3, -1, -1), "labels": uncond["labels"].expand(3)})
    torch.testing.assert_close(out, u + 7.5 * (c - u))


def test_cfg_scale_one_runs_only_the_conditional_pass():
    x, t, cond, uncond = _inputs()
    model = CountingModel()
    out = cfg(model, cond, uncond, scale=1.0)(x, t)
    assert model.batches == [3]
    torch.testing.assert_close(out, model(x, t, cond))


def test_rescale_follows_lin_et_al():
    """Lin et al. 2023 eq. 15-16 (diffusers' rescale_noise_cfg): per sample, x_rescaled = x * std(c) / std(x),
    out = phi * x_rescaled + (1 - phi) * x (std over all non-batch dims, unbiased as torch.std)."""
    g = torch.Generator().manual_seed(1)
    guided, cond_out = torch.randn(2, 4, 8, 8, generator=g) * 3, torch.randn(2, 4, 8, 8, generator=g)
    for phi in (0.0, 0.3, 0.7, 1.0):
        got = rescale_cfg(guided, cond_out, phi)
        for b in range(2):
            ratio = cond_out[b].flatten().std() / guided[b].flatten().std()
            torch.testing.assert_close(got[b], phi * guided[b] * ratio + (1 - phi) * guided[b])
    # full rescale restores the conditional output's per-sample std
    torch.testing.assert_close(rescale_cfg(guided, cond_out, 1.0).std(dim=(1, 2, 3)), cond_out.std(dim=(1, 2, 3)))


def test_cfg_with_rescale_equals_manual():
    x, t, cond, uncond = _inputs()
    model = CountingModel()
    out = cfg(model, cond, uncond, scale=5.0, rescale=0.7)(x, t)
    c = model(x, t, cond)
    u = model(x, t, {"context": uncond["context"].expand(3, -1, -1), "labels": uncond["labels"].expand(3)})
    torch.testing.assert_close(out, rescale_cfg(u + 5.0 * (c - u), c, 0.7))


@dataclass(frozen=True)
class Cond:
    context: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None


def test_concat_dataclass_list_and_passthrough():
    c = Cond(context=torch.ones(2, 3, 4), mask=torch.ones(2, 3, dtype=torch.bool))
    u = Cond(context=torch.zeros(1, 3, 4), mask=torch.zeros(1, 3, dtype=torch.bool))
    both = concat_conditions(u, c, batch=2)
    assert isinstance(both, Cond) and both.pooled is None
    assert both.context.shape == (4, 3, 4) and both.context[:2].sum() == 0 and both.context[2:].min() == 1
    assert both.mask.dtype == torch.bool and both.mask[2:].all() and not both.mask[:2].any()
    lst = concat_conditions([torch.zeros(2, 1), "text"], [torch.ones(2, 1), "text"], batch=2)
    assert lst[0].shape == (4, 1) and lst[1] == "text"


def test_concat_errors():
    with pytest.raises(ValueError, match="must agree except in the batch"):
        concat_conditions(torch.zeros(2, 77, 8), torch.zeros(2, 76, 8), batch=2)
    with pytest.raises(ValueError, match="batch 3, expected 1 or 2"):
        concat_conditions(torch.zeros(3, 4), torch.zeros(2, 4), batch=2)
    with pytest.raises(ValueError, match="keys"):
        concat_conditions({"a": torch.zeros(1)}, {"b": torch.zeros(1)}, batch=1)
    with pytest.raises(ValueError, match="cannot batch"):
        concat_conditions(None, torch.zeros(2, 4), batch=2)
    with pytest.raises(ValueError, match=r"guidance rescale=1.5 is outside the allowed range \[0, 1\]"):
        cfg(CountingModel(), {}, {}, scale=3.0, rescale=1.5)
    with pytest.raises(ValueError, match="guidance scale"):
        cfg(CountingModel(), {}, {}, scale=-1.0)


def test_cfg_drives_a_sampler_deterministically():
    x, _, cond, uncond = _inputs(B=2)
    cond = {k: v[:2] for k, v in cond.items()}
    model = CountingModel()
    s = DiscreteSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
    guided = cfg(model, cond, uncond, scale=4.0, rescale=0.5)
    a = sample("dpmpp_2m", guided, x, s, "eps", 6)
    b = sample("dpmpp_2m", guided, x, s, "eps", 6)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    assert model.batches == [4] * 12
