"""``ncpvae.adam``, the optimizer of every built-in training loop: torch's fused Adam where this
torch has it for the parameters' device, the same update as the default implementation up to
float32 rounding, and the default where the fused kernel is missing or switched off."""

from __future__ import annotations

import pytest
import torch

from ncpvae.optim import adam


def _quadratic_steps(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter,
                     target: torch.Tensor, steps: int = 50) -> torch.Tensor:
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        ((param - target) ** 2).sum().backward()
        optimizer.step()
    return param.detach().clone()


def test_adam_is_fused_where_supported_and_follows_the_default_update():
    try:
        torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], fused=True)
    except RuntimeError:
        pytest.skip("this torch has no fused CPU Adam")
    gen = torch.Generator().manual_seed(0)
    start, target = torch.randn(64, generator=gen), torch.randn(64, generator=gen)
    fused_param, plain_param = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    fused = adam([fused_param], lr=0.05, weight_decay=0.01)
    plain = torch.optim.Adam([plain_param], lr=0.05, weight_decay=0.01)
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    a = _quadratic_steps(fused, fused_param, target)
    b = _quadratic_steps(plain, plain_param, target)
    assert not torch.equal(a, start)  # it moved: 50 steps of 0.05 toward the target
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the state dicts have one layout: a checkpoint of one loads into the other
    plain.load_state_dict(fused.state_dict())


def test_adam_falls_back_to_the_default_when_fused_is_off_or_missing(monkeypatch):
    param = torch.nn.Parameter(torch.zeros(3))
    assert not adam([param], lr=1e-3, fused=False).defaults["fused"]
    real_adam = torch.optim.Adam

    def no_fused_kernel(params, fused=None, **kwargs):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be on a supported device")
        return real_adam(params, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", no_fused_kernel)
    optimizer = adam([param], lr=1e-3)
    assert isinstance(optimizer, real_adam) and not optimizer.defaults["fused"]
