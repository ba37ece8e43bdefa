"""``imagefolder``: images the tests write (PNG, JPEG), with and without class subfolders, grey
and colour; a corrupt file, a non-image file, an empty or missing folder; and a smoke-sized run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ncpvae
from ncpvae import DataError


def write_image(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> np.ndarray:
    """A random RGB image ``(H, W, 3)`` uint8 written to ``path`` (format from its suffix)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def build(root: Path, **fields):
    dataset = ncpvae.create("dataset", "imagefolder", root=str(root), **fields)
    return dataset.build(ncpvae.BuildContext())


def test_class_subfolders_give_labels_and_a_seeded_split(tmp_path: Path):
    for i in range(6):
        write_image(tmp_path / "cats" / f"{i}.png", i)
        write_image(tmp_path / "dogs" / f"{i}.jpg", 10 + i)
    data = build(tmp_path, image_size=16, test_fraction=0.25)
    assert data.image_shape == (3, 16, 16)
    assert (len(data.train), len(data.test)) == (9, 3)
    labels = torch.cat([data.train.labels, data.test.labels])
    assert sorted(labels.tolist()) == [0] * 6 + [1] * 6  # cats 0, dogs 1 (sorted folder names)
    again = build(tmp_path, image_size=16, test_fraction=0.25)
    assert torch.equal(again.test.get_batch(torch.arange(3)), data.test.get_batch(torch.arange(3)))
    other = build(tmp_path, image_size=16, test_fraction=0.25, split_seed=1)
    assert not torch.equal(other.test.labels, data.test.labels) or not torch.equal(
        other.test.get_batch(torch.arange(3)), data.test.get_batch(torch.arange(3)))


def test_a_flat_folder_grey_resized_and_centre_cropped(tmp_path: Path):
    pixels = [write_image(tmp_path / f"{i:02d}.png", i, size=(40, 20)) for i in range(10)]
    data = build(tmp_path, image_size=10, channels=1, test_fraction=0.1)
    assert data.image_shape == (1, 10, 10) and data.train.labels is None
    batches = [data.train.get_batch(torch.arange(9)), data.test.get_batch(torch.arange(1))]
    images = (torch.cat(batches) * 255).round().to(torch.uint8)  # sources give [0, 1] floats
    # the 40x20 image becomes 20x10 (shorter side 10), then its centre 10x10
    expected = []
    for p in pixels:
        grey = Image.fromarray(p).convert("L").resize((20, 10), Image.BILINEAR)
        expected.append(np.asarray(grey)[:, 5:15])
    got = {tuple(img.flatten().tolist()) for img in images.numpy()}
    assert got == {tuple(e.flatten().tolist()) for e in expected}


def test_a_corrupt_image_is_one_line_naming_the_file(tmp_path: Path):
    for i in range(3):
        write_image(tmp_path / f"{i}.png", i)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(DataError) as caught:
        build(tmp_path)
    message = str(caught.value)
    assert str(bad) in message and "\n" not in message


def test_a_non_image_file_is_one_line_naming_it(tmp_path: Path):
    write_image(tmp_path / "a" / "0.png", 0)
    notes = tmp_path / "a" / "notes.txt"
    notes.write_text("hello")
    (tmp_path / "a" / ".DS_Store").write_bytes(b"\0")  # hidden files are skipped
    with pytest.raises(DataError) as caught:
        build(tmp_path)
    assert str(notes) in str(caught.value) and "not an image" in str(caught.value)


@pytest.mark.parametrize("layout", ["empty", "missing", "empty_class", "mixed"])
def test_bad_folders_are_one_line(tmp_path: Path, layout: str):
    root = tmp_path / "images"
    if layout != "missing":
        root.mkdir()
    if layout == "empty_class":
        (root / "cats").mkdir()
    if layout == "mixed":
        write_image(root / "cats" / "0.png", 0)
        write_image(root / "stray.png", 1)
    with pytest.raises(DataError) as caught:
        build(root)
    message = str(caught.value)
    assert str(root) in message and "\n" not in message


@pytest.mark.slow
def test_a_smoke_run_on_a_written_folder(tmp_path: Path):
    from ncpvae.cli import main

    for i in range(40):
        write_image(tmp_path / "images" / ("a" if i % 2 else "b") / f"{i}.png", i, size=(48, 40))
    out = tmp_path / "run"
    code = main(["train", "smoke", "--quiet", "--out", str(out), "--set", "data=imagefolder",
                 "--set", f"data.root={tmp_path / 'images'}", "--set", "data.image_size=32",
                 "--set", "data.test_fraction=0.25"])
    assert code == 0
    assert (out / "summary.json").is_file() and (out / "evaluation.json").is_file()
