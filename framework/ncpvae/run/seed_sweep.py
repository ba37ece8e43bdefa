"""``ncpvae train CONFIG --seeds 0,1,2``: the same pipeline once per seed, into sibling runs.

Seed ``s`` of a sweep based at ``BASE`` (``--out BASE``, default ``runs/<name>``) is an ordinary
run directory ``BASE-seed<s>`` (:func:`seed_directory`) whose config is the sweep's config with
``seed = s``: it can be resumed, refitted and evaluated like any run, and seed ``s`` of a sweep
gives the numbers of ``ncpvae train CONFIG --set seed=s`` bit for bit. The aggregate over seeds
goes to ``BASE-seeds`` (:func:`aggregate_directory`; written by
:mod:`ncpvae.evaluation.aggregate`).

A sweep started again with the same command continues where it stopped (:func:`plan_seeds`):
a finished seed is skipped, an unfinished one resumed, a missing one trained; a seed directory
holding a run of another config is refused (``--overwrite`` replaces every seed's run). Under
``torchrun`` rank 0 makes the plan (and alone writes, as in any run) and every rank follows it.

This module runs stages it is given (:func:`run_seeds`); the default list, evaluation included,
is :data:`ncpvae.experiment.DEFAULT_STAGES` (``run`` never imports the evaluation).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ncpvae.config import RunConfig, load_config
from ncpvae.errors import ConfigError, NcpvaeError
from ncpvae.plugin_manager import PluginManager, get_plugin_manager
from ncpvae.run import distributed, progress
from ncpvae.run.directory import RunDirectory
from ncpvae.run.stages import Stage, resume_stages, run_stages

__all__ = ["SeedRun", "aggregate_directory", "config_differences", "parse_seeds", "plan_seeds",
           "run_seeds", "seed_directory", "sweep_base", "with_seed"]

_ITEM = re.compile(r"(\d+)(?:-(\d+))?")
_SEEDS_HELP = "expected non-negative integers and ranges such as 0,1,2 or 0-2"


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"``, ``"0-2"`` or ``"0-2,7"`` -> the seeds in the order given; a
    :class:`ConfigError` (one line) for anything else: an empty item, a negative or non-integer
    seed, a decreasing range, a seed named twice."""
    seeds: list[int] = []
    for item in text.split(","):
        match = _ITEM.fullmatch(item.strip())
        if match is None:
            raise ConfigError(f"{item.strip()!r} is not a seed or a range; {_SEEDS_HELP}")
        low = int(match[1])
        high = int(match[2]) if match[2] is not None else low
        if high < low:
            raise ConfigError(f"the range {item.strip()!r} decreases; write it as {high}-{low}")
        seeds += range(low, high + 1)
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ConfigError(f"{text!r} names seed {repeated[0]} twice; each seed is one run")
    return seeds


def seed_directory(base: str | Path, seed: int) -> Path:
    """The run directory of seed ``seed`` of the sweep based at ``base``: ``<base>-seed<seed>``."""
    base = Path(base)
    return base.with_name(f"{base.name}-seed{seed}")


def sweep_base(run: str | Path) -> Path | None:
    """``X`` for a seed directory ``X-seed<s>`` (:func:`seed_directory`), else None."""
    run = Path(run)
    match = re.fullmatch(r"(.+)-seed\d+", run.name)
    return run.with_name(match[1]) if match else None


def aggregate_directory(base: str | Path) -> Path:
    """Where the sweep based at ``base`` writes its aggregate: ``<base>-seeds``."""
    base = Path(base)
    return base.with_name(f"{base.name}-seeds")


def with_seed(config: RunConfig, seed: int) -> RunConfig:
    """``config`` with ``seed = seed`` and nothing else changed."""
    return config.model_copy(update={"seed": seed})


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif value is not None:  # TOML has no null: an omitted key is None
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(a: Mapping[str, Any], b: Mapping[str, Any], *,
                       ignore: Sequence[str] = ()) -> list[tuple[str, Any, Any]]:
    """``(dotted key, value in a, value in b)`` for every key whose value differs between the
    plain-data configs ``a`` and ``b`` (a missing key counts as None), except those in
    ``ignore``; sorted by key."""
    fa, fb = _flatten(a), _flatten(b)
    return [(key, fa.get(key), fb.get(key)) for key in sorted(set(fa) | set(fb))
            if key not in ignore and fa.get(key) != fb.get(key)]


