"""The NCP paper's colour datasets: ``cifar10``, ``svhn`` (3x32x32) and ``celeba`` (3x64x64).

Files live where torchvision's loaders put them (``download = true`` lets torchvision fetch and
checksum them; needs internet)::

    <root>/cifar-10-batches-py/{data_batch_1..5, test_batch}          (cifar10)
    <root>/{train,test}_32x32.mat                                     (svhn)
    <root>/celeba/img_align_celeba/*.jpg, list_eval_partition.txt,
                  list_attr_celeba.txt                                (celeba)

The files are then read here, not by torchvision's dataset classes: those refuse any file whose
MD5 differs from the official one (so a re-packed or partial copy cannot be used) and unpickle
CIFAR's batches with the full ``pickle`` module, which can run code from a tampered file.
CIFAR's batches are read with an unpickler that accepts only plain containers and numpy arrays;
SVHN's ``.mat`` files with ``scipy.io.loadmat``; CelebA's images with Pillow.

Images are kept as uint8 ``(N, 3, H, W)`` (scaled to [0, 1] per batch) with ``(N,)`` long labels:
the class (CIFAR-10: 0..9; SVHN: the digit 0..9, its ``10`` label mapped to 0) or, for CelebA,
the 0/1 value of ``label_attribute`` (e.g. ``"Smiling"``; None: no labels). Official splits are
used (CelebA: partition 0 trains, partition 2 tests); ``train_size`` / ``test_size`` cut them to a
random subset seeded by ``split_seed`` (never by the run seed). CelebA images are center-cropped
to ``crop_size`` (148 of 178x218, as in the NCP and NVAE papers) and resized to ``image_size``
(64); the full resized splits are cached once as ``<root>/celeba/ncpvae-cache/*.npy``.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from ncpvae import BuildContext, DataBundle, DataError, DatasetPlugin, TensorImageSource, atomic_write
from ncpvae.splits import SubsetFields, seeded_permutation

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = ("test_batch",)
SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
CELEBA_FOLDER = "celeba"
CELEBA_IMAGES = "img_align_celeba"
CELEBA_PARTITION = "list_eval_partition.txt"
CELEBA_ATTRIBUTES = "list_attr_celeba.txt"

# what a CIFAR batch may reference: numpy's array reconstruction and nothing else
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler for data files: dicts, lists, strings, numbers and numpy arrays only."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}")


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())


def _subset(images: Tensor, labels: Tensor | None, limit: int | None, seed: int
            ) -> tuple[Tensor, Tensor | None]:
    if limit is None or limit >= len(images):
        return images, labels
    keep = seeded_permutation(len(images), seed)[:limit]
    return images[keep], None if labels is None else labels[keep]


class _ColourDataset(DatasetPlugin):
    """Shared build: load the official train and test splits, cut seeded subsets."""

    tv_class: ClassVar[str]
    #: what to put where, for the offline error message
    expected_files: ClassVar[str]
    #: the data folder under ``root`` ("": ``root`` itself) and the files it must hold
    folder: ClassVar[str] = ""
    required_files: ClassVar[tuple[str, ...]] = ()

    def data_folder(self, root: str) -> str:
        return os.path.join(root, self.folder) if self.folder else root

    def missing(self, root: str) -> list[str]:
        """Paths of required files that are not there."""
        folder = self.data_folder(root)
        return [os.path.join(folder, f) for f in self.required_files
                if not os.path.isfile(os.path.join(folder, f))]

    def download(self, root: str) -> None:
        """Let torchvision fetch (and checksum) the files into ``root``."""
        import torchvision.datasets as tvd

        cls = getattr(tvd, self.tv_class)
        for kwargs in self.download_calls():
            try:
                cls(root, download=True, **kwargs)
            except Exception as err:  # noqa: BLE001 -- any failure becomes one line
                raise DataError(
                    f"{self.name}: downloading into {self.data_folder(root)} failed "
                    f"({_one_line(err)}); check the internet connection, or put "
                    f"{self.expected_files} there yourself and set download=false") from None

    def download_calls(self) -> list[dict[str, Any]]:
        return [{}]

    def ensure_files(self, root: str, download: bool) -> None:
        missing = self.missing(root)
        if missing and download:
            self.download(root)
            missing = self.missing(root)
        if missing:
            raise DataError(
                f"{self.name}: data not found, missing {', '.join(missing)}; set download=true to "
                f"fetch it (needs internet), or put {self.expected_files} in "
                f"{self.data_folder(root)}")

    def load_split(self, root: str, train: bool, *, limit: int | None = None, seed: int = 0
                   ) -> tuple[Tensor, Tensor | None]:
        """uint8 ``(N, 3, H, W)`` images and ``(N,)`` long labels (or None) of one split, cut to
        a subset of ``limit`` images drawn with ``seed``."""
        raise NotImplementedError

    def build(self, ctx: BuildContext) -> DataBundle:
        cfg = self.config
        root = str(cfg.root)
        self.ensure_files(root, cfg.download)
        sources = []
        for train, limit, offset in ((True, cfg.train_size, 0), (False, cfg.test_size, 1)):
            images, labels = self.load_split(root, train, limit=limit,
                                             seed=2 * cfg.split_seed + offset)
            what = f"{self.name} {'train' if train else 'test'}"
            sources.append(TensorImageSource(images, labels, what=what))
        return DataBundle(train=sources[0], test=sources[1], ground_truth=None)


# ------------------------------------------------------------------------------------------------
# CIFAR-10


def read_cifar_batch(path: str, *, what: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch: uint8 ``(n, 3, 32, 32)`` images and int64 ``(n,)`` labels."""
    try:
        with open(path, "rb") as fh:
            entry = _ArrayUnpickler(fh, encoding="latin1").load()
    except pickle.UnpicklingError as err:
        raise DataError(f"{what}: {path} was refused for safety ({err}); CIFAR batches hold only "
                        "arrays and lists, replace the file with the official one") from None
    except Exception as err:  # noqa: BLE001 -- truncated or foreign files
        raise DataError(f"{what}: cannot read {path} ({_one_line(err)}); the file is corrupt or "
                        "not a CIFAR python batch, replace it") from None
    if isinstance(entry, dict):
        entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    data = entry.get("data") if isinstance(entry, dict) else None
    labels = entry.get("labels", entry.get("fine_labels")) if isinstance(entry, dict) else None
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 \
            or labels is None or len(labels) != len(data):
        raise DataError(f"{what}: {path} is not a CIFAR batch (expected a dict with 'data' of shape "
                        "(n, 3072) and n 'labels'); replace it with the official file")
    labels = np.asarray(labels, dtype=np.int64)
    return np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32), labels


