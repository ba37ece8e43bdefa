"""``imagefolder``: your own folder of images, read with ``torchvision.datasets.ImageFolder``.

``data.root`` is either a folder of class subfolders (``root/cat/1.png``, ``root/dog/2.jpg``: the
subfolder index in sorted order becomes the label, as in ImageFolder) or a flat folder of images
(``root/1.png``; no labels). Formats: those of ImageFolder (PNG, JPEG, BMP, PPM/PGM, TIFF, WebP).

Every image is decoded with Pillow, converted to grey (``channels = 1``) or RGB (``channels =
3``), resized so its shorter side is ``image_size`` and centre-cropped to ``image_size`` squared,
then kept in memory as uint8 ``(N, C, image_size, image_size)``. The train/test split is a
permutation of the sorted file list seeded by ``split_seed`` (never the run seed), with
``round(N * test_fraction)`` test images (:func:`ncpvae.splits.split_by_fraction`).

Safe loading: Pillow's decompression-bomb guard is an error here (not a warning), and nothing is
unpickled. A file that is not an image (another extension, or an image file that does not
decode), a missing or empty folder, and images next to class subfolders are each one
:class:`~ncpvae.DataError` line naming the file or folder. Hidden files (``.DS_Store``) are
skipped.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from ncpvae import BuildContext, ComponentConfig, DataBundle, DataError, DatasetPlugin, TensorImageSource
from ncpvae.splits import split_by_fraction


def _visible(path: str) -> bool:
    return not os.path.basename(path).startswith(".")


class ImageFolderDataset(DatasetPlugin):
    """Your own PNG/JPEG images from a folder (class subfolders optional); see the module doc."""

    name = "imagefolder"

    class Config(ComponentConfig):
        name: Literal["imagefolder"] = "imagefolder"
        root: str = Field("data/images", min_length=1,
                          description="the folder of images (or of class subfolders of images)")
        image_size: int = Field(32, ge=4, description="side of the square images after resize "
                                "(shorter side) and centre crop")
        channels: Literal[1, 3] = Field(3, description="1: grey, 3: RGB colour")
        test_fraction: float = Field(0.1, gt=0, lt=1, description="share of images held out")
        split_seed: int = Field(
            0, ge=0, description="seed of the train/test split (independent of the run seed)")

    def _loader(self) -> Callable[[str], Any]:
        from PIL import Image

        mode = "L" if self.config.channels == 1 else "RGB"

        def load(path: str) -> Any:
            _, ext = os.path.splitext(path)
            if ext.lower() not in _extensions():
                raise DataError(f"imagefolder: {path} is not an image file (extension "
                                f"'{ext}'; expected one of {', '.join(_extensions())}); remove "
                                "it from data.root")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                    with Image.open(path) as image:
                        return image.convert(mode)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
                    Image.DecompressionBombWarning) as err:
                detail = " ".join(f"{type(err).__name__}: {err}".split())[:200]
                raise DataError(f"imagefolder: cannot decode {path} ({detail}); the file is "
                                "corrupt or not an image, replace or remove it") from None

        return load

    def _transform(self) -> Callable[[Any], torch.Tensor]:
        from torchvision import transforms

        size = self.config.image_size
        resize = transforms.Compose([
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(size),
        ])

        def to_uint8(image: Any) -> torch.Tensor:
            pixels = np.array(resize(image), dtype=np.uint8)  # a writable copy
            pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
            return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

        return to_uint8

    def _samples(self, root: str) -> tuple[list[tuple[str, int]], bool]:
        """``(path, class index)`` of every visible file, sorted, and whether the folder has
        class subfolders (then the indices are labels)."""
        from torchvision.datasets import ImageFolder

        if not os.path.isdir(root):
            raise DataError(f"imagefolder: folder not found: {root}; set data.root to a folder "
                            "of images (or of class subfolders of images)")
        entries = sorted((e for e in os.scandir(root) if _visible(e.path)), key=lambda e: e.name)
        files = [e.path for e in entries if e.is_file()]
        if any(e.is_dir() for e in entries):
            if files:
                raise DataError(f"imagefolder: {root} holds both files ({files[0]}, ...) and "
                                "class subfolders; move the files into a subfolder")
            folder = ImageFolder(root, loader=self._loader(), is_valid_file=_visible,
                                 allow_empty=True)
            return list(folder.samples), True
        return [(path, 0) for path in files], False

    def build(self, ctx: BuildContext) -> DataBundle:
        cfg = self.config
        samples, labelled = self._samples(cfg.root)
        if not samples:
            raise DataError(f"imagefolder: no images in {cfg.root}; put PNG/JPEG files there "
                            "(or in class subfolders)")
        load, transform = self._loader(), self._transform()
        images = torch.stack([transform(load(path)) for path, _ in samples])
        labels = torch.tensor([label for _, label in samples]) if labelled else None
        what = f"imagefolder {cfg.root}"
        train, test = split_by_fraction(len(images), cfg.test_fraction, cfg.split_seed, what=what)

        def source(index: torch.Tensor, part: str) -> TensorImageSource:
            return TensorImageSource(images[index], None if labels is None else labels[index],
                                     what=f"{what} {part}")

        return DataBundle(train=source(train, "train"), test=source(test, "test"))


def _extensions() -> tuple[str, ...]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return IMG_EXTENSIONS
