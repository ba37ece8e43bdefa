"""Shared fixtures: a hermetic registry (built-ins only, no entry points), a tiny in-memory image
dataset and a seeded generator. Test files keep their own special-purpose fixtures."""

from __future__ import annotations

import pytest
import torch

from ncpvae.data import DataBundle, TensorImageSource
from ncpvae.plugin_manager import PluginManager
from ncpvae.registry import Registry

TINY_IMAGE_SHAPE = (1, 8, 8)


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
