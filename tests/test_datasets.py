"""Tests of the built-in dataset plugins (sprites, mnist/fashion-mnist, digits, npz, dsprites)."""

from __future__ import annotations

import gzip
import hashlib
import os
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ncpvae_plugins import datasets as datasets_plugin
from ncpvae_plugins.datasets import sprites
from ncpvae_plugins.datasets.digits import DigitsDataset
from ncpvae_plugins.datasets.dsprites import DSpritesDataset
from ncpvae_plugins.datasets.npz import NpzDataset
from ncpvae_plugins.datasets.sprites import SpritesDataset
from ncpvae_plugins.datasets.torchvision_sets import FashionMNISTDataset, MNISTDataset
from pydantic import ValidationError

from ncpvae import splits
from ncpvae.component import BuildContext
from ncpvae.data import DataBundle, DatasetPlugin, GroundTruthData, ImageSource
from ncpvae.errors import DataError
from ncpvae.registry import Registry


def build(cls: type[DatasetPlugin], seed: int = 0, **fields) -> DataBundle:
    ctx = BuildContext(seed=seed)
    return cls.from_config(cls.Config(**fields), ctx).build(ctx)


def all_images(source: ImageSource) -> torch.Tensor:
    return source.get_batch(torch.arange(len(source)))


def sha256(images: torch.Tensor) -> str:
    return hashlib.sha256(images.numpy().astype("<f4").tobytes()).hexdigest()


# ------------------------------------------------------------------------------------ registry


def test_hook_registers_all_dataset_classes():
    classes = datasets_plugin.ncpvae_register_datasets()
    names = [cls.name for cls in classes]
    assert names == ["sprites", "mnist", "fashion-mnist", "digits", "npz", "imagefolder", "dsprites",
                     "cifar10", "svhn", "celeba"]
    registry = Registry()
    for cls in classes:
        assert issubclass(cls, DatasetPlugin)
        assert cls.Config.model_fields["name"].default == cls.name
        registry.register("dataset", cls, "ncpvae_plugins.datasets")
    assert registry.names("dataset") == sorted(names)


@pytest.mark.slow  # first use of torchvision, scikit-learn and the sprite masks: a few seconds
def test_framework_contract_checks(tmp_path):
    testing = pytest.importorskip("ncpvae.testing")
    for cls in datasets_plugin.ncpvae_register_datasets():
        testing.check_component_class(cls, "dataset")
    make_mnist(tmp_path, "MNIST", gz=False)
    write_npz(tmp_path / "images.npz", images=np.zeros((10, 4, 4), np.uint8), y=np.arange(10))
    write_fake_dsprites(tmp_path / "dsprites.npz")
    for cls, fields in [
        (SpritesDataset, {"train_size": 20, "test_size": 10}),
        (SpritesDataset, {"image_size": 32, "train_size": 20, "test_size": 10}),
        (MNISTDataset, {"root": str(tmp_path)}),
        (DigitsDataset, {}),
        (NpzDataset, {"path": str(tmp_path / "images.npz"), "labels_key": "y"}),
        (DSpritesDataset, {"path": str(tmp_path / "dsprites.npz"), "test_size": 8}),
    ]:
        ctx = BuildContext(seed=0)
        testing.check_dataset(cls.from_config(cls.Config(**fields), ctx), ctx)


# ------------------------------------------------------------------------------------ sprites

#: SHA-256 of little-endian float32 bytes, computed once from this implementation. A change
#: here means the generator changed: every stored run on sprites would silently change meaning.
MASKS_SHA256 = "1d6f71b8e71f3aee1c6421ab470d8e977657c782e726518af811b6a1a0566095"
GOLDEN = {
    64: {
        (0, 0, 0, 0, 0): "8c3a933910f41ed2638bf5ca6a98dc4c10d9e9381b44462e55fbc56ce812021e",
        (1, 3, 7, 15, 20): "a87d3dbac5a1c9d61764af1a07399aacc36ec6f9243873805658dbca87cb0b09",
        (2, 5, 39, 31, 31): "a9a386d1cabb0611b94597e0493870257d57d44250ac30188e658c368a288f7f",
        (2, 0, 13, 4, 27): "59b55239d1beec4ff6c09a374cdf3614459a5e2958d6c881d96710b17ce5230d",
    },
    32: {
        (0, 0, 0, 0, 0): "9800e4f5a7faff5d60ce9443f2883266ac44d99e90f458b69a9d9bed554cd669",
        (1, 3, 7, 15, 20): "e24c84461fda9ff436099c52acb63de9c9322a7628c9b3d92088dbe6e040b0fb",
        (2, 5, 39, 31, 31): "645e89caa061785872a76f1993f6e23fcd274fbab4b656823f0d519aa9390fa4",
        (2, 0, 13, 4, 27): "952f3564a83380447bb08817d6b4679d4fa0125c5ab209e34e5a0d9f56d33efb",
    },
}


