"""Hot loops without per-step host synchronisation: VAE training and the NCP fit read their
finiteness flags from the device at a bounded interval and still name the first bad step."""

from __future__ import annotations

import sys
import types
from contextlib import contextmanager

import pytest
import torch

from ncpvae.config import load_config
from ncpvae.errors import NonFiniteError
from ncpvae.run import train as train_module
from ncpvae.run.build import build_run
from ncpvae.run.train import _first_bad_step, train_vae

INACTIVE = types.SimpleNamespace(active=False)


def test_first_bad_step_names_the_first_non_finite_flag():
    flags = [torch.tensor(True), torch.tensor(True), torch.tensor(False), torch.tensor(False)]
    assert _first_bad_step(flags, 11, INACTIVE) == 13
    assert _first_bad_step([torch.tensor(True)] * 5, 1, INACTIVE) is None
    assert _first_bad_step([], 1, INACTIVE) is None


@contextmanager
def _count_host_reads():
    """Count Tensor -> Python reads (bool, float, int, item, tolist; each is a host sync on a
    GPU) made by the training loop itself (the caller's frame in ncpvae/run/train.py; the
    optimizer's reads of its CPU step counter and the data plugin's are not the loop's)."""
    counts = {"n": 0}
    names = ("__bool__", "__float__", "__int__", "item", "tolist")
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def wrap(original):
        def counted(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
            if caller.endswith("run/train.py"):
                counts["n"] += 1
            return original(self, *args, **kwargs)
        return counted

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _reads_for_steps(steps: int) -> int:
    config = load_config("smoke", ["train.epochs=1", f"train.steps_per_epoch={steps}",
                                   "train.eval_size=16"])
    run = build_run(config, quiet=True)
    with _count_host_reads() as counts:
        train_vae(run)
    return counts["n"]


@pytest.mark.slow
def test_training_steps_do_not_read_the_device_each_step():
    # smoke: 512 images / batch 64 = 8 steps per epoch; 2 and 8 steps (both below the check
    # interval) must read the device equally often: the per-epoch work only
    assert train_module.FINITE_CHECK_INTERVAL > 8
    assert _reads_for_steps(8) == _reads_for_steps(2)


@pytest.mark.slow
def test_a_bad_step_inside_a_check_interval_is_named(monkeypatch):
    # check every 3 steps: a NaN at global step 5 (epoch 1, step 5) is read at step 6
    monkeypatch.setattr(train_module, "FINITE_CHECK_INTERVAL", 3)
    config = load_config("smoke", ["train.epochs=1", "train.eval_size=16"])
    run = build_run(config, quiet=True)
    original = run.objective.loss

    def loss(x, model, prior, *, step=0):
        out = dict(original(x, model, prior, step=step))
        if step >= 4:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(run.objective, "loss", loss)
    with pytest.raises(NonFiniteError, match=r"epoch 1, step 5 \(global step 5\); no checkpoint"):
        train_vae(run)


def test_ncp_fit_names_the_first_bad_step():
    import ncpvae

    prior = ncpvae.create("prior", "ncp", latent_dim=2, epochs=2, min_steps=0, batch_size=64)
    calls = {"n": 0}
    original = prior.logit

    def logit(z):
        calls["n"] += 1
        out = original(z)
        # call 1 is the shape probe; training steps are calls 2, 3, ...: step 3 turns NaN
        return out * float("nan") if calls["n"] >= 4 else out

    prior.logit = logit
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(400, 2, generator=gen)
    with pytest.raises(NonFiniteError, match=r"epoch 1, step 3 of"):
        prior.fit(mu, torch.zeros_like(mu), generator=torch.Generator().manual_seed(1))
