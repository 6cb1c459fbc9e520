"""Distribution metrics over feature vectors: FID, KID and precision/recall.

All three compare a set of real features ``[N, D]`` with a set of generated
features ``[M, D]`` produced by the same feature network (see
``ldmkit.metrics.features``); the number only means something together with
the name of that network, so reports always carry it.

- Fréchet distance (Heusel et al. 2017): fit a Gaussian to each set and use
  ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})``.  The trace of the matrix
  square root is computed from the eigenvalues of the symmetric matrix
  ``S1^{1/2} S2 S1^{1/2}`` (same spectrum as ``S1 S2``) in float64, so no
  complex ``sqrtm`` and no scipy are needed.
- KID (Bińkowski et al. 2018): the unbiased estimator of the squared MMD with
  the cubic polynomial kernel ``k(x, y) = (x.y / D + 1)^3``, averaged over
  random subsets; reported as mean and standard deviation over subsets.
- Precision / recall (Kynkäänniemi et al. 2019): each set's manifold is the
  union of balls around its points with radius = distance to the k-th nearest
  neighbour in the same set.  Precision = share of generated points inside the
  real manifold, recall = share of real points inside the generated manifold.

Every function is invariant to the order of the samples: FID and
precision/recall are symmetric sums; KID draws its subsets from a canonical
ordering of the rows, so a permuted input gives the identical number.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "FeatureStats",
    "feature_statistics",
    "frechet_distance",
    "fid_from_features",
    "kid_from_features",
    "precision_recall",
]


@dataclass(frozen=True)
class FeatureStats:
    """Mean and covariance of a feature set (float64), plus its size."""

    mean: torch.Tensor
    cov: torch.Tensor
    count: int


def _as_features(x, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [N, D] feature matrix, got shape {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples, got {x.shape[0]}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x.detach().to(device="cpu", dtype=torch.float64)


def feature_statistics(features) -> FeatureStats:
    """Mean and unbiased covariance (``N - 1``) of ``features [N, D]``."""
    f = _as_features(features, "features")
    mean = f.mean(0)
    centred = f - mean
    cov = centred.T @ centred / (f.shape[0] - 1)
    return FeatureStats(mean=mean, cov=cov, count=f.shape[0])


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a positive semi-definite matrix."""
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2})``
    """
    mu1 = torch.as_tensor(mu1, dtype=torch.float64).reshape(-1)
    mu2 = torch.as_tensor(mu2, dtype=torch.float64).reshape(-1)
    s1 = torch.as_tensor(sigma1, dtype=torch.float64)
    s2 = torch.as_tensor(sigma2, dtype=torch.float64)
    d = mu1.shape[0]
    for name, s in (("sigma1", s1), ("sigma2", s2)):
        if s.shape != (d, d):
            raise ValueError(f"{name} must have shape ({d}, {d}) to match the means, got {tuple(s.shape)}")
    if mu2.shape[0] != d:
        raise ValueError(f"mu1 and mu2 must have the same length, got {d} and {mu2.shape[0]}")
    root1 = _sqrt_psd(s1)
    middle = root1 @ s2 @ root1
    eig = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0)
    tr_covmean = eig.sqrt().sum()
    diff = mu1 - mu2
    value = diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean
    return float(value.clamp_min(0))


def fid_from_features(real, fake) -> float:
    """FID between two feature sets ``[N, D]`` and ``[M, D]``."""
    a, b = feature_statistics(real), feature_statistics(fake)
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"feature sizes differ: real has {a.mean.shape[0]}, generated has {b.mean.shape[0]}")
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)


def _canonical_order(x: torch.Tensor) -> torch.Tensor:
    """Rows sorted by a fixed random projection: the same set in any order -> same tensor."""
    g = torch.Generator().manual_seed(1234)
    proj = torch.randn(x.shape[1], generator=g, dtype=torch.float64)
    key = x @ proj
    return x[torch.argsort(key, stable=True)]


def _mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    m, n = x.shape[0], y.shape[0]
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return sxx + syy - 2 * kxy.mean()


def kid_from_features(real, fake, subsets: int = 100, subset_size: int = 1000,
                      seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: mean and std of unbiased MMD^2 over subsets.

    When both sets are no larger than ``subset_size`` the whole sets are used
    once (the exact unbiased estimate, std 0).  Otherwise ``subsets`` random
    subsets of ``min(subset_size, N, M)`` rows are drawn from each set.
    """
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    if subset_size < 2:
        raise ValueError(f"subset_size must be >= 2, got {subset_size}")
    x, y = _as_features(real, "real"), _as_features(fake, "fake")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ: real has {x.shape[1]}, generated has {y.shape[1]}")
    if x.shape[0] <= subset_size and y.shape[0] <= subset_size:
        return float(_mmd2_unbiased(x, y)), 0.0
    x, y = _canonical_order(x), _canonical_order(y)
    size = min(subset_size, x.shape[0], y.shape[0])
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        ix = torch.randperm(x.shape[0], generator=g)[:size]
        iy = torch.randperm(y.shape[0], generator=g)[:size]
        values.append(_mmd2_unbiased(x[ix], y[iy]))
    v = torch.stack(values)
    return float(v.mean()), float(v.std(unbiased=False))


def _kth_neighbour_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    radii = []
    for start in range(0, x.shape[0], chunk):
        d = torch.cdist(x[start:start + chunk], x)
        # the k+1-th smallest distance skips the point itself (distance 0)
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    inside = []
    for start in range(0, points.shape[0], chunk):
        d = torch.cdist(points[start:start + chunk], centres)
        inside.append((d <= radii[None, :]).any(dim=1))
    return float(torch.cat(inside).double().mean())


def precision_recall(real, fake, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN radii."""
    x, y = _as_features(real, "real"), _as_features(fake, "fake")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ: real has {x.shape[1]}, generated has {y.shape[1]}")
    if not 1 <= k < min(x.shape[0], y.shape[0]):
        raise ValueError(f"k must be in [1, {min(x.shape[0], y.shape[0]) - 1}] for these set sizes, got {k}")
    real_radii = _kth_neighbour_radii(x, k, chunk)
    fake_radii = _kth_neighbour_radii(y, k, chunk)
    precision = _coverage(y, x, real_radii, chunk)
    recall = _coverage(x, y, fake_radii, chunk)
    return precision, recall
