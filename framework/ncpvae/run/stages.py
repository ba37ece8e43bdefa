"""The stages of a run and the loop that runs them into a fresh run directory.

A stage is a function ``Run -> plain-data summary``; each can be re-run alone on an existing
run directory (reopened with :func:`~ncpvae.run.build.open_run`):

1. :func:`~ncpvae.run.train.train_vae` — train the model with the objective against the
   prior's tractable base (``ncpvae train``)
2. :func:`~ncpvae.run.fit.fit_stage` — fit a :class:`~ncpvae.LearnedPrior` with the VAE frozen
   (:func:`~ncpvae.run.fit.fit_prior`, ``ncpvae fit-prior``, also writes its checkpoint)
3. :func:`~ncpvae.run.sample.sample_stage` — decode samples of the base prior, the learned prior
   and the sampler

The evaluation stage (:func:`ncpvae.evaluation.pipeline.evaluate_stage`) builds on this package
and is appended by the orchestrator (:mod:`ncpvae.experiment`), never imported here.

The runner writes each stage's results once: the stage's sections of summary.json together with
the progress (one write, :meth:`~ncpvae.run.directory.RunDirectory.summary_batch`), then one
checkpoint (:class:`~ncpvae.run.checkpoint.CheckpointWriter`); VAE training adds one checkpoint
per epoch. After each, :func:`ncpvae.run.hooks.boundary` lets tests act there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from ncpvae.config import RunConfig, load_config
from ncpvae.errors import NcpvaeError
from ncpvae.plugin_manager import PluginManager, get_plugin_manager
from ncpvae.run import distributed, hooks, progress, rng
from ncpvae.run.build import Run, build_run, create_run
from ncpvae.run.checkpoint import load_prior_state, read_checkpoint
from ncpvae.run.directory import RunDirectory
from ncpvae.run.fit import fit_prior, fit_stage
from ncpvae.run.sample import sample_stage
from ncpvae.run.train import train_vae

Stage = Callable[[Run], Any]

#: train, fit, sample: every stage of this package, in order
TRAINING_STAGES: tuple[Stage, ...] = (train_vae, fit_stage, sample_stage)
#: the stages that run on every rank under torchrun (each shards its work); ``fit_prior`` is
#: the fit stage that also writes its checkpoint (for stage lists that name it)
_ON_EVERY_RANK: tuple[Stage, ...] = (*TRAINING_STAGES, fit_prior)


def run_stages(config: RunConfig, stages: Sequence[Stage], out: str | Path | None = None, *,
               overwrite: bool = False, quiet: bool = False,
               manager: PluginManager | None = None) -> Path:
    """Create the run directory ``out`` (default ``runs/<config.name>``), build the run and run
    ``stages`` on it in order; return the directory's path.

    Under ``torchrun`` the stages of this package run on every rank (each shards its work);
    any other stage (the evaluation) runs on rank 0 alone while the others wait."""
    run = create_run(config, out, overwrite=overwrite, quiet=quiet, manager=manager)
    if run.is_writer:  # rank 0 of a torchrun launch, or the only process
        progress.write(run.directory, [progress.stage_name(s) for s in stages], [])
    return _run_remaining(run, stages, [])


def resume_stages(path: str | Path, stages: Sequence[Stage], *, quiet: bool = False,
                  manager: PluginManager | None = None) -> Path:
    """Continue the run in ``path`` from its last checkpoint: finish the stage it was in and run
    the ones after it. The numbers it ends with are those of a run never interrupted."""
    manager = manager if manager is not None else get_plugin_manager()
    directory = RunDirectory.open(path)
    if distributed.env_rank() == 0:  # under torchrun only rank 0 touches the run's files
        progress.clean_temp_files(directory.path)
    planned = [progress.stage_name(s) for s in stages]
    recorded = progress.read(directory)
    if recorded is not None and recorded.get("planned") not in (None, planned):
        raise NcpvaeError(f"'{directory.path}' was started with the stages "
                          f"{recorded.get('planned')}, not {planned}; it cannot be resumed here")
    if recorded is not None and recorded.get("finished"):
        raise NcpvaeError(f"'{directory.path}' is already finished (every stage completed); "
                          "nothing to resume")
    config = load_config(directory.config, (), manager.registry)
    run = build_run(config, registry=manager.registry, directory=directory, quiet=quiet)
    completed: list[str] = []
    if directory.checkpoint.is_file():
        state = read_checkpoint(directory.checkpoint)
        if run.is_writer:  # later writes keep what it holds, without a re-read
            run.checkpoints.last = state
        run.dist.agree(lambda: distributed.check_world_size(run.dist, state,
                                                            f"'{directory.checkpoint}'"))
        completed = [s for s in state.get("completed", []) if s in planned]
        run.model.load_state_dict(state["model"])
        # at a stage boundary, the prior as it was there (a fit killed after writing its own
        # checkpoint must start again from the unfitted prior: fits continue from the weights)
        load_prior_state(run.prior, state["boundary_prior"] if completed else state["prior"])
        if run.is_writer:
            progress.truncate_metrics(directory, int(state.get("metrics_lines", 0)))
        if completed:  # resume at a stage boundary: the RNG as the next stage would find it
            rng.restore(state["rng"], what=f"checkpoint '{directory.checkpoint}'")
        else:
            run.resume_from = state
    elif run.is_writer:  # killed before the first checkpoint: train again
        progress.truncate_metrics(directory, 0)
    if run.is_writer:
        progress.write(directory, planned, completed)
    return _run_remaining(run, stages, completed)


def _run_remaining(run: Run, stages: Sequence[Stage], completed: list[str]) -> Path:
    """Run the stages not in ``completed``; after each, its sections of summary.json together
    with the progress (one write), then a boundary checkpoint (weights, every RNG state, metrics
    length, completed stages), then the ``stage`` boundary of :mod:`ncpvae.run.hooks`.

    summary.json is written before the checkpoint: a run killed between the two has the
    stage's results on disk and resumes from the checkpoint before it, redoing the stage."""
    directory = run.directory  # None on ranks > 0 of a torchrun launch: they write nothing
    planned = [progress.stage_name(s) for s in stages]
    try:
        for stage, name in zip(stages, planned):
            if name in completed:
                continue
            with directory.summary_batch() if run.is_writer else nullcontext():
                _run_stage(run, stage)
                run.resume_from = None
                completed = [*completed, name]
                if run.is_writer:
                    progress.write(directory, planned, completed)
            if run.is_writer:
                _write_boundary(run, name, completed)
            hooks.boundary("stage")
    except KeyboardInterrupt:
        if not run.is_writer:
            raise
        raise RunInterrupted(directory) from None
    finish_loggers(run)
    path = directory.path if run.is_writer else None
    return Path(run.dist.broadcast_object(path))


