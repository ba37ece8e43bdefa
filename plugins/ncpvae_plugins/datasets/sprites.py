"""``sprites``: a procedural, dSprites-like dataset (the project's default data; docs/math.md §5).

Factor grid as in dSprites (Matthey et al. 2017), last factor fastest::

    shape 3 (square, ellipse, heart) x scale 6 (0.5, 0.6, ..., 1.0)
    x orientation 40 (k * 2pi/40, k = 0..39: no duplicate 2pi endpoint) x posX 32 x posY 32
    = 737,280 images of 64x64 (or 32x32), one channel.

It is *dSprites-like*, not dSprites: same factors and grid, our own shapes and geometry.

Rendering. The 3x6x40 sprite masks are rendered once per process (about 0.3 s) from implicit
shape functions, on a 31x31 patch with 8x8 supersampling per pixel. A pixel's value is its
**grey-level coverage** ``count / 64`` (the fraction of its 64 subsamples inside the shape), so
sub-pixel changes of scale or orientation still change pixel values. An image is a zero canvas
with one mask pasted at an integer pixel offset: a batch is one ``scatter_`` of precomputed masks
into zero canvases (no per-sample Python): about 6e5 images/s at 64x64 and 1.3e6 at 32x32
(batch 256, two idle CPU cores). Every
value is a dyadic rational (``k/64``, or ``k/256`` at 32x32), hence exact in float32 and
reproducible bit for bit; the tests pin SHA-256 hashes of the masks and of a few images.

Geometry (pixel coordinates: column x to the right, row y downwards, pixel (i, j) covers
``[j, j+1) x [i, i+1)``):

- each shape lives in the unit disk of its own frame (u right, v *up*), so no rotation can move
  it out of its patch: square ``|u|, |v| <= 0.7`` (corners at radius 0.99); ellipse
  ``u^2 + (v/0.5)^2 <= 1``; heart ``(x^2 + y^2 - 1)^3 <= x^2 y^3`` with ``x = 1.25 u``,
  ``y = 1.25 v + 0.25`` (the classic heart curve, lobes up, recentred so its farthest point is at
  radius exactly 1);
- scale s maps the unit disk to a disk of radius ``15 * s`` pixels (7.5 to 15 px) centred in the
  31x31 patch; orientation theta rotates the shape counter-clockwise on screen;
- the patch's top-left corner sits at column ``1 + posX`` and row ``1 + posY`` (posY counts rows
  from the top), so sprite centres move in 1-px steps over ``[16.5, 47.5]`` and every sprite stays
  at least 1 px inside the 64x64 canvas (rows/columns 0 and 63 are always empty).

Symmetries (inherent to the factor grid, as in dSprites): the square is invariant under 90°
rotations and the ellipse under 180°, so for a square orientations k and k + 10 (mod 40) give
the same sprite up to supersampling rounding, and for an ellipse k and k + 20. Neighbouring values
of every factor (including orientation 39 -> 0) always differ in at least one pixel, at 64x64
and at 32x32 (checked exhaustively by the tests).

``image_size = 32`` is the exact 2x2 average pooling of the 64x64 render, produced directly by
pasting pre-pooled masks (one per offset parity), so it costs no more than the 64x64 render.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from ncpvae import BuildContext, ComponentConfig, DataBundle, DataError, DatasetPlugin, ImageSource
from ncpvae.splits import split_by_count

FACTOR_NAMES: tuple[str, ...] = ("shape", "scale", "orientation", "posX", "posY")
FACTOR_SIZES: tuple[int, ...] = (3, 6, 40, 32, 32)
SHAPE_NAMES: tuple[str, ...] = ("square", "ellipse", "heart")
NUM_IMAGES: int = math.prod(FACTOR_SIZES)  # 737,280
#: scale values, orientation angles (radians) of the grid
SCALES: tuple[float, ...] = tuple(0.5 + 0.1 * k for k in range(6))
ORIENTATIONS: tuple[float, ...] = tuple(2 * math.pi * k / 40 for k in range(40))

CANVAS = 64  # full-resolution canvas side
PATCH = 31  # sprite patch side; 31 + 31 offsets + 2 border pixels = 64
SUPERSAMPLE = 8  # subsamples per pixel side: coverage in steps of 1/64
RADIUS = 15.0  # pixels spanned by the unit disk at scale 1
_STRIDES = torch.tensor([math.prod(FACTOR_SIZES[k + 1 :]) for k in range(5)], dtype=torch.long)
_SIZES = torch.tensor(FACTOR_SIZES, dtype=torch.long)


# --------------------------------------------------------------------------- factor <-> index


def _check_factors(factors: Tensor) -> Tensor:
    if not isinstance(factors, Tensor) or factors.ndim != 2 or factors.shape[1] != 5:
        shape = tuple(factors.shape) if isinstance(factors, Tensor) else type(factors).__name__
        raise DataError(f"sprites: factors must be a (n, 5) integer tensor, got {shape}")
    if factors.is_floating_point() or factors.is_complex() or factors.dtype == torch.bool:
        raise DataError(f"sprites: factors must be integer indices, got dtype {factors.dtype}")
    factors = factors.long().cpu()
    if ((factors < 0) | (factors >= _SIZES)).any():
        raise DataError(
            f"sprites: factor indices out of range; the columns {FACTOR_NAMES} take values "
            f"0 .. size-1 with sizes {FACTOR_SIZES}"
        )
    return factors


def factors_of(index: Tensor) -> Tensor:
    """Grid index ``(n,)`` -> factor indices ``(n, 5)`` long (shape, scale, orientation, posX,
    posY), last factor fastest, exactly as dSprites orders its images."""
    index = torch.as_tensor(index).long().cpu()
    if index.ndim != 1:
        raise DataError(f"sprites: grid indices must be 1-D, got shape {tuple(index.shape)}")
    if ((index < 0) | (index >= NUM_IMAGES)).any():
        raise DataError(f"sprites: grid indices must lie in [0, {NUM_IMAGES})")
    return (index[:, None] // _STRIDES) % _SIZES


def index_of(factors: Tensor) -> Tensor:
    """Factor indices ``(n, 5)`` -> grid index ``(n,)`` long; the inverse of :func:`factors_of`."""
    return (_check_factors(factors) * _STRIDES).sum(dim=1)


# --------------------------------------------------------------------------- masks


def _inside(shape: int, u: Tensor, v: Tensor) -> Tensor:
    """Whether frame points ``(u, v)`` (v up, shape within the unit disk) lie in ``shape``."""
    if shape == 0:  # square, half side 0.7
        return (u.abs() <= 0.7) & (v.abs() <= 0.7)
    if shape == 1:  # ellipse, semi-axes 1 and 0.5
        return u * u + (v / 0.5) ** 2 <= 1.0
    x, y = 1.25 * u, 1.25 * v + 0.25  # heart curve, recentred to radius 1 about (0, 0.25)
    return (x * x + y * y - 1.0) ** 3 <= x * x * y**3


@functools.lru_cache(maxsize=1)
def _coverage_counts() -> Tensor:
    """``(3, 6, 40, 31, 31)`` uint8: subsamples (of 64) inside the sprite, per patch pixel."""
    n = PATCH * SUPERSAMPLE
    # subsample centres relative to the patch centre (31/2, 31/2), in float64 for reproducibility
    grid = (torch.arange(n, dtype=torch.float64) + 0.5) / SUPERSAMPLE - PATCH / 2
    theta = torch.tensor(ORIENTATIONS, dtype=torch.float64)[:, None, None]
    cos, sin = torch.cos(theta), torch.sin(theta)
    counts = torch.empty(3, 6, 40, PATCH, PATCH, dtype=torch.uint8)
    for k, scale in enumerate(SCALES):
        radius = RADIUS * scale
        x = grid[None, None, :] / radius  # screen x (right)
        y = -grid[None, :, None] / radius  # screen y flipped: the shape frame has v up
        # frame coordinates of a screen point: rotate by -theta (the shape turns by +theta)
        u, v = cos * x + sin * y, -sin * x + cos * y
        for shape in range(3):
            inside = _inside(shape, u, v).view(40, PATCH, SUPERSAMPLE, PATCH, SUPERSAMPLE)
            counts[shape, k] = inside.sum(dim=(2, 4), dtype=torch.int32).to(torch.uint8)
    return counts


def sprite_masks() -> Tensor:
    """The ``(3, 6, 40, 31, 31)`` float32 grey-level coverage masks (values ``k/64``)."""
    return _coverage_counts().to(torch.float32) / SUPERSAMPLE**2


@functools.lru_cache(maxsize=2)
def _paste_tables(image_size: int) -> tuple[Tensor, Tensor]:
    """Flat masks to paste and the flat canvas offsets of a patch's pixels.

    64: masks ``(1, 1, 720, 31*31)``. 32: masks ``(2, 2, 720, 16*16)`` indexed by the parity of the
    64-pixel row/column offset, each the 2x2 average pooling of the mask shifted by that parity.
    """
    masks = sprite_masks().reshape(720, PATCH, PATCH)
    if image_size == CANVAS:
        side, table = PATCH, masks.reshape(1, 1, 720, PATCH * PATCH)
    else:
        side = (PATCH + 1) // 2
        table = torch.zeros(2, 2, 720, side * side)
        for py in range(2):
            for px in range(2):
                padded = torch.zeros(720, 2 * side, 2 * side)
                padded[:, py : py + PATCH, px : px + PATCH] = masks
                pooled = padded.view(720, side, 2, side, 2).mean(dim=(2, 4))
                table[py, px] = pooled.reshape(720, side * side)
    rows = torch.arange(side)
    offsets = (rows[:, None] * image_size + rows[None, :]).reshape(-1)
    return table.contiguous(), offsets


def render(factors: Tensor, image_size: int = 64) -> Tensor:
    """Render factor indices ``(n, 5)`` as float32 images ``(n, 1, S, S)`` in [0, 1], S = 64 or 32.

    Vectorized: one gather of masks and one ``scatter_`` into zero canvases.
    """
    if image_size not in (32, 64):
        raise DataError(f"sprites: image_size must be 64 or 32, got {image_size}")
    f = _check_factors(factors)
    table, offsets = _paste_tables(image_size)
    mask_id = (f[:, 0] * 6 + f[:, 1]) * 40 + f[:, 2]
    col, row = 1 + f[:, 3], 1 + f[:, 4]  # top-left corner of the patch on the 64 canvas
    if image_size == CANVAS:
        values = table[0, 0, mask_id]
        corner = row * CANVAS + col
    else:
        values = table[row % 2, col % 2, mask_id]
        corner = (row // 2) * image_size + col // 2
    canvas = torch.zeros(f.shape[0], image_size * image_size)
    canvas.scatter_(1, corner[:, None] + offsets[None, :], values)
    return canvas.view(-1, 1, image_size, image_size)


# --------------------------------------------------------------------------- ground truth, source


class SpritesGroundTruth:
    """The sprites factor grid as :class:`ncpvae.GroundTruthData` (any grid point, train or test).

    ``sample_factors(n, generator) -> (n, 5)`` long, each factor uniform and independent;
    ``images_from_factors(factors (n, 5)) -> (n, 1, S, S)`` float32 in [0, 1].
    """

    factor_names: tuple[str, ...] = FACTOR_NAMES
    factor_sizes: tuple[int, ...] = FACTOR_SIZES

    def __init__(self, image_size: int = 64):
        self.image_size = image_size

    @property
    def num_images(self) -> int:
        return NUM_IMAGES

    def sample_factors(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        columns = [torch.randint(size, (n,), generator=generator) for size in FACTOR_SIZES]
        return torch.stack(columns, dim=1)

    def images_from_factors(self, factors: Tensor) -> Tensor:
        return render(factors, self.image_size)

    factors_of = staticmethod(factors_of)
    index_of = staticmethod(index_of)


class SpritesImageSource(ImageSource):
    """A subset of the sprites grid. Holds only grid indices ``(N,)`` and renders on demand.

    ``labels`` is the shape factor (0 square, 1 ellipse, 2 heart), ``(N,)`` long. Batches are
    produced on the CPU.
    """

    def __init__(self, grid_indices: Tensor, image_size: int = 64):
        self.grid_indices = torch.as_tensor(grid_indices).long().cpu()
        self.image_size = image_size
        self.labels = self.grid_indices // int(_STRIDES[0])

    def __len__(self) -> int:
        return self.grid_indices.shape[0]

    def factors(self, index: Tensor) -> Tensor:
        """Factor indices ``(B, 5)`` of the images at positions ``index`` ``(B,)`` here."""
        return factors_of(self.grid_indices[index.cpu()])

    def get_batch(self, index: Tensor) -> Tensor:
        return render(self.factors(index), self.image_size)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (1, self.image_size, self.image_size)


# --------------------------------------------------------------------------- plugin


class SpritesDataset(DatasetPlugin):
    """dSprites-like procedural sprites (the default dataset); see the module docstring.

    The train and test sets are disjoint subsets of the 737,280-point grid drawn with a
    permutation seeded by ``split_seed`` (never by the run's seed): the first ``test_size``
    permuted indices are the test set, the next ``train_size`` (default: all the rest) the
    training set.
    """

    name = "sprites"

    class Config(ComponentConfig):
        name: Literal["sprites"] = "sprites"
        image_size: Literal[64, 32] = Field(
            64, description="64, or 32 (exact 2x2 average pooling of the 64x64 render)"
        )
        train_size: int | None = Field(
            None, ge=1, le=NUM_IMAGES - 1, description="training grid points; None = all but test"
        )
        test_size: int = Field(10_000, ge=1, le=NUM_IMAGES - 1, description="test grid points")
        split_seed: int = Field(
            0, ge=0, description="seed of the train/test split (independent of the run seed)"
        )

        @model_validator(mode="after")
        def _fits_grid(self) -> SpritesDataset.Config:
            if self.train_size is not None and self.train_size + self.test_size > NUM_IMAGES:
                raise ValueError(
                    f"train_size + test_size = {self.train_size + self.test_size} exceeds the "
                    f"{NUM_IMAGES} images of the grid; lower one of them"
                )
            return self

    def build(self, ctx: BuildContext) -> DataBundle:
        cfg = self.config
        train, test = split_by_count(
            NUM_IMAGES, cfg.train_size, cfg.test_size, cfg.split_seed, what="sprites"
        )
        return DataBundle(
            train=SpritesImageSource(train, cfg.image_size),
            test=SpritesImageSource(test, cfg.image_size),
            ground_truth=SpritesGroundTruth(cfg.image_size),
        )
