"""The latent sampler interface and the shared run loop (BlackJAX-style kernels).

Convention (MATH.md §3): the target is ``pi(z) ∝ exp(-U(z))``. An ``energy`` is any callable
mapping chains ``(C, D)`` to ``(C,)``; it must be *batch-separable* (row i depends on ``z[i]``
only), because every gradient is ``autograd.grad(U(z).sum(), z)``: one backward pass gives each
chain its own gradient. (An energy that returns ``U(z).mean()`` is rejected by the shape check;
one that mixes rows silently couples chains.)

A :class:`Sampler` holds hyperparameters only, never chain state:

- ``state = sampler.init(position, energy)``: a NamedTuple caching at least ``position``
  ``(C, D)`` and ``energy`` ``(C,)`` (gradient samplers also cache ``grad`` ``(C, D)``, so a
  step costs exactly one energy-and-gradient evaluation);
- ``state, info = sampler.step(state, energy, generator=g)``: one transition of every chain;
  ``info`` is a NamedTuple of ``(C,)`` tensors;
- ``sampler.run(...)`` (shared, final): loops ``step``, keeps draws, stacks infos, diagnoses.

Chains are the batch dimension: nothing loops over chains in Python. All randomness comes from
the ``generator`` (which must live on the positions' device), so a seeded run is bit-for-bit
reproducible. States and infos are detached: no autograd graph survives a step.

The helpers a kernel needs (energy and gradient evaluation, input checks, row selection, the
Langevin move, the divergence policy, importance resampling, diagnostics) live in
:mod:`ncpvae.mcmc` and are exported from the ``ncpvae`` top level.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple, final

import torch
from pydantic import Field, ValidationError, model_validator
from torch import Tensor

from ncpvae.component import BuildContext, Component, ComponentConfig
from ncpvae.errors import ConfigError, NonFiniteError, format_validation_error
from ncpvae.mcmc.diagnostics import acceptance_summary, summarize
from ncpvae.mcmc.kernels import Energy, OnNonfinite, check_generator, check_positions

#: ``callback(step, state, info)``, called after every step (``step`` counts from 1).
Callback = Callable[[int, NamedTuple, NamedTuple], None]


class SampleResult(NamedTuple):
    """The output of :meth:`Sampler.run` and :meth:`Sampler.sample_prior`.

    ``samples`` ``(S, C, D)``: kept draws (after burn-in and thinning; ``samples[-1]`` is always
    the final state). ``info``: per-step tensors ``(num_steps, C)`` covering every step, burn-in
    included (e.g. ``energy``, ``step_size``, ``acceptance_rate``, ``nonfinite``).
    ``diagnostics``: plain numbers (JSON-ready), see :meth:`Sampler.run`.
    """

    samples: Tensor
    info: dict[str, Tensor]
    diagnostics: dict[str, Any]


class MarkovChainConfig(ComponentConfig):
    """Config fields every Markov-chain sampler shares (``sample_prior`` uses them)."""

    num_steps: int = Field(500, ge=0, description="steps per chain in sample_prior")
    burn_in: int = Field(250, ge=0, description="initial steps not kept (adaptation runs here)")
    thin: int = Field(25, ge=1, description="keep every thin-th state after burn-in")
    on_nonfinite: OnNonfinite = Field(
        "raise", description="unadjusted-move divergence: raise NonFiniteError, or reset those "
        "chains to their previous position and count them")

    @model_validator(mode="after")
    def _burn_in_below_steps(self):
        if self.num_steps > 0 and self.burn_in >= self.num_steps:
            raise ValueError(f"burn_in ({self.burn_in}) must be smaller than num_steps "
                             f"({self.num_steps})")
        return self


class Sampler(Component, ABC):
    """Base class of latent samplers; see the module docstring for the kernel contract.

    Subclasses set ``name``, a ``Config`` (with ``num_steps``/``burn_in``/``thin`` fields if they
    use the default :meth:`sample_prior`; :class:`MarkovChainConfig` has them), and implement
    :meth:`init` and :meth:`step`. ``run_options`` names the extra keyword arguments :meth:`run`
    forwards to ``init`` and ``step`` (e.g. the ``sir`` sampler's ``proposal``).

    A sampler describes itself to tables, plots and the report (the framework never reads a
    plugin's config fields or branches on its name):

    - :attr:`label`: its display name, from its own config (``langevin`` gives ``ULA`` or
      ``MALA``, ``sir`` ``SIR``, ``sgld`` ``SGLD``); the registry name by default;
    - :attr:`acceptance_note`: what its ``acceptance_rate`` diagnostic means when that is not
      the acceptance probability of an exact Metropolis–Hastings step (ULA's is the would-be
      MALA acceptance of its unadjusted moves), or None (the default) when there is nothing to
      add or the sampler reports no acceptance.
    """

    kind: ClassVar[str] = "sampler"
    run_options: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: ComponentConfig | None = None, **fields: Any):
        if config is None:
            try:
                config = self.Config(**fields)
            except ValidationError as exc:
                raise ConfigError(
                    format_validation_error(exc, f"sampler '{self.name}' config")
                ) from None
        elif fields:
            raise ConfigError(f"{self.name} sampler: pass either a Config or keyword fields, not both")
        if not isinstance(config, self.Config):
            raise ConfigError(
                f"{type(self).__name__} needs a {type(self).__name__}.Config, "
                f"got {type(config).__name__}"
            )
        self.config = config

    @classmethod
    def from_config(cls, config: ComponentConfig, ctx: BuildContext) -> Sampler:
        """Build from a validated config; a sampler needs nothing from ``ctx``."""
        return cls(config)

    @property
    def label(self) -> str:
        """A short human name for tables and figure titles (e.g. ``MALA`` for the
        Metropolis-adjusted ``langevin`` sampler); the registry name unless a sampler says
        otherwise."""
        return self.name

    @property
    def acceptance_note(self) -> str | None:
        """A short note on what ``diagnostics["acceptance_rate"]`` means for this sampler, for
        readers of the report (e.g. ULA: ``"the would-be MH acceptance"``), or None when it is
        the plain Metropolis–Hastings acceptance or the sampler reports none."""
        return None

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.config.model_dump().items() if k != "name")
        return f"{type(self).__name__}({fields})"

    # -- the kernel ----------------------------------------------------------------------------

    @abstractmethod
    def init(self, position: Tensor, energy: Energy, **options: Any) -> NamedTuple:
        """The initial state of chains at ``position`` ``(C, D)`` (evaluates ``energy`` once)."""

    @abstractmethod
    def step(self, state: NamedTuple, energy: Energy, *, generator: torch.Generator | None = None,
             **options: Any) -> tuple[NamedTuple, NamedTuple]:
        """One transition of every chain: ``(state, info)``, both made of detached tensors."""

    def adapt(self, state: NamedTuple, info: NamedTuple, *, iteration: int, num_adapt: int
              ) -> NamedTuple:
        """Tune the state's adaptive quantities after burn-in step ``iteration`` (1-based) of
        ``num_adapt``. Called by :meth:`run` during burn-in only; the default does nothing."""
        return state

    def check_run(self, num_steps: int, burn_in: int, thin: int) -> None:
        """Raise :class:`ConfigError` if this sampler cannot run with these arguments."""

    # Randomness goes through these two methods so tests can inject per-chain noise.
    def _randn(self, like: Tensor, generator: torch.Generator | None) -> Tensor:
        return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)

    def _rand(self, like: Tensor, generator: torch.Generator | None) -> Tensor:
        return torch.rand(like.shape, generator=generator, dtype=like.dtype, device=like.device)

    # -- the shared loop -----------------------------------------------------------------------

    @final
    def run(
        self,
        energy: Energy,
        init_position: Tensor,
        num_steps: int,
        *,
        burn_in: int = 0,
        thin: int = 1,
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
        progress: bool = False,
        **options: Any,
    ) -> SampleResult:
        """Run ``num_steps`` transitions of every chain from ``init_position`` ``(C, D)``.

        Steps ``1..burn_in`` are burn-in (adaptation happens there only, then is frozen). After
        it, every ``thin``-th state is kept, counted back from the last step, so
        ``samples[-1]`` is the final state and ``S = ceil((num_steps - burn_in) / thin)``. With
        ``num_steps = 0`` nothing moves and ``samples`` is the initial position ``(1, C, D)``.

        ``info`` stacks every step's info: ``(num_steps, C)`` tensors. ``diagnostics``: per-
        dimension ``ess``/``rhat``/``mcse_mean`` of the kept draws (see
        :func:`ncpvae.mcmc.diagnostics.summarize`), ``acceptance_rate`` (post-burn-in mean, when the
        kernel reports one), ``num_nonfinite`` (non-finite proposals rejected or chains reset),
        ``wall_time_s`` (the stepping loop) and ``chain_steps_per_s``.

        ``callback(step, state, info)`` runs after each step; ``progress`` shows a tqdm bar;
        ``options`` are forwarded to ``init`` and ``step`` (names in ``run_options``).
        """
        for label, value, low in (("num_steps", num_steps, 0), ("burn_in", burn_in, 0),
                                  ("thin", thin, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{label} must be an integer >= {low}, got {value!r}")
        if num_steps > 0 and burn_in >= num_steps:
            raise ConfigError(
                f"burn_in ({burn_in}) must be smaller than num_steps ({num_steps}) so that some "
                f"draws are kept"
            )
        if num_steps == 0 and burn_in:
            raise ConfigError(f"burn_in ({burn_in}) needs num_steps > 0")
        unknown = set(options) - set(self.run_options)
        if unknown:
            allowed = ", ".join(sorted(self.run_options)) or "none"
            raise ConfigError(
                f"{self.name} sampler: unknown run option(s) {', '.join(sorted(unknown))}; "
                f"allowed: {allowed}"
            )
        self.check_run(num_steps, burn_in, thin)
        check_positions(init_position)
        check_generator(generator, init_position)

        start = time.perf_counter()
        state = self.init(init_position, energy, **options)
        kept: list[Tensor] = []
        infos: list[NamedTuple] = []
        steps = range(1, num_steps + 1)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc=f"{self.name} sampling", unit="step")
        for t in steps:
            try:
                state, info = self.step(state, energy, generator=generator, **options)
            except NonFiniteError as exc:
                raise NonFiniteError(f"{self.name} sampler, step {t} of {num_steps}: {exc}") from None
            if t <= burn_in:
                state = self.adapt(state, info, iteration=t, num_adapt=burn_in)
            infos.append(info)
            if t > burn_in and (num_steps - t) % thin == 0:
                kept.append(state.position)
            if callback is not None:
                callback(t, state, info)
        wall = time.perf_counter() - start

        if not kept:
            kept = [state.position]
        samples = torch.stack(kept)
        info_dict: dict[str, Tensor] = {}
        if infos:
            for field in infos[0]._fields:
                info_dict[field] = torch.stack([getattr(i, field) for i in infos])

        diagnostics = summarize(samples)
        chains = int(init_position.shape[0])
        diagnostics.update(
            sampler=self.name,
            num_steps=num_steps,
            burn_in=burn_in,
            thin=thin,
            num_nonfinite=int(info_dict["nonfinite"].sum()) if "nonfinite" in info_dict else 0,
            wall_time_s=wall,
            chain_steps_per_s=(chains * num_steps / wall) if wall > 0 else float("nan"),
        )
        if "acceptance_rate" in info_dict:
            diagnostics["acceptance"] = acceptance_summary(info_dict["acceptance_rate"][burn_in:])
            diagnostics["acceptance_rate"] = diagnostics["acceptance"]["mean"]
        if "step_size" in info_dict:
            diagnostics["final_step_size"] = float(info_dict["step_size"][-1].double().mean())
        return SampleResult(samples, info_dict, diagnostics)

    def sample_prior(self, prior, num_samples: int, *, generator: torch.Generator | None = None,
                     progress: bool = False) -> SampleResult:
        """Draw ``num_samples`` latents from ``prior`` with this sampler.

        MCMC samplers start ``num_samples`` chains at ``prior.base_prior.sample(...)`` and run
        ``config.num_steps`` steps (``config.burn_in``, ``config.thin``) on ``prior.energy``;
        ``result.samples[-1]`` are the final states ``(num_samples, D)``.
        """
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ConfigError(f"num_samples must be a positive integer, got {num_samples!r}")
        cfg = self.config
        if not hasattr(cfg, "num_steps"):
            raise ConfigError(f"the {self.name} sampler has no num_steps setting; use run()")
        start = prior.base_prior.sample(num_samples, generator=generator).detach()
        return self.run(prior.energy, start, cfg.num_steps, burn_in=getattr(cfg, "burn_in", 0),
                        thin=getattr(cfg, "thin", 1), generator=generator, progress=progress)
