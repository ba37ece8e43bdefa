"""Plugin loading: throw-away plugins, clashes, bad hooks, installed entry points, env switches."""

from __future__ import annotations

import importlib
import sys
import textwrap
import types
from typing import Literal

import pytest
import torch
from ncpvae_plugins.gaussian import GaussianPrior

import ncpvae
from ncpvae.component import ComponentConfig
from ncpvae.errors import PluginError
from ncpvae.plugin_manager import PluginLoadWarning, PluginManager

ENV_VARS = ("NCPVAE_DISABLE_PLUGIN_AUTOLOAD", "NCPVAE_DISABLE_PLUGINS")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)


class WidePrior(GaussianPrior):
    name = "wide"

    class Config(ComponentConfig):
        name: Literal["wide"] = "wide"
        scale: float = 10.0

    @classmethod
    def from_config(cls, config, ctx):
        return cls(ctx.require_latent_dim("wide"), GaussianPrior.Config(scale=config.scale))


def plugin(name: str, **hooks) -> types.SimpleNamespace:
    """A plugin object whose ``hooks`` (hook suffix -> return value) are ``@hookimpl`` functions."""
    impls = {f"ncpvae_register_{suffix}": ncpvae.hookimpl(lambda v=value: v)
             for suffix, value in hooks.items()}
    return types.SimpleNamespace(__name__=name, **impls)


def test_throwaway_plugin_is_registered_and_buildable():
    manager = PluginManager(entrypoints=False, plugins=[plugin("wide-plugin", priors=[WidePrior])])
    registry = manager.registry
    assert "wide" in registry.names("prior")
    assert registry.source("prior", "wide") == "wide-plugin"
    prior = ncpvae.create("prior", "wide", latent_dim=3, registry=registry, scale=2.0)
    assert isinstance(prior, WidePrior)
    assert torch.allclose(prior.log_scale.exp(), torch.full((3,), 2.0))
    info = {p.name: p for p in manager.plugins}["wide-plugin"]
    assert info.source == "manual" and info.components == [("prior", "wide")]
    # built-ins are still there, listed as such
    assert "gaussian" in registry.names("prior")
    assert {p.name: p for p in manager.plugins}["ncpvae_plugins.gaussian"].source == "builtin"


def test_module_plugin_with_a_version():
    module = types.ModuleType("wide_module_plugin")
    module.__version__ = "1.2.3"
    module.ncpvae_register_priors = ncpvae.hookimpl(lambda: [WidePrior])
    manager = PluginManager(builtins=False, entrypoints=False, plugins=[module])
    assert manager.registry.names("prior") == ["wide"]
    (info,) = manager.plugins
    assert (info.name, info.source, info.version) == ("wide_module_plugin", "manual", "1.2.3")


def test_a_plugin_config_is_validated_in_run_configs():
    registry = PluginManager(entrypoints=False, plugins=[plugin("p", priors=[WidePrior])]).registry
    from ncpvae.config import validate_config

    config = validate_config({"prior": {"name": "wide", "scale": 4.0}}, registry)
    assert config.prior.scale == 4.0 and type(config.prior) is WidePrior.Config


def test_duplicate_names_name_both_plugins():
    first, second = plugin("first-plugin", priors=[WidePrior]), plugin("second-plugin",
                                                                       priors=[WidePrior])
    with pytest.raises(PluginError) as info:
        PluginManager(entrypoints=False, plugins=[first, second])
    message = str(info.value)
    assert "prior 'wide'" in message
    assert "first-plugin" in message and "second-plugin" in message


def test_shadowing_a_builtin_is_a_clash():
    class Impostor(GaussianPrior):
        name = "gaussian"

    with pytest.raises(PluginError, match=r"ncpvae_plugins\.gaussian.*impostor|"
                                          r"impostor.*ncpvae_plugins\.gaussian"):
        PluginManager(entrypoints=False, plugins=[plugin("impostor", priors=[Impostor])])


