"""Optional paper-comparable FID and KID on Inception-v3 features, from weights the user has.

ncpvae downloads nothing: the evaluation uses this module only when ``[evaluate]
inception_weights`` names a local file holding the state dict of the TensorFlow FID Inception
network as ported by pytorch-fid (``pt_inception-2015-12-05-6726825d.pth``) or torch-fidelity
(``weights-inception-2015-12-05-6726825d.pth``, the same tensors under the same names). Without
it, :data:`HOW_TO_GET` says where to get it. The in-project feature net
(:mod:`ncpvae.metrics.feature_net`) stays the default instrument.

The network is torchvision's Inception-v3 (1008 classes, no auxiliary head) with pytorch-fid's
changes to the pooling branches: the 3x3 average pools exclude the padding (TensorFlow's
``AVG`` pooling), and the last block pools by max. Features are the 2048-dimensional global
average pool (pytorch-fid's ``pool3``). Images ``(n, C, H, W)`` in ``[0, 1]`` are resized to 299 x
299 (bilinear, as pytorch-fid), grey (``C = 1``) is repeated to 3 channels, and values are
mapped to ``[-1, 1]``. FID is the Fréchet distance of these features; KID the unbiased cubic-kernel
MMD of :func:`ncpvae.metrics.sample_quality.kid` on them (unscaled, as in Binkowski et al.).
Numbers on a few thousand images are comparable with others only at the same sample sizes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.inception import Inception3, InceptionA, InceptionC, InceptionE

from ncpvae.errors import DataError
from ncpvae.io import load_torch
from ncpvae.metrics.sample_quality import frechet_distance, kid

__all__ = ["FEATURE_DIM", "HOW_TO_GET", "IMAGE_SIZE", "InceptionFeatures", "fid_inception",
           "inception_features", "inception_scores", "load_inception"]

IMAGE_SIZE = 299
FEATURE_DIM = 2048
#: the one line shown when no weights are configured (no URL scheme: the report links nothing
#: outside itself; curl follows GitHub's redirect to https)
HOW_TO_GET = (
    "Inception FID/KID skipped: to add them, download the FID Inception weights yourself "
    "(e.g. `curl -LO github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth`) and set evaluate.inception_weights to that file")


def _tf_avg_pool(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool(x: Tensor) -> Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class _PoolBranch:
    """torchvision's block with its pooling branch recomputed by ``pool`` (the branch is the
    last of the block's outputs; its 1x1 convolution runs twice, a small cost for not copying
    the block's code)."""

    pool = staticmethod(_tf_avg_pool)

    def _forward(self, x: Tensor) -> list[Tensor]:
        outputs = super()._forward(x)  # type: ignore[misc]
        outputs[-1] = self.branch_pool(self.pool(x))  # type: ignore[attr-defined]
        return outputs


class _FIDInceptionA(_PoolBranch, InceptionA):
    pass


class _FIDInceptionC(_PoolBranch, InceptionC):
    pass


class _FIDInceptionE1(_PoolBranch, InceptionE):
    pass


class _FIDInceptionE2(_PoolBranch, InceptionE):
    pool = staticmethod(_max_pool)


def fid_inception() -> Inception3:
    """The FID Inception-v3 architecture (untrained; load weights with :func:`load_inception`).
    Its state dict has the keys and shapes of the pytorch-fid / torch-fidelity weight files."""
    net = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    net.Mixed_5b = _FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = _FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = _FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = _FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = _FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = _FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = _FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = _FIDInceptionE1(1280)
    net.Mixed_7c = _FIDInceptionE2(2048)
    return net


class InceptionFeatures(nn.Module):
    """``(B, C, H, W)`` images in ``[0, 1]`` (C = 1 or 3) -> ``(B, 2048)`` pool3 features."""

    def __init__(self, net: Inception3):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise DataError(f"Inception features need images (n, 1 or 3, H, W), got "
                            f"{tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        n = self.net
        for layer in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1,
                      n.Conv2d_3b_1x1, n.Conv2d_4a_3x3, n.maxpool2, n.Mixed_5b, n.Mixed_5c,
                      n.Mixed_5d, n.Mixed_6a, n.Mixed_6b, n.Mixed_6c, n.Mixed_6d, n.Mixed_6e,
                      n.Mixed_7a, n.Mixed_7b, n.Mixed_7c, n.avgpool):
            x = layer(x)
        return torch.flatten(x, 1)


def load_inception(path: str | os.PathLike, *,
                   device: torch.device | str = "cpu") -> InceptionFeatures:
    """The feature extractor with the weights of ``path`` (a pytorch-fid or torch-fidelity
    state dict, read with ``weights_only=True``), in eval mode. A missing file or one that is
    not such a state dict: a one-line :class:`DataError`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"evaluate.inception_weights: no file '{path}'. {HOW_TO_GET}")
    state: Any = load_torch(path, "Inception weights")
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise DataError(f"'{path}' is not an Inception state dict (a mapping of tensors)")
    net = fid_inception()
    mine = net.state_dict()
    missing = [k for k in mine if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in mine]
    wrong = [k for k in state if k in mine and tuple(state[k].shape) != tuple(mine[k].shape)]
    if missing or unexpected or wrong:
        raise DataError(
            f"'{path}' is not the pytorch-fid / torch-fidelity FID Inception state dict: "
            f"{len(missing)} missing keys, {len(unexpected)} unexpected, {len(wrong)} of another "
            f"shape (e.g. {(missing + unexpected + wrong)[0]})")
    net.load_state_dict(dict(state), strict=False)  # num_batches_tracked may be absent
    return InceptionFeatures(net).to(device).eval()


@torch.no_grad()
def inception_features(net: InceptionFeatures, images: Tensor, *,
                       batch_size: int = 64) -> np.ndarray:
    """Pool3 features of ``images`` ``(n, C, H, W)`` in ``[0, 1]``: float64 ``(n, 2048)``."""
    device = next(net.parameters()).device
    out = [net(images[start:start + batch_size].to(device, torch.float32)).double().cpu().numpy()
           for start in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM))


def inception_scores(real: np.ndarray, fake: np.ndarray, *, subset_size: int, num_subsets: int,
                     seed: np.random.Generator | int = 0) -> dict[str, Any]:
    """FID and KID (with its SE over ``num_subsets`` disjoint blocks) between Inception
    features ``real`` ``(n, 2048)`` and ``fake`` ``(m, 2048)``."""
    k = kid(real, fake, subset_size=subset_size, num_subsets=num_subsets, seed=seed)
    return {"fid": frechet_distance(real, fake), "kid": k.kid, "kid_se": k.se,
            "n_real": int(len(real)), "n_fake": int(len(fake))}
