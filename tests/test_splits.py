"""Fixed train/test splits: for every built-in dataset plugin, no held-out image is a training
image, whatever the run seed, and the split depends only on the dataset config (``split_seed``).

Images are identified by their grid index (sprites, dsprites) or by their content, made unique
per image here (digits, npz, mnist-like files), so "disjoint" is checked on the images themselves.
"""

from __future__ import annotations

import math
import os
import struct

import numpy as np
import pytest
import torch
from ncpvae_plugins.datasets.digits import DigitsDataset
from ncpvae_plugins.datasets.dsprites import DSpritesDataset
from ncpvae_plugins.datasets.imagefolder import ImageFolderDataset
from ncpvae_plugins.datasets.npz import NpzDataset
from ncpvae_plugins.datasets.sprites import NUM_IMAGES, SpritesDataset
from ncpvae_plugins.datasets.torchvision_sets import FashionMNISTDataset, MNISTDataset

from ncpvae.component import BuildContext
from ncpvae.data import DataBundle, DatasetPlugin
from ncpvae.plugin_manager import PluginManager

RUN_SEEDS = (0, 1, 7, 123456)


def build(cls: type[DatasetPlugin], run_seed: int, **fields) -> DataBundle:
    ctx = BuildContext(seed=run_seed)
    return cls.from_config(cls.Config(**fields), ctx).build(ctx)


def rows(source) -> set[bytes]:
    """The images of a source as a set of byte strings (one per image)."""
    images = source.get_batch(torch.arange(len(source)))
    return {image.numpy().tobytes() for image in images}


def assert_fixed_disjoint_split(make, key, n_total: int | None) -> None:
    """``make(run_seed, split_seed)`` builds a bundle, ``key(source)`` gives its image ids.

    Train and test are disjoint for every run seed, the same for every run seed, (when
    ``n_total`` is given) complete, and a different ``split_seed`` gives a different split.
    """
    first = None
    for run_seed in RUN_SEEDS:
        bundle = make(run_seed, 0)
        train, test = key(bundle.train), key(bundle.test)
        assert len(train) == len(bundle.train) and len(test) == len(bundle.test)  # ids unique
        assert not train & test, f"run seed {run_seed}: {len(train & test)} test images in train"
        if n_total is not None:
            assert len(train) + len(test) == n_total
        if first is None:
            first = (train, test)
        else:
            assert (train, test) == first, f"run seed {run_seed} changed the split"
    other = make(0, 1)
    assert key(other.test) != first[1], "split_seed does not change the split"
    assert not key(other.train) & key(other.test)


def test_every_dataset_plugin_has_a_split_seed(registry):
    """The split is part of the dataset config (saved with the run), for every dataset."""
    for name in registry.names("dataset"):
        fields = registry.get("dataset", name).Config.model_fields
        assert "split_seed" in fields, f"dataset '{name}' has no split_seed"
        assert fields["split_seed"].default == 0


def test_sprites_split_is_fixed_and_disjoint():
    def make(run_seed, split_seed):
        return build(SpritesDataset, run_seed, image_size=32, train_size=3000, test_size=1000,
                     split_seed=split_seed)

    assert_fixed_disjoint_split(make, lambda s: set(s.grid_indices.tolist()), None)


def test_sprites_default_split_is_unchanged():
    """split_seed = 0 gives the split a default run (seed 0) always had: the first 10,000 indices
    of the permutation seeded with 0 are the test set."""
    bundle = build(SpritesDataset, 5)
    expected = torch.randperm(NUM_IMAGES, generator=torch.Generator().manual_seed(0))
    assert torch.equal(bundle.test.grid_indices, expected[:10_000])
    assert torch.equal(bundle.train.grid_indices, expected[10_000:])


def test_digits_split_is_fixed_and_disjoint():
    # digits has duplicate images; pair each with its label and position in the data set
    from sklearn.datasets import load_digits

    images = load_digits().images
    index_of = {}
    for i, image in enumerate(images):
        index_of.setdefault((image / 16.0).astype(np.float32).tobytes(), []).append(i)
    duplicates = sum(len(v) - 1 for v in index_of.values())

    def make(run_seed, split_seed):
        return build(DigitsDataset, run_seed, split_seed=split_seed)

    for run_seed in RUN_SEEDS:
        bundle = make(run_seed, 0)
        train, test = rows(bundle.train), rows(bundle.test)
        # an image present in both parts must be a duplicate in the original data
        shared = train & test
        assert all(len(index_of[key]) > 1 for key in shared)
        assert len(shared) <= duplicates
    a, b = make(0, 0), make(99, 0)
    assert torch.equal(a.test.images, b.test.images) and torch.equal(a.train.images, b.train.images)
    assert not torch.equal(make(0, 1).test.images, a.test.images)


