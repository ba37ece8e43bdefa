"""Shared fixtures: a hermetic registry (built-ins only, no entry points), a tiny in-memory image
dataset, a seeded generator and one trained smoke run per session. Test files keep their own
special-purpose fixtures (runs of other configs).

Test tiers: ``pytest`` runs the unit tier; tests marked ``slow`` (statistical or end to end,
seconds each) are deselected by the ``addopts`` of pyproject.toml and run by ``pytest -m slow``.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ncpvae.data import DataBundle, TensorImageSource
from ncpvae.plugin_manager import PluginManager
from ncpvae.registry import Registry

TINY_IMAGE_SHAPE = (1, 8, 8)


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every test (and every ``ncpvae`` subprocess it starts) caches feature nets in a session
    folder, never in the user's cache (``NCPVAE_CACHE_DIR``, see
    :func:`ncpvae.metrics.feature_net.default_cache_dir`)."""
    folder = tmp_path_factory.mktemp("ncpvae-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NCPVAE_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(scope="session")
def registry() -> Registry:
    """The built-in components, without installed third-party plugins."""
    return PluginManager(entrypoints=False).registry


@pytest.fixture
def generator() -> torch.Generator:
    """A CPU generator with a fixed seed."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def tiny_data() -> DataBundle:
    """16 train and 8 test binary 8x8 images, labels 0..3: enough for one tiny batch."""
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(24, *TINY_IMAGE_SHAPE, generator=g) > 0.5).to(torch.float32)
    labels = torch.arange(24) % 4
    return DataBundle(
        train=TensorImageSource(images[:16], labels[:16], what="tiny train"),
        test=TensorImageSource(images[16:], labels[16:], what="tiny test"),
    )


def _digest(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (relative path -> digest)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """What ``ncpvae train smoke`` writes (2 epochs, gaussian prior, evaluation, plots), trained
    once per session. Read only: a test that writes into a run takes ``smoke_run_copy``; the
    fixture fails at the end of the session if a file of the run changed."""
    from ncpvae.config import load_config  # here: collecting the tests needs no run code
    from ncpvae.experiment import train

    out = tmp_path_factory.mktemp("shared") / "smoke"
    train(load_config("smoke"), out, quiet=True)
    before = _digest(out)
    yield out
    assert _digest(out) == before, f"a test wrote into the shared smoke run {out}"


@pytest.fixture
def smoke_run_copy(smoke_run: Path, tmp_path: Path) -> Path:
    """A private copy of :func:`smoke_run` that the test may change."""
    return Path(shutil.copytree(smoke_run, tmp_path / "smoke"))
