"""The run directory: where a run's config, checkpoint, metrics, summary and plots live."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ncpvae.errors import NcpvaeError
from ncpvae.io import append_jsonl, read_json, read_jsonl, write_json, write_text

#: Files that mark a directory as a ncpvae run (refused as a new output without --overwrite).
RUN_MARKERS = ("config.toml", "checkpoint.pt", "metrics.jsonl", "summary.json")


@dataclass(frozen=True)
class RunDirectory:
    """Paths of one run directory (see ARCHITECTURE.md §5)."""

    path: Path

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
    def plots(self) -> Path:
        return self.path / "plots"

    def is_run(self) -> bool:
        return any((self.path / marker).exists() for marker in RUN_MARKERS)

    @classmethod
    def create(cls, path: str | Path, *, overwrite: bool = False) -> RunDirectory:
        """Make a fresh run directory; refuse one that already holds a run unless ``overwrite``."""
        run = cls(Path(path))
        if run.is_run():
            if not overwrite:
                raise NcpvaeError(
                    f"'{run.path}' already holds a run; pass --overwrite to replace it or "
                    "--out to choose another directory"
                )
            for marker in (*RUN_MARKERS, "plugins.json", "samples.pt", "evaluation.json",
                           "report.html", "report.md"):
                (run.path / marker).unlink(missing_ok=True)
            shutil.rmtree(run.plots, ignore_errors=True)
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
        append_jsonl(self.metrics, record)

    def records(self, stage: str | None = None) -> list[dict[str, Any]]:
        rows = read_jsonl(self.metrics)
        return [r for r in rows if stage is None or r.get("stage") == stage]

    def update_summary(self, section: str, values: dict[str, Any]) -> dict[str, Any]:
        """Merge ``values`` under ``section`` of summary.json (rewritten atomically)."""
        summary = read_json(self.summary, "summary") if self.summary.is_file() else {}
        summary[section] = json.loads(json.dumps(values, default=float))
        write_json(self.summary, summary)
        return summary
