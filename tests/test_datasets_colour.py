"""The colour dataset plugins (cifar10, svhn, celeba) on tiny files written here in each format."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from ncpvae_plugins.datasets.colour import (
    CelebADataset,
    CIFAR10Dataset,
    SVHNDataset,
    crop_and_resize,
)

from ncpvae import DataError
from ncpvae.component import BuildContext


def build(cls, seed: int = 0, **fields):
    ctx = BuildContext(seed=seed)
    return cls.from_config(cls.Config(**fields), ctx).build(ctx)


def all_images(source) -> torch.Tensor:
    return source.get_batch(torch.arange(len(source)))


# ------------------------------------------------------------------------------------------------
# CIFAR-10: pickled dicts {'data': uint8 (n, 3072) in channel-major order, 'labels': [n ints]}


def write_cifar(root, n_per_batch: int = 4, *, seed: int = 0) -> dict[str, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n_per_batch)]
        with open(folder / name, "wb") as fh:
            pickle.dump({"batch_label": name, "data": data, "labels": labels}, fh, protocol=2)
        written[name] = (data, np.array(labels))
    return written


def test_cifar10_reads_the_python_batches(tmp_path) -> None:
    written = write_cifar(tmp_path)
    bundle = build(CIFAR10Dataset, root=str(tmp_path))
    assert bundle.image_shape == (3, 32, 32)
    assert len(bundle.train) == 20 and len(bundle.test) == 4
    train_data = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    expected = torch.from_numpy(train_data.reshape(-1, 3, 32, 32))
    assert torch.equal((all_images(bundle.train) * 255).round().to(torch.uint8), expected)
    # pixel (c=1, y=2, x=3) of image 0 sits at 1024 + 2 * 32 + 3 of the row (channel-major)
    assert bundle.train.get_batch(torch.tensor([0]))[0, 1, 2, 3] * 255 == pytest.approx(
        float(train_data[0, 1024 + 67]))
    assert bundle.test.labels.tolist() == written["test_batch"][1].tolist()
    sub = build(CIFAR10Dataset, root=str(tmp_path), train_size=5, test_size=2)
    assert len(sub.train) == 5 and len(sub.test) == 2


def test_cifar10_offline_error_says_where_to_put_the_files(tmp_path) -> None:
    with pytest.raises(DataError) as info:
        build(CIFAR10Dataset, root=str(tmp_path))
    message = str(info.value)
    assert "\n" not in message
    assert os.path.join(str(tmp_path), "cifar-10-batches-py") in message
    assert "download=true" in message and "data_batch_1" in message


def test_cifar10_refuses_a_pickle_that_calls_code(tmp_path) -> None:
    write_cifar(tmp_path)

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as fh:
        pickle.dump({"data": Boom(), "labels": []}, fh)
    with pytest.raises(DataError, match="refused for safety"):
        build(CIFAR10Dataset, root=str(tmp_path))


def test_cifar10_truncated_or_foreign_batch(tmp_path) -> None:
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match="data_batch_3"):
        build(CIFAR10Dataset, root=str(tmp_path))
    with open(path, "wb") as fh:
        pickle.dump({"data": np.zeros((2, 10), np.uint8), "labels": [0, 1]}, fh)
    with pytest.raises(DataError, match="not a CIFAR batch"):
        build(CIFAR10Dataset, root=str(tmp_path))


# ------------------------------------------------------------------------------------------------
# SVHN: .mat files with X (32, 32, 3, N) uint8 and y (N, 1), digit 0 labelled 10


def write_svhn(root, n_train: int = 6, n_test: int = 3) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from scipy.io import savemat

    rng = np.random.default_rng(1)
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, size=(n, 1)).astype(np.uint8)
        savemat(str(root / f"{split}_32x32.mat"), {"X": x, "y": y})
        written[split] = (x, y)
    return written


def test_svhn_reads_the_mat_files(tmp_path) -> None:
    written = write_svhn(tmp_path)
    bundle = build(SVHNDataset, root=str(tmp_path))
    assert bundle.image_shape == (3, 32, 32)
    assert (len(bundle.train), len(bundle.test)) == (6, 3)
    x, y = written["train"]
    # image i, channel c, row r, column k is X[r, k, c, i]
    img = all_images(bundle.train)
    assert img[4, 2, 5, 7] * 255 == pytest.approx(float(x[5, 7, 2, 4]))
    assert bundle.train.labels.tolist() == [int(v) % 10 for v in y[:, 0]]
    assert set(bundle.train.labels.tolist()) <= set(range(10))


def test_svhn_offline_error_and_bad_file(tmp_path) -> None:
    with pytest.raises(DataError, match=r"train_32x32\.mat.*download=true") as info:
        build(SVHNDataset, root=str(tmp_path))
    assert "\n" not in str(info.value)
    write_svhn(tmp_path)
    (tmp_path / "test_32x32.mat").write_bytes(b"not a mat file")
    with pytest.raises(DataError, match="test_32x32.mat"):
        build(SVHNDataset, root=str(tmp_path))


# ------------------------------------------------------------------------------------------------
# CelebA: img_align_celeba/*.jpg (178x218), list_eval_partition.txt, list_attr_celeba.txt


def write_celeba(root, partitions=(0, 0, 0, 1, 2, 2, 0, 2), size=(178, 218)) -> list[str]:
    from PIL import Image

    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    names = [f"{i + 1:06d}.jpg" for i in range(len(partitions))]
    w, h = size
    for i, name in enumerate(names):
        pixels = np.zeros((h, w, 3), dtype=np.uint8)
        pixels[..., 0] = 20 * i  # a red level per image; everything outside the centre is blue
        pixels[:, :, 2] = 255
        top, left = (h - 148) // 2, (w - 148) // 2
        pixels[top:top + 148, left:left + 148, 2] = 0
        Image.fromarray(pixels).save(folder / "img_align_celeba" / name, quality=100)
    (folder / "list_eval_partition.txt").write_text(
        "".join(f"{n} {p}\n" for n, p in zip(names, partitions)))
    attrs = ["Male", "Smiling"]
    lines = [str(len(names)), " ".join(attrs)]
    lines += [f"{n}  {1 if i % 2 else -1} {1 if i % 3 == 0 else -1}" for i, n in enumerate(names)]
    (folder / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    return names


def test_celeba_center_crop_resize_partitions_and_attributes(tmp_path) -> None:
    write_celeba(tmp_path)
    bundle = build(CelebADataset, root=str(tmp_path), label_attribute="Smiling")
    assert bundle.image_shape == (3, 64, 64)
    assert (len(bundle.train), len(bundle.test)) == (4, 3)  # partitions 0 and 2; 1 is unused
    images = all_images(bundle.train)
    # the 148x148 centre crop holds no blue (JPEG's chroma bleed reaches only the outer pixels)
    # and that bleed is the same on opposite edges: the crop is centred
    assert float(images[:, 2, 2:-2, 2:-2].max()) < 0.1
    blue = images[:, 2]
    assert float(blue[:, :, 0].mean()) == pytest.approx(float(blue[:, :, -1].mean()), abs=0.02)
    assert float(blue[:, 0].mean()) == pytest.approx(float(blue[:, -1].mean()), abs=0.02)
    # train files are 000001, 000002, 000003, 000007 (sorted): red levels 0, 20, 40, 120
    red = (images[:, 0].mean((1, 2)) * 255).tolist()
    assert red == pytest.approx([0, 20, 40, 120], abs=3)
    assert bundle.train.labels.tolist() == [1, 0, 0, 1]  # Smiling: i % 3 == 0 for i = 0, 1, 2, 6
    assert bundle.test.labels.tolist() == [0, 0, 0]  # i = 4, 5, 7
    # the resized splits are cached; a second build reads the same images
    assert any((tmp_path / "celeba" / "ncpvae-cache").iterdir())
    again = build(CelebADataset, root=str(tmp_path), label_attribute="Smiling")
    assert torch.equal(all_images(again.train), images)
    sub = build(CelebADataset, root=str(tmp_path), train_size=2, image_size=32)
    assert len(sub.train) == 2 and sub.image_shape == (3, 32, 32) and sub.train.labels is None


def test_crop_and_resize_of_a_small_image(tmp_path) -> None:
    from PIL import Image

    Image.fromarray(np.full((40, 30, 3), 200, np.uint8)).save(tmp_path / "a.png")
    out = crop_and_resize(str(tmp_path / "a.png"), 148, 16)
    assert out.shape == (3, 16, 16) and out.dtype == np.uint8 and int(out.min()) == 200


def test_celeba_errors(tmp_path) -> None:
    with pytest.raises(DataError, match="img_align_celeba") as info:
        build(CelebADataset, root=str(tmp_path))
    assert "\n" not in str(info.value) and "download=true" in str(info.value)
    write_celeba(tmp_path)
    with pytest.raises(DataError, match="'Bald' is not in"):
        build(CelebADataset, root=str(tmp_path), label_attribute="Bald")
    os.remove(tmp_path / "celeba" / "img_align_celeba" / "000002.jpg")
    with pytest.raises(DataError, match="000002.jpg"):
        build(CelebADataset, root=str(tmp_path), cache=False)
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text("000001.jpg seven\n")
    with pytest.raises(DataError, match="line 1"):
        build(CelebADataset, root=str(tmp_path))


@pytest.mark.parametrize("cls", [CIFAR10Dataset, SVHNDataset, CelebADataset])
def test_split_does_not_depend_on_the_run_seed(tmp_path, cls) -> None:
    {CIFAR10Dataset: write_cifar, SVHNDataset: write_svhn, CelebADataset: write_celeba}[cls](tmp_path)
    kwargs = {"root": str(tmp_path), "train_size": 3, "test_size": 2}
    first = build(cls, seed=0, **kwargs)
    train_rows = {image.numpy().tobytes() for image in all_images(first.train)}
    test_rows = {image.numpy().tobytes() for image in all_images(first.test)}
    assert len(train_rows) == 3 and len(test_rows) == 2 and not train_rows & test_rows
    for seed in (1, 99):
        other = build(cls, seed=seed, **kwargs)
        assert torch.equal(all_images(first.train), all_images(other.train))
        assert torch.equal(all_images(first.test), all_images(other.test))
    changed = build(cls, seed=0, split_seed=5, **kwargs)
    assert not torch.equal(all_images(first.train), all_images(changed.train))


def test_registered(registry) -> None:
    for name in ("cifar10", "svhn", "celeba"):
        assert registry.get("dataset", name) is not None
