"""Hierarchical priors and hierarchical NCP (public namespace; docs/hierarchical.md).

A latent ``z`` ``(..., D)`` is the concatenation of K groups ``z = (z_1, ..., z_K)`` of sizes
``group_sizes`` (``sum = D``), top group first. The **hierarchical base prior** factorizes top-down,

    p(z) = prod_k p(z_k | z_<k),   p(z_k | z_<k) = N(mean_k(z_<k), diag exp(logvar_k(z_<k))),

(NVAE / LVAE: the model's top-down path gives each conditional). **Hierarchical NCP** tilts each
conditional by its own classifier ``r_k(z_k, z_<k)``:

    p_NCP(z) = prod_k p(z_k | z_<k) exp r_k(z_k, z_<k) / Z_k(z_<k),
    Z_k(c) = E_{p(z_k | c)}[exp r_k(z_k, c)].

Classifier k is fitted to tell ``q(z_k | z_<k)`` (positives: ``z`` drawn from the aggregate
posterior) from ``p(z_k | z_<k)`` (negatives: the same contexts ``z_<k`` with ``z_k`` redrawn from
the base conditional), so at the optimum ``r_k = log q(z_k | z_<k) - log p(z_k | z_<k)`` and
``Z_k = 1`` for every context. A fitted ``r_k`` is not optimal, so ``Z_k`` depends on the context:
it is estimated per context by Monte Carlo (:func:`log_normalizer_per_context`, with its SE) and
the gain of group k over the base is

    Delta_k = E_q[r_k(z_k, z_<k)] - E_q[log Z_k(z_<k)],   sum_k Delta_k = KL(q || p) - KL(q || p_NCP).

Classifiers condition on the latents ``z_<k`` themselves (not on the decoder's top-down features):
docs/hierarchical.md §2 gives the reasons.

Samplers: :func:`sample_groupwise_sir` and :func:`sample_groupwise` (any Markov chain within a
group, conditioned on the groups already drawn) draw from ``p_NCP`` ancestrally, so the context
dependent ``Z_k`` never enters. :func:`joint_energy` is ``-log p(z) - sum_k r_k``: the energy of
``p_NCP`` only up to ``sum_k log Z_k(z_<k)``, which is constant (zero) for optimal classifiers
but not otherwise; whole-vector Langevin on it targets that approximation (docs/hierarchical.md §4).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ncpvae.errors import ConfigError, DataError, NonFiniteError
from ncpvae.prior import Prior
from ncpvae.prior_fitting import seeded_init
from ncpvae.tilted import MLPClassifier

__all__ = [
    "HierarchicalPrior",
    "HierarchicalTilt",
    "GroupMove",
    "check_group_sizes",
    "split_groups",
    "diagonal_gaussian_log_prob",
    "log_mean_exp_rows",
    "log_normalizer_per_context",
    "gain_terms",
    "group_gains",
    "group_energy",
    "joint_energy",
    "fit_group_classifiers",
    "sample_groupwise_sir",
    "sample_groupwise",
]

LOG_2PI = math.log(2 * math.pi)

#: ``move(energy, init, generator) -> final`` runs a Markov chain per row of ``init`` ``(n, d_k)``
#: on ``energy`` (``(n, d_k) -> (n,)``) and returns the final positions ``(n, d_k)``.
GroupMove = Callable[[Callable[[Tensor], Tensor], Tensor, "torch.Generator | None"], Tensor]


def check_group_sizes(group_sizes: Sequence[int], latent_dim: int | None = None) -> tuple[int, ...]:
    """``group_sizes`` as a tuple of positive ints (summing to ``latent_dim`` when given)."""
    sizes = tuple(int(s) for s in group_sizes)
    if not sizes or any(s < 1 for s in sizes):
        raise ConfigError(f"group sizes must be a non-empty list of positive integers, got "
                          f"{list(group_sizes)}")
    if latent_dim is not None and sum(sizes) != latent_dim:
        raise ConfigError(f"group sizes {list(sizes)} sum to {sum(sizes)}, not to the latent "
                          f"size {latent_dim}")
    return sizes


def split_groups(z: Tensor, group_sizes: Sequence[int]) -> list[Tensor]:
    """``(..., D) -> [(..., d_1), ..., (..., d_K)]`` (views), top group first."""
    if z.shape[-1] != sum(group_sizes):
        raise DataError(f"latents: expected last dimension {sum(group_sizes)} (groups "
                        f"{list(group_sizes)}), got shape {tuple(z.shape)}")
    return list(z.split(list(group_sizes), dim=-1))


def diagonal_gaussian_log_prob(x: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """``log N(x; mean, diag exp(logvar))`` summed over the last dimension: ``(..., d) -> (...)``."""
    return -0.5 * (((x - mean) ** 2) * torch.exp(-logvar) + logvar + LOG_2PI).sum(-1)


class HierarchicalPrior(Prior):
    """A top-down prior ``p(z) = prod_k N(z_k; mean_k(z_<k), diag exp(logvar_k(z_<k)))``.

    A subclass gives :meth:`conditional`; the density, ancestral sampling and per-group pieces
    follow. It is a :class:`~ncpvae.Prior` over the concatenated latent ``(..., D)``, so flat
    tools (flat priors, samplers on its energy) keep working on it. It has no per-dimension
    closed-form KL from a diagonal Gaussian posterior (``kl_from_gaussian`` is None): the
    hierarchical objective sums the per-group KLs itself.
    """

    def __init__(self, group_sizes: Sequence[int], config: Any = None):
        sizes = check_group_sizes(group_sizes)
        super().__init__(sum(sizes), config)
        self.group_sizes = sizes

    @property
    def num_groups(self) -> int:
        return len(self.group_sizes)

    def context_dim(self, k: int) -> int:
        """``sum_{j<k} d_j``: the width of group k's context ``z_<k``."""
        return sum(self.group_sizes[:k])

    @abstractmethod
    def conditional(self, k: int, context: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, logvar)`` of ``p(z_k | z_<k = context)``, each ``(n, d_k)``; ``context`` is
        ``(n, context_dim(k))`` (``(n, 0)`` for the top group)."""

    def group_log_prob(self, k: int, z_k: Tensor, context: Tensor) -> Tensor:
        """``log p(z_k | context)``: ``(n, d_k), (n, c_k) -> (n,)``."""
        mean, logvar = self.conditional(k, context)
        return diagonal_gaussian_log_prob(z_k, mean, logvar)

    def sample_group(self, k: int, context: Tensor, *, generator: torch.Generator | None = None
                     ) -> Tensor:
        """One draw of ``p(z_k | context)`` per row: ``(n, c_k) -> (n, d_k)``."""
        mean, logvar = self.conditional(k, context)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * noise

    def log_prob(self, z: Tensor) -> Tensor:
        """``sum_k log p(z_k | z_<k)``, ``(..., D) -> (...)``."""
        flat = z.reshape(-1, self.latent_dim)
        groups = split_groups(flat, self.group_sizes)
        total = flat.new_zeros(flat.shape[0])
        for k, z_k in enumerate(groups):
            total = total + self.group_log_prob(k, z_k, flat[:, :self.context_dim(k)])
        return total.reshape(z.shape[:-1])

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` ancestral draws ``(n, D)``, top group first."""
        ref = self._param_like()
        z = torch.empty(n, 0, device=ref.device, dtype=ref.dtype)
        for k in range(self.num_groups):
            z = torch.cat([z, self.sample_group(k, z, generator=generator)], dim=-1)
        return z


