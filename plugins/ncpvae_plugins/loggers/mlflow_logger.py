"""``mlflow``: an MLflow run through ``MlflowClient`` (no global active run is set).

The run's config as params (dotted keys, ``prior.base.name``), every metrics record as metrics
``<stage>/<metric>`` at its epoch, and at the end the run directory as artifacts (its ``logs/``
folder aside). By default the store is local to the run: ``sqlite:///<run>/logs/mlflow/mlflow.db``
with artifacts in ``<run>/logs/mlflow/artifacts`` (MLflow 3 refuses a plain-folder store); view it
with ``mlflow ui --backend-store-uri sqlite:///<run>/logs/mlflow/mlflow.db``. ``tracking_uri``
points it at any other store or server; the experiment is the run config's ``name`` unless set.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from ncpvae import BuildContext, ComponentConfig, ExperimentLogger

EXTRA = "mlflow"
#: MLflow takes at most this many params per batch call
PARAM_BATCH = 100


class MLflowLogger(ExperimentLogger):
    """MLflow tracking: config as params, metrics per epoch, the run directory as artifacts."""

    name = "mlflow"

    class Config(ComponentConfig):
        name: Literal["mlflow"] = "mlflow"
        tracking_uri: str | None = Field(
            None, min_length=1,
            description="MLflow store or server (None: sqlite in <run>/logs/mlflow)")
        experiment: str | None = Field(
            None, min_length=1, description="experiment name (None: the run config's name)")
        artifacts: bool = Field(True, description="upload the run directory at the end")

    @classmethod
    def from_config(cls, config: ComponentConfig, ctx: BuildContext) -> MLflowLogger:
        cls.import_extra("mlflow", EXTRA)
        return cls(config)

    def start(self, folder: Path, run_dir: Path, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        cfg = self.config
        uri = cfg.tracking_uri or f"sqlite:///{(folder / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        name = cfg.experiment or str(config.get("name", "ncpvae"))
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            location = None if cfg.tracking_uri else (folder / "artifacts").resolve().as_uri()
            experiment_id = self.client.create_experiment(name, artifact_location=location)
        run = self.client.create_run(experiment_id, run_name=str(config.get("name", "run")),
                                     tags={"ncpvae.run_dir": str(run_dir.resolve())})
        self.run_id = run.info.run_id
        params = [Param(key, str(value)) for key, value in self.flat_config(config).items()]
        for first in range(0, len(params), PARAM_BATCH):
            self.client.log_batch(self.run_id, params=params[first:first + PARAM_BATCH])

    def log_metrics(self, stage: str, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            Metric(f"{stage}/{key}", value, now, step) for key, value in values.items()])

    def finish(self, run_dir: Path, figures: Sequence[Path]) -> None:
        if self.config.artifacts:
            for entry in sorted(run_dir.iterdir()):
                if entry.name.startswith(".") or entry.name == "logs":  # locks; the store itself
                    continue
                if entry.is_dir():
                    self.client.log_artifacts(self.run_id, str(entry), artifact_path=entry.name)
                else:
                    self.client.log_artifact(self.run_id, str(entry))
        else:
            for path in figures:
                self.client.log_artifact(self.run_id, str(path), artifact_path="figures")
        self.client.set_terminated(self.run_id, "FINISHED")
