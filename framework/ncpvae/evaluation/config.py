"""The ``[evaluate]`` section of a run config (what ``ncpvae evaluate`` computes, at which sizes).

The metric sub-tables are the metrics' own config classes plus a switch: ``[evaluate.mig]`` is
:class:`ncpvae.metrics.MIGConfig` with ``enabled``, composed here from the metric table
(:mod:`ncpvae.evaluation.metrics_table`), so a metric's fields, defaults and bounds are declared
once, by the metric. Python defaults are the reference sizes: the disentanglement metrics use
disentanglement_lib's defaults (docs/metrics.md §5), which take many minutes on a CPU; the shipped configs
(``default.toml``, ``smoke.toml``) set smaller sizes in their ``[evaluate]`` tables.

The prior x sampler table: one row for the base prior (exact samples), and, when the run's
prior is a learned one (NCP), one row per entry of ``samplers`` (sampler tables, validated
like the run's ``[sampler]``), plus the run's own ``[sampler]`` if it is not already listed.

The feature network is cached once per machine under ``cache_dir`` (default: the ``feature_nets``
folder of the user cache, ``$NCPVAE_CACHE_DIR`` or ``$XDG_CACHE_HOME/ncpvae`` or
``~/.cache/ncpvae``), keyed by the dataset config and the net config. It trains until its held-out
accuracy plateaus (``feature_net.epochs`` at most, ``feature_net.patience``) and states that
accuracy against ``feature_net.targets`` beside every number resting on it (docs/metrics.md).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, create_model

from ncpvae.component import StrictModel
from ncpvae.defaults import shipped_default
from ncpvae.evaluation.metrics_table import DISENTANGLEMENT, DISENTANGLEMENT_METRICS
from ncpvae.metrics import FeatureNetConfig, PriorFitConfig, SampleQualityConfig
from ncpvae.sections import SamplerSection

__all__ = ["DISENTANGLEMENT_METRICS", "EvaluateConfig", "LikelihoodSizes", "MetricSwitch",
           "FactorRecoverySwitch", "RowMetricSwitch", "SamplerTable", "metric_section", "without_switch"]

#: a sampler table (``{name = "langevin", metropolis = true, ...}``) validated by its plugin
SamplerTable = SamplerSection


class MetricSwitch(StrictModel):
    """Whether a disentanglement metric runs: unset (the default) runs it when the data has
    ground-truth factors and skips it with a note otherwise; ``true`` requires it (an error on
    data without factors); ``false`` turns it off."""

    enabled: bool | None = Field(None, description="unset: when the data has ground-truth "
                                 "factors; true: required; false: off")


class RowMetricSwitch(StrictModel):
    """Whether a metric of every prior x sampler row runs."""

    enabled: bool = Field(True, description="compute it for every table row")


class FactorRecoverySwitch(StrictModel):
    """Whether the factor-recovery score runs (on data with ground-truth factors only)."""

    enabled: bool = Field(True, description="compute it when the data has ground-truth factors")


def metric_section(config: type[StrictModel], switch: type[StrictModel]) -> type[StrictModel]:
    """The ``[evaluate.<metric>]`` sub-table: the metric's config class with ``switch``'s
    ``enabled`` field first. A section is an instance of ``config``."""
    name = config.__name__.removesuffix("Config") + "Section"
    return create_model(name, __base__=(config, switch), __module__=__name__,
                        __doc__=f"{(config.__doc__ or config.__name__).strip()}\n\n"
                                f"Plus ``enabled`` ({switch.__name__}).")


def without_switch(section: StrictModel, config: type[StrictModel]) -> Any:
    """The metric's own config from its section (the section's fields less ``enabled``)."""
    return config(**section.model_dump(exclude={"enabled"}))


PriorFitSection = metric_section(PriorFitConfig, RowMetricSwitch)
SampleQualitySection = metric_section(SampleQualityConfig, RowMetricSwitch)


class LikelihoodSizes(StrictModel):
    """Importance-weighted bound (Burda et al. 2016) and ELBO on held-out images, for the run's
    prior (a learned prior: with ``log Z`` and its SE) and its base prior."""

    enabled: bool = Field(True, description="compute the bounds")
    num_samples: int = Field(1000, ge=1, description="importance samples K per image")
    num_examples: int = Field(1000, ge=2, description="held-out (test) images")
    batch_size: int = Field(64, ge=1, description="images per bound evaluation")


class _EvaluateHead(StrictModel):
    enabled: bool = Field(True, description="run the evaluation stage at the end of `ncpvae train`")
    batch_size: int = Field(512, ge=1, description="images per encoder / decoder / feature call")


def _metric_field(section: type[StrictModel], label: str) -> Any:
    return (section, Field(default_factory=section, description=label))


#: the head of [evaluate] and one sub-table per disentanglement metric of the table
_EvaluateMetrics: type[StrictModel] = create_model(
    "_EvaluateMetrics", __base__=_EvaluateHead, __module__=__name__,
    **{spec.name: _metric_field(metric_section(spec.config, MetricSwitch), spec.label)
       for spec in DISENTANGLEMENT})


class EvaluateConfig(_EvaluateMetrics):  # type: ignore[misc, valid-type]
    """What ``ncpvae evaluate`` (and the end of ``ncpvae train``) computes, and at which sizes."""

    num_samples: int = Field(1000, ge=4, description="latents drawn per prior x sampler row")
    num_heldout: int = Field(1000, ge=4, description="held-out test images (and their "
                             "encodings) each row is compared with")
    grid_size: int = Field(64, ge=1, description="decoded samples shown per row")
    samplers: list[SamplerTable] = Field(
        default_factory=lambda: shipped_default("run", "evaluate", "samplers"),
        description="samplers of the learned prior, one table row each (rows omitted when "
        "the run's prior is not a learned one)")
    include_run_sampler: bool = Field(True, description="add the run's [sampler] as a row when "
                                      "it is not among `samplers`")
    log_z_samples: int | None = Field(None, ge=2, description="base draws for a learned prior's "
                                      "log Z (unset: the prior's own default)")
    prior_fit: PriorFitSection = Field(  # type: ignore[valid-type]
        default_factory=PriorFitSection, description="MMD permutation test and classifier "
        "two-sample test between each row's latents and held-out encodings")
    sample_quality: SampleQualitySection = Field(  # type: ignore[valid-type]
        default_factory=SampleQualitySection, description="KID, Fréchet distance and "
        "precision/recall of decoded samples against held-out images")
    feature_net: FeatureNetConfig = Field(
        default_factory=FeatureNetConfig, description="the locally trained feature network: "
        "a factor classifier on ground-truth data, a label classifier on labelled data; "
        "trained until its held-out accuracy plateaus, checked against its targets")
    cache_dir: str | None = Field(None, description="feature-net cache folder (unset: "
                                  "feature_nets/ of $NCPVAE_CACHE_DIR, else "
                                  "$XDG_CACHE_HOME/ncpvae, else ~/.cache/ncpvae; "
                                  "'~' is expanded, relative paths are from the working dir)")
    inception_weights: str | None = Field(
        None, description="a local file of the FID Inception-v3 weights (pytorch-fid's "
        "pt_inception-2015-12-05-6726825d.pth or torch-fidelity's state dict): adds Inception "
        "FID and KID to every row (unset: skipped, with a note on how to get the file)")
    likelihood: LikelihoodSizes = Field(default_factory=LikelihoodSizes)
    factor_recovery: FactorRecoverySwitch = Field(
        default_factory=FactorRecoverySwitch, description="the feature net's per-factor accuracy on "
        "reconstructions of `num_heldout` test images relative to the originals (data with "
        "ground-truth factors)")
    report: Literal["html", "markdown"] = Field(
        "html", description="report.html with embedded figures, or report.md beside the PNGs")
