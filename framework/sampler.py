"""The latent sampler interface (skeleton; the samplers issue completes ``run``).

Convention: target ``pi(z) ∝ exp(-U(z))``; ``energy`` maps chains ``(C, D)`` to ``(C,)``.
A sampler holds hyperparameters only, never chain state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import torch
from ncpvae.component import Component, ComponentConfig
from torch import Tensor

Energy = Callable[[Tensor], Tensor]


class SampleResult(NamedTuple):
    """``samples`` ``(S, C, D)``; ``info`` per-step tensors; ``diagnostics`` plain numbers."""

    samples: Tensor
    info: dict[str, Tensor]
    diagnostics: dict[str, Any]


class Sampler(Component, ABC):
    kind: ClassVar[str] = "sampler"

    def __init__(self, config: ComponentConfig):
        self.config = config

    @abstractmethod
    def init(self, position: Tensor, energy: Energy) -> NamedTuple: ...

    @abstractmethod
    def step(self, state: NamedTuple, energy: Energy, *, generator: torch.Generator | None = None
             ) -> tuple[NamedTuple, NamedTuple]: ...

    def sample_prior(self, prior, num_samples: int, *, generator: torch.Generator | None = None,
                     progress: bool = False) -> SampleResult:
        """Draw ``num_samples`` latents from ``prior``: chains start at ``prior.base_prior`` draws
        and run on ``prior.energy``; ``result.samples[-1]`` are the final states ``(C, D)``."""
        raise NotImplementedError
