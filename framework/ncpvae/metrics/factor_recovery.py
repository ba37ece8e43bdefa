"""Factor recovery: does a reconstruction keep the ground-truth factors of its image?

The feature network (a factor classifier, :mod:`ncpvae.metrics.feature_net`) predicts every
factor of held-out images and of their reconstructions. For factor ``k``

    accuracy_original_k       = mean_i [ net_k(x_i) = y_ik ]
    accuracy_reconstruction_k = mean_i [ net_k(x̂_i) = y_ik ]
    recovery_k                = accuracy_reconstruction_k / accuracy_original_k

with ``y_ik`` the true factor index. ``recovery_k = 1`` when the reconstructions are as
recognisable as the originals (identity reconstructions give exactly 1); a reconstruction that
loses factor ``k`` drops ``accuracy_reconstruction_k`` to about the base rate of the classifier's
most frequent guess (``1 / size_k`` for balanced data), so ``recovery_k`` falls to about
``(1 / size_k) / accuracy_original_k``. The ratio divides out the classifier's own errors; the
raw accuracies are reported too, and ``agreement_k`` (the net predicts the same class for both).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ncpvae.errors import DataError
from ncpvae.metrics.feature_net import FeatureNet, predict_factors


@dataclass(frozen=True)
class FactorRecoveryResult:
    """Per factor (dicts keyed by factor name): accuracies on originals and reconstructions,
    their ratio ``recovery``, the chance level ``1 / size``, and prediction agreement."""

    num_images: int
    accuracy_original: dict[str, float]
    accuracy_reconstruction: dict[str, float]
    recovery: dict[str, float]
    chance: dict[str, float]
    agreement: dict[str, float]
    mean_recovery: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def factor_recovery(net: FeatureNet, originals: Tensor, reconstructions: Tensor,
                    factors: Tensor | np.ndarray, *, factor_sizes: Sequence[int] | None = None,
                    batch_size: int = 512) -> FactorRecoveryResult:
    """Score ``reconstructions`` ``(n, C, H, W)`` of ``originals`` (same shape) whose true
    factor indices are ``factors`` ``(n, K)`` with the factor classifier ``net`` (one head per
    factor, in order). ``recovery`` is NaN for a factor the net never gets right on the
    originals. Raises :class:`DataError` on mismatched shapes."""
    names = tuple(net.spec.head_names)
    sizes = tuple(factor_sizes) if factor_sizes is not None else tuple(net.spec.head_sizes)
    truth = np.asarray(torch.as_tensor(factors).long().cpu())
    if originals.shape != reconstructions.shape:
        raise DataError(f"factor recovery: originals {tuple(originals.shape)} and "
                        f"reconstructions {tuple(reconstructions.shape)} differ in shape")
    if truth.ndim != 2 or truth.shape != (originals.shape[0], len(names)):
        raise DataError(f"factor recovery: factors must be (n, {len(names)}) for "
                        f"{originals.shape[0]} images and a net with heads {names}, got "
                        f"{tuple(truth.shape)}")
    if len(sizes) != len(names):
        raise DataError(f"factor recovery: {len(sizes)} factor sizes for {len(names)} heads")
    if originals.shape[0] < 1:
        raise DataError("factor recovery needs at least one image")
    pred_x = predict_factors(net, originals, batch_size=batch_size)
    pred_r = predict_factors(net, reconstructions, batch_size=batch_size)
    acc_x = (pred_x == truth).mean(0)
    acc_r = (pred_r == truth).mean(0)
    agree = (pred_x == pred_r).mean(0)
    ratio = [float(r / x) if x > 0 else math.nan for r, x in zip(acc_r, acc_x)]
    finite = [r for r in ratio if not math.isnan(r)]
    return FactorRecoveryResult(
        num_images=int(truth.shape[0]),
        accuracy_original={n: float(v) for n, v in zip(names, acc_x)},
        accuracy_reconstruction={n: float(v) for n, v in zip(names, acc_r)},
        recovery=dict(zip(names, ratio)),
        chance={n: 1.0 / int(s) for n, s in zip(names, sizes)},
        agreement={n: float(v) for n, v in zip(names, agree)},
        mean_recovery=float(np.mean(finite)) if finite else math.nan,
    )
