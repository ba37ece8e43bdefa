"""The end-of-run summary ``ncpvae train`` prints, bits/dim in the run's files, and repeating a run
from its saved config."""

from __future__ import annotations

import json
import math

import pytest
from test_cli import ncpvae  # the console-script runner

from ncpvae.run.summary_text import format_run_summary, repeat_directory


def write_run(path, *, with_bits: bool = True) -> None:
    path.mkdir()
    vae = {"test_elbo": -100.0, "active_units": 7, "latent_activity": [1.0] * 10}
    (path / "summary.json").write_text(json.dumps({"vae": vae, "prior_fit": {"delta": 9.0}}))
    lik_base = {"prior": "gaussian", "iw": {"mean": -98.0, "se": 0.5}}
    lik_prior = {"prior": "ncp", "iw": {"mean": -97.0, "se": 0.5}}
    ev_vae = {"test_elbo": -101.0, "active_units": 6}
    if with_bits:
        lik_base["iw_bits_per_dim"] = {"mean": 4.25, "se": 0.01}
        ev_vae["test_elbo_bits_per_dim"] = 4.5
    evaluation = {
        "vae": ev_vae,
        "likelihood": {"num_samples": 100, "base": lik_base, "prior": lik_prior,
                       "iw_gain": {"mean": 1.0, "se": 0.1}},
        "learned_prior": {"delta": 0.8, "delta_se": 0.05},
        "rows": [
            {"label": "N(0, I)", "sample_quality": {"kid": 0.012, "kid_se": 0.001},
             "prior_fit": {"mmd": {"mmd2": 0.02}, "c2st": {"accuracy": 0.61}}},
            {"label": "NCP by MALA", "sample_quality": {"kid": 0.008, "kid_se": 0.002},
             "prior_fit": {"mmd": {"mmd2": 0.01}, "c2st": {"accuracy": 0.55}}},
        ],
        "report": "report.html",
    }
    (path / "evaluation.json").write_text(json.dumps(evaluation))


def test_summary_lines_are_aligned_and_hold_the_headline_numbers(tmp_path) -> None:
    write_run(tmp_path / "r")
    text = format_run_summary(tmp_path / "r")
    lines = text.splitlines()
    assert lines[0] == f"run written to {tmp_path / 'r'}"
    # the evaluation's numbers win over the training summary's (same images, final model)
    assert "  test ELBO           -101.00 nats per image (4.500 bits/dim)" in lines
    assert any(line.startswith("  IW bound (K = 100)  gaussian -98.00 ± 0.50 (4.250 bits/dim)")
               for line in lines)
    assert "  active units        6 of 10" in lines
    assert "  learned prior gain  Delta = 0.800 ± 0.050 nats;  IW bound gain 1.000 ± 0.100 nats" \
        in lines
    # the label column is aligned: every value starts in the same column
    labelled = [line for line in lines[1:5]]
    starts = {len(line) - len(line[2:].split("  ", 1)[1].lstrip()) for line in labelled}
    assert len(starts) == 1
    table = [line for line in lines if line.startswith("    ")]
    assert table[0].split() == ["KID", "×10³", "MMD²", "C2ST", "acc"]
    assert table[1].split()[:3] == ["N(0,", "I)", "12.0"]
    assert table[2].split()[:4] == ["NCP", "by", "MALA", "8.0"]
    assert lines[-1] == f"  report: {tmp_path / 'r' / 'report.html'}"


def test_summary_without_bits_or_evaluation(tmp_path) -> None:
    write_run(tmp_path / "r", with_bits=False)
    assert "bits/dim" not in format_run_summary(tmp_path / "r")
    (tmp_path / "r" / "evaluation.json").unlink()
    text = format_run_summary(tmp_path / "r")
    assert "test ELBO" in text and "-100.00" in text and "report" not in text


def test_repeat_directory(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "x").mkdir(parents=True)
    (tmp_path / "runs" / "x" / "config.toml").write_text("name = 'x'\n")
    (tmp_path / "runs" / "x-2").mkdir()
    out, note = repeat_directory("runs/x/config.toml", "x", None, False)
    assert str(out) == "runs/x-3" and "runs/x-3" in note and "--out" in note
    assert repeat_directory("runs/x/config.toml", "x", "elsewhere", False) == (None, None)
    assert repeat_directory("runs/x/config.toml", "x", None, True) == (None, None)
    assert repeat_directory("smoke", "smoke", None, False) == (None, None)


@pytest.mark.slow
def test_train_prints_the_summary_with_bits_per_dim(tmp_path) -> None:
    out = tmp_path / "run"
    result = ncpvae("train", "smoke", "--out", str(out), "--quiet",
                    "--set", "model.likelihood=discretized_logistic",
                    "--set", "model.learn_scale=true", "--set", "objective.warmup_steps=4")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == f"run written to {out}"
    text = result.stdout
    for fragment in ("test ELBO", "bits/dim", "IW bound", "active units", "prior x sampler",
                     "KID ×10³", f"report: {out / 'report.html'}"):
        assert fragment in text, text
    evaluation = json.loads((out / "evaluation.json").read_text())
    d = 1 * 32 * 32
    elbo = evaluation["vae"]["test_elbo"]
    assert evaluation["vae"]["test_elbo_bits_per_dim"] == pytest.approx(-elbo / (d * math.log(2)))
    base = evaluation["likelihood"]["base"]
    assert base["iw_bits_per_dim"]["mean"] == pytest.approx(-base["iw"]["mean"] / (d * math.log(2)))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluation"]["test_elbo_bits_per_dim"] == pytest.approx(
        evaluation["vae"]["test_elbo_bits_per_dim"])
    assert "bits/dim" in (out / "report.html").read_text()


@pytest.mark.slow
def test_train_from_a_runs_config_repeats_it_in_a_new_directory(tmp_path) -> None:
    fast = ("--quiet", "--set", "evaluate.enabled=false", "--set", "train.epochs=1")
    first = ncpvae("train", "smoke", *fast, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    again = ncpvae("train", "runs/smoke/config.toml", "--quiet", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "repeating it in runs/smoke-2" in again.stderr
    assert (tmp_path / "runs" / "smoke-2" / "summary.json").is_file()
    assert again.stdout.startswith("run written to runs/smoke-2")
    first_cfg = (tmp_path / "runs" / "smoke" / "config.toml").read_text()
    assert (tmp_path / "runs" / "smoke-2" / "config.toml").read_text() == first_cfg