def test_sprites_golden_hashes():
    assert sha256(sprites.sprite_masks()) == MASKS_SHA256
    for size, table in GOLDEN.items():
        factors = torch.tensor(list(table))
        images = sprites.render(factors, size)
        assert [sha256(im) for im in images] == list(table.values()), size


def test_sprites_known_geometry():
    # an axis-aligned square of scale 0.5 has side 2 * 0.7 * 7.5 = 10.5 px: area 110.25 exactly
    image = sprites.render(torch.tensor([[0, 0, 0, 0, 0]]))[0, 0]
    assert image.sum().item() == 110.25
    assert image.max().item() == 1.0
    # its centre is the patch centre (1 + 15.5 px from the top-left corner)
    rows, cols = torch.nonzero(image, as_tuple=True)
    assert (rows.min() + rows.max()).item() / 2 + 0.5 == 16.5
    assert (cols.min() + cols.max()).item() / 2 + 0.5 == 16.5


def test_sprites_factor_index_round_trip_whole_grid():
    index = torch.arange(sprites.NUM_IMAGES)
    factors = sprites.factors_of(index)
    assert factors.shape == (737_280, 5) and factors.dtype == torch.long
    assert torch.equal(factors.max(dim=0).values + 1, torch.tensor(sprites.FACTOR_SIZES))
    assert torch.equal(sprites.index_of(factors), index)
    # last factor fastest, as dSprites
    assert sprites.factors_of(torch.tensor([1, 32, 1024, 40960])).tolist() == [
        [0, 0, 0, 0, 1],
        [0, 0, 0, 1, 0],
        [0, 0, 1, 0, 0],
        [0, 1, 0, 0, 0],
    ]
    with pytest.raises(DataError, match="out of range"):
        sprites.index_of(torch.tensor([[3, 0, 0, 0, 0]]))
    with pytest.raises(DataError, match=r"\(n, 5\)"):
        sprites.index_of(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(DataError, match="grid indices"):
        sprites.factors_of(torch.tensor([sprites.NUM_IMAGES]))


@pytest.mark.parametrize("size", [64, 32])
def test_sprites_shapes_dtype_range(size):
    bundle = build(SpritesDataset, image_size=size, train_size=100, test_size=50)
    assert len(bundle.train) == 100 and len(bundle.test) == 50
    x = bundle.train.get_batch(torch.tensor([0, 5, 99, 5]))
    assert x.shape == (4, 1, size, size) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1 and (x.flatten(1).sum(1) > 0).all()
    assert torch.equal(x[1], x[3])
    assert bundle.image_shape == (1, size, size)
    assert torch.equal(bundle.train.labels, bundle.train.grid_indices // (6 * 40 * 32 * 32))


def test_sprites_32_is_exact_average_pooling_of_64():
    g = torch.Generator().manual_seed(0)
    factors = sprites.SpritesGroundTruth().sample_factors(2000, g)
    pooled = F.avg_pool2d(sprites.render(factors, 64), 2)
    assert torch.equal(sprites.render(factors, 32), pooled)


def test_sprites_no_clipping_at_extreme_positions():
    masks = sprites.sprite_masks().reshape(720, -1)
    mask_factors = sprites.factors_of(torch.arange(720) * 1024)[:, :3]  # every shape/scale/orient
    for pos_x in (0, 31):
        for pos_y in (0, 31):
            pos = torch.tensor([pos_x, pos_y]).expand(720, 2)
            images = sprites.render(torch.cat([mask_factors, pos], dim=1))[:, 0]
            border = torch.cat([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], 1)
            assert (border == 0).all()
            # nothing lost or wrapped around: each image holds its whole mask
            assert torch.equal(images.flatten(1).sum(1), masks.sum(1))


def _shifted(images: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    return torch.roll(images, shifts=(dy, dx), dims=(-2, -1))


@pytest.mark.parametrize("size", [64, 32])
def test_sprites_adjacent_values_are_distinguishable(size):
    """Exhaustive over all adjacent pairs, by translation equivariance.

    The renderer pastes at integer offsets, so moving a sprite by 1 px at 64 (2 px at 32's parent
    canvas) translates its image by whole pixels: the image of (shape, scale, orientation, x, y)
    depends on (x, y) only through a translation, given the parity of x and y at 32x32. Checked
    below, then all adjacent pairs of shape/scale/orientation (orientation cyclically, 39 -> 0)
    and of posX/posY are compared at one base position per parity class.
    """
    mask_factors = sprites.factors_of(torch.arange(720) * 1024)[:, :3].reshape(3, 6, 40, 3)
    period = 1 if size == 64 else 2
    for px in range(period):
        for py in range(period):

            def at(dx: int, dy: int, px=px, py=py) -> torch.Tensor:
                pos = torch.tensor([10 + px + dx, 10 + py + dy]).expand(3, 6, 40, 2)
                return sprites.render(torch.cat([mask_factors, pos], -1).reshape(-1, 5), size)

            base = at(0, 0)
            # translation equivariance that makes one base position per parity class enough
            assert torch.equal(at(period, 0), _shifted(base, 1, 0))
            assert torch.equal(at(0, period), _shifted(base, 0, 1))
            assert torch.equal(at(-period, -period), _shifted(base, -1, -1))
            # posX / posY neighbours
            assert (at(1, 0) != base).flatten(1).any(1).all()
            assert (at(0, 1) != base).flatten(1).any(1).all()
            grid = base.reshape(3, 6, 40, -1)
            assert (grid[1:] != grid[:-1]).any(-1).all()  # shape
            assert (grid[:, 1:] != grid[:, :-1]).any(-1).all()  # scale
            assert (grid.roll(-1, dims=2) != grid).any(-1).all()  # orientation, incl. 39 -> 0


def test_sprites_documented_symmetries():
    masks = sprites.sprite_masks()  # (shape, scale, orientation, H, W)
    square, ellipse, heart = masks[0], masks[1], masks[2]
    # square: 90 degrees = 10 orientation steps, up to supersampling rounding (1/64 per pixel)
    assert (square - square.roll(-10, dims=1)).abs().sum(dim=(-2, -1)).max() < 0.5
    # ellipse: 180 degrees = 20 steps
    assert (ellipse - ellipse.roll(-20, dims=1)).abs().sum(dim=(-2, -1)).max() < 0.5
    assert (ellipse - ellipse.roll(-10, dims=1)).abs().sum(dim=(-2, -1)).min() > 10
    # the heart has no rotational symmetry
    for steps in (10, 20):
        assert (heart - heart.roll(-steps, dims=1)).abs().sum(dim=(-2, -1)).min() > 10


def test_sprites_split_disjoint_complete_and_seeded():
    a = build(SpritesDataset, seed=0)
    assert len(a.test) == 10_000 and len(a.train) == sprites.NUM_IMAGES - 10_000
    union = torch.cat([a.train.grid_indices, a.test.grid_indices])
    assert torch.equal(union.sort().values, torch.arange(sprites.NUM_IMAGES))  # disjoint, complete
    b = build(SpritesDataset, seed=0)
    assert torch.equal(a.train.grid_indices, b.train.grid_indices)
    assert torch.equal(a.test.grid_indices, b.test.grid_indices)
    c = build(SpritesDataset, split_seed=1)
    assert not torch.equal(a.test.grid_indices, c.test.grid_indices)
    small = build(SpritesDataset, seed=0, train_size=500, test_size=300)
    assert torch.equal(small.test.grid_indices, a.test.grid_indices[:300])
    assert not set(small.train.grid_indices.tolist()) & set(small.test.grid_indices.tolist())
    index = torch.tensor([3, 1, 4])
    assert torch.equal(a.train.get_batch(index), b.train.get_batch(index))


def test_sprites_config_validation():
    with pytest.raises(ValidationError, match="exceeds"):
        SpritesDataset.Config(train_size=sprites.NUM_IMAGES - 5, test_size=10)
    with pytest.raises(ValidationError):
        SpritesDataset.Config(image_size=48)
    with pytest.raises(ValidationError, match="unknown key"):
        SpritesDataset.Config(imagesize=32)


def test_sprites_ground_truth_protocol():
    bundle = build(SpritesDataset, image_size=32, train_size=10, test_size=10)
    gt = bundle.ground_truth
    assert isinstance(gt, GroundTruthData)
    assert gt.factor_names == ("shape", "scale", "orientation", "posX", "posY")
    assert gt.factor_sizes == (3, 6, 40, 32, 32)
    f1 = gt.sample_factors(4000, torch.Generator().manual_seed(3))
    f2 = gt.sample_factors(4000, torch.Generator().manual_seed(3))
    assert torch.equal(f1, f2) and f1.shape == (4000, 5) and f1.dtype == torch.long
    assert torch.equal(f1.max(0).values + 1, torch.tensor(gt.factor_sizes))
    assert (f1.min(0).values == 0).all()
    # images_from_factors agrees with the sources' rendering
    index = torch.arange(10)
    factors = bundle.test.factors(index)
    assert torch.equal(gt.images_from_factors(factors), bundle.test.get_batch(index))
    assert torch.equal(gt.index_of(factors), bundle.test.grid_indices)
    assert torch.equal(gt.factors_of(gt.index_of(factors)), factors)


# ------------------------------------------------------------------------------- mnist family


def write_idx(path: str, array: np.ndarray, *, gz: bool) -> None:
    """IDX file: magic (0, 0, 0x08 = uint8, ndim), big-endian int32 dims, raw bytes."""
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path + ".gz", "wb") as fh:
            fh.write(data)
    else:
        with open(path, "wb") as fh:
            fh.write(data)


def make_mnist(root, folder: str, *, gz: bool, n_train: int = 7, n_test: int = 4) -> dict:
    raw = os.path.join(root, folder, "raw")
    os.makedirs(raw)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) + 3) % 10,
    }
    for name, array in arrays.items():
        write_idx(os.path.join(raw, name), array, gz=gz)
    return arrays