Action = Literal["train", "resume", "skip"]


@dataclass(frozen=True)
class SeedRun:
    """One seed of a sweep: its run directory and what the sweep does there (``train`` a new
    run, ``resume`` an unfinished one, ``skip`` a finished one)."""

    seed: int
    path: Path
    action: Action


def _action(config: RunConfig, path: Path, overwrite: bool, registry: Any) -> Action:
    directory = RunDirectory(path)
    if path.exists() and not path.is_dir():
        raise NcpvaeError(f"'{path}' is a file, not a directory; choose another --out")
    if overwrite or not directory.is_run():
        return "train"
    if not directory.config.is_file():
        raise NcpvaeError(f"'{path}' holds part of a run without config.toml; pass --overwrite "
                          "to replace it or --out to choose another directory")
    saved = load_config(directory.config, (), registry).model_dump(mode="json")
    changed = config_differences(saved, config.model_dump(mode="json"))
    if changed:
        what = "; ".join(f"{k} is {a!r} there, {b!r} here" for k, a, b in changed[:3])
        raise NcpvaeError(f"'{path}' holds a run of another config ({what}); pass --overwrite "
                          "to replace every seed's run or --out to choose another directory")
    return "resume" if progress.is_unfinished(directory) else "skip"


def plan_seeds(config: RunConfig, seeds: Sequence[int], base: str | Path, *,
               overwrite: bool = False, registry: Any = None) -> list[SeedRun]:
    """What a sweep of ``config`` over ``seeds`` based at ``base`` does for each seed (nothing is
    changed). Raises :class:`NcpvaeError` for a seed directory that holds a run of another
    config (unless ``overwrite``) or is a file."""
    if not seeds:
        raise ConfigError("--seeds names no seed")
    plan = []
    for seed in seeds:
        path = seed_directory(base, seed)
        plan.append(SeedRun(seed, path, _action(with_seed(config, seed), path, overwrite,
                                                registry)))
    return plan


def run_seeds(config: RunConfig, seeds: Sequence[int], base: str | Path,
              stages: Sequence[Stage], *, overwrite: bool = False, quiet: bool = False,
              manager: PluginManager | None = None, command: str | None = None,
              on_seed: Callable[[SeedRun], None] | None = None) -> list[Path]:
    """Run ``stages`` once per seed into :func:`seed_directory` (train, resume or skip: see
    :func:`plan_seeds`); return every seed's run directory, in the order of ``seeds``.

    The writing process holds each seed's writer lock (:mod:`ncpvae.run.lock`, naming
    ``command``) while it works on that seed. ``on_seed(seed_run)`` is called after each seed
    (skipped ones too), e.g. to print its summary."""
    manager = manager if manager is not None else get_plugin_manager()
    dist = distributed.setup(config.device)
    # rank 0 reads the directories, before any rank writes one; every rank follows its plan
    plan = dist.main_only(lambda: plan_seeds(config, seeds, base, overwrite=overwrite,
                                             registry=manager.registry))
    plan = dist.broadcast_object(plan)
    for item in plan:
        with _lock(item.path, command):
            if item.action == "train":
                run_stages(with_seed(config, item.seed), stages, item.path,
                           overwrite=overwrite, quiet=quiet, manager=manager)
            elif item.action == "resume":
                resume_stages(item.path, stages, quiet=quiet, manager=manager)
        if on_seed is not None:
            on_seed(item)
    return [item.path for item in plan]


def _lock(path: Path, command: str | None) -> contextlib.AbstractContextManager:
    """The seed directory's writer lock, held by the writing process alone (rank 0)."""
    if distributed.env_rank() != 0:
        return contextlib.nullcontext()
    from ncpvae.run.lock import hold

    return hold(path, command=command, create=True)
