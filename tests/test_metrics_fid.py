"""FID / KID / precision-recall against cases with known answers."""
import math

import pytest
import torch

from ldmkit.metrics.fid import (
    feature_statistics,
    fid_from_features,
    frechet_distance,
    kid_from_features,
    precision_recall,
)


def _random_spd(d, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def test_frechet_distance_closed_form_diagonal():
    # Diagonal covariances commute: tr((S1 S2)^1/2) = sum sqrt(a_i b_i), so
    # d^2 = |mu1-mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    mu1 = torch.tensor([0.0, 1.0, -2.0])
    mu2 = torch.tensor([1.0, 1.0, 0.0])
    a = torch.tensor([1.0, 4.0, 9.0])
    b = torch.tensor([4.0, 1.0, 9.0])
    expected = 1 + 0 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0
    got = frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b))
    assert got == pytest.approx(expected, abs=1e-9)


def test_frechet_distance_closed_form_general():
    # Non-commuting covariances: compare with an independent formula through
    # the eigen-decomposition of S1 S2 (real, non-negative spectrum).
    d = 6
    s1, s2 = _random_spd(d, 1), _random_spd(d, 2)
    mu1 = torch.arange(d, dtype=torch.float64) / d
    mu2 = -mu1
    eig = torch.linalg.eigvals(s1 @ s2).real.clamp_min(0)
    expected = float(((mu1 - mu2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * eig.sqrt().sum())
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    # identical Gaussians are at distance 0, and the distance is symmetric
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)


def test_fid_from_samples_matches_closed_form():
    torch.manual_seed(0)
    d, n = 4, 200_000
    mu1, mu2 = torch.zeros(d), torch.tensor([0.5, 0.0, -0.5, 1.0])
    s1 = torch.diag(torch.tensor([1.0, 2.0, 0.5, 1.0]))
    s2 = torch.diag(torch.tensor([1.5, 1.0, 0.5, 2.0]))
    x = torch.randn(n, d) * s1.diagonal().sqrt() + mu1
    y = torch.randn(n, d) * s2.diagonal().sqrt() + mu2
    exact = frechet_distance(mu1, s1, mu2, s2)
    assert fid_from_features(x, y) == pytest.approx(exact, abs=0.03)
    stats = feature_statistics(x)
    assert torch.allclose(stats.cov, s1.double(), atol=0.03)


def test_kid_is_unbiased_on_identical_distributions():
    torch.manual_seed(0)
    d = 16
    values = []
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(100, d, generator=g)
        y = torch.randn(100, d, generator=g)
        values.append(kid_from_features(x, y)[0])
    values = torch.tensor(values)
    # unbiased: the mean over repetitions is ~0 (and individual values can be negative)
    assert abs(values.mean()) < 3 * values.std() / math.sqrt(len(values)) + 1e-4
    assert (values < 0).any()
    # a shifted distribution gives a clearly positive KID
    g = torch.Generator().manual_seed(99)
    far = kid_from_features(torch.randn(100, d, generator=g), torch.randn(100, d, generator=g) + 1.0)[0]
    assert far > 10 * values.abs().max()


def test_kid_subsets_and_order_invariance():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 8, generator=g)
    y = torch.randn(250, 8, generator=g) * 1.3
    mean, std = kid_from_features(x, y, subsets=10, subset_size=100)
    assert mean > 0 and std > 0
    px, py = x[torch.randperm(300)], y[torch.randperm(250)]
    assert kid_from_features(px, py, subsets=10, subset_size=100) == pytest.approx((mean, std), rel=1e-12)
    with pytest.raises(ValueError, match="subsets"):
        kid_from_features(x, y, subsets=0)


def test_precision_recall_known_sets():
    # Real points on a 1-D grid 0..9; k=1 radius is 1 for every real point.
    real = torch.arange(10, dtype=torch.float64)[:, None]
    # Generated: half inside the real manifold, half far away.
    fake = torch.tensor([[0.5], [3.0], [8.9], [9.5], [50.0], [51.0], [52.0], [53.0]], dtype=torch.float64)
    p, r = precision_recall(real, fake, k=1)
    assert p == pytest.approx(4 / 8)
    # Fake radii (k=1): 0.5->2.5, 3->2.5, 8.9->0.6, 9.5->0.6, 50..53->1.
    # Real points covered: 0-3 (by 0.5), 1-5 (by 3.0) and 9 (by 8.9 and 9.5).
    covered = [0, 1, 2, 3, 4, 5, 9]
    assert r == pytest.approx(len(covered) / 10)


def test_precision_recall_identical_and_order_invariant():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    assert precision_recall(x, x, k=3) == (1.0, 1.0)
    y = torch.randn(48, 5, generator=g) + 0.5
    pr = precision_recall(x, y, k=3)
    assert precision_recall(x[torch.randperm(64)], y[torch.randperm(48)], k=3) == pr
    assert fid_from_features(x[torch.randperm(64)], y) == pytest.approx(fid_from_features(x, y), rel=1e-10)


def test_bad_inputs_name_the_value():
    with pytest.raises(ValueError, match="2-D"):
        fid_from_features(torch.zeros(5), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="feature sizes differ"):
        fid_from_features(torch.randn(5, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(torch.randn(5, 3), torch.randn(5, 3), k=5)
    with pytest.raises(ValueError, match="NaN"):
        fid_from_features(torch.full((4, 2), float("nan")), torch.randn(4, 2))
