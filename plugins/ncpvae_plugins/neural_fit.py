"""What the network priors fitted on standardized latents share (``flow``, ``diffusion``,
``two_stage``, ``made``; docs/priors.md §10-§12).

- :class:`NeuralFitConfig`: the fit settings (epochs, minibatch, Adam, early stopping, the
  held-out share) and the hidden sizes of the network;
- :class:`StandardizedPrior`: a prior over a base that models ``x = (z - shift) / sigma``
  (buffers ``shift`` and ``log_sigma`` ``(D,)``, set from one draw per training row, so a network
  sees unit-scale inputs); a density of ``x`` becomes one of ``z`` by subtracting
  ``sum_j log sigma_j``;
- :meth:`StandardizedPrior.fit_network`: the maximum-likelihood-style epoch loop on fresh draws
  ``z ~ q(z|x)`` with a held-out split and :class:`ncpvae.EarlyStopping`, for any per-row loss
  ``loss(x, aux)`` whose auxiliary noise ``aux`` (diffusion times and noise, reparameterization
  noise) is drawn afresh every epoch for the training rows and once for the held-out rows (so
  the held-out loss of two epochs is comparable).

Every random draw comes from the fit's generator.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import Tensor, nn

from ncpvae import ConfigError, DataError, EarlyStopping, EpochLosses, FitOptions, minibatch_step
from ncpvae.prior_fitting import (
    EpochFitConfig,
    PriorOverBase,
    aggregate_posterior_draws,
    heldout_draws,
    per_encoding,
)
from ncpvae.tilted import split_heldout

#: rows per network call when evaluating many latents (bounds memory)
EVAL_CHUNK = 65_536

__all__ = ["AuxDraw", "NeuralFitConfig", "RowLoss", "StandardizedPrior", "mlp"]

#: ``loss(x, aux)``: per-row losses ``(n,)`` of standardized latents ``x`` ``(n, D)`` with their
#: auxiliary noise ``aux`` (``(n, A)`` or None)
RowLoss = Callable[[Tensor, "Tensor | None"], Tensor]
#: ``draw(n, generator)``: auxiliary noise for ``n`` rows, ``(n, A)``, or None
AuxDraw = Callable[[int, torch.Generator], "Tensor | None"]


class NeuralFitConfig(EpochFitConfig):
    """Fit settings shared by the network priors fitted on standardized latents (with the step
    budget and held-out draws of :class:`~ncpvae.prior_fitting.EpochFitConfig`)."""

    hidden: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [128, 128], description="hidden layer sizes of the network")
    epochs: int = Field(200, ge=1, le=100_000, description="maximum epochs (raised to reach "
                        "min_steps on small data)")
    batch_size: int = Field(512, ge=2, le=1_048_576, description="minibatch size")
    lr: float = Field(1e-3, gt=0, le=1.0, description="Adam learning rate")
    weight_decay: float = Field(0.0, ge=0, le=1.0, description="Adam weight decay")
    patience: int = Field(10, ge=1, description="stop after this many epochs without a "
                          "held-out loss lower by more than 2 paired SE")
    heldout_fraction: float = Field(0.1, gt=0, lt=0.5, description="fraction of the encodings "
                                    "held out for early stopping")


class StandardizedPrior(PriorOverBase):
    """A prior over a base whose network models standardized latents ``x = (z - shift) / sigma``.

    Subclasses build their network (``self.net``, or another attribute that they name to
    :meth:`fit_network` as ``network``, as ``flow`` does) and implement the density of ``x``; this
    class holds the standardization buffers and the fit loop.
    """

    Config = NeuralFitConfig
    config: NeuralFitConfig
    net: nn.Module

    def __init__(self, base: Any, config: NeuralFitConfig | None = None, *, seed: int = 0):
        super().__init__(base, config, seed=seed)
        dtype = torch.get_default_dtype()
        self.register_buffer("shift", torch.zeros(self.latent_dim, dtype=dtype))
        self.register_buffer("log_sigma", torch.zeros(self.latent_dim, dtype=dtype))
        self.history: list[dict[str, float]] = []

    def check_z(self, z: Tensor) -> Tensor:
        """``z`` ``(..., D)`` as ``(n, D)`` rows (a one-line error on a wrong shape)."""
        if z.ndim < 1 or z.shape[-1] != self.latent_dim:
            raise DataError(f"latents: expected shape (..., {self.latent_dim}) for a "
                            f"{self.latent_dim}-dim {self.name} prior, got {tuple(z.shape)}")
        return z.reshape(-1, self.latent_dim)

    def standardize(self, z: Tensor) -> Tensor:
        """``(n, D) -> (n, D)``: ``(z - shift) / sigma``."""
        return (z - self.shift) * torch.exp(-self.log_sigma)

    def unstandardize(self, x: Tensor) -> Tensor:
        """``(n, D) -> (n, D)``: ``shift + sigma x``."""
        return self.shift + x * torch.exp(self.log_sigma)

    def log_prob_rows(self, z: Tensor, log_prob_x: Callable[[Tensor], Tensor]) -> Tensor:
        """``log p(z)`` ``(...)`` for ``z`` ``(..., D)`` from the density of the standardized
        rows ``log_prob_x`` ``(n, D) -> (n,)`` (in chunks of ``EVAL_CHUNK`` rows)."""
        flat = self.check_z(z)
        x = self.standardize(flat)
        out = (torch.cat([log_prob_x(part) for part in x.split(EVAL_CHUNK)]) if len(x)
               else x.new_zeros(0))
        return (out - self.log_sigma.sum()).reshape(z.shape[:-1])

    def standard_normal(self, n: int, width: int, generator: torch.Generator | None) -> Tensor:
        """``(n, width)`` standard normal draws from ``generator`` on the prior's device."""
        device = generator.device if generator is not None else self.shift.device
        return torch.randn(n, width, generator=generator, device=device,
                           dtype=self.shift.dtype).to(self.shift.device)

    def fit_network(self, mu: Tensor, logvar: Tensor, options: FitOptions, loss: RowLoss,
                    draw_aux: AuxDraw | None = None, *, desc: str,
                    ema: float = 0.0, network: str = "net") -> dict[str, Any]:
        """Fit the module in attribute ``network`` (default ``self.net``) by minimizing the mean
        of ``loss`` on draws of ``q(z|x)``.

        A seeded ``heldout_fraction`` of the rows is held out with ``heldout_samples`` fixed
        draws in all (several per row, :func:`~ncpvae.prior_fitting.heldout_draws`, with fixed
        auxiliary noise); the standardization is set from one draw per training row. Each
        epoch draws afresh for every training row and takes Adam steps on the minibatch means;
        the fit takes at least ``min_steps`` steps, the held-out mean loss decides early
        stopping (``patience`` epochs without a loss lower by more than 2 paired SE over
        held-out encodings, :class:`ncpvae.EarlyStopping`), and the best weights are
        restored. ``log`` gets ``epoch``, ``train_loss_mean``, ``train_loss_min``,
        ``heldout_loss`` per epoch; the summary has ``best_epoch``, ``heldout_loss``,
        ``epochs_run``, ``stopped_early``, ``fit_seconds``, ``num_train``, ``num_heldout``.

        Data parallel (``options.shards``, for a prior with ``shardable_fit``): each rank
        evaluates its rows of every minibatch and of the held-out draws, gradients and losses
        summed over the ranks; the standardization is computed whole on every rank.

        ``ema`` in ``(0, 1)``: keep an exponential moving average of the weights (updated after
        every step with this decay, less during a warm-up); the held-out loss, the
        early-stopping snapshots and the final weights are the averaged ones (score models need
        it: the last iterate's noise shows in the ODE's samples and density); ``loss`` reads
        the network from that attribute, which holds the averaged weights while they are
        scored.
        """
        gen, cfg = options.generator, self.config
        device, dtype = self.shift.device, self.shift.dtype
        mu = mu.detach().to(device=device, dtype=dtype)
        logvar = logvar.detach().to(device=device, dtype=dtype)
        held, train = split_heldout(len(mu), cfg.heldout_fraction, gen, device, self.name)
        mu_tr, lv_tr = mu[train], logvar[train]
        z_ho = heldout_draws(mu[held], logvar[held], cfg.heldout_samples, gen)
        with torch.no_grad():
            first = aggregate_posterior_draws(mu_tr, lv_tr, 1, gen)
            self.shift.copy_(first.mean(0))
            self.log_sigma.copy_(first.std(0).clamp_min(1e-6).log())
            x_ho = self.standardize(z_ho)
        aux_ho = draw_aux(len(z_ho), gen) if draw_aux is not None else None
        trained: nn.Module = getattr(self, network)
        trainable = [p for p in trained.parameters() if p.requires_grad]
        if not trainable:
            raise ConfigError(f"{self.name} fit: the network has no trainable parameters")
        optimizer = torch.optim.Adam(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        n_train = len(train)
        num_batches = max(1, math.ceil(n_train / cfg.batch_size))

        def batch_loss(rows: Tensor, reduction: str) -> Tensor:
            values = loss(x[rows], None if aux is None else aux[rows])
            return values.mean() if reduction == "mean" else values.sum()

        averaged = copy.deepcopy(trained).requires_grad_(False) if ema > 0 else trained

        def heldout_losses(rows: Tensor) -> Tensor:
            return torch.cat([loss(x_ho[part], None if aux_ho is None else aux_ho[part])
                              for part in rows.split(EVAL_CHUNK)])

        steps = 0
        stopper = EarlyStopping(averaged, epochs=cfg.epochs, patience=cfg.patience,
                                min_steps=cfg.min_steps, steps_per_epoch=num_batches, desc=desc,
                                progress=options.progress, log=options.log)
        for epoch in stopper:
            trained.train()
            with torch.no_grad():
                x = self.standardize(aggregate_posterior_draws(mu_tr, lv_tr, 1, gen))
            aux = draw_aux(n_train, gen) if draw_aux is not None else None
            perm = torch.randperm(n_train, generator=gen, device=gen.device).to(device)
            losses = EpochLosses()
            for index in perm.tensor_split(num_batches):
                losses.add(minibatch_step(optimizer, trainable, batch_loss, index,
                                          options.shards), len(index))
                if averaged is not trained:
                    steps += 1  # warm-up: early on the average must not stay at the init
                    decay = min(ema, (1.0 + steps) / (10.0 + steps))
                    with torch.no_grad():
                        for mean, p in zip(averaged.parameters(), trained.parameters(),
                                           strict=True):
                            mean.lerp_(p, 1.0 - decay)
            train_losses = losses.summary(self.name, epoch, f"lower lr (now {cfg.lr})",
                                          options.shards)
            if not stopper.due(epoch):
                continue
            averaged.eval()
            if averaged is not trained:
                setattr(self, network, averaged)  # the held-out loss of the averaged weights
            with torch.no_grad():
                per_example = options.shards.map_rows(
                    heldout_losses, torch.arange(len(x_ho), device=device))
                heldout = float(per_example.double().mean())
            if averaged is not trained:
                setattr(self, network, trained)
            record = {"epoch": float(epoch), **train_losses, "heldout_loss": heldout}
            stopper.update(record, loss=heldout, values=per_encoding(per_example, len(held)),
                           postfix={"heldout": f"{heldout:.4f}"})
        stopper.restore()
        if averaged is not trained:
            trained.load_state_dict(averaged.state_dict())
        trained.eval()
        self.mark_fitted()
        self.history = stopper.history
        self.fit_summary = {"best_epoch": stopper.best_epoch, "heldout_loss": stopper.best_loss,
                            **stopper.summary(options.started, n_train, len(held))}
        return dict(self.fit_summary)


def mlp(width_in: int, hidden: list[int], width_out: int) -> nn.Sequential:
    """A SiLU MLP ``(n, width_in) -> (n, width_out)`` (row-wise layers only)."""
    layers: list[nn.Module] = []
    width = width_in
    for size in hidden:
        layers += [nn.Linear(width, size), nn.SiLU()]
        width = size
    layers.append(nn.Linear(width, width_out))
    return nn.Sequential(*layers)
