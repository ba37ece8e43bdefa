"""Disentanglement, Completeness, Informativeness (Eastwood & Williams, ICLR 2018).

disentanglement_lib semantics: per factor k, a default sklearn ``GradientBoostingClassifier``
predicts v_k from the codes; ``R[j, k] = |feature_importances_[j]|`` (an importance matrix
``(D, K)``), and informativeness is the classifiers' mean accuracy (train and test).

- disentanglement: each code's row of R, normalized, has entropy ``H_K`` (log base K);
  ``D = sum_j rho_j (1 - H_K(row_j))`` with code weights ``rho_j = sum_k R[j,k] / sum R``.
- completeness: each factor's column, normalized, has entropy ``H_D`` (log base D);
  ``C = sum_k w_k (1 - H_D(col_k))`` with ``w_k = sum_j R[j,k] / sum R``.

The factor weights are disentanglement_lib's; gradient-boosting importances sum to 1 per factor,
so for them ``w_k = 1/K`` and C is exactly the mean over factors. Conventions: an all-zero row
(column) counts as uniform (score 0; it has zero weight unless R is all zero, where every weight
is equal and both scores are 0); with one factor (one code) the entropy base is degenerate and
the normalized entropy is taken as 0. The classifier is seeded for reproducibility.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ncpvae.data import GroundTruthData
from ncpvae.errors import DataError
from ncpvae.metrics._common import (
    DEFAULT_BATCH_SIZE,
    MetricResult,
    RepresentFn,
    TrainTestConfig,
    check_codes_factors,
    score_train_test,
)


class DCIConfig(TrainTestConfig):
    """disentanglement_lib's study defaults; slow (minutes): reduce for quick checks."""


@dataclass(frozen=True)
class DCIResult(MetricResult):
    disentanglement: float
    completeness: float
    informativeness_train: float
    informativeness_test: float
    importance: tuple[tuple[float, ...], ...]  # R as nested tuples, (D, K)


def _normalized_entropy(p: np.ndarray, axis: int) -> np.ndarray:
    """Entropy of each slice of ``p`` along ``axis`` after normalizing, in log base ``len``."""
    n = p.shape[axis]
    if n == 1:
        return np.zeros(p.shape[1 - axis])
    total = p.sum(axis=axis, keepdims=True)
    # An all-zero slice counts as uniform: maximal entropy, score 0.
    q = np.where(total > 0, p / np.where(total > 0, total, 1.0), 1.0 / n)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(q > 0, q * np.log(q), 0.0)
    return -terms.sum(axis=axis) / np.log(n)


def _check_importance(importance: np.ndarray) -> np.ndarray:
    r = np.asarray(importance, dtype=np.float64)
    if r.ndim != 2 or r.size == 0:
        raise DataError(f"importance matrix must be 2-D (codes, factors), got shape {r.shape}")
    if not np.isfinite(r).all() or (r < 0).any():
        raise DataError("importance matrix must be finite and non-negative")
    return r


def disentanglement_from_importance(importance: np.ndarray) -> float:
    """DCI disentanglement of an importance matrix ``(D, K)`` (codes x factors), in [0, 1]."""
    r = _check_importance(importance)
    per_code = 1.0 - _normalized_entropy(r, axis=1)
    weights = r.sum(axis=1) if r.sum() > 0 else np.ones(r.shape[0])
    return float(np.sum(per_code * weights / weights.sum()))


def completeness_from_importance(importance: np.ndarray) -> float:
    """DCI completeness of an importance matrix ``(D, K)`` (codes x factors), in [0, 1]."""
    r = _check_importance(importance)
    per_factor = 1.0 - _normalized_entropy(r, axis=0)
    weights = r.sum(axis=0) if r.sum() > 0 else np.ones(r.shape[1])
    return float(np.sum(per_factor * weights / weights.sum()))


def importance_matrix(
    codes_train: np.ndarray, factors_train: np.ndarray, codes_test: np.ndarray,
    factors_test: np.ndarray, *, random_state: int = 0,
) -> tuple[np.ndarray, float, float]:
    """Gradient-boosting importances ``(D, K)`` and mean train / test accuracy over factors."""
    codes_train, factors_train = check_codes_factors(codes_train, factors_train)
    codes_test, factors_test = check_codes_factors(codes_test, factors_test)
    from sklearn.ensemble import GradientBoostingClassifier  # imported on use (slow to import)

    num_factors = factors_train.shape[1]
    r = np.zeros((codes_train.shape[1], num_factors))
    train_acc, test_acc = [], []
    for k in range(num_factors):
        y = factors_train[:, k]
        if np.unique(y).size < 2:
            # Nothing to predict: zero importance, every prediction of the one value is right.
            train_acc.append(1.0)
            test_acc.append(float(np.mean(factors_test[:, k] == y[0])))
            continue
        model = GradientBoostingClassifier(random_state=random_state)
        model.fit(codes_train, y)
        r[:, k] = np.abs(model.feature_importances_)
        train_acc.append(float(np.mean(model.predict(codes_train) == y)))
        test_acc.append(float(np.mean(model.predict(codes_test) == factors_test[:, k])))
    return r, float(np.mean(train_acc)), float(np.mean(test_acc))


def dci_from_codes(
    codes_train: np.ndarray, factors_train: np.ndarray, codes_test: np.ndarray,
    factors_test: np.ndarray, *, random_state: int = 0,
) -> DCIResult:
    """DCI scores from precomputed codes ``(n, D)`` and integer factors ``(n, K)``."""
    r, train_acc, test_acc = importance_matrix(codes_train, factors_train, codes_test,
                                               factors_test, random_state=random_state)
    return DCIResult(
        disentanglement=disentanglement_from_importance(r),
        completeness=completeness_from_importance(r),
        informativeness_train=train_acc,
        informativeness_test=test_acc,
        importance=tuple(tuple(float(v) for v in row) for row in r),
    )


def compute_dci(
    data: GroundTruthData,
    represent: RepresentFn,
    *,
    config: DCIConfig | None = None,
    seed: int | np.random.Generator = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> DCIResult:
    """DCI on ``num_train`` / ``num_test`` i.i.d. points of ``data``."""
    return score_train_test(data, represent, config or DCIConfig(), seed, batch_size,
                            dci_from_codes)
