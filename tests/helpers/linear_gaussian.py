"""A two-group linear-Gaussian model with closed forms, for the hierarchical NCP tests.

Groups of size 2 each (``D = 4``). Base prior ``p``: ``z1 ~ N(0, I)``, ``z2 | z1 ~ N(A z1, s2 I)``.
Aggregate posterior ``q``: ``z1 ~ N(m1, diag v1)``, ``z2 | z1 ~ N(B z1 + b, diag v2)``. Every
conditional is Gaussian, so

- the optimal log-ratios ``r_k = log q(z_k | z_<k) - log p(z_k | z_<k)`` are quadratic;
- ``Delta_1 = KL(q(z1) || p(z1))`` and ``Delta_2 = E_q(z1) KL(q(z2|z1) || p(z2|z1))`` are exact;
- a quadratic tilt ``r_k(z_k, c) = sum_j -a_j z_kj^2 / 2 + (c_j + (G c)_j) z_kj`` gives Gaussian
  tilted conditionals and a closed-form ``log Z_k(c)``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from ncpvae.hierarchical import HierarchicalPrior, HierarchicalTilt

DT = torch.float64
SIZES = (2, 2)
A = np.array([[0.8, 0.3], [-0.2, 0.5]])
S2 = 0.5
M1 = np.array([0.5, -0.3])
V1 = np.array([0.6, 1.4])
B = np.array([[0.5, 0.0], [0.1, 0.9]])
b = np.array([0.3, -0.4])
V2 = np.array([0.3, 0.4])


def _t(a: np.ndarray) -> Tensor:
    return torch.tensor(a, dtype=DT)


class TwoGroupGaussian(HierarchicalPrior):
    """``z1 ~ N(mean1, diag var1)``, ``z2 | z1 ~ N(W z1 + shift, diag var2)`` (float64)."""

    name = "two_group_gaussian"

    def __init__(self, mean1, var1, weight, shift, var2):
        super().__init__(SIZES)
        self.register_buffer("mean1", _t(np.asarray(mean1, float)))
        self.register_buffer("logvar1", _t(np.log(np.broadcast_to(var1, (2,)))))
        self.register_buffer("weight", _t(np.asarray(weight, float)))
        self.register_buffer("shift", _t(np.asarray(shift, float)))
        self.register_buffer("logvar2", _t(np.log(np.broadcast_to(var2, (2,)))))

    def conditional(self, k: int, context: Tensor) -> tuple[Tensor, Tensor]:
        n = context.shape[0]
        if k == 0:
            return self.mean1.expand(n, 2), self.logvar1.expand(n, 2)
        return context @ self.weight.T + self.shift, self.logvar2.expand(n, 2)


def base_prior() -> TwoGroupGaussian:
    return TwoGroupGaussian(np.zeros(2), 1.0, A, np.zeros(2), S2)


def posterior() -> TwoGroupGaussian:
    return TwoGroupGaussian(M1, V1, B, b, V2)


def exact_deltas() -> tuple[float, float]:
    """``(Delta_1, Delta_2)`` of the optimal classifiers, in nats."""
    d1 = 0.5 * float(np.sum(V1 + M1**2 - 1 - np.log(V1)))
    c = B - A
    mean_shift = c @ M1 + b
    expected_sq = float(mean_shift @ mean_shift + np.trace(c @ np.diag(V1) @ c.T))
    d2 = 0.5 * float(np.sum(V2 / S2 - 1 - np.log(V2 / S2))) + expected_sq / (2 * S2)
    return d1, d2


class OptimalRatio(nn.Module):
    """The exact ``r_k = log q(z_k|c) - log p(z_k|c)`` on inputs ``cat(z_k, c)``."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k
        self.p, self.q = base_prior(), posterior()

    def forward(self, x: Tensor) -> Tensor:
        z_k, context = x[:, :2], x[:, 2:]
        return self.q.group_log_prob(self.k, z_k, context) - self.p.group_log_prob(self.k, z_k,
                                                                                   context)


def optimal_tilt() -> HierarchicalTilt:
    return HierarchicalTilt(SIZES, classifiers=[OptimalRatio(0), OptimalRatio(1)])


