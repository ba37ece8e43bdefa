"""The ``logger`` kind: TensorBoard and MLflow round trips against metrics.jsonl, a failing logger
that leaves the run as it would be without it, rank-0-only logging and the missing-extra error."""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import pytest

import ncpvae
from ncpvae import ComponentConfig, ExperimentLogger, NcpvaeError, hookimpl
from ncpvae.config import load_config
from ncpvae.experiment import train
from ncpvae.logging_backends import LoggerSet, LoggerWarning
from ncpvae.plugin_manager import PluginManager
from ncpvae.run.build import Run
from ncpvae.run.stages import TRAINING_STAGES

#: wall-clock fields of metrics.jsonl and summary.json (they differ between any two runs)
TIMING = ("seconds", "per_second")


class RecordingLogger(ExperimentLogger):
    """Keeps every call; ``fail_in`` names the call that raises."""

    name = "recording"
    fail_in: str | None = None

    class Config(ComponentConfig):
        name: Literal["recording"] = "recording"

    def __init__(self, config: ComponentConfig):
        super().__init__(config)
        self.calls: list[tuple] = []

    def _record(self, call: tuple) -> None:
        self.calls.append(call)
        if call[0] == self.fail_in:
            raise RuntimeError(f"tracker down in {call[0]}")

    def start(self, folder: Path, run_dir: Path, config: Mapping) -> None:
        self._record(("start", folder, run_dir))

    def log_metrics(self, stage: str, step: int, values: Mapping[str, float]) -> None:
        self._record(("log_metrics", stage, step, dict(values)))

    def finish(self, run_dir: Path, figures: Sequence[Path]) -> None:
        self._record(("finish", tuple(figures)))


class FailingLogger(RecordingLogger):
    name = "failing"
    fail_in = "log_metrics"

    class Config(ComponentConfig):
        name: Literal["failing"] = "failing"


class FailingPlugin:
    @hookimpl
    def ncpvae_register_loggers(self) -> list[type]:
        return [RecordingLogger, FailingLogger]


def test_logger_set_passes_records_and_switches_off_a_failing_logger(tmp_path: Path):
    good = RecordingLogger(RecordingLogger.Config())
    bad = FailingLogger(FailingLogger.Config())
    loggers = LoggerSet([bad, good], {"name": "x"})
    with pytest.warns(LoggerWarning) as caught:
        loggers.log(tmp_path, {"stage": "train", "epoch": 1, "loss": 2.5, "per_dim": [1.0],
                               "flag": True, "bad": float("nan")})
        loggers.log(tmp_path, {"stage": "train", "epoch": 2, "loss": 2.0})
        loggers.finish(tmp_path, [tmp_path / "a.png"])
    assert len(caught) == 1  # one warning, then the logger is off
    message = str(caught[0].message)
    assert "'failing'" in message and "tracker down" in message and "\n" not in message
    assert good.calls == [("start", tmp_path / "logs" / "recording", tmp_path),
                          ("log_metrics", "train", 1, {"loss": 2.5}),
                          ("log_metrics", "train", 2, {"loss": 2.0}),
                          ("finish", (tmp_path / "a.png",))]
    assert [c[0] for c in bad.calls] == ["start", "log_metrics"]
    assert loggers.active == []  # finished


def test_a_logger_failing_to_start_is_switched_off(tmp_path: Path):
    class NoStart(RecordingLogger):
        fail_in = "start"

    logger = NoStart(RecordingLogger.Config())
    loggers = LoggerSet([logger])
    with pytest.warns(LoggerWarning, match="failed in start"):
        loggers.log(tmp_path, {"stage": "train", "epoch": 1, "loss": 1.0})
    loggers.log(tmp_path, {"stage": "train", "epoch": 2, "loss": 1.0})
    assert [c[0] for c in logger.calls] == ["start"]


def test_only_the_writing_process_logs(tmp_path: Path):
    """A run without a directory (a rank > 0 under torchrun) passes nothing to its loggers."""
    logger = RecordingLogger(RecordingLogger.Config())
    run = Run(None, None, None, None, None, None, None, None, directory=None,  # type: ignore[arg-type]
              loggers=LoggerSet([logger]))
    run.log({"stage": "train", "epoch": 1, "loss": 1.0})
    assert not run.is_writer and logger.calls == []


@pytest.mark.parametrize(("name", "module", "extra"), [("tensorboard", "tensorboard", "tensorboard"),
                                                        ("mlflow", "mlflow", "mlflow")])
def test_a_missing_extra_is_one_line_naming_it(monkeypatch, name: str, module: str, extra: str):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(NcpvaeError) as caught:
        ncpvae.create("logger", name)
    message = str(caught.value)
    assert f"pip install 'ncpvae[{extra}]'" in message and "\n" not in message


