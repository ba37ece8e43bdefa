"""The ``ebm`` prior: a latent energy-based prior fitted by maximum likelihood (docs/priors.md §5).

The same tilted form as NCP, ``p(z) = b(z) exp f(z) / Z`` over a base ``b`` (N(0, I) by default;
Pang et al., NeurIPS 2020, "Learning Latent Space Energy-Based Prior Model"), but ``f`` is fitted
by maximum likelihood on the frozen VAE's aggregate posterior instead of by classification. The
log-likelihood gradient is

    grad E_q[log p(z)] = E_q[grad f(z)] - E_p[grad f(z)],

with the second expectation over negatives made by short-run Langevin dynamics on
``U(z) = -log b(z) - f(z)``, started from base draws (or from persistent chains, a fraction of
which restarts from the base each step). The chains run with the project's own ``langevin``
sampler (ULA, or MALA with ``metropolis = true``) through the Sampler API.

Everything after fitting is shared with NCP (:class:`ncpvae.tilted.TiltedPrior`):
``log_prob`` (unnormalized), ``energy``, the Monte Carlo ``log Z`` with its SE, the gain
``kl_gain`` and SIR sampling. Early stopping keeps the weights with the best held-out
log-likelihood gain ``E_q[f] - log Z`` (``log Z`` from ``heldout_log_z_samples`` base draws).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ncpvae import (
    BuildContext,
    ConfigError,
    EarlyStopping,
    EpochLosses,
    FitOptions,
    Prior,
    Sampler,
    create,
    hookimpl,
)
from ncpvae.prior_fitting import EpochFitConfig, heldout_draws, per_encoding
from ncpvae.tilted import (
    TiltedConfig,
    TiltedPrior,
    log_mean_exp,
    split_heldout,
)


class EBMPrior(TiltedPrior):
    """``p(z) = b(z) exp f(z) / Z`` with ``f`` fitted by MLE with Langevin negatives.

    ``base`` samples exactly; ``config`` (an :class:`EBMPrior.Config`, its defaults when None)
    holds every setting; ``energy_net`` maps ``(n, D) -> (n,)`` (``f``, the negative energy of
    the tilt; default: the config's MLP, initialized from ``seed``); ``sampler`` makes the
    negatives (default: the ``langevin`` sampler of the config's ``step_size`` and
    ``metropolis``, see :func:`negatives_sampler`).

    Data parallel under torchrun (``fit(..., shards=...)``): every rank makes all of the
    fit's draws; each runs its contiguous block of the negative chains (persistent chains
    included) with the one-process noise of those chains, evaluates ``f`` on its rows of the
    positives and negatives, and the gradients, logged losses and held-out values are summed
    over the ranks. The sampler must draw its per-chain noise through ``Sampler._randn``/
    ``_rand`` (the built-in ``langevin`` does; :mod:`ncpvae.sharding`) and treat chains
    independently.
    """

    name = "ebm"
    shardable_fit = True
    net_role = "energy network"

    class Config(TiltedConfig, EpochFitConfig):
        name: Literal["ebm"] = "ebm"
        epochs: int = Field(50, ge=1, le=100_000, description="maximum epochs (raised to reach "
                            "min_steps on small data)")
        min_steps: int = Field(1000, ge=0, le=10_000_000, description="optimizer steps at "
                               "least, whatever the data size (each makes langevin_steps "
                               "sampler steps; patience covers at least min_steps/4 steps)")
        batch_size: int = Field(256, ge=2, le=1_048_576, description="positives per step "
                                "(and as many negatives)")
        lr: float = Field(3e-4, gt=0, le=1.0, description="Adam learning rate")
        weight_decay: float = Field(0.0, ge=0, le=1.0, description="Adam weight decay")
        langevin_steps: int = Field(20, ge=1, le=10_000, description="Langevin steps per "
                                    "negative batch")
        step_size: float = Field(0.05, gt=0, description="Langevin step size eps (z' = z - eps "
                                 "grad U + sqrt(2 eps) xi)")
        metropolis: bool = Field(False, description="MALA instead of ULA for the negatives")
        persistent: bool = Field(False, description="persistent chains (PCD) instead of "
                                 "restarting every negative batch from the base")
        reinit_fraction: float = Field(0.05, ge=0, le=1, description="persistent chains: "
                                       "fraction restarted from the base before each batch")
        energy_l2: float = Field(0.0, ge=0, description="penalty alpha * mean(f^2) on positives "
                                 "and negatives (keeps f bounded; 0: off)")
        patience: int = Field(10, ge=1, description="stop after this many epochs without a "
                              "held-out gain higher by more than 2 paired SE")
        heldout_fraction: float = Field(0.1, gt=0, lt=0.5, description="fraction of the "
                                        "encodings held out for early stopping")
        heldout_log_z_samples: int = Field(20_000, ge=2, description="base draws for log Z in "
                                           "the per-epoch held-out gain (drawn once)")

    config: Config

    def __init__(self, base: Prior, config: Config | None = None, *,
                 energy_net: nn.Module | None = None, sampler: Sampler | None = None,
                 seed: int = 0, fitted: bool = False):
        super().__init__(base, config, net=energy_net, seed=seed, fitted=fitted)
        if sampler is None:
            sampler = negatives_sampler(self.config)
        if not isinstance(sampler, Sampler):
            raise ConfigError(f"ebm: sampler must be an ncpvae Sampler, got "
                              f"{type(sampler).__name__}")
        self.sampler = sampler

    @classmethod
    def from_config(cls, config: Config, ctx: BuildContext) -> EBMPrior:
        base = cls.build_base(config, ctx)
        return cls(base, config, sampler=negatives_sampler(config, ctx), seed=ctx.seed)

    @property
    def label(self) -> str:
        return "EBM" if self.base is self.base_prior else f"EBM over {self.base.label}"

    # ------------------------------------------------------------------------------------------
    # fitting

    def _tilted_energy(self, z: Tensor) -> Tensor:
        """``U(z) = -log b(z) - f(z)`` without the fitted check (used while fitting)."""
        return -self.base.log_prob(z) - self.logit(z)

    def negatives(self, start: Tensor, generator: torch.Generator | None) -> Tensor:
        """``langevin_steps`` sampler steps on the current energy from ``start`` ``(C, D)``;
        the network's parameters get no gradient from this.

        Inside a row block (:meth:`ncpvae.ShardGroup.rows`: ``start`` is a rank's block of
        the chains under torchrun) the sampler's per-chain noise is the one-process noise of
        those chains, so the block's chains are the one-process chains."""
        if not len(start):  # more ranks than chains: no chains here
            return start
        flags = [p.requires_grad for p in self.classifier.parameters()]
        for p in self.classifier.parameters():
            p.requires_grad_(False)
        try:
            state = self.sampler.init(start.detach(), self._tilted_energy)
            for _ in range(self.config.langevin_steps):
                state, _ = self.sampler.step(state, self._tilted_energy, generator=generator)
        finally:
            for p, flag in zip(self.classifier.parameters(), flags, strict=True):
                p.requires_grad_(flag)
        return state.position.detach()

    def _fit(self, mu: Tensor, logvar: Tensor, options: FitOptions) -> dict[str, Any]:
        """Maximum likelihood for ``f`` on draws of ``q(z|x)`` for ``mu``, ``logvar`` ``(N, D)``.

        A learned base is fitted first. A seeded ``heldout_fraction`` of rows is held out. Each
        epoch draws fresh positives for the training rows; for each minibatch of positives, as
        many negatives are made by ``langevin_steps`` Langevin steps (from base draws, or from
        the persistent chains) and Adam descends ``-mean f(pos) + mean f(neg)`` (plus
        ``energy_l2 * mean(f^2)``). After each epoch the held-out gain ``E_q[f] - log Z`` is
        measured on fixed draws (``heldout_samples`` of ``q`` over the held-out rows,
        ``heldout_log_z_samples`` of the base); the fit takes at least ``min_steps`` steps and
        stops after ``patience`` epochs without a gain higher by more than 2 paired SE
        (:class:`ncpvae.EarlyStopping`); the best weights are restored. ``log`` gets per
        epoch ``epoch``, ``train_loss_mean``,
        ``train_loss_min``, ``heldout_loss`` (minus the held-out gain), ``heldout_gain``.
        Returns ``best_epoch``, ``heldout_gain``, ``epochs_run``, ``steps_run``,
        ``min_epochs``, ``stopped_early``,
        ``fit_seconds``, ``num_train``, ``num_heldout`` (and ``base_fit``).
        """

        gen, cfg = options.generator, self.config
        base_summary = self.fit_base(mu, logvar, options)
        ref = self._param_like()
        device, dtype = ref.device, ref.dtype
        # the Langevin noise must come from a generator on the chains' device
        chain_gen = gen if gen.device == device else torch.Generator(device=device).manual_seed(
            int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device)))
        mu = mu.detach().to(device=device, dtype=dtype)
        logvar = logvar.detach().to(device=device, dtype=dtype)
        std = torch.exp(0.5 * logvar)
        held, train = split_heldout(len(mu), cfg.heldout_fraction, gen, device, "ebm")
        n_train = len(train)

        def draws(rows: Tensor) -> Tensor:
            eps = torch.randn(len(rows), self.latent_dim, generator=gen, device=gen.device,
                              dtype=dtype).to(device)
            return mu[rows] + std[rows] * eps

        z_ho = heldout_draws(mu[held], logvar[held], cfg.heldout_samples, gen)
        with torch.no_grad():
            z_base = self.base.sample(cfg.heldout_log_z_samples, generator=gen)
        trainable = [p for p in self.classifier.parameters() if p.requires_grad]
        if not trainable:
            raise ConfigError("ebm fit: the energy network has no trainable parameters")
        optimizer = torch.optim.Adam(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        num_batches = max(1, math.ceil(n_train / cfg.batch_size))
        chains = self.base.sample(min(cfg.batch_size, n_train), generator=gen).detach() if (
            cfg.persistent) else None
        # data parallel: each rank runs its block of the negative chains and evaluates f on
        # its rows of positives and negatives; gradients and losses are summed over the ranks
        # (one process: a group of world size 1, where all of this is the whole batch)
        shards = options.shards
        n_chains = 0 if chains is None else len(chains)
        if chains is not None:
            chains = shards.shard(chains)

        # early stopping on the held-out loss -gain: the best epoch is the one of highest gain
        stopper = EarlyStopping(self.classifier, epochs=cfg.epochs, patience=cfg.patience,
                                min_steps=cfg.min_steps, steps_per_epoch=num_batches,
                                desc="fit ebm", progress=options.progress,
                                log=options.log)
        for epoch in stopper:
            self.classifier.train()
            perm = train[torch.randperm(n_train, generator=gen, device=gen.device).to(device)]
            losses = EpochLosses()
            for rows in perm.tensor_split(num_batches):
                positives = shards.shard(draws(rows))
                if chains is not None:
                    restart = torch.rand(n_chains, generator=gen, device=gen.device).to(
                        device) < cfg.reinit_fraction
                    fresh = self.base.sample(n_chains, generator=gen)
                    start = torch.where(shards.shard(restart).unsqueeze(-1), shards.shard(fresh),
                                        chains)
                    n_neg = n_chains
                else:
                    start = shards.shard(self.base.sample(len(rows), generator=gen))
                    n_neg = len(rows)
                with shards.rows(n_neg):  # this rank's chains draw the one-process noise rows
                    negatives = self.negatives(start, chain_gen)
                if chains is not None:
                    chains = negatives
                f_pos, f_neg = self.logit(positives), self.logit(negatives)
                # this rank's part of the global means (the means themselves in one process)
                loss = shards.mean_part(f_neg, n_neg) - shards.mean_part(f_pos, len(rows))
                if cfg.energy_l2:
                    loss = loss + cfg.energy_l2 * (shards.mean_part(f_pos.pow(2), len(rows)) +
                                                    shards.mean_part(f_neg.pow(2), n_neg))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                shards.sum_gradients(trainable)
                optimizer.step()
                losses.add(loss, len(rows))
            train_losses = losses.summary(
                "ebm", epoch, f"lower lr (now {cfg.lr}) or step_size, or set energy_l2", shards)
            if not stopper.due(epoch):
                continue
            self.classifier.eval()
            with torch.no_grad():
                f_base = shards.map_rows(self._logit_nograd, z_base)
                f_ho = shards.map_rows(self._logit_nograd, z_ho).double()
                log_z, _ = log_mean_exp(f_base)
                gain = float(f_ho.mean()) - log_z
            record = {"epoch": float(epoch), **train_losses,
                      "heldout_loss": -gain, "heldout_gain": gain}
            # per-example losses log Z - f(z): paired over epochs (fixed draws)
            stopper.update(record, loss=-gain, values=per_encoding(log_z - f_ho, len(held)),
                           postfix={"heldout_gain": f"{gain:.4f}"})
        stopper.restore()
        self.classifier.eval()
        self.mark_fitted()
        self.heldout_index = held
        self.history = stopper.history
        self.fit_summary = {
            "best_epoch": stopper.best_epoch,
            "heldout_gain": -stopper.best_loss,
            **stopper.summary(options.started, n_train, len(held)),
        }
        if base_summary:
            self.fit_summary["base_fit"] = base_summary
        return dict(self.fit_summary)


def negatives_sampler(config: EBMPrior.Config, ctx: BuildContext | None = None) -> Sampler:
    """The ``langevin`` sampler (ULA, or MALA with ``metropolis``) that makes the EBM's
    negatives: ``config.langevin_steps`` steps of ``config.step_size``, no burn-in; from the
    registry of ``ctx`` when given."""
    sampler = create("sampler", "langevin", step_size=config.step_size,
                     metropolis=config.metropolis, num_steps=config.langevin_steps, burn_in=0,
                     registry=ctx.registry if ctx is not None else None)
    assert isinstance(sampler, Sampler)
    return sampler


@hookimpl
def ncpvae_register_priors() -> list[type]:
    return [EBMPrior]
