"""`ncpvae sample` and `ncpvae fit-prior` on trained runs, and prior swaps across checkpoints."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ncpvae.config import load_config
from ncpvae.errors import ConfigError
from ncpvae.experiment import train
from ncpvae.run.build import open_run
from ncpvae.run.fit import fit_prior
from ncpvae.run.sample import sample_stage
from ncpvae.run.sample_command import sample_command

NCPVAE = shutil.which("ncpvae", path=str(Path(sys.executable).parent)) or shutil.which("ncpvae")
NCP_SMOKE = ["prior=ncp", "prior.epochs=3", "prior.min_steps=0", "prior.hidden=[32,32]",
             "prior.log_z_samples=2000", "prior.sir_candidates=20", "sampler=langevin",
             "sampler.num_steps=20", "sampler.burn_in=10", "sampler.thin=5", "sampler.metropolis=true",
             "evaluate.enabled=false"]


@pytest.fixture(scope="module")
def ncp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ncp") / "run"
    train(load_config("smoke", NCP_SMOKE), out, quiet=True)
    return out


@pytest.mark.slow
def test_ncp_run_has_the_fit_outputs_and_three_panels(ncp_run):
    summary = json.loads((ncp_run / "summary.json").read_text())
    fit = summary["prior_fit"]
    for key in ("heldout_accuracy", "heldout_auc", "log_z", "log_z_se", "delta", "delta_se"):
        assert isinstance(fit[key], float), key
    assert 0.0 <= fit["heldout_accuracy"] <= 1.0 and fit["log_z_se"] > 0
    assert summary["samples"]["panels"] == ["gaussian (base prior)", "ncp by SIR", "ncp by MALA"]
    assert (ncp_run / "plots" / "prior_fit.png").stat().st_size > 1000
    fit_records = [json.loads(x) for x in (ncp_run / "metrics.jsonl").read_text().splitlines()
                   if json.loads(x)["stage"] == "fit_prior"]
    assert len(fit_records) >= 1
    assert {"train_loss_mean", "train_loss_min", "heldout_loss"} <= set(fit_records[0])


@pytest.mark.slow
def test_reloaded_ncp_run_gives_identical_log_prob(ncp_run):
    a = open_run(ncp_run, quiet=True)
    b = open_run(ncp_run, quiet=True)
    z = torch.randn(32, a.config.latent_dim)
    assert torch.equal(a.prior.log_prob(z), b.prior.log_prob(z))


@pytest.mark.slow
def test_sample_command_writes_grid_latents_diagnostics_and_plots(ncp_run, tmp_path):
    out = sample_command(ncp_run, ["sampler.num_steps=12", "sampler.burn_in=4", "sampler.thin=2"],
                         chains=8, out=tmp_path / "s", quiet=True)
    for name in ("samples.png", "energy_trace.png", "trajectories.png"):
        assert (out / name).stat().st_size > 1000, name
    latents = torch.load(out / "latents.pt", weights_only=True)
    assert latents["final"].shape == (8, 4) and latents["samples"].shape == (4, 8, 4)
    diagnostics = json.loads((out / "diagnostics.json").read_text())
    assert diagnostics["chains"] == 8 and len(diagnostics["ess"]) == 4
    assert 0.0 <= diagnostics["acceptance_rate"] <= 1.0


@pytest.mark.slow
def test_sample_the_base_prior_of_an_ncp_run(ncp_run, tmp_path):
    out = sample_command(ncp_run, ["prior=gaussian", "sampler.num_steps=4", "sampler.burn_in=0",
                                   "sampler.thin=1"], chains=4, out=tmp_path / "b", quiet=True)
    assert json.loads((out / "diagnostics.json").read_text())["prior"] == "gaussian"


def test_sample_without_a_sampler_is_a_clear_error(smoke_run):
    with pytest.raises(ConfigError, match="--sampler"):
        sample_command(smoke_run, [], quiet=True)


@pytest.mark.slow
def test_fit_prior_turns_a_plain_run_into_an_ncp_run(smoke_run_copy):
    out = smoke_run_copy
    overrides = [o for o in NCP_SMOKE if o.startswith("prior")]
    run = open_run(out, overrides, quiet=True)
    assert not run.prior.is_fitted
    summary = fit_prior(run)
    sample_stage(run)
    assert summary["delta_se"] > 0
    assert open_run(out, overrides, quiet=True).prior.is_fitted


@pytest.mark.slow
def test_cli_sample(ncp_run, tmp_path):
    result = subprocess.run([NCPVAE, "sample", str(ncp_run), "--chains", "4", "--steps", "6",
                             "--set", "sampler.burn_in=2", "--set", "sampler.thin=2",
                             "--out", str(tmp_path / "cli"), "--quiet"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "cli" / "samples.png").is_file()
