"""End to end on a tiny hierarchical config: train -> fit hierarchical NCP -> sample -> evaluate,
a run killed and resumed equal to the uninterrupted one, and a two-process ``torchrun`` run
equal to the one-process run (docs/hierarchical.md)."""

from __future__ import annotations

import json
import math
import signal

import pytest
from test_distributed import (
    ELBO_TOLERANCE,
    _finish,
    _in_process,
    _ncpvae_start,
    _train_records,
)
from test_resume import cli, results_without_evaluation

HIER = ["smoke", "--set", "model.name=hierarchical", "--set", "model.groups=2",
        "--set", "objective.name=hierarchical_elbo", "--set", "objective.warmup_steps=[4, 8]",
        "--set", "objective.kl_balancing=true", "--set", "prior.name=hier_ncp",
        "--set", "prior.epochs=2", "--set", "prior.min_steps=0",
        "--set", "prior.log_z_samples=4096",
        "--set", "prior.context_samples=64"]


@pytest.mark.slow
def test_a_tiny_hierarchical_run_trains_fits_samples_and_evaluates(tmp_path):
    run = tmp_path / "run"
    done = cli("train", *HIER, "--out", str(run))
    assert done.returncode == 0, done.stderr
    summary = json.loads((run / "summary.json").read_text())
    fit = summary["prior_fit"]
    assert len(fit["group_delta"]) == len(fit["group_delta_se"]) == 2
    assert all(se > 0 for se in fit["group_delta_se"])
    assert "delta" in fit and fit["delta_se"] > 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("test_kl_group1" in m and "test_kl_group2" in m for m in metrics)
    evaluation = json.loads((run / "evaluation.json").read_text())
    labels = [row.get("label", "") for row in evaluation.get("rows", [])]
    assert any("hier. NCP" in label for label in labels), labels
    lp = evaluation["learned_prior"]  # per-group gains on the test draws of Delta: they add up
    assert len(lp["group_delta"]) == len(lp["group_delta_se"]) == 2
    assert abs(sum(lp["group_delta"]) - lp["delta"]) < 1e-9 * max(1.0, abs(lp["delta"]))
    assert (run / lp["group_plot"]).is_file()  # the report embeds it, under its caption
    assert "the gain of each latent group" in (run / "report.html").read_text()
    assert "per-group Delta" in done.stdout
    # compare-priors on a hierarchical run: flat priors on the concatenated latent, the model's
    # top-down prior and the run's hierarchical NCP as rows, paired against N(0, I)
    from test_compare_priors import SIZES

    from ncpvae.evaluation.compare import CompareSettings, compare_priors, format_table
    result = compare_priors(run, CompareSettings(["gaussian", "hierarchical", "run"],
                                                 out=tmp_path / "cmp", **SIZES))
    assert result["complete"] and result["group_sizes"] == [2, 2]
    rows = {row["prior"]: row for row in result["rows"]}
    assert set(rows) == {"gaussian", "hierarchical", "run"}
    assert all(math.isfinite(rows[s]["cross_entropy"]) for s in rows)
    assert "flat priors model the concatenated latent" in format_table(result)


@pytest.mark.slow
def test_a_hierarchical_run_killed_in_training_and_in_the_fit_resumes_to_the_same_numbers(
        tmp_path):
    config = [*HIER, "--set", "evaluate.enabled=false"]
    reference, run = tmp_path / "reference", tmp_path / "killed"
    assert cli("train", *config, "--out", str(reference)).returncode == 0
    assert cli("train", *config, "--out", str(run), kill="1@epoch").returncode == -signal.SIGKILL
    assert cli("resume", str(run), kill="1@fit").returncode == -signal.SIGKILL
    final = cli("resume", str(run))
    assert final.returncode == 0, final.stderr
    assert results_without_evaluation(run) == results_without_evaluation(reference)


@pytest.mark.slow
def test_a_two_process_hierarchical_run_equals_the_one_process_run(tmp_path):
    """``torchrun --nproc_per_node=2``: the same global batches and noise rows as one process, so
    the ELBOs agree up to float summation order (the bound of the flat runs' test,
    test_distributed.py); the hierarchical NCP fit then runs and reports per group."""
    config = [*HIER, "--quiet", "--set", "evaluate.enabled=false", "--set", "train.epochs=2"]
    launched = _ncpvae_start(["train", *config, "--out", str(tmp_path / "two")], nproc=2)
    one = _in_process(["train", *config, "--out", str(tmp_path / "one")])
    two = _finish(launched)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    ones, twos = _train_records(tmp_path / "one"), _train_records(tmp_path / "two")
    assert [r["epoch"] for r in ones] == [r["epoch"] for r in twos] == [1, 2]
    for a, b in zip(ones, twos):
        for key in ("train_elbo", "test_elbo"):
            assert abs(b[key] - a[key]) <= ELBO_TOLERANCE * abs(a[key]), key
        # the per-group KLs are small differences that carry the weights' rounding drift at
        # full size (group 1: 3e-4 relative after 2 epochs), so each run is checked for its own
        # consistency: the groups' KLs add up to its KL
        for record in (a, b):
            groups = record["test_kl_group1"] + record["test_kl_group2"]
            assert abs(groups - record["test_kl"]) <= 1e-5 * abs(record["test_kl"]) + 1e-6
    fit = json.loads((tmp_path / "two" / "summary.json").read_text())["prior_fit"]
    assert len(fit["group_delta"]) == 2  # the fit ran once (rank 0) and wrote its per-group Deltas
