"""``train.channels_last``: the conv model in torch.channels_last layout computes the same float32
function (to rounding), keeps that layout through checkpoints and resume, and leaves models
without conv layers alone."""

from __future__ import annotations

import pytest
import torch

from ncpvae.config import load_config
from ncpvae.experiment import train
from ncpvae.run.build import build_run, open_run


def _conv_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.ndim == 4]


def _loss_and_grads(run, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(1)  # the same reparameterization noise for both layouts
    out = run.objective.loss(x, run.model, run.prior.base_prior, step=0)
    grads = torch.autograd.grad(out["loss"], list(run.model.parameters()))
    return out["loss"].detach(), list(grads)


def test_channels_last_is_the_same_function_in_another_layout():
    plain = build_run(load_config("smoke"), quiet=True)
    fast = build_run(load_config("smoke", ["train.channels_last=true"]), quiet=True)
    assert _conv_weights(plain.model) and _conv_weights(fast.model)
    # (a weight with one input channel is contiguous in both layouts)
    assert all(w.is_contiguous() for w in _conv_weights(plain.model))
    assert any(not w.is_contiguous(memory_format=torch.channels_last)
               for w in _conv_weights(plain.model))
    assert all(w.is_contiguous(memory_format=torch.channels_last)
               for w in _conv_weights(fast.model))
    # same seed, same initial weights: only the layout differs
    for a, b in zip(plain.model.state_dict().values(), fast.model.state_dict().values()):
        assert torch.equal(a, b)
    x = plain.data.train.get_batch(torch.arange(32))
    loss_plain, grads_plain = _loss_and_grads(plain, x)
    loss_fast, grads_fast = _loss_and_grads(fast, x)
    # float32 rounding in another summation order: ~1e-6 relative, far below any real change
    torch.testing.assert_close(loss_fast, loss_plain, rtol=1e-5, atol=1e-4)
    for g_fast, g_plain in zip(grads_fast, grads_plain):
        scale = g_plain.abs().max().clamp_min(1e-6)
        assert float((g_fast - g_plain).abs().max() / scale) < 1e-4


@pytest.mark.slow  # a training
def test_layout_survives_checkpoint_and_reopen(tmp_path):
    config = load_config("smoke", ["train.channels_last=true", "train.epochs=1",
                                   "evaluate.beta_vae.enabled=false",
                                   "evaluate.factor_vae.enabled=false",
                                   "evaluate.dci.enabled=false", "evaluate.sap.enabled=false",
                                   "evaluate.likelihood.enabled=false"])
    path = train(config, tmp_path / "run", quiet=True)
    reopened = open_run(path)
    assert reopened.config.train.channels_last
    assert all(w.is_contiguous(memory_format=torch.channels_last)
               for w in _conv_weights(reopened.model))
    saved = torch.load(path / "checkpoint.pt", weights_only=True)["model"]
    for name, value in reopened.model.state_dict().items():
        assert torch.equal(value, saved[name]), name


def test_models_without_conv_layers_are_unchanged():
    run = build_run(load_config("smoke", ["model=mlp", "train.channels_last=true"]), quiet=True)
    reference = build_run(load_config("smoke", ["model=mlp"]), quiet=True)
    assert not _conv_weights(run.model)
    for a, b in zip(run.model.state_dict().values(), reference.model.state_dict().values()):
        assert torch.equal(a, b) and a.stride() == b.stride()