class HierarchicalTilt(nn.Module):
    """The K classifiers ``r_k(z_k, z_<k)`` of hierarchical NCP.

    ``classifiers[k]`` maps the row-wise concatenation ``(z_k, z_<k)`` ``(n, d_k + c_k)`` to
    logits ``(n,)``; by default a :class:`~ncpvae.tilted.MLPClassifier` (zero head, so an unfitted
    tilt is the base) seeded from ``seed + k`` without touching the global RNG.
    """

    def __init__(self, group_sizes: Sequence[int], *, hidden: Sequence[int] = (256, 256),
                 activation: str = "silu", normalization: str = "none", seed: int = 0,
                 classifiers: Sequence[nn.Module] | None = None):
        super().__init__()
        self.group_sizes = check_group_sizes(group_sizes)
        if classifiers is None:
            classifiers = [seeded_init(seed + k, lambda k=k: MLPClassifier(
                sum(self.group_sizes[:k + 1]), hidden, activation, normalization))
                for k in range(len(self.group_sizes))]
        if len(classifiers) != len(self.group_sizes):
            raise ConfigError(f"need one classifier per group ({len(self.group_sizes)}), got "
                              f"{len(classifiers)}")
        self.classifiers = nn.ModuleList(classifiers)

    def logit(self, k: int, z_k: Tensor, context: Tensor) -> Tensor:
        """``r_k(z_k, context)``: ``(n, d_k), (n, c_k) -> (n,)``."""
        out = self.classifiers[k](torch.cat([z_k, context], dim=-1))
        if not isinstance(out, Tensor) or out.shape != z_k.shape[:1]:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise DataError(f"classifier {k} must map (n, {z_k.shape[-1] + context.shape[-1]}) "
                            f"to logits (n,), got {got}")
        return out

    def group_logits(self, z: Tensor) -> Tensor:
        """Every group's logit: ``(n, D) -> (n, K)``."""
        groups = split_groups(z, self.group_sizes)
        return torch.stack([self.logit(k, z_k, z[:, :sum(self.group_sizes[:k])])
                            for k, z_k in enumerate(groups)], dim=-1)


