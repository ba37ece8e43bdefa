"""The whole experiment: the run's stages (:mod:`ncpvae.run`) followed by the evaluation
(:mod:`ncpvae.evaluation`). This module sits above both packages, so neither imports the other's
orchestration (``run`` never imports ``evaluation``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ncpvae.config import RunConfig
from ncpvae.evaluation.pipeline import evaluate_stage
from ncpvae.plugin_manager import PluginManager
from ncpvae.run.stages import TRAINING_STAGES, Stage, resume_stages, run_stages

#: what ``ncpvae train`` runs: train the VAE, fit the learned prior, sample, evaluate
DEFAULT_STAGES: tuple[Stage, ...] = (*TRAINING_STAGES, evaluate_stage)


def train(config: RunConfig, out: str | Path | None = None, *, overwrite: bool = False,
          quiet: bool = False, manager: PluginManager | None = None,
          stages: Sequence[Stage] | None = None) -> Path:
    """Run ``stages`` (default :data:`DEFAULT_STAGES`) into ``out`` (default
    ``runs/<config.name>``); return its path."""
    return run_stages(config, stages if stages is not None else DEFAULT_STAGES, out,
                      overwrite=overwrite, quiet=quiet, manager=manager)


def resume(path: str | Path, *, quiet: bool = False, manager: PluginManager | None = None,
           stages: Sequence[Stage] | None = None) -> Path:
    """Continue the interrupted run in ``path`` (``ncpvae resume``) and finish it."""
    return resume_stages(path, stages if stages is not None else DEFAULT_STAGES, quiet=quiet,
                         manager=manager)
