"""The training objective interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from torch import Tensor

from ncpvae.component import Component
from ncpvae.model import LatentModel
from ncpvae.prior import Prior


class Objective(Component, ABC):
    """Maps a batch to a dict of losses.

    ``loss`` returns a dict whose ``"loss"`` entry is the finite scalar that is minimized; the
    other entries are detached scalars for logging (e.g. ``recon``, ``kl``, ``elbo``), or detached
    ``(D,)`` vectors (e.g. ``kl_per_dim``). ``step`` is the global optimizer step (for schedules).
    """

    kind: ClassVar[str] = "objective"

    @abstractmethod
    def loss(self, batch: Tensor, model: LatentModel, prior: Prior, *, step: int = 0) -> dict[str, Tensor]:
        """``batch`` is ``(B, C, H, W)`` in [0, 1]."""

    def check_compatible(self, model: LatentModel, prior: Prior) -> None:
        """Raise :class:`ncpvae.errors.ConfigError` early if the pair cannot be trained."""
