"""Helpers of the learned-prior tests: seeded generators, exact encodings, a mean with its SE,
and the one-thread fixture (import it into a test module to use it)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Small models train many times faster on one thread than on a contended pool."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mean_se(values: Tensor) -> tuple[float, float]:
    """The mean of ``values`` and its standard error, in float64."""
    v = values.detach().double().reshape(-1)
    return float(v.mean()), float(v.std() / math.sqrt(v.numel()))


def exact_latents(points: Tensor) -> tuple[Tensor, Tensor]:
    """Encodings whose draws are ``points`` themselves (posterior variance e^-40)."""
    return points, torch.full_like(points, -40.0)
