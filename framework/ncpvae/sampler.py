"""The latent sampler interface and the shared run loop (BlackJAX-style kernels).

Convention (docs/samplers.md §1): the target is ``pi(z) ∝ exp(-U(z))``. An ``energy`` is any callable
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
- ``sampler.run(...)`` (shared, final): checks its arguments into a :class:`RunSettings`,
  loops ``step`` with per-step callbacks (one keeps the draws and infos), diagnoses; with a
  :class:`~ncpvae.ShardGroup` of several ranks it splits the chains over them.

Chains are the batch dimension: nothing loops over chains in Python. All randomness comes from
the ``generator`` (which must live on the positions' device), so a seeded run is bit-for-bit
reproducible; per-chain noise is drawn through :meth:`Sampler._randn`/:meth:`Sampler._rand`
(the row draws of :mod:`ncpvae.sharding`), so a rank running a block of the chains draws the
one-process noise of its chains. States and infos are detached: no autograd graph survives a
step.

The helpers a kernel needs (energy and gradient evaluation, input checks, row selection, the
Langevin move, the divergence policy, importance resampling, diagnostics) live in
:mod:`ncpvae.mcmc` and are exported from the ``ncpvae`` top level.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, Literal, NamedTuple, final

import torch
from pydantic import Field, ValidationError, model_validator
from torch import Tensor

from ncpvae.component import BuildContext, Component, ComponentConfig
from ncpvae.errors import ConfigError, NonFiniteError, format_validation_error
from ncpvae.mcmc.diagnostics import acceptance_summary, summarize
from ncpvae.mcmc.fastpath import CompiledEnergy, onednn_available, prepare_energy
from ncpvae.mcmc.fastpath.auto import FastPath, choose_fast_path
from ncpvae.mcmc.kernels import (
    Energy,
    OnNonfinite,
    check_generator,
    check_positions,
    deferred_divergence,
)
from ncpvae.sharding import ONE_PROCESS, ShardGroup, rand_rows, randn_rows

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


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The checked arguments of one :meth:`Sampler.run` call (see there); raises
    :class:`ConfigError` on a bad one. ``options`` are the sampler's run options."""

    num_steps: int
    burn_in: int = 0
    thin: int = 1
    keep_info: Literal["full", "summary"] = "full"
    diagnose: bool = True
    check_every: int | None = None  # None: every step on the CPU, every 100 on accelerators
    fast_linear: bool = False
    compile_energy: bool = False
    fast_path: str = "auto"
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for label, value, low in (("num_steps", self.num_steps, 0),
                                  ("burn_in", self.burn_in, 0), ("thin", self.thin, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{label} must be an integer >= {low}, got {value!r}")
        if self.num_steps > 0 and self.burn_in >= self.num_steps:
            raise ConfigError(
                f"burn_in ({self.burn_in}) must be smaller than num_steps ({self.num_steps}) so "
                f"that some draws are kept"
            )
        if self.num_steps == 0 and self.burn_in:
            raise ConfigError(f"burn_in ({self.burn_in}) needs num_steps > 0")
        if self.keep_info not in ("full", "summary"):
            raise ConfigError(f"keep_info must be 'full' or 'summary', got {self.keep_info!r}")
        every = self.check_every
        if every is not None and (isinstance(every, bool) or not isinstance(every, int)
                                  or every < 1):
            raise ConfigError(f"check_every must be a positive integer or None, got {every!r}")

    def keeps(self, t: int) -> bool:
        """Whether the state after step ``t`` is a kept draw (after burn-in, every ``thin``-th
        counted back from the last step)."""
        return t > self.burn_in and (self.num_steps - t) % self.thin == 0

    @property
    def num_kept(self) -> int:
        """How many steps :meth:`keeps`: ``ceil((num_steps - burn_in) / thin)``, 0 without
        steps."""
        return -(-(self.num_steps - self.burn_in) // self.thin)


class MarkovChainConfig(ComponentConfig):
    """Config fields every Markov-chain sampler shares (``sample_prior`` uses them)."""

    num_steps: int = Field(500, ge=0, description="steps per chain in sample_prior")
    burn_in: int = Field(250, ge=0, description="initial steps not kept (adaptation runs here)")
    thin: int = Field(25, ge=1, description="keep every thin-th state after burn-in")
    on_nonfinite: OnNonfinite = Field(
        "raise", description="unadjusted-move divergence: raise NonFiniteError, or reset those "
        "chains to their previous position and count them")
    fast_linear: bool = Field(
        False, description="opt-in: shape-aware float32 kernels for the energy's linear layers "
        "on the CPU (oneDNN, transposed narrow gradients); same precision, other rounding")
    compile_energy: bool = Field(
        False, description="opt-in: torch.compile the energy's value and gradient (compiles on "
        "first use, seconds to a minute; pays off on long runs with many chains); other rounding")
    fast_path: FastPath = Field(
        "auto", description="eager, compiled (= compile_energy), or auto: compile when chains x "
        "steps reach the measured break-even (ncpvae.mcmc.fastpath.auto) and the sampler opts in")

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
      add or the sampler reports no acceptance;
    - :attr:`shardable_chains`: whether its chains may be split across the ranks of a
      ``torchrun`` launch (independent chains whose per-chain noise comes from :meth:`_randn`
      and :meth:`_rand`); False by default.
    """

    kind: ClassVar[str] = "sampler"
    #: whether ``fast_path = "auto"`` may compile this sampler's energy (samplers whose step
    #: evaluates gradients and gains from it, e.g. ``langevin``); False: auto runs eagerly
    auto_compile: ClassVar[bool] = False
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

    @property
    def shardable_chains(self) -> bool:
        """Whether :meth:`run` may split this sampler's chains across the ranks of a
        :class:`~ncpvae.ShardGroup` and still give the one-process chains: every chain evolves
        on its own (no information pooled across chains, e.g. a step size adapted on the mean
        acceptance of all chains) and draws its per-chain noise through :meth:`_randn`/
        :meth:`_rand` (or :mod:`ncpvae.sharding`'s row draws). False by default (the chains then
        run whole on every rank: the same numbers, no speed-up); a sampler opts in."""
        return False

    # -- per-chain noise -----------------------------------------------------------------------
    # The one way a kernel draws per-chain noise. The draws go through ncpvae.sharding's row
    # block: in one process they are plain torch.randn/rand, and in a rank's block of a split
    # run (opened by run()) they are the one-process draws' rows of that rank's chains.

    def _randn(self, like: Tensor, generator: torch.Generator | None, dim: int = 0) -> Tensor:
        """Standard normal noise shaped like ``like`` whose dimension ``dim`` is the chains."""
        return randn_rows(like.shape, dim=dim, generator=generator, dtype=like.dtype,
                          device=like.device)

    def _rand(self, like: Tensor, generator: torch.Generator | None, dim: int = 0) -> Tensor:
        """Uniform ``[0, 1)`` noise shaped like ``like`` whose dimension ``dim`` is the chains."""
        return rand_rows(like.shape, dim=dim, generator=generator, dtype=like.dtype,
                         device=like.device)

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
        keep_info: Literal["full", "summary"] = "full",
        diagnose: bool = True,
        check_every: int | None = None,
        fast_linear: bool = False,
        compile_energy: bool = False,
        fast_path: FastPath = "auto",
        shards: ShardGroup = ONE_PROCESS,
        **options: Any,
    ) -> SampleResult:
        """Run ``num_steps`` transitions of every chain from ``init_position`` ``(C, D)``.

        Steps ``1..burn_in`` are burn-in (adaptation happens there only, then is frozen). After
        it, every ``thin``-th state is kept, counted back from the last step, so
        ``samples[-1]`` is the final state and ``S = ceil((num_steps - burn_in) / thin)``. With
        ``num_steps = 0`` nothing moves and ``samples`` is the initial position ``(1, C, D)``.

        ``keep_info = "full"`` (default): ``info`` stacks every step's info, ``(num_steps, C)``
        tensors. ``"summary"`` streams it instead (memory independent of ``num_steps`` beyond
        one scalar per step and field): ``info[field]`` is the per-step mean over chains
        ``(num_steps,)`` (float64) and ``info[field + "_chain_mean"]`` each chain's mean over
        the post-burn-in steps ``(C,)``; the diagnostics are the same numbers as in ``"full"``
        mode. Memory is then the kept draws ``(S, C, D)`` (choose ``thin``) plus a block of at
        most 64 steps (and 2^22 chain-steps) of info: at 10^5 chains of the NCP-like benchmark
        energy, about 0.46 GB however many steps when glibc's mmap threshold is fixed
        (``MALLOC_MMAP_THRESHOLD_=131072``); with glibc's default dynamic threshold the heap
        fragments and the peak creeps up ~1 MB per step (``benchmarks/bench_sampler_memory.py``).

        ``diagnostics``: per-dimension ``ess``/``rhat``/``mcse_mean`` of the kept draws (see
        :func:`ncpvae.mcmc.diagnostics.summarize`; skipped with ``diagnose = False``),
        ``acceptance_rate`` (post-burn-in mean, when the kernel reports one, with
        ``acceptance`` its spread over chains), ``num_nonfinite`` (non-finite proposals
        rejected or chains reset), ``wall_time_s`` (the stepping loop) and
        ``chain_steps_per_s``.

        Divergence of unadjusted moves (``on_nonfinite = "raise"``) is checked every
        ``check_every`` steps (default: every step on the CPU, where the check is free, and
        every 100 steps on accelerators, so the loop never waits for the device in between);
        the error still names the first bad step. Results do not depend on ``check_every``.

        ``fast_linear = True`` runs the energy's frozen float32 CPU linear layers through
        shape-aware kernels (:class:`ncpvae.mcmc.fastpath.FastLinearEnergy`: oneDNN for wide
        products, a transposed product for a narrow layer's input gradient; any energy, same
        float32 precision, other rounding, so chains are not bit-identical to the default; off
        by default). With ``compile_energy`` too, the compiled function calls those kernels.
        ``compile_energy = True`` evaluates the energy and its gradient through one
        ``torch.compile``-d function (:class:`ncpvae.mcmc.fastpath.CompiledEnergy`): the first
        call compiles (counted in ``wall_time_s``), later steps run fused kernels; float32 with
        other rounding; falls back to eager, with one warning, where compilation fails. A
        sampler whose step is a pure tensor function compiles that step whole around the
        energy's gradient (:meth:`~ncpvae.mcmc.fastpath.CompiledEnergy.compile_transition`; the
        ``langevin`` sampler's MALA step does: proposal, acceptance and row selection in one
        graph with the energy, the random draws still eager from ``generator``). (Each
        call wraps anew; to reuse one compilation across calls pass ``CompiledEnergy(energy)``,
        or ``CompiledEnergy(energy, fast_linear=True)``, as the energy.) The fastest CPU path
        at >= 1,024 chains of an MLP energy is both flags (``benchmarks/bench_blackjax.py``).

        ``fast_path``: ``"eager"``, ``"compiled"`` (``compile_energy = True`` plus, on a CPU
        with oneDNN, ``fast_linear``: the fastest compiled path) or ``"auto"``
        (default): compiled when the sampler opts in (:attr:`auto_compile`) and chains x
        ``num_steps`` reach :data:`ncpvae.mcmc.fastpath.auto.COMPILE_BREAK_EVEN` (the measured
        break-even, docs/speed.md), eager below. ``diagnostics["fast_path"]`` records the
        choice (mode, reason, chain-steps, threshold; when compiled also ``compile_seconds`` and
        the ``fallback`` reason). ``compile_energy = True``, or a
        :class:`~ncpvae.mcmc.fastpath.CompiledEnergy` as the energy, is the compiled mode.
        Results are reproducible per mode; compiled chains follow the eager ones to float32
        rounding only.

        ``shards`` (under torchrun, the run's :class:`~ncpvae.ShardGroup`; every rank calls
        ``run`` with the same arguments): when the sampler's chains can be split
        (:attr:`shardable_chains`, ``keep_info = "full"``, at least one chain per rank), rank
        ``r`` runs its contiguous block of the chains with the one-process noise rows of those
        chains, and the draws and infos are all-gathered in chain order before the diagnostics:
        the result equals one process's, on every rank. Otherwise every rank runs all chains.

        ``callback(step, state, info)`` runs after each step (on a rank's block of the chains
        in a split run); ``progress`` shows a tqdm bar; ``options`` are forwarded to ``init``
        and ``step`` (names in ``run_options``).
        """
        settings = RunSettings(num_steps, burn_in, thin, keep_info, diagnose, check_every,
                               fast_linear, compile_energy, fast_path, options)
        self._check_settings(settings)
        check_positions(init_position)
        check_generator(generator, init_position)
        chains = int(init_position.shape[0])
        # decided on all chains (not a rank's block), so every rank of a split run agrees
        explicit = compile_energy or isinstance(energy, CompiledEnergy)
        choice = choose_fast_path("compiled" if explicit else fast_path, chains, num_steps,
                                  auto_compile=self.auto_compile)
        # compile_energy keeps its meaning (fast_linear only when asked); fast_path's compiled
        # mode adds the oneDNN kernels where the CPU has them (the fastest compiled path)
        energy = prepare_energy(energy, compile_energy=choice.compiles, fast_linear=fast_linear
                                or (choice.compiles and not explicit
                                    and init_position.device.type == "cpu"
                                    and onednn_available()))
        if not self._splits(settings, shards, chains):
            shards = ONE_PROCESS
        with shards.rows(chains) as (offset, rows):
            draws = self._run_block(energy, shards.shard(init_position), settings, generator,
                                    callback, progress)
        # the chains of every rank, in chain order (a no-op in one process)
        samples = shards.all_gather_rows(draws.samples, dim=1)
        info = {key: shards.all_gather_rows(value, dim=1)
                if value.ndim >= 2 and value.shape[1] == rows else value
                for key, value in draws.info.items()}
        wall = max(shards.all_gather_object(draws.wall))
        summary = draws.summary if draws.summary is not None else _summarize_full_info(
            info, settings.burn_in)
        diagnostics = self._diagnostics(samples, summary, settings, chains, wall)
        diagnostics["fast_path"] = choice.record(energy)
        return SampleResult(samples, info, diagnostics)

    def sample_prior(self, prior, num_samples: int, *, generator: torch.Generator | None = None,
                     progress: bool = False, shards: ShardGroup = ONE_PROCESS) -> SampleResult:
        """Draw ``num_samples`` latents from ``prior`` with this sampler.

        MCMC samplers start ``num_samples`` chains at ``prior.base_prior.sample(...)`` and run
        ``config.num_steps`` steps (``config.burn_in``, ``config.thin``) on ``prior.energy``;
        ``result.samples[-1]`` are the final states ``(num_samples, D)``. ``shards``: as in
        :meth:`run` (every rank draws all starting points, then runs its block of the chains);
        a sampler that overrides this method accepts ``shards`` and may ignore it (every rank
        then draws everything).
        """
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ConfigError(f"num_samples must be a positive integer, got {num_samples!r}")
        cfg = self.config
        if not hasattr(cfg, "num_steps"):
            raise ConfigError(f"the {self.name} sampler has no num_steps setting; use run()")
        start = prior.base_prior.sample(num_samples, generator=generator).detach()
        with frozen_parameters(prior):
            return self.run(prior.energy, start, cfg.num_steps,
                            burn_in=getattr(cfg, "burn_in", 0), thin=getattr(cfg, "thin", 1),
                            generator=generator, progress=progress, shards=shards,
                            **self.fast_paths())

    # -- the steps of run() --------------------------------------------------------------------

    def _check_settings(self, settings: RunSettings) -> None:
        """Refuse run options this sampler does not take, and settings it cannot run with."""
        unknown = set(settings.options) - set(self.run_options)
        if unknown:
            allowed = ", ".join(sorted(self.run_options)) or "none"
            raise ConfigError(
                f"{self.name} sampler: unknown run option(s) {', '.join(sorted(unknown))}; "
                f"allowed: {allowed}"
            )
        self.check_run(settings.num_steps, settings.burn_in, settings.thin)

    def _splits(self, settings: RunSettings, shards: ShardGroup, chains: int) -> bool:
        """Whether a run with these settings splits its ``chains`` over ``shards``."""
        return (shards.world_size > 1 and self.shardable_chains
                and settings.keep_info == "full" and chains >= shards.world_size)

    def _run_block(self, energy: Energy, position: Tensor, settings: RunSettings,
                   generator: torch.Generator | None, callback: Callback | None,
                   progress: bool) -> _Draws:
        """Run the chains at ``position`` ``(C, D)``: the kept draws, the per-step infos and
        the wall time of the loop (this process's chains only)."""
        recorder = _Recorder(settings)
        callbacks = [recorder] if callback is None else [recorder, callback]
        device = position.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        state = self._loop(energy, position, settings, generator, callbacks, progress)
        if device.type == "cuda":  # kernels run asynchronously: time them all
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
        return recorder.finish(state, wall)

    def _loop(self, energy: Energy, position: Tensor, settings: RunSettings,
              generator: torch.Generator | None, callbacks: list[Callback],
              progress: bool) -> NamedTuple:
        """``init``, then steps ``1..num_steps``: ``step``, ``adapt`` during burn-in, then each
        of ``callbacks(t, state, info)`` in order; raises the first divergence (checked every
        ``check_every`` steps). Returns the final state."""
        num_steps, burn_in = settings.num_steps, settings.burn_in
        check_every = settings.check_every
        if check_every is None:
            check_every = 1 if position.device.type == "cpu" else 100
        steps: Any = range(1, num_steps + 1)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc=f"{self.name} sampling", unit="step")
        options = settings.options
        with contextlib.ExitStack() as stack:
            state = self.init(position, energy, **options)
            log = stack.enter_context(deferred_divergence()) if check_every > 1 else None
            for t in steps:
                if log is not None:
                    log.step = t
                try:
                    state, info = self.step(state, energy, generator=generator, **options)
                except NonFiniteError as exc:
                    raise NonFiniteError(
                        f"{self.name} sampler, step {t} of {num_steps}: {exc}") from None
                if t <= burn_in:
                    state = self.adapt(state, info, iteration=t, num_adapt=burn_in)
                for callback in callbacks:
                    callback(t, state, info)
                if log is not None and (t % check_every == 0 or t == num_steps):
                    bad = log.first_divergence()
                    if bad is not None:
                        raise NonFiniteError(
                            f"{self.name} sampler, step {bad[0]} of {num_steps}: {bad[1]}")
        return state

    def _diagnostics(self, samples: Tensor, summary: dict[str, Any], settings: RunSettings,
                     chains: int, wall: float) -> dict[str, Any]:
        """The run's diagnostics (see :meth:`run`) from the kept draws ``(S, C, D)`` of all
        ``chains``, the run-level numbers of the infos and the loop's wall time."""
        diagnostics = summarize(samples) if settings.diagnose else {
            "num_draws": int(samples.shape[0]), "num_chains": int(samples.shape[1])}
        num_steps = settings.num_steps
        diagnostics.update(
            sampler=self.name,
            num_steps=num_steps,
            burn_in=settings.burn_in,
            thin=settings.thin,
            num_nonfinite=summary.get("num_nonfinite", 0),
            wall_time_s=wall,
            chain_steps_per_s=(chains * num_steps / wall) if wall > 0 else float("nan"),
        )
        if "acceptance" in summary:
            diagnostics["acceptance"] = summary["acceptance"]
            diagnostics["acceptance_rate"] = diagnostics["acceptance"]["mean"]
        if "final_step_size" in summary:
            diagnostics["final_step_size"] = summary["final_step_size"]
        return diagnostics

    def fast_paths(self) -> dict[str, Any]:
        """The fast paths of :meth:`run` this sampler's config asks for (``fast_linear``,
        ``compile_energy``, ``fast_path``; False, False, ``"auto"`` when the config lacks
        them)."""
        cfg = self.config
        return {"fast_linear": bool(getattr(cfg, "fast_linear", False)),
                "compile_energy": bool(getattr(cfg, "compile_energy", False)),
                "fast_path": getattr(cfg, "fast_path", "auto")}


@contextlib.contextmanager
def frozen_parameters(module: Any) -> Iterator[None]:
    """Parameters of ``module`` (an ``nn.Module``; anything else is left alone) need no gradient
    while the context is open, restored after: sampling differentiates the energy in the
    positions only, and frozen weights are what the fast paths accept."""
    params = [p for p in module.parameters() if p.requires_grad] if isinstance(
        module, torch.nn.Module) else []
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


# ----------------------------------------------------------------------------------------------
# what a run keeps: the draws, and the per-step info stacked ("full") or streamed ("summary")


class _Draws(NamedTuple):
    """What one process's chains produced: kept draws ``(S, C, D)``, per-step infos, the
    run-level numbers of a streamed info (None when stacked: computed from ``info``) and the
    loop's wall time in seconds."""

    samples: Tensor
    info: dict[str, Tensor]
    summary: dict[str, Any] | None
    wall: float


class _Recorder:
    """A step callback of :meth:`Sampler._loop` that keeps the draws and the per-step infos.

    Each kept draw and each step's info is copied into a buffer allocated at the first step
    for the whole run (``(kept draws, C, D)``, ``(num_steps, C)`` per info field) instead of
    being kept as a tensor of its own and stacked at the end: one allocation per buffer, no
    second copy at the end, and no small long-lived tensors left between each step's freed
    temporaries. Kept per step, those had fragmented the heap: 1,024 chains of the benchmark
    MLP grew the process by ~0.5 MB (eager) to ~1.9 MB (compiled) a step for 54 kB of data.
    """

    def __init__(self, settings: RunSettings):
        self.settings = settings
        self.samples: Tensor | None = None
        self.next_draw = 0
        self.fields: tuple[str, ...] = ()
        self.info_buffers: list[Tensor] = []
        self.steps = 0
        self.stream = _InfoStream(settings.burn_in) if settings.keep_info == "summary" else None

    def __call__(self, t: int, state: NamedTuple, info: NamedTuple) -> None:
        if self.stream is not None:
            self.stream.add(t, info)
        else:
            if not self.info_buffers:
                self.fields = info._fields
                self.info_buffers = [value.new_empty((self.settings.num_steps, *value.shape))
                                     for value in info]
            for buffer, value in zip(self.info_buffers, info):
                buffer[self.steps].copy_(value)
            self.steps += 1
        if self.settings.keeps(t):
            position: Tensor = state.position  # type: ignore[attr-defined]
            if self.samples is None:
                self.samples = position.new_empty((self.settings.num_kept, *position.shape))
            self.samples[self.next_draw].copy_(position)
            self.next_draw += 1

    def finish(self, state: NamedTuple, wall: float) -> _Draws:
        """The draws (the final state alone when no step ran) and the infos."""
        samples = (state.position[None].clone()  # type: ignore[attr-defined]
                   if self.samples is None else self.samples[:self.next_draw])
        if self.stream is not None:
            info, summary = self.stream.finish()
            return _Draws(samples, info, summary, wall)
        info_dict = {name: buffer[:self.steps]
                     for name, buffer in zip(self.fields, self.info_buffers)}
        return _Draws(samples, info_dict, None, wall)


def _summarize_full_info(info: dict[str, Tensor], burn_in: int) -> dict[str, Any]:
    """The run-level numbers of stacked per-step infos ``(num_steps, C)``."""
    out: dict[str, Any] = {}
    if "nonfinite" in info:
        out["num_nonfinite"] = int(info["nonfinite"].sum())
    if "acceptance_rate" in info:
        out["acceptance"] = acceptance_summary(info["acceptance_rate"][burn_in:])
    if "step_size" in info:
        out["final_step_size"] = float(info["step_size"][-1].double().mean())
    return out


class _InfoStream:
    """Streams per-step infos: per-step chain means ``(num_steps,)`` and per-chain sums over
    the post-burn-in steps ``(C,)``, reduced in blocks of up to 64 steps and ``2^22`` chain-steps
    (a few ops per step, no host synchronisation, bounded memory)."""

    BLOCK = 64
    BLOCK_CHAIN_STEPS = 1 << 22

    def __init__(self, burn_in: int):
        self.burn_in = burn_in
        self.block: list[NamedTuple] = []
        self.block_start = 1
        self.block_size = self.BLOCK
        self.fields: tuple[str, ...] = ()
        self.step_means: dict[str, list[Tensor]] = {}
        self.post_sums: dict[str, Tensor] = {}
        self.post_steps = 0
        self.nonfinite = None
        self.last: NamedTuple | None = None

    def add(self, t: int, info: NamedTuple) -> None:
        if not self.block:
            self.block_start = t
            self.fields = info._fields
            chains = max(1, int(info[0].shape[0]) if info[0].ndim else 1)
            self.block_size = max(1, min(self.BLOCK, self.BLOCK_CHAIN_STEPS // chains))
        self.block.append(info)
        self.last = info
        if len(self.block) >= self.block_size or t == self.burn_in:
            self._flush()

    def _flush(self) -> None:
        if not self.block:
            return
        post = self.block_start > self.burn_in  # blocks never straddle the end of burn-in
        for field in self.fields:
            values = torch.stack([getattr(i, field) for i in self.block]).to(torch.float64)
            self.step_means.setdefault(field, []).append(values.mean(1))
            if post:
                total = values.sum(0)
                prev = self.post_sums.get(field)
                self.post_sums[field] = total if prev is None else prev + total
            if field == "nonfinite":
                count = values.sum()
                self.nonfinite = count if self.nonfinite is None else self.nonfinite + count
        if post:
            self.post_steps += len(self.block)
        self.block = []

    def finish(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        self._flush()
        info = {f: torch.cat(parts) for f, parts in self.step_means.items()}
        for field, total in self.post_sums.items():
            info[f"{field}_chain_mean"] = total / max(self.post_steps, 1)
        out: dict[str, Any] = {}
        if self.nonfinite is not None:
            out["num_nonfinite"] = int(self.nonfinite)
        if "acceptance_rate" in self.post_sums and self.last is not None:
            per_chain = info["acceptance_rate_chain_mean"]
            out["acceptance"] = {
                "mean": float(per_chain.mean()),
                "chain_min": float(per_chain.min()),
                "chain_max": float(per_chain.max()),
                "last": float(self.last.acceptance_rate.double().mean()),
            }
        if self.last is not None and "step_size" in self.fields:
            out["final_step_size"] = float(self.last.step_size.double().mean())
        return info, out
