"""``ncpvae compare-priors``: several priors fitted on one frozen VAE, scored against N(0, I) on
the same draws, images and KID subsets (paired differences), written after every prior."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from ncpvae.cli import main
from ncpvae.config import load_config
from ncpvae.errors import ConfigError
from ncpvae.evaluation import compare
from ncpvae.evaluation.compare import CompareSettings, compare_priors, parse_spec
from ncpvae.evaluation.format import pm
from ncpvae.evaluation.report import fit_table, write_report

#: smoke-size comparison: the IW bound on the run's [evaluate.likelihood] sizes (32 images,
#: K = 8), KID on 128 samples in 4 subsets
SIZES = {"num_heldout": 64, "num_speed_samples": 50, "kid_samples": 128, "kid_subsets": 4,
         "quiet": True}
#: quick fits; the GMM's structure fixed (K = 10, full) so its label is known (selection has its
#: own tests, test_gmm_selection.py)
FITS = {"num_train": 256, "options": {"ncp": {"epochs": 5, "min_steps": 0},
                                      "gmm": {"max_iter": 50, "components": 10,
                                              "covariance": "full"}}}


@pytest.fixture(scope="module")
def smoke_gaussian_run(smoke_run):
    """The session's smoke run (tests/conftest.py), compared on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield smoke_run
    torch.set_num_threads(threads)


def test_parse_spec():
    assert parse_spec("gmm") == {"name": "gmm"}
    assert parse_spec("ncp:gmm") == {"name": "ncp", "base": {"name": "gmm"}}
    with pytest.raises(ConfigError, match="bad prior spec"):
        parse_spec("ncp:")
    with pytest.raises(ConfigError, match="kid_reference must be 'test' or 'train'"):
        CompareSettings(["gaussian"], kid_reference="validation")
    with pytest.raises(ConfigError, match="no priors listed"):
        CompareSettings([])
    with pytest.raises(ConfigError, match="kid_subsets >= 2"):
        CompareSettings(kid_samples=10, kid_subsets=1)
    settings = CompareSettings(["gmm"], overrides=["seed=1"], options=None)
    assert settings.priors == ("gmm",) and settings.overrides == ("seed=1",)
    assert settings.options == {}


@pytest.mark.slow  # fits four priors
def test_compare_priors_pairs_every_row_with_the_same_draws(smoke_gaussian_run, tmp_path):
    result = compare_priors(smoke_gaussian_run, CompareSettings(
        ["gaussian", "gmm", "ncp:gmm", "run"], out=tmp_path, **SIZES, **FITS))
    assert result["complete"] and not result["pending"]
    assert result["iw"] == {"num_examples": 32, "num_samples": 8}
    assert result["kid"]["num_real"] == 128 and result["kid"]["real_per_subset"] == 32
    rows = {r["prior"]: r for r in result["rows"]}
    for spec in ("gaussian", "run"):  # N(0, I) itself: every paired difference is exactly 0
        reference = rows[spec]
        assert reference["label"] == "N(0, I)"
        for key in ("gain", "iw_gain", "kid_diff"):
            assert reference[key] == 0.0 and reference[f"{key}_se"] == 0.0, (spec, key)
        assert reference["kid_diff_se_unpaired"] > 0 and reference["iw_gain_se_unpaired"] > 0
    reference = rows["gaussian"]
    for row in result["rows"]:
        # paired: each difference is exactly the difference of the two rows' own means
        assert row["gain"] == pytest.approx(reference["cross_entropy"] - row["cross_entropy"],
                                            abs=1e-9)
        assert row["iw_gain"] == pytest.approx(row["iw_bound"] - reference["iw_bound"],
                                               abs=1e-9)
        assert row["kid_diff"] == pytest.approx(row["kid"] - reference["kid"], abs=1e-12)
        for key in ("cross_entropy_se", "iw_bound_se", "iw_gain_se", "kid_se", "kid_diff_se"):
            assert math.isfinite(row[key]), key
        assert row["iw_bound"] >= row["elbo"] and 0 <= row["precision"] <= 1
        assert row["samples_per_second"] > 0
        assert (tmp_path / row["samples_plot"]).stat().st_size > 1000
    assert rows["gmm"]["fit_seconds"] > 0 and "fit" in rows["gmm"]
    # an unnormalized prior: log Z's SE is part of its IW bound's and IW gain's SE
    tilted = rows["ncp:gmm"]
    assert "gain_over_base" in tilted and tilted["log_z_se"] > 0
    assert tilted["iw_gain_se"] >= tilted["log_z_se"]
    saved = json.loads((tmp_path / "table.json").read_text())
    assert saved["rows"][1]["prior"] == "gmm" and saved["complete"]
    table = (tmp_path / "table.md").read_text()
    assert "| GMM (K=10, full) (`gmm`) |" in table and "ΔKID ×10³" in table
    assert "IW gain" in table and (tmp_path / "gains.png").stat().st_size > 1000


