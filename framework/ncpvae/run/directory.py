"""The run directory: every file a run writes, named in this one place (docs/architecture.md §6).

::

    <run>/
      config.toml            the resolved config           plugins.json    plugins that built it
      checkpoint.pt          state dicts (run/checkpoint)  metrics.jsonl   one record per epoch
      summary.json           final numbers per stage       samples.pt      latents of the panels
      evaluation.json        the evaluation                report.html | report.md
      cache/                 the evaluation's feature net (unless evaluate.cache_dir is set)
      plots/                 training_curves, reconstructions, kl_per_dim, traversals, samples,
                             prior_fit (a learned prior's fit records), eval_samples_<row> (.png)
      sampling/              `ncpvae sample`: samples.png, latents.pt, diagnostics.json,
                             energy_trace.png, trajectories.png
      compare_priors/        `ncpvae compare-priors`: table.json, table.md, gains.png,
                             samples_<prior>.png
      logs/                  `[log] backends`: each logger's files (logs/tensorboard, logs/mlflow)
      .lock                  while a command writes the run: its writer lock (ncpvae.run.lock)
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ncpvae.errors import NcpvaeError
from ncpvae.io import append_jsonl, read_json, read_jsonl, to_plain_json, write_json, write_text
from ncpvae.logging_backends import LOGS_DIR

#: Files that mark a directory as a ncpvae run (refused as a new output without --overwrite).
RUN_MARKERS = ("config.toml", "checkpoint.pt", "metrics.jsonl", "summary.json")
#: Further files of a run, removed with the markers when a run is overwritten.
RUN_OUTPUTS = ("plugins.json", "samples.pt", "evaluation.json", "report.html", "report.md")
#: The writer lock of :mod:`ncpvae.run.lock` (removed by its holder when it is done).
LOCK_FILE = ".lock"

#: The figures of ``plots/``.
PLOT_TRAINING_CURVES = "training_curves.png"
PLOT_RECONSTRUCTIONS = "reconstructions.png"
PLOT_KL_PER_DIM = "kl_per_dim.png"
PLOT_TRAVERSALS = "traversals.png"
PLOT_SAMPLES = "samples.png"
PLOT_PRIOR_FIT = "prior_fit.png"
PLOT_GROUP_GAINS = "group_gains.png"

#: The files ``ncpvae sample`` writes (into ``<run>/sampling`` unless ``--out`` says otherwise).
SAMPLING_DIR = "sampling"
SAMPLING_GRID = "samples.png"
SAMPLING_LATENTS = "latents.pt"
SAMPLING_DIAGNOSTICS = "diagnostics.json"
SAMPLING_ENERGY = "energy_trace.png"
SAMPLING_TRAJECTORIES = "trajectories.png"

#: The files ``ncpvae compare-priors`` writes (into ``<run>/compare_priors`` unless ``--out``
#: says otherwise; the report reads the table and the figure from there).
COMPARE_DIR = "compare_priors"
COMPARE_TABLE = "table.json"
COMPARE_TABLE_MD = "table.md"
COMPARE_GAINS = "gains.png"


def slug(label: str) -> str:
    """A file-name-safe form of a table label (``NCP by MALA`` -> ``ncp_by_mala``)."""
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_") or "row"


@dataclass(frozen=True)
class RunDirectory:
    """Paths of one run directory (see the module docstring for the layout)."""

    path: Path
    #: summary.json sections held back by :meth:`summary_batch` (innermost batch last)
    _batches: list[dict[str, Any]] = field(default_factory=list, init=False, repr=False,
                                           compare=False)

    @property
    def config(self) -> Path:
        return self.path / "config.toml"

    @property
    def plugins(self) -> Path:
        return self.path / "plugins.json"

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def samples(self) -> Path:
        """Latents ``(n, D)`` of every panel of the sample stage, keyed by panel title."""
        return self.path / "samples.pt"

    @property
    def evaluation(self) -> Path:
        return self.path / "evaluation.json"

    def report(self, fmt: str = "html") -> Path:
        """``report.html`` (self-contained) or ``report.md`` (``fmt = "markdown"``)."""
        return self.path / ("report.md" if fmt == "markdown" else "report.html")

    @property
    def cache(self) -> Path:
        """The default feature-net cache of the evaluation."""
        return self.path / "cache"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    def plot(self, name: str) -> Path:
        """``plots/<name>``, e.g. ``plot(PLOT_SAMPLES)``."""
        return self.plots / name

    def eval_samples_plot(self, label: str) -> Path:
        """The decoded-sample grid of one evaluation table row."""
        return self.plots / f"eval_samples_{slug(label)}.png"

    @property
    def compare_priors(self) -> Path:
        """Default output folder of ``ncpvae compare-priors``."""
        return self.path / COMPARE_DIR

    @property
    def sampling(self) -> Path:
        """Default output folder of ``ncpvae sample``."""
        return self.path / SAMPLING_DIR

    def relative(self, path: Path) -> str:
        """``path`` relative to the run directory, as stored in evaluation.json."""
        return str(path.relative_to(self.path))

    def is_run(self) -> bool:
        return any((self.path / marker).exists() for marker in RUN_MARKERS)

    @classmethod
    def create(cls, path: str | Path) -> RunDirectory:
        """Make a fresh run directory, removing every file and folder an earlier run wrote there
        (and nothing else). Check first that this is allowed: :func:`ncpvae.run.progress.check_new`."""
        run = cls(Path(path))
        if run.is_run():
            for name in (*RUN_MARKERS, *RUN_OUTPUTS):
                (run.path / name).unlink(missing_ok=True)
            for folder in (run.plots, run.cache, run.sampling, run.path / LOGS_DIR):
                shutil.rmtree(folder, ignore_errors=True)
            for leftover in run.path.glob(".*.tmp"):  # interrupted atomic writes
                leftover.unlink(missing_ok=True)
        run.path.mkdir(parents=True, exist_ok=True)
        run.plots.mkdir(exist_ok=True)
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunDirectory:
        """An existing run directory (must hold config.toml)."""
        run = cls(Path(path))
        if not run.config.is_file():
            raise NcpvaeError(
                f"'{run.path}' is not a ncpvae run directory (no config.toml); "
                "create one with `ncpvae train`"
            )
        run.plots.mkdir(exist_ok=True)
        return run

    def write_config(self, toml_text: str) -> None:
        write_text(self.config, toml_text)

    def log(self, record: dict[str, Any]) -> None:
        append_jsonl(self.metrics, to_plain_json(record))

    def records(self, stage: str | None = None) -> list[dict[str, Any]]:
        rows = read_jsonl(self.metrics)
        return [r for r in rows if stage is None or r.get("stage") == stage]

    def read_summary(self) -> dict[str, Any]:
        """summary.json (with the sections a :meth:`summary_batch` holds back), or {} before any
        stage wrote it."""
        summary = read_json(self.summary, "summary") if self.summary.is_file() else {}
        for batch in self._batches:
            summary.update(batch)
        return summary

    def update_summary(self, section: str, values: dict[str, Any]) -> dict[str, Any]:
        """Merge ``values`` under ``section`` of summary.json (rewritten atomically; inside a
        :meth:`summary_batch`, at its end)."""
        if self._batches:
            self._batches[-1][section] = to_plain_json(values)
            return self.read_summary()
        summary = self.read_summary()
        summary[section] = to_plain_json(values)
        write_json(self.summary, summary)
        return summary

    @contextmanager
    def summary_batch(self) -> Iterator[None]:
        """Hold back the :meth:`update_summary` calls inside the block and write summary.json
        once at its end (also when the block raises: what was recorded is kept)."""
        self._batches.append({})
        try:
            yield
        finally:
            batch = self._batches.pop()
            if batch and self._batches:  # a nested batch: the outer one writes
                self._batches[-1].update(batch)
            elif batch:
                write_json(self.summary, {**self.read_summary(), **batch})