def log_mean_exp_rows(values: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise ``log mean exp`` of ``values`` ``(n, M)`` and its delta-method SE, each ``(n,)``
    in float64: ``SE(log Z-hat) = std(w / Z-hat) / sqrt(M)`` with ``w = exp(values)``; biased
    low by about ``SE^2 / 2`` (Jensen)."""
    v = values.detach().to(torch.float64)
    if torch.isnan(v).any() or torch.isposinf(v).any():
        raise NonFiniteError("a classifier returned NaN or +inf on base-prior draws")
    m = v.shape[-1]
    top = v.max(-1, keepdim=True).values
    scaled = torch.exp(v - top)
    mean = scaled.mean(-1, keepdim=True)
    log_z = (top + torch.log(mean)).squeeze(-1)
    relative = scaled / mean
    se = torch.sqrt(((relative - 1.0) ** 2).sum(-1) / (m - 1) / m)
    return log_z, se


@torch.no_grad()
def log_normalizer_per_context(prior: HierarchicalPrior, tilt: HierarchicalTilt, k: int,
                               context: Tensor, num_samples: int, *,
                               generator: torch.Generator | None = None,
                               chunk_rows: int = 1 << 18) -> tuple[Tensor, Tensor]:
    """Monte Carlo ``log Z_k(c) = log E_{p(z_k|c)}[exp r_k(z_k, c)]`` for each row ``c`` of
    ``context`` ``(n, c_k)``, from ``num_samples`` base draws per context; returns ``(log Z, SE)``
    each ``(n,)`` float64 (:func:`log_mean_exp_rows`). Contexts are processed in blocks of about
    ``chunk_rows`` draws."""
    if num_samples < 2:
        raise ConfigError(f"log Z needs at least 2 draws per context, got {num_samples}")
    per_block = max(1, chunk_rows // num_samples)
    logs, ses = [], []
    for block in context.split(per_block):
        rep = block.repeat_interleave(num_samples, dim=0)
        draws = prior.sample_group(k, rep, generator=generator)
        values = tilt.logit(k, draws, rep).reshape(len(block), num_samples)
        log_z, se = log_mean_exp_rows(values)
        logs.append(log_z)
        ses.append(se)
    if not logs:
        return context.new_zeros(0, dtype=torch.float64), context.new_zeros(0, dtype=torch.float64)
    return torch.cat(logs), torch.cat(ses)


@torch.no_grad()
def gain_terms(prior: HierarchicalPrior, tilt: HierarchicalTilt, latents: Tensor,
               num_samples: int = 1000, *, generator: torch.Generator | None = None
               ) -> tuple[Tensor, Tensor]:
    """Per row and group, ``r_k(z_k, z_<k) - log Z_k(z_<k)`` ``(N, K)`` (each ``log Z_k`` from
    ``num_samples`` base draws per context) and the per-context SEs of those ``log Z_k``
    ``(N, K)``, float64, on aggregate-posterior draws ``latents`` ``(N, D)``."""
    if latents.ndim != 2 or latents.shape[1] != prior.latent_dim or latents.shape[0] < 2:
        raise DataError(f"group gains: expected held-out latents (N, {prior.latent_dim}) with "
                        f"N >= 2, got {tuple(latents.shape)}")
    terms, ses = [], []
    for k, z_k in enumerate(split_groups(latents, prior.group_sizes)):
        context = latents[:, :prior.context_dim(k)]
        r = tilt.logit(k, z_k, context).to(torch.float64)
        log_z, se_z = log_normalizer_per_context(prior, tilt, k, context, num_samples,
                                                 generator=generator)
        terms.append(r - log_z)
        ses.append(se_z)
    return torch.stack(terms, -1), torch.stack(ses, -1)


def group_gains(prior: HierarchicalPrior, tilt: HierarchicalTilt, latents: Tensor,
                num_samples: int = 1000, *, generator: torch.Generator | None = None
                ) -> list[dict[str, float]]:
    """Per-group ``Delta_k = E_q[r_k(z_k, z_<k) - log Z_k(z_<k)]`` on held-out aggregate-posterior
    draws ``latents`` ``(N, D)`` (:func:`gain_terms`). One dict per group: ``delta``, ``se`` (the
    SE of the mean of the per-row terms, which carries the Monte Carlo noise of each
    ``log Z_k`` estimate since those are independent across rows), ``mean_logit``,
    ``mean_log_z`` (``E_q[log Z_k]``, 0 for an optimal classifier) and ``log_z_bias``: each
    per-context estimate is biased low by about ``SE^2 / 2`` (Jensen), so ``delta`` is biased
    high by about the mean of that, reported here and not corrected."""
    terms, ses = gain_terms(prior, tilt, latents, num_samples, generator=generator)
    out = []
    for k in range(terms.shape[1]):
        t = terms[:, k]
        out.append({"delta": float(t.mean()), "se": float(t.std() / math.sqrt(t.numel())),
                    "log_z_bias": float((ses[:, k] ** 2).mean() / 2)})
    with torch.no_grad():
        logits = tilt.group_logits(latents).to(torch.float64).mean(0)
    for k, record in enumerate(out):
        record["mean_logit"] = float(logits[k])
        record["mean_log_z"] = float(logits[k]) - record["delta"]
    return out


def group_energy(prior: HierarchicalPrior, tilt: HierarchicalTilt | None, k: int,
                 context: Tensor) -> Callable[[Tensor], Tensor]:
    """The energy of group k's tilted conditional, one context per chain:
    ``U(z_k) = -log p(z_k | c) - r_k(z_k, c)``, ``(n, d_k) -> (n,)`` with ``c = context[i]`` for
    chain i (batch-separable; ``tilt`` None gives the base conditional). Marked
    ``rows_indexed``, so samplers evaluate its chains at once, never in row blocks."""
    context = context.detach()

    def energy(z_k: Tensor) -> Tensor:
        u = -prior.group_log_prob(k, z_k, context)
        return u if tilt is None else u - tilt.logit(k, z_k, context)

    energy.rows_indexed = True  # chain i has context[i]: never evaluated in row blocks
    return energy


def joint_energy(prior: HierarchicalPrior, tilt: HierarchicalTilt) -> Callable[[Tensor], Tensor]:
    """``U(z) = -log p(z) - sum_k r_k(z_k, z_<k)``, ``(C, D) -> (C,)``, for whole-vector samplers.

    Equal to ``-log p_NCP(z)`` up to ``sum_k log Z_k(z_<k)``: a constant only when every ``Z_k``
    is (optimal classifiers give ``Z_k = 1``). The group-wise samplers are exact instead."""

    def energy(z: Tensor) -> Tensor:
        return -prior.log_prob(z) - tilt.group_logits(z).sum(-1)

    return energy


def fit_group_classifiers(prior: HierarchicalPrior, tilt: HierarchicalTilt, latents: Tensor, *,
                          epochs: int = 20, batch_size: int = 256, lr: float = 1e-3,
                          weight_decay: float = 0.0, heldout_fraction: float = 0.1,
                          heldout: Tensor | None = None, heldout_encodings: int | None = None,
                          resample: Callable[[torch.Generator], Tensor] | None = None,
                          patience: int | None = None, min_steps: int = 0,
                          generator: torch.Generator | None = None, progress: bool = False,
                          log: Callable[[dict[str, Any]], None] | None = None
                          ) -> dict[str, Any]:
    """Fit every ``r_k`` by logistic regression, with ``prior`` frozen.

    ``latents`` ``(N, D)``: draws of the aggregate posterior ``q(z)`` (one or more per training
    image). For group k a positive is a row ``(z_k, z_<k)``, its negative ``(z'_k, z_<k)`` with
    ``z'_k ~ p(z_k | z_<k)`` fresh each time (the same context, so the classifier learns
    ``log q(z_k|z_<k) - log p(z_k|z_<k)`` and not a ratio of the contexts). The K classifiers
    are independent; they are trained in one loop on the sum of their losses (Adam's updates are
    per parameter, so this equals K separate fits on the same minibatches).

    Held-out rows: ``heldout`` ``(M, D)`` when given (``latents`` are then all training rows),
    else a seeded ``heldout_fraction`` of ``latents``. Their negatives are drawn once, so every
    epoch scores the same pairs. ``heldout_encodings``: the rows of ``heldout`` are that many
    encodings' draws in draw-major order (:func:`ncpvae.prior_fitting.heldout_draws`); the
    stopping SE then counts encodings, not correlated draws. ``resample(generator)``: fresh
    training rows ``(N', D)`` for every epoch after the first (fresh draws of ``q(z|x)``).

    Budget and stopping as every epoch fit (:class:`ncpvae.EarlyStopping`, docs/priors.md §9):
    at least ``min_steps`` optimizer steps, and with ``patience`` a stop after that many epochs
    without a held-out loss (summed over the groups) lower by more than 2 paired SE; the weights
    of the lowest held-out loss are restored. ``patience=None`` runs ``epochs`` epochs and keeps
    the last weights. ``log`` receives one record per held-out check. Returns ``{"history":
    [...], "heldout_index": Tensor (the held-out rows of latents, empty with heldout)}`` and
    the stopper's ``best_epoch``, ``epochs_run``, ``steps_run``, ``min_epochs``,
    ``stopped_early``.
    """
    from ncpvae.fitting import EarlyStopping
    from ncpvae.prior_fitting import per_encoding

    if latents.ndim != 2 or latents.shape[1] != prior.latent_dim:
        raise DataError(f"hierarchical NCP fit: expected latents (N, {prior.latent_dim}), got "
                        f"{tuple(latents.shape)}")
    if not torch.isfinite(latents).all():
        raise DataError("hierarchical NCP fit: the latents contain NaN or infinite values")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    if heldout is None:
        n = latents.shape[0]
        n_held = max(1, round(heldout_fraction * n))
        if n - n_held < 1:
            raise DataError(f"hierarchical NCP fit: need at least 2 latents, got {n}")
        order = torch.randperm(n, generator=gen).to(latents.device)
        held_index = order[:n_held]
        held, train = latents[held_index], latents[order[n_held:]]
    else:
        held_index = torch.zeros(0, dtype=torch.long, device=latents.device)
        held, train = heldout, latents
    opt = torch.optim.Adam(tilt.parameters(), lr=lr, weight_decay=weight_decay)
    bce = nn.functional.binary_cross_entropy_with_logits
    for p in prior.parameters():
        p.requires_grad_(False)

    def pair_losses(z: Tensor, negatives: Sequence[Tensor] | None = None,
                    reduction: str = "mean") -> Tensor:
        """Each group's BCE on positives ``z`` and their negatives (drawn when not given):
        ``(K,)`` means, or ``(n, K)`` per row with ``reduction="none"``."""
        out = []
        for k, z_k in enumerate(split_groups(z, prior.group_sizes)):
            context = z[:, :prior.context_dim(k)]
            neg = (negatives[k] if negatives is not None
                   else prior.sample_group(k, context, generator=gen).detach())
            pos_logit, neg_logit = tilt.logit(k, z_k, context), tilt.logit(k, neg, context)
            out.append(bce(pos_logit, torch.ones_like(pos_logit), reduction=reduction)
                       + bce(neg_logit, torch.zeros_like(neg_logit), reduction=reduction))
        return torch.stack(out, -1) / 2

    with torch.no_grad():
        held_negatives = [prior.sample_group(k, held[:, :prior.context_dim(k)], generator=gen)
                          for k in range(prior.num_groups)]
    steps_per_epoch = max(1, math.ceil(len(train) / batch_size))
    stopper = EarlyStopping(tilt, epochs=epochs, patience=epochs if patience is None else patience,
                            min_steps=min_steps, steps_per_epoch=steps_per_epoch,
                            threshold=2.0 if patience is not None else math.inf,
                            desc="fit hier_ncp", progress=progress, log=log)
    for epoch in stopper:
        if resample is not None and epoch > 1:
            train = resample(gen)
        perm = torch.randperm(len(train), generator=gen).to(latents.device)
        total, batches = torch.zeros(prior.num_groups, dtype=torch.float64), 0
        for start in range(0, len(train), batch_size):
            loss = pair_losses(train[perm[start:start + batch_size]])
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
            total += loss.detach().to(torch.float64).cpu()
            batches += 1
        if not stopper.due(epoch):
            continue
        with torch.no_grad():
            per_row = pair_losses(held, held_negatives, "none").to(torch.float64)
        held_loss = per_row.mean(0).cpu()
        values = per_row.sum(-1)
        if heldout_encodings is not None:
            values = per_encoding(values, heldout_encodings)
        record = {"epoch": epoch, "train_loss": (total / batches).tolist(),
                  "heldout_loss": held_loss.tolist(),
                  **{f"heldout_loss_group{k + 1}": float(v) for k, v in enumerate(held_loss)}}
        stopper.update(record, loss=float(held_loss.sum()), values=values)
    last = None if patience is not None else {k: v.clone() for k, v in tilt.state_dict().items()}
    stopper.restore()  # closes the progress bar; loads the best weights
    if last is not None:  # without early stopping the fit is the last epoch's weights
        tilt.load_state_dict(last)
    return {"history": stopper.history, "heldout_index": held_index,
            "best_epoch": stopper.best_epoch if patience is not None else stopper.epoch,
            "epochs_run": stopper.epoch, "steps_run": stopper.epoch * steps_per_epoch,
            "min_epochs": stopper.min_epochs, "stopped_early": stopper.epoch < stopper.epochs}


@torch.no_grad()
def sample_groupwise_sir(prior: HierarchicalPrior, tilt: HierarchicalTilt, n: int,
                         num_candidates: int, *, generator: torch.Generator | None = None
                         ) -> tuple[Tensor, list[float]]:
    """Group-wise SIR from ``p_NCP``: for each group top-down and each of the ``n`` rows, draw
    ``num_candidates`` candidates of ``p(z_k | z_<k)`` given that row's groups so far, weight them
    by ``exp r_k`` and keep one (multinomial). Returns ``(z (n, D), ess)`` with ``ess[k]`` the
    mean over rows of the Kish ESS fraction of group k's weights. Each row's SIR targets its
    own tilted conditional, so ``Z_k(z_<k)`` is never needed; the draws are exact as
    ``num_candidates -> inf``."""
    if n < 0 or num_candidates < 1:
        raise ConfigError(f"group-wise SIR needs n >= 0 and num_candidates >= 1, got {n} and "
                          f"{num_candidates}")
    ref = prior._param_like()
    z = torch.empty(n, 0, device=ref.device, dtype=ref.dtype)
    ess = []
    for k in range(prior.num_groups):
        rep = z.repeat_interleave(num_candidates, dim=0)
        cand = prior.sample_group(k, rep, generator=generator)
        lw = tilt.logit(k, cand, rep).reshape(n, num_candidates).to(torch.float64)
        if torch.isnan(lw).any() or torch.isposinf(lw).any():
            raise NonFiniteError(f"classifier {k} returned NaN or +inf on SIR candidates")
        probs = torch.softmax(lw, -1)
        device = generator.device if generator is not None else probs.device
        pick = torch.multinomial(probs.to(device), 1, generator=generator).squeeze(-1)
        chosen = cand.reshape(n, num_candidates, -1)[torch.arange(n), pick.to(cand.device)]
        row_ess = torch.exp(2 * torch.logsumexp(lw, -1) - torch.logsumexp(2 * lw, -1))
        ess.append(float(row_ess.mean() / num_candidates) if n else float("nan"))
        z = torch.cat([z, chosen], dim=-1)
    return z, ess


def sample_groupwise(prior: HierarchicalPrior, tilt: HierarchicalTilt | None, n: int,
                     move: GroupMove, *, generator: torch.Generator | None = None) -> Tensor:
    """Group-wise Markov chains from ``p_NCP`` (``tilt`` None: from the base): for each group
    top-down, one chain per row started at a base draw ``z_k ~ p(z_k | z_<k)`` and moved by
    ``move`` on :func:`group_energy` with that row's groups so far as context. ``move`` wraps any
    sampler (e.g. ``lambda U, x, g: sampler.run(U, x, 200, burn_in=100, generator=g,
    diagnose=False).samples[-1]`` for ULA or MALA). Returns ``(n, D)``."""
    ref = prior._param_like()
    z = torch.empty(n, 0, device=ref.device, dtype=ref.dtype)
    for k in range(prior.num_groups):
        with torch.no_grad():
            init = prior.sample_group(k, z, generator=generator)
        final = move(group_energy(prior, tilt, k, z), init, generator).detach()
        if final.shape != init.shape:
            raise DataError(f"group move must return the final positions {tuple(init.shape)}, "
                            f"got {tuple(final.shape)}")
        z = torch.cat([z, final], dim=-1)
    return z
