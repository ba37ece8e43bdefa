"""``mnist`` and ``fashion-mnist``: torchvision's MNIST / FashionMNIST read from local files.

Files live where torchvision expects them::

    <root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte          (mnist)
    <root>/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte   (fashion-mnist)

torchvision (checked with 0.29) reads only the uncompressed files when ``download`` is false;
when just the ``.gz`` archive of a file is there, it is decompressed next to it first (what
torchvision does after a download; written to a temporary name, then renamed).
``download = true`` lets torchvision fetch missing files (needs internet). Images are kept
as uint8 ``(N, 1, 28, 28)`` with ``(N,)`` long labels; the official train/test split is used,
optionally cut to a random subset of ``train_size`` / ``test_size`` images seeded by
``split_seed`` (never by the run seed).
"""

from __future__ import annotations

import gzip
import os
import zlib
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from ncpvae import BuildContext, DataBundle, DataError, DatasetPlugin, TensorImageSource, atomic_write
from ncpvae.splits import SubsetFields, seeded_permutation

RAW_FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class _TorchvisionMNISTLike(DatasetPlugin):
    """Shared loader; subclasses name the torchvision class (``tv_class``)."""

    tv_class: ClassVar[str]

    def raw_folder(self, root: str) -> str:
        """``<root>/<torchvision class name>/raw``, where the IDX files must be."""
        return os.path.join(root, self.tv_class, "raw")

    def _prepare_files(self, raw: str) -> None:
        """Decompress ``.gz``-only files; raise a :class:`DataError` naming any missing file."""
        missing = []
        for name in RAW_FILES:
            path = os.path.join(raw, name)
            if os.path.isfile(path):
                continue
            if os.path.isfile(path + ".gz"):
                try:
                    with gzip.open(path + ".gz", "rb") as fh:
                        data = fh.read()
                except (OSError, EOFError, zlib.error) as err:
                    raise DataError(
                        f"{self.name}: cannot decompress {path}.gz ({' '.join(str(err).split())}); "
                        "the file is corrupt, replace it (or delete it and set download=true)"
                    ) from None
                # write then rename, so a failed write never leaves a truncated file behind
                try:
                    atomic_write(path, lambda fh, data=data: fh.write(data), binary=True)
                except OSError as err:
                    raise DataError(
                        f"{self.name}: cannot write the decompressed {path} ({err}); "
                        f"decompress {path}.gz yourself or make {raw} writable"
                    ) from None
                continue
            missing.append(name)
        if missing:
            paths = ", ".join(os.path.join(raw, m) + "(.gz)" for m in missing)
            raise DataError(
                f"{self.name}: data not found, missing {paths}; set download=true to fetch it "
                f"(needs internet), or put the IDX files (optionally .gz) in {raw}"
            )

    def _load(self, root: str, *, train: bool, download: bool) -> tuple[Tensor, Tensor]:
        import torchvision.datasets as tvd

        cls = getattr(tvd, self.tv_class)
        raw = self.raw_folder(root)
        if not download:
            self._prepare_files(raw)
        try:
            ds: Any = cls(root, train=train, download=download)
        except (AssertionError, ValueError, TypeError, KeyError, RuntimeError, OSError) as err:
            reason = " ".join(f"{type(err).__name__}: {err}".split())  # one line
            if download and not all(os.path.isfile(os.path.join(raw, f)) for f in RAW_FILES):
                raise DataError(
                    f"{self.name}: downloading into {raw} failed ({reason}); check the internet "
                    "connection, or put the IDX files there yourself and set download=false"
                ) from None
            split = "train" if train else "t10k"
            raise DataError(
                f"{self.name}: cannot read the {split} IDX files in {raw} ({reason}); the files "
                "are corrupt or not MNIST IDX files, replace them (or delete them and set "
                "download=true)"
            ) from None
        images, labels = ds.data, ds.targets
        if images.ndim != 3 or images.dtype != torch.uint8 or len(labels) != len(images):
            raise DataError(
                f"{self.name}: the {'train' if train else 't10k'} files in {raw} hold images of "
                f"shape {tuple(images.shape)} and {len(labels)} labels; expected (N, 28, 28) "
                "uint8 images and N labels"
            )
        return images.unsqueeze(1), labels.long()

    def build(self, ctx: BuildContext) -> DataBundle:
        cfg = self.config
        sources = []
        for train, limit, seed_offset in ((True, cfg.train_size, 0), (False, cfg.test_size, 1)):
            images, labels = self._load(str(cfg.root), train=train, download=cfg.download)
            if limit is not None and limit < len(images):
                # a seeded subset; train and test use different streams of the same seed
                keep = seeded_permutation(len(images), 2 * cfg.split_seed + seed_offset)[:limit]
                images, labels = images[keep], labels[keep]
            what = f"{self.name} {'train' if train else 'test'}"
            sources.append(TensorImageSource(images, labels, what=what))
        return DataBundle(train=sources[0], test=sources[1], ground_truth=None)


class MNISTDataset(_TorchvisionMNISTLike):
    """MNIST digits, 28x28 grey, 60,000 train / 10,000 test, labels 0..9."""

    name = "mnist"
    tv_class = "MNIST"

    class Config(SubsetFields):
        name: Literal["mnist"] = "mnist"
        root: str = Field("data", description="folder holding MNIST/raw/")


class FashionMNISTDataset(_TorchvisionMNISTLike):
    """Fashion-MNIST clothing images, 28x28 grey, 60,000 train / 10,000 test, labels 0..9."""

    name = "fashion-mnist"
    tv_class = "FashionMNIST"

    class Config(SubsetFields):
        name: Literal["fashion-mnist"] = "fashion-mnist"
        root: str = Field("data", description="folder holding FashionMNIST/raw/")
