"""The FactorVAE disentanglement metric (Kim & Mnih, ICML 2018), disentanglement_lib semantics.

1. Global variances: per-dimension variance (ddof=1) of ``num_variance_estimate`` codes; dims
   whose std is below ``prune_threshold`` are collapsed and excluded (a code whose every dim is
   collapsed is reported as ``collapsed`` with zero accuracy, as disentanglement_lib does).
2. One vote: choose a factor k uniformly, draw ``group_size`` factor vectors that share factor k,
   encode them, and vote for ``argmin_d local_var_d / global_var_d`` over the active dims.
3. The majority-vote classifier maps each code dim to the factor it received most votes from
   (on ``num_train`` votes); accuracy is the fraction of votes it gets right (on ``num_eval``
   fresh votes for the eval score). Codes that ignore the images score ``1/K`` in expectation.
"""

from __future__ import annotations

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
    sample_codes,
    sample_fixed_factor_groups,
)


class FactorVAEConfig(StrictModel):
    """Defaults as in disentanglement_lib's study configs (its ``batch_size`` is ``group_size``)."""

    group_size: int = Field(64, ge=2, description="codes per vote (factor k fixed)")
    num_train: int = Field(10_000, ge=1, description="votes that build the classifier")
    num_eval: int = Field(5_000, ge=1, description="votes that score it")
    num_variance_estimate: int = Field(10_000, ge=2, description="codes for the global variances")
    prune_threshold: float = Field(0.05, ge=0, description="dims with global std below are pruned")


@dataclass(frozen=True)
class FactorVAEResult(TrainEvalAccuracy):
    """Majority-vote accuracies (train, eval) and the number of unpruned dims."""

    num_active_dims: int
    collapsed: bool  # True when every dim was pruned (accuracies are then 0 by convention)


def factor_vae_votes(
    data: GroundTruthData,
    represent: RepresentFn,
    num_votes: int,
    group_size: int,
    global_variances: np.ndarray,
    active: np.ndarray,
    rng: np.random.Generator,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> np.ndarray:
    """Vote counts ``(K, D)``: row = the fixed factor, column = the dim with least relative variance."""
    check_batch_size(batch_size)
    num_factors, num_dims = len(data.factor_sizes), global_variances.shape[0]
    active_idx = np.flatnonzero(active)
    votes = np.zeros((num_factors, num_dims), dtype=np.int64)
    # Factors are drawn up front so the votes do not depend on batch_size.
    labels, (factors,) = sample_fixed_factor_groups(data, num_votes, group_size, rng)
    rows, k = torch.arange(num_votes), torch.as_tensor(labels)
    factors[rows, :, k] = factors[rows, 0, k].unsqueeze(1)
    for chunk in group_chunks(num_votes, group_size, batch_size):
        part = factors[chunk].reshape(-1, num_factors)
        codes = represent_factors(data, represent, part, batch_size)
        local = codes.reshape(-1, group_size, num_dims).var(axis=1, ddof=1)
        ratio = local[:, active_idx] / global_variances[active_idx]
        winners = active_idx[np.argmin(ratio, axis=1)]
        np.add.at(votes, (labels[chunk], winners), 1)
    return votes


def majority_vote_accuracy(votes: np.ndarray, classifier: np.ndarray) -> float:
    """Fraction of ``votes`` ``(K, D)`` whose dim's assigned factor ``classifier[d]`` is right."""
    total = votes.sum()
    if total == 0:
        return 0.0
    return float(votes[classifier, np.arange(votes.shape[1])].sum() / total)


def compute_factor_vae(
    data: GroundTruthData,
    represent: RepresentFn,
    *,
    config: FactorVAEConfig | None = None,
    seed: int | np.random.Generator = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> FactorVAEResult:
    """The FactorVAE metric: majority-vote accuracy (train and eval) and the active dim count."""
    cfg = config or FactorVAEConfig()
    if len(data.factor_sizes) < 2:
        raise DataError("the FactorVAE metric needs a dataset with at least 2 factors")
    rng = make_rng(seed)
    codes, _ = sample_codes(data, represent, cfg.num_variance_estimate, rng, batch_size)
    global_variances = codes.var(axis=0, ddof=1)
    active = np.sqrt(global_variances) >= cfg.prune_threshold
    # A dim with zero variance cannot be a denominator even with threshold 0.
    active &= global_variances > 0
    if not active.any():
        return FactorVAEResult(0.0, 0.0, 0, True)
    train_votes = factor_vae_votes(data, represent, cfg.num_train, cfg.group_size,
                                   global_variances, active, rng, batch_size)
    classifier = np.argmax(train_votes, axis=0)
    eval_votes = factor_vae_votes(data, represent, cfg.num_eval, cfg.group_size,
                                  global_variances, active, rng, batch_size)
    return FactorVAEResult(
        train_accuracy=majority_vote_accuracy(train_votes, classifier),
        eval_accuracy=majority_vote_accuracy(eval_votes, classifier),
        num_active_dims=int(active.sum()),
        collapsed=False,
    )
