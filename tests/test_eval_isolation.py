"""Per-epoch test evaluation during training: it cannot change what training draws (so
``train.eval_size`` leaves the trained weights unchanged), and it sees the current step."""

from __future__ import annotations

import pytest
import torch

from ncpvae.config import load_config
from ncpvae.experiment import train
from ncpvae.run.build import build_run
from ncpvae.run.train import train_vae
from ncpvae.run.vae_eval import evaluate_vae

SMALL = ["train.epochs=2", "evaluate.enabled=false", "data.train_size=256", "data.test_size=64"]


def trained_weights(tmp_path, eval_size: int) -> dict[str, torch.Tensor]:
    config = load_config("smoke", [*SMALL, f"train.eval_size={eval_size}"])
    out = tmp_path / f"eval{eval_size}"
    train(config, out, quiet=True, stages=(train_vae,))
    return torch.load(out / "checkpoint.pt", weights_only=True)["model"]


@pytest.mark.slow  # two trainings
def test_eval_size_does_not_change_training(tmp_path):
    small, large = trained_weights(tmp_path, 8), trained_weights(tmp_path, 64)
    assert small.keys() == large.keys()
    for key in small:
        assert torch.equal(small[key], large[key]), key


def test_evaluate_vae_passes_the_step_and_leaves_the_global_rng_alone():
    run = build_run(load_config("smoke", SMALL), quiet=True)
    steps = []
    loss = run.objective.loss

    def recording_loss(*args, **kwargs):
        steps.append(kwargs.get("step"))
        return loss(*args, **kwargs)

    run.objective.loss = recording_loss
    torch.manual_seed(5)
    before = torch.get_rng_state()
    first = evaluate_vae(run, 64, step=123)
    assert torch.equal(torch.get_rng_state(), before)
    assert steps and set(steps) == {123}
    torch.manual_seed(99)  # another global state: the evaluation's draws are its own
    assert evaluate_vae(run, 64, step=123) == first
