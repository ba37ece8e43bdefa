"""Sample quality on the features of a locally trained network (see :mod:`feature_net`).

All functions take feature arrays ``(n, F)`` (real = held-out data images, fake = decoded
samples), as numpy arrays or Tensors.

- KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic kernel ``k(x, y) = (x.y/F + 1)^3``,
  averaged over subsets. Binkowski et al. average over random subsets of 1000; here the subsets
  are a random *partition* (disjoint blocks of ``min(subset_size, n // num_subsets)`` points per
  side), so the block estimates are independent and ``std / sqrt(num_subsets)`` is a valid
  standard error. KID is unbiased: it is 0 in expectation for one law and may be negative.
- Fréchet distance (the formula of FID, on our features):
  ``|mu_r - mu_f|^2 + tr(S_r + S_f - 2 (S_r S_f)^{1/2})`` with sample means and covariances.
- Precision / recall (Kynkäänniemi et al. 2019): each real point gets a ball reaching its k-th
  nearest real neighbour (k = 3); precision is the fraction of fake points inside some real
  ball, recall the fraction of real points inside some fake ball (fake balls alike).
- :func:`factor_coverage`: for sprites, how many values of each factor the decoded samples hit
  (as classified by the feature network), and how much of a joint grid they hit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import Field

from ncpvae.component import StrictModel
from ncpvae.errors import DataError
from ncpvae.metrics._common import MetricResult, make_rng
from ncpvae.metrics.mmd import as_samples, mmd2_unbiased, polynomial_kernel

KID_SUBSET_SIZE = 1000
KID_NUM_SUBSETS = 10
PR_NEIGHBOURS = 3
#: the sprites joint grid: shape x scale x posX (4 bins of 8) x posY (4 bins of 8) = 288 cells;
#: orientation is left out (symmetric shapes make it ambiguous).
SPRITES_JOINT_BINS: dict[str, int] = {"shape": 3, "scale": 6, "posX": 4, "posY": 4}


class SampleQualityConfig(StrictModel):
    kid_subset_size: int = Field(KID_SUBSET_SIZE, ge=2, description="max points per KID block")
    kid_num_subsets: int = Field(KID_NUM_SUBSETS, ge=2, description="disjoint KID blocks")
    pr_neighbours: int = Field(PR_NEIGHBOURS, ge=1, description="k of the k-NN manifolds")


@dataclass(frozen=True)
class KIDResult(MetricResult):
    kid: float
    se: float
    subset_size: int
    num_subsets: int


@dataclass(frozen=True)
class PrecisionRecall(MetricResult):
    precision: float
    recall: float


@dataclass(frozen=True)
class SampleQualityResult(MetricResult):
    kid: float
    kid_se: float
    frechet: float
    precision: float
    recall: float
    n_real: int
    n_fake: int


@dataclass(frozen=True)
class CoverageResult(MetricResult):
    per_factor: dict[str, float]  # fraction of each factor's values hit
    joint: float | None  # fraction of the joint grid's cells hit (None without a grid)
    joint_bins: dict[str, int]  # the grid: factor name -> number of equal bins
    joint_cells: int  # number of cells in the grid


def _pair(real: object, fake: object) -> tuple[np.ndarray, np.ndarray]:
    r, f = as_samples(real, "real features"), as_samples(fake, "fake features")
    if r.shape[1] != f.shape[1]:
        raise DataError(f"real and fake features differ in width: {r.shape[1]} vs {f.shape[1]}")
    return r, f


def kid_blocks(real: object, fake: object, *, real_size: int, fake_size: int,
               num_subsets: int, seed: int | np.random.Generator = 0) -> np.ndarray:
    """Unbiased KID on each of ``num_subsets`` disjoint blocks, ``(num_subsets,)``.

    Block ``b`` takes ``real_size`` real and ``fake_size`` fake points of random permutations of
    ``real`` ``(n_r, F)`` and ``fake`` ``(n_f, F)`` (the real permutation is drawn first, so two
    calls with the same seed and the same real set use the same real blocks: the differences
    of two fake sets' block values are then paired).
    """
    r, f = _pair(real, fake)
    rng = make_rng(seed)
    if min(real_size, fake_size) < 2 or real_size * num_subsets > r.shape[0] or (
            fake_size * num_subsets > f.shape[0]):
        raise DataError(f"KID needs at least {2 * num_subsets} points per side for "
                        f"{num_subsets} subsets, got {r.shape[0]} and {f.shape[0]}")
    r = r[rng.permutation(r.shape[0])[:real_size * num_subsets]]
    f = f[rng.permutation(f.shape[0])[:fake_size * num_subsets]]
    values = np.empty(num_subsets)
    for b in range(num_subsets):
        x = r[b * real_size:(b + 1) * real_size]
        y = f[b * fake_size:(b + 1) * fake_size]
        values[b] = mmd2_unbiased(polynomial_kernel(x, x), polynomial_kernel(y, y),
                                  polynomial_kernel(x, y))
    return values


def kid(real: object, fake: object, *, subset_size: int = KID_SUBSET_SIZE,
        num_subsets: int = KID_NUM_SUBSETS, seed: int | np.random.Generator = 0) -> KIDResult:
    """Kernel Inception Distance on features ``(n_r, F)``, ``(n_f, F)`` with its standard error."""
    r, f = _pair(real, fake)
    size = min(subset_size, r.shape[0] // num_subsets, f.shape[0] // num_subsets)
    if size < 2:
        raise DataError(f"KID needs at least {2 * num_subsets} points per side for "
                        f"{num_subsets} subsets, got {r.shape[0]} and {f.shape[0]}")
    values = kid_blocks(r, f, real_size=size, fake_size=size, num_subsets=num_subsets,
                        seed=seed)
    return KIDResult(kid=float(values.mean()), se=float(values.std(ddof=1) / np.sqrt(num_subsets)),
                     subset_size=size, num_subsets=num_subsets)


def _sqrtm_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                                sigma2: np.ndarray) -> float:
    """Fréchet (2-Wasserstein^2) distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``tr (S1 S2)^{1/2}`` is computed as ``sum sqrt(eig(S1^{1/2} S2 S1^{1/2}))`` (a symmetric PSD
    matrix with the same spectrum), which is stable for singular covariances.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size) or mu1.shape != mu2.shape:
        raise DataError("Fréchet distance: means (d,) and covariances (d, d) must match")
    a = _sqrtm_psd((s1 + s1.T) / 2)
    m = a @ ((s2 + s2.T) / 2) @ a
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    value = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)
    return max(value, 0.0)  # only rounding can make it negative


