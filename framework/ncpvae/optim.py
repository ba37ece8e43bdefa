"""The Adam optimizer of the VAE training loop (``train.fused_adam``), for plugins' loops too.

With ``fused=True``, torch's fused Adam kernel (one pass over each parameter tensor for the
whole update) is used where this torch build has it for the parameters' device (CPU from torch
2.4, CUDA): the same float32 algorithm as the default multi-tensor ("foreach") implementation,
in other rounding, and faster VAE training on a 2-core CPU at the default config (1.02-1.13x
in three runs of ``benchmarks/bench_training.py``, interleaved rounds). Elsewhere, or with
``fused=False``, it is torch's default Adam. Other rounding means another training trajectory:
the default run with it reached shape recovery 0.64 and NCP Delta 0.42 nats instead of 0.91 and
0.80 (test ELBO -45.39 instead of -46.16), one more draw of the seed lottery the README's
trade-off section describes, which is why ``train.fused_adam`` is off by default.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def adam(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0,
         fused: bool = True) -> torch.optim.Adam:
    """``torch.optim.Adam`` over ``params``, fused where supported (see the module docstring).

    The optimizer's state dict has the same layout either way, so a checkpoint written by one
    loads into the other."""
    params = list(params)
    if fused and params:
        try:  # Adam checks the parameters' devices and dtypes against its fused kernels
            return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, TypeError, ValueError):  # no fused kernel here: the default
            pass
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
