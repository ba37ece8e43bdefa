"""Kernels and the unbiased MMD^2 estimator shared by the prior-fit and sample-quality metrics.

For samples ``X = {x_i}_{i<n}`` and ``Y = {y_j}_{j<m}`` and a kernel k, the unbiased estimator
(Gretton et al. 2012, eq. 3) is

    MMD^2_u = sum_{i != i'} k(x_i, x_i') / (n (n-1)) + sum_{j != j'} k(y_j, y_j') / (m (m-1))
              - 2 sum_{i, j} k(x_i, y_j) / (n m),

which has expectation exactly ``MMD^2`` and so can be negative when the laws agree.
All computations are in float64 numpy.
"""

from __future__ import annotations

import numpy as np
import torch

from ncpvae.errors import DataError


def as_samples(x: object, what: str) -> np.ndarray:
    """A finite float64 ``(n, D)`` array from a Tensor or array-like, or a clear DataError."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 2:
        raise DataError(f"{what}: expected at least 2 samples of shape (n, D), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise DataError(f"{what}: contains NaN or infinite values")
    return arr


def squared_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances ``(n, m)``, clipped at 0 against rounding."""
    d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    return np.maximum(d, 0.0)


def median_heuristic(x: np.ndarray, y: np.ndarray, *, max_points: int = 1000,
                     rng: np.random.Generator | None = None) -> float:
    """Median Euclidean distance between distinct points of the pooled sample ``X u Y``.

    At most ``max_points`` pooled points are used (a random subset). Returns 1.0 if every
    distance is 0 (all points identical: then any bandwidth gives MMD = 0).
    """
    pooled = np.concatenate([x, y], axis=0)
    if pooled.shape[0] > max_points:
        rng = rng if rng is not None else np.random.default_rng(0)
        pooled = pooled[rng.choice(pooled.shape[0], max_points, replace=False)]
    d2 = squared_distances(pooled, pooled)
    med = float(np.median(np.sqrt(d2[np.triu_indices_from(d2, k=1)])))
    return med if med > 0 else 1.0


def gaussian_kernel(x: np.ndarray, y: np.ndarray, bandwidth: float) -> np.ndarray:
    """``k(x, y) = exp(-|x - y|^2 / (2 bandwidth^2))``, ``(n, m)``."""
    return np.exp(-squared_distances(x, y) / (2.0 * bandwidth**2))


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3) -> np.ndarray:
    """KID's kernel ``k(x, y) = (x . y / d + 1)^degree`` with d the feature dimension."""
    return (x @ y.T / x.shape[1] + 1.0) ** degree


def mmd2_unbiased(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    """Unbiased MMD^2 from the three kernel blocks ``(n, n)``, ``(m, m)``, ``(n, m)``."""
    n, m = kxx.shape[0], kyy.shape[0]
    if n < 2 or m < 2:
        raise DataError(f"unbiased MMD needs at least 2 samples per side, got {n} and {m}")
    sxx = kxx.sum() - np.trace(kxx)
    syy = kyy.sum() - np.trace(kyy)
    return float(sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2.0 * kxy.sum() / (n * m))