@pytest.mark.parametrize("returned,match", [
    (WidePrior, "must return a list"),
    ("wide", "must return a list"),
    (None, "must return a list"),
    ([int], "not a subclass of Prior"),
    ([object], "not a subclass of Prior"),
])
def test_bad_hook_results_name_the_plugin(returned, match):
    with pytest.raises(PluginError, match=f"plugin 'bad-plugin'.*{match}"):
        PluginManager(entrypoints=False, plugins=[plugin("bad-plugin", priors=returned)])


def test_a_class_of_the_wrong_kind_names_the_plugin():
    with pytest.raises(PluginError, match="plugin 'bad-plugin'.*not a subclass of LatentModel"):
        PluginManager(entrypoints=False, plugins=[plugin("bad-plugin", models=[WidePrior])])


def test_a_class_without_a_name_names_the_plugin():
    class Nameless(GaussianPrior):
        name = ""

    with pytest.raises(PluginError, match="plugin 'bad-plugin'.*without a `name`"):
        PluginManager(entrypoints=False, plugins=[plugin("bad-plugin", priors=[Nameless])])


def test_unknown_hook_is_rejected():
    stray = types.SimpleNamespace(__name__="stray",
                                  ncpvae_register_prior=ncpvae.hookimpl(lambda: [WidePrior]))
    with pytest.raises(Exception, match="ncpvae_register_prior"):
        PluginManager(entrypoints=False, plugins=[stray])


def test_disable_a_builtin_by_name(monkeypatch):
    monkeypatch.setenv("NCPVAE_DISABLE_PLUGINS", "gaussian, ncpvae_plugins.models")
    manager = PluginManager(entrypoints=False)
    assert "gaussian" not in manager.registry.names("prior")
    assert not {"mlp", "conv"} & set(manager.registry.names("model"))  # that module's models
    assert "beta_elbo" in manager.registry.names("objective")


# --------------------------------------------------------------------------------------------
# installed entry points: a tiny distribution written into tmp_path

PLUGIN_SOURCE = '''
from typing import Literal

import torch
from ncpvae import ComponentConfig, Prior, hookimpl
from pydantic import Field


class LaplacePrior(Prior):
    """Independent Laplace(0, b) per dimension."""

    name = "{prior}"

    class Config(ComponentConfig):
        name: Literal["{prior}"] = "{prior}"
        b: float = Field(1.0, gt=0)

    def __init__(self, latent_dim, b=1.0):
        super().__init__(latent_dim)
        self.register_buffer("b", torch.tensor(float(b)))

    @classmethod
    def from_config(cls, config, ctx):
        return cls(ctx.require_latent_dim("{prior}"), config.b)

    def log_prob(self, z):
        return (-z.abs() / self.b - torch.log(2 * self.b)).sum(-1)

    def sample(self, n, *, generator=None):
        u = torch.rand(n, self.latent_dim, generator=generator, dtype=self.b.dtype) - 0.5
        return -self.b * u.sign() * torch.log1p(-2 * u.abs())


@hookimpl
def ncpvae_register_priors():
    return [LaplacePrior]
'''


