"""Energies for sampling tasks beyond the prior: the latent posterior of a trained VAE.

An :data:`~ncpvae.mcmc.kernels.Energy` maps chains ``(C, D)`` to ``(C,)``; see :mod:`ncpvae.sampler`.
"""

from __future__ import annotations

from torch import Tensor

from ncpvae.errors import DataError
from ncpvae.mcmc.kernels import Energy
from ncpvae.model import LatentModel
from ncpvae.prior import Prior


def posterior_energy(model: LatentModel, prior: Prior, x: Tensor) -> Energy:
    """The latent-posterior energy ``U(z) = -log p(x | z) - log p(z)`` for a batch ``x``.

    ``x`` is ``(C, ...)`` (images ``(C, C_img, H, W)``); chain i targets ``p(z | x[i])``, so the
    energy takes exactly ``C`` chains ``(C, D)`` and returns ``(C,)``::

        U(z)[i] = -model.recon_log_prob(x, model.decode(z))[i] + prior.energy(z)[i]

    ``prior.energy`` is ``-prior.log_prob`` up to a constant (so learned priors whose normalizer
    is unknown work too). The energy is marked ``rows_indexed`` (chain i belongs to image i), so
    samplers evaluate its chains all at once, never in row blocks. The model and prior are used
    as they are (put them in ``eval()`` mode
    yourself); their parameters receive no gradient from sampling.
    """
    if x.ndim < 1 or x.shape[0] < 1:
        raise DataError(f"posterior_energy: x must be a batch (C, ...), got {tuple(x.shape)}")
    num = int(x.shape[0])

    def energy(z: Tensor) -> Tensor:
        if z.ndim != 2 or z.shape[0] != num:
            raise DataError(
                f"posterior energy: expected {num} chains (one per image), got z of shape "
                f"{tuple(z.shape)}"
            )
        return -model.recon_log_prob(x, model.decode(z)) + prior.energy(z)

    energy.rows_indexed = True  # chain i belongs to image i: never evaluated in row blocks
    return energy