class CIFAR10Dataset(_ColourDataset):
    """CIFAR-10: 3x32x32 colour images of 10 classes, 50,000 train / 10,000 test."""

    name = "cifar10"
    tv_class = "CIFAR10"
    expected_files = "the python batches (cifar-10-python.tar.gz extracted)"
    folder = CIFAR_FOLDER
    required_files = CIFAR_TRAIN + CIFAR_TEST

    class Config(SubsetFields):
        name: Literal["cifar10"] = "cifar10"

    def load_split(self, root: str, train: bool, *, limit: int | None = None, seed: int = 0
                   ) -> tuple[Tensor, Tensor | None]:
        parts = [read_cifar_batch(os.path.join(self.data_folder(root), f), what=self.name)
                 for f in (CIFAR_TRAIN if train else CIFAR_TEST)]
        images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        return _subset(images, labels, limit, seed)


# ------------------------------------------------------------------------------------------------
# SVHN


class SVHNDataset(_ColourDataset):
    """SVHN house-number digits: 3x32x32, 73,257 train / 26,032 test, labels 0..9."""

    name = "svhn"
    tv_class = "SVHN"
    expected_files = "train_32x32.mat and test_32x32.mat"
    required_files = tuple(SVHN_FILES.values())

    class Config(SubsetFields):
        name: Literal["svhn"] = "svhn"

    def download_calls(self) -> list[dict[str, Any]]:
        return [{"split": "train"}, {"split": "test"}]

    def load_split(self, root: str, train: bool, *, limit: int | None = None, seed: int = 0
                   ) -> tuple[Tensor, Tensor | None]:
        from scipy.io import loadmat

        path = os.path.join(root, SVHN_FILES["train" if train else "test"])
        try:
            mat = loadmat(path)
        except Exception as err:  # noqa: BLE001 -- scipy raises many types on bad files
            raise DataError(f"{self.name}: cannot read {path} ({_one_line(err)}); the file is "
                            "corrupt or not SVHN's .mat, replace it") from None
        x, y = mat.get("X"), mat.get("y")
        if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[:3] != (32, 32, 3) \
                or not isinstance(y, np.ndarray) or y.size != x.shape[3]:
            raise DataError(f"{self.name}: {path} does not hold SVHN's X (32, 32, 3, N) and y (N, 1) "
                            "arrays; replace it with the official file")
        if x.dtype != np.uint8:
            raise DataError(f"{self.name}: {path} holds X as {x.dtype}, expected uint8")
        images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)))
        labels = torch.from_numpy(y.reshape(-1).astype(np.int64) % 10)  # SVHN labels 0 as 10
        return _subset(images, labels, limit, seed)


