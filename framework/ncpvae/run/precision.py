"""``train.precision``: the arithmetic of the VAE training step (``fp32``, ``bf16``, ``fp16``).

``fp32`` (the default) is the plain float32 step, unchanged. ``bf16`` and ``fp16`` run the
forward pass of the loss under ``torch.autocast`` (matrix products and convolutions in the low
precision, reductions and the rest as autocast decides); the weights, their gradients, the
optimizer state and every checkpoint stay float32, and the step's loss terms are cast to
float32 before they are summed into the epoch's means. ``fp16`` needs CUDA and a gradient
scaler (``torch.amp.GradScaler``, whose state goes into each checkpoint so a resumed run
continues bit for bit); ``bf16`` runs on CUDA devices and CPUs that support it. A precision the
device lacks is a one-line :class:`~ncpvae.errors.ConfigError` when training starts.

Nothing here is process-wide: autocast is a context entered around each step's forward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import Tensor

from ncpvae.errors import ConfigError

__all__ = ["Precision", "PrecisionName"]

PrecisionName = Literal["fp32", "bf16", "fp16"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":  # native bf16 kernels (AVX512-BF16/AMX, or AVX512 emulation)
        return bool(torch.backends.mkldnn.is_available()
                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


class Precision:
    """The training step's precision on ``device``: :meth:`autocast` around the loss's forward
    pass, :meth:`backward` and :meth:`step` (with the fp16 gradient scaler where there is one),
    and the scaler's :meth:`state_dict` for checkpoints (None without a scaler)."""

    def __init__(self, name: str, device: torch.device):
        if name not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"train.precision must be fp32, bf16 or fp16, got {name!r}")
        if name == "fp16" and device.type != "cuda":
            raise ConfigError(f"train.precision = 'fp16' needs a CUDA device (this run is on "
                              f"{device.type}); use 'bf16' or 'fp32'")
        if name == "bf16" and not _bf16_supported(device):
            raise ConfigError(f"train.precision = 'bf16': this {device.type} device has no "
                              f"bfloat16 support; use 'fp32'")
        self.name = name
        self.device = device
        self.scaler = torch.amp.GradScaler("cuda") if name == "fp16" else None

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """The context of the loss's forward pass (nothing for fp32)."""
        if self.name == "fp32":
            yield
            return
        with torch.autocast(self.device.type, dtype=_DTYPES[self.name]):
            yield

    @staticmethod
    def to_fp32(out: dict[str, Tensor]) -> dict[str, Tensor]:
        """The loss terms in float32 (a no-op for float32 terms), so that the backward pass
        starts from, and the epoch sums accumulate, float32 values."""
        return {key: value.float() if value.is_floating_point() else value
                for key, value in out.items()}

    def backward(self, loss: Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self, optimizer: torch.optim.Optimizer, params: list[Tensor],
             grad_clip: float | None) -> None:
        """Clip (on the unscaled gradients) and take the optimizer step; with the fp16 scaler
        a step with non-finite gradients is skipped and the scale lowered."""
        if self.scaler is not None and grad_clip is not None:
            self.scaler.unscale_(optimizer)
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()

    def state_dict(self) -> dict[str, Any] | None:
        return None if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