def unique_images(n: int, shape=(1, 6, 6)) -> np.ndarray:
    """``n`` distinct uint8 images: pixel 0 and 1 encode the image's index."""
    images = np.zeros((n, *shape), dtype=np.uint8)
    flat = images.reshape(n, -1)
    flat[:, 0] = np.arange(n) % 256
    flat[:, 1] = np.arange(n) // 256
    return images


def test_npz_split_is_fixed_and_disjoint(tmp_path):
    path = tmp_path / "images.npz"
    np.savez(path, images=unique_images(300))

    def make(run_seed, split_seed):
        return build(NpzDataset, run_seed, path=str(path), test_fraction=0.2,
                     split_seed=split_seed)

    assert_fixed_disjoint_split(make, rows, 300)


def test_imagefolder_split_is_fixed_and_disjoint(tmp_path):
    from PIL import Image

    for i, image in enumerate(unique_images(40, (8, 8))):  # 8-bit grey PNGs, lossless
        folder = tmp_path / ("a" if i % 2 else "b")
        folder.mkdir(exist_ok=True)
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(folder / f"{i:03d}.png")

    def make(run_seed, split_seed):
        return build(ImageFolderDataset, run_seed, root=str(tmp_path), image_size=8, channels=1,
                     test_fraction=0.25, split_seed=split_seed)

    assert_fixed_disjoint_split(make, rows, 40)


def test_dsprites_split_is_fixed_and_disjoint(tmp_path):
    sizes = (1, 3, 2, 2, 3, 3)  # color, shape, scale, orientation, posX, posY
    n = math.prod(sizes)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in sizes], indexing="ij"), -1)
    classes = grid.reshape(n, len(sizes))[np.random.default_rng(0).permutation(n)]
    images = unique_images(n, (8, 8))
    path = tmp_path / "dsprites.npz"
    np.savez(path, imgs=images, latents_classes=classes)

    def make(run_seed, split_seed):
        return build(DSpritesDataset, run_seed, path=str(path), test_size=20,
                     split_seed=split_seed)

    assert_fixed_disjoint_split(make, lambda s: set(s.rows.tolist()), n)


def write_idx(path: str, array: np.ndarray) -> None:
    """IDX file: magic (0, 0, 0x08 = uint8, ndim), big-endian int32 dims, raw bytes."""
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    with open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def make_mnist_files(root, folder: str, n_train: int = 40, n_test: int = 30) -> None:
    """Fake MNIST files whose every image is distinct (train and test included)."""
    raw = os.path.join(root, folder, "raw")
    os.makedirs(raw, exist_ok=True)
    images = unique_images(n_train + n_test, (28, 28))
    write_idx(os.path.join(raw, "train-images-idx3-ubyte"), images[:n_train])
    write_idx(os.path.join(raw, "train-labels-idx1-ubyte"), np.arange(n_train) % 10)
    write_idx(os.path.join(raw, "t10k-images-idx3-ubyte"), images[n_train:])
    write_idx(os.path.join(raw, "t10k-labels-idx1-ubyte"), np.arange(n_test) % 10)


@pytest.mark.parametrize(("cls", "folder"), [(MNISTDataset, "MNIST"),
                                             (FashionMNISTDataset, "FashionMNIST")])
def test_mnist_family_subsets_are_fixed_and_disjoint(tmp_path, cls, folder):
    make_mnist_files(tmp_path, folder)

    def make(run_seed, split_seed):
        return build(cls, run_seed, root=str(tmp_path), train_size=25, test_size=10,
                     split_seed=split_seed)

    assert_fixed_disjoint_split(make, rows, None)


def test_every_builtin_dataset_has_a_leakage_test():
    """A new built-in dataset plugin needs its own case in this file."""
    covered = {"sprites", "digits", "npz", "imagefolder", "dsprites", "mnist", "fashion-mnist",
               # colour sets: test_datasets_colour.py::test_split_does_not_depend_on_the_run_seed
               "cifar10", "svhn", "celeba"}
    registry = PluginManager(entrypoints=False).registry
    builtin = {name for name in registry.names("dataset")
               if registry.is_builtin(registry.source("dataset", name))}
    assert builtin <= covered, f"no leakage test for {sorted(builtin - covered)}"


def test_feature_net_cache_key_follows_the_split():
    """The evaluation's feature-net cache key is computed from the dataset config, which now
    holds everything that picks the training images (split_seed included)."""
    from ncpvae.config import load_config
    from ncpvae.metrics.feature_net import feature_net_cache_key

    def key(*overrides: str) -> str:
        data = load_config("smoke", list(overrides)).data
        return feature_net_cache_key(data.name, data.model_dump(mode="json"))

    assert key() == key("seed=5")  # the run seed no longer picks the images
    assert key() != key("data.split_seed=1")
    assert key() != key("data.train_size=256")
