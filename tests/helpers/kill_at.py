"""Run ``ncpvae`` with a kill point (test-only fault injection).

    python tests/helpers/kill_at.py [--kill N[@LABEL]] [--log PATH] -- NCPVAE ARGS...

runs ``ncpvae.cli.main(NCPVAE ARGS)`` with a :func:`ncpvae.run.hooks.boundary_callback`
installed that appends the label of every boundary reached to ``PATH`` (one per line) and, with
``--kill``, kills the process with ``SIGKILL`` (no cleanup, no ``finally``, exactly like
``kill -9`` or a preempted job) at the N-th boundary (1-based), counting only the boundaries
named ``LABEL`` when given (``3@epoch``). The labels are those of :mod:`ncpvae.run.hooks`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path


class KillAt:
    """A boundary callback: log every label to ``log``; SIGKILL at the ``setting``-th boundary
    (``"N"`` or ``"N@LABEL"``; None or ``""``: never)."""

    def __init__(self, setting: str | None = None, log: str | Path | None = None) -> None:
        number, _, label = (setting or "").strip().partition("@")
        self.number = int(number) if number else None
        self.label = label or None
        self.log = Path(log) if log is not None else None
        self.count = 0

    def __call__(self, label: str) -> None:
        if self.log is not None:
            with open(self.log, "a") as handle:
                handle.write(label + "\n")
        if self.number is None or self.label not in (None, label):
            return
        self.count += 1
        if self.count == self.number:
            os.kill(os.getpid(), signal.SIGKILL)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kill", default=None, help="N or N@LABEL: SIGKILL at that boundary")
    parser.add_argument("--log", default=None, help="append every boundary's label to this file")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then the ncpvae arguments")
    options = parser.parse_args(argv)
    args = options.args[1:] if options.args[:1] == ["--"] else options.args

    from ncpvae.cli import main as ncpvae_main
    from ncpvae.run.hooks import boundary_callback

    with boundary_callback(KillAt(options.kill, options.log)):
        return ncpvae_main(args)


if __name__ == "__main__":
    sys.exit(main())