def frechet_distance(real: object, fake: object) -> float:
    """Fréchet distance between the Gaussians fitted (mean, ddof=1 covariance) to two feature sets."""
    r, f = _pair(real, fake)
    return frechet_distance_from_stats(r.mean(0), np.cov(r, rowvar=False),
                                       f.mean(0), np.cov(f, rowvar=False))


def _kth_neighbour_radii(x: torch.Tensor, k: int, block: int) -> torch.Tensor:
    radii = []
    for start in range(0, x.shape[0], block):
        d = torch.cdist(x[start:start + block], x)
        # The point itself is its own nearest neighbour at distance 0, hence k + 1.
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def _inside_fraction(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor,
                     block: int) -> float:
    inside = 0
    for start in range(0, points.shape[0], block):
        d = torch.cdist(points[start:start + block], centres)
        inside += int((d <= radii[None, :]).any(1).sum())
    return inside / points.shape[0]


def precision_recall(real: object, fake: object, *, k: int = PR_NEIGHBOURS,
                     block: int = 1024) -> PrecisionRecall:
    """Improved precision and recall (k-NN manifolds) of features ``(n_r, F)``, ``(n_f, F)``."""
    r, f = _pair(real, fake)
    if k >= min(r.shape[0], f.shape[0]):
        raise DataError(f"precision/recall with k={k} needs more than {k} points per side")
    rt, ft = torch.from_numpy(r), torch.from_numpy(f)
    r_radii = _kth_neighbour_radii(rt, k, block)
    f_radii = _kth_neighbour_radii(ft, k, block)
    return PrecisionRecall(precision=_inside_fraction(ft, rt, r_radii, block),
                           recall=_inside_fraction(rt, ft, f_radii, block))


