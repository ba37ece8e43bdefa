"""Shared plumbing of the metrics: seeding, batched representation, input checks.

Conventions: codes are float64 numpy arrays ``(n, D)``; factors are int64 numpy arrays ``(n, K)``.
A representation function maps images ``(n, C, H, W)`` to codes ``(n, D)`` (a Tensor or an
ndarray; the encoder means). It is always called under ``torch.no_grad()`` and never with more
than ``batch_size`` images, so memory stays bounded however many points a metric needs.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ncpvae.data import GroundTruthData
from ncpvae.errors import DataError

RepresentFn = Callable[[Tensor], "Tensor | np.ndarray"]

#: images per call of the representation function (memory bound, not a metric parameter)
DEFAULT_BATCH_SIZE = 512


class MetricResult:
    """Mixin for the frozen result dataclasses: plain-data export for JSON reports."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


def make_rng(seed: int | np.random.Generator) -> np.random.Generator:
    """A numpy Generator from a seed, or the Generator itself (shared state, not copied)."""
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


def torch_generator(rng: np.random.Generator) -> torch.Generator:
    """A CPU torch Generator seeded from ``rng`` (so one seed drives numpy and torch draws)."""
    return torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")


def as_codes(out: Tensor | np.ndarray, n: int, what: str = "representation") -> np.ndarray:
    """Convert a representation output to a finite float64 ``(n, D)`` array or raise DataError."""
    if isinstance(out, Tensor):
        out = out.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(out, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != n:
        raise DataError(f"{what}: expected codes of shape ({n}, D), got {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise DataError(f"{what}: codes contain NaN or infinite values; check the encoder")
    return arr


def check_codes_factors(codes: np.ndarray, factors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate a pure-metric input pair: codes ``(n, D)`` finite, factors ``(n, K)`` integers."""
    n = np.shape(codes)[0] if np.ndim(codes) == 2 else -1
    codes = as_codes(codes, n, "codes")
    factors = np.asarray(factors)
    if factors.ndim != 2 or factors.shape[0] != codes.shape[0]:
        raise DataError(
            f"factors: expected shape ({codes.shape[0]}, K) matching the codes, got "
            f"{tuple(factors.shape)}"
        )
    if not np.issubdtype(factors.dtype, np.integer):
        raise DataError(f"factors must be integer class indices, got dtype {factors.dtype}")
    return codes, factors.astype(np.int64)


def represent_factors(
    data: GroundTruthData, represent: RepresentFn, factors: Tensor, batch_size: int
) -> np.ndarray:
    """Render ``factors`` ``(n, K)`` and encode them in chunks: float64 codes ``(n, D)``."""
    check_batch_size(batch_size)
    chunks = []
    with torch.no_grad():
        for start in range(0, factors.shape[0], batch_size):
            part = factors[start:start + batch_size]
            images = data.images_from_factors(part)
            chunks.append(as_codes(represent(images), part.shape[0]))
    return np.concatenate(chunks, axis=0)


def sample_factors(data: GroundTruthData, n: int, gen: torch.Generator) -> Tensor:
    """``n`` factor draws ``(n, K)`` long, checked against ``data.factor_sizes``."""
    factors = data.sample_factors(n, gen)
    sizes = torch.as_tensor(data.factor_sizes)
    if factors.shape != (n, len(sizes)):
        raise DataError(
            f"sample_factors({n}) returned shape {tuple(factors.shape)}, expected ({n}, {len(sizes)})"
        )
    if (factors < 0).any() or (factors >= sizes).any():
        raise DataError("sample_factors returned indices outside [0, factor_sizes)")
    return factors.long()


def sample_codes(
    data: GroundTruthData, represent: RepresentFn, n: int, rng: np.random.Generator,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` i.i.d. points: codes ``(n, D)`` float64 and their factors ``(n, K)`` int64."""
    factors = sample_factors(data, n, torch_generator(rng))
    return represent_factors(data, represent, factors, batch_size), factors.numpy().astype(np.int64)


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put ``modules`` in eval mode for the block; restore each one's training flag after."""
    states = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, s in zip(modules, states):
            m.train(s)
