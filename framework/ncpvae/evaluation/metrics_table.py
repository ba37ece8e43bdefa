"""The disentanglement metrics, listed once.

Each row names a metric and gives its compute function, its config class (the
``[evaluate.<name>]`` sub-table is composed from it, see :mod:`ncpvae.evaluation.config`), its
headline number, its label and how the report details it. The evaluation's dispatch, the
``evaluation`` section of summary.json and the report's headline and metric table are derived
from this table: adding a metric is adding a row.

A metric's ``compute(data, represent, *, config, seed, batch_size)`` takes a
:class:`~ncpvae.GroundTruthData`, a representation ``images (n, C, H, W) -> codes (n, D)``, its
config, a numpy seed or Generator and the images per encoder call, and returns a result whose
``to_dict()`` is plain data holding ``headline``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ncpvae import metrics as M
from ncpvae.component import StrictModel
from ncpvae.evaluation.format import num as _num


@dataclass(frozen=True)
class MetricSpec:
    """One disentanglement metric."""

    name: str  # the [evaluate.<name>] sub-table and the key in evaluation.json
    compute: Callable[..., Any]
    config: type[StrictModel]
    headline: str  # the key of the headline number in the result
    label: str  # how tables and the report name it
    summary_key: str  # its key in summary.json's evaluation section
    details: Callable[[Mapping[str, Any]], str] = lambda result: ""

    def headline_value(self, result: Mapping[str, Any]) -> Any:
        return result[self.headline]


def _beta_vae_details(r: Mapping[str, Any]) -> str:
    return f"eval accuracy (train {_num(r['train_accuracy'])})"


def _factor_vae_details(r: Mapping[str, Any]) -> str:
    return (f"eval accuracy; {r['num_active_dims']} active dims"
            + (" (collapsed)" if r["collapsed"] else ""))


def _mig_details(r: Mapping[str, Any]) -> str:
    return "per factor: " + ", ".join(_num(g, 2) for g in r["gap_per_factor"])


def _dci_details(r: Mapping[str, Any]) -> str:
    return (f"completeness {_num(r['completeness'])}, informativeness (test accuracy) "
            f"{_num(r['informativeness_test'])}")


#: every disentanglement metric, in report order (the position also picks the metric's seed,
#: ``seeds.EVAL_METRICS + index``: append new metrics at the end)
DISENTANGLEMENT: tuple[MetricSpec, ...] = (
    MetricSpec("beta_vae", M.compute_beta_vae, M.BetaVAEConfig, "eval_accuracy",
               "beta-VAE metric", "beta_vae", _beta_vae_details),
    MetricSpec("factor_vae", M.compute_factor_vae, M.FactorVAEConfig, "eval_accuracy",
               "FactorVAE metric", "factor_vae", _factor_vae_details),
    MetricSpec("mig", M.compute_mig, M.MIGConfig, "mig", "MIG", "mig", _mig_details),
    MetricSpec("dci", M.compute_dci, M.DCIConfig, "disentanglement", "DCI disentanglement",
               "dci_disentanglement", _dci_details),
    MetricSpec("sap", M.compute_sap, M.SAPConfig, "sap", "SAP", "sap"),
)

#: the metric names, in table order
DISENTANGLEMENT_METRICS: tuple[str, ...] = tuple(spec.name for spec in DISENTANGLEMENT)


def metric_spec(name: str) -> MetricSpec:
    """The table row of metric ``name``."""
    for spec in DISENTANGLEMENT:
        if spec.name == name:
            return spec
    raise KeyError(name)
