"""How well a prior matches the aggregate posterior: two-sample tests on latents ``(n, D)``.

Inputs are samples from the prior and held-out encodings (e.g. encoder means or reparameterized
draws of q(z|x) on test images); both as Tensors or arrays ``(n, D)``.

- :func:`mmd_permutation_test`: unbiased MMD^2 with a Gaussian kernel whose bandwidth is the
  *median heuristic* (the median Euclidean distance between distinct points of the pooled
  sample, from at most 1000 of them; Gretton et al. 2012), and a permutation p-value
  ``(1 + #{permuted MMD^2 >= observed}) / (1 + num_permutations)``, which is exact (valid at
  every level) under H0: both samples come from one law.
- :func:`classifier_two_sample_test` (Lopez-Paz & Oquab 2017): a fresh sklearn classifier is
  fitted on half of a class-balanced pool and scored on the other half. Held-out accuracy near
  0.5 means indistinguishable; its binomial standard error is ``sqrt(acc (1 - acc) / n_test)``
  and the one-sided p-value is ``P(Binomial(n_test, 1/2) >= correct)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from ncpvae.component import StrictModel
from ncpvae.errors import DataError
from ncpvae.metrics._common import MetricResult, make_rng
from ncpvae.metrics.mmd import as_samples, median_heuristic, squared_distances

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline

Classifier = Literal["linear", "quadratic", "mlp"]


class PriorFitConfig(StrictModel):
    num_permutations: int = Field(200, ge=1, description="permutations for the MMD p-value")
    max_samples: int = Field(2000, ge=2, description="per side, subsampled beyond (O(n^2) memory)")
    classifier: Classifier = Field("quadratic", description="C2ST classifier")
    test_fraction: float = Field(0.5, gt=0, lt=1, description="C2ST held-out fraction")


@dataclass(frozen=True)
class MMDTestResult(MetricResult):
    mmd2: float
    p_value: float
    bandwidth: float
    num_permutations: int
    n_x: int
    n_y: int


@dataclass(frozen=True)
class C2STResult(MetricResult):
    accuracy: float
    se: float
    p_value: float
    n_train: int
    n_test: int
    classifier: str


@dataclass(frozen=True)
class PriorFitResult(MetricResult):
    mmd: MMDTestResult
    c2st: C2STResult


def _subsample(x: np.ndarray, max_samples: int, rng: np.random.Generator) -> np.ndarray:
    if x.shape[0] <= max_samples:
        return x
    return x[rng.choice(x.shape[0], max_samples, replace=False)]


def mmd_permutation_test(
    x: object,
    y: object,
    *,
    num_permutations: int = 200,
    bandwidth: float | None = None,
    max_samples: int = 2000,
    seed: int | np.random.Generator = 0,
) -> MMDTestResult:
    """Unbiased Gaussian-kernel MMD^2 between ``x`` ``(n, D)`` and ``y`` ``(m, D)`` and its p-value.

    ``bandwidth`` None uses the median heuristic. Each side is subsampled to ``max_samples``.
    """
    rng = make_rng(seed)
    x = _subsample(as_samples(x, "x"), max_samples, rng)
    y = _subsample(as_samples(y, "y"), max_samples, rng)
    if x.shape[1] != y.shape[1]:
        raise DataError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    if num_permutations < 1:
        raise DataError(f"num_permutations must be >= 1, got {num_permutations}")
    if bandwidth is None:
        bandwidth = median_heuristic(x, y, rng=rng)
    elif not bandwidth > 0:
        raise DataError(f"bandwidth must be > 0, got {bandwidth}")
    n, m = x.shape[0], y.shape[0]
    pooled = np.concatenate([x, y], axis=0)
    k = np.exp(-squared_distances(pooled, pooled) / (2.0 * bandwidth**2))
    np.fill_diagonal(k, 0.0)  # the U-statistic never pairs a point with itself
    row_sums, total = k.sum(1), k.sum()

    def statistics(a: np.ndarray) -> np.ndarray:
        # a: (N, P) membership indicators of the x-side; quadratic forms give all three sums.
        s_xx = np.einsum("np,np->p", a, k @ a)
        s_x_all = row_sums @ a
        s_yy = total - 2.0 * s_x_all + s_xx
        s_xy = s_x_all - s_xx
        return s_xx / (n * (n - 1)) + s_yy / (m * (m - 1)) - 2.0 * s_xy / (n * m)

    observed = float(statistics(np.r_[np.ones(n), np.zeros(m)][:, None])[0])
    exceed = 0
    chunk = 64
    for start in range(0, num_permutations, chunk):
        p = min(chunk, num_permutations - start)
        a = np.zeros((n + m, p))
        for c in range(p):
            a[rng.permutation(n + m)[:n], c] = 1.0
        exceed += int(np.sum(statistics(a) >= observed))
    return MMDTestResult(
        mmd2=observed,
        p_value=(1 + exceed) / (1 + num_permutations),
        bandwidth=float(bandwidth),
        num_permutations=num_permutations,
        n_x=n,
        n_y=m,
    )


def make_classifier(kind: Classifier, random_state: int) -> Pipeline:
    """The C2ST classifiers: standardized inputs, then a (quadratic) logistic model or an MLP."""
    # scikit-learn is imported on use (slow to import; loading a config must not pay for it)
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import PolynomialFeatures, StandardScaler

    if kind == "linear":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    if kind == "quadratic":
        # Squares and products let a linear model see differences in scale and correlation too.
        return make_pipeline(StandardScaler(), PolynomialFeatures(2, include_bias=False),
                             StandardScaler(), LogisticRegression(max_iter=1000))
    if kind == "mlp":
        return make_pipeline(StandardScaler(), MLPClassifier(
            hidden_layer_sizes=(64, 64), early_stopping=True, max_iter=300,
            random_state=random_state))
    raise DataError(f"unknown C2ST classifier '{kind}'; choose linear, quadratic or mlp")


def classifier_two_sample_test(
    x: object,
    y: object,
    *,
    classifier: Classifier = "quadratic",
    test_fraction: float = 0.5,
    seed: int | np.random.Generator = 0,
) -> C2STResult:
    """Held-out accuracy of a classifier telling ``x`` ``(n, D)`` from ``y`` ``(m, D)``.

    Both sides are subsampled to ``min(n, m)`` so chance level is exactly 0.5, then split per
    class into train and test parts (``test_fraction`` held out).
    """
    rng = make_rng(seed)
    x, y = as_samples(x, "x"), as_samples(y, "y")
    if x.shape[1] != y.shape[1]:
        raise DataError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    if not 0 < test_fraction < 1:
        raise DataError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    n = min(x.shape[0], y.shape[0])
    n_test = int(round(n * test_fraction))
    if n_test < 1 or n - n_test < 1:
        raise DataError(f"C2ST: {n} samples per side are too few to split; pass more samples")
    x = x[rng.permutation(x.shape[0])[:n]]
    y = y[rng.permutation(y.shape[0])[:n]]
    train = np.concatenate([x[n_test:], y[n_test:]])
    train_labels = np.r_[np.ones(n - n_test), np.zeros(n - n_test)]
    test = np.concatenate([x[:n_test], y[:n_test]])
    test_labels = np.r_[np.ones(n_test), np.zeros(n_test)]
    model = make_classifier(classifier, int(rng.integers(0, 2**31 - 1)))
    model.fit(train, train_labels)
    correct = int(np.sum(model.predict(test) == test_labels))
    total = 2 * n_test
    acc = correct / total
    from scipy.stats import binom  # imported on use (slow to import)

    return C2STResult(
        accuracy=acc,
        se=float(np.sqrt(acc * (1 - acc) / total)),
        p_value=float(binom.sf(correct - 1, total, 0.5)),
        n_train=2 * (n - n_test),
        n_test=total,
        classifier=classifier,
    )


def prior_fit(
    prior_samples: object,
    encodings: object,
    *,
    config: PriorFitConfig | None = None,
    seed: int | np.random.Generator = 0,
) -> PriorFitResult:
    """Both two-sample tests between prior samples ``(n, D)`` and held-out encodings ``(m, D)``."""
    cfg = config or PriorFitConfig()
    rng = make_rng(seed)
    return PriorFitResult(
        mmd=mmd_permutation_test(prior_samples, encodings, num_permutations=cfg.num_permutations,
                                 max_samples=cfg.max_samples, seed=rng),
        c2st=classifier_two_sample_test(prior_samples, encodings, classifier=cfg.classifier,
                                        test_fraction=cfg.test_fraction, seed=rng),
    )
