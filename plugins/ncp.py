"""The ``ncp`` prior: a Noise-Contrastive Prior (Aneja et al., NeurIPS 2021; MATH.md §2).

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
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ncpvae import (
    BuildContext,
    ComponentConfig,
    LearnedPrior,
    Prior,
    PriorSection,
    build_component,
    hookimpl,
)
from ncpvae.errors import ConfigError, DataError, NonFiniteError, NotFittedError
from ncpvae.mcmc.importance import ess_fraction, importance_resample

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
}

#: Rows per classifier call when evaluating many latents without gradients (bounds memory).
_EVAL_CHUNK = 65_536
#: Candidates per SIR pool: larger requests are split into pools of about this size.
_SIR_POOL = 1 << 20


class MLPClassifier(nn.Module):
    """The NCP classifier: an MLP mapping latents ``(n, D)`` to logits ``(n,)``.

    Linear layers of sizes ``hidden``, each followed by an optional LayerNorm and the activation,
    then a linear head. Only row-wise layers are used (no batch norm), so the logit of row i
    depends on ``z[i]`` alone and the NCP energy stays batch-separable. The head starts at zero,
    so an untrained classifier gives ``f = 0``: the NCP prior starts as its base.
    """

    def __init__(self, latent_dim: int, hidden: Sequence[int] = (256, 256),
                 activation: str = "silu", normalization: str = "none"):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ConfigError(f"unknown activation '{activation}'; choose one of "
                              f"{', '.join(_ACTIVATIONS)}")
        if normalization not in ("none", "layer"):
            raise ConfigError(f"normalization must be 'none' or 'layer', got '{normalization}'")
        layers: list[nn.Module] = []
        width = latent_dim
        for size in hidden:
            layers.append(nn.Linear(width, size))
            if normalization == "layer":
                layers.append(nn.LayerNorm(size))
            layers.append(_ACTIVATIONS[activation]())
            width = size
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, z: Tensor) -> Tensor:
        """``(n, D) -> (n,)`` logits."""
        return self.head(self.body(z)).squeeze(-1)


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


def _log_mean_exp(values: Tensor) -> tuple[float, float]:
    """``log mean exp(values)`` and its delta-method standard error, in float64.

    With ``w_i = exp(values_i)`` and ``Z-hat = mean(w)``: ``SE(log Z-hat) = SE(Z-hat) / Z-hat``
    ``= std(w / Z-hat) / sqrt(M)``. Written so that all-equal values give an exact result and
    a zero standard error.
    """
    v = values.detach().to(torch.float64).reshape(-1)
    m = v.numel()
    if torch.isnan(v).any() or torch.isposinf(v).any():
        raise NonFiniteError("the classifier returned NaN or +inf logits on base-prior draws")
    top = v.max()
    if torch.isneginf(top):
        raise NonFiniteError("every classifier logit is -inf on base-prior draws")
    scaled = torch.exp(v - top)
    mean = scaled.sum() / m
    log_z = float(top + torch.log(mean))
    if m < 2:
        return log_z, float("inf")
    relative = scaled / mean
    se = float(torch.sqrt(((relative - 1.0) ** 2).sum() / (m - 1) / m))
    return log_z, se


class NCPPrior(LearnedPrior):
    """``p_NCP(z) = p(z) exp f(z) / Z``: a base prior reweighted by a classifier's logit.

    ``base`` is any prior with exact sampling (usually the VAE's N(0, I)); ``classifier`` maps
    latents ``(n, D)`` to logits ``(n,)``. Built in code the prior is unfitted unless
    ``fitted=True`` (the classifier is then taken as already trained); :meth:`fit` trains the
    classifier, and loading a fitted state dict marks the prior fitted.

    Fitting settings (see :class:`NCPPrior.Config`): ``epochs``, ``batch_size``, ``lr``,
    ``weight_decay``, ``patience``, ``heldout_fraction``; ``seed`` seeds :meth:`fit` when no
    generator is given. ``sir_candidates`` base draws are made per SIR sample and
    ``log_z_samples`` base draws estimate ``log Z`` when no count is given.
    """

    name = "ncp"
    normalized = False
    requires_fit = True
    exact_sampling = False
    sampling_method = "SIR"

    class Config(ComponentConfig):
        name: Literal["ncp"] = "ncp"
        base: PriorSection = Field(
            default_factory=lambda: {"name": "gaussian"},
            description="the tractable prior that the classifier reweights (a prior table)",
        )
        hidden: list[Annotated[int, Field(ge=1)]] = Field(
            default_factory=lambda: [256, 256], description="hidden layer sizes of the MLP"
        )
        activation: Literal["relu", "silu", "gelu", "elu", "tanh", "softplus"] = Field(
            "silu", description="MLP activation (smooth ones give Langevin samplers smooth energies)"
        )
        normalization: Literal["none", "layer"] = Field(
            "none", description="normalization after each hidden layer (batch norm is not "
            "offered: it would couple the rows of a batch)"
        )
        epochs: int = Field(100, ge=1, le=100_000, description="maximum classifier epochs")
        batch_size: int = Field(512, ge=2, le=1_048_576, description="classifier minibatch size")
        lr: float = Field(1e-3, gt=0, le=1.0, description="Adam learning rate")
        weight_decay: float = Field(0.0, ge=0, le=1.0, description="Adam weight decay (L2)")
        patience: int = Field(
            10, ge=1, description="stop after this many epochs without a better held-out BCE"
        )
        heldout_fraction: float = Field(
            0.1, gt=0, lt=0.5, description="fraction of the encodings held out for early stopping"
        )
        sir_candidates: int = Field(
            100, ge=1, le=100_000, description="base-prior candidates per SIR sample"
        )
        log_z_samples: int = Field(
            100_000, ge=2, description="base-prior draws for the Monte Carlo estimate of log Z"
        )

    def __init__(
        self,
        base: Prior,
        classifier: nn.Module,
        *,
        epochs: int = 100,
        batch_size: int = 512,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        patience: int = 10,
        heldout_fraction: float = 0.1,
        sir_candidates: int = 100,
        log_z_samples: int = 100_000,
        seed: int = 0,
        fitted: bool = False,
    ):
        if not isinstance(base, Prior):
            raise ConfigError(f"the NCP base must be a Prior, got {type(base).__name__}")
        if not base.exact_sampling:
            raise ConfigError(
                f"the NCP base prior must sample exactly (it provides the classifier's negatives "
                f"and the SIR proposals); '{base.name}' does not: use e.g. base = gaussian"
            )
        if not isinstance(classifier, nn.Module):
            raise ConfigError(
                f"the NCP classifier must be a torch.nn.Module, got {type(classifier).__name__}"
            )
        super().__init__(base.latent_dim)
        self.base = base
        self.classifier = classifier
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.patience = int(patience)
        self.heldout_fraction = float(heldout_fraction)
        self.sir_candidates = int(sir_candidates)
        self.log_z_samples = int(log_z_samples)
        self.seed = int(seed)
        # A buffer, so a fitted checkpoint's state dict carries the flag.
        self.register_buffer("fitted", torch.tensor(bool(fitted)))
        self.last_ess_fraction: float | None = None
        self.history: list[dict[str, float]] = []
        self.fit_summary: dict[str, Any] = {}
        self.heldout_index: Tensor | None = None

    @classmethod
    def from_config(cls, config: Config, ctx: BuildContext) -> NCPPrior:
        latent_dim = ctx.require_latent_dim("the ncp prior")
        base = build_component(config.base, "prior", ctx)
        # Seed the initialization from the run seed without disturbing the global (CPU) RNG.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(ctx.seed)
            classifier = MLPClassifier(latent_dim, config.hidden, config.activation,
                                       config.normalization)
        return cls(base, classifier, epochs=config.epochs, batch_size=config.batch_size,
                   lr=config.lr, weight_decay=config.weight_decay, patience=config.patience,
                   heldout_fraction=config.heldout_fraction,
                   sir_candidates=config.sir_candidates, log_z_samples=config.log_z_samples,
                   seed=ctx.seed)

    # ------------------------------------------------------------------------------------------
    # the density

    @property
    def base_prior(self) -> Prior:
        return self.base

    @property
    def is_fitted(self) -> bool:
        """True after :meth:`fit`, after loading a fitted state dict, or if built ``fitted=True``."""
        return bool(self.fitted)

    def _require_fitted(self, what: str) -> None:
        if not self.is_fitted:
            raise NotFittedError(
                f"the ncp prior's {what} needs a trained classifier: call prior.fit(mu, logvar) "
                f"with the frozen VAE's training-set encodings, or load a fitted state dict"
            )

    def logit(self, z: Tensor) -> Tensor:
        """The classifier's logit ``f(z)``: ``(..., D) -> (...)`` (no fitted check).

        Raises :class:`DataError` if the classifier does not return one logit per row.
        """
        if z.ndim < 1 or z.shape[-1] != self.latent_dim:
            raise DataError(
                f"latents: expected shape (..., {self.latent_dim}) for a {self.latent_dim}-dim "
                f"ncp prior, got {tuple(z.shape)}"
            )
        flat = z.reshape(-1, self.latent_dim)
        out = self.classifier(flat)
        if not isinstance(out, Tensor) or out.shape != (flat.shape[0],):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise DataError(
                f"the ncp classifier must map latents (n, {self.latent_dim}) to logits (n,), but "
                f"for n={flat.shape[0]} it returned {got}; end it with e.g. .squeeze(-1) after "
                f"a Linear(..., 1) layer"
            )
        return out.reshape(z.shape[:-1])

    @torch.no_grad()
    def _logit_nograd(self, z: Tensor) -> Tensor:
        """``f(z)`` for many rows ``(n, D) -> (n,)``, in chunks and without a graph."""
        return torch.cat([self.logit(part) for part in z.split(_EVAL_CHUNK)]) if len(z) else (
            z.new_zeros(0))

    def log_prob(self, z: Tensor) -> Tensor:
        """Unnormalized ``log p(z) + f(z)``, ``(..., D) -> (...)``; subtract ``log Z`` (see
        :meth:`log_normalizer`) for the normalized log density."""
        self._require_fitted("log_prob")
        return self.base.log_prob(z) + self.logit(z)

    def energy(self, z: Tensor) -> Tensor:
        """``U(z) = -log p(z) - f(z)``, ``(..., D) -> (...)``; ``log p`` is the base's log
        density summed over the latent dimensions. Batch-separable."""
        self._require_fitted("energy")
        return -self.base.log_prob(z) - self.logit(z)

    def log_normalizer(
        self, num_samples: int | None = None, *, generator: torch.Generator | None = None
    ) -> tuple[float, float]:
        """Monte Carlo ``log Z = log E_p[exp f(z)]`` and its standard error.

        ``log Z-hat = logsumexp_i f(z_i) - log M`` over ``M = num_samples`` base draws
        (default ``log_z_samples``), made in chunks to bound memory. The SE is the delta
        method's ``SE(Z-hat) / Z-hat``. ``log Z-hat`` is biased low by about
        ``Var(Z-hat) / (2 Z^2)`` (about half the squared SE), negligible when the SE is small.
        Returns plain floats ``(log_z, se)``.
        """
        self._require_fitted("log_normalizer")
        m = self.log_z_samples if num_samples is None else int(num_samples)
        if m < 2:
            raise ConfigError(f"log_normalizer needs at least 2 samples, got {m}")
        values = []
        with torch.no_grad():
            for start in range(0, m, _EVAL_CHUNK):
                z = self.base.sample(min(_EVAL_CHUNK, m - start), generator=generator)
                values.append(self.logit(z).to(torch.float64))
        return _log_mean_exp(torch.cat(values))

    def log_ratio(self, z: Tensor) -> Tensor:
        """``f(z)``, the classifier's logit (``log p_NCP - log p_base`` up to ``log Z``).
        :meth:`kl_gain` (inherited) averages it over held-out encodings: ``Delta = E_q[f] - log Z``."""
        self._require_fitted("kl_gain")
        return self.logit(z)

    @property
    def label(self) -> str:
        return "NCP"

    def sampling_info(self) -> dict[str, float]:
        """The Kish ESS fraction of the last SIR call (absent before any)."""
        return {} if self.last_ess_fraction is None else {"ess_fraction": self.last_ess_fraction}

    # ------------------------------------------------------------------------------------------
    # sampling

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` approximate draws ``(n, D)`` by SIR (see :meth:`sample_with_info`)."""
        return self.sample_with_info(n, generator=generator)[0]

    def sample_with_info(
        self, n: int, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """SIR: draw ``n * sir_candidates`` base candidates, weight them by ``exp f``, resample.

        Resampling is multinomial with replacement from pools of about a million candidates,
        so draws sharing a pool are slightly dependent; with ``M = sir_candidates`` the variance
        of a sample mean is about ``Var/n * (1 + 1 / (M * ess_fraction))``. The bias of SIR is
        ``O(1 / pool size)``. Returns ``(z (n, D), {"ess_fraction": ...})``; the Kish ESS
        fraction of all weights (1: the base already matches) is also kept as
        ``self.last_ess_fraction``.
        """
        self._require_fitted("sample")
        if n < 0:
            raise ValueError(f"cannot draw a negative number of samples ({n})")
        if n == 0:
            ref = self._param_like()
            return torch.empty(0, self.latent_dim, device=ref.device, dtype=ref.dtype), {
                "ess_fraction": float("nan")}
        per_pool = max(1, _SIR_POOL // self.sir_candidates)
        draws, log_weights = [], []
        with torch.no_grad():
            for start in range(0, n, per_pool):
                k = min(per_pool, n - start)
                candidates = self.base.sample(k * self.sir_candidates, generator=generator)
                lw = self._logit_nograd(candidates)
                chosen, _ = importance_resample(candidates, lw, k, generator=generator)
                draws.append(chosen)
                log_weights.append(lw)
        ess = ess_fraction(torch.cat(log_weights))
        self.last_ess_fraction = ess
        return torch.cat(draws), {"ess_fraction": ess}

    # ------------------------------------------------------------------------------------------
    # fitting

    def _check_encodings(self, mu: Tensor, logvar: Tensor) -> None:
        for what, t in (("mu", mu), ("logvar", logvar)):
            if not isinstance(t, Tensor):
                raise DataError(f"ncp fit: {what} must be a torch.Tensor, got {type(t).__name__}")
            if t.ndim != 2 or t.shape[1] != self.latent_dim:
                raise DataError(
                    f"ncp fit: {what} must have shape (N, {self.latent_dim}) for this "
                    f"{self.latent_dim}-dim prior, got {tuple(t.shape)}; pass the encoder outputs "
                    f"of the whole training set"
                )
            if not torch.isfinite(t).all():
                raise DataError(
                    f"ncp fit: {what} contains NaN or infinite values; the encoder diverged or "
                    f"the data has NaNs"
                )
        if mu.shape != logvar.shape:
            raise DataError(f"ncp fit: mu {tuple(mu.shape)} and logvar {tuple(logvar.shape)} "
                            f"must have the same shape")

    def fit(
        self,
        mu: Tensor,
        logvar: Tensor,
        *,
        generator: torch.Generator | None = None,
        progress: bool = False,
        log: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Train the classifier: aggregate posterior (label 1) against the base (label 0).

        ``mu``, ``logvar`` ``(N, D)``: the frozen encoder's outputs for the whole training set.
        A seeded ``heldout_fraction`` of the rows is held out. Each epoch draws fresh
        positives ``mu + exp(logvar / 2) * eps`` for every training row and as many fresh base
        draws, shuffles them into near-equal minibatches and takes Adam steps on the BCE with
        logits. After each epoch the held-out BCE, accuracy and ROC-AUC are measured on fresh
        draws for the held-out rows against as many base draws; training stops after
        ``patience`` epochs without a better held-out BCE and the best weights are restored.

        Training continues from the classifier's current weights (no re-initialization). All
        randomness comes from ``generator`` (default: one seeded with ``seed``), so a fit is
        deterministic. ``log`` gets one record of plain floats per epoch: ``epoch``,
        ``train_loss_mean`` (over the epoch's examples), ``train_loss_min`` (lowest minibatch),
        ``heldout_loss``, ``heldout_accuracy``, ``heldout_auc``. Returns a summary: ``best_epoch``
        and the held-out ``heldout_loss``/``heldout_accuracy``/``heldout_auc`` there,
        ``epochs_run``, ``stopped_early``, ``fit_seconds``, ``num_train``, ``num_heldout``.
        """
        from tqdm import tqdm

        self._check_encodings(mu, logvar)
        started = time.perf_counter()
        ref = self._param_like()
        device, dtype = ref.device, ref.dtype
        mu = mu.detach().to(device=device, dtype=dtype)
        std = torch.exp(0.5 * logvar.detach().to(device=device, dtype=dtype))
        gen = generator if generator is not None else torch.Generator().manual_seed(self.seed)

        n_total = mu.shape[0]
        n_held = max(1, round(self.heldout_fraction * n_total))
        n_train = n_total - n_held
        if n_train < 1:
            raise DataError(f"ncp fit: need at least 2 encodings (training and held-out rows), "
                            f"got {n_total}")
        order = torch.randperm(n_total, generator=gen, device=gen.device).to(device)
        held, train = order[:n_held], order[n_held:]
        self.heldout_index = held
        mu_tr, std_tr, mu_ho, std_ho = mu[train], std[train], mu[held], std[held]
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
        labels_ho = torch.cat([torch.ones(n_held, device=device, dtype=dtype),
                               torch.zeros(n_held, device=device, dtype=dtype)])
        num_batches = max(1, math.ceil(2 * n_train / self.batch_size))
        optimizer = torch.optim.Adam(trainable, lr=self.lr,
                                     weight_decay=self.weight_decay)

        history: list[dict[str, float]] = []
        best_loss, best_epoch, best_state = math.inf, 0, None
        best_record: dict[str, float] = {}
        stale = 0
        bar = tqdm(range(1, self.epochs + 1), desc="fit ncp classifier", unit="epoch",
                   disable=not progress, leave=False)
        for epoch in bar:
            self.classifier.train()
            with torch.no_grad():
                inputs = torch.cat([posterior_draws(mu_tr, std_tr),
                                    self.base.sample(n_train, generator=gen)])
            perm = torch.randperm(2 * n_train, generator=gen, device=gen.device).to(device)
            losses, sizes = [], []
            for index in perm.tensor_split(num_batches):
                loss = F.binary_cross_entropy_with_logits(self.logit(inputs[index]),
                                                          labels_tr[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.detach())
                sizes.append(len(index))
            batch_losses = torch.stack(losses).to(torch.float64)
            if not torch.isfinite(batch_losses).all():
                raise NonFiniteError(f"ncp fit: the classifier loss became NaN or inf in epoch "
                                     f"{epoch}; lower lr (now {self.lr})")
            weights = torch.tensor(sizes, dtype=torch.float64, device=batch_losses.device)
            record = {
                "epoch": float(epoch),
                "train_loss_mean": float((batch_losses * weights).sum() / weights.sum()),
                "train_loss_min": float(batch_losses.min()),
                **self._heldout_metrics(posterior_draws(mu_ho, std_ho),
                                        self.base.sample(n_held, generator=gen), labels_ho),
            }
            history.append(record)
            if log is not None:
                log(dict(record))
            bar.set_postfix(heldout_loss=f"{record['heldout_loss']:.4f}",
                            acc=f"{record['heldout_accuracy']:.3f}")
            if record["heldout_loss"] < best_loss:
                best_loss, best_epoch, best_record, stale = record["heldout_loss"], epoch, record, 0
                best_state = copy.deepcopy(self.classifier.state_dict())
            else:
                stale += 1
                if stale >= self.patience:
                    break
        bar.close()
        if best_state is not None:
            self.classifier.load_state_dict(best_state)
        self.classifier.eval()
        self.fitted.fill_(True)
        self.history = history
        self.fit_summary = {
            "best_epoch": best_epoch,
            "heldout_loss": best_record.get("heldout_loss", math.nan),
            "heldout_accuracy": best_record.get("heldout_accuracy", math.nan),
            "heldout_auc": best_record.get("heldout_auc", math.nan),
            "epochs_run": len(history),
            "stopped_early": len(history) < self.epochs,
            "fit_seconds": time.perf_counter() - started,
            "num_train": n_train,
            "num_heldout": n_held,
        }
        return dict(self.fit_summary)

    @torch.no_grad()
    def _heldout_metrics(self, positives: Tensor, negatives: Tensor,
                         labels: Tensor) -> dict[str, float]:
        self.classifier.eval()
        logits = self._logit_nograd(torch.cat([positives, negatives]))
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        accuracy = ((logits > 0) == (labels > 0.5)).to(torch.float64).mean()
        return {"heldout_loss": float(loss), "heldout_accuracy": float(accuracy),
                "heldout_auc": roc_auc(logits, labels)}


@hookimpl
def ncpvae_register_priors() -> list[type]:
    return [NCPPrior]
