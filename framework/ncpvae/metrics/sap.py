"""Separated Attribute Predictability (Kumar et al., ICLR 2018), discrete factors.

disentanglement_lib semantics: for each (code dim j, factor k), a one-feature
``LinearSVC(C=0.01, class_weight="balanced")`` is fitted on the training codes and its test
accuracy is ``S[j, k]``; ``SAP = mean_k (S_(1)k - S_(2)k)``, the gap between the two best dims.

Calibration: a code independent of factor k has expected test accuracy ``1/|v_k|`` for uniform
factors, whatever the classifier, so the SAP of a perfect code is ``1 - 1/|v_k|`` at best, not 1
(a one-feature one-vs-rest linear classifier cannot even isolate the middle values of an
ordinal factor). The SVMs are seeded for reproducibility. With a single code dim the runner-up is 0.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ncpvae.data import GroundTruthData
from ncpvae.metrics._common import (
    DEFAULT_BATCH_SIZE,
    MetricResult,
    RepresentFn,
    TrainTestConfig,
    check_codes_factors,
    score_train_test,
)


class SAPConfig(TrainTestConfig):
    """disentanglement_lib's study defaults."""


@dataclass(frozen=True)
class SAPResult(MetricResult):
    sap: float
    score_matrix: tuple[tuple[float, ...], ...]  # S, (D, K) test accuracies


def sap_score_matrix(
    codes_train: np.ndarray, factors_train: np.ndarray, codes_test: np.ndarray,
    factors_test: np.ndarray, *, random_state: int = 0,
) -> np.ndarray:
    """Test accuracy ``(D, K)`` of a 1-D balanced linear SVM per (code dim, factor)."""
    codes_train, factors_train = check_codes_factors(codes_train, factors_train)
    codes_test, factors_test = check_codes_factors(codes_test, factors_test)
    from sklearn.exceptions import ConvergenceWarning  # imported on use (slow to import)
    from sklearn.svm import LinearSVC

    num_dims, num_factors = codes_train.shape[1], factors_train.shape[1]
    s = np.zeros((num_dims, num_factors))
    for k in range(num_factors):
        y = factors_train[:, k]
        if np.unique(y).size < 2:
            # A constant factor is predicted perfectly by every dim: gap 0.
            s[:, k] = np.mean(factors_test[:, k] == y[0])
            continue
        for j in range(num_dims):
            clf = LinearSVC(C=0.01, class_weight="balanced", random_state=random_state)
            with warnings.catch_warnings():
                # liblinear may hit max_iter on unscaled 1-D codes; the reference accepts that.
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf.fit(codes_train[:, j:j + 1], y)
            s[j, k] = np.mean(clf.predict(codes_test[:, j:j + 1]) == factors_test[:, k])
    return s


def sap_from_score_matrix(score_matrix: np.ndarray) -> float:
    """Mean over factors of the gap between the best and second-best dim, ``(D, K) -> float``."""
    s = np.asarray(score_matrix, dtype=np.float64)
    if s.shape[0] == 1:
        s = np.vstack([s, np.zeros_like(s)])
    top = -np.sort(-s, axis=0)
    return float(np.mean(top[0] - top[1]))


def sap_from_codes(
    codes_train: np.ndarray, factors_train: np.ndarray, codes_test: np.ndarray,
    factors_test: np.ndarray, *, random_state: int = 0,
) -> SAPResult:
    """SAP from precomputed codes ``(n, D)`` and integer factors ``(n, K)``."""
    s = sap_score_matrix(codes_train, factors_train, codes_test, factors_test,
                         random_state=random_state)
    return SAPResult(sap=sap_from_score_matrix(s),
                     score_matrix=tuple(tuple(float(v) for v in row) for row in s))


def compute_sap(
    data: GroundTruthData,
    represent: RepresentFn,
    *,
    config: SAPConfig | None = None,
    seed: int | np.random.Generator = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> SAPResult:
    """SAP on ``num_train`` / ``num_test`` i.i.d. points of ``data``."""
    return score_train_test(data, represent, config or SAPConfig(), seed, batch_size,
                            sap_from_codes)
