"""The stages of a run and the loop that runs them into a fresh run directory.

A stage is a function ``Run -> plain-data summary``; each can be re-run alone on an existing
run directory (reopened with :func:`~ncpvae.run.build.open_run`):

1. :func:`~ncpvae.run.train.train_vae` — train the model with the objective against the
   prior's tractable base (``ncpvae train``)
2. :func:`~ncpvae.run.fit.fit_prior` — fit a :class:`~ncpvae.LearnedPrior` with the VAE frozen
   (``ncpvae fit-prior``)
3. :func:`~ncpvae.run.sample.sample_stage` — decode samples of the base prior, the learned prior
   and the sampler

The evaluation stage (:func:`ncpvae.evaluation.pipeline.evaluate_stage`) builds on this package
and is appended by the orchestrator (:mod:`ncpvae.experiment`), never imported here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ncpvae.config import RunConfig
from ncpvae.plugin_manager import PluginManager
from ncpvae.run.build import Run, create_run
from ncpvae.run.fit import fit_prior
from ncpvae.run.sample import sample_stage
from ncpvae.run.train import train_vae

Stage = Callable[[Run], Any]

#: train, fit, sample: every stage of this package, in order
TRAINING_STAGES: tuple[Stage, ...] = (train_vae, fit_prior, sample_stage)


def run_stages(config: RunConfig, stages: Sequence[Stage], out: str | Path | None = None, *,
               overwrite: bool = False, quiet: bool = False,
               manager: PluginManager | None = None) -> Path:
    """Create the run directory ``out`` (default ``runs/<config.name>``), build the run and run
    ``stages`` on it in order; return the directory's path.

    Under ``torchrun`` the stages of this package run on every rank (each shards its work);
    any other stage (the evaluation) runs on rank 0 alone while the others wait."""
    run = create_run(config, out, overwrite=overwrite, quiet=quiet, manager=manager)
    for stage in stages:
        if stage in TRAINING_STAGES or not run.dist.active:
            stage(run)
        else:
            run.dist.main_only(lambda stage=stage: stage(run))
    path = run.directory.path if run.directory is not None else None
    return Path(run.dist.broadcast_object(path))
