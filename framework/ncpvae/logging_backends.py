"""Experiment trackers as a component kind (``logger``): the interface and the run's set of them.

A logger mirrors what a run records into a tracker (TensorBoard, MLflow, ...); ``metrics.jsonl``
stays the source of truth. The run calls, in the writing process only (rank 0 under torchrun):

1. :meth:`ExperimentLogger.start` once, before the first record, with the logger's own folder
   (``<run>/logs/<name>/`` unless its config names another place) and the resolved config;
2. :meth:`ExperimentLogger.log_metrics` for every record appended to metrics.jsonl (each
   training epoch, each epoch of a learned prior's fit);
3. :meth:`ExperimentLogger.finish` once after the last stage, with the run's figures.

A logger that raises is switched off for the rest of the run after one warning
(:class:`LoggerWarning`); the run and its files go on exactly as without it. A logger whose
optional dependency is missing fails when the run is built, before anything is written, with a
one-line error naming the extra to install (:meth:`ExperimentLogger.import_extra`).
"""

from __future__ import annotations

import importlib
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

from ncpvae.component import BuildContext, Component, ComponentConfig
from ncpvae.errors import NcpvaeError

__all__ = ["LOGS_DIR", "ExperimentLogger", "LoggerSet", "LoggerWarning", "flatten_config", "scalar_values"]


#: the folder of a run directory that holds each logger's default location, ``logs/<name>/``
LOGS_DIR = "logs"


class LoggerWarning(UserWarning):
    """A logger raised; it is switched off for the rest of the run (the run is unaffected)."""


class ExperimentLogger(Component, ABC):
    """Base of logger plugins: holds its config; subclasses implement the three calls.

    ``stage`` is the metrics.jsonl record's stage (``"train"``, ``"fit_prior"``); ``step`` its
    epoch (1-based); ``values`` its finite numbers (lists and strings are left out).
    """

    kind: ClassVar[str] = "logger"

    def __init__(self, config: ComponentConfig):
        self.config = config

    @classmethod
    def from_config(cls, config: ComponentConfig, ctx: BuildContext) -> ExperimentLogger:
        return cls(config)

    @classmethod
    def import_extra(cls, module: str, extra: str) -> ModuleType:
        """Import ``module`` of an optional dependency, or raise a one-line
        :class:`~ncpvae.NcpvaeError` naming the pip extra that installs it."""
        try:
            return importlib.import_module(module)
        except ImportError:
            raise NcpvaeError(
                f"logger '{cls.name}' needs the optional package of `{module}`; install it with "
                f"pip install 'ncpvae[{extra}]'"
            ) from None

    @staticmethod
    def flat_config(config: Mapping[str, Any]) -> dict[str, Any]:
        """The nested run config as ``{"prior.base.name": "gaussian", ...}`` (see
        :func:`flatten_config`): what trackers take as parameters."""
        return flatten_config(config)

    @abstractmethod
    def start(self, folder: Path, run_dir: Path, config: Mapping[str, Any]) -> None:
        """Open the tracker: ``folder`` is this logger's default location inside the run
        directory ``run_dir`` (created by the caller); ``config`` the resolved run config as
        plain data (nested dicts)."""

    @abstractmethod
    def log_metrics(self, stage: str, step: int, values: Mapping[str, float]) -> None:
        """Record one metrics.jsonl record's numbers."""

    @abstractmethod
    def finish(self, run_dir: Path, figures: Sequence[Path]) -> None:
        """Record the run's figures (PNG paths) and close the tracker."""


def scalar_values(record: Mapping[str, Any]) -> dict[str, float]:
    """The finite int/float fields of a metrics record, ``stage`` and ``epoch`` aside."""
    return {key: float(value) for key, value in record.items()
            if key not in ("stage", "epoch") and isinstance(value, (int, float))
            and not isinstance(value, bool) and math.isfinite(value)}


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"prior.base.name": "gaussian", ...}``; lists become their string form
    (trackers take scalar parameters only)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = str(list(value))
        elif value is not None:
            flat[name] = value
    return flat


class LoggerSet:
    """The loggers of one run, guarded: each call goes to every logger still on; one that raises
    gets one :class:`LoggerWarning` and is switched off. Empty (no call does anything) when the
    config names no backend."""

    def __init__(self, loggers: Sequence[ExperimentLogger] = (),
                 config: Mapping[str, Any] | None = None):
        self._loggers = list(loggers)
        self._config = dict(config or {})
        self._started = False
        self._steps: dict[str, int] = {}

    @property
    def active(self) -> list[ExperimentLogger]:
        """The loggers still switched on."""
        return list(self._loggers)

    def _guarded(self, logger: ExperimentLogger, method: str, call: Callable[[], Any]) -> None:
        try:
            call()
        except Exception as exc:  # a tracker must never stop or corrupt the run
            self._loggers.remove(logger)
            detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
            warnings.warn(f"logger '{logger.name}' failed in {method} ({detail}); it is off for "
                          "the rest of the run, metrics.jsonl is unaffected",
                          LoggerWarning, stacklevel=4)

    def _call(self, method: str, *args: Any) -> None:
        for logger in list(self._loggers):
            self._guarded(logger, method, lambda lg=logger: getattr(lg, method)(*args))

    def _start(self, run_dir: Path) -> None:
        if self._started:
            return
        self._started = True
        for logger in list(self._loggers):
            folder = run_dir / LOGS_DIR / logger.name

            def start(lg: ExperimentLogger = logger, folder: Path = folder) -> None:
                folder.mkdir(parents=True, exist_ok=True)
                lg.start(folder, run_dir, self._config)

            self._guarded(logger, "start", start)

    def log(self, run_dir: Path, record: Mapping[str, Any]) -> None:
        """Pass one metrics.jsonl record on (its ``epoch`` as the step; a record without one
        counts on from the stage's last step)."""
        if not self._loggers:
            return
        self._start(run_dir)
        stage = str(record.get("stage", "run"))
        epoch = record.get("epoch")
        step = int(epoch) if isinstance(epoch, (int, float)) else self._steps.get(stage, 0) + 1
        self._steps[stage] = step
        self._call("log_metrics", stage, step, scalar_values(record))

    def finish(self, run_dir: Path, figures: Sequence[Path]) -> None:
        """The run is complete: pass on its figures and close every logger."""
        if not self._loggers:
            return
        self._start(run_dir)
        self._call("finish", run_dir, list(figures))
        self._loggers = []