def test_the_reference_iw_bound_is_the_evaluations(smoke_gaussian_run, tmp_path):
    """The N(0, I) row's IW bound is the one `ncpvae evaluate` computes for the base prior (the
    same code, draws and sizes)."""
    from ncpvae.evaluation.pipeline import likelihood
    from ncpvae.run.build import open_run

    result = compare_priors(smoke_gaussian_run, CompareSettings(
        ["gaussian"], out=tmp_path, **{**SIZES, "kid_samples": 0}))
    assert result["kid"] is None and "kid" not in result["rows"][0]
    expected = likelihood(open_run(smoke_gaussian_run, quiet=True), None, [])["base"]["iw"]
    row = result["rows"][0]
    assert row["iw_bound"] == pytest.approx(expected["mean"], rel=1e-12)
    assert row["iw_bound_se"] == pytest.approx(expected["se"], rel=1e-9)


def test_pairing_shrinks_the_se_of_a_coupled_difference(smoke_gaussian_run, tmp_path):
    """N(0, 1.1² I) against N(0, I): the IW draws are shared, so each image's difference is a
    small function of its draws while the bounds themselves spread over images by whole nats;
    the KID samples are coupled (z' = 1.1 z from the same generator) and the real subsets are
    the same. Both paired SEs must be below the unpaired ones."""
    result = compare_priors(smoke_gaussian_run, CompareSettings(
        ["gaussian"], out=tmp_path, options={"gaussian": {"scale": 1.1}}, **SIZES))
    row = result["rows"][0]
    assert row["label"] == "gaussian" and row["gain"] != 0.0
    assert row["iw_gain_se"] < 0.5 * row["iw_gain_se_unpaired"]
    assert row["kid_diff_se"] < 0.5 * row["kid_diff_se_unpaired"]


@pytest.mark.slow  # end to end, three priors
def test_rows_are_written_as_they_finish_and_reused(smoke_gaussian_run, tmp_path,
                                                    monkeypatch):
    score = compare.score_prior
    calls: list[str] = []

    def failing(prior, *args, **kwargs):
        calls.append(prior.label)
        if prior.label.startswith("GMM"):
            raise RuntimeError("the GMM broke")
        return score(prior, *args, **kwargs)

    monkeypatch.setattr(compare, "score_prior", failing)
    with pytest.raises(RuntimeError, match="the GMM broke"):
        compare_priors(smoke_gaussian_run, CompareSettings(["gaussian", "gmm", "run"],
                                                           out=tmp_path, **SIZES, **FITS))
    saved = json.loads((tmp_path / "table.json").read_text())
    assert [r["prior"] for r in saved["rows"]] == ["gaussian"]
    assert saved["pending"] == ["gmm", "run"] and saved["complete"] is False
    assert "Not finished yet: gmm, run." in (tmp_path / "table.md").read_text()

    def counting(prior, *args, **kwargs):
        calls.append(prior.label)
        return score(prior, *args, **kwargs)

    calls.clear()
    monkeypatch.setattr(compare, "score_prior", counting)
    result = compare_priors(smoke_gaussian_run, CompareSettings(["gaussian", "gmm", "run"],
                                                                out=tmp_path, **SIZES, **FITS))
    assert result["complete"] and result["reused"] == ["gaussian"]
    assert calls == ["GMM (K=10, full)", "N(0, I)"]  # the finished row was not recomputed
    assert result["rows"][0] == saved["rows"][0]
    # other settings: nothing is reused
    other = compare_priors(smoke_gaussian_run, CompareSettings(
        ["gaussian"], out=tmp_path, **{**SIZES, "num_heldout": 32}, **FITS))
    assert other["reused"] == []


