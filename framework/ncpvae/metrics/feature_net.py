"""A small feature network trained locally, standing in for Inception (no downloaded weights).

For ground-truth-factor datasets (sprites) it predicts every factor with one softmax head per
factor; for labelled datasets it predicts the label (one head). Its penultimate layer (ReLU
features, ``feature_dim`` wide) is what KID, the Fréchet distance and precision/recall compare.

Architecture, for any input ``(C, H, W)``: ``s`` stride-2 4x4 convolutions (``s`` from 1 at 8x8
to 4 at 64x64, so the last map is about 4x4), a 3x3 convolution, adaptive average pooling to
``pool_size x pool_size``, a dense ReLU layer (the features), and the heads.

Training to a stated target: up to ``epochs`` passes, stopping once the held-out accuracy
(mean over heads, on the ``val_fraction`` held out) has not risen by ``min_delta`` for
``patience`` epochs (a plateau). The net's held-out accuracy per head is then compared with
``targets`` (:func:`accuracy_check`); below target, every number that rests on the net says so.

Caching: :func:`save_feature_net` writes the state dict and plain-data metadata atomically
(``torch.save`` to a temporary file, then ``os.replace``); :func:`load_feature_net` reads it with
``torch.load(weights_only=True)``. :func:`feature_net_cache_key` names a cache entry after the
dataset, the training config and :data:`CACHE_VERSION`; :func:`cached_feature_net` loads or
trains and saves under a file lock; :func:`default_cache_dir` is the per-user cache folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ncpvae.component import StrictModel
from ncpvae.data import GroundTruthData, ImageSource
from ncpvae.errors import DataError
from ncpvae.io import save_torch
from ncpvae.modes import eval_mode

try:  # POSIX: a build lock shared by every process that uses one cache folder
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock (two runs may both build; last wins)
    fcntl = None  # type: ignore[assignment]

FORMAT = "ncpvae-feature-net"
FORMAT_VERSION = 1
#: version of the training recipe, part of every cache key: bump it when a change to the code
#: would train a different net from the same config (old entries are then never loaded)
CACHE_VERSION = 2
#: the environment variable naming the ncpvae cache folder (see :func:`default_cache_dir`)
CACHE_ENV = "NCPVAE_CACHE_DIR"
#: held-out accuracy each head should reach, by head name; heads not named have no target.
#: Sprites: shape >= 0.97, scale / posX / posY >= 0.95 (orientation is ambiguous for the
#: symmetric shapes, so it has none).
DEFAULT_TARGETS: dict[str, float] = {"shape": 0.97, "scale": 0.95, "posX": 0.95, "posY": 0.95}
#: held-out images scored per epoch and at the end
_VAL_MAX = 10_000

_log = logging.getLogger(__name__)


class FeatureNetConfig(StrictModel):
    """How the feature network is built and trained (part of its cache key)."""

    width: int = Field(32, ge=4, description="channels of the first convolution")
    feature_dim: int = Field(128, ge=2, description="width of the penultimate (feature) layer")
    pool_size: int = Field(4, ge=1, description="adaptive pooling output size")
    epochs: int = Field(3, ge=1, description="most passes over the training images (fewer "
                        "when the held-out accuracy plateaus, see patience)")
    patience: int | None = Field(2, ge=1, description="stop after this many epochs without a "
                                 "held-out accuracy gain of min_delta (unset: run every epoch)")
    min_delta: float = Field(0.002, ge=0, description="held-out accuracy gain (mean over heads) "
                             "that counts as progress")
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    num_train: int = Field(50_000, ge=10, description="images drawn from a ground-truth dataset")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="held out to report accuracy")
    seed: int = 0
    targets: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=lambda: dict(DEFAULT_TARGETS),
        description="held-out accuracy each head (by name) should reach; below it the "
        "evaluation warns next to every number that uses the net (not part of the cache key)")

    def cache_fields(self) -> dict[str, Any]:
        """The fields that change the trained net (the cache key's part): all but ``targets``."""
        return self.model_dump(exclude={"targets"})


@dataclass(frozen=True)
class FeatureNetSpec:
    """The architecture, as plain data (saved with the weights)."""

    image_shape: tuple[int, int, int]
    head_sizes: tuple[int, ...]
    head_names: tuple[str, ...]
    width: int = 32
    feature_dim: int = 128
    pool_size: int = 4


def _num_downsamplings(height: int, width: int) -> int:
    """Stride-2 stages so the last map is about 4x4: 8 -> 1, 28 -> 2, 32 -> 3, 64 -> 4."""
    return int(min(4, max(1, math.floor(math.log2(max(min(height, width), 2) / 4)))))


class FeatureNet(nn.Module):
    """Conv classifier with one head per target; ``features(x)`` is its penultimate layer."""

    def __init__(self, spec: FeatureNetSpec):
        super().__init__()
        if len(spec.head_sizes) != len(spec.head_names) or not spec.head_sizes:
            raise DataError("feature net: need one name per head and at least one head")
        if any(s < 2 for s in spec.head_sizes):
            raise DataError(f"feature net: every head needs >= 2 classes, got {spec.head_sizes}")
        self.spec = spec
        self.info: dict[str, Any] = {}  # plain data saved with the weights (val accuracy, config)
        c, h, w = spec.image_shape
        layers: list[nn.Module] = []
        channels = c
        for i in range(_num_downsamplings(h, w)):
            out = spec.width if i == 0 else 2 * spec.width
            layers += [nn.Conv2d(channels, out, 4, stride=2, padding=1), nn.ReLU()]
            channels = out
        layers += [nn.Conv2d(channels, 2 * spec.width, 3, padding=1), nn.ReLU(),
                   nn.AdaptiveAvgPool2d(spec.pool_size), nn.Flatten(),
                   nn.Linear(2 * spec.width * spec.pool_size**2, spec.feature_dim), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(spec.feature_dim, s) for s in spec.head_sizes)

    def features(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, feature_dim)``."""
        return self.body(x)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Logits of every head, ``[(B, head_sizes[k])]``."""
        h = self.features(x)
        return [head(h) for head in self.heads]


def _device_of(net: nn.Module) -> torch.device:
    return next(net.parameters()).device


def _check_images(images: Tensor, spec: FeatureNetSpec) -> None:
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(spec.image_shape):
        raise DataError(
            f"feature net expects images of shape (n, {', '.join(map(str, spec.image_shape))}), "
            f"got {tuple(images.shape)}"
        )


def _batches(images: Tensor | ImageSource, batch_size: int):
    n = len(images)
    for start in range(0, n, batch_size):
        if isinstance(images, ImageSource):
            yield images.get_batch(torch.arange(start, min(n, start + batch_size)))
        else:
            yield images[start:start + batch_size]


@torch.no_grad()
def _map_batches(net: FeatureNet, images: Tensor | ImageSource, batch_size: int,
                 fn: Callable[[Tensor], Tensor], empty: np.ndarray) -> np.ndarray:
    """``fn`` of ``images`` in checked float32 batches on the net's device, in eval mode (the
    net's training flag is restored after), concatenated on the CPU; ``empty`` for no images."""
    device = _device_of(net)
    out = []
    with eval_mode(net):
        for batch in _batches(images, batch_size):
            _check_images(batch, net.spec)
            out.append(fn(batch.to(device, torch.float32)).cpu().numpy())
    return np.concatenate(out) if out else empty


def extract_features(net: FeatureNet, images: Tensor | ImageSource, *,
                     batch_size: int = 512) -> np.ndarray:
    """Penultimate features of ``images`` ``(n, C, H, W)`` in batches: float64 ``(n, F)``."""
    return _map_batches(net, images, batch_size, lambda x: net.features(x).double(),
                        np.zeros((0, net.spec.feature_dim)))


def predict_factors(net: FeatureNet, images: Tensor | ImageSource, *,
                    batch_size: int = 512) -> np.ndarray:
    """The most likely class of every head: int64 ``(n, num_heads)``."""
    return _map_batches(net, images, batch_size,
                        lambda x: torch.stack([lg.argmax(1) for lg in net(x)], 1),
                        np.zeros((0, len(net.spec.head_sizes)), np.int64))


def train_feature_net(
    get_images: Callable[[Tensor], Tensor],
    targets: Tensor,
    head_sizes: Sequence[int],
    *,
    image_shape: tuple[int, int, int],
    head_names: Sequence[str] | None = None,
    config: FeatureNetConfig | None = None,
    device: torch.device | str = "cpu",
) -> FeatureNet:
    """Train a feature net on ``len(targets)`` examples.

    ``get_images(index)`` returns the images ``(B, C, H, W)`` of a ``(B,)`` long index;
    ``targets`` is ``(N, num_heads)`` long with column k in ``[0, head_sizes[k])``. The last
    ``val_fraction`` of a seeded shuffle is held out (at most 10,000 of it scored); training
    stops at ``config.epochs`` or earlier on a plateau of its mean per-head accuracy
    (``patience``, ``min_delta``; the weights of the last epoch are kept). ``net.info`` holds
    ``val_accuracy`` (per head, last epoch), ``epochs_run``, ``val_history`` (mean accuracy per
    epoch) and ``train_seconds``. Deterministic given ``config.seed`` (on CPU).
    """
    cfg = config or FeatureNetConfig()
    targets = torch.as_tensor(targets).long()
    if targets.ndim == 1:
        targets = targets[:, None]
    head_sizes = tuple(int(s) for s in head_sizes)
    if targets.ndim != 2 or targets.shape[1] != len(head_sizes):
        raise DataError(f"targets must be (N, {len(head_sizes)}), got {tuple(targets.shape)}")
    if (targets < 0).any() or (targets >= torch.tensor(head_sizes)).any():
        raise DataError("targets lie outside [0, head_sizes)")
    names = tuple(head_names) if head_names is not None else tuple(
        f"head{k}" for k in range(len(head_sizes)))
    spec = FeatureNetSpec(tuple(int(s) for s in image_shape), head_sizes, names,  # type: ignore[arg-type]
                          cfg.width, cfg.feature_dim, cfg.pool_size)
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = FeatureNet(spec)
    net.to(device)
    n = targets.shape[0]
    order = torch.randperm(n, generator=gen)
    n_val = int(n * cfg.val_fraction)
    train_idx, val_idx = order[:n - n_val], order[n - n_val:]
    if train_idx.numel() == 0:
        raise DataError("feature net: no training examples left after the validation split")
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    val_idx = val_idx[:_VAL_MAX]

    def held_out_accuracy() -> list[float]:
        if not val_idx.numel():
            return []
        pred = predict_factors(net, get_images(val_idx))
        return [float(v) for v in (pred == targets[val_idx].numpy()).mean(0)]

    start_time = time.perf_counter()
    history: list[float] = []  # mean held-out accuracy after each scored epoch
    best, since_best, epochs_run = -math.inf, 0, 0
    val_acc: list[float] = []
    net.train()
    for epoch in range(cfg.epochs):
        perm = train_idx[torch.randperm(train_idx.numel(), generator=gen)]
        for start in range(0, perm.numel(), cfg.batch_size):
            idx = perm[start:start + cfg.batch_size]
            x = get_images(idx).to(device, torch.float32)
            y = targets[idx].to(device)
            loss = sum(F.cross_entropy(lg, y[:, k]) for k, lg in enumerate(net(x)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        epochs_run = epoch + 1
        if cfg.patience is None and epochs_run < cfg.epochs:
            continue  # a fixed budget: score once, at the end
        # scoring draws no random numbers: the training stream is the same with or without it
        val_acc = held_out_accuracy()
        if not val_acc:
            continue
        history.append(float(np.mean(val_acc)))
        if history[-1] >= best + cfg.min_delta:
            best, since_best = history[-1], 0
        else:
            since_best += 1
            if cfg.patience is not None and since_best >= cfg.patience:
                break  # plateau: the last epochs did not raise the held-out accuracy
    net.eval()
    net.info = {"val_accuracy": val_acc, "config": cfg.cache_fields(), "num_examples": n,
                "num_val": int(val_idx.numel()), "epochs_run": epochs_run,
                "val_history": history, "train_seconds": time.perf_counter() - start_time}
    return net


def feature_net_for_ground_truth(
    data: GroundTruthData, *, config: FeatureNetConfig | None = None,
    device: torch.device | str = "cpu",
) -> FeatureNet:
    """A net predicting every factor of ``data`` from ``config.num_train`` rendered images."""
    cfg = config or FeatureNetConfig()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    factors = data.sample_factors(cfg.num_train, gen).long()
    probe = data.images_from_factors(factors[:1])
    return train_feature_net(
        lambda idx: data.images_from_factors(factors[idx]), factors, data.factor_sizes,
        image_shape=tuple(probe.shape[1:]), head_names=data.factor_names, config=cfg,
        device=device,
    )


def feature_net_for_labels(
    source: ImageSource, *, num_classes: int | None = None,
    config: FeatureNetConfig | None = None, device: torch.device | str = "cpu",
) -> FeatureNet:
    """A net predicting the labels of ``source`` (every image; ``num_train`` is not used)."""
    if source.labels is None:
        raise DataError("feature net: this image source has no labels; use a labelled dataset")
    labels = source.labels.long()
    k = int(num_classes) if num_classes is not None else int(labels.max()) + 1
    return train_feature_net(source.get_batch, labels, (k,), image_shape=source.image_shape,
                             head_names=("label",), config=config, device=device)


def save_feature_net(net: FeatureNet, path: str | os.PathLike) -> None:
    """Atomically write ``net`` (state dict + plain metadata) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "spec": {k: list(v) if isinstance(v, tuple) else v
                 for k, v in dataclasses.asdict(net.spec).items()},
        "info_json": json.dumps(net.info),
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
    }
    save_torch(path, payload)


def load_feature_net(path: str | os.PathLike, *, device: torch.device | str = "cpu") -> FeatureNet:
    """Load a net written by :func:`save_feature_net` (``weights_only=True``), in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"feature net file not found: {path}")
    try:
        payload: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(f"cannot read feature net {path}: {exc}; delete it to retrain") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise DataError(f"{path} is not an ncpvae feature net file; delete it to retrain")
    if payload.get("version") != FORMAT_VERSION:
        raise DataError(f"{path}: feature net format version {payload.get('version')}, expected "
                        f"{FORMAT_VERSION}; delete it to retrain")
    s = payload["spec"]
    spec = FeatureNetSpec(
        image_shape=tuple(s["image_shape"]), head_sizes=tuple(s["head_sizes"]),
        head_names=tuple(s["head_names"]), width=s["width"], feature_dim=s["feature_dim"],
        pool_size=s["pool_size"],
    )
    net = FeatureNet(spec)
    net.load_state_dict(payload["state_dict"])
    net.info = json.loads(payload.get("info_json", "{}"))
    return net.to(device).eval()


@dataclass(frozen=True)
class AccuracyCheck:
    """A feature net's held-out accuracy per head against its targets.

    ``val_accuracy``: head name -> accuracy; ``targets``: the targets of the net's heads (heads
    without one are not listed); ``below``: head -> ``(accuracy, target)`` for every head short
    of its target; ``meets_target``: None when no head has a target."""

    val_accuracy: dict[str, float]
    targets: dict[str, float]
    below: dict[str, tuple[float, float]]

    @property
    def meets_target(self) -> bool | None:
        return None if not self.targets else not self.below

    def warning(self) -> str | None:
        """One line naming every head below target, or None."""
        if not self.below:
            return None
        short = ", ".join(f"{k} {a:.3f} < {t:.2f}" for k, (a, t) in self.below.items())
        return (f"feature net below its accuracy target ({short}): KID, Fréchet distance, "
                "precision/recall, grid coverage and factor recovery rest on it; raise "
                "evaluate.feature_net.num_train / epochs")

    def to_dict(self) -> dict[str, Any]:
        return {"val_accuracy": dict(self.val_accuracy), "targets": dict(self.targets),
                "below_target": {k: list(v) for k, v in self.below.items()},
                "meets_target": self.meets_target, "warning": self.warning()}


def accuracy_check(net: FeatureNet, targets: Mapping[str, float] | None = None) -> AccuracyCheck:
    """Compare ``net.info["val_accuracy"]`` with ``targets`` (head name -> least accuracy;
    default :data:`DEFAULT_TARGETS`); targets of heads the net does not have are ignored. A net
    without held-out accuracy (``val_fraction = 0``) is below every target it has."""
    goal = dict(DEFAULT_TARGETS if targets is None else targets)
    acc = dict(zip(net.spec.head_names, net.info.get("val_accuracy", [])))
    mine = {k: float(v) for k, v in goal.items() if k in net.spec.head_names}
    below = {k: (acc.get(k, math.nan), t) for k, t in mine.items()
             if not acc.get(k, -math.inf) >= t}
    return AccuracyCheck({k: float(v) for k, v in acc.items()}, mine, below)


def default_cache_dir() -> Path:
    """The per-user ncpvae cache folder: ``$NCPVAE_CACHE_DIR`` if set, else
    ``$XDG_CACHE_HOME/ncpvae``, else ``~/.cache/ncpvae``. Feature nets live in its
    ``feature_nets`` subfolder."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ncpvae"


def feature_net_cache_key(dataset_name: str, dataset_config: Mapping[str, Any] | None = None,
                          config: FeatureNetConfig | None = None) -> str:
    """A short stable hash of the dataset (name + config), the feature-net config (less its
    targets, which do not change the net) and :data:`CACHE_VERSION`."""
    cfg = config or FeatureNetConfig()
    blob = json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "recipe": CACHE_VERSION,
                       "dataset": dataset_name, "dataset_config": dict(dataset_config or {}),
                       "feature_net": cfg.cache_fields()}, sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in dataset_name)
    return f"{safe}-{digest}"


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created) while building an entry: a second process
    that misses the same entry waits here, then loads what the first wrote. No lock where the
    file system or platform has none (both may then build; the last atomic rename wins)."""
    if fcntl is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        with contextlib.suppress(OSError):  # e.g. a network mount without flock: unlocked
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _load_entry(path: Path, device: torch.device | str, *, log: bool) -> FeatureNet | None:
    """The entry at ``path``; None if absent, or if it does not load (it is then rebuilt;
    logged when ``log``)."""
    if not path.is_file():
        return None
    try:
        return load_feature_net(path, device=device)
    except (DataError, KeyError, TypeError, ValueError, RuntimeError) as exc:
        if log:
            _log.warning("feature-net cache entry %s refused (%s); rebuilding it", path, exc)
        return None


def cached_feature_net(cache_dir: str | os.PathLike, key: str, build: Callable[[], FeatureNet],
                       *, device: torch.device | str = "cpu") -> FeatureNet:
    """Load ``<cache_dir>/<key>.pt`` if present, else ``build()`` it and save it there.

    Safe for caches shared between runs: a miss takes an exclusive lock on ``<key>.lock``,
    looks again (another process may have built the entry while this one waited), and only then
    builds; the entry is written whole under a unique temporary name and renamed over
    ``<key>.pt`` (:func:`save_feature_net`), so a reader sees a complete entry or none. An entry
    that does not load (truncated, foreign, another format) is refused and rebuilt over."""
    path = Path(cache_dir) / f"{key}.pt"
    net = _load_entry(path, device, log=False)
    if net is not None:
        return net
    with _build_lock(path.with_suffix(".lock")):
        net = _load_entry(path, device, log=True)
        if net is not None:
            return net
        net = build()
        save_feature_net(net, path)
    return net.to(device).eval()