@pytest.mark.parametrize(
    ("cls", "folder", "gz"),
    [(MNISTDataset, "MNIST", False), (FashionMNISTDataset, "FashionMNIST", True)],
)
def test_mnist_family_loads_local_idx_files(tmp_path, cls, folder, gz):
    arrays = make_mnist(tmp_path, folder, gz=gz)
    bundle = build(cls, root=str(tmp_path))
    assert isinstance(bundle.train.images, torch.Tensor) and bundle.train.images.dtype == torch.uint8
    assert bundle.train.images.shape == (7, 1, 28, 28) and bundle.test.images.shape == (4, 1, 28, 28)
    expected = torch.from_numpy(arrays["train-images-idx3-ubyte"].astype(np.float32) / 255)
    assert torch.allclose(all_images(bundle.train)[:, 0], expected, atol=0, rtol=1e-6)
    assert bundle.train.labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert bundle.test.labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert bundle.ground_truth is None


def test_mnist_subset_sizes_are_seeded_subsets(tmp_path):
    arrays = make_mnist(tmp_path, "MNIST", gz=False, n_train=20, n_test=10)
    a = build(MNISTDataset, seed=0, root=str(tmp_path), train_size=5, test_size=3)
    b = build(MNISTDataset, seed=0, root=str(tmp_path), train_size=5, test_size=3)
    assert len(a.train) == 5 and len(a.test) == 3
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    full = torch.from_numpy(arrays["train-images-idx3-ubyte"].astype(np.uint8))
    match = (a.train.images[:, 0, None] == full[None]).flatten(2).all(2)  # (5, 20)
    assert (match.sum(1) == 1).all() and match.any(0).sum() == 5  # 5 distinct originals