def finish_loggers(run: Run) -> None:
    """The run's trackers get its figures and close (the writing process only): after the
    runner's last stage, and after a command that logged to them (``ncpvae fit-prior``)."""
    if run.is_writer:
        directory = run.directory
        run.loggers.finish(directory.path, sorted(directory.plots.glob("*.png")))


def _run_stage(run: Run, stage: Stage) -> None:
    """Run ``stage``: on every rank for the stages of this package, on rank 0 alone (the others
    waiting) for any other (the evaluation) under torchrun."""
    if stage in _ON_EVERY_RANK or not run.dist.active:
        stage(run)
    else:
        run.dist.main_only(lambda: stage(run))


def _write_boundary(run: Run, name: str, completed: list[str]) -> None:
    """The checkpoint after stage ``name``: what the stage before stored (the VAE's epoch, step
    and optimizer state), the weights, every RNG state as the next stage finds it, the metrics
    length, the completed stages and the prior as it is here (a stage that is redone after a
    kill starts from it)."""
    assert run.directory is not None
    run.checkpoints.write(run.model, run.prior, f"after_{name}", keep_previous=True,
                          completed=completed, rng=rng.capture(),
                          metrics_lines=progress.metrics_lines(run.directory),
                          boundary_prior=run.prior.state_dict())


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; its message names the last checkpoint and how to continue."""

    def __init__(self, directory: RunDirectory):
        where = "no checkpoint was written yet"
        if directory.checkpoint.is_file():
            try:
                state = read_checkpoint(directory.checkpoint)
                done = state.get("completed") or []
                at = (f"after stage {done[-1]}" if done
                      else f"after epoch {state.get('epoch')} of VAE training")
                where = f"the last checkpoint is '{directory.checkpoint}' ({at})"
            except NcpvaeError:
                where = f"the last checkpoint is '{directory.checkpoint}'"
        super().__init__(f"interrupted; {where}; continue with `ncpvae resume {directory.path}`")
