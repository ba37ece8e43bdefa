"""Building a run: its components from a validated config, a fresh run directory, or an existing
one reopened with its weights; and the encoder passes every stage shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ncpvae.component import BuildContext
from ncpvae.config import RunConfig, config_to_toml, load_config
from ncpvae.data import DataBundle, ImageSource
from ncpvae.errors import ConfigError, DataError
from ncpvae.factory import build_component
from ncpvae.io import write_json
from ncpvae.logging_backends import LoggerSet
from ncpvae.model import LatentModel, reparameterize
from ncpvae.modes import eval_mode
from ncpvae.objective import Objective
from ncpvae.plugin_manager import PluginManager, get_plugin_manager
from ncpvae.prior import Prior
from ncpvae.registry import Registry
from ncpvae.run import distributed, progress, seeds
from ncpvae.run.checkpoint import CheckpointWriter, load_checkpoint
from ncpvae.run.directory import RunDirectory
from ncpvae.sampler import Sampler


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


@dataclass
class Run:
    """The components of one run, built from its config."""

    config: RunConfig
    registry: Registry
    device: torch.device
    data: DataBundle
    model: LatentModel
    prior: Prior
    objective: Objective
    sampler: Sampler | None
    directory: RunDirectory | None = None  # None on ranks > 0 of a distributed run: no writes
    quiet: bool = False
    #: this process's place in a ``torchrun`` launch (world size 1 without one)
    dist: distributed.DistContext = field(default_factory=distributed.DistContext)
    #: the checkpoint an interrupted run continues from (``ncpvae resume``), else None
    resume_from: dict[str, Any] | None = None
    #: the ``[log] backends`` trackers, fed by :meth:`log` (the writing process only)
    loggers: LoggerSet = field(default_factory=LoggerSet)
    _checkpoints: CheckpointWriter | None = field(default=None, init=False, repr=False)

    @property
    def checkpoints(self) -> CheckpointWriter:
        """The writer of this run's checkpoint.pt (the writing process only): every write of a
        run goes through it, so each keeps what the one before stored without re-reading it."""
        if self.directory is None:
            raise RuntimeError("this process writes no checkpoint (a rank > 0 under torchrun)")
        if self._checkpoints is None or self._checkpoints.path != self.directory.checkpoint:
            self._checkpoints = CheckpointWriter(self.directory.checkpoint)
        return self._checkpoints

    def generator(self, offset: int) -> torch.Generator:
        """A fresh generator for one stage, seeded from the run seed and a named offset of
        :mod:`ncpvae.run.seeds` (stages are independent)."""
        return torch.Generator(device=self.device).manual_seed(
            seeds.torch_seed(self.config.seed, offset))

    @property
    def is_writer(self) -> bool:
        """Whether this process writes the run's files and prints its report: the only
        process, or rank 0 of a torchrun launch (:attr:`DistContext.is_writer`), when the run
        has a directory (a run built without one writes nothing). When True, ``directory`` is
        set."""
        return self.dist.is_writer and self.directory is not None

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` to metrics.jsonl and pass it on to the loggers (writer only)."""
        if self.is_writer:
            self.directory.log(record)
            self.loggers.log(self.directory.path, record)

    def build_context(self) -> BuildContext:
        """The context components of this run are built with (e.g. an evaluation's samplers)."""
        return BuildContext(latent_dim=self.config.latent_dim, device=self.device,
                            seed=self.config.seed, registry=self.registry)

    def build_sampler(self, config: Any) -> Sampler:
        """A sampler from a validated ``[sampler]``-style section."""
        return build_component(config, "sampler", self.build_context())  # type: ignore[return-value]


def build_run(config: RunConfig, *, registry: Registry | None = None,
              directory: RunDirectory | None = None, quiet: bool = False) -> Run:
    """Build every component of ``config`` (data first: models need its image shape).

    Under ``torchrun`` this joins the process group (:func:`ncpvae.run.distributed.setup`),
    builds on every rank, and stops every rank with the same error if any rank failed; ranks
    > 0 get no run directory (they write nothing) and no progress bars."""
    registry = registry if registry is not None else get_plugin_manager().registry
    dist = distributed.setup(config.device)

    def build() -> Run:
        device = dist.device
        torch.manual_seed(config.seed)
        ctx = BuildContext(latent_dim=config.latent_dim, device=device, seed=config.seed,
                           registry=registry)
        data = build_component(config.data, "dataset", ctx).build(ctx)
        ctx.image_shape = data.image_shape
        model, prior, objective, sampler = build_parts(config, ctx)
        # built on every rank (a missing extra fails everywhere, before any file is written)
        loggers = LoggerSet([build_component(c, "logger", ctx) for c in config.log.backends],
                            config.model_dump(mode="json"))
        return Run(config, registry, device, data, model, prior, objective, sampler,
                   directory if dist.is_main else None, quiet or not dist.is_main, dist,
                   loggers=loggers)

    return dist.agree(build)


def build_parts(config: RunConfig, ctx: BuildContext
                ) -> tuple[LatentModel, Prior, Objective, Sampler | None]:
    """The model, prior, objective and sampler of ``config`` (``ctx.image_shape`` set: the
    data's, or an exported run's record of it), checked to fit together, the prior bound to
    the model. Parameters are initialised from the global RNG, in this order."""
    model = build_component(config.model, "model", ctx)
    if config.train.channels_last:  # before any checkpoint is loaded: copies keep the layout
        model = model.to(memory_format=torch.channels_last)
    prior = build_component(config.prior, "prior", ctx)
    objective = build_component(config.objective, "objective", ctx)
    sampler = build_component(config.sampler, "sampler", ctx) if config.sampler else None
    objective.check_compatible(model, prior.base_prior)
    prior.bind_model(model)
    return model, prior, objective, sampler  # type: ignore[return-value]