def test_mnist_missing_files_message_names_paths(tmp_path):
    with pytest.raises(DataError) as info:
        build(FashionMNISTDataset, root=str(tmp_path / "nowhere"))
    message = str(info.value)
    raw = os.path.join(str(tmp_path / "nowhere"), "FashionMNIST", "raw")
    assert os.path.join(raw, "train-images-idx3-ubyte") + "(.gz)" in message
    assert os.path.join(raw, "t10k-labels-idx1-ubyte") in message
    assert "download=true" in message and "\n" not in message


def test_mnist_corrupt_files_give_data_error(tmp_path):
    make_mnist(tmp_path, "MNIST", gz=False)
    with open(os.path.join(tmp_path, "MNIST", "raw", "train-images-idx3-ubyte"), "wb") as fh:
        fh.write(b"this is not an IDX file at all")
    with pytest.raises(DataError, match="corrupt"):
        build(MNISTDataset, root=str(tmp_path))
    # a corrupt .gz with no decompressed copy
    make_mnist(tmp_path / "g", "MNIST", gz=True)
    with open(os.path.join(tmp_path, "g", "MNIST", "raw", "t10k-images-idx3-ubyte.gz"), "wb") as fh:
        fh.write(b"\x1f\x8b broken gzip")
    with pytest.raises(DataError, match="corrupt"):
        build(MNISTDataset, root=str(tmp_path / "g"))
    assert not os.path.exists(os.path.join(tmp_path, "g", "MNIST", "raw", "t10k-images-idx3-ubyte"))


