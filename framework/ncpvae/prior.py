"""The latent prior interface.

Shapes: ``z`` is ``(..., D)``; ``log_prob`` and ``energy`` return ``(...)``. The energy is
``U(z) = -log p(z)`` up to an additive constant and is batch-separable (row i depends on
``z[i]`` only), so ``autograd.grad(U(z).sum(), z)`` gives each chain its own gradient.
"""

from __future__ import annotations

import math
import time
from abc import ABCMeta, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from ncpvae.component import Component, ComponentConfig
from ncpvae.errors import ConfigError, DataError, NotFittedError
from ncpvae.sharding import ONE_PROCESS, ShardGroup

if TYPE_CHECKING:
    from ncpvae.model import LatentModel


class Prior(nn.Module, Component, metaclass=ABCMeta):
    """A density over latents ``z`` in R^D.

    Capability flags (class attributes): ``normalized`` (``log_prob`` includes the normalizer),
    ``requires_fit`` (learned after the VAE is trained, with the VAE frozen), ``exact_sampling``
    (``sample`` draws exactly from the prior rather than approximately). ``trained_with_vae``:
    its parameters (``joint_parameters``, e.g. a VampPrior's pseudo-inputs) are trained jointly
    with the encoder, so a frozen VAE leaves nothing to fit post hoc (``ncpvae compare-priors``
    refuses it except as the run's own prior).

    ``config`` holds the validated settings the prior reads its hyperparameters from, as a
    sampler does (see :meth:`checked_config`); the built-in priors always have one (their
    ``Config`` defaults when none is given). It is None for a prior built without one.
    """

    kind: ClassVar[str] = "prior"
    normalized: ClassVar[bool] = True
    requires_fit: ClassVar[bool] = False
    exact_sampling: ClassVar[bool] = True
    #: how ``sample`` draws, for figure titles and reports (e.g. "SIR" for the NCP prior)
    sampling_method: ClassVar[str] = "exact"
    trained_with_vae: ClassVar[bool] = False
    #: what of the prior is trained with the VAE, for messages (with ``trained_with_vae``)
    joint_parameters: ClassVar[str] = "parameters"

    def __init__(self, latent_dim: int, config: ComponentConfig | None = None):
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
        if config is not None and not isinstance(config, ComponentConfig):
            raise ConfigError(f"{type(self).__name__}: config must be a ComponentConfig, got "
                              f"{type(config).__name__}")
        self.latent_dim = int(latent_dim)
        self.config = config

    @classmethod
    def checked_config(cls, config: ComponentConfig | None) -> ComponentConfig:
        """``config`` if it is a ``cls.Config``, or ``cls.Config()`` (its defaults) when None;
        a class whose ``__init__`` reads its settings calls it on itself, e.g.
        ``GaussianPrior.checked_config(config)``, so that a subclass with its own ``Config``
        still gets the settings its parent reads."""
        if config is None:
            config = cls.Config()
        if not isinstance(config, cls.Config):
            raise ConfigError(f"{cls.__name__} needs a {cls.__name__}.Config, got "
                              f"{type(config).__name__}")
        return config

    @abstractmethod
    def log_prob(self, z: Tensor) -> Tensor:
        """``(..., D) -> (...)``: log density (unnormalized when ``normalized`` is False)."""

    @abstractmethod
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` latents, ``(n, D)``, on the prior's device and dtype."""

    def energy(self, z: Tensor) -> Tensor:
        """``(..., D) -> (...)``: ``-log p(z)`` up to a constant (the sampler's target)."""
        return -self.log_prob(z)

    def kl_from_gaussian(self, mu: Tensor, logvar: Tensor) -> Tensor | None:
        """Per-dimension ``KL(N(mu, exp(logvar)) || p)``, ``(B, D)``, or None without a closed form."""
        return None

    def bind_model(self, model: LatentModel) -> None:
        """Called once by the runner after the model is built. A prior defined through the
        model (the VampPrior's ``q(z | u_k)`` uses the encoder) keeps what it needs here; the
        default does nothing."""

    @property
    def base_prior(self) -> Prior:
        """The tractable prior this one builds on: itself here. The VAE trains against it and
        samplers start from it; a learned prior such as NCP returns its base."""
        return self

    @property
    def label(self) -> str:
        """A short human name for tables and figure titles (e.g. ``N(0, I)``, ``NCP``); the
        registry name unless a prior says otherwise."""
        return self.name

    @classmethod
    def capabilities(cls) -> dict[str, bool]:
        return {
            "normalized": cls.normalized,
            "requires_fit": cls.requires_fit,
            "exact_sampling": cls.exact_sampling,
        }

    def check_latents(self, z: Tensor, what: str = "latents") -> None:
        """Raise a clear error unless ``z`` is ``(..., D)`` and finite."""
        if z.ndim < 1 or z.shape[-1] != self.latent_dim:
            raise DataError(
                f"{what}: expected shape (..., {self.latent_dim}) for a {self.latent_dim}-dim "
                f"{self.name} prior, got {tuple(z.shape)}"
            )
        if not torch.isfinite(z).all():
            raise DataError(f"{what}: contain NaN or infinite values")

    def _param_like(self) -> Tensor:
        """A floating tensor carrying the module's device and dtype (parameters or buffers)."""
        for t in (*self.parameters(), *self.buffers()):
            if t.is_floating_point():
                return t
        return torch.empty(0)


@dataclass(frozen=True)
class FitOptions:
    """How one :meth:`LearnedPrior.fit` call runs (built by ``fit`` for :meth:`LearnedPrior._fit`).

    ``generator``: the source of every random draw; ``progress``: show a progress bar; ``log``:
    receives one plain-data record per epoch (or None); ``shards``: the data-parallel ranks
    (a :class:`~ncpvae.ShardGroup`; world size 1 for one process or a prior that fits whole on
    every rank); ``started``: ``time.perf_counter()`` at the call, for ``fit_seconds``.
    """

    generator: torch.Generator
    progress: bool = False
    log: Callable[[dict[str, Any]], None] | None = None
    shards: ShardGroup = ONE_PROCESS
    started: float = 0.0


def check_encodings(who: str, mu: Tensor, logvar: Tensor, latent_dim: int) -> None:
    """Raise :class:`DataError` unless ``mu`` and ``logvar`` are finite ``(N, latent_dim)``."""
    for what, t in (("mu", mu), ("logvar", logvar)):
        if not isinstance(t, Tensor):
            raise DataError(f"{who} fit: {what} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 2 or t.shape[1] != latent_dim:
            raise DataError(
                f"{who} fit: {what} must have shape (N, {latent_dim}) for this "
                f"{latent_dim}-dim prior, got {tuple(t.shape)}; pass the encoder outputs "
                f"of the whole training set"
            )
        if not torch.isfinite(t).all():
            raise DataError(
                f"{who} fit: {what} contains NaN or infinite values; the encoder diverged or "
                f"the data has NaNs"
            )
    if mu.shape != logvar.shape:
        raise DataError(f"{who} fit: mu {tuple(mu.shape)} and logvar {tuple(logvar.shape)} "
                        f"must have the same shape")


class LearnedPrior(Prior):
    """A prior fitted ex post to the frozen VAE's aggregate posterior ``q(z) = E_x q(z|x)``.

    What the runner, the evaluation and the report use (nothing else is probed):

    - :meth:`fit` and :attr:`is_fitted`;
    - :meth:`log_normalizer`: ``(log Z, SE)``, ``(0, 0)`` for a normalized prior;
    - :meth:`log_ratio`: ``log p(z) - log p_base(z)`` up to the constant ``log Z``;
    - :meth:`kl_gain`: ``Delta = E_q[log_ratio] - log Z`` over the base prior, with its SE;
    - :meth:`sampling_info`: diagnostics of the last :meth:`sample` call (e.g. an importance
      sampler's ESS fraction), plain numbers;
    - :meth:`gain_parts`: the parts of the last :meth:`kl_gain` (e.g. one per latent group).
    """

    requires_fit: ClassVar[bool] = True
    #: whether :meth:`fit` splits its minibatches over ``shards`` (see :meth:`fit`)
    shardable_fit: ClassVar[bool] = False
    #: seeds :meth:`fit` when no generator is given (priors built by ``from_config`` set the
    #: run seed)
    seed: int = 0
    #: what :meth:`require_fitted`'s error says the prior lacks (e.g. "a fitted mixture")
    fitted_part: ClassVar[str] = "a fit"

    def register_fitted_flag(self, fitted: bool = False) -> None:
        """Keep the fitted state in a bool buffer ``fitted`` (so a fitted checkpoint's state dict
        carries it); :attr:`is_fitted` then reads it and :meth:`mark_fitted` sets it. A prior
        may instead override :attr:`is_fitted` with its own notion."""
        self.register_buffer("fitted", torch.tensor(bool(fitted)))

    @property
    def is_fitted(self) -> bool:
        """True once :meth:`fit` has run or a fitted state dict was loaded (the ``fitted``
        buffer of :meth:`register_fitted_flag`; override it otherwise)."""
        flag = self._buffers.get("fitted")
        if flag is None:
            raise NotImplementedError(f"the {self.name} prior must call register_fitted_flag() "
                                      f"in __init__ or override is_fitted")
        return bool(flag)

    def mark_fitted(self) -> None:
        """Set the ``fitted`` buffer (at the end of a successful :meth:`fit`)."""
        flag = self._buffers.get("fitted")
        if flag is None:
            raise NotImplementedError(f"the {self.name} prior has no fitted flag: call "
                                      f"register_fitted_flag() in __init__")
        flag.fill_(True)

    def require_fitted(self, what: str) -> None:
        """Raise :class:`~ncpvae.NotFittedError` (``what`` names the method) unless fitted."""
        if not self.is_fitted:
            raise NotFittedError(
                f"the {self.name} prior's {what} needs {self.fitted_part}: call "
                f"prior.fit(mu, logvar) with the frozen VAE's training-set encodings, or load a "
                f"fitted state dict")

    def fit(
        self,
        mu: Tensor,
        logvar: Tensor,
        *,
        generator: torch.Generator | None = None,
        progress: bool = False,
        log: Callable[[dict[str, Any]], None] | None = None,
        shards: ShardGroup | None = None,
    ) -> dict[str, Any]:
        """Fit to the aggregate posterior of a frozen VAE.

        ``mu`` and ``logvar`` are the encoder outputs ``(N, D)`` for the whole training set;
        fresh reparameterized draws ``z ~ q(z|x)`` are made from them as needed. ``log`` receives
        one plain-data record per epoch; the return value is a plain-data summary. All
        randomness comes from ``generator`` (default: one seeded with the prior's ``seed``).

        ``shards`` (a :class:`~ncpvae.ShardGroup`, e.g. ``ShardGroup.from_process_group()``
        under ``torchrun``): the ranks of a data-parallel fit, every one calling ``fit`` with
        the same encodings and an identically seeded generator. A prior with
        ``shardable_fit = True`` then splits each minibatch across the ranks and averages the
        gradients, so every rank ends with the single-process fit (up to float reduction
        order); any other prior fits whole on every rank (the same result, repeated).

        This checks the encodings (:func:`check_encodings`) and calls :meth:`_fit` with a
        :class:`FitOptions`; a subclass implements :meth:`_fit` (or overrides ``fit`` whole).
        """
        check_encodings(self.name, mu, logvar, self.latent_dim)
        started = time.perf_counter()
        gen = generator if generator is not None else torch.Generator().manual_seed(self.seed)
        use = shards if (self.shardable_fit and shards is not None) else ONE_PROCESS
        return self._fit(mu, logvar, FitOptions(gen, progress, log, use, started))

    def _fit(self, mu: Tensor, logvar: Tensor, options: FitOptions) -> dict[str, Any]:
        """The fit itself, on checked encodings ``mu``, ``logvar`` ``(N, D)``: see :meth:`fit`."""
        raise NotImplementedError(f"the {self.name} prior must implement _fit() (or fit())")

    def log_normalizer(
        self, num_samples: int | None = None, *, generator: torch.Generator | None = None
    ) -> tuple[float, float]:
        """``(log Z, SE)`` of ``log_prob``'s normalizer: ``(0.0, 0.0)`` when ``normalized``."""
        if not self.normalized:
            raise NotImplementedError(
                f"the unnormalized {self.name} prior must implement log_normalizer()")
        return 0.0, 0.0

    def log_ratio(self, z: Tensor) -> Tensor:
        """``(..., D) -> (...)``: ``log p(z) - log p_base(z)`` without ``log Z``."""
        return self.log_prob(z) - self.base_prior.log_prob(z)

    def gain_parts(self) -> dict[str, list[float]]:
        """The parts of the last :meth:`kl_gain`, as lists of plain floats of one length (e.g. a
        hierarchical prior's ``group_delta`` and ``group_delta_se``, top group first); {} when
        the gain has no parts (the default)."""
        return {}

    def kl_gain(
        self,
        latents: Tensor,
        *,
        num_samples: int | None = None,
        generator: torch.Generator | None = None,
        log_normalizer: tuple[float, float] | None = None,
    ) -> tuple[float, float]:
        """``Delta = E_q[log_ratio(z)] - log Z`` on held-out draws ``latents`` ``(N, D)`` of
        ``q(z|x)``, and its standard error (the SE of the mean and that of ``log Z`` add in
        quadrature). Delta estimates ``KL(q || base) - KL(q || self)``: positive means this prior
        fits the aggregate posterior better than its base. ``log_normalizer``: a ``(log Z, SE)``
        already estimated (by :meth:`log_normalizer`); None estimates it here from
        ``num_samples`` draws of ``generator``. Plain floats."""
        if latents.ndim != 2 or latents.shape[1] != self.latent_dim or latents.shape[0] < 2:
            raise DataError(
                f"kl_gain: expected held-out latents of shape (N, {self.latent_dim}) with N >= 2, "
                f"got {tuple(latents.shape)}"
            )
        if not torch.isfinite(latents).all():
            raise DataError("kl_gain: the held-out latents contain NaN or infinite values")
        ref = self._param_like()
        with torch.no_grad():
            ratio = torch.cat([self.log_ratio(part) for part in
                               latents.to(device=ref.device, dtype=ref.dtype).split(65_536)])
        ratio = ratio.to(torch.float64)
        mean = float(ratio.mean())
        se_mean = float(ratio.std() / math.sqrt(ratio.numel()))
        log_z, se_z = (log_normalizer if log_normalizer is not None
                       else self.log_normalizer(num_samples, generator=generator))
        return mean - log_z, math.sqrt(se_mean**2 + se_z**2)

    def sampling_info(self) -> dict[str, float]:
        """Diagnostics of the last :meth:`sample` call (plain numbers); none by default."""
        return {}
