"""Stage 2: fit a learned prior to the frozen VAE's aggregate posterior, and the learned-prior
summary (``log Z`` and the gain ``Delta`` over the base prior, with SEs) that the fit stage and
the evaluation both report."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ncpvae import plots
from ncpvae.prior import LearnedPrior, Prior
from ncpvae.run import directory as files
from ncpvae.run import hooks, seeds
from ncpvae.run.build import Run, encode_source, heldout_latents


def learned_prior_summary(prior: Prior, heldout: Tensor, generator: torch.Generator, *,
                          num_samples: int | None = None) -> dict[str, Any]:
    """``log Z`` and ``Delta = E_q[log_ratio] - log Z`` with their SEs for a
    :class:`~ncpvae.LearnedPrior` ({} for any other prior), from one ``log Z`` estimate.

    ``heldout`` are draws ``z ~ q(z|x)`` ``(N, D)`` of held-out images; ``generator`` (fresh,
    seeded) draws the ``num_samples`` base samples of ``log Z`` (None: the prior's own default),
    which ``kl_gain`` is given rather than estimating it again. Plain numbers: ``log_z``,
    ``log_z_se``, ``log_z_samples``, ``delta``, ``delta_se``, ``num_encodings``, and the
    gain's parts where the prior has them (:meth:`~ncpvae.LearnedPrior.gain_parts`: a
    hierarchical prior's ``group_delta`` and ``group_delta_se``).
    """
    if not isinstance(prior, LearnedPrior):
        return {}
    with torch.no_grad():
        log_z = prior.log_normalizer(num_samples, generator=generator)
        delta, delta_se = prior.kl_gain(heldout, num_samples=num_samples, log_normalizer=log_z)
    return {"log_z": float(log_z[0]), "log_z_se": float(log_z[1]),
            "log_z_samples": num_samples, "delta": float(delta), "delta_se": float(delta_se),
            "num_encodings": int(heldout.shape[0]), **prior.gain_parts()}


def fit_learned_prior(run: Run) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Fit ``run.prior`` (a :class:`~ncpvae.LearnedPrior`) to the frozen VAE's aggregate
    posterior; return its summary (the prior's own fit numbers, then ``log Z`` and ``Delta``)
    and the fit's records (each also logged to metrics.jsonl).

    Under torchrun every rank encodes the whole training set and calls ``fit`` with the same
    seeded generator; a prior with ``shardable_fit`` (ncp, flow, ebm) gets ``shards`` and splits
    each minibatch's forward/backward (the ebm also its Langevin chains) over the ranks with
    summed gradients (see :mod:`ncpvae.fitting`); any other (gmm's EM) repeats the whole fit on
    every rank. The learned-prior summary (``log Z``, ``Delta``) is computed whole on every
    rank."""
    prior = run.prior
    assert isinstance(prior, LearnedPrior)
    mu, logvar = encode_source(run.model, run.data.train, run.device)  # the frozen VAE's q(z|x)
    history: list[dict[str, Any]] = []

    def log(record: dict[str, Any]) -> None:
        history.append(record)
        run.log({"stage": "fit_prior", **record})

    # under torchrun a prior that can (``shardable_fit``) splits its minibatches over the ranks
    sharded = {"shards": run.dist.shards} if prior.shardable_fit else {}
    summary = dict(prior.fit(mu, logvar, generator=run.generator(seeds.PRIOR_FIT),
                             progress=not run.quiet, log=log, **sharded))
    heldout = heldout_latents(run, run.config.train.eval_size,
                              run.generator(seeds.FIT_HELDOUT))
    summary.update(learned_prior_summary(prior, heldout, run.generator(seeds.FIT_LOG_Z)))
    return summary, history


def write_fit_outputs(run: Run, summary: dict[str, Any], history: list[dict[str, Any]]) -> None:
    """The fit's section of summary.json and its plot (the writing process only)."""
    assert run.directory is not None
    run.directory.update_summary("prior_fit", summary)
    if history:
        plots.plot_fit_history(history, run.directory.plot(files.PLOT_PRIOR_FIT),
                               title=f"{run.prior.label} fit")


def fit_stage(run: Run) -> dict[str, Any]:
    """Stage 2 of the runner: fit ``run.prior`` (a :class:`~ncpvae.LearnedPrior`; nothing to do
    otherwise, see :func:`fit_learned_prior`) and write its summary and plot; the runner's
    checkpoint after the stage holds the fitted weights."""
    if not isinstance(run.prior, LearnedPrior):
        return {}
    summary, history = fit_learned_prior(run)
    hooks.boundary("fit")
    if run.is_writer:
        write_fit_outputs(run, summary, history)
    return summary


fit_stage.stage_name = "fit_prior"  # type: ignore[attr-defined]


def fit_prior(run: Run) -> dict[str, Any]:
    """:func:`fit_stage` for a run outside the runner (``ncpvae fit-prior``): the fitted weights
    are also written to the run's checkpoint (keeping the VAE's epoch, step and optimizer
    state). The fit goes on from the prior's weights as they are: ``ncpvae fit-prior`` opens
    the run with ``open_run(..., fresh_prior=True)`` (unless ``--continue``), so a refit starts
    from the initialisation the run's fit stage started from and repeats it exactly."""
    summary = fit_stage(run)
    if isinstance(run.prior, LearnedPrior) and run.is_writer:
        run.checkpoints.write(run.model, run.prior, "prior_fitted", keep_previous=True)
    return summary
