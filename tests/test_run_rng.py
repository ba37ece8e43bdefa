"""Random-number snapshots (ncpvae.run.rng), the boundary callbacks (ncpvae.run.hooks) and the
tests' deterministic kill points (tests/helpers/kill_at.py)."""

from __future__ import annotations

import io
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ncpvae.errors import DataError
from ncpvae.run import hooks, rng


def draws(gen: torch.Generator) -> tuple:
    return (torch.rand(5), torch.randn(3, generator=gen), np.random.rand(4), np.random.randn(),
            random.random(), random.gauss(0, 1))


def test_capture_restore_reproduces_every_stream():
    torch.manual_seed(11)
    np.random.seed(12)
    random.seed(13)
    gen = torch.Generator().manual_seed(14)
    draws(gen)  # move every stream, including the gaussian caches
    np.random.randn()  # numpy now holds a cached gaussian
    state = rng.capture({"order": gen})
    expected = draws(gen)
    draws(gen)
    # the snapshot survives a weights-only round trip
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    other = torch.Generator().manual_seed(999)
    rng.restore(loaded, {"order": other})
    again = draws(other)
    for a, b in zip(expected, again):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
        else:
            assert np.array_equal(a, b)


def test_restore_rejects_foreign_state():
    with pytest.raises(DataError, match="random-number state"):
        rng.restore({"format": 99})
    state = rng.capture({})
    with pytest.raises(DataError, match="'order' generator"):
        rng.restore(state, {"order": torch.Generator()})


def test_capture_is_small():
    """What each checkpoint adds: a few kilobytes."""
    buffer = io.BytesIO()
    torch.save(rng.capture({"order": torch.Generator()}), buffer)
    assert len(buffer.getvalue()) < 40_000


HELPERS = Path(__file__).parent / "helpers"
#: boundaries reached in a child process, with the kill helper's callback installed (if any)
KILLER = """
import sys
sys.path.insert(0, sys.argv[1])
from kill_at import KillAt
from ncpvae.run import hooks
with hooks.boundary_callback(KillAt(sys.argv[2], sys.argv[3])):
    for label in ["epoch", "stage", "epoch", "epoch"]:
        print(label, flush=True)
        hooks.boundary(label)
print("survived", flush=True)
"""


def _killer(setting: str, log: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", KILLER, str(HELPERS), setting, str(log)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("setting", "printed"), [
    ("", ["epoch", "stage", "epoch", "epoch", "survived"]),
    ("2", ["epoch", "stage"]),
    ("2@epoch", ["epoch", "stage", "epoch"]),
    ("1@stage", ["epoch", "stage"]),
])
@pytest.mark.slow  # a killed training in a subprocess
def test_kill_after_the_nth_boundary(tmp_path, setting, printed):
    log = tmp_path / "boundaries.txt"
    proc = _killer(setting, log)
    assert proc.stdout.split() == printed, proc.stderr
    if setting:
        assert proc.returncode == -signal.SIGKILL
        assert log.read_text().split() == printed
    else:
        assert proc.returncode == 0
        assert log.read_text().split() == printed[:-1]


def test_no_callback_no_kill():
    """Without a callback a boundary does nothing (in a child process: a kill there fails this
    test instead of taking pytest down)."""
    script = ("from ncpvae.run import hooks\n"
              "for _ in range(3):\n    hooks.boundary('epoch')\n"
              "print('survived', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert (proc.returncode, proc.stdout.split()) == (0, ["survived"]), proc.stderr


def test_a_callback_sees_the_boundaries_of_its_block_only():
    seen: list[str] = []
    hooks.boundary("before")
    with hooks.boundary_callback(seen.append):
        hooks.boundary("epoch")
        hooks.boundary("stage")
    hooks.boundary("after")
    assert seen == ["epoch", "stage"]
