"""Dataset plugins and the image sources the training loop draws batches from.

Batches are produced by indexing (``get_batch(index)``), never by per-sample Python transforms:
a memory-resident tensor is sliced, a procedural dataset renders the requested indices in one
vectorized call. Images are float32 in [0, 1], shape ``(B, C, H, W)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

from ncpvae.component import BuildContext, Component, ComponentConfig
from ncpvae.errors import DataError


class ImageSource(ABC):
    """A finite indexed set of images; ``labels`` is an optional ``(N,)`` long tensor."""

    labels: Tensor | None = None

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def get_batch(self, index: Tensor) -> Tensor:
        """Images at ``index`` (``(B,)`` long): float32 ``(B, C, H, W)`` in [0, 1]."""

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.get_batch(torch.zeros(1, dtype=torch.long)).shape[1:])  # type: ignore[return-value]


class TensorImageSource(ImageSource):
    """Images held in memory: uint8 in [0, 255] or floating in [0, 1], shape ``(N, C, H, W)``.

    uint8 storage is kept as is (4x less memory) and scaled per batch.
    """

    def __init__(self, images: Tensor, labels: Tensor | None = None, *, what: str = "dataset"):
        if images.ndim != 4:
            raise DataError(f"{what}: expected images of shape (N, C, H, W), got {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            self._scale = 1.0 / 255.0
        elif images.is_floating_point():
            if not torch.isfinite(images).all():
                raise DataError(f"{what}: images contain NaN or infinite values; clean the data first")
            lo, hi = float(images.min()), float(images.max())
            if lo < 0.0 or hi > 1.0:
                raise DataError(
                    f"{what}: float images must lie in [0, 1], found range [{lo:.3g}, {hi:.3g}]; "
                    "rescale them (e.g. divide by 255)"
                )
            self._scale = None
        else:
            raise DataError(f"{what}: images must be uint8 or floating point, got {images.dtype}")
        if labels is not None and len(labels) != len(images):
            raise DataError(f"{what}: {len(labels)} labels for {len(images)} images")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def get_batch(self, index: Tensor) -> Tensor:
        batch = self.images[index]
        if self._scale is not None:
            return batch.to(torch.float32) * self._scale
        return batch.to(torch.float32)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]


@runtime_checkable
class GroundTruthData(Protocol):
    """A dataset generated from known discrete factors (what disentanglement metrics need).

    ``sample_factors(n, generator)`` returns a ``(n, K)`` long tensor of factor indices with
    column k in ``[0, factor_sizes[k])``; ``images_from_factors(factors)`` renders them as
    ``(n, C, H, W)`` float32 images in [0, 1].
    """

    factor_names: tuple[str, ...]
    factor_sizes: tuple[int, ...]

    def sample_factors(self, n: int, generator: torch.Generator | None = None) -> Tensor: ...

    def images_from_factors(self, factors: Tensor) -> Tensor: ...


@dataclass
class DataBundle:
    """What a dataset plugin builds: train and test sources and, if known, ground-truth factors."""

    train: ImageSource
    test: ImageSource
    ground_truth: GroundTruthData | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.train.image_shape


class DatasetPlugin(Component, ABC):
    """Base of dataset plugins: holds its config and builds a :class:`DataBundle`."""

    kind: ClassVar[str] = "dataset"

    def __init__(self, config: ComponentConfig):
        self.config = config

    @classmethod
    def from_config(cls, config: ComponentConfig, ctx: BuildContext) -> DatasetPlugin:
        return cls(config)

    @abstractmethod
    def build(self, ctx: BuildContext) -> DataBundle:
        """Load or generate the data. Missing files raise :class:`DataError` naming the path."""