# a quadratic tilt: r_k(z_k, c) = sum_j -a_j z_kj^2 / 2 + (lin_j + (G c)_j) z_kj
QUAD_A = (np.array([0.5, -0.4]), np.array([0.4, 1.0]))
QUAD_LIN = (np.array([0.4, -0.3]), np.array([0.3, -0.2]))
QUAD_G = np.array([[0.5, 0.0], [0.2, -0.3]])


class QuadraticTilt(nn.Module):
    def __init__(self, k: int):
        super().__init__()
        self.register_buffer("a", _t(QUAD_A[k]))
        self.register_buffer("lin", _t(QUAD_LIN[k]))
        self.register_buffer("g", _t(QUAD_G if k else np.zeros((2, 0))))

    def forward(self, x: Tensor) -> Tensor:
        z_k, context = x[:, :2], x[:, 2:]
        beta = self.lin + context @ self.g.T
        return (-0.5 * self.a * z_k**2 + beta * z_k).sum(-1)


def quadratic_tilt() -> HierarchicalTilt:
    return HierarchicalTilt(SIZES, classifiers=[QuadraticTilt(0), QuadraticTilt(1)])


def _tilted(mean: np.ndarray, var: np.ndarray, a: np.ndarray, beta: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-dimension tilted Gaussian N(mean, var) * exp(-a z^2/2 + beta z): (mean', var', log Z)."""
    prec = 1 / var + a
    new_mean = (mean / var + beta) / prec
    log_z = -0.5 * np.log(1 + a * var) + 0.5 * ((mean / var + beta) ** 2 / prec - mean**2 / var)
    return new_mean, 1 / prec, log_z


def quadratic_log_z(k: int, context: np.ndarray) -> np.ndarray:
    """Exact ``log Z_k(c)`` of the quadratic tilt for contexts ``(n, c_k)`` under the base."""
    if k == 0:
        _, _, log_z = _tilted(np.zeros(2), np.ones(2), QUAD_A[0], QUAD_LIN[0])
        return np.full(len(context), log_z.sum())
    mean = context @ A.T
    beta = QUAD_LIN[1] + context @ QUAD_G.T
    return _tilted(mean, np.full(2, S2), QUAD_A[1], beta)[2].sum(-1)


def quadratic_joint_moments() -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(4,)`` and covariance ``(4, 4)`` of ``p_NCP`` under the quadratic tilt: ``z1`` is
    the tilted top group; ``z2 | z1`` is Gaussian with mean linear in ``z1``."""
    m1, v1, _ = _tilted(np.zeros(2), np.ones(2), QUAD_A[0], QUAD_LIN[0])
    prec2 = 1 / S2 + QUAD_A[1]
    slope = (A / S2 + QUAD_G) / prec2[:, None]  # E[z2 | z1] = slope z1 + offset
    offset = QUAD_LIN[1] / prec2
    mean = np.concatenate([m1, slope @ m1 + offset])
    cov = np.zeros((4, 4))
    cov[:2, :2] = np.diag(v1)
    cov[2:, :2] = slope @ np.diag(v1)
    cov[:2, 2:] = cov[2:, :2].T
    cov[2:, 2:] = slope @ np.diag(v1) @ slope.T + np.diag(1 / prec2)
    return mean, cov


def posterior_joint_moments() -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the aggregate posterior ``q`` (the target of the optimal tilt)."""
    mean = np.concatenate([M1, B @ M1 + b])
    cov = np.zeros((4, 4))
    cov[:2, :2] = np.diag(V1)
    cov[2:, :2] = B @ np.diag(V1)
    cov[:2, 2:] = cov[2:, :2].T
    cov[2:, 2:] = B @ np.diag(V1) @ B.T + np.diag(V2)
    return mean, cov


def moment_z_scores(draws: Tensor, mean: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray,
                                                                                 np.ndarray]:
    """z-scores of the sample mean ``(4,)`` and sample covariance ``(4, 4)`` of independent
    ``draws`` ``(n, 4)`` against the exact moments, each with its exact Gaussian standard error
    (``Var(x_i x_j) = S_ii S_jj + S_ij^2`` for centred Gaussian coordinates)."""
    x = draws.detach().to(DT).numpy()
    n = len(x)
    mean_z = (x.mean(0) - mean) / np.sqrt(np.diag(cov) / n)
    centred = x - mean
    sample_cov = centred.T @ centred / n
    var = np.outer(np.diag(cov), np.diag(cov)) + cov**2
    cov_z = (sample_cov - cov) / np.sqrt(var / n)
    return mean_z, cov_z
