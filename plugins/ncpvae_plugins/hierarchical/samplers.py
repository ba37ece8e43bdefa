"""Group-wise samplers for hierarchical priors (docs/hierarchical.md §4).

``groupwise_langevin`` (ULA or MALA within a group) and ``groupwise_sir`` draw from a
hierarchical NCP prior ``p_NCP`` top-down, group by group, conditioned on the groups already drawn,
so the context-dependent normalizers ``Z_k(z_<k)`` never enter. A prior qualifies when it has a
``tilt`` (:class:`~ncpvae.hierarchical.HierarchicalTilt`) over a
:class:`~ncpvae.hierarchical.HierarchicalPrior` ``base_prior``; on a plain
:class:`~ncpvae.hierarchical.HierarchicalPrior` the chains run on its conditionals; on any other
prior both fall back to their whole-vector parents (``langevin``, ``sir``).
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
from torch import Tensor

from ncpvae import Prior, SampleResult, ShardGroup
from ncpvae.hierarchical import (
    HierarchicalPrior,
    HierarchicalTilt,
    sample_groupwise,
    sample_groupwise_sir,
)
from ncpvae_plugins.langevin import LangevinSampler
from ncpvae_plugins.sir import SIRSampler


def hierarchical_parts(prior: Prior) -> tuple[HierarchicalPrior, HierarchicalTilt | None] | None:
    """``(base, tilt)`` of a hierarchical prior (``tilt`` None for a bare one), else None."""
    tilt = getattr(prior, "tilt", None)
    if isinstance(prior.base_prior, HierarchicalPrior) and isinstance(tilt, HierarchicalTilt):
        return prior.base_prior, tilt
    if isinstance(prior, HierarchicalPrior):
        return prior, None
    return None


class GroupwiseLangevinSampler(LangevinSampler):
    """ULA / MALA within each latent group, top-down (the ``langevin`` settings apply to every
    group's chains); whole-vector ``langevin`` on a non-hierarchical prior."""

    name = "groupwise_langevin"

    class Config(LangevinSampler.Config):
        name: Literal["groupwise_langevin"] = "groupwise_langevin"  # type: ignore[assignment]

    @property
    def label(self) -> str:
        return f"group-wise {super().label}"

    def sample_prior(self, prior, num_samples: int, *, generator: torch.Generator | None = None,
                     progress: bool = False, shards: ShardGroup | None = None) -> SampleResult:
        """``num_samples`` draws ``(1, num_samples, D)``; diagnostics include each group's
        post-burn-in acceptance rate (``acceptance_rate_group1`` ...)."""
        parts = hierarchical_parts(prior)
        if parts is None:
            return super().sample_prior(prior, num_samples, generator=generator,
                                        progress=progress, **({"shards": shards} if shards
                                                              else {}))
        base, tilt = parts
        cfg = self.config
        rates: list[float] = []
        start = time.perf_counter()

        def move(energy: Any, init: Tensor, gen: torch.Generator | None) -> Tensor:
            result = self.run(energy, init, cfg.num_steps, burn_in=cfg.burn_in, generator=gen,
                              diagnose=False, keep_info="summary")
            rates.append(float(result.diagnostics.get("acceptance_rate", float("nan"))))
            return result.samples[-1]

        z = sample_groupwise(base, tilt, num_samples, move, generator=generator)
        diagnostics: dict[str, Any] = {"sampler": self.name, "num_chains": num_samples,
                                       "num_draws": 1, "wall_time_s": time.perf_counter() - start}
        diagnostics.update({f"acceptance_rate_group{k + 1}": r for k, r in enumerate(rates)})
        return SampleResult(z.unsqueeze(0), {}, diagnostics)


class GroupwiseSIRSampler(SIRSampler):
    """SIR within each latent group, top-down (``num_candidates`` per group and draw); whole-
    vector ``sir`` on a non-hierarchical prior."""

    name = "groupwise_sir"

    class Config(SIRSampler.Config):
        name: Literal["groupwise_sir"] = "groupwise_sir"  # type: ignore[assignment]

    @property
    def label(self) -> str:
        return "group-wise SIR"

    def sample_prior(self, prior, num_samples: int, *, generator: torch.Generator | None = None,
                     progress: bool = False, shards: ShardGroup | None = None,
                     proposal=None) -> SampleResult:
        """``num_samples`` draws ``(1, num_samples, D)``; diagnostics include each group's mean
        Kish ESS fraction (``ess_fraction_group1`` ...)."""
        parts = hierarchical_parts(prior)
        if parts is None or parts[1] is None or proposal is not None:
            return super().sample_prior(prior, num_samples, generator=generator,
                                        progress=progress, shards=shards, proposal=proposal)
        base, tilt = parts
        start = time.perf_counter()
        z, ess = sample_groupwise_sir(base, tilt, num_samples, self.config.num_candidates,
                                      generator=generator)
        diagnostics: dict[str, Any] = {"sampler": self.name, "num_chains": num_samples,
                                       "num_draws": 1, "wall_time_s": time.perf_counter() - start}
        diagnostics.update({f"ess_fraction_group{k + 1}": e for k, e in enumerate(ess)})
        return SampleResult(z.unsqueeze(0), {}, diagnostics)