def sample_quality(real: object, fake: object, *, config: SampleQualityConfig | None = None,
                   seed: int | np.random.Generator = 0) -> SampleQualityResult:
    """KID (with SE), Fréchet distance and precision/recall between two feature sets."""
    cfg = config or SampleQualityConfig()
    r, f = _pair(real, fake)
    k = kid(r, f, subset_size=cfg.kid_subset_size, num_subsets=cfg.kid_num_subsets, seed=seed)
    pr = precision_recall(r, f, k=cfg.pr_neighbours)
    return SampleQualityResult(kid=k.kid, kid_se=k.se, frechet=frechet_distance(r, f),
                               precision=pr.precision, recall=pr.recall,
                               n_real=r.shape[0], n_fake=f.shape[0])


def factor_coverage(
    predicted_factors: object,
    factor_sizes: Sequence[int],
    *,
    factor_names: Sequence[str] | None = None,
    joint_bins: Mapping[str, int] | None = None,
) -> CoverageResult:
    """Coverage of factor values by classified samples ``(n, K)`` (ints in ``[0, size_k)``).

    ``per_factor[name]`` = distinct values hit / ``size``. The joint grid bins factor
    ``name`` into ``joint_bins[name]`` equal bins (value v -> ``floor(v * bins / size)``) and
    reports distinct cells hit / number of cells. With ``joint_bins`` None, the sprites grid
    :data:`SPRITES_JOINT_BINS` is used when its factor names are present, else no joint grid.
    """
    pred = np.asarray(predicted_factors.cpu() if isinstance(predicted_factors, torch.Tensor)
                      else predicted_factors)
    sizes = [int(s) for s in factor_sizes]
    names = list(factor_names) if factor_names is not None else [f"factor{k}" for k in
                                                                  range(len(sizes))]
    if pred.ndim != 2 or pred.shape[1] != len(sizes) or len(names) != len(sizes):
        raise DataError(f"predicted factors must be (n, {len(sizes)}) with one name per factor, "
                        f"got shape {pred.shape}")
    if not np.issubdtype(pred.dtype, np.integer) or (pred < 0).any() or (pred >= sizes).any():
        raise DataError("predicted factors must be integer indices in [0, factor_sizes)")
    per_factor = {name: np.unique(pred[:, k]).size / size
                  for k, (name, size) in enumerate(zip(names, sizes))}
    if joint_bins is None:
        joint_bins = SPRITES_JOINT_BINS if set(SPRITES_JOINT_BINS) <= set(names) else {}
    joint_bins = dict(joint_bins)
    if not joint_bins:
        return CoverageResult(per_factor, None, {}, 0)
    columns = []
    for name, bins in joint_bins.items():
        if name not in names:
            raise DataError(f"joint grid factor '{name}' is not one of {names}")
        k = names.index(name)
        if not 1 <= bins <= sizes[k]:
            raise DataError(f"joint grid: {bins} bins for factor '{name}' of size {sizes[k]}")
        columns.append(pred[:, k] * bins // sizes[k])
    cells = int(np.prod(list(joint_bins.values())))
    hit = np.unique(np.stack(columns, 1), axis=0).shape[0] if pred.shape[0] else 0
    return CoverageResult(per_factor, hit / cells, joint_bins, cells)