def test_mnist_failed_download_is_one_clear_line(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def offline(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried a mirror, got: 404")

    monkeypatch.setattr(tvd.MNIST, "download", offline)  # never touch the network in tests
    with pytest.raises(DataError, match="downloading into .* failed") as info:
        build(MNISTDataset, root=str(tmp_path), download=True)
    assert "\n" not in str(info.value) and "download=false" in str(info.value)


# ------------------------------------------------------------------------------------ digits


def test_digits_split_values_and_labels():
    from sklearn.datasets import load_digits

    bundle = build(DigitsDataset, seed=0)
    assert len(bundle.test) == round(1797 * 0.2) and len(bundle.train) + len(bundle.test) == 1797
    x = all_images(bundle.train)
    assert x.shape == (len(bundle.train), 1, 8, 8) and x.dtype == torch.float32
    assert x.min() == 0 and x.max() == 1
    # train + test is exactly the data set (disjoint and complete), image and label together
    ref = load_digits()

    def rows(images: np.ndarray, labels: np.ndarray) -> list[tuple]:
        return sorted(map(tuple, np.c_[images.reshape(len(images), -1), labels].tolist()))

    ours = torch.cat([x, all_images(bundle.test)]).numpy() * 16
    labels = torch.cat([bundle.train.labels, bundle.test.labels]).numpy()
    assert rows(ours, labels) == rows(ref.images, ref.target)
    again = build(DigitsDataset, seed=0)
    other = build(DigitsDataset, split_seed=1)
    assert torch.equal(again.test.images, bundle.test.images)
    assert not torch.equal(other.test.images, bundle.test.images)
    assert len(build(DigitsDataset, test_fraction=0.5).test) == round(1797 * 0.5)


# ------------------------------------------------------------------------------------ npz


def write_npz(path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


def test_npz_layouts_give_the_same_images(tmp_path):
    rng = np.random.default_rng(0)
    nchw = rng.integers(0, 256, (20, 3, 5, 6)).astype(np.uint8)
    expected = torch.from_numpy(nchw.astype(np.float32) / 255)
    for name, array, layout in [
        ("nchw", nchw, "auto"),
        ("nhwc", nchw.transpose(0, 2, 3, 1), "auto"),
        ("forced", nchw.transpose(0, 2, 3, 1), "nhwc"),
        ("float", nchw.astype(np.float64) / 255, "auto"),
    ]:
        path = write_npz(tmp_path / f"{name}.npz", images=array)
        bundle = build(NpzDataset, path=path, layout=layout, test_fraction=0.25)
        assert len(bundle.train) == 15 and len(bundle.test) == 5
        got = torch.cat([all_images(bundle.train), all_images(bundle.test)])
        order = torch.cat([*_split_perm(20, 0.25, 0)])
        assert torch.allclose(got, expected[order], atol=1e-6, rtol=0), name
    grey = write_npz(tmp_path / "grey.npz", x=nchw[:, 0], y=np.arange(20))
    bundle = build(NpzDataset, path=grey, key="x", labels_key="y", test_fraction=0.25)
    assert bundle.train.images.dtype == torch.uint8 and bundle.image_shape == (1, 5, 6)
    train_perm, test_perm = _split_perm(20, 0.25, 0)
    assert torch.equal(bundle.train.labels, train_perm) and torch.equal(bundle.test.labels, test_perm)
    assert not set(bundle.train.labels.tolist()) & set(bundle.test.labels.tolist())


def _split_perm(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return splits.split_by_fraction(n, fraction, seed, what="test")


@pytest.mark.parametrize(
    ("arrays", "fields", "match"),
    [
        ({"images": np.zeros((4, 5, 5))}, {"key": "imgs"}, r"no array 'imgs'.*arrays present: images"),
        ({"images": np.full((4, 5, 5), np.nan)}, {}, "NaN"),
        ({"images": np.zeros((4, 5))}, {}, "2 dimensions"),
        ({"images": np.full((4, 5, 5), 1.5)}, {}, r"\[0, 1\].*1\.5"),
        ({"images": np.full((4, 5, 5), 300)}, {}, "0..255"),
        ({"images": np.zeros((4, 3, 5, 3))}, {}, "layout='nchw'"),
        ({"images": np.zeros((4, 5, 5)), "y": np.zeros(3, int)}, {"labels_key": "y"}, "1-D integer"),
        ({"images": np.zeros((1, 5, 5))}, {}, "cannot be split"),
    ],
)
def test_npz_bad_arrays_raise_clear_errors(tmp_path, arrays, fields, match):
    path = write_npz(tmp_path / "data.npz", **arrays)
    with pytest.raises(DataError, match=match):
        build(NpzDataset, path=path, **fields)


def test_npz_missing_and_corrupt_files(tmp_path):
    missing = str(tmp_path / "absent.npz")
    with pytest.raises(DataError, match=f"file not found: {missing}"):
        build(NpzDataset, path=missing)
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip archive")
    with pytest.raises(DataError, match="not a valid .npz"):
        build(NpzDataset, path=str(corrupt))
    single = tmp_path / "single.npy"
    np.save(single, np.zeros((4, 5, 5)))
    with pytest.raises(DataError, match="single array"):
        build(NpzDataset, path=str(single))


# ------------------------------------------------------------------------------------ dsprites

FAKE_SIZES = (1, 3, 2, 2, 2, 2)  # color, shape, scale, orientation, posX, posY


def write_fake_dsprites(path, *, drop_last: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A reduced dSprites file: rows in shuffled order, image i encodes its own grid index."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in FAKE_SIZES], indexing="ij"), -1)
    classes = grid.reshape(-1, 6)
    order = np.random.default_rng(1).permutation(len(classes))
    classes = classes[order]
    imgs = np.zeros((len(classes), 64, 64), np.uint8)
    for bit in range(6):  # grid index (color dropped) written as bits in row 0
        imgs[:, 0, bit] = (order >> bit) & 1
    imgs[:, 63, 63] = 1  # no image is empty
    if drop_last:
        classes, imgs = classes[:-1], imgs[:-1]
    np.savez_compressed(path, imgs=imgs, latents_classes=classes, latents_values=classes * 0.5)
    return imgs, classes


def test_dsprites_fake_file(tmp_path):
    path = str(tmp_path / "fake.npz")
    imgs, classes = write_fake_dsprites(path)
    bundle = build(DSpritesDataset, path=path, test_size=8)
    gt = bundle.ground_truth
    assert isinstance(gt, GroundTruthData)
    assert gt.factor_names == ("shape", "scale", "orientation", "posX", "posY")
    assert gt.factor_sizes == (3, 2, 2, 2, 2)
    assert len(bundle.test) == 8 and len(bundle.train) == 40
    assert not set(bundle.train.rows.tolist()) & set(bundle.test.rows.tolist())
    x = all_images(bundle.train)
    assert x.shape == (40, 1, 64, 64) and x.dtype == torch.float32
    assert set(x.unique().tolist()) == {0.0, 1.0}
    # every factor combination maps to the image of its own row
    factors = torch.from_numpy(classes[:, 1:].astype(np.int64))
    assert torch.equal(gt.images_from_factors(factors)[:, 0], torch.from_numpy(imgs).float())
    sampled = gt.sample_factors(50, torch.Generator().manual_seed(0))
    assert sampled.shape == (50, 5) and (sampled < torch.tensor(gt.factor_sizes)).all()
    assert torch.equal(bundle.train.labels, factors[bundle.train.rows, 0])
    again = build(DSpritesDataset, path=path, test_size=8)
    assert torch.equal(again.test.rows, bundle.test.rows)


def test_dsprites_errors(tmp_path):
    missing = str(tmp_path / "dsprites.npz")
    with pytest.raises(DataError) as info:
        build(DSpritesDataset, path=missing)
    assert missing in str(info.value) and "deepmind/dsprites-dataset" in str(info.value)
    partial = str(tmp_path / "partial.npz")
    write_fake_dsprites(partial, drop_last=True)
    with pytest.raises(DataError, match="full factor grid"):
        build(DSpritesDataset, path=partial, test_size=8)
    full = str(tmp_path / "full.npz")
    write_fake_dsprites(full)
    with pytest.raises(DataError, match="do not fit"):
        build(DSpritesDataset, path=full)  # default test_size 10000 > 48 images
    np.savez(tmp_path / "nokey.npz", imgs=np.zeros((2, 64, 64), np.uint8))
    with pytest.raises(DataError, match="no array 'latents_classes'"):
        build(DSpritesDataset, path=str(tmp_path / "nokey.npz"))
