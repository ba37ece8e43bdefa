"""``digits``: scikit-learn's bundled handwritten digits (no download, 1,797 images).

Images are 8x8 with integer values 0..16, scaled by 1/16 to [0, 1] and kept as float32
``(N, 1, 8, 8)``; labels are the digits 0..9. The train/test split is a permutation seeded by
``split_seed`` (not the run's seed), with ``round(N * test_fraction)`` test images.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ncpvae import BuildContext, ComponentConfig, DataBundle, DatasetPlugin, TensorImageSource
from ncpvae.splits import split_by_fraction


class DigitsDataset(DatasetPlugin):
    """scikit-learn's ``load_digits``: 8x8 grey digits, values ``/16``, with labels."""

    name = "digits"

    class Config(ComponentConfig):
        name: Literal["digits"] = "digits"
        test_fraction: float = Field(0.2, gt=0, lt=1, description="share of images held out")
        split_seed: int = Field(
            0, ge=0, description="seed of the train/test split (independent of the run seed)"
        )

    def build(self, ctx: BuildContext) -> DataBundle:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = torch.from_numpy(bunch.images).to(torch.float32).div_(16.0).unsqueeze(1)
        labels = torch.from_numpy(bunch.target).long()
        train, test = split_by_fraction(
            len(images), self.config.test_fraction, self.config.split_seed, what="digits"
        )
        return DataBundle(
            train=TensorImageSource(images[train], labels[train], what="digits train"),
            test=TensorImageSource(images[test], labels[test], what="digits test"),
        )
