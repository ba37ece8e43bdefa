"""``ncpvae compare-priors``: several priors fitted on one frozen VAE, scored on the same draws."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ncpvae.cli import main
from ncpvae.config import load_config
from ncpvae.errors import ConfigError
from ncpvae.evaluation.compare import compare_priors, parse_spec
from ncpvae.experiment import train


@pytest.fixture(scope="module")
def smoke_gaussian_run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("runs") / "smoke"
    train(load_config("smoke", ["train.epochs=1", "evaluate.enabled=false"]), out, quiet=True)
    yield out
    torch.set_num_threads(threads)


def test_parse_spec():
    assert parse_spec("gmm") == {"name": "gmm"}
    assert parse_spec("ncp:gmm") == {"name": "ncp", "base": {"name": "gmm"}}
    with pytest.raises(ConfigError, match="bad prior spec"):
        parse_spec("ncp:")


def test_compare_priors_pairs_every_row_with_the_same_draws(smoke_gaussian_run, tmp_path):
    result = compare_priors(smoke_gaussian_run, ["gaussian", "gmm", "ncp:gmm", "run"],
                            num_heldout=64, num_speed_samples=50, out=tmp_path, quiet=True)
    rows = {r["prior"]: r for r in result["rows"]}
    reference = rows["gaussian"]
    assert reference["gain"] == 0.0 and reference["gain_se"] == 0.0
    for row in result["rows"]:
        # paired: the gain is exactly the difference of the cross-entropies on the same draws
        assert row["gain"] == pytest.approx(reference["cross_entropy"] - row["cross_entropy"],
                                            abs=1e-9)
        assert math.isfinite(row["cross_entropy_se"]) and row["samples_per_second"] > 0
    assert rows["run"]["label"] == "N(0, I)" and rows["run"]["gain"] == 0.0
    assert rows["gmm"]["fit_seconds"] > 0 and "fit" in rows["gmm"]
    assert "gain_over_base" in rows["ncp:gmm"] and rows["ncp:gmm"]["log_z_se"] > 0
    saved = json.loads((tmp_path / "table.json").read_text())
    assert saved["rows"][1]["prior"] == "gmm" and saved["not_computed"]
    assert "| GMM (K=10, full) (`gmm`) |" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "gains.png").stat().st_size > 1000


def test_compare_priors_command(smoke_gaussian_run, tmp_path, capsys):
    assert main(["compare-priors", str(smoke_gaussian_run), "--priors", "gaussian,flow",
                 "--heldout", "32", "--train", "200", "--out", str(tmp_path), "--quiet"]) == 0
    assert "flow (NSF)" in capsys.readouterr().out
    assert main(["compare-priors", str(smoke_gaussian_run), "--priors", "nonesuch",
                 "--out", str(tmp_path)]) == 2
    assert "nonesuch" in capsys.readouterr().err
