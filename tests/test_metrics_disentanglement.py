"""Disentanglement metrics: closed-form cases and calibration on a synthetic ground truth.

The synthetic dataset's "images" are the factor indices themselves, shape ``(n, 1, 1, K)``, so a
representation can be exactly disentangled (identity codes), ignore the input (random codes),
be constant (zero codes) or redundant (duplicated codes). Sizes are reduced from
disentanglement_lib's defaults; every threshold below is derived in a comment.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pydantic import ValidationError

from ncpvae.data import GroundTruthData
from ncpvae.errors import DataError
from ncpvae.metrics import (
    BetaVAEConfig,
    DCIConfig,
    FactorVAEConfig,
    MIGConfig,
    SAPConfig,
    completeness_from_importance,
    compute_beta_vae,
    compute_dci,
    compute_factor_vae,
    compute_mig,
    compute_sap,
    disentanglement_from_importance,
    mig_from_codes,
)
from ncpvae.metrics.mig import discretize_codes
from ncpvae.metrics.sap import sap_from_score_matrix


class ToyFactors:
    """Uniform independent discrete factors; the image of a factor vector is the vector."""

    def __init__(self, sizes: tuple[int, ...]):
        self.factor_sizes = tuple(sizes)
        self.factor_names = tuple(f"f{i}" for i in range(len(sizes)))

    def sample_factors(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.stack([torch.randint(0, s, (n,), generator=generator)
                            for s in self.factor_sizes], 1)

    def images_from_factors(self, factors: torch.Tensor) -> torch.Tensor:
        return factors.to(torch.float32).view(factors.shape[0], 1, 1, -1)


def identity_plus_noise(num_noise: int = 2, seed: int = 0):
    """Codes = factor indices, plus ``num_noise`` N(0, 1) dims independent of everything."""
    gen = torch.Generator().manual_seed(seed)

    def represent(images: torch.Tensor) -> torch.Tensor:
        z = images.flatten(1).double()
        return torch.cat([z, torch.randn(z.shape[0], num_noise, generator=gen,
                                         dtype=torch.float64)], 1)

    return represent


def random_codes(dim: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return lambda images: torch.randn(images.shape[0], dim, generator=gen)


def zero_codes(images: torch.Tensor) -> np.ndarray:
    return np.zeros((images.shape[0], 4))


def duplicated_codes(images: torch.Tensor) -> torch.Tensor:
    z = images.flatten(1)
    return torch.cat([z, z], 1)


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n)


SIZES = (4, 5, 6)


def test_toy_dataset_satisfies_protocol():
    assert isinstance(ToyFactors(SIZES), GroundTruthData)


# --------------------------------------------------------------------------- DCI, closed forms

def test_dci_diagonal_importance_is_perfect():
    r = np.diag(5.0 * np.ones(5))
    assert disentanglement_from_importance(r) == pytest.approx(1.0)
    assert completeness_from_importance(r) == pytest.approx(1.0)


def test_dci_one_code_for_two_factors():
    # 5 codes x 10 factors, each code equally important for two factors: every row's normalized
    # entropy is ln 2 / ln 10, so D = 1 - ln2/ln10; each factor has one code, so C = 1.
    r = np.hstack([np.diag(5.0 * np.ones(5))] * 2)
    assert disentanglement_from_importance(r) == pytest.approx(1 - math.log(2) / math.log(10))
    assert completeness_from_importance(r) == pytest.approx(1.0)


def test_dci_redundant_codes():
    # 10 codes x 5 factors, each factor split equally over two codes: C = 1 - ln2/ln10, D = 1.
    r = np.vstack([np.diag(5.0 * np.ones(5))] * 2)
    assert disentanglement_from_importance(r) == pytest.approx(1.0)
    assert completeness_from_importance(r) == pytest.approx(1 - math.log(2) / math.log(10))


def test_dci_degenerate_matrices():
    # Unused codes carry no weight; an all-zero matrix scores 0 (disentanglement_lib's cases).
    assert disentanglement_from_importance(np.array([[1.0, 0], [0, 1], [0, 0]])) == pytest.approx(1)
    assert completeness_from_importance(np.array([[1.0, 0], [0, 1], [0, 0]])) == pytest.approx(1)
    assert disentanglement_from_importance(np.zeros((10, 10))) == pytest.approx(0.0, abs=1e-12)
    assert completeness_from_importance(np.zeros((10, 10))) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(DataError, match="non-negative"):
        disentanglement_from_importance(-np.eye(3))


@settings(derandomize=True, max_examples=40, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(2, 6), st.integers(2, 6)),
              elements=st.floats(0.0, 10.0)))
def test_dci_bounds_and_permutation_invariance(r):
    d, c = disentanglement_from_importance(r), completeness_from_importance(r)
    assert -1e-12 <= d <= 1 + 1e-12 and -1e-12 <= c <= 1 + 1e-12
    rows, cols = np.arange(r.shape[0])[::-1], np.roll(np.arange(r.shape[1]), 1)
    assert disentanglement_from_importance(r[rows][:, cols]) == pytest.approx(d)
    assert completeness_from_importance(r[rows][:, cols]) == pytest.approx(c)


@settings(derandomize=True, max_examples=30, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(2, 6), st.integers(2, 6)),
              elements=st.floats(0.01, 10.0)))
def test_completeness_is_mean_over_factors_for_normalized_importances(r):
    # Gradient-boosting importances sum to 1 per factor; then C is the plain mean over factors.
    r = r / r.sum(0, keepdims=True)
    q = r / r.sum(0, keepdims=True)
    per_factor = 1 + (q * np.log(q)).sum(0) / math.log(r.shape[0])
    assert completeness_from_importance(r) == pytest.approx(per_factor.mean())


# --------------------------------------------------------------------------- MIG, pure

def test_discretization_separates_integer_codes():
    # Equal-width bins of width (m-1)/20 < 1 put each of the m <= 20 integer values in its own bin.
    codes = np.arange(7, dtype=np.float64).repeat(3)[:, None]
    assert np.unique(discretize_codes(codes, 20)).size == 7
    assert np.unique(discretize_codes(np.zeros((5, 1)))).size == 1  # constant: one bin


def test_mig_from_codes_sanity_cases():
    rng = np.random.default_rng(0)
    factors = np.stack([rng.integers(0, s, 3000) for s in SIZES], 1)
    noise = rng.normal(size=(3000, 2))
    codes = np.hstack([factors.astype(float), noise])
    # Identity codes: I(z_k; v_k) = H(v_k) exactly after binning; the runner-up is a plug-in MI
    # of independent variables, 2 n I ~ chi2((B-1)(m-1)); for B = 20, m <= 6, n = 3000 its
    # 5-sigma upper value (95 + 5 sqrt(190)) / 6000 = 0.027 nats is < 2.5 % of H >= ln 4.
    assert mig_from_codes(codes, factors) > 0.975
    assert mig_from_codes(np.hstack([codes, codes]), factors) == 0.0  # duplicates: top1 = top2
    assert mig_from_codes(np.zeros((3000, 3)), factors) == 0.0
    # One code dim: the runner-up counts as 0.
    assert mig_from_codes(factors[:, :1].astype(float), factors[:, :1]) == pytest.approx(1.0)


@settings(derandomize=True, max_examples=15, deadline=None)
@given(st.floats(0.1, 100.0), st.floats(-50.0, 50.0))
def test_mig_invariant_to_affine_rescaling(scale, shift):
    # Equal-width bins over the observed range are equivariant under z -> a z + b (a > 0).
    rng = np.random.default_rng(1)
    factors = rng.integers(0, 4, size=(400, 2))
    codes = factors + rng.normal(scale=0.7, size=(400, 2))
    assert mig_from_codes(scale * codes + shift, factors) == pytest.approx(
        mig_from_codes(codes, factors), abs=1e-9)


def test_mig_rejects_bad_input():
    with pytest.raises(DataError, match="NaN"):
        mig_from_codes(np.full((10, 2), np.nan), np.zeros((10, 1), dtype=int))
    with pytest.raises(DataError, match="integer"):
        mig_from_codes(np.zeros((10, 2)), np.zeros((10, 1)))
    with pytest.raises(DataError, match="shape"):
        mig_from_codes(np.zeros((10, 2)), np.zeros((9, 1), dtype=int))


def test_sap_score_matrix_gap():
    s = np.array([[1.0, 0.4], [0.6, 0.5], [0.2, 0.9]])
    assert sap_from_score_matrix(s) == pytest.approx(((1.0 - 0.6) + (0.9 - 0.5)) / 2)


# --------------------------------------------------------------------------- beta-VAE metric

BVAE_SMALL = BetaVAEConfig(group_size=16, num_train=600, num_eval=600)


def test_beta_vae_identity_codes_near_ceiling():
    # Feature coordinate k is exactly 0 for the fixed factor; coordinate j != k is a mean of 16
    # |a - b| with E = (m^2 - 1)/(3m) >= 1.25 (m = 4) and sd <= 1.3/4, so the zero coordinate is
    # ~4 sd below every other one: linearly separable, accuracy near 1 (> 0.95).
    res = compute_beta_vae(ToyFactors(SIZES), identity_plus_noise(), config=BVAE_SMALL, seed=0)
    assert res.train_accuracy > 0.95 and res.eval_accuracy > 0.95


def test_beta_vae_random_codes_at_chance():
    # Codes independent of the images make eval predictions independent of the uniform label:
    # expected accuracy exactly 1/K, binomial SE over num_eval points.
    res = compute_beta_vae(ToyFactors(SIZES), random_codes(), config=BVAE_SMALL, seed=0)
    assert abs(res.eval_accuracy - 1 / 3) < 5 * binomial_se(1 / 3, BVAE_SMALL.num_eval)


def test_beta_vae_independent_of_batch_size():
    data, cfg = ToyFactors(SIZES), BetaVAEConfig(group_size=8, num_train=60, num_eval=30)
    a = compute_beta_vae(data, duplicated_codes, config=cfg, seed=3, batch_size=7)
    b = compute_beta_vae(data, duplicated_codes, config=cfg, seed=3, batch_size=4096)
    assert a == b


def test_beta_vae_config_defaults_and_validation():
    cfg = BetaVAEConfig()
    assert (cfg.group_size, cfg.num_train, cfg.num_eval) == (64, 10_000, 5_000)
    with pytest.raises(ValidationError):
        BetaVAEConfig(num_trian=5)
    with pytest.raises(ValidationError):
        BetaVAEConfig(group_size=0)


# --------------------------------------------------------------------------- FactorVAE metric

FVAE_SMALL = FactorVAEConfig(group_size=32, num_train=500, num_eval=500, num_variance_estimate=1000)


def test_factor_vae_identity_codes_perfect():
    # The fixed factor's code dim has local variance exactly 0 and every other active dim a
    # positive one (another factor is constant over 32 draws with probability <= 3 * 4^-31), so
    # every vote is right: accuracy exactly 1.
    res = compute_factor_vae(ToyFactors(SIZES), identity_plus_noise(), config=FVAE_SMALL, seed=0)
    assert res.train_accuracy == 1.0 and res.eval_accuracy == 1.0
    assert res.num_active_dims == 5 and not res.collapsed


def test_factor_vae_random_codes_at_chance():
    # Votes of image-independent codes are independent of the uniform label: eval accuracy of
    # any fixed dim -> factor map is 1/K in expectation.
    res = compute_factor_vae(ToyFactors(SIZES), random_codes(), config=FVAE_SMALL, seed=0)
    assert abs(res.eval_accuracy - 1 / 3) < 5 * binomial_se(1 / 3, FVAE_SMALL.num_eval)


def test_factor_vae_zero_codes_collapsed():
    res = compute_factor_vae(ToyFactors(SIZES), zero_codes, config=FVAE_SMALL, seed=0)
    assert res.collapsed and res.num_active_dims == 0
    assert res.train_accuracy == 0.0 and res.eval_accuracy == 0.0


def test_factor_vae_prunes_low_variance_dims():
    gen = torch.Generator().manual_seed(0)

    def represent(images):  # factor codes plus a dim of std 0.01 < 0.05: pruned
        z = images.flatten(1)
        return torch.cat([z, 0.01 * torch.randn(z.shape[0], 1, generator=gen)], 1)

    res = compute_factor_vae(ToyFactors(SIZES), represent, config=FVAE_SMALL, seed=0)
    assert res.num_active_dims == 3 and res.eval_accuracy == 1.0


# --------------------------------------------------------------------------- MIG metric

def test_mig_metric_calibration():
    data, cfg = ToyFactors(SIZES), MIGConfig(num_train=2000)
    # Identity codes: runner-up MI <= (95 + 5 sqrt(190)) / 4000 = 0.041 nats (5-sigma chi2 bound,
    # see test_mig_from_codes_sanity_cases) over H >= ln 4 = 1.39, so MIG > 0.97.
    good = compute_mig(data, identity_plus_noise(), config=cfg, seed=0)
    assert good.mig > 0.97 and len(good.gap_per_factor) == 3
    # Random codes: every I(z_j; v_k) is a plug-in estimate of 0, below 0.041 nats: MIG < 0.03.
    assert 0 <= compute_mig(data, random_codes(), config=cfg, seed=0).mig < 0.03
    assert compute_mig(data, duplicated_codes, config=cfg, seed=0).mig == 0.0
    assert compute_mig(data, zero_codes, config=cfg, seed=0).mig == 0.0


def test_representation_errors_are_clear():
    data, cfg = ToyFactors(SIZES), MIGConfig(num_train=50)
    with pytest.raises(DataError, match="shape"):
        compute_mig(data, lambda x: torch.zeros(x.shape[0] + 1, 2), config=cfg)
    with pytest.raises(DataError, match="NaN"):
        compute_mig(data, lambda x: torch.full((x.shape[0], 2), float("nan")), config=cfg)
    with pytest.raises(DataError, match="batch_size"):
        compute_mig(data, zero_codes, config=cfg, batch_size=0)


# --------------------------------------------------------------------------- SAP metric

@pytest.mark.slow
def test_sap_metric_calibration():
    data, cfg = ToyFactors((3, 3)), SAPConfig(num_train=1000, num_test=1000)
    # A 1-D balanced linear SVM separates 3 ordered values of its own factor (accuracy 1), and
    # any classifier on a code independent of a uniform 3-valued factor has expected accuracy
    # 1/3: SAP = 1 - 1/3 up to the max of 3 binomial accuracies (5 SE).
    se = binomial_se(1 / 3, cfg.num_test)
    assert abs(compute_sap(data, identity_plus_noise(), config=cfg, seed=0).sap - 2 / 3) < 5 * se
    # Random codes: top two accuracies both 1/3 +- se.
    assert compute_sap(data, random_codes(), config=cfg, seed=0).sap < 5 * se
    assert compute_sap(data, duplicated_codes, config=cfg, seed=0).sap == 0.0
    assert compute_sap(data, zero_codes, config=cfg, seed=0).sap == 0.0


# --------------------------------------------------------------------------- DCI metric

DCI_SMALL = DCIConfig(num_train=300, num_test=300)


@pytest.mark.slow
def test_dci_identity_codes():
    # Each factor is read off its own code dim (noise dims carry no signal), so R is close to
    # diagonal: D and C near 1 (> 0.9), and the trees predict every factor exactly.
    res = compute_dci(ToyFactors((3, 4)), identity_plus_noise(), config=DCI_SMALL, seed=0)
    assert res.disentanglement > 0.9 and res.completeness > 0.9
    assert res.informativeness_test == 1.0
    assert np.asarray(res.importance).shape == (4, 2)


@pytest.mark.slow
def test_dci_random_codes():
    # Importances of noise codes spread evenly over the factors: D near 0 (disentanglement_lib
    # bounds its permuted-code case by 0.2); informativeness is chance, mean_k 1/m_k = 7/24.
    res = compute_dci(ToyFactors((3, 4)), random_codes(dim=4), config=DCI_SMALL, seed=0)
    assert res.disentanglement < 0.2
    assert abs(res.informativeness_test - 7 / 24) < 5 * binomial_se(1 / 3, DCI_SMALL.num_test)


@pytest.mark.slow
def test_dci_duplicated_codes():
    # 4 codes, two identical copies per factor. sklearn's splitter permutes features at every
    # node, so each split picks either copy with probability 1/2; over hundreds of splits the
    # importance share p of a copy is within [0.4, 0.6], hence 1 - H(p)/ln 4 lies in
    # [1 - ln2/ln4, 1 - 0.673/ln4] = [0.5, 0.515]. Each code still serves one factor: D ~ 1.
    res = compute_dci(ToyFactors((3, 4)), duplicated_codes, config=DCI_SMALL, seed=0)
    assert res.disentanglement > 0.9
    assert 1 - math.log(2) / math.log(4) - 1e-9 <= res.completeness <= 0.515
