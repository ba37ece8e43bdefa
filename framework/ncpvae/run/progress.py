"""Which stages of a run are complete, and what ``ncpvae resume`` continues from.

The checkpoint is the source of truth: after every completed stage (and after every epoch of VAE
training) it holds the weights, the list of completed stages, every random-number state the
remaining work draws from (:mod:`ncpvae.run.rng`) and the number of ``metrics.jsonl`` lines
written so far. ``summary.json`` repeats the progress for people and tools::

    "progress": {"planned": ["train", "fit_prior", "sample", "evaluate"],
                 "completed": ["train"], "finished": false}

A run directory from before this bookkeeping has no ``progress`` section and counts as finished.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ncpvae.errors import NcpvaeError
from ncpvae.run.directory import RunDirectory

#: the name a stage function is recorded under (its ``stage_name`` attribute, or these)
_NAMES = {"train_vae": "train", "fit_prior": "fit_prior", "sample_stage": "sample",
          "evaluate_stage": "evaluate"}


def stage_name(stage: Callable[..., Any]) -> str:
    """The recorded name of a stage function (``train_vae`` -> ``train``)."""
    name = getattr(stage, "__name__", type(stage).__name__)
    return getattr(stage, "stage_name", _NAMES.get(name, name))


def read(directory: RunDirectory) -> dict[str, Any] | None:
    """The ``progress`` section of summary.json (None for runs from before it existed)."""
    progress = directory.read_summary().get("progress")
    return progress if isinstance(progress, dict) else None


def write(directory: RunDirectory, planned: Sequence[str], completed: Sequence[str]) -> None:
    """Record ``completed`` of ``planned`` in summary.json."""
    directory.update_summary("progress", {"planned": list(planned), "completed": list(completed),
                                          "finished": list(completed) == list(planned)})


def is_unfinished(directory: RunDirectory) -> bool:
    """Whether the directory holds a run that stopped before its last stage completed."""
    progress = read(directory)
    return progress is not None and not progress.get("finished", False)


def describe(directory: RunDirectory) -> str:
    """``completed: train; next: fit_prior`` (or ``no stage completed``)."""
    progress = read(directory) or {"planned": [], "completed": []}
    done = progress.get("completed", [])
    todo = [s for s in progress.get("planned", []) if s not in done]
    text = f"completed: {', '.join(done)}" if done else "no stage completed"
    return text + (f"; next: {todo[0]}" if todo else "")


def require_finished(directory: RunDirectory, command: str) -> None:
    """Refuse to ``command`` (fit-prior, sample, evaluate) a run that has not finished."""
    if is_unfinished(directory):
        raise NcpvaeError(
            f"'{directory.path}' holds an unfinished run ({describe(directory)}); finish it with "
            f"`ncpvae resume {directory.path}` before `ncpvae {command}`")


def metrics_lines(directory: RunDirectory) -> int:
    """Complete lines of metrics.jsonl now (what a checkpoint records)."""
    if not directory.metrics.is_file():
        return 0
    return directory.metrics.read_bytes().count(b"\n")


def truncate_metrics(directory: RunDirectory, lines: int) -> None:
    """Drop what metrics.jsonl holds beyond its first ``lines`` lines (records of work that a
    resumed run repeats; also a half-written last line)."""
    path = directory.metrics
    if not path.is_file():
        return
    data = path.read_bytes()
    keep = 0
    for _ in range(lines):
        end = data.find(b"\n", keep)
        if end < 0:
            break
        keep = end + 1
    if keep != len(data):
        with open(path, "r+b") as handle:
            handle.truncate(keep)


def clean_temp_files(path: Path) -> list[Path]:
    """Remove leftovers of interrupted atomic writes (``.<name>.<random>.tmp``) under ``path``."""
    removed = []
    if path.is_dir():
        for item in path.rglob(".*.tmp"):
            if item.is_file():
                item.unlink(missing_ok=True)
                removed.append(item)
    return removed


__all__ = ["stage_name", "read", "write", "is_unfinished", "describe", "require_finished",
           "metrics_lines", "truncate_metrics", "clean_temp_files"]


def check_new(path: str | Path, *, overwrite: bool = False) -> RunDirectory:
    """Check that a new run may be written to ``path`` (nothing is changed): refuse a directory
    holding a run unless ``overwrite`` (an unfinished one points to ``resume``), and a path that
    is a file."""
    run = RunDirectory(Path(path))
    if run.path.exists() and not run.path.is_dir():
        raise NcpvaeError(f"'{run.path}' is a file, not a directory; choose another --out")
    if run.is_run() and not overwrite:
        if is_unfinished(run):
            raise NcpvaeError(
                f"'{run.path}' holds an unfinished run ({describe(run)}); continue "
                f"it with `ncpvae resume {run.path}`, or pass --overwrite to start again")
        raise NcpvaeError(
            f"'{run.path}' already holds a run; pass --overwrite to replace it or "
            "--out to choose another directory"
        )
    return run
