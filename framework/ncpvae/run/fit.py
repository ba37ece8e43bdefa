"""Stage 2: fit a learned prior to the frozen VAE's aggregate posterior, and the learned-prior
summary (``log Z`` and the gain ``Delta`` over the base prior, with SEs) that the fit stage and
the evaluation both report."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ncpvae import plots
from ncpvae.prior import LearnedPrior, Prior
from ncpvae.run import directory as files
from ncpvae.run import faults, seeds
from ncpvae.run.build import Run, encode_source, heldout_latents
from ncpvae.run.checkpoint import save_checkpoint


def learned_prior_summary(prior: Prior, heldout: Tensor,
                          log_z_generator: Callable[[], torch.Generator], *,
                          num_samples: int | None = None) -> dict[str, Any]:
    """``log Z`` and ``Delta = E_q[log_ratio] - log Z`` with their SEs for a
    :class:`~ncpvae.LearnedPrior` ({} for any other prior).

    ``heldout`` are draws ``z ~ q(z|x)`` ``(N, D)`` of held-out images; ``log_z_generator()``
    makes a fresh generator, called once for ``log_normalizer`` and once for ``kl_gain`` so that
    both use the same ``log Z`` estimate; ``num_samples`` base draws (None: the prior's own
    default). Plain numbers: ``log_z``, ``log_z_se``, ``log_z_samples``, ``delta``,
    ``delta_se``, ``num_encodings``.
    """
    if not isinstance(prior, LearnedPrior):
        return {}
    with torch.no_grad():
        log_z, log_z_se = prior.log_normalizer(num_samples, generator=log_z_generator())
        delta, delta_se = prior.kl_gain(heldout, num_samples=num_samples,
                                        generator=log_z_generator())
    return {"log_z": float(log_z), "log_z_se": float(log_z_se), "log_z_samples": num_samples,
            "delta": float(delta), "delta_se": float(delta_se),
            "num_encodings": int(heldout.shape[0])}


def fit_prior(run: Run) -> dict[str, Any]:
    """Stage 2: fit ``run.prior`` to the frozen VAE's aggregate posterior (for a
    :class:`~ncpvae.LearnedPrior`; nothing to do otherwise).

    Under torchrun every rank encodes the whole training set and calls ``fit`` with the same
    seeded generator; a prior with ``shardable_fit`` (ncp, flow, ebm) gets ``shards`` and splits
    each minibatch's forward/backward (the ebm also its Langevin chains) over the ranks with
    summed gradients (see :mod:`ncpvae.fitting`); any other (gmm's EM) repeats the whole fit on
    every rank. The learned-prior summary (``log Z``, ``Delta``) is computed whole on every
    rank."""
    prior = run.prior
    if not isinstance(prior, LearnedPrior):
        return {}
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
    summary.update(learned_prior_summary(prior, heldout,
                                         lambda: run.generator(seeds.FIT_LOG_Z)))
    if run.is_writer:
        save_checkpoint(run.directory.checkpoint, run.model, run.prior, "prior_fitted",
                        keep_previous=True)
        faults.boundary("fit")
        run.directory.update_summary("prior_fit", summary)
        if history:
            plots.plot_fit_history(history, run.directory.plot(files.PLOT_PRIOR_FIT),
                                   title=f"{prior.label} fit")
    return summary