def plugin_records(manager: PluginManager) -> list[dict[str, Any]]:
    """What plugins.json holds: each loaded plugin's name, source, version and components."""
    return [{"name": p.name, "source": p.source, "version": p.version,
             "components": [f"{kind}:{name}" for kind, name in p.components]}
            for p in manager.plugins]


def create_run(config: RunConfig, out: str | Path | None = None, *, overwrite: bool = False,
               quiet: bool = False, manager: PluginManager | None = None) -> Run:
    """A fresh run directory ``out`` (default ``runs/<config.name>``) holding the resolved config
    and the plugin list, and the run built from ``config``.

    Everything is built and checked first (config, data, every component); only then is an old
    run in ``out`` replaced (with ``overwrite``), so a mistake never costs the previous run."""
    manager = manager if manager is not None else get_plugin_manager()
    path = Path(out) if out is not None else Path("runs") / config.name
    dist = distributed.setup(config.device)
    dist.agree(lambda: progress.check_new(path, overwrite=overwrite) if dist.is_main else None)
    run = build_run(config, registry=manager.registry, quiet=quiet)

    def make_directory() -> RunDirectory | None:
        if not dist.is_main:  # only rank 0 writes
            return None
        directory = RunDirectory.create(path)  # checked above, before anything was built
        directory.write_config(config_to_toml(config))
        write_json(directory.plugins, plugin_records(manager))
        return directory

    run.directory = dist.agree(make_directory)
    return run


def open_run(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *,
             registry: Registry | None = None, quiet: bool = False,
             fresh_prior: bool = False) -> Run:
    """Rebuild a run from its directory (its saved config plus ``overrides``) and load weights.

    ``fresh_prior``: the prior as :func:`build_run` initialises it (the state a run's fit stage
    starts from, seeded from the run's seed), keeping from the checkpoint only the weights of
    the part the VAE trained with (``base_prior``, e.g. a VampPrior's pseudo-inputs): a refit
    then starts fresh instead of continuing the last fit."""
    directory = RunDirectory.open(path)
    config = load_config(directory.config, overrides, registry)
    run = build_run(config, registry=registry, directory=directory, quiet=quiet)
    initial = _state_copy(run.prior) if fresh_prior else None

    def load() -> None:
        try:
            load_checkpoint(directory.checkpoint, run.model, run.prior)
        except RuntimeError as exc:  # load_state_dict: the weights do not fit this config
            raise DataError(mismatch_message(directory, config, registry, exc)) from None
        if initial is not None:
            trained = _state_copy(run.prior.base_prior)  # what VAE training set
            run.prior.load_state_dict(initial)
            run.prior.base_prior.load_state_dict(trained)

    run.dist.agree(load)
    return run


def _state_copy(module: torch.nn.Module) -> dict[str, Tensor]:
    """A detached copy of ``module``'s state dict (later in-place updates do not reach it)."""
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


#: config fields that fix the shapes of the saved weights
_SHAPE_FIELDS = ("latent_dim", "model", "data", "prior")


def mismatch_message(directory: RunDirectory, config: RunConfig, registry: Registry | None,
                     exc: Exception) -> str:
    """One line naming the config field(s) that make the checkpoint's weights not fit."""
    saved = load_config(directory.config, (), registry).model_dump(mode="json")
    current = config.model_dump(mode="json")
    changed = []
    for key in _SHAPE_FIELDS:
        before, after = saved.get(key), current.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            changed += [f"{key}.{k} is {after.get(k)!r} here but {before.get(k)!r} in the run"
                        for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
        elif before != after:
            changed.append(f"{key} is {after!r} here but {before!r} in the run")
    if changed:
        return (f"checkpoint '{directory.checkpoint}' does not match the config: "
                f"{'; '.join(changed)}; drop the override (the weights were trained with the "
                "run's own config)")
    first = " ".join(str(exc).split())[:200]
    return (f"checkpoint '{directory.checkpoint}' does not match the run's model ({first}); "
            "the checkpoint was written by another config")


# ---------------------------------------------------------------------------------------------
# the encoder passes


@torch.no_grad()
def encode_source(model: LatentModel, source: ImageSource, device: torch.device, *,
                  limit: int | None = None, batch_size: int = 512) -> tuple[Tensor, Tensor]:
    """Encoder outputs ``(mu, logvar)``, each ``(N, D)``, for the first ``limit`` images (eval
    mode, no grad; the model's training flag is restored)."""
    n = len(source) if limit is None else min(limit, len(source))
    mus, logvars = [], []
    with eval_mode(model):
        for index in torch.arange(n).split(batch_size):
            mu, logvar = model.encode(source.get_batch(index).to(device))
            mus.append(mu)
            logvars.append(logvar)
    return torch.cat(mus), torch.cat(logvars)


def heldout_latents(run: Run, n: int, generator: torch.Generator, *,
                    batch_size: int = 512) -> Tensor:
    """Fresh draws ``z ~ q(z|x)`` ``(n, D)`` for the first ``n`` held-out (test) images."""
    mu, logvar = encode_source(run.model, run.data.test, run.device, limit=n,
                               batch_size=batch_size)
    return reparameterize(mu, logvar, generator=generator)
