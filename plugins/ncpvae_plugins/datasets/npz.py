"""``npz``: your own images from a NumPy ``.npz`` archive (``numpy.savez`` / ``savez_compressed``).

The array under ``key`` (default ``"images"``) may be:

- ``(N, H, W)``: grey images, one channel is added;
- ``(N, C, H, W)`` or ``(N, H, W, C)``: with ``layout = "auto"`` the channel axis is whichever of
  axis 1 and axis 3 has size <= 4 (1 grey, 3 RGB, 4 RGBA) while the other does not; when both or
  neither do (e.g. ``(N, 3, 4, 3)``), set ``layout = "nchw"`` or ``"nhwc"`` explicitly.

Values: uint8 (0..255, kept as uint8), bool (-> 0/255), another integer type with values in
0..255 (-> uint8), or floating point in [0, 1] (-> float32). NaN/inf, values out of range, a
wrong number of dimensions, a missing key (the error lists the keys present) and a file that is
not an npz archive raise a one-line :class:`DataError`. Optional labels: a 1-D integer array
under ``labels_key`` with one entry per image. The train/test split is a permutation seeded by
``split_seed`` (not the run seed), with ``round(N * test_fraction)`` test images.
"""

from __future__ import annotations

import os
import pickle
import zipfile
import zlib
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from ncpvae import BuildContext, ComponentConfig, DataBundle, DataError, DatasetPlugin, TensorImageSource
from ncpvae.splits import split_by_fraction

_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, pickle.PickleError)


def read_npz(
    path: str, keys: dict[str, str], *, what: str, missing_hint: str
) -> dict[str, np.ndarray]:
    """Read arrays from an npz archive without unpickling anything.

    ``keys`` maps a role (for messages, e.g. ``"key"``) to an array name in the archive. Returns
    role -> array. Raises :class:`DataError` for a missing file (``missing_hint`` says what to do),
    a corrupt archive, or a missing array name (listing the names present).
    """
    if not os.path.isfile(path):
        raise DataError(f"{what}: file not found: {path}; {missing_hint}")
    try:
        archive = np.load(path, allow_pickle=False)
    except _READ_ERRORS as err:
        raise DataError(
            f"{what}: {path} is not a valid .npz archive ({type(err).__name__}: {err}); "
            "write it with numpy.savez or numpy.savez_compressed"
        ) from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(
            f"{what}: {path} holds a single array (.npy), not an .npz archive; "
            "write it with numpy.savez(path, images=...)"
        )
    out = {}
    with archive:
        for role, name in keys.items():
            if name not in archive.files:
                raise DataError(
                    f"{what}: {path} has no array '{name}' (set by {role}); arrays present: "
                    f"{', '.join(archive.files) or 'none'}"
                )
            try:
                out[role] = archive[name]
            except _READ_ERRORS as err:
                raise DataError(
                    f"{what}: cannot read array '{name}' of {path} ({type(err).__name__}: "
                    f"{err}); the file is corrupt or holds Python objects, re-save it"
                ) from None
    return out


def to_nchw(array: np.ndarray, layout: str, *, what: str) -> np.ndarray:
    """``(N, H, W)``, ``(N, C, H, W)`` or ``(N, H, W, C)`` -> ``(N, C, H, W)`` (see module doc)."""
    if array.ndim == 3:
        return array[:, None]
    if array.ndim != 4:
        raise DataError(
            f"{what}: expected images of shape (N, H, W), (N, C, H, W) or (N, H, W, C), "
            f"got {array.ndim} dimensions {array.shape}"
        )
    if layout == "auto":
        first, last = array.shape[1] <= 4, array.shape[3] <= 4
        if first == last:
            raise DataError(
                f"{what}: cannot tell the channel axis of shape {array.shape} (channels are "
                "axis 1 or 3 with size <= 4); set layout='nchw' or layout='nhwc'"
            )
        layout = "nchw" if first else "nhwc"
    return array if layout == "nchw" else array.transpose(0, 3, 1, 2)


def to_image_tensor(array: np.ndarray, *, what: str) -> Tensor:
    """Check values and convert: uint8 stays uint8, bool/other ints -> uint8, floats -> float32."""
    if array.shape[0] == 0:
        raise DataError(f"{what}: the array holds no images (shape {array.shape})")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * np.uint8(255)
    elif np.issubdtype(array.dtype, np.integer) and array.dtype != np.uint8:
        lo, hi = int(array.min()), int(array.max())
        if lo < 0 or hi > 255:
            raise DataError(
                f"{what}: integer images must lie in 0..255, found {lo}..{hi}; "
                "store uint8 0..255 or floats in [0, 1]"
            )
        array = array.astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise DataError(f"{what}: images contain NaN or infinite values; clean the data first")
        lo, hi = float(array.min()), float(array.max())
        if lo < 0.0 or hi > 1.0:
            raise DataError(
                f"{what}: float images must lie in [0, 1], found [{lo:.4g}, {hi:.4g}]; "
                "rescale them (e.g. divide by 255) or store uint8"
            )
        array = array.astype(np.float32)
    elif array.dtype != np.uint8:
        raise DataError(f"{what}: images must be uint8, integer, bool or float, got {array.dtype}")
    return torch.from_numpy(np.ascontiguousarray(array))


class NpzDataset(DatasetPlugin):
    """Images (and optional labels) from a user's ``.npz`` file; see the module docstring."""

    name = "npz"

    class Config(ComponentConfig):
        name: Literal["npz"] = "npz"
        path: str = Field("data/images.npz", min_length=1, description="the .npz file")
        key: str = Field("images", min_length=1, description="array name of the images")
        labels_key: str | None = Field(None, description="array name of integer labels, if any")
        layout: Literal["auto", "nchw", "nhwc"] = Field(
            "auto", description="axis order of 4-D arrays; auto detects the channel axis"
        )
        test_fraction: float = Field(0.1, gt=0, lt=1, description="share of images held out")
        split_seed: int = Field(
            0, ge=0, description="seed of the train/test split (independent of the run seed)"
        )

    def build(self, ctx: BuildContext) -> DataBundle:
        cfg = self.config
        what = f"npz {cfg.path}"
        keys = {"key": cfg.key} | ({"labels_key": cfg.labels_key} if cfg.labels_key else {})
        arrays = read_npz(
            cfg.path, keys, what="npz", missing_hint="set data.path to your .npz file"
        )
        images = to_image_tensor(to_nchw(arrays["key"], cfg.layout, what=what), what=what)
        labels = None
        if cfg.labels_key:
            raw = arrays["labels_key"]
            if raw.ndim != 1 or not np.issubdtype(raw.dtype, np.integer) or len(raw) != len(images):
                raise DataError(
                    f"{what}: labels '{cfg.labels_key}' must be a 1-D integer array with one entry "
                    f"per image ({len(images)}), got {raw.dtype} of shape {raw.shape}"
                )
            labels = torch.from_numpy(raw.astype(np.int64))
        train, test = split_by_fraction(len(images), cfg.test_fraction, cfg.split_seed, what=what)
        return DataBundle(
            train=TensorImageSource(
                images[train], None if labels is None else labels[train], what=f"{what} train"
            ),
            test=TensorImageSource(
                images[test], None if labels is None else labels[test], what=f"{what} test"
            ),
        )
