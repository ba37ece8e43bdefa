"""The ``[evaluate]`` section of a run config (what ``ncpvae evaluate`` computes, at which sizes).

Python defaults are the reference sizes: the disentanglement metrics use disentanglement_lib's
defaults (MATH.md §4), which take many minutes on a CPU; the shipped configs
(``default.toml``, ``smoke.toml``) set smaller sizes in their ``[evaluate]`` tables.

The metric sub-tables mirror the config classes of :mod:`ncpvae.metrics` field for field
(``[evaluate.mig]`` is :class:`ncpvae.metrics.MIGConfig`, and so on); they are declared here so
that loading a config does not import scikit-learn. A test pins the defaults to the metrics'.

The prior x sampler table: one row for the base prior (exact samples), and, when the run's
prior is a learned one (NCP), one row per entry of ``samplers`` (sampler tables, validated
like the run's ``[sampler]``), plus the run's own ``[sampler]`` if it is not already listed.

The feature network is cached under ``cache_dir`` (default ``<run>/cache``; set a shared
directory such as ``~/.cache/ncpvae`` to train it once per dataset across runs).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ncpvae.component import StrictModel
from ncpvae.sections import SamplerSection

#: every disentanglement metric (the names of their sub-tables), in report order
DISENTANGLEMENT_METRICS: tuple[str, ...] = ("beta_vae", "factor_vae", "mig", "dci", "sap")


#: a sampler table (``{name = "langevin", metropolis = true, ...}``) validated by its plugin
SamplerTable = SamplerSection


# ---------------------------------------------------------------------------------------------
# disentanglement metrics (defaults: disentanglement_lib)


class MetricSwitch(StrictModel):
    """Whether a disentanglement metric runs: unset (the default) runs it when the data has
    ground-truth factors and skips it with a note otherwise; ``true`` requires it (an error on
    data without factors); ``false`` turns it off."""

    enabled: bool | None = Field(None, description="unset: when the data has ground-truth "
                                 "factors; true: required; false: off")


class BetaVAESizes(MetricSwitch):
    """The beta-VAE metric (Higgins et al. 2017); :class:`ncpvae.metrics.BetaVAEConfig`."""

    group_size: int = Field(64, ge=1, description="pairs averaged into one feature vector")
    num_train: int = Field(10_000, ge=2, description="training points for the classifier")
    num_eval: int = Field(5_000, ge=1, description="evaluation points")


class FactorVAESizes(MetricSwitch):
    """The FactorVAE metric (Kim & Mnih 2018); :class:`ncpvae.metrics.FactorVAEConfig`."""

    group_size: int = Field(64, ge=2, description="codes per vote (factor k fixed)")
    num_train: int = Field(10_000, ge=1, description="votes that build the classifier")
    num_eval: int = Field(5_000, ge=1, description="votes that score it")
    num_variance_estimate: int = Field(10_000, ge=2, description="codes for the global variances")
    prune_threshold: float = Field(0.05, ge=0, description="dims with global std below are pruned")


class MIGSizes(MetricSwitch):
    """Mutual information gap (discrete variant); :class:`ncpvae.metrics.MIGConfig`."""

    num_train: int = Field(10_000, ge=2, description="points whose codes are discretized")
    num_bins: int = Field(20, ge=2, description="equal-width bins per code dim")


class DCISizes(MetricSwitch):
    """DCI (Eastwood & Williams 2018); :class:`ncpvae.metrics.DCIConfig`. Slow at the defaults."""

    num_train: int = Field(10_000, ge=2, description="points the classifiers are fitted on")
    num_test: int = Field(5_000, ge=1, description="held-out points for informativeness")


class SAPSizes(MetricSwitch):
    """SAP (Kumar et al. 2018); :class:`ncpvae.metrics.SAPConfig`."""

    num_train: int = Field(10_000, ge=2, description="points the classifiers are fitted on")
    num_test: int = Field(5_000, ge=1, description="held-out points they are scored on")


# ---------------------------------------------------------------------------------------------
# prior fit, sample quality, feature network, likelihood


class PriorFitSizes(StrictModel):
    """MMD permutation test and classifier two-sample test between each row's latents and
    held-out encodings ``z ~ q(z|x)``; :class:`ncpvae.metrics.PriorFitConfig` plus ``enabled``."""

    enabled: bool = Field(True, description="compute MMD and C2ST for every table row")
    num_permutations: int = Field(200, ge=1, description="permutations for the MMD p-value")
    max_samples: int = Field(2000, ge=2, description="per side, subsampled beyond (O(n^2) memory)")
    classifier: Literal["linear", "quadratic", "mlp"] = Field(
        "quadratic", description="the (fresh) C2ST classifier")
    test_fraction: float = Field(0.5, gt=0, lt=1, description="C2ST held-out fraction")


class SampleQualitySizes(StrictModel):
    """KID, Fréchet distance and precision/recall of decoded samples against held-out images,
    on the feature net's features; :class:`ncpvae.metrics.SampleQualityConfig` plus
    ``enabled``."""

    enabled: bool = Field(True, description="compute sample quality for every table row")
    kid_subset_size: int = Field(1000, ge=2, description="max points per KID block")
    kid_num_subsets: int = Field(10, ge=2, description="disjoint KID blocks (gives the SE)")
    pr_neighbours: int = Field(3, ge=1, description="k of the k-NN manifolds")


class FeatureNetSizes(StrictModel):
    """The locally trained feature network (:class:`ncpvae.metrics.FeatureNetConfig`): a factor
    classifier on ground-truth data, a label classifier on labelled data."""

    width: int = Field(32, ge=4, description="channels of the first convolution")
    feature_dim: int = Field(128, ge=2, description="width of the penultimate (feature) layer")
    pool_size: int = Field(4, ge=1, description="adaptive pooling output size")
    epochs: int = Field(3, ge=1, description="passes over the training images")
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    num_train: int = Field(50_000, ge=10, description="training images (rendered for "
                           "ground-truth data; the first ones of a labelled training set)")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="held out to report accuracy")
    seed: int = 0


class LikelihoodSizes(StrictModel):
    """Importance-weighted bound (Burda et al. 2016) and ELBO on held-out images, for the run's
    prior (NCP: with ``log Z`` and its SE) and its base prior."""

    enabled: bool = Field(True, description="compute the bounds")
    num_samples: int = Field(1000, ge=1, description="importance samples K per image")
    num_examples: int = Field(1000, ge=2, description="held-out (test) images")
    batch_size: int = Field(64, ge=1, description="images per bound evaluation")


class EvaluateConfig(StrictModel):
    """What ``ncpvae evaluate`` (and the end of ``ncpvae train``) computes, and at which sizes."""

    enabled: bool = Field(True, description="run the evaluation stage at the end of `ncpvae train`")
    batch_size: int = Field(512, ge=1, description="images per encoder / decoder / feature call")
    beta_vae: BetaVAESizes = Field(default_factory=BetaVAESizes)
    factor_vae: FactorVAESizes = Field(default_factory=FactorVAESizes)
    mig: MIGSizes = Field(default_factory=MIGSizes)
    dci: DCISizes = Field(default_factory=DCISizes)
    sap: SAPSizes = Field(default_factory=SAPSizes)

    num_samples: int = Field(1000, ge=4, description="latents drawn per prior x sampler row")
    num_heldout: int = Field(1000, ge=4, description="held-out test images (and their "
                             "encodings) each row is compared with")
    grid_size: int = Field(64, ge=1, description="decoded samples shown per row")
    samplers: list[SamplerTable] = Field(
        default_factory=lambda: [
            {"name": "sir", "num_candidates": 100},
            {"name": "langevin", "metropolis": False, "step_size": 0.02, "num_steps": 300,
             "burn_in": 150, "thin": 10},
            {"name": "langevin", "metropolis": True, "step_size": 0.05, "num_steps": 300,
             "burn_in": 150, "thin": 10, "adapt_step_size": True},
        ],
        description="samplers of the learned prior, one table row each (rows omitted when "
        "the run's prior is not a learned one)")
    include_run_sampler: bool = Field(True, description="add the run's [sampler] as a row when "
                                      "it is not among `samplers`")
    log_z_samples: int | None = Field(None, ge=2, description="base draws for NCP's log Z "
                                      "(unset: the prior's own log_z_samples)")
    prior_fit: PriorFitSizes = Field(default_factory=PriorFitSizes)
    sample_quality: SampleQualitySizes = Field(default_factory=SampleQualitySizes)
    feature_net: FeatureNetSizes = Field(default_factory=FeatureNetSizes)
    cache_dir: str | None = Field(None, description="feature-net cache (unset: <run>/cache; "
                                  "'~' is expanded, relative paths are from the working dir)")
    likelihood: LikelihoodSizes = Field(default_factory=LikelihoodSizes)
    report: Literal["html", "markdown"] = Field(
        "html", description="report.html with embedded figures, or report.md beside the PNGs")
