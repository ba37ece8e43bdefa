"""The ``diffusion`` prior: a score model in latent space (LSGM-style, post hoc; docs/priors.md §10).

The standardized latent ``x = (z - shift) / sigma`` (unit variance per dimension) is diffused by
the variance-preserving SDE (Song et al., ICLR 2021)

    dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw,   beta(t) = beta_min + t (beta_max - beta_min),

whose marginal is ``x_t = alpha_t x_0 + s_t eps`` with ``alpha_t = exp(-int_0^t beta / 2)``,
``s_t^2 = 1 - alpha_t^2``: a unit-variance start stays unit variance and ``x_1`` is N(0, I) up to
``alpha_1^2`` (4e-5 with the defaults). A noise-prediction MLP ``eps(x, t)`` (a sinusoidal
time embedding) is fitted by the denoising loss ``|eps(x_t, t) - eps|^2`` with
``t ~ U(t_min, 1)``; the score is ``-eps(x, t) / s_t``.

- ``log_prob``: the probability-flow ODE ``dx/dt = v(x, t) = -beta(t)/2 (x - eps(x, t) / s_t)``
  integrated from ``t_min`` to 1 by fixed-step RK4 together with ``int div v dt``:
  ``log p(x_tmin) = log N(x_1; 0, I) + int_tmin^1 div v(x_t, t) dt``. The divergence is the
  full Jacobian trace (``D`` backward passes, ``divergence = "exact"``) or Hutchinson's
  estimator with fixed Rademacher probes (``"hutchinson"``, for large D). Exact for the model's
  ODE up to the solver's discretisation error (measured in docs/priors.md §10), the N(0, I)
  terminal (error ``alpha_1^2``) and the start at ``t_min`` instead of 0 (a blur of
  ``s_tmin ~ 0.01`` of the standardized scale). Deterministic and batch-separable, and
  differentiable in ``z`` (samplers and an NCP's Langevin use its gradient).
- ``sample``: the same ODE backwards from ``x_1 ~ N(0, I)`` (``sampler = "ode"``, the default:
  the draws' density is then the one ``log_prob`` computes, up to discretisation, so the prior
  can be an NCP base) or the reverse SDE by Euler-Maruyama (``"sde"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ncpvae import ConfigError, FitOptions, Prior, hookimpl
from ncpvae.prior_fitting import seeded_init
from ncpvae_plugins.neural_fit import NeuralFitConfig, StandardizedPrior, mlp

__all__ = ["DiffusionPrior", "NoiseNet", "VPSchedule"]

_LOG_2PI = math.log(2 * math.pi)


class VPSchedule:
    """The VP SDE's ``beta(t)``, ``alpha_t`` and ``s_t`` for ``t`` in ``[0, 1]`` (tensors in,
    tensors out, same shape)."""

    def __init__(self, beta_min: float, beta_max: float):
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha(self, t: Tensor) -> Tensor:
        """``log alpha_t = -int_0^t beta / 2``."""
        return -0.5 * (self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2)

    def sigma(self, t: Tensor) -> Tensor:
        """``s_t = sqrt(1 - alpha_t^2)``."""
        return torch.sqrt(-torch.expm1(2 * self.log_alpha(t)))


class NoiseNet(nn.Module):
    """``eps(x, t)``: ``(n, D), (n,) -> (n, D)``, an MLP on ``x`` and a sinusoidal embedding of
    ``t`` (``embedding`` frequencies ``pi 2^k``, sines and cosines). Row-wise, so batch-separable.
    """

    def __init__(self, dim: int, hidden: list[int], embedding: int = 8):
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(embedding))
        self.body = mlp(dim + 2 * embedding, hidden, dim)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        angle = t.reshape(-1, 1).to(x.dtype) * self.freqs.to(x.dtype)
        return self.body(torch.cat([x, angle.sin(), angle.cos()], -1))


#: ``drift(x, t) -> (v, div v)``: the ODE's velocity ``(n, D)`` and divergence ``(n,)``
Drift = Callable[[Tensor, float], tuple[Tensor, Tensor]]


def rk4_step(drift: Drift, x: Tensor, t: float, dt: float) -> tuple[Tensor, Tensor]:
    """One classical Runge-Kutta step of ``dx/dt = v`` and of ``int div v dt``:
    ``(x_{t+dt}, increment of the integral)``."""
    k1, d1 = drift(x, t)
    k2, d2 = drift(x + 0.5 * dt * k1, t + 0.5 * dt)
    k3, d3 = drift(x + 0.5 * dt * k2, t + 0.5 * dt)
    k4, d4 = drift(x + dt * k3, t + dt)
    return x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4), dt / 6 * (d1 + 2 * d2 + 2 * d3 + d4)


class DiffusionPrior(StandardizedPrior):
    """A VP-SDE score model over standardized latents; normalized (log density through the
    probability-flow ODE), sampled by the ODE (default) or the reverse SDE.

    ``net`` (optional): a module ``eps(x, t)`` ``(n, D), (n,) -> (n, D)`` instead of the
    config's :class:`NoiseNet` (tests plug in the exact Gaussian noise predictor). ``progress``
    (set by :meth:`fit`): show progress bars while sampling.
    """

    name = "diffusion"
    fitted_part = "a fitted score model"

    class Config(NeuralFitConfig):
        name: Literal["diffusion"] = "diffusion"
        epochs: int = Field(400, ge=1, le=100_000, description="maximum epochs")
        patience: int = Field(30, ge=1, description="stop after this many epochs without a "
                              "better held-out denoising loss (it is noisy: one t per row)")
        ema: float = Field(0.999, ge=0.0, lt=1.0, description="decay of the exponential "
                           "moving average of the weights kept as the fit (0: the last step's)")
        beta_min: float = Field(0.1, gt=0, description="beta(0) of the VP SDE")
        beta_max: float = Field(20.0, gt=0, description="beta(1) of the VP SDE")
        t_min: float = Field(1e-3, gt=0, lt=0.5, description="the ODE starts here, not at 0, "
                             "where the score is singular")
        embedding: int = Field(8, ge=1, le=64, description="sinusoidal time-embedding "
                               "frequencies")
        ode_steps: int = Field(32, ge=1, le=100_000, description="RK4 steps of the "
                               "probability-flow ODE (log_prob and ODE sampling)")
        time_power: float = Field(2.0, ge=1.0, le=8.0, description="the ODE's time grid is "
                                  "t_min + (1 - t_min) (k / steps)^time_power: steps crowd near "
                                  "t_min, where the drift changes fastest")
        sde_steps: int = Field(500, ge=1, le=100_000, description="Euler-Maruyama steps of the "
                               "reverse SDE (sampler = sde)")
        sampler: Literal["ode", "sde"] = Field("ode", description="how sample() draws: the "
                                               "probability-flow ODE or the reverse SDE")
        divergence: Literal["exact", "hutchinson"] = Field(
            "exact", description="the ODE's divergence: the full Jacobian trace (D backward "
            "passes) or Hutchinson's estimator (probes backward passes)")
        probes: int = Field(4, ge=1, le=1024, description="Rademacher probes of Hutchinson's "
                            "estimator (fixed at construction, shared by every row)")

    config: Config

    def __init__(self, base: Prior, config: Config | None = None, *,
                 net: nn.Module | None = None, seed: int = 0):
        super().__init__(base, config, seed=seed)
        cfg = self.config
        if cfg.beta_max <= cfg.beta_min:
            raise ConfigError(f"diffusion: beta_max ({cfg.beta_max}) must exceed beta_min "
                              f"({cfg.beta_min})")
        self.schedule = VPSchedule(cfg.beta_min, cfg.beta_max)
        if net is None:
            net = seeded_init(self.seed, lambda: NoiseNet(self.latent_dim, list(cfg.hidden),
                                                          cfg.embedding))
        if not isinstance(net, nn.Module):
            raise ConfigError(f"the diffusion net must be a torch.nn.Module, got "
                              f"{type(net).__name__}")
        self.net = net
        probes = torch.randint(0, 2, (cfg.probes, self.latent_dim),
                               generator=torch.Generator().manual_seed(self.seed))
        self.register_buffer("probes", (2 * probes - 1).to(torch.get_default_dtype()))
        self.progress = False

    @property
    def label(self) -> str:
        return f"diffusion (VP, {self.config.sampler.upper()})"

    # ------------------------------------------------------------------------------------------
    # the probability-flow ODE

    def _times(self, n: int, t: float, like: Tensor) -> Tensor:
        return torch.full((n,), t, dtype=like.dtype, device=like.device)

    def drift(self, x: Tensor, t: float, *, with_divergence: bool = True,
              create_graph: bool = False) -> tuple[Tensor, Tensor]:
        """The ODE's velocity ``v(x, t)`` ``(n, D)`` and its divergence ``(n,)`` (zeros when
        ``with_divergence`` is False). ``create_graph``: keep the graph (a gradient of the log
        density in ``z`` is wanted)."""
        tt = self._times(len(x), t, x)
        beta = float(self.schedule.beta(torch.tensor(t, dtype=torch.float64)))
        sigma = float(self.schedule.sigma(torch.tensor(t, dtype=torch.float64)))
        if not with_divergence:
            eps = self.net(x, tt)
            return -0.5 * beta * (x - eps / sigma), x.new_zeros(len(x))
        with torch.enable_grad():
            inp = x if create_graph else x.detach().requires_grad_()
            eps = self.net(inp, tt)
            trace = self._trace(eps, inp, create_graph)
        if not create_graph:
            eps, trace = eps.detach(), trace.detach()
        velocity = -0.5 * beta * (x - eps / sigma)
        return velocity, -0.5 * beta * (x.shape[1] - trace / sigma)

    def _trace(self, out: Tensor, inp: Tensor, create_graph: bool) -> Tensor:
        """``tr(d out / d inp)`` per row ``(n,)``: exact (one backward pass per dimension) or
        Hutchinson's ``mean_p v_p^T J v_p`` over the fixed probes."""
        if self.config.divergence == "exact":
            columns = [torch.autograd.grad(out[:, i].sum(), inp, retain_graph=True,
                                           create_graph=create_graph)[0][:, i]
                       for i in range(out.shape[1])]
            return torch.stack(columns, -1).sum(-1)
        probes = self.probes.to(out.dtype)
        terms = [(torch.autograd.grad((out * v).sum(), inp, retain_graph=True,
                                      create_graph=create_graph)[0] * v).sum(-1)
                 for v in probes]
        return torch.stack(terms, -1).mean(-1)

    def _grid(self) -> list[float]:
        steps, t_min, power = self.config.ode_steps, self.config.t_min, self.config.time_power
        return [t_min + (1.0 - t_min) * (k / steps) ** power for k in range(steps + 1)]

    def log_prob_x(self, x: Tensor) -> Tensor:
        """``(n, D) -> (n,)``: ``log p(x)`` of standardized rows through the ODE (see the
        module docstring)."""
        create_graph = torch.is_grad_enabled() and x.requires_grad
        grid = self._grid()
        integral = x.new_zeros(len(x))

        def drift(y: Tensor, t: float) -> tuple[Tensor, Tensor]:
            return self.drift(y, t, create_graph=create_graph)

        for t0, t1 in zip(grid[:-1], grid[1:], strict=True):
            x, increment = rk4_step(drift, x, t0, t1 - t0)
            integral = integral + increment
        terminal = -0.5 * (x**2).sum(-1) - 0.5 * x.shape[1] * _LOG_2PI
        return terminal + integral

    def log_prob(self, z: Tensor) -> Tensor:
        """``(..., D) -> (...)``: the log density through the probability-flow ODE."""
        self.require_fitted("log_prob")
        return self.log_prob_rows(z, self.log_prob_x)

    # ------------------------------------------------------------------------------------------
    # sampling

    def _bar(self, steps: int, what: str) -> Any:
        from tqdm.auto import tqdm

        return tqdm(range(steps), desc=f"diffusion {what}", unit="step", leave=False,
                    disable=not self.progress)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws ``(n, D)`` from ``x_1 ~ N(0, I)`` (noise from ``generator``) by the
        probability-flow ODE (RK4, ``ode_steps``) or the reverse SDE (Euler-Maruyama,
        ``sde_steps``), un-standardized."""
        self.require_fitted("sample")
        if n < 0:
            raise ValueError(f"cannot draw a negative number of samples ({n})")
        x = self.standard_normal(n, self.latent_dim, generator)
        if n == 0:
            return self.unstandardize(x)
        if self.config.sampler == "ode":
            grid = self._grid()[::-1]

            def drift(y: Tensor, t: float) -> tuple[Tensor, Tensor]:
                return self.drift(y, t, with_divergence=False)

            for k in self._bar(len(grid) - 1, "ODE sampling"):
                x, _ = rk4_step(drift, x, grid[k], grid[k + 1] - grid[k])
            return self.unstandardize(x)
        return self.unstandardize(self._reverse_sde(x, generator))

    def _reverse_sde(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """Euler-Maruyama on ``dx = [-beta x / 2 - beta score] dt + sqrt(beta) dw`` backwards
        from 1 to ``t_min``; no noise on the last step."""
        steps, t_min = self.config.sde_steps, self.config.t_min
        dt = (1.0 - t_min) / steps
        noise_all = self.standard_normal(len(x) * steps, self.latent_dim, generator)
        for k in self._bar(steps, "SDE sampling"):
            t = 1.0 - k * dt
            tt = torch.tensor(t, dtype=torch.float64)
            beta, sigma = float(self.schedule.beta(tt)), float(self.schedule.sigma(tt))
            score = -self.net(x, self._times(len(x), t, x)) / sigma
            x = x + dt * (0.5 * beta * x + beta * score)
            if k < steps - 1:
                x = x + math.sqrt(beta * dt) * noise_all[k * len(x):(k + 1) * len(x)]
        return x

    # ------------------------------------------------------------------------------------------
    # fitting

    def denoising_loss(self, x: Tensor, aux: Tensor | None) -> Tensor:
        """``|eps(x_t, t) - eps|^2`` per row ``(n,)``; ``aux`` ``(n, 1 + D)`` holds ``u ~ U(0,1)``
        (``t = t_min + (1 - t_min) u``) and ``eps``."""
        assert aux is not None
        t = self.config.t_min + (1.0 - self.config.t_min) * aux[:, 0]
        eps = aux[:, 1:]
        alpha = torch.exp(self.schedule.log_alpha(t)).unsqueeze(-1)
        sigma = self.schedule.sigma(t).unsqueeze(-1)
        return ((self.net(alpha * x + sigma * eps, t) - eps) ** 2).sum(-1)

    def _draw_aux(self, n: int, generator: torch.Generator) -> Tensor:
        device = generator.device
        u = torch.rand(n, 1, generator=generator, device=device, dtype=self.shift.dtype)
        eps = torch.randn(n, self.latent_dim, generator=generator, device=device,
                          dtype=self.shift.dtype)
        return torch.cat([u, eps], -1).to(self.shift.device)

    def _fit(self, mu: Tensor, logvar: Tensor, options: FitOptions) -> dict[str, Any]:
        """Fit the noise predictor by the denoising loss (see
        :meth:`StandardizedPrior.fit_network`); the held-out loss uses one fixed ``(t, eps)``
        per held-out row."""
        self.progress = bool(options.progress)
        return self.fit_network(mu, logvar, options, self.denoising_loss, self._draw_aux,
                                desc="fit diffusion", ema=self.config.ema)


@hookimpl
def ncpvae_register_priors() -> list[type]:
    return [DiffusionPrior]