def test_a_missing_extra_stops_train_before_any_file(monkeypatch, tmp_path: Path, capsys):
    from ncpvae.cli import main

    monkeypatch.setitem(sys.modules, "mlflow", None)
    out = tmp_path / "run"
    code = main(["train", "smoke", "--quiet", "--out", str(out), "--set",
                 'log.backends=["mlflow"]'])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "ncpvae[mlflow]" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_log_config_takes_names_and_tables():
    config = load_config("smoke", ['log.backends=["tensorboard", {name = "mlflow", '
                                   'tracking_uri = "sqlite:///x.db"}]'])
    assert [b.name for b in config.log.backends] == ["tensorboard", "mlflow"]
    assert config.log.backends[1].tracking_uri == "sqlite:///x.db"
    assert load_config("smoke").log.backends == []
    with pytest.raises(ncpvae.ConfigError, match="unknown logger 'tensorbord'.*tensorboard"):
        load_config("smoke", ['log.backends=["tensorbord"]'])


# ---------------------------------------------------------------------------------------------
# end to end: a run with both trackers and a failing logger against the same run without them


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if not any(t in k for t in TIMING)}
    return value


def _run(out: Path, backends: list[str]) -> Path:
    overrides = ["prior=ncp", "prior.epochs=3", "prior.min_steps=0",
                 f"log.backends={json.dumps(backends)}"]
    manager = PluginManager(entrypoints=False, plugins=[FailingPlugin()])
    config = load_config("smoke", overrides, manager.registry)
    return train(config, out, quiet=True, manager=manager, stages=TRAINING_STAGES)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path, list]:
    root = tmp_path_factory.mktemp("loggers")
    plain = _run(root / "plain", [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logged = _run(root / "logged", ["tensorboard", "mlflow", "failing"])
    return plain, logged, [w for w in caught if issubclass(w.category, LoggerWarning)]


def _read(path: Path):
    """A JSON file, or a JSON-lines file as a list, without its timing fields."""
    if path.suffix == ".jsonl":
        return [_strip(json.loads(line)) for line in path.read_text().splitlines()]
    return _strip(json.loads(path.read_text()))


def _records(run: Path, stage: str) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["stage"] == stage]


@pytest.mark.slow
def test_a_failing_logger_leaves_the_run_as_without_loggers(runs):
    plain, logged, logger_warnings = runs
    assert len(logger_warnings) == 1 and "'failing'" in str(logger_warnings[0].message)
    for name in ("metrics.jsonl", "summary.json"):
        assert _read(logged / name) == _read(plain / name), name
    assert not (plain / "logs").exists()


@pytest.mark.slow
def test_tensorboard_event_file_holds_the_metrics_figures_and_config(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, logged, _ = runs
    events = EventAccumulator(str(logged / "logs" / "tensorboard"),
                              size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    for stage, key in (("train", "test_elbo"), ("fit_prior", "heldout_loss")):
        expected = [(int(r["epoch"]), pytest.approx(r[key], rel=1e-6))
                    for r in _records(logged, stage)]
        assert [(e.step, e.value) for e in events.Scalars(f"{stage}/{key}")] == expected
    figures = {f"figures/{p.stem}" for p in (logged / "plots").glob("*.png")}
    assert figures and set(events.Tags()["images"]) == figures
    assert "_hparams_/session_start_info" in events.summary_metadata


@pytest.mark.slow
def test_mlflow_store_holds_params_metrics_and_the_run_directory(runs):
    from mlflow.tracking import MlflowClient

    _, logged, _ = runs
    client = MlflowClient(f"sqlite:///{logged / 'logs' / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("smoke")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["prior.name"] == "ncp" and run.data.params["latent_dim"] == "4"
    for stage, key in (("train", "test_elbo"), ("fit_prior", "heldout_auc")):
        history = client.get_metric_history(run.info.run_id, f"{stage}/{key}")
        assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
            (int(r["epoch"]), r[key]) for r in _records(logged, stage)]
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"metrics.jsonl", "summary.json", "config.toml", "plots"} <= artifacts
    assert "logs" not in artifacts


@pytest.mark.slow
def test_fit_prior_logs_the_refit_and_closes_the_trackers(tmp_path: Path):
    """``ncpvae fit-prior`` on a run with MLflow: the refit's records go to a second MLflow
    run, which ends FINISHED like the first (before, it was left RUNNING)."""
    from mlflow.tracking import MlflowClient

    from ncpvae import cli

    run = _run(tmp_path / "run", ["mlflow"])
    before = len(_records(run, "fit_prior"))
    assert cli.main(["fit-prior", str(run), "--quiet"]) == 0
    refit = _records(run, "fit_prior")[before:]
    assert refit
    client = MlflowClient(f"sqlite:///{run / 'logs' / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("smoke")
    runs = client.search_runs([experiment.experiment_id],
                              order_by=["attributes.start_time ASC"])
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    history = client.get_metric_history(runs[-1].info.run_id, "fit_prior/heldout_auc")
    assert sorted((m.step, m.value) for m in history) == [
        (int(r["epoch"]), r["heldout_auc"]) for r in refit]
