"""The evaluation stage: evaluation.json, the report, determinism, the feature-net cache, data
without ground truth, clear errors, ``ncpvae evaluate`` through the installed script, and a
third-party sampler and learned prior that appear with their own labels and numbers."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Literal, NamedTuple

import pytest
import torch

import ncpvae
from ncpvae import ComponentConfig, LearnedPrior, Sampler, hookimpl
from ncpvae.config import config_to_toml, load_config
from ncpvae.errors import ConfigError, DataError, NotFittedError
from ncpvae.evaluation.config import EvaluateConfig
from ncpvae.evaluation.format import num, pm
from ncpvae.evaluation.metrics_table import DISENTANGLEMENT
from ncpvae.evaluation.pipeline import (
    check_kid_sizes,
    evaluate_command,
    evaluate_run,
    evaluate_stage,
    feature_scale,
    summary_section,
    table_rows,
)
from ncpvae.evaluation.report import write_report
from ncpvae.experiment import train
from ncpvae.io import to_plain_json as plain
from ncpvae.plugin_manager import PluginManager
from ncpvae.run.build import build_run, open_run
from ncpvae.run.fit import fit_prior
from ncpvae.run.train import train_vae

#: the smoke config's MALA row, also the run's own sampler (so it is not listed twice)
MALA = ["sampler=langevin", "sampler.metropolis=true", "sampler.step_size=0.05",
        "sampler.num_steps=20", "sampler.burn_in=10", "sampler.thin=2",
        "sampler.adapt_step_size=true"]
NCP_ROWS = ["N(0, I)", "NCP by SIR", "NCP by ULA", "NCP by MALA"]
#: the pipeline without the sampling stage (whose figures the evaluation does not use)
STAGES = (train_vae, fit_prior, evaluate_stage)


def _read(run: Path, name: str = "evaluation.json") -> dict:
    return json.loads((run / name).read_text())


def _deterministic(evaluation: dict) -> dict:
    return {k: v for k, v in evaluation.items() if k != "runtime"}


@pytest.fixture(scope="module")
def ncp_run(tmp_path_factory) -> Path:
    """A smoke-sized NCP run: trained, prior fitted, evaluated by the evaluation stage."""
    out = tmp_path_factory.mktemp("evaluation") / "ncp"
    # its own feature-net cache (the session's is shared with the smoke run, same key)
    config = load_config("smoke", ["prior=ncp", "prior.epochs=2", "prior.min_steps=0",
                                   "prior.log_z_samples=4096",
                                   f"evaluate.cache_dir={out.parent / 'cache'}", *MALA])
    train(config, out, quiet=True, stages=STAGES)
    return out


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """Labelled data without ground-truth factors (an MLP VAE on sklearn's 8x8 digits)."""
    out = tmp_path_factory.mktemp("evaluation") / "digits"
    train(load_config("smoke", ["data=digits", "model=mlp", "model.hidden=[32]",
                                "train.epochs=1"]), out, quiet=True, stages=STAGES)
    return out


# ---------------------------------------------------------------------------------------------
# the config


def test_default_disentanglement_sizes_are_disentanglement_libs():
    cfg = EvaluateConfig()
    assert (cfg.beta_vae.num_train, cfg.beta_vae.num_eval, cfg.beta_vae.group_size) == (
        10_000, 5_000, 64)
    assert (cfg.factor_vae.num_train, cfg.factor_vae.num_eval,
            cfg.factor_vae.num_variance_estimate) == (10_000, 5_000, 10_000)
    assert (cfg.mig.num_train, cfg.mig.num_bins) == (10_000, 20)
    assert (cfg.dci.num_train, cfg.dci.num_test) == (10_000, 5_000)
    assert (cfg.sap.num_train, cfg.sap.num_test) == (10_000, 5_000)


def test_default_table_rows_are_the_four_of_the_issue():
    config = load_config("default", ["data.train_size=64", "data.test_size=64"])
    labels = [row.label for row in table_rows(build_run(config, quiet=True))]
    assert labels == NCP_ROWS  # the run's own MALA sampler is the listed MALA row


def test_feature_scale_gives_real_features_unit_rms():
    import numpy as np

    real = np.random.default_rng(0).gamma(2.0, 3.0, size=(50, 8))
    scaled = real / feature_scale(real)
    assert np.mean(np.sum(scaled**2, axis=1)) / 8 == pytest.approx(1.0)
    assert feature_scale(np.zeros((5, 3))) == 1.0


def test_the_metric_table_drives_config_summary_and_report(tmp_path):
    """Every metric of the table has an [evaluate.<name>] section that is its own config class
    (plus ``enabled``), and its headline number reaches summary.json and the report."""
    cfg = EvaluateConfig()
    results = {"beta_vae": {"train_accuracy": 0.91, "eval_accuracy": 0.875},
               "factor_vae": {"train_accuracy": 0.7, "eval_accuracy": 0.625,
                              "num_active_dims": 3, "collapsed": False},
               "mig": {"mig": 0.3125, "gap_per_factor": [0.5, None]},
               "dci": {"disentanglement": 0.4375, "completeness": 0.5,
                       "informativeness_train": 0.9, "informativeness_test": 0.8},
               "sap": {"sap": 0.0625, "score_matrix": [[0.5]]}}
    assert [spec.name for spec in DISENTANGLEMENT] == list(results)
    for spec in DISENTANGLEMENT:
        section = getattr(cfg, spec.name)
        assert isinstance(section, spec.config) and section.enabled is None
        assert section.model_dump(exclude={"enabled"}) == spec.config().model_dump()
    summary = summary_section({"disentanglement": results})
    for spec in DISENTANGLEMENT:
        assert summary[spec.summary_key] == results[spec.name][spec.headline]
    (tmp_path / "plots").mkdir()
    text = write_report(tmp_path, {"disentanglement": results}, {"name": "t"},
                        fmt="markdown").read_text()
    for spec in DISENTANGLEMENT:
        headline = num(results[spec.name][spec.headline])
        assert f"{spec.label} {headline}" in text  # the headline bullet
        assert f"| {spec.label} | {headline} |" in text  # the metric table


def test_plain_makes_strict_json():
    import numpy as np
    import torch

    data = plain({"a": torch.tensor([1.0, float("nan")]), "b": (np.float32(2.5), np.int64(3)),
                  "c": float("inf"), "d": np.bool_(True)})
    assert data == {"a": [1.0, None], "b": [2.5, 3], "c": None, "d": True}
    json.dumps(data, allow_nan=False)


def test_the_learned_prior_summary_estimates_log_z_once_for_kl_gain():
    """One ``log Z`` estimate serves the summary's ``log_z`` and ``Delta``: the numbers of
    ``kl_gain`` estimating it again from the same seed, with half the base draws."""
    from ncpvae_plugins.gaussian import GaussianPrior
    from ncpvae_plugins.ncp import NCPPrior

    from ncpvae.run.fit import learned_prior_summary

    logit = torch.nn.Linear(2, 1, dtype=torch.float64)
    prior = NCPPrior(GaussianPrior(2), classifier=torch.nn.Sequential(logit, torch.nn.Flatten(0)),
                     fitted=True).to(torch.float64)
    latents = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    calls = []
    estimate = prior.log_normalizer_over_base

    def counted(*args, **kwargs):
        calls.append(1)
        return estimate(*args, **kwargs)

    prior.log_normalizer_over_base = counted
    summary = learned_prior_summary(prior, latents, torch.Generator().manual_seed(7),
                                    num_samples=500)
    assert len(calls) == 1
    log_z = prior.log_normalizer(500, generator=torch.Generator().manual_seed(7))
    delta = prior.kl_gain(latents, num_samples=500, generator=torch.Generator().manual_seed(7))
    assert (summary["log_z"], summary["log_z_se"]) == log_z
    assert (summary["delta"], summary["delta_se"]) == delta
    assert summary["num_encodings"] == 64 and summary["log_z_samples"] == 500


# ---------------------------------------------------------------------------------------------
# a trained NCP run


@pytest.mark.slow
def test_evaluation_json_has_every_part_with_sane_values(ncp_run):
    ev = _read(ncp_run)
    json.dumps(ev, allow_nan=False)  # strict JSON
    # every metric but DCI, which the smoke config switches off (seconds of gradient boosting)
    assert set(ev["disentanglement"]) == {"beta_vae", "factor_vae", "mig", "sap"}
    for metric, key in (("beta_vae", "eval_accuracy"), ("factor_vae", "eval_accuracy"),
                        ("mig", "mig"), ("sap", "sap")):
        assert 0.0 <= ev["disentanglement"][metric][key] <= 1.0, metric
    assert ev["feature_net"]["target"] == "factors"
    assert ev["feature_net"]["heads"] == ["shape", "scale", "orientation", "posX", "posY"]
    # the smoke net is far below the sprites targets, and every dependent number says so
    net = ev["feature_net"]
    assert net["meets_target"] is False and set(net["below_target"]) == {
        "shape", "scale", "posX", "posY"}
    assert net["warning"] in ev["notes"]
    for part in (*(row["sample_quality"] for row in ev["rows"]),
                 *(row["coverage"] for row in ev["rows"]), ev["factor_recovery"]):
        assert part["instrument"] == {"ref": "feature_net", "val_accuracy": net["val_accuracy"],
                                      "meets_target": False}

    lp = ev["learned_prior"]
    assert lp["log_z_se"] > 0 and lp["delta_se"] > 0 and lp["log_z_samples"] == 4096
    assert abs(lp["delta"]) < 5 * lp["delta_se"] + 1.0  # a barely trained classifier

    assert [row["label"] for row in ev["rows"]] == NCP_ROWS
    for row in ev["rows"]:
        sq, pf = row["sample_quality"], row["prior_fit"]
        assert sq["kid_se"] > 0 and sq["frechet"] >= 0
        assert 0 <= sq["precision"] <= 1 and 0 <= sq["recall"] <= 1
        assert sq["n_fake"] == 64 and sq["n_real"] == 128
        assert 0 <= pf["c2st"]["accuracy"] <= 1 and pf["c2st"]["se"] > 0
        assert 0 < pf["mmd"]["p_value"] <= 1 and 0 < pf["c2st"]["p_value"] <= 1
        assert 0 <= row["coverage"]["joint"] <= 1
        assert (ncp_run / row["plot"]).stat().st_size > 1000
    sir, ula, mala = ev["rows"][1:]
    assert 0 < sir["diagnostics"]["ess_fraction"] <= 1
    assert 0 <= mala["diagnostics"]["acceptance_rate"] <= 1
    assert ula["sampler"]["metropolis"] is False and mala["sampler"]["metropolis"] is True
    assert 0 <= ev["coverage_reference"]["joint"] <= 1 and ev["feature_scale"] > 0

    lik = ev["likelihood"]
    assert lik["base"]["prior"] == "gaussian" and lik["prior"]["prior"] == "ncp"
    for key in ("base", "prior"):
        assert lik[key]["iw"]["mean"] >= lik[key]["elbo"]["mean"]  # L_K >= ELBO per example
        assert lik[key]["iw"]["num_samples"] == 8 and lik[key]["iw"]["num_examples"] == 32
    assert lik["base"]["iw"]["se_log_normalizer"] == 0
    assert lik["prior"]["iw"]["se_log_normalizer"] == pytest.approx(lp["log_z_se"])
    assert lik["iw_gain"]["se"] >= lp["log_z_se"]

    summary = _read(ncp_run, "summary.json")["evaluation"]
    assert summary["mig"] == ev["disentanglement"]["mig"]["mig"]
    assert summary["delta"] == lp["delta"] and set(summary["kid"]) == set(NCP_ROWS)


@pytest.mark.slow
def test_report_is_self_contained_with_every_figure(ncp_run):
    page = (ncp_run / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    # training curves, KL per dim, NCP classifier loss, reconstructions, traversals, 4 rows
    assert len(sources) == 9
    for text in ("Configuration", "Training", "Metrics", "Prior × sampler", *NCP_ROWS,
                 "MIG", "FactorVAE", "log Z", "Delta"):
        assert text in page, text
    assert "http://" not in page and "https://" not in page


@pytest.mark.slow
def test_markdown_report_links_the_pngs(ncp_run, tmp_path):
    run = shutil.copytree(ncp_run, tmp_path / "copy")
    path = write_report(run, _read(run), open_run(run, quiet=True).config, fmt="markdown")
    text = path.read_text()
    assert path.name == "report.md" and "![Training curves" in text
    for link in re.findall(r'(?:\]\(|src=")(plots/[^)"]+)', text):
        assert (run / link).is_file(), link
    assert "| NCP by MALA |" in text


@pytest.mark.slow
def test_reevaluation_is_identical_and_reuses_the_feature_net(ncp_run):
    first = _read(ncp_run)
    cached = list((ncp_run.parent / "cache").glob("*.pt"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    assert first["runtime"]["feature_net_cache_hit"] is False

    report = evaluate_command(ncp_run, [], quiet=True)
    second = _read(ncp_run)
    assert report == ncp_run / "report.html"
    assert second["runtime"]["feature_net_cache_hit"] is True
    assert cached[0].stat().st_mtime_ns == mtime  # loaded, not retrained
    assert _deterministic(second) == _deterministic(first)


@pytest.mark.slow
def test_a_corrupt_feature_net_entry_is_rebuilt_and_not_reported_as_a_hit(ncp_run, tmp_path):
    run = shutil.copytree(ncp_run, tmp_path / "copy")
    cache = shutil.copytree(ncp_run.parent / "cache", tmp_path / "cache")
    entry, = cache.glob("*.pt")
    entry.write_bytes(b"not a checkpoint")
    evaluate_command(run, [f"evaluate.cache_dir={cache}"], quiet=True)
    assert _read(run)["runtime"]["feature_net_cache_hit"] is False
    assert entry.stat().st_size > 1000  # rebuilt over the corrupt bytes


@pytest.mark.slow
def test_cli_evaluate_through_the_installed_script(ncp_run, tmp_path):
    script = shutil.which("ncpvae", path=str(Path(sys.executable).parent))
    assert script is not None
    run = shutil.copytree(ncp_run, tmp_path / "run")
    off = [f"evaluate.{part}.enabled=false" for part in (
        "beta_vae", "factor_vae", "sap", "likelihood", "sample_quality", "prior_fit")]
    overrides = [*off, "evaluate.mig.num_train=300", "evaluate.report=markdown",
                 "evaluate.samplers=[]", "evaluate.include_run_sampler=false"]
    done = subprocess.run(
        [script, "evaluate", str(run), "--quiet", *(f"--set={o}" for o in overrides)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"evaluation written to {run / 'report.md'}" in done.stdout
    ev = _read(run)
    assert ev["config"]["mig"]["num_train"] == 300 and list(ev["disentanglement"]) == ["mig"]
    assert [row["label"] for row in ev["rows"]] == ["N(0, I)"] and "likelihood" not in ev
    assert (run / "report.md").is_file()


# ---------------------------------------------------------------------------------------------
# data without ground truth, errors


@pytest.mark.slow
def test_data_without_ground_truth_skips_disentanglement_with_a_note(digits_run):
    ev = _read(digits_run)
    assert ev["disentanglement"] == {}
    assert any("ground-truth factors" in note for note in ev["notes"])
    assert ev["feature_net"]["target"] == "labels" and ev["feature_net"]["heads"] == ["label"]
    assert [row["label"] for row in ev["rows"]] == ["N(0, I)"]  # no learned prior: one row
    row = ev["rows"][0]
    assert row["sample_quality"]["kid_se"] > 0 and "coverage" not in row
    assert ev["coverage_reference"] is None and "learned_prior" in ev
    assert "iw_gain" not in ev["likelihood"] and "prior" not in ev["likelihood"]
    assert "ground-truth factors" in (digits_run / "report.html").read_text()


@pytest.mark.slow
def test_a_required_metric_on_data_without_ground_truth_is_an_error(digits_run):
    with pytest.raises(DataError, match=r"evaluate\.mig\.enabled = true.*no ground-truth"):
        evaluate_command(digits_run, ["evaluate.mig.enabled=true"], quiet=True)


@pytest.mark.slow
def test_an_unfitted_learned_prior_is_an_error(digits_run):
    run = open_run(digits_run, ["prior=ncp"], quiet=True)
    with pytest.raises(NotFittedError, match="fit-prior"):
        evaluate_run(run)


def test_a_run_without_checkpoint_is_an_error(tmp_path):
    (tmp_path / "config.toml").write_text(config_to_toml(load_config("smoke")))
    with pytest.raises(DataError, match="no checkpoint.pt"):
        evaluate_command(tmp_path, [], quiet=True)


def test_too_few_samples_for_kid_is_a_config_error():
    config = load_config("smoke", ["evaluate.sample_quality.kid_num_subsets=40"])
    with pytest.raises(ConfigError, match="kid_num_subsets = 40 needs at least 80 samples"):
        check_kid_sizes(config.evaluate, 128)


# ---------------------------------------------------------------------------------------------
# a third-party sampler and learned prior: their own labels and numbers, no framework change


class TiltPrior(LearnedPrior):
    """``p(z) ∝ N(z; 0, I) exp(shift * z_0)`` = ``N(shift * e_0, I)``: log Z = shift² / 2, which
    this prior reports with a made-up SE (so the report shows the prior's own numbers)."""

    name = "tilt"
    normalized = False
    sampling_method = "exact shift"
    LOG_Z_SE = 0.0123

    class Config(ComponentConfig):
        name: Literal["tilt"] = "tilt"
        shift: float = 0.5

    def __init__(self, latent_dim: int, shift: float):
        super().__init__(latent_dim)
        self.base = ncpvae.create("prior", "gaussian", latent_dim=latent_dim)
        self.target = shift
        self.register_buffer("shift", torch.tensor(0.0))
        self.register_buffer("fitted", torch.tensor(False))
        self.last_draws = 0

    @classmethod
    def from_config(cls, config, ctx):
        return cls(ctx.require_latent_dim("the tilt prior"), config.shift)

    @property
    def base_prior(self):
        return self.base

    @property
    def label(self) -> str:
        return "Tilt★"

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted)

    def fit(self, mu, logvar, *, generator=None, progress=False, log=None):
        self.shift.fill_(self.target)
        self.fitted.fill_(True)
        if log is not None:
            log({"epoch": 1, "shift": self.target})
        return {"shift": self.target}

    def log_prob(self, z):
        return self.base.log_prob(z) + self.shift * z[..., 0]

    def sample(self, n, *, generator=None):
        z = self.base.sample(n, generator=generator)
        self.last_draws = n
        return z + self.shift * torch.nn.functional.one_hot(
            torch.tensor(0), self.latent_dim).to(z)

    def log_normalizer(self, num_samples=None, *, generator=None):
        return float(self.shift) ** 2 / 2, self.LOG_Z_SE

    def sampling_info(self):
        return {"tilt_draws": self.last_draws}


class WalkState(NamedTuple):
    position: torch.Tensor
    energy: torch.Tensor


class WalkInfo(NamedTuple):
    acceptance_rate: torch.Tensor


class WalkSampler(Sampler):
    """Random-walk Metropolis with a made-up label and acceptance note."""

    name = "walk"
    NOTE = "a third-party random-walk note"

    class Config(ComponentConfig):
        name: Literal["walk"] = "walk"
        num_steps: int = 10
        burn_in: int = 5
        thin: int = 1
        scale: float = 0.5

    @property
    def label(self) -> str:
        return "Walk-7"

    @property
    def acceptance_note(self) -> str | None:
        return self.NOTE

    def init(self, position, energy, **options):
        with torch.no_grad():
            return WalkState(position.detach(), energy(position).detach())

    def step(self, state, energy, *, generator=None, **options):
        with torch.no_grad():
            proposal = state.position + self.config.scale * self._randn(state.position, generator)
            u = energy(proposal)
            accept = torch.log(self._rand(u, generator)) < state.energy - u
            position = torch.where(accept[:, None], proposal, state.position)
            return (WalkState(position, torch.where(accept, u, state.energy)),
                    WalkInfo(accept.to(position.dtype)))


@pytest.mark.slow
def test_a_third_party_sampler_and_learned_prior_report_their_own_labels_and_numbers(tmp_path):
    plugin = types.SimpleNamespace(
        ncpvae_register_priors=hookimpl(lambda: [TiltPrior]),
        ncpvae_register_samplers=hookimpl(lambda: [WalkSampler]), __name__="third-party")
    manager = PluginManager(entrypoints=False, plugins=[plugin])
    off = [f"evaluate.{m}.enabled=false" for m in (
        "beta_vae", "factor_vae", "mig", "dci", "sap", "sample_quality")]
    config = load_config("smoke", ["prior=tilt", "sampler=walk", "train.epochs=1",
                                   "evaluate.samplers=[]", *off], manager.registry)
    run = train(config, tmp_path / "run", quiet=True, manager=manager)

    ev = _read(run)
    assert [row["label"] for row in ev["rows"]] == ["N(0, I)", "Tilt★ by Walk-7"]
    walk = ev["rows"][1]
    assert walk["acceptance_note"] == WalkSampler.NOTE
    assert 0 <= walk["diagnostics"]["acceptance_rate"] <= 1
    assert 0 <= walk["prior_fit"]["c2st"]["accuracy"] <= 1
    lp = ev["learned_prior"]
    assert lp["log_z"] == 0.125 and lp["log_z_se"] == TiltPrior.LOG_Z_SE  # shift² / 2
    assert lp["delta_se"] >= TiltPrior.LOG_Z_SE and lp["num_encodings"] == 128
    # the likelihood under the unnormalized prior uses its own log Z and SE
    assert ev["likelihood"]["prior"]["prior"] == "tilt"
    assert ev["likelihood"]["prior"]["iw"]["se_log_normalizer"] == TiltPrior.LOG_Z_SE

    summary = _read(run, "summary.json")
    assert summary["prior_fit"]["shift"] == 0.5 and summary["prior_fit"]["log_z"] == 0.125
    assert summary["samples"]["panels"] == ["gaussian (base prior)", "tilt by exact shift",
                                            "tilt by Walk-7"]
    assert summary["samples"]["tilt_draws"] == 16  # the prior's own sampling_info
    assert summary["evaluation"]["delta"] == lp["delta"]

    page = (run / "report.html").read_text()
    for text in ("Tilt★ by Walk-7", f"acceptance {num(walk['diagnostics']['acceptance_rate'])} "
                 f"({WalkSampler.NOTE})", pm(0.125, TiltPrior.LOG_Z_SE),
                 pm(lp["delta"], lp["delta_se"])):
        assert html.escape(text) in page, text
    assert (run / "plots" / "prior_fit.png").stat().st_size > 1000
