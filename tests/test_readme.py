"""The documentation's code must work exactly as written: the tour snippet (docs/usage.md) and the
plugin recipes (docs/tutorials/write_plugin.md)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from ncpvae.config import tomllib  # the stdlib parser, or tomli on Python 3.10
from ncpvae.plugin_manager import PluginManager
from ncpvae.testing import check_prior

ROOT = Path(__file__).resolve().parents[1]
GUIDES = (ROOT / "docs/usage.md", ROOT / "docs/tutorials/write_plugin.md")
README = ROOT / "README.md"


def code_blocks(language: str) -> list[str]:
    text = "\n".join(path.read_text() for path in GUIDES)
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


@pytest.mark.slow  # the README's tour end to end
def test_python_tour_runs():
    tour = next(b for b in code_blocks("python") if "sampler.run(" in b)
    namespace: dict = {}
    exec(compile(tour, "README tour", "exec"), namespace)
    assert tuple(namespace["result"].samples.shape) == (400, 1024, 8)


def test_plugin_recipe_installs_through_its_entry_point(tmp_path, monkeypatch):
    module_source = next(b for b in code_blocks("python") if b.startswith("# ncpvae_mog/plugin.py"))
    entry_points = next(b for b in code_blocks("toml") if "[project.entry-points.ncpvae]" in b)
    group = tomllib.loads(entry_points)["project"]["entry-points"]["ncpvae"]
    assert group == {"mog": "ncpvae_mog.plugin"}

    package = tmp_path / "ncpvae_mog"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "plugin.py").write_text(module_source)
    dist_info = tmp_path / "ncpvae_mog-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: ncpvae_mog\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(
        "[ncpvae]\n" + "".join(f"{k} = {v}\n" for k, v in group.items()))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("NCPVAE_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    try:
        manager = PluginManager()
        assert "mog" in manager.registry.names("prior")
        info = next(p for p in manager.plugins if p.name == "mog")
        assert (info.source, info.version, info.components) == ("entrypoint", "0.1",
                                                                [("prior", "mog")])
        import ncpvae

        prior = ncpvae.create("prior", "mog", latent_dim=3, registry=manager.registry)
        check_prior(prior)
    finally:
        for name in [m for m in sys.modules if m.startswith("ncpvae_mog")]:
            del sys.modules[name]


def test_learned_prior_recipe_fits_the_maximum_likelihood_gaussian():
    """The README's learned prior, fitted on encodings of N(m, diag(s^2)) (posterior variance
    e^-12, so z = mu up to 2.5e-3): its mean and scale are the sample moments within 5 SE."""
    source = next(b for b in code_blocks("python") if b.startswith("# ncpvae_diag/plugin.py"))
    namespace: dict = {}
    exec(compile(source, "README learned prior", "exec"), namespace)
    prior = namespace["DiagGaussianPrior"](latent_dim=3, epochs=60)
    assert not prior.is_fitted
    gen = torch.Generator().manual_seed(0)
    m, s, n = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.5, 2.0, 1.0]), 4000
    mu = m + s * torch.randn(n, 3, generator=gen)
    summary = prior.fit(mu, torch.full((n, 3), -12.0), generator=gen)
    assert prior.is_fitted and summary["best_epoch"] >= 1
    se_mean, se_scale = s / n**0.5, s / (2 * n) ** 0.5  # SEs of the ML mean and scale
    assert torch.all((prior.mean.detach() - mu.mean(0)).abs() < 5 * se_mean)
    scale = torch.exp(prior.log_scale.detach())
    assert torch.all((scale - mu.std(0)).abs() < 5 * se_scale)
    delta, delta_se = prior.kl_gain(mu[:1000], generator=gen)
    assert delta > 10 * delta_se > 0  # far better than N(0, I) on these encodings
    check_prior(prior)


@pytest.mark.parametrize("command", ["python3 -m venv .venv && .venv/bin/pip install -e '.[test]' "
                                     "&& .venv/bin/ncpvae train", ".venv/bin/pytest",
                                     ".venv/bin/pytest -m slow"])
def test_ci_runs_the_readme_commands(command):
    ci = (README.parent / ".ci" / "run").read_text()
    assert command in README.read_text() and command in ci
