"""Evaluation metrics: disentanglement, prior fit, sample quality, likelihood bounds.

Disentanglement (disentanglement_lib semantics and defaults; docs/metrics.md §5). Each takes a
:class:`~ncpvae.data.GroundTruthData`, a representation function ``images (n, C, H, W) ->
codes (n, D)`` (the encoder means), ``config=`` (defaults as in disentanglement_lib),
``seed=`` (int or ``numpy.random.Generator``) and ``batch_size=`` (images per encoder call):

- :func:`compute_beta_vae` -> train/eval accuracy of the beta-VAE metric (Higgins 2017)
- :func:`compute_factor_vae` -> train/eval accuracy, active dims, collapsed flag (Kim & Mnih 2018)
- :func:`compute_mig` / :func:`mig_from_codes` -> discrete MIG (20 equal-width bins)
- :func:`compute_dci` / :func:`dci_from_codes` -> disentanglement, completeness,
  informativeness (gradient boosting); :func:`disentanglement_from_importance`,
  :func:`completeness_from_importance` on an importance matrix ``(D, K)``
- :func:`compute_sap` / :func:`sap_from_codes` -> SAP score (1-D linear SVMs)

Prior fit (latents ``(n, D)``): :func:`mmd_permutation_test` (Gaussian kernel, median-heuristic
bandwidth, permutation p-value), :func:`classifier_two_sample_test` (held-out accuracy, 0.5 =
indistinguishable), :func:`prior_fit` (both).

Sample quality (features of a locally trained :class:`FeatureNet`): :func:`kid` (with SE),
:func:`frechet_distance`, :func:`precision_recall`, :func:`sample_quality` (all three),
:func:`factor_coverage`, :func:`factor_recovery` (per-factor accuracy on
reconstructions relative to the originals); the net: :func:`feature_net_for_ground_truth`,
:func:`feature_net_for_labels`, :func:`extract_features`, :func:`predict_factors`,
:func:`save_feature_net`, :func:`load_feature_net`, :func:`feature_net_cache_key`,
:func:`cached_feature_net`.

Likelihood: :func:`iw_bound`, :func:`elbo`, :func:`bounds` per example, and
:func:`evaluate_likelihood` (means with standard errors; NCP's ``log Z`` and its SE included).
"""

from ncpvae.metrics.beta_vae import BetaVAEConfig, BetaVAEResult, compute_beta_vae
from ncpvae.metrics.dci import (
    DCIConfig,
    DCIResult,
    completeness_from_importance,
    compute_dci,
    dci_from_codes,
    disentanglement_from_importance,
)
from ncpvae.metrics.factor_recovery import FactorRecoveryResult, factor_recovery
from ncpvae.metrics.factor_vae import FactorVAEConfig, FactorVAEResult, compute_factor_vae
from ncpvae.metrics.feature_net import (
    FeatureNet,
    FeatureNetConfig,
    FeatureNetSpec,
    cached_feature_net,
    extract_features,
    feature_net_cache_key,
    feature_net_for_ground_truth,
    feature_net_for_labels,
    load_feature_net,
    predict_factors,
    save_feature_net,
    train_feature_net,
)
from ncpvae.metrics.likelihood import (
    BoundEstimate,
    LikelihoodResult,
    bounds,
    elbo,
    evaluate_likelihood,
    iw_bound,
    summarize_bound,
)
from ncpvae.metrics.mig import MIGConfig, MIGResult, compute_mig, mig_from_codes
from ncpvae.metrics.prior_fit import (
    C2STResult,
    MMDTestResult,
    PriorFitConfig,
    PriorFitResult,
    classifier_two_sample_test,
    mmd_permutation_test,
    prior_fit,
)
from ncpvae.metrics.sample_quality import (
    SPRITES_JOINT_BINS,
    CoverageResult,
    KIDResult,
    PrecisionRecall,
    SampleQualityConfig,
    SampleQualityResult,
    factor_coverage,
    frechet_distance,
    frechet_distance_from_stats,
    kid,
    precision_recall,
    sample_quality,
)
from ncpvae.metrics.sap import SAPConfig, SAPResult, compute_sap, sap_from_codes

__all__ = [
    "SPRITES_JOINT_BINS",
    "BetaVAEConfig", "BetaVAEResult", "BoundEstimate", "C2STResult", "CoverageResult",
    "DCIConfig", "DCIResult", "FactorRecoveryResult", "FactorVAEConfig", "FactorVAEResult", "FeatureNet",
    "FeatureNetConfig", "FeatureNetSpec", "KIDResult", "LikelihoodResult", "MIGConfig", "MIGResult",
    "MMDTestResult", "PrecisionRecall", "PriorFitConfig", "PriorFitResult", "SAPConfig",
    "SAPResult", "SampleQualityConfig", "SampleQualityResult", "bounds", "cached_feature_net",
    "classifier_two_sample_test", "completeness_from_importance", "compute_beta_vae",
    "compute_dci", "compute_factor_vae", "compute_mig", "compute_sap", "dci_from_codes",
    "disentanglement_from_importance", "elbo", "evaluate_likelihood", "extract_features",
    "factor_coverage", "factor_recovery", "feature_net_cache_key", "feature_net_for_ground_truth",
    "feature_net_for_labels", "frechet_distance", "frechet_distance_from_stats", "iw_bound",
    "kid", "load_feature_net", "mig_from_codes", "mmd_permutation_test", "precision_recall",
    "predict_factors", "prior_fit", "sample_quality", "sap_from_codes", "save_feature_net",
    "summarize_bound", "train_feature_net",
]
