"""Mutual Information Gap, disentanglement_lib's discrete variant (after Chen et al., 2018).

Each code dim is discretized into ``num_bins`` equal-width bins over its observed range (the
edges of ``np.histogram``, bins assigned by ``np.digitize``), then ``I(z_j; v_k)`` is the plug-in
mutual information of sklearn's ``mutual_info_score`` (nats) and ``H(v_k) = I(v_k; v_k)``.

    MIG = mean_k (I_(1)k - I_(2)k) / H(v_k)

with ``I_(1)k >= I_(2)k`` the two largest ``I(z_j; v_k)`` over j. This is *not* Chen et al.'s
continuous MIG (a different number). Conventions for degenerate inputs: with a single code dim
the runner-up is 0; factors that do not vary in the sample (``H = 0``) are left out of the mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import Field

from ncpvae.component import StrictModel
from ncpvae.data import GroundTruthData
from ncpvae.errors import DataError
from ncpvae.metrics._common import (
    DEFAULT_BATCH_SIZE,
    MetricResult,
    RepresentFn,
    check_codes_factors,
    make_rng,
    sample_codes,
)

NUM_BINS = 20


class MIGConfig(StrictModel):
    num_train: int = Field(10_000, ge=2, description="points whose codes are discretized")
    num_bins: int = Field(NUM_BINS, ge=2, description="equal-width bins per code dim")


@dataclass(frozen=True)
class MIGResult(MetricResult):
    mig: float
    gap_per_factor: tuple[float, ...]  # normalized gap of each factor (nan where H(v_k) = 0)


def discretize_codes(codes: np.ndarray, num_bins: int = NUM_BINS) -> np.ndarray:
    """Equal-width histogram bins per column: ``(n, D)`` floats -> ``(n, D)`` ints in [1, num_bins]."""
    out = np.empty(codes.shape, dtype=np.int64)
    for j in range(codes.shape[1]):
        edges = np.histogram(codes[:, j], bins=num_bins)[1]
        # Dropping the last edge puts the maximum into the top bin instead of a bin of its own.
        out[:, j] = np.digitize(codes[:, j], edges[:-1])
    return out


def mutual_info_matrix(discrete_codes: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Plug-in mutual information (nats) ``(D, K)`` between discrete codes and factors."""
    from sklearn.metrics import mutual_info_score  # imported on use (slow to import)

    num_dims, num_factors = discrete_codes.shape[1], factors.shape[1]
    m = np.empty((num_dims, num_factors))
    for j in range(num_dims):
        for k in range(num_factors):
            m[j, k] = mutual_info_score(factors[:, k], discrete_codes[:, j])
    return m


def factor_entropies(factors: np.ndarray) -> np.ndarray:
    """Plug-in entropy (nats) of each factor column, ``(K,)``."""
    from sklearn.metrics import mutual_info_score

    return np.array([mutual_info_score(f, f) for f in factors.T])


def mig_gaps(codes: np.ndarray, factors: np.ndarray, num_bins: int = NUM_BINS) -> np.ndarray:
    """Normalized gap per factor ``(K,)``; nan for factors constant in the sample."""
    codes, factors = check_codes_factors(codes, factors)
    m = mutual_info_matrix(discretize_codes(codes, num_bins), factors)
    if m.shape[0] == 1:
        m = np.vstack([m, np.zeros_like(m)])
    top = -np.sort(-m, axis=0)
    entropy = factor_entropies(factors)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(entropy > 0, (top[0] - top[1]) / entropy, np.nan)


def mig_from_codes(codes: np.ndarray, factors: np.ndarray, num_bins: int = NUM_BINS) -> float:
    """MIG of codes ``(n, D)`` against integer factors ``(n, K)``: a float in [0, 1]."""
    gaps = mig_gaps(codes, factors, num_bins)
    if np.isnan(gaps).all():
        raise DataError("MIG: no factor varies in the sample; use more points")
    return float(np.nanmean(gaps))


def compute_mig(
    data: GroundTruthData,
    represent: RepresentFn,
    *,
    config: MIGConfig | None = None,
    seed: int | np.random.Generator = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> MIGResult:
    """MIG on ``num_train`` i.i.d. points of ``data``."""
    cfg = config or MIGConfig()
    codes, factors = sample_codes(data, represent, cfg.num_train, make_rng(seed), batch_size)
    gaps = mig_gaps(codes, factors, cfg.num_bins)
    if np.isnan(gaps).all():
        raise DataError("MIG: no factor varies in the sample; use more points")
    return MIGResult(mig=float(np.nanmean(gaps)), gap_per_factor=tuple(float(g) for g in gaps))
