"""The beta-VAE disentanglement metric (Higgins et al., ICLR 2017), disentanglement_lib semantics.

One training point: choose a factor k uniformly, draw ``group_size`` pairs of factor vectors
that agree on factor k (and are independent otherwise), encode both sides, and take the feature
``mean_pairs |z1 - z2|`` (shape ``(D,)``); its label is k. A default sklearn
``LogisticRegression`` is fitted on ``num_train`` such points and scored on ``num_eval`` fresh
ones. A disentangled code has a near-zero feature coordinate for the fixed factor, so the
accuracy is near 1; codes that ignore the images score ``1/K`` in expectation.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import Field

from ncpvae.component import StrictModel
from ncpvae.data import GroundTruthData
from ncpvae.errors import DataError
from ncpvae.metrics._common import (
    DEFAULT_BATCH_SIZE,
    RepresentFn,
    TrainEvalAccuracy,
    check_batch_size,
    group_chunks,
    make_rng,
    represent_factors,
    sample_fixed_factor_groups,
)


class BetaVAEConfig(StrictModel):
    """Defaults as in disentanglement_lib (its ``batch_size`` is our ``group_size``)."""

    group_size: int = Field(64, ge=1, description="pairs averaged into one feature vector")
    num_train: int = Field(10_000, ge=2, description="training points for the classifier")
    num_eval: int = Field(5_000, ge=1, description="evaluation points")


@dataclass(frozen=True)
class BetaVAEResult(TrainEvalAccuracy):
    """Accuracy of predicting the fixed factor, on the training and the evaluation points."""


def beta_vae_features(
    data: GroundTruthData,
    represent: RepresentFn,
    num_points: int,
    group_size: int,
    rng: np.random.Generator,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """``num_points`` features ``(n, D)`` (mean absolute code difference) and labels ``(n,)``."""
    check_batch_size(batch_size)
    num_factors = len(data.factor_sizes)
    # All factors are drawn up front (int64, n * group_size * K), so the result does not depend
    # on batch_size; only rendering and encoding are chunked.
    labels, (f1, f2) = sample_fixed_factor_groups(data, num_points, group_size, rng, copies=2)
    rows, k = torch.arange(num_points), torch.as_tensor(labels)
    f2[rows, :, k] = f1[rows, :, k]
    features = []
    for chunk in group_chunks(num_points, group_size, batch_size):
        a = f1[chunk].reshape(-1, num_factors)
        b = f2[chunk].reshape(-1, num_factors)
        diff = np.abs(represent_factors(data, represent, a, batch_size)
                      - represent_factors(data, represent, b, batch_size))
        features.append(diff.reshape(-1, group_size, diff.shape[1]).mean(axis=1))
    return np.concatenate(features, axis=0), labels


def compute_beta_vae(
    data: GroundTruthData,
    represent: RepresentFn,
    *,
    config: BetaVAEConfig | None = None,
    seed: int | np.random.Generator = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> BetaVAEResult:
    """The beta-VAE metric: train and eval accuracy of predicting the fixed factor."""
    cfg = config or BetaVAEConfig()
    if len(data.factor_sizes) < 2:
        raise DataError("the beta-VAE metric needs a dataset with at least 2 factors")
    rng = make_rng(seed)
    x_train, y_train = beta_vae_features(data, represent, cfg.num_train, cfg.group_size, rng,
                                         batch_size)
    if np.unique(y_train).size < 2:
        raise DataError("beta-VAE metric: every training point has the same label; "
                        "increase num_train")
    from sklearn.exceptions import ConvergenceWarning  # imported on use (slow to import)
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(random_state=int(rng.integers(0, 2**31 - 1)))
    with warnings.catch_warnings():
        # lbfgs on unscaled features may stop at max_iter; the reference metric accepts that.
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x_train, y_train)
    train_accuracy = float(np.mean(model.predict(x_train) == y_train))
    x_eval, y_eval = beta_vae_features(data, represent, cfg.num_eval, cfg.group_size, rng,
                                       batch_size)
    eval_accuracy = float(np.mean(model.predict(x_eval) == y_eval))
    return BetaVAEResult(train_accuracy=train_accuracy, eval_accuracy=eval_accuracy)
