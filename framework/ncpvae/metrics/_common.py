"""Shared plumbing of the metrics: seeding, batched representation, input checks.

Conventions: codes are float64 numpy arrays ``(n, D)``; factors are int64 numpy arrays ``(n, K)``.
A representation function maps images ``(n, C, H, W)`` to codes ``(n, D)`` (a Tensor or an
ndarray; the encoder means). It is always called under ``torch.no_grad()`` and never with more
than ``batch_size`` images, so memory stays bounded however many points a metric needs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from ncpvae.component import StrictModel
from ncpvae.data import GroundTruthData
from ncpvae.errors import DataError

RepresentFn = Callable[[Tensor], "Tensor | np.ndarray"]

#: images per call of the representation function (memory bound, not a metric parameter)
DEFAULT_BATCH_SIZE = 512


class MetricResult:
    """Mixin for the frozen result dataclasses: plain-data export for JSON reports."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@dataclass(frozen=True)
class TrainEvalAccuracy(MetricResult):
    """A classifier-based score: accuracy on the points it was fitted on and on fresh ones."""

    train_accuracy: float
    eval_accuracy: float


class TrainTestConfig(StrictModel):
    """Sizes of a metric whose classifiers are fitted on one sample and scored on another."""

    num_train: int = Field(10_000, ge=2, description="points the classifiers are fitted on")
    num_test: int = Field(5_000, ge=1, description="held-out points they are scored on")


ResultT = TypeVar("ResultT")


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


def score_train_test(
    data: GroundTruthData, represent: RepresentFn, config: TrainTestConfig,
    seed: int | np.random.Generator, batch_size: int,
    score: Callable[..., ResultT],
) -> ResultT:
    """``score(codes_train, factors_train, codes_test, factors_test, random_state=...)`` on
    ``config.num_train`` then ``config.num_test`` i.i.d. points of ``data`` (codes ``(n, D)``,
    factors ``(n, K)``), the classifiers' seed drawn last from the same generator."""
    rng = make_rng(seed)
    codes_train, factors_train = sample_codes(data, represent, config.num_train, rng, batch_size)
    codes_test, factors_test = sample_codes(data, represent, config.num_test, rng, batch_size)
    return score(codes_train, factors_train, codes_test, factors_test,
                 random_state=int(rng.integers(0, 2**31 - 1)))


def sample_fixed_factor_groups(
    data: GroundTruthData, num_groups: int, group_size: int, rng: np.random.Generator,
    copies: int = 1,
) -> tuple[np.ndarray, list[Tensor]]:
    """The draws of the beta-VAE and FactorVAE metrics: ``(n,)`` labels (a factor index k per
    group, uniform) and ``copies`` arrays of factor vectors ``(n, group_size, K)``, all drawn up
    front (so results do not depend on ``batch_size``); the caller fixes factor k in a group."""
    gen = torch_generator(rng)
    labels = rng.integers(0, len(data.factor_sizes), size=num_groups)
    return labels, [sample_factors(data, num_groups * group_size, gen).view(
        num_groups, group_size, -1) for _ in range(copies)]


def group_chunks(num_groups: int, group_size: int, batch_size: int) -> Iterator[slice]:
    """Slices of whole groups holding at most ``batch_size`` images (at least one group)."""
    per_chunk = max(1, batch_size // group_size)
    for start in range(0, num_groups, per_chunk):
        yield slice(start, start + per_chunk)
