"""Seeded train/test splits shared by the dataset plugins. A split depends only on the number
of images and the dataset's ``split_seed``, never on the run seed."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from ncpvae import ComponentConfig, DataError

__all__ = ["SubsetFields", "seeded_permutation", "split_by_count", "split_by_fraction"]


class SubsetFields(ComponentConfig):
    """Config fields of a dataset read from files with an official train/test split, optionally
    cut to seeded subsets (``mnist``, ``fashion-mnist``, ``cifar10``, ``svhn``, ``celeba``);
    subclasses narrow ``name`` and may describe ``root`` more precisely."""

    root: str = Field("data", description="folder holding the files (see the plugin docs)")
    download: bool = Field(False, description="let torchvision download missing files")
    train_size: int | None = Field(None, ge=1, description="seeded subset size; None = all")
    test_size: int | None = Field(None, ge=1, description="seeded subset size; None = all")
    split_seed: int = Field(
        0, ge=0, description="seed of the train and test subsets (independent of the run seed)")


def seeded_permutation(n: int, seed: int) -> Tensor:
    """A permutation of ``range(n)`` (``(n,)`` long) that depends only on ``n`` and ``seed``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))


def split_by_fraction(
    n: int, test_fraction: float, seed: int, *, what: str
) -> tuple[Tensor, Tensor]:
    """Seeded train/test split of ``range(n)``: returns ``(train_idx, test_idx)``, disjoint.

    The test part has ``round(n * test_fraction)`` items, at least 1; the train part keeps at
    least 1 item, otherwise a :class:`DataError` is raised.
    """
    n_test = max(1, round(n * test_fraction))
    if n_test >= n:
        raise DataError(
            f"{what}: {n} images cannot be split into train and test with test_fraction="
            f"{test_fraction}; provide more images or lower test_fraction"
        )
    perm = seeded_permutation(n, seed)
    return perm[n_test:], perm[:n_test]


def split_by_count(
    n: int, train_size: int | None, test_size: int, seed: int, *, what: str
) -> tuple[Tensor, Tensor]:
    """Seeded split of ``range(n)`` into ``test_size`` test and ``train_size`` train indices.

    ``train_size=None`` means every index not in the test part. Raises :class:`DataError` when
    the two do not fit into ``n``.
    """
    n_train = n - test_size if train_size is None else train_size
    if test_size >= n or n_train < 1 or n_train + test_size > n:
        raise DataError(
            f"{what}: train_size={train_size} and test_size={test_size} do not fit into {n} "
            "images; lower them (train_size + test_size must be at most the number of images)"
        )
    perm = seeded_permutation(n, seed)
    return perm[test_size : test_size + n_train], perm[:test_size]
