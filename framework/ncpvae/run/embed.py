"""``ncpvae embed``: the encoder's posterior of a split's images, as arrays for other tools.

The ``.npz`` file holds ``mu`` and ``logvar`` ``(N, D)`` float32 (``q(z|x) = N(mu,
diag(exp(logvar)))`` of image ``i`` of the split, in the split's order), and where the dataset
has them ``labels`` ``(N,)`` int64 and ``factors`` ``(N, K)`` int64 (the ground-truth factor
indices of a generated dataset, with ``factor_names`` ``(K,)``). Read it with ``numpy.load``
(no pickle needed: every array is numeric or a string array).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ncpvae.data import DataBundle, ImageSource
from ncpvae.errors import ConfigError
from ncpvae.io import atomic_write
from ncpvae.model import LatentModel
from ncpvae.run.build import encode_source

__all__ = ["SPLITS", "check_out", "embed_arrays", "write_embedding"]

#: the splits a dataset plugin builds
SPLITS = ("train", "test")


def _source(data: DataBundle, split: str) -> ImageSource:
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return getattr(data, split)


@torch.no_grad()
def embed_arrays(model: LatentModel, data: DataBundle, split: str, device: torch.device, *,
                 batch_size: int = 512) -> dict[str, np.ndarray]:
    """The arrays of the module docstring for ``split`` of ``data``."""
    source = _source(data, split)
    mu, logvar = encode_source(model, source, device, batch_size=batch_size)
    arrays: dict[str, Any] = {"mu": mu.cpu().numpy(), "logvar": logvar.cpu().numpy()}
    if source.labels is not None:
        arrays["labels"] = source.labels.cpu().numpy().astype(np.int64)
    factors = getattr(source, "factors", None)  # a generated dataset's factor indices by row
    if callable(factors):
        arrays["factors"] = torch.cat([factors(index) for index in
                                       torch.arange(len(source)).split(batch_size)]
                                      ).cpu().numpy().astype(np.int64)
        names = getattr(data.ground_truth, "factor_names", None)
        if names is not None:
            arrays["factor_names"] = np.asarray(list(names), dtype=str)
    return arrays


def check_out(out: str | Path) -> Path:
    """``out`` as a path, refused unless it names a ``.npz`` file."""
    out = Path(out)
    if out.suffix != ".npz":
        raise ConfigError(f"--out must name a .npz file, got '{out}'")
    return out


def write_embedding(out: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write ``arrays`` as an uncompressed ``.npz`` at ``out`` (atomically)."""
    return atomic_write(check_out(out), lambda f: np.savez(f, **arrays), binary=True)
