"""``dsprites``: the real dSprites data (Matthey et al. 2017) from its local ``.npz`` file.

Get ``dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz`` from the GitHub repository
deepmind/dsprites-dataset. Two arrays are used: ``imgs`` ``(N, 64, 64)`` uint8 with values 0/1
(scaled to 0/255 here; 0..255 data is kept as is) and ``latents_classes`` ``(N, 6)``: color,
shape, scale, orientation, posX, posY as integer class indices. The constant color factor is
dropped; the factor sizes are read from the data (``max + 1`` per column), and the rows must form
the full factor grid (each combination exactly once, in any order), so that
``images_from_factors`` is an index lookup. The full file needs about 3 GB of memory (the images
are held once; train and test are index views of them).

The train/test split is a permutation seeded by ``split_seed`` (not the run seed): ``test_size``
test images and ``train_size`` (default: all the rest) training images, as for ``sprites``.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from ncpvae import BuildContext, ComponentConfig, DataBundle, DataError, DatasetPlugin, ImageSource
from ncpvae.splits import split_by_count
from ncpvae_plugins.datasets.npz import read_npz

DEFAULT_PATH = "data/dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"
LATENT_NAMES: tuple[str, ...] = ("color", "shape", "scale", "orientation", "posX", "posY")


class IndexedImageSource(ImageSource):
    """Rows ``rows`` ``(N,)`` of a shared uint8 image tensor ``(M, C, H, W)``, without copying."""

    def __init__(self, images: Tensor, rows: Tensor, labels: Tensor | None = None):
        self.images, self.rows = images, rows.long()
        self.labels = None if labels is None else labels[self.rows]

    def __len__(self) -> int:
        return self.rows.shape[0]

    def get_batch(self, index: Tensor) -> Tensor:
        return self.images[self.rows[index.cpu()]].to(torch.float32) / 255.0

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]


class DSpritesGroundTruth:
    """dSprites factors (color dropped) as :class:`ncpvae.GroundTruthData`.

    ``factors (n, K)`` long -> images ``(n, 1, 64, 64)`` float32 by looking up the grid row.
    """

    def __init__(
        self, images: Tensor, factors: Tensor, names: tuple[str, ...], sizes: tuple[int, ...]
    ):
        self.images = images
        self.factor_names, self.factor_sizes = names, sizes
        self._sizes = torch.tensor(sizes, dtype=torch.long)
        self._strides = torch.tensor(
            [math.prod(sizes[k + 1 :]) for k in range(len(sizes))], dtype=torch.long
        )
        # grid index (last factor fastest) -> row of the file
        self._row_of = torch.empty(math.prod(sizes), dtype=torch.long)
        self._row_of[(factors * self._strides).sum(dim=1)] = torch.arange(len(factors))

    def sample_factors(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        columns = [torch.randint(size, (n,), generator=generator) for size in self.factor_sizes]
        return torch.stack(columns, dim=1)

    def index_of(self, factors: Tensor) -> Tensor:
        """Factor indices ``(n, K)`` -> grid index ``(n,)`` (last factor fastest)."""
        k = len(self.factor_sizes)
        if not isinstance(factors, Tensor) or factors.ndim != 2 or factors.shape[1] != k:
            raise DataError(f"dsprites: factors must be a (n, {k}) integer tensor")
        if factors.is_floating_point() or factors.dtype == torch.bool:
            raise DataError(f"dsprites: factors must be integer indices, got {factors.dtype}")
        factors = factors.long().cpu()
        if ((factors < 0) | (factors >= self._sizes)).any():
            raise DataError(f"dsprites: factor indices out of range for sizes {self.factor_sizes}")
        return (factors * self._strides).sum(dim=1)

    def images_from_factors(self, factors: Tensor) -> Tensor:
        rows = self._row_of[self.index_of(factors)]
        return self.images[rows].to(torch.float32) / 255.0


class DSpritesDataset(DatasetPlugin):
    """The real dSprites images and factors from a local npz file; see the module docstring."""

    name = "dsprites"

    class Config(ComponentConfig):
        name: Literal["dsprites"] = "dsprites"
        path: str = Field(DEFAULT_PATH, description="the dSprites .npz file")
        train_size: int | None = Field(
            None, ge=1, description="training images; None = all but test"
        )
        test_size: int = Field(10_000, ge=1, description="test images")
        split_seed: int = Field(
            0, ge=0, description="seed of the train/test split (independent of the run seed)"
        )

    def build(self, ctx: BuildContext) -> DataBundle:
        cfg = self.config
        arrays = read_npz(
            cfg.path,
            {"images": "imgs", "factors": "latents_classes"},
            what="dsprites",
            missing_hint=(
                "download dSprites from its GitHub repository deepmind/dsprites-dataset and put "
                f"the npz at {cfg.path} (or set data.path)"
            ),
        )
        imgs, classes = arrays["images"], arrays["factors"]
        if imgs.ndim != 3 or imgs.dtype != np.uint8:
            raise DataError(
                f"dsprites: {cfg.path}: 'imgs' must be uint8 (N, H, W), got {imgs.dtype} "
                f"{imgs.shape}"
            )
        n = imgs.shape[0]
        if classes.shape != (n, len(LATENT_NAMES)) or not np.issubdtype(classes.dtype, np.integer):
            raise DataError(
                f"dsprites: {cfg.path}: 'latents_classes' must be integer ({n}, 6), got "
                f"{classes.dtype} {classes.shape}"
            )
        if n == 0 or classes.min() < 0:
            raise DataError(f"dsprites: {cfg.path}: no images or negative latent classes")
        if imgs.max() <= 1:  # the official file stores 0/1; make it 0/255 in place
            np.multiply(imgs, 255, out=imgs)
        factors = torch.from_numpy(classes.astype(np.int64))
        sizes = tuple(int(s) for s in factors.max(dim=0).values + 1)
        keep = [k for k in range(len(LATENT_NAMES)) if not (k == 0 and sizes[0] == 1)]
        factors = factors[:, keep]
        names = tuple(LATENT_NAMES[k] for k in keep)
        sizes = tuple(sizes[k] for k in keep)
        strides = torch.tensor([math.prod(sizes[k + 1 :]) for k in range(len(sizes))])
        grid = (factors * strides).sum(dim=1)
        if n != math.prod(sizes) or torch.unique(grid).numel() != n:
            raise DataError(
                f"dsprites: {cfg.path}: latents_classes do not form the full factor grid "
                f"{dict(zip(names, sizes))} ({n} rows for {math.prod(sizes)} combinations); "
                "use the unmodified dSprites file"
            )
        images = torch.from_numpy(imgs).unsqueeze(1)
        train, test = split_by_count(
            n, cfg.train_size, cfg.test_size, cfg.split_seed, what="dsprites"
        )
        labels = factors[:, names.index("shape")] if "shape" in names else None
        return DataBundle(
            train=IndexedImageSource(images, train, labels),
            test=IndexedImageSource(images, test, labels),
            ground_truth=DSpritesGroundTruth(images, factors, names, sizes),
        )
