"""The ``flow`` prior: a normalizing flow fitted ex post to the aggregate posterior (docs/priors.md §7).

A masked autoregressive flow (MAF, Papamakarios et al. 2017) or a neural spline flow (NSF,
Durkan et al. 2019), both from **zuko**, fitted by maximum likelihood on fresh draws
``z ~ q(z|x)`` of the training set, with a held-out split for early stopping (the best
held-out weights are kept). Inputs are standardized per dimension with the training draws'
mean and standard deviation first (an affine map whose log-Jacobian is included), so the
spline's bounded domain covers the data.

``log p(z) = log N(u; 0, I) + log |det du/dx| - sum log sigma`` with ``x = (z - shift) / sigma``
and ``u`` the flow's transform of ``x``; sampling pushes ``u ~ N(0, I)`` (from the caller's
generator) through the inverse. The weights and the standardization are in the state dict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ncpvae import (
    ConfigError,
    DataError,
    EarlyStopping,
    EpochLosses,
    FitOptions,
    Prior,
    ShardGroup,
    hookimpl,
    minibatch_step,
)
from ncpvae.prior_fitting import (
    PriorOverBase,
    aggregate_posterior_draws,
    heldout_draws,
    per_encoding,
    seeded_init,
)
from ncpvae.tilted import split_heldout
from ncpvae_plugins.neural_fit import NeuralFitConfig

_LOG_2PI = math.log(2 * math.pi)


def build_zuko_flow(flow_type: str, latent_dim: int, transforms: int, hidden: Sequence[int],
                    bins: int) -> nn.Module:
    """An unconditional zuko flow over ``latent_dim`` features: ``maf`` or ``nsf``."""
    import zuko

    hidden = tuple(int(h) for h in hidden)
    if flow_type == "maf":
        return zuko.flows.MAF(features=latent_dim, transforms=transforms,
                              hidden_features=hidden)
    if flow_type == "nsf":
        return zuko.flows.NSF(features=latent_dim, transforms=transforms, bins=bins,
                              hidden_features=hidden)
    raise ConfigError(f"flow_type must be 'maf' or 'nsf', got '{flow_type}'")


class FlowPrior(PriorOverBase):
    """A zuko normalizing flow over standardized latents; normalized, exact sampling.

    Built from ``base`` and its :class:`FlowPrior.Config`, which it reads its settings from.
    ``flow`` is a zuko ``Flow`` (calling it gives the distribution): the config's
    ``flow_type``, ``transforms``, ``hidden`` and ``bins``, initialized from ``seed``, unless
    one is passed. Buffers ``shift`` and ``log_sigma`` ``(D,)`` hold the standardization.
    Unfitted until :meth:`fit` or a fitted state dict.
    """

    name = "flow"
    shardable_fit = True
    fitted_part = "a fitted flow"

    class Config(NeuralFitConfig):
        name: Literal["flow"] = "flow"
        flow_type: Literal["maf", "nsf"] = Field("nsf", description="masked autoregressive "
                                                 "flow or neural spline flow (zuko)")
        transforms: int = Field(4, ge=1, le=64, description="number of flow transforms")
        bins: int = Field(8, ge=2, le=256, description="spline bins (nsf)")

    config: Config

    def __init__(self, base: Prior, config: Config | None = None, *,
                 flow: nn.Module | None = None, seed: int = 0):
        super().__init__(base, config, seed=seed)
        cfg = self.config
        if flow is None:
            flow = seeded_init(self.seed, lambda: build_zuko_flow(
                cfg.flow_type, self.latent_dim, cfg.transforms, cfg.hidden, cfg.bins))
        if not isinstance(flow, nn.Module) or not callable(flow):
            raise ConfigError("the flow must be a zuko Flow (an nn.Module returning a "
                              "distribution when called)")
        self.flow = flow
        dtype = torch.get_default_dtype()
        self.register_buffer("shift", torch.zeros(self.latent_dim, dtype=dtype))
        self.register_buffer("log_sigma", torch.zeros(self.latent_dim, dtype=dtype))
        self.history: list[dict[str, float]] = []

    @property
    def label(self) -> str:
        return f"flow ({self.config.flow_type.upper()})"

    # ------------------------------------------------------------------------------------------
    # density and sampling

    def _log_prob(self, z: Tensor) -> Tensor:
        if z.ndim < 1 or z.shape[-1] != self.latent_dim:
            raise DataError(f"latents: expected shape (..., {self.latent_dim}) for a "
                            f"{self.latent_dim}-dim flow prior, got {tuple(z.shape)}")
        flat = z.reshape(-1, self.latent_dim)
        x = (flat - self.shift) * torch.exp(-self.log_sigma)
        out = self.flow().log_prob(x) - self.log_sigma.sum()
        return out.reshape(z.shape[:-1])

    def log_prob(self, z: Tensor) -> Tensor:
        """``(..., D) -> (...)``: the flow's exact log density."""
        self.require_fitted("log_prob")
        return self._log_prob(z)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact draws ``(n, D)``: ``u ~ N(0, I)`` from ``generator`` through the inverse
        transform, then un-standardized."""
        self.require_fitted("sample")
        device = generator.device if generator is not None else self.shift.device
        u = torch.randn(n, self.latent_dim, generator=generator, device=device,
                        dtype=self.shift.dtype).to(self.shift.device)
        with torch.no_grad():
            x = self.flow().transform.inv(u) if n else u
        return self.shift + x * torch.exp(self.log_sigma)

    # ------------------------------------------------------------------------------------------
    # fitting

    def _fit(self, mu: Tensor, logvar: Tensor, options: FitOptions) -> dict[str, Any]:
        """Maximum likelihood on draws of ``q(z|x)`` for ``mu``, ``logvar`` ``(N, D)``.

        A seeded ``heldout_fraction`` of the rows is held out, with ``heldout_samples`` fixed
        draws in all (several per row, :func:`~ncpvae.prior_fitting.heldout_draws`). The
        standardization is set from one draw per training row. Each epoch draws afresh for
        every training row and takes Adam steps on the mean negative log-likelihood; after each
        epoch the held-out NLL (nats per latent vector) is measured; the fit takes at least
        ``min_steps`` steps and stops after ``patience`` epochs without an NLL lower by more
        than 2 paired SE (:class:`ncpvae.EarlyStopping`); the best weights are restored. ``log`` gets
        one record per epoch: ``epoch``, ``train_loss_mean``, ``train_loss_min``,
        ``heldout_loss``. Returns ``best_epoch``, ``heldout_loss``, ``epochs_run``,
        ``steps_run``, ``min_epochs``, ``stopped_early``, ``fit_seconds``, ``num_train``,
        ``num_heldout``. Data parallel
        (``options.shards``): as the ncp fit, each rank evaluates the flow on its rows of every
        minibatch and of the held-out draws, gradients and losses summed over the ranks; the
        standardization is computed whole on every rank.
        """

        gen, cfg = options.generator, self.config
        ref = self.shift
        device, dtype = ref.device, ref.dtype
        mu = mu.detach().to(device=device, dtype=dtype)
        logvar = logvar.detach().to(device=device, dtype=dtype)
        held, train = split_heldout(len(mu), cfg.heldout_fraction, gen, device, "flow")
        mu_tr, lv_tr = mu[train], logvar[train]
        z_ho = heldout_draws(mu[held], logvar[held], cfg.heldout_samples, gen)
        with torch.no_grad():
            first = aggregate_posterior_draws(mu_tr, lv_tr, 1, gen)
            self.shift.copy_(first.mean(0))
            self.log_sigma.copy_(first.std(0).clamp_min(1e-6).log())
        trainable = [p for p in self.flow.parameters() if p.requires_grad]
        if not trainable:
            raise ConfigError("flow fit: the flow has no trainable parameters")
        optimizer = torch.optim.Adam(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        n_train = len(train)
        num_batches = max(1, math.ceil(n_train / cfg.batch_size))
        shards = options.shards  # data parallel: each rank its rows of every minibatch

        def nll(rows: Tensor, reduction: str) -> Tensor:
            values = -self._log_prob(z[rows])
            return values.mean() if reduction == "mean" else values.sum()

        stopper = EarlyStopping(self.flow, epochs=cfg.epochs, patience=cfg.patience,
                                min_steps=cfg.min_steps, steps_per_epoch=num_batches,
                                desc="fit flow", progress=options.progress,
                                log=options.log)
        for epoch in stopper:
            self.flow.train()
            z = aggregate_posterior_draws(mu_tr, lv_tr, 1, gen)
            perm = torch.randperm(n_train, generator=gen, device=gen.device).to(device)
            losses = EpochLosses()
            for index in perm.tensor_split(num_batches):
                losses.add(minibatch_step(optimizer, trainable, nll, index, shards), len(index))
            train_losses = losses.summary("flow", epoch, f"lower lr (now {cfg.lr})", shards)
            if not stopper.due(epoch):
                continue
            self.flow.eval()
            with torch.no_grad():
                per_example = self._heldout_nll(z_ho, shards)
                heldout = float(per_example.double().mean())
            record = {"epoch": float(epoch), **train_losses, "heldout_loss": heldout}
            stopper.update(record, loss=heldout, values=per_encoding(per_example, len(held)),
                           postfix={"heldout_nll": f"{heldout:.4f}"})
        stopper.restore()
        self.flow.eval()
        self.mark_fitted()
        self.history = stopper.history
        self.fit_summary = {
            "best_epoch": stopper.best_epoch,
            "heldout_loss": stopper.best_loss,
            **stopper.summary(options.started, n_train, len(held)),
        }
        return dict(self.fit_summary)

    def _heldout_nll(self, z: Tensor, shards: ShardGroup) -> Tensor:
        """``-log p(z)`` ``(n,)`` for held-out draws ``z`` ``(n, D)``, in chunks; over several
        ranks (``shards``) each rank evaluates its rows and every rank gets all of them."""
        def nll(part: Tensor) -> Tensor:
            return torch.cat([-self._log_prob(chunk) for chunk in part.split(65_536)])

        return shards.map_rows(nll, z)


@hookimpl
def ncpvae_register_priors() -> list[type]:
    return [FlowPrior]