# ------------------------------------------------------------------------------------------------
# CelebA


def read_partition(path: str, *, what: str) -> dict[str, int]:
    """``list_eval_partition.txt``: ``<file name> <0|1|2>`` per line -> {file name: partition}."""
    out: dict[str, int] = {}
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
                raise DataError(f"{what}: {path} line {number} is not '<image> <0|1|2>'; replace "
                                "the file with the official list_eval_partition.txt")
            out[fields[0]] = int(fields[1])
    return out


def read_attributes(path: str, *, what: str) -> tuple[list[str], dict[str, np.ndarray]]:
    """``list_attr_celeba.txt``: a count line, the attribute names, then ``<image> +-1 ...``."""
    with open(path, encoding="utf-8") as fh:
        lines = [line.split() for line in fh if line.strip()]
    if len(lines) < 2:
        raise DataError(f"{what}: {path} is too short to be list_attr_celeba.txt")
    names = lines[1]
    table: dict[str, np.ndarray] = {}
    for number, fields in enumerate(lines[2:], start=3):
        if len(fields) != len(names) + 1 or any(v not in ("1", "-1") for v in fields[1:]):
            raise DataError(f"{what}: {path} line {number} does not hold an image name and "
                            f"{len(names)} values of 1 or -1; replace the file with the official one")
        table[fields[0]] = np.array([v == "1" for v in fields[1:]], dtype=np.int64)
    return names, table


