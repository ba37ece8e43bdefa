"""The ``ncp`` prior: a Noise-Contrastive Prior (Aneja et al., NeurIPS 2021; docs/math.md §2).

A binary classifier with logit ``f(z)`` is trained, with the VAE frozen, to tell draws of the
aggregate posterior ``q(z)`` (label 1) from draws of a tractable base prior ``p(z)`` (label 0).
At the optimum ``f = log q/p``, so the reweighted prior

    p_NCP(z) = p(z) exp f(z) / Z,        Z = E_p[exp f(z)],

matches ``q`` better than ``p`` does. ``f`` is always the classifier's logit itself: rebuilding
it as ``log(D / (1 - D))`` from ``D = sigmoid(f)`` saturates to ``inf`` in float32 once
``f`` exceeds about 17.

Conventions:

- ``log_prob(z) = log p(z) + f(z)`` is **unnormalized** (``normalized = False``): subtract
  :meth:`NCPPrior.log_normalizer` for a density.
- ``energy(z) = -log p(z) - f(z)``, where ``log p`` is the base's log density, summed over the
  latent dimensions (never averaged: that would rescale the base's pull by 1/D).
- ``sample`` is sampling-importance-resampling (SIR) from the base with weights ``exp f``
  (approximate, ``exact_sampling = False``); Langevin samplers can use ``energy`` instead.
- Randomness comes from explicit ``torch.Generator`` arguments; the classifier built by
  :meth:`NCPPrior.from_config` is initialized from the run seed without touching the global RNG.
- The base can be any exactly-sampling prior (``[prior.base] name = "gmm"``, ``flow``, ``vamp``,
  a third-party prior). A learned base is fitted first, on the same encodings; the classifier
  then tells ``q(z)`` from the fitted base's draws, and ``log Z``, SIR and the energy use it.
  The density, ``log Z``, the gains and SIR are shared with the latent EBM prior
  (:class:`ncpvae.tilted.TiltedPrior`); only :meth:`NCPPrior.fit` is NCP's own.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ncpvae import (
    ConfigError,
    EarlyStopping,
    EpochLosses,
    FitOptions,
    Prior,
    ShardGroup,
    hookimpl,
    minibatch_step,
)
from ncpvae.prior_fitting import EpochFitConfig, heldout_draws, per_encoding
from ncpvae.tilted import (
    MLPClassifier,
    TiltedConfig,
    TiltedPrior,
    split_heldout,
)

__all__ = ["MLPClassifier", "NCPPrior", "roc_auc"]

def roc_auc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve of ``scores`` ``(n,)`` for binary ``labels`` ``(n,)``.

    The Mann-Whitney statistic with average ranks for ties (equal to
    ``sklearn.metrics.roc_auc_score``); NaN when one class is absent.
    """
    s = scores.detach().to("cpu", torch.float64).reshape(-1)
    positive = labels.detach().to("cpu").reshape(-1) > 0.5
    n_pos = int(positive.sum())
    n_neg = s.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = torch.unique(s, sorted=True, return_inverse=True, return_counts=True)
    last_rank = counts.cumsum(0).to(torch.float64)  # 1-based rank of each tie group's last item
    ranks = (last_rank - (counts - 1) / 2.0)[inverse]  # average rank within the tie group
    rank_sum = float(ranks[positive].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


class NCPPrior(TiltedPrior):
    """``p_NCP(z) = p(z) exp f(z) / Z``: a base prior reweighted by a classifier's logit.

    ``base`` is any prior with exact sampling (usually the VAE's N(0, I)); ``config`` (an
    :class:`NCPPrior.Config`, its defaults when None) holds every setting; ``classifier`` maps
    latents ``(n, D)`` to logits ``(n,)`` (default: the config's MLP, initialized from
    ``seed``). Built in code the prior is unfitted unless ``fitted=True`` (the classifier is
    then taken as already trained); :meth:`fit` trains the classifier, and loading a fitted
    state dict marks the prior fitted. ``seed`` also seeds :meth:`fit` when no generator is
    given.
    """

    name = "ncp"
    shardable_fit = True
    net_role = "classifier"
    net_output = "logits"

    class Config(TiltedConfig, EpochFitConfig):
        name: Literal["ncp"] = "ncp"
        epochs: int = Field(30, ge=1, le=100_000, description="maximum classifier epochs "
                            "(raised to reach min_steps on small data)")
        batch_size: int = Field(512, ge=2, le=1_048_576, description="classifier minibatch size")
        lr: float = Field(1e-3, gt=0, le=1.0, description="Adam learning rate")
        weight_decay: float = Field(0.0, ge=0, le=1.0, description="Adam weight decay (L2)")
        patience: int = Field(
            5, ge=1, description="stop after this many epochs without a held-out BCE lower by "
            "more than 2 paired SE"
        )
        heldout_fraction: float = Field(
            0.1, gt=0, lt=0.5, description="fraction of the encodings held out for early stopping"
        )
        fit_base: bool = Field(
            True, description="fit a learned base (gmm, flow, ...) on the same encodings before "
            "the classifier (False: keep its current, e.g. loaded, fit)"
        )

    config: Config

    def __init__(self, base: Prior, config: Config | None = None, *,
                 classifier: nn.Module | None = None, seed: int = 0, fitted: bool = False):
        super().__init__(base, config, net=classifier, seed=seed, fitted=fitted)

    @property
    def label(self) -> str:
        """``NCP``, or ``NCP over <base>`` when the base is not the tractable prior itself."""
        return "NCP" if self.base is self.base_prior else f"NCP over {self.base.label}"

    # ------------------------------------------------------------------------------------------
    # fitting

    def _fit(self, mu: Tensor, logvar: Tensor, options: FitOptions) -> dict[str, Any]:
        """Train the classifier: aggregate posterior (label 1) against the base (label 0).

        ``mu``, ``logvar`` ``(N, D)``: the frozen encoder's outputs for the whole training set.
        A seeded ``heldout_fraction`` of the rows is held out, with ``heldout_samples`` draws
        in all (several per held-out row, :func:`~ncpvae.prior_fitting.heldout_draws`) against
        as many base draws, drawn once. Each epoch draws fresh positives
        ``mu + exp(logvar / 2) * eps`` for every training row and as many fresh base draws,
        shuffles them into near-equal minibatches and takes Adam steps on the BCE with logits.
        After each epoch the held-out BCE, accuracy and ROC-AUC are measured on the fixed
        held-out draws; the fit takes at least ``min_steps`` steps and stops after ``patience``
        epochs without a held-out BCE lower by more than 2 paired SE
        (:class:`ncpvae.EarlyStopping`); the best weights are restored.

        Training continues from the classifier's current weights (no re-initialization). All
        randomness comes from ``generator`` (default: one seeded with ``seed``), so a fit is
        deterministic. Data parallel (``options.shards``, under torchrun): every rank draws all
        positives, negatives and permutations, evaluates the classifier on its contiguous rows
        of each minibatch and of the held-out set, and the gradients, the logged losses and the
        held-out logits are summed over the ranks (:func:`ncpvae.minibatch_step`), so each rank
        ends with the one-process classifier up to float reduction order.

        ``log`` gets one record of plain floats per epoch: ``epoch``,
        ``train_loss_mean`` (over the epoch's examples), ``train_loss_min`` (lowest minibatch),
        ``heldout_loss``, ``heldout_accuracy``, ``heldout_auc``. Returns a summary: ``best_epoch``
        and the held-out ``heldout_loss``/``heldout_accuracy``/``heldout_auc`` there,
        ``epochs_run``, ``steps_run``, ``min_epochs``, ``stopped_early``, ``fit_seconds``,
        ``num_train``, ``num_heldout`` (held-out encodings).
        """
        gen, cfg = options.generator, self.config
        base_summary = self.fit_base(mu, logvar, options) if cfg.fit_base else {}
        ref = self._param_like()
        device, dtype = ref.device, ref.dtype
        mu = mu.detach().to(device=device, dtype=dtype)
        logvar = logvar.detach().to(device=device, dtype=dtype)
        std = torch.exp(0.5 * logvar)

        held, train = split_heldout(mu.shape[0], cfg.heldout_fraction, gen, device, "ncp")
        n_held, n_train = len(held), len(train)
        self.heldout_index = held
        mu_tr, std_tr = mu[train], std[train]
        with torch.no_grad():
            self.logit(mu[:2])  # fail early, with a clear message, on a wrong output shape
        trainable = [p for p in self.classifier.parameters() if p.requires_grad]
        if not trainable:
            raise ConfigError("ncp fit: the classifier has no trainable parameters")

        def posterior_draws(m: Tensor, s: Tensor) -> Tensor:
            eps = torch.randn(m.shape, generator=gen, device=gen.device, dtype=dtype)
            return m + s * eps.to(device)

        labels_tr = torch.cat([torch.ones(n_train, device=device, dtype=dtype),
                               torch.zeros(n_train, device=device, dtype=dtype)])
        positives_ho = heldout_draws(mu[held], logvar[held], cfg.heldout_samples, gen)
        with torch.no_grad():
            inputs_ho = torch.cat([positives_ho, self.base.sample(len(positives_ho),
                                                                  generator=gen)])
        labels_ho = torch.cat([torch.ones(len(positives_ho), device=device, dtype=dtype),
                               torch.zeros(len(positives_ho), device=device, dtype=dtype)])
        num_batches = max(1, math.ceil(2 * n_train / cfg.batch_size))
        optimizer = torch.optim.Adam(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)

        shards = options.shards  # data parallel: each rank its rows of every minibatch

        def bce(rows: Tensor, reduction: str) -> Tensor:
            return F.binary_cross_entropy_with_logits(self.logit(inputs[rows]), labels_tr[rows],
                                                      reduction=reduction)

        stopper = EarlyStopping(self.classifier, epochs=cfg.epochs, patience=cfg.patience,
                                min_steps=cfg.min_steps, steps_per_epoch=num_batches,
                                desc="fit ncp classifier", progress=options.progress,
                                log=options.log)
        for epoch in stopper:
            self.classifier.train()
            with torch.no_grad():
                inputs = torch.cat([posterior_draws(mu_tr, std_tr),
                                    self.base.sample(n_train, generator=gen)])
            perm = torch.randperm(2 * n_train, generator=gen, device=gen.device).to(device)
            losses = EpochLosses()
            for index in perm.tensor_split(num_batches):
                losses.add(minibatch_step(optimizer, trainable, bce, index, shards), len(index))
            # the steps' losses stay on the device until here: one host read per epoch
            train_losses = losses.summary("ncp", epoch, f"lower lr (now {cfg.lr})", shards)
            if not stopper.due(epoch):
                continue
            metrics, per_example = self._heldout_metrics(inputs_ho, labels_ho, shards)
            record = {"epoch": float(epoch), **train_losses, **metrics}
            stopper.update(record, loss=record["heldout_loss"],
                           values=per_encoding(per_example, n_held),
                           postfix={"heldout_loss": f"{record['heldout_loss']:.4f}",
                                    "acc": f"{record['heldout_accuracy']:.3f}"})
        stopper.restore()
        self.classifier.eval()
        self.mark_fitted()
        self.history = stopper.history
        best = stopper.best_record
        self.fit_summary = {
            "best_epoch": stopper.best_epoch,
            "heldout_loss": best.get("heldout_loss", math.nan),
            "heldout_accuracy": best.get("heldout_accuracy", math.nan),
            "heldout_auc": best.get("heldout_auc", math.nan),
            **stopper.summary(options.started, n_train, n_held),
        }
        if base_summary:
            self.fit_summary["base_fit"] = base_summary
        return dict(self.fit_summary)

    @torch.no_grad()
    def _heldout_metrics(self, inputs: Tensor, labels: Tensor,
                         shards: ShardGroup) -> tuple[dict[str, float], Tensor]:
        """BCE, accuracy and ROC-AUC of the classifier on ``inputs`` ``(n, D)`` with ``labels``
        ``(n,)``, and the per-example BCE ``(n,)``; over several ranks (``shards``) each rank
        computes its rows' logits and every rank gets all of them (so every rank computes the
        same metrics)."""
        self.classifier.eval()
        logits = shards.map_rows(self._logit_nograd, inputs)
        per_example = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        accuracy = ((logits > 0) == (labels > 0.5)).to(torch.float64).mean()
        return ({"heldout_loss": float(per_example.mean()), "heldout_accuracy": float(accuracy),
                 "heldout_auc": roc_auc(logits, labels)}, per_example)


@hookimpl
def ncpvae_register_priors() -> list[type]:
    return [NCPPrior]
