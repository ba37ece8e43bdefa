"""Refitting a run's learned prior with another classifier (``fit-prior --set prior.hidden=...``)
works and removes what depended on the old prior (evaluation, report, ``ncpvae sample`` output,
the summary's evaluation section), saying which."""

from __future__ import annotations

import json

import pytest
import torch

from ncpvae import cli

pytestmark = pytest.mark.slow

CONFIG = ["smoke", "--set", "prior=ncp", "--set", "train.epochs=1", "--set",
          "evaluate.enabled=false", "--set", "prior.epochs=3", "--set", "prior.min_steps=0"]


def test_refit_with_another_classifier_invalidates_dependants(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", *CONFIG, "--out", str(run), "--quiet"]) == 0
    # what an evaluation and `ncpvae sample` of the old prior would have left behind
    (run / "evaluation.json").write_text("{}")
    (run / "report.html").write_text("<html></html>")
    (run / "sampling").mkdir()
    (run / "sampling" / "latents.pt").write_bytes(b"old")
    (run / "plots" / "eval_samples_ncp_by_sir.png").write_bytes(b"old")
    summary = json.loads((run / "summary.json").read_text())
    summary["evaluation"] = {"delta": 1.0}
    (run / "summary.json").write_text(json.dumps(summary))
    old_samples = torch.load(run / "samples.pt", weights_only=True)
    capsys.readouterr()

    code = cli.main(["fit-prior", str(run), "--set", "prior.hidden=[64]", "--quiet"])
    _, err = capsys.readouterr()
    assert code == 0, err
    for stale in ("evaluation.json", "report.html", "sampling", "plots/eval_samples_ncp_by_sir.png"):
        assert not (run / stale).exists(), stale
        assert stale.split("/")[-1] in err
    summary = json.loads((run / "summary.json").read_text())
    assert "evaluation" not in summary and "prior_fit" in summary
    assert "hidden = [64]" in (run / "config.toml").read_text()
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    widths = {tuple(v.shape) for k, v in state["prior"].items() if k.endswith("weight")}
    assert any(64 in shape for shape in widths)
    new_samples = torch.load(run / "samples.pt", weights_only=True)
    assert new_samples.keys() == old_samples.keys()  # regenerated from the refitted prior


def _fit_numbers(run) -> dict:
    """The prior_fit section of summary.json without its timing."""
    fit = json.loads((run / "summary.json").read_text())["prior_fit"]
    return {key: value for key, value in fit.items() if "seconds" not in key}


def _prior_state(run) -> dict:
    return torch.load(run / "checkpoint.pt", weights_only=True)["prior"]


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fit_prior_starts_fresh_and_continue_resumes(tmp_path):
    """Two ``fit-prior`` calls give the same prior (each starts from the seeded initialisation
    the run's fit stage started from); ``--continue`` goes on from the fitted weights."""
    run = tmp_path / "run"
    assert cli.main(["train", *CONFIG, "--out", str(run), "--quiet"]) == 0
    trained = _fit_numbers(run), _prior_state(run)
    fits = []
    for extra in ([], [], ["--continue"]):
        assert cli.main(["fit-prior", str(run), "--quiet", *extra]) == 0
        fits.append((_fit_numbers(run), _prior_state(run)))
    (first, first_state), (second, second_state), (continued, continued_state) = fits
    assert first == second and _same_state(first_state, second_state)
    # the fresh fit is the run's own fit stage again
    assert first == trained[0] and _same_state(first_state, trained[1])
    assert continued["delta"] != second["delta"]
    assert not _same_state(continued_state, second_state)


def test_a_fresh_refit_keeps_what_the_vae_trained(tmp_path):
    """NCP over a VampPrior: the pseudo-inputs train with the VAE, so a fresh refit resets the
    classifier but keeps them."""
    run = tmp_path / "run"
    assert cli.main(["train", "smoke", "--set", "prior=ncp", "--set",
                     'prior.base={name="vamp", components=4}', "--set", "train.epochs=1",
                     "--set", "evaluate.enabled=false", "--set", "prior.epochs=2",
                     "--out", str(run), "--quiet"]) == 0
    trained = _prior_state(run)
    assert cli.main(["fit-prior", str(run), "--quiet"]) == 0
    refit = _prior_state(run)
    assert torch.equal(refit["base.pseudo_inputs"], trained["base.pseudo_inputs"])
    assert _same_state(refit, trained)  # and the classifier is fitted again from the same start