def write_distribution(root, package: str, version: str, entry_points: dict[str, str],
                       modules: dict[str, str]) -> None:
    """``root/<package>/...`` plus ``root/<package>-<version>.dist-info`` with entry points."""
    (root / package).mkdir()
    (root / package / "__init__.py").write_text("")
    for module, source in modules.items():
        (root / package / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{package}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[ncpvae]\n{lines}")


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """Install a distribution into tmp_path (on sys.path); its modules are unloaded afterwards."""
    packages: list[str] = []

    def install(package: str, *, version: str = "0.1", entry_points: dict[str, str],
                modules: dict[str, str]) -> None:
        write_distribution(tmp_path, package, version, entry_points, modules)
        packages.append(package)
        monkeypatch.syspath_prepend(str(tmp_path))
        importlib.invalidate_caches()

    yield install
    for name in list(sys.modules):
        if any(name == p or name.startswith(p + ".") for p in packages):
            del sys.modules[name]
    importlib.invalidate_caches()


def install_testplugin(installed, prior: str = "laplace") -> None:
    installed("ncpvae_testplugin", entry_points={"testplugin": "ncpvae_testplugin.plugin"},
              modules={"plugin": PLUGIN_SOURCE.replace("{prior}", prior)})


def test_installed_entry_point_plugin(installed):
    install_testplugin(installed)
    manager = PluginManager()
    registry = manager.registry
    assert "laplace" in registry.names("prior")
    assert registry.source("prior", "laplace") == "testplugin"
    info = {p.name: p for p in manager.plugins}["testplugin"]
    assert (info.source, info.version) == ("entrypoint", "0.1")
    assert info.components == [("prior", "laplace")]
    prior = ncpvae.create("prior", "laplace", latent_dim=2, b=0.5, registry=registry)
    z = torch.tensor([[1.0, -0.5]])
    expected = torch.distributions.Laplace(0.0, 0.5).log_prob(z).sum(-1)
    torch.testing.assert_close(prior.log_prob(z), expected)
    assert prior.sample(4, generator=torch.Generator().manual_seed(0)).shape == (4, 2)


def test_entry_point_plugin_in_a_run_config(installed):
    install_testplugin(installed)
    registry = PluginManager().registry
    from ncpvae.config import validate_config

    config = validate_config({"prior": {"name": "laplace", "b": 2.0}}, registry)
    assert config.model_dump()["prior"] == {"name": "laplace", "b": 2.0}


def test_autoload_can_be_switched_off(installed, monkeypatch):
    install_testplugin(installed)
    monkeypatch.setenv("NCPVAE_DISABLE_PLUGIN_AUTOLOAD", "1")
    manager = PluginManager()
    assert "laplace" not in manager.registry.names("prior")
    assert "testplugin" not in {p.name for p in manager.plugins}
    assert "ncpvae_testplugin.plugin" not in sys.modules  # not even imported
    # the explicit argument wins over the environment
    assert "laplace" in PluginManager(entrypoints=True).registry.names("prior")


def test_entry_points_false_skips_installed_plugins(installed):
    install_testplugin(installed)
    assert "laplace" not in PluginManager(entrypoints=False).registry.names("prior")


def test_a_named_plugin_can_be_disabled(installed, monkeypatch):
    install_testplugin(installed)
    monkeypatch.setenv("NCPVAE_DISABLE_PLUGINS", "someother,testplugin")
    manager = PluginManager()
    assert "laplace" not in manager.registry.names("prior")
    assert "gaussian" in manager.registry.names("prior")


def test_broken_plugin_warns_and_the_rest_works(installed):
    installed("ncpvae_brokenplugin", entry_points={"brokenplugin": "ncpvae_brokenplugin.plugin"},
              modules={"plugin": "raise ImportError('needs the missing package frobnicate')\n"})
    with pytest.warns(PluginLoadWarning, match="plugin 'brokenplugin'.*frobnicate"):
        manager = PluginManager()
    assert any("brokenplugin" in failure for failure in manager.failures)
    assert "brokenplugin" not in {p.name for p in manager.plugins}
    prior = ncpvae.create("prior", "gaussian", latent_dim=2, registry=manager.registry)
    assert prior.sample(3).shape == (3, 2)


def test_broken_plugin_with_strict_is_an_error(installed):
    installed("ncpvae_brokenplugin", entry_points={"brokenplugin": "ncpvae_brokenplugin.plugin"},
              modules={"plugin": "raise ImportError('needs the missing package frobnicate')\n"})
    with pytest.raises(PluginError, match="plugin 'brokenplugin'.*frobnicate"):
        PluginManager(strict=True)


def test_entry_point_to_a_missing_attribute_warns(installed):
    installed("ncpvae_typoplugin", entry_points={"typoplugin": "ncpvae_typoplugin.plugn"},
              modules={"plugin": ""})
    with pytest.warns(PluginLoadWarning, match="plugin 'typoplugin'"):
        PluginManager()


def test_entry_point_clashing_with_a_builtin_names_both(installed):
    install_testplugin(installed, prior="gaussian")
    with pytest.raises(PluginError) as info:
        PluginManager()
    assert "testplugin" in str(info.value) and "ncpvae_plugins.gaussian" in str(info.value)
