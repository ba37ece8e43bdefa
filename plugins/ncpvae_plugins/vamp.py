"""The ``vamp`` prior: the VampPrior (Tomczak & Welling, AISTATS 2018; docs/priors.md §8).

``p(z) = 1/K sum_k q(z | u_k)``: a uniform mixture of the encoder's Gaussian posteriors at ``K``
learned pseudo-inputs ``u_k`` (images, ``(K, C, H, W)``). It is trained jointly with the VAE: the
pseudo-inputs are this prior's parameters (the runner puts them in the optimizer) and gradients
also flow into the encoder; the beta-ELBO then uses a one-sample Monte Carlo KL, since there is
no closed form.

The prior is defined through the model, so it must be bound to it with :meth:`bind_model`
(called once by the runner after the model is built). The model is kept as a plain reference,
not a submodule: its weights are not duplicated in the prior's parameters or state dict.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ncpvae import BuildContext, ComponentConfig, ConfigError, DataError, Prior, hookimpl

if TYPE_CHECKING:
    from ncpvae import LatentModel

_LOG_2PI = math.log(2 * math.pi)


class VampPrior(Prior):
    """``p(z) = 1/K sum_k N(z; mu(u_k), diag exp logvar(u_k))`` with pseudo-inputs ``u_k``.

    ``pseudo_inputs`` ``(K, *image_shape)`` is a parameter, or a buffer when ``config.learn``
    is False; ``config`` (a :class:`VampPrior.Config`) defaults to K = ``len(pseudo_inputs)``
    and must agree with it (:meth:`from_config` draws the pseudo-inputs from its
    ``init_mean`` and ``init_std``). Normalized and exactly sampled (a component uniformly,
    then its Gaussian).
    """

    name = "vamp"
    trained_with_vae = True  # a frozen VAE leaves the pseudo-inputs nothing to fit post hoc
    joint_parameters = "pseudo-inputs"

    class Config(ComponentConfig):
        name: Literal["vamp"] = "vamp"
        components: int = Field(50, ge=1, le=100_000, description="number of pseudo-inputs K")
        init_mean: float = Field(0.5, description="pseudo-inputs start at init_mean + "
                                 "init_std * N(0, 1) per pixel")
        init_std: float = Field(0.05, ge=0, description="spread of the initial pseudo-inputs")
        learn: bool = Field(True, description="train the pseudo-inputs with the VAE")

    config: Config

    def __init__(self, latent_dim: int, pseudo_inputs: Tensor, config: Config | None = None):
        if not isinstance(pseudo_inputs, Tensor) or pseudo_inputs.ndim < 2:
            raise ConfigError("vamp: pseudo_inputs must be a tensor (K, *image_shape)")
        if config is None:
            config = VampPrior.Config(components=len(pseudo_inputs))
        super().__init__(latent_dim, VampPrior.checked_config(config))
        if self.config.components != len(pseudo_inputs):
            raise ConfigError(f"vamp: {len(pseudo_inputs)} pseudo-inputs for a config of "
                              f"components = {self.config.components}")
        data = pseudo_inputs.detach().clone()
        if self.config.learn:
            self.pseudo_inputs = nn.Parameter(data)
        else:
            self.register_buffer("pseudo_inputs", data)
        self._bound: tuple[LatentModel, ...] = ()

    @classmethod
    def from_config(cls, config: Config, ctx: BuildContext) -> VampPrior:
        latent_dim = ctx.require_latent_dim("the vamp prior")
        if ctx.image_shape is None:
            raise ConfigError("the vamp prior needs the dataset's image shape (its pseudo-inputs "
                              "are images); build it through a run config or pass image_shape=")
        gen = torch.Generator().manual_seed(ctx.seed)
        noise = torch.randn(config.components, *ctx.image_shape, generator=gen,
                            dtype=torch.float64)
        init = (config.init_mean + config.init_std * noise).to(ctx.dtype)
        return cls(latent_dim, init, config)

    @property
    def components(self) -> int:
        return int(self.pseudo_inputs.shape[0])

    @property
    def label(self) -> str:
        return f"VampPrior (K={self.components})"

    def bind_model(self, model: LatentModel) -> None:
        """Keep ``model`` (not as a submodule) to encode the pseudo-inputs."""
        if not callable(getattr(model, "encode", None)):
            raise ConfigError(f"vamp: bind_model needs a model with encode(x), got "
                              f"{type(model).__name__}")
        self._bound = (model,)

    @property
    def model(self) -> LatentModel:
        if not self._bound:
            raise ConfigError("the vamp prior is not bound to a model: call "
                              "prior.bind_model(model) once the VAE is built (the runner does)")
        return self._bound[0]

    def component_params(self) -> tuple[Tensor, Tensor]:
        """The encoder at the pseudo-inputs: ``mu``, ``logvar`` ``(K, D)`` (differentiable)."""
        mu, logvar = self.model.encode(self.pseudo_inputs)
        if mu.shape != (self.components, self.latent_dim) or logvar.shape != mu.shape:
            raise DataError(f"vamp: the encoder returned {tuple(mu.shape)} and "
                            f"{tuple(logvar.shape)} for {self.components} pseudo-inputs; "
                            f"expected ({self.components}, {self.latent_dim})")
        return mu, logvar

    def log_prob(self, z: Tensor) -> Tensor:
        """``(..., D) -> (...)``: ``logsumexp_k log N(z; mu_k, e^logvar_k) - log K``."""
        if z.ndim < 1 or z.shape[-1] != self.latent_dim:
            raise DataError(f"latents: expected shape (..., {self.latent_dim}) for a "
                            f"{self.latent_dim}-dim vamp prior, got {tuple(z.shape)}")
        mu, logvar = self.component_params()
        flat = z.reshape(-1, 1, self.latent_dim)
        log_n = -0.5 * ((flat - mu) ** 2 * torch.exp(-logvar) + logvar + _LOG_2PI).sum(-1)
        out = torch.logsumexp(log_n, -1) - math.log(self.components)
        return out.reshape(z.shape[:-1])

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact draws ``(n, D)``: a pseudo-input uniformly, then its posterior."""
        ref = self.pseudo_inputs
        device = generator.device if generator is not None else ref.device
        with torch.no_grad():
            mu, logvar = self.component_params()
            which = torch.randint(0, self.components, (n,), generator=generator, device=device)
            eps = torch.randn(n, self.latent_dim, generator=generator, device=device,
                              dtype=mu.dtype)
            which, eps = which.to(mu.device), eps.to(mu.device)
            return mu[which] + torch.exp(0.5 * logvar[which]) * eps


@hookimpl
def ncpvae_register_priors() -> list[type]:
    return [VampPrior]