def crop_and_resize(path: str, crop_size: int, image_size: int) -> np.ndarray:
    """The image at ``path``, center-cropped to ``crop_size`` squared (or the shorter side when
    smaller) and resized to ``image_size`` squared: uint8 ``(3, image_size, image_size)``."""
    from PIL import Image

    with Image.open(path) as img:
        rgb = img.convert("RGB")
    w, h = rgb.size
    side = min(crop_size, w, h)
    left, top = (w - side) // 2, (h - side) // 2
    rgb = rgb.crop((left, top, left + side, top + side))
    rgb = rgb.resize((image_size, image_size), Image.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


class CelebADataset(_ColourDataset):
    """CelebA aligned faces, center crop ``crop_size`` then resized to ``image_size`` (64);
    162,770 train (partition 0) / 19,962 test (partition 2) images."""

    name = "celeba"
    tv_class = "CelebA"
    expected_files = (f"{CELEBA_IMAGES}/ (the extracted img_align_celeba.zip), {CELEBA_PARTITION} "
                      f"and {CELEBA_ATTRIBUTES}")
    folder = CELEBA_FOLDER

    class Config(SubsetFields):
        name: Literal["celeba"] = "celeba"
        root: str = Field("data", description="folder holding celeba/")
        image_size: int = Field(64, ge=4, description="side of the resized square images")
        crop_size: int = Field(148, ge=4, description="side of the center crop before resizing")
        label_attribute: str | None = Field(
            None, description="attribute giving the 0/1 labels, e.g. 'Smiling' (None: no labels)")
        cache: bool = Field(True, description="cache the resized full splits as .npy in root")

    def missing(self, root: str) -> list[str]:
        folder = self.data_folder(root)
        wanted = [os.path.join(folder, CELEBA_PARTITION)]
        if self.config.label_attribute is not None:
            wanted.append(os.path.join(folder, CELEBA_ATTRIBUTES))
        out = [p for p in wanted if not os.path.isfile(p)]
        if not os.path.isdir(os.path.join(folder, CELEBA_IMAGES)):
            out.append(os.path.join(folder, CELEBA_IMAGES) + "/")
        return out

    def download_calls(self) -> list[dict[str, Any]]:
        return [{"split": "all", "target_type": "attr"}]

    def _labels(self, root: str, files: list[str]) -> Tensor | None:
        attribute = self.config.label_attribute
        if attribute is None:
            return None
        path = os.path.join(self.data_folder(root), CELEBA_ATTRIBUTES)
        names, table = read_attributes(path, what=self.name)
        if attribute not in names:
            raise DataError(f"{self.name}: label_attribute '{attribute}' is not in {path}; "
                            f"choose one of {', '.join(names)}")
        column = names.index(attribute)
        absent = [f for f in files if f not in table]
        if absent:
            raise DataError(f"{self.name}: {len(absent)} images (e.g. {absent[0]}) have no row in "
                            f"{path}; use the official file")
        return torch.tensor([int(table[f][column]) for f in files], dtype=torch.long)

    def _decode(self, folder: str, files: list[str]) -> np.ndarray:
        cfg = self.config
        out = np.empty((len(files), 3, cfg.image_size, cfg.image_size), dtype=np.uint8)
        for i, name in enumerate(files):
            path = os.path.join(folder, CELEBA_IMAGES, name)
            try:
                out[i] = crop_and_resize(path, cfg.crop_size, cfg.image_size)
            except FileNotFoundError:
                raise DataError(f"{self.name}: {path} is listed in {CELEBA_PARTITION} but missing; "
                                "extract img_align_celeba.zip completely") from None
            except Exception as err:  # noqa: BLE001 -- Pillow raises many types on bad files
                raise DataError(f"{self.name}: cannot read {path} ({_one_line(err)}); replace "
                                "the image") from None
        return out

    def load_split(self, root: str, train: bool, *, limit: int | None = None, seed: int = 0
                   ) -> tuple[Tensor, Tensor | None]:
        cfg = self.config
        folder = self.data_folder(root)
        partition = read_partition(os.path.join(folder, CELEBA_PARTITION), what=self.name)
        files = sorted(f for f, p in partition.items() if p == (0 if train else 2))
        if not files:
            raise DataError(f"{self.name}: {os.path.join(folder, CELEBA_PARTITION)} lists no "
                            f"{'train (0)' if train else 'test (2)'} images")
        if limit is not None and limit < len(files):  # decode only the subset
            keep = seeded_permutation(len(files), seed)[:limit].tolist()
            files = [files[i] for i in keep]
            return torch.from_numpy(self._decode(folder, files)), self._labels(root, files)
        split = "train" if train else "test"
        cache = os.path.join(folder, "ncpvae-cache",
                             f"{split}-{len(files)}-crop{cfg.crop_size}-{cfg.image_size}.npy")
        images = None
        if cfg.cache and os.path.isfile(cache):
            try:
                images = np.load(cache, allow_pickle=False)
            except (OSError, ValueError, EOFError):
                images = None  # a broken cache is rebuilt
            if images is not None and (images.dtype != np.uint8 or images.shape != (
                    len(files), 3, cfg.image_size, cfg.image_size)):
                images = None
        if images is None:
            images = self._decode(folder, files)
            if cfg.cache:
                buffer = io.BytesIO()
                np.save(buffer, images, allow_pickle=False)
                with contextlib.suppress(OSError):  # a read-only root: no cache, same data
                    atomic_write(cache, lambda fh: fh.write(buffer.getvalue()), binary=True)
        return torch.from_numpy(images), self._labels(root, files)
