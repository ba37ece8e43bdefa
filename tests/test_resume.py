"""Fault injection: a run killed with SIGKILL at points spread over every stage (VAE training,
prior fit, sampling, evaluation), resumed each time with ``ncpvae resume``, ends with exactly the
numbers of a run never interrupted (timings aside)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

CONFIG = ["smoke", "--set", "prior=ncp", "--set", "train.epochs=3"]
#: the kill helper: ``ncpvae`` with a boundary callback that SIGKILLs at the n-th boundary
KILL_AT = Path(__file__).parent / "helpers" / "kill_at.py"
#: (what the process does, kill point N@LABEL): a chain of kills of ONE run, every stage covered
KILLS = [
    ("train", "1@epoch"),  # after the checkpoint of epoch 1
    ("resume", "2@epoch"),  # after epoch 3 (the last), before the train stage is marked done
    ("resume", "1@stage"),  # after the train stage
    ("resume", "1@fit"),  # inside the fit stage, after the fit, before its outputs
    ("resume", "1@stage"),  # after the fit stage
    ("resume", "1@stage"),  # after the sample stage
]
TIMING = ("seconds", "per_second", "per_s", "wall_time", "runtime", "elapsed")


def cli(*args: str, kill: str | None = None, kill_log: Path | None = None,
        timeout: float = 900) -> subprocess.CompletedProcess:
    """``ncpvae ARGS --quiet`` in a fresh process, killed at ``kill`` (``N@LABEL``, see
    tests/helpers/kill_at.py), logging every boundary's label to ``kill_log``."""
    options = [*(["--kill", kill] if kill else []), *(["--log", str(kill_log)] if kill_log else [])]
    return subprocess.run([sys.executable, str(KILL_AT), *options, "--", *args, "--quiet"],
                          capture_output=True, text=True, timeout=timeout)


def without_timings(value):
    """``value`` with every timing entry (keys naming seconds, rates or runtime) removed."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items()
                if not any(t in k for t in TIMING)}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def results_without_evaluation(run: Path) -> dict:
    """summary.json and metrics.jsonl without timings (runs with the evaluation disabled)."""
    summary = json.loads((run / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"summary": without_timings(summary), "metrics": without_timings(metrics)}


def results(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    evaluation = json.loads((run / "evaluation.json").read_text())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"summary": without_timings(summary), "evaluation": without_timings(evaluation),
            "metrics": without_timings(metrics)}


def test_killed_everywhere_then_resumed_matches_an_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    log = tmp_path / "boundaries.txt"
    done = cli("train", *CONFIG, "--out", str(reference), kill_log=log)
    assert done.returncode == 0, done.stderr
    assert log.read_text().split() == ["epoch"] * 3 + ["stage", "fit", "stage", "stage",
                                                    "evaluate", "stage"]

    run = tmp_path / "killed"
    for command, kill in KILLS:
        args = ["train", *CONFIG, "--out", str(run)] if command == "train" else ["resume", str(run)]
        proc = cli(*args, kill=kill)
        assert proc.returncode == -signal.SIGKILL, (command, kill, proc.stderr)
        # an unfinished run is refused by the other commands, pointing to resume
        if command == "train":
            again = cli("train", *CONFIG, "--out", str(run))
            assert again.returncode == 2 and "ncpvae resume" in again.stderr
    # a kill in the middle of the evaluation (the last stage left)
    proc = cli("resume", str(run), kill="1@evaluate")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    evaluate = cli("evaluate", str(run))
    assert evaluate.returncode == 2 and "ncpvae resume" in evaluate.stderr
    final = cli("resume", str(run))
    assert final.returncode == 0, final.stderr
    assert not list(run.rglob(".*.tmp"))
    assert results(run) == results(reference)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["progress"] == {"planned": ["train", "fit_prior", "sample", "evaluate"],
                                   "completed": ["train", "fit_prior", "sample", "evaluate"],
                                   "finished": True}


def _fused_adam_available() -> bool:
    try:
        torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], fused=True)
    except RuntimeError:
        return False
    return True


_FUSED_ADAM_ON_CPU = _fused_adam_available()

#: the end-to-end stages only (the evaluation is covered above), a short run
ZOO = ["smoke", "--set", "evaluate.enabled=false", "--set", "train.epochs=2"]


def test_a_jointly_trained_vamp_prior_resumes_to_the_uninterrupted_weights(tmp_path):
    """The VampPrior's pseudo-inputs are trained with the VAE: killed after epoch 1 and
    resumed, the run ends with the uninterrupted run's numbers and pseudo-inputs (with the
    fused Adam kernel, whose state resumes like the default one's)."""
    config = [*ZOO, "--set", "prior=vamp", "--set", "prior.components=4",
              "--set", "train.fused_adam=true"]
    reference, run = tmp_path / "reference", tmp_path / "killed"
    assert cli("train", *config, "--out", str(reference)).returncode == 0
    assert cli("train", *config, "--out", str(run), kill="1@epoch").returncode == -signal.SIGKILL
    final = cli("resume", str(run))
    assert final.returncode == 0, final.stderr
    assert results_without_evaluation(run) == results_without_evaluation(reference)
    weights = [torch.load(r / "checkpoint.pt", weights_only=True) for r in (reference, run)]
    prior_keys = [k for k in weights[0]["prior"] if "pseudo" in k]
    assert prior_keys
    # train.fused_adam = true: the fused kernel where torch has it, resumed bit for bit
    assert weights[0]["optimizer"]["param_groups"][0]["fused"] is _FUSED_ADAM_ON_CPU
    assert weights[1]["optimizer"]["param_groups"][0]["fused"] is _FUSED_ADAM_ON_CPU
    for key in prior_keys:
        assert torch.equal(weights[0]["prior"][key], weights[1]["prior"][key]), key


def test_a_zoo_prior_resumes_after_training_and_refits_as_another(tmp_path):
    """A gmm run killed after its VAE training resumes into a fitted GMM; `fit-prior` then
    refits the same run with a flow (a different learned prior)."""
    run = tmp_path / "gmm"
    config = [*ZOO, "--set", "prior=gmm", "--set", "prior.components=3"]
    assert cli("train", *config, "--out", str(run), kill="1@stage").returncode == -signal.SIGKILL
    refused = cli("fit-prior", str(run))
    assert refused.returncode == 2 and "ncpvae resume" in refused.stderr
    final = cli("resume", str(run))
    assert final.returncode == 0, final.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["progress"]["finished"] and "delta" in summary["prior_fit"]
    refit = cli("fit-prior", str(run), "--set", "prior=flow", "--set", "prior.epochs=3",
                "--set", "prior.min_steps=0")
    assert refit.returncode == 0, refit.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["prior_fit"]["epochs_run"] <= 3 and "delta" in summary["prior_fit"]