@pytest.mark.slow  # end to end
def test_the_report_shows_the_comparison(smoke_gaussian_run, tmp_path):
    run = shutil.copytree(smoke_gaussian_run, tmp_path / "run")
    compare_priors(run, CompareSettings(["gaussian", "gmm"], **SIZES, **FITS))
    config = json.loads(json.dumps(load_config(run / "config.toml").model_dump(mode="json")))
    page = write_report(run, {}, config).read_text()
    assert "Prior comparison" in page and "GMM (K=10, full) (gmm)" in page
    assert "ΔKID ×10³" in page and page.count("data:image/png;base64,") >= 1


def test_the_fit_table_stays_narrow():
    fit = {f"number_{i}": float(i) for i in range(10)}
    fit.update(log_z=0.1, log_z_se=0.01, delta=0.5, delta_se=0.02, fit_seconds=3.0)
    block = fit_table(fit)
    assert len(block.header) == 6 and all(len(row) == 6 for row in block.rows)
    cells = [c for row in block.rows for c in row]
    assert "log_z" in cells and pm(0.1, 0.01) in cells and "log_z_se" not in cells
    assert "fit_seconds" not in cells and len(block.rows) == 4  # 12 quantities, 3 per row


def test_compare_priors_command(smoke_gaussian_run, tmp_path, capsys):
    assert main(["compare-priors", str(smoke_gaussian_run), "--priors", "gaussian,flow",
                 "--heldout", "32", "--train", "200", "--option", "flow.epochs=2",
                 "--option", "flow.min_steps=0",
                 "--iw-images", "8", "--iw-samples", "4",
                 "--kid-samples", "64", "--kid-subsets", "2", "--kid-reference", "train",
                 "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "flow (NSF)" in out and "8 test images, K = 4" in out
    assert "64 decoded samples per prior vs 64 train images in 2 subsets" in out
    assert main(["compare-priors", str(smoke_gaussian_run), "--priors", "nonesuch",
                 "--out", str(tmp_path)]) == 2
    assert "nonesuch" in capsys.readouterr().err


@pytest.mark.parametrize("spec", ["vamp", "ncp:vamp"])
def test_a_jointly_trained_prior_is_refused_in_one_line(smoke_gaussian_run, tmp_path, capsys,
                                                         spec):
    """VampPrior's pseudo-inputs train with the encoder: with the VAE frozen there is nothing to
    fit, so its row (untrained pseudo-inputs, thousands of nats) is refused before any work."""
    out = tmp_path / "cmp"
    assert main(["compare-priors", str(smoke_gaussian_run), "--priors", f"gaussian,{spec}",
                 "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"'{spec}' cannot be compared post hoc" in err
    assert "vamp prior's pseudo-inputs are trained jointly with the encoder" in err
    assert "train a run with `--set prior=vamp`" in err
    assert not (out / "table.json").exists()  # no row, not even N(0, I)'s, was scored


def test_a_run_trained_with_vamp_is_told_to_compare_it_as_run(registry):
    from types import SimpleNamespace

    own = compare.prior_config("vamp", None, registry)  # type: ignore[arg-type]
    run = SimpleNamespace(config=SimpleNamespace(prior=own))
    with pytest.raises(ConfigError, match="this run was trained with it: compare its own prior "
                                          "as `run`"):
        compare.refuse_joint_prior("vamp", own, run, registry)  # type: ignore[arg-type]
    compare.refuse_joint_prior("run", own, run, registry)  # type: ignore[arg-type]
    compare.refuse_joint_prior("ncp:gmm", compare.prior_config("ncp:gmm", None, registry),
                               run, registry)  # type: ignore[arg-type]
