"""Atomic file writes and checkpoint loading.

Every file of a run directory is written to a temporary file in the same directory and then
renamed over the target, so a crash never leaves a half-written file and never destroys the
previous good one. Checkpoints hold state dicts and plain data only and load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ncpvae.errors import DataError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write(path: str | Path, write: Callable[[Any], None], *, binary: bool = False) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
    try:
        with os.fdopen(fd, "wb" if binary else "w") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text))


def to_plain_json(value: Any) -> Any:
    """A JSON-ready copy of ``value`` (the one sanitizer of the package): tensors and numpy arrays
    become (nested) lists, numpy scalars Python numbers, tuples lists, mapping keys strings, and
    NaN or infinite floats None (strict JSON has neither); anything else is returned as is."""
    if isinstance(value, dict):
        return {str(k): to_plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain_json(v) for v in value]
    if isinstance(value, torch.Tensor):
        return to_plain_json(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return to_plain_json(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def write_json(path: str | Path, data: Any) -> Path:
    """Write strict JSON (non-finite floats become null) atomically."""
    text = json.dumps(to_plain_json(data), indent=2, allow_nan=False) + "\n"
    return atomic_write(path, lambda f: f.write(text))


def save_torch(path: str | Path, obj: Any) -> Path:
    """``torch.save`` atomically (state dicts and plain data only)."""
    return atomic_write(path, lambda f: torch.save(obj, f), binary=True)


def load_torch(path: str | Path, what: str = "checkpoint") -> Any:
    """``torch.load(weights_only=True)``: tensors and plain data only, never code.

    Raises a one-line :class:`DataError` for a missing, truncated or foreign file, and for a file
    whose pickle holds anything else (a class instance, a function): such a file is refused for
    safety, without running anything it names.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} '{path}' does not exist" if not path.exists()
                        else f"{what} '{path}' is not a file")
    try:
        with warnings.catch_warnings():  # e.g. torch's note on the pickle protocol of the file
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        if "Weights only load failed" in text:
            match = re.search(r"(?:Unsupported global: )?GLOBAL ([\w.]+)", text)
            holds = f" (it names {match.group(1)})" if match else ""
            raise DataError(
                f"{what} '{path}' was refused for safety: its pickle holds objects other than "
                f"tensors and plain data{holds}; ncpvae never unpickles code, use a checkpoint "
                "written by ncpvae"
            ) from None
        detail = " ".join(text.split()).split(". ")[0][:160] or "unexpected end of file"
        raise DataError(
            f"{what} '{path}' is truncated, corrupt or not a ncpvae checkpoint "
            f"({type(exc).__name__}: {detail}); rerun the stage that writes it"
        ) from None


def read_json(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} '{path}' does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{what} '{path}' is not valid JSON: {exc}") from None


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line (appends are not atomic, but never touch earlier lines)."""
    line = json.dumps(to_plain_json(record), allow_nan=False)  # strict JSON: NaN/inf -> null
    with open(path, "a") as handle:
        handle.write(line + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
