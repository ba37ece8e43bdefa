"""Units of likelihood bounds: nats per image to bits per dimension (docs/math.md §1).

For ``D``-dimensional 8-bit data under a likelihood that is discrete over the 256 values of each
dimension (e.g. the discretized logistic), a bound of ``L`` nats per image (``L = -ELBO``) is
``L / (D ln 2)`` bits per dimension. With a continuous density on data scaled to ``[0, 1]``
(uniformly dequantized), the discrete bound is ``ELBO_cont - D ln 256``, so
``bits/dim = -ELBO_cont / (D ln 2) + 8``.
"""

from __future__ import annotations

import math

__all__ = ["bits_per_dim"]


def bits_per_dim(nats: float, num_dims: int, *, continuous_on_unit_interval: bool = False) -> float:
    """Bits per dimension of a negative log-likelihood (bound) of ``nats`` per image.

    ``nats`` is ``-log p(x)`` or ``-ELBO`` in nats per image (positive for a discrete
    likelihood); ``num_dims`` is ``D = C * H * W``. ``continuous_on_unit_interval``: the
    likelihood is a density on data scaled to [0, 1], so ``log 256`` nats per dimension are
    added back (``+ 8`` bits). Raises ``ValueError`` for ``num_dims < 1``.
    """
    if num_dims < 1:
        raise ValueError(f"bits_per_dim needs num_dims >= 1, got {num_dims}")
    bpd = float(nats) / (num_dims * math.log(2.0))
    return bpd + 8.0 if continuous_on_unit_interval else bpd
