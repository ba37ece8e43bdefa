"""Contract tests over every registered component (``ncpvae.testing``).

Parametrized from a fresh registry at collection time, so a component added later is covered
without touching this file. The last section checks that the checks themselves catch the bugs
they exist for.
"""

from __future__ import annotations

import json
import math
import re
from typing import Literal

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ncpvae_plugins.beta_elbo import BetaELBO
from ncpvae_plugins.gaussian import GaussianPrior
from ncpvae_plugins.models import MLPVAE
from pydantic import ValidationError

import ncpvae
from ncpvae.component import BuildContext, ComponentConfig
from ncpvae.errors import ConfigError, DataError
from ncpvae.plugin_manager import PluginManager
from ncpvae.testing import (
    check_component_class,
    check_dataset,
    check_model,
    check_objective,
    check_prior,
    check_sampler,
    standard_normal_energy,
)

REGISTRY = PluginManager(entrypoints=False).registry
IMAGE_SHAPES = [(1, 64, 64), (1, 32, 32), (1, 28, 28), (1, 8, 8), (3, 32, 32)]
DTYPES = [torch.float32, torch.float64]
#: Config fields that bound the cost of a component in these tests, and their test values;
#: a component gets those it has and accepts.
FAST_FIELDS = {
    "prior": {"epochs": 1, "num_epochs": 1, "max_epochs": 1, "min_steps": 0,
              "heldout_samples": 256, "hidden": [32, 32], "log_z_samples": 64,
              "sir_candidates": 16},
    "sampler": {"num_candidates": 8},
}
SHAPES = settings(derandomize=True, max_examples=10, deadline=None)

batch_shapes = st.lists(st.integers(1, 3), min_size=0, max_size=3).map(tuple)
latent_dims = st.integers(1, 16)
dtypes = st.sampled_from(DTYPES)


def names_or_skip(kind: str) -> list:
    names = REGISTRY.names(kind)
    return names or [pytest.param(None, marks=pytest.mark.skip(reason=f"no {kind}s registered"))]


def fast_fields(kind: str, name: str) -> dict:
    config_cls = REGISTRY.get(kind, name).Config
    fields = {}
    for key, value in FAST_FIELDS.get(kind, {}).items():
        if key in config_cls.model_fields:
            try:
                config_cls.model_validate({"name": name, key: value})
            except ValidationError:
                continue
            fields[key] = value
    return fields


def build_sampler(name: str) -> ncpvae.Sampler:
    return ncpvae.create("sampler", name, registry=REGISTRY, **fast_fields("sampler", name))


def build_prior(name: str, latent_dim: int, dtype: torch.dtype, seed: int = 0) -> ncpvae.Prior:
    """Build a prior from its defaults; fit it briefly on synthetic encodings if it needs it."""
    cls = REGISTRY.get("prior", name)
    prior = ncpvae.create("prior", name, latent_dim=latent_dim, dtype=dtype, seed=seed,
                          image_shape=(1, 8, 8), registry=REGISTRY, **fast_fields("prior", name))
    # as the runner does: a prior defined through the model (the VampPrior) is bound to one
    # (the same model for every seed: it is the run's, not part of the prior's state)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ncpvae.create("model", "mlp", latent_dim=latent_dim, image_shape=(1, 8, 8),
                              dtype=dtype, registry=REGISTRY)
    prior.bind_model(model)
    if cls.requires_fit:
        g = torch.Generator().manual_seed(seed)
        # an aggregate posterior unlike N(0, I): shifted and narrow
        mu = 0.5 + 0.3 * torch.randn(256, latent_dim, generator=g, dtype=dtype)
        logvar = torch.full_like(mu, math.log(0.1))
        try:
            prior.fit(mu, logvar, generator=torch.Generator().manual_seed(seed))
        except NotImplementedError as exc:
            pytest.skip(f"prior '{name}' requires a fit but cannot be fitted generically: {exc}")
    return prior


# --------------------------------------------------------------------------------------------
# every class


@pytest.mark.parametrize("kind,name", [(k, n) for k, n, _, _ in REGISTRY.items()])
def test_component_class_contract(kind, name):
    check_component_class(REGISTRY.get(kind, name), kind, registry=REGISTRY)


@pytest.mark.parametrize("kind,name", [(k, n) for k, n, _, _ in REGISTRY.items()])
def test_component_config_json_schema_is_serializable(kind, name):
    schema = REGISTRY.get(kind, name).Config.model_json_schema()
    assert json.loads(json.dumps(schema))["properties"]["name"]["default"] == name


# --------------------------------------------------------------------------------------------
# priors


@pytest.mark.slow  # fits a learned prior per example
@pytest.mark.parametrize("name", names_or_skip("prior"))
@SHAPES
@given(latent_dim=latent_dims, dtype=dtypes, batch_shape=batch_shapes)
def test_prior_contract(name, latent_dim, dtype, batch_shape):
    prior = build_prior(name, latent_dim, dtype)
    check_prior(prior, batch_shapes=[batch_shape, (2,)])


@pytest.mark.parametrize("name", names_or_skip("prior"))
def test_prior_state_dict_round_trips(name):
    prior = build_prior(name, 3, torch.float64, seed=1)
    clone = build_prior(name, 3, torch.float64, seed=2)
    clone.load_state_dict(prior.state_dict())
    z = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(clone.log_prob(z), prior.log_prob(z), rtol=0, atol=0)
    torch.testing.assert_close(clone.energy(z), prior.energy(z), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# models


@pytest.mark.slow
@pytest.mark.parametrize("image_shape", IMAGE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", names_or_skip("model"))
@settings(derandomize=True, max_examples=2, deadline=None)  # each example builds a network
@given(latent_dim=latent_dims, batch_size=st.integers(1, 3))
def test_model_contract(name, image_shape, latent_dim, batch_size):
    model = ncpvae.create("model", name, latent_dim=latent_dim, image_shape=image_shape,
                          registry=REGISTRY)
    check_model(model, image_shape, batch_size=batch_size)


@pytest.mark.parametrize("name", names_or_skip("model"))
def test_model_contract_float64_and_gaussian_likelihood(name):
    fields = REGISTRY.get("model", name).Config.model_fields
    extra = {"likelihood": "gaussian"} if "likelihood" in fields else {}
    if "learn_scale" in fields:
        extra["learn_scale"] = True
    model = ncpvae.create("model", name, latent_dim=2, image_shape=(1, 8, 8),
                          dtype=torch.float64, registry=REGISTRY, **extra)
    check_model(model, (1, 8, 8))


# --------------------------------------------------------------------------------------------
# objectives


@pytest.mark.parametrize("image_shape", [(1, 8, 8), (1, 28, 28)], ids=["8x8", "28x28"])
@pytest.mark.parametrize("model_name", names_or_skip("model"))
@pytest.mark.parametrize("name", names_or_skip("objective"))
def test_objective_contract(name, model_name, image_shape):
    model = ncpvae.create("model", model_name, latent_dim=3, image_shape=image_shape,
                          registry=REGISTRY)
    prior = ncpvae.create("prior", "gaussian", latent_dim=3, registry=REGISTRY)
    objective = ncpvae.create("objective", name, registry=REGISTRY)
    try:
        objective.check_compatible(model, prior)
    except ConfigError:  # a pairing the objective refuses up front (before training) is fine
        pytest.skip(f"the {name} objective refuses the {model_name} model")
    batch = torch.rand(4, *image_shape, generator=torch.Generator().manual_seed(0))
    for step in (0, 10):
        check_objective(objective, model, prior, batch, step=step)


# --------------------------------------------------------------------------------------------
# datasets


@pytest.mark.slow
@pytest.mark.parametrize("name", names_or_skip("dataset"))
def test_dataset_contract(name, tmp_path, monkeypatch):
    # Relative default paths ("data/...") resolve inside tmp_path: nothing outside it is read
    # or written, and file-backed datasets find nothing there.
    monkeypatch.chdir(tmp_path)
    try:
        plugin = ncpvae.create("dataset", name, registry=REGISTRY)
    except ConfigError as exc:
        required = [k for k, f in REGISTRY.get("dataset", name).Config.model_fields.items()
                    if f.is_required()]
        assert required and all(k in str(exc) for k in required), str(exc)
        pytest.skip(f"dataset '{name}' needs settings without defaults ({', '.join(required)})")
    ctx = BuildContext(seed=0, registry=REGISTRY)
    try:
        check_dataset(plugin, ctx)
    except DataError as exc:
        message = str(exc)
        assert re.search(r"[\w.-]+[/\\][\w./\\-]+", message), (
            f"dataset '{name}': a missing-file error must name the path: {message}")
        assert "\n" not in message
        pytest.skip(f"dataset '{name}' needs files: {message[:80]}")


def test_dataset_contract_on_an_in_memory_plugin(tiny_data):
    class Tiny(ncpvae.DatasetPlugin):
        name = "tiny"

        class Config(ComponentConfig):
            name: str = "tiny"

        def build(self, ctx):
            return tiny_data

    bundle = check_dataset(Tiny(Tiny.Config()))
    assert bundle.image_shape == (1, 8, 8)


# --------------------------------------------------------------------------------------------
# samplers


def sampler_options(sampler, latent_dim: int, dtype: torch.dtype) -> dict:
    """Run options a sampler declares that the contract test knows how to provide."""
    options = {}
    if "proposal" in sampler.run_options:
        options["proposal"] = ncpvae.create("prior", "gaussian", latent_dim=latent_dim,
                                            dtype=dtype, registry=REGISTRY)
    unknown = set(sampler.run_options) - set(options)
    if unknown:
        pytest.skip(f"sampler '{sampler.name}' needs run options {sorted(unknown)}")
    return options


@pytest.mark.slow
@pytest.mark.parametrize("name", names_or_skip("sampler"))
@SHAPES
@given(latent_dim=latent_dims, num_chains=st.integers(1, 4), dtype=dtypes)
def test_sampler_contract(name, latent_dim, num_chains, dtype):
    sampler = build_sampler(name)
    check_sampler(sampler, options=sampler_options(sampler, latent_dim, dtype),
                  num_chains=num_chains, latent_dim=latent_dim, dtype=dtype)


@pytest.mark.slow  # fits every learned prior
@pytest.mark.parametrize("prior_name", names_or_skip("prior"))
@pytest.mark.parametrize("name", names_or_skip("sampler"))
def test_sampler_contract_on_every_prior_energy(name, prior_name):
    prior = build_prior(prior_name, 3, torch.float64)
    sampler = build_sampler(name)
    start = prior.base_prior.sample(4, generator=torch.Generator().manual_seed(0))
    check_sampler(sampler, prior.energy, start.detach(),
                  options=sampler_options(sampler, 3, torch.float64))


# --------------------------------------------------------------------------------------------
# the checks catch what they exist for


def _fails(check, *args, match: str, **kwargs) -> None:
    with pytest.raises(AssertionError, match=match):
        check(*args, **kwargs)


class BatchMeanEnergyPrior(GaussianPrior):
    """Energy standardized with the batch mean: rows are coupled."""

    name = "batch-mean"

    def log_prob(self, z):
        return super().log_prob(z - z.reshape(-1, z.shape[-1]).mean(0) + self.loc)


class MeanReducedEnergyPrior(GaussianPrior):
    """Energy divided by the batch size: each row's gradient shrinks by 1/B."""

    name = "mean-energy"

    def energy(self, z):
        return -self.log_prob(z) / z.reshape(-1, z.shape[-1]).shape[0]


class GlobalRNGPrior(GaussianPrior):
    name = "global-rng"

    def sample(self, n, *, generator=None):
        return torch.randn(n, self.latent_dim, dtype=self.loc.dtype)


class SummedLogProbPrior(GaussianPrior):
    name = "summed"

    def log_prob(self, z):
        return super().log_prob(z).sum()


class Float32SamplePrior(GaussianPrior):
    name = "float32-sample"

    def sample(self, n, *, generator=None):
        return super().sample(n, generator=generator).float()


@pytest.mark.parametrize(
    "cls,match",
    [
        (BatchMeanEnergyPrior, "rows are not independent|depend on their own row"),
        (MeanReducedEnergyPrior, "energy \\+ log_prob is not constant|batch-separable"),
        (GlobalRNGPrior, "not reproducible"),
        (SummedLogProbPrior, "log_prob of a .* has shape"),
        (Float32SamplePrior, "sample returned torch.float32"),
    ],
)
def test_check_prior_catches(cls, match):
    _fails(check_prior, cls(3).double(), match=f"prior '{cls.name}'.*({match})")


def test_check_prior_catches_a_gradient_mean_with_a_correct_value():
    class GradMean(GaussianPrior):
        name = "grad-mean"

        def energy(self, z):
            u = -self.log_prob(z)
            n = z.reshape(-1, z.shape[-1]).shape[0]
            return u.detach() + (u - u.detach()) / n  # right values, gradients divided by B

    _fails(check_prior, GradMean(2).double(), match="grad-mean.*batch-separable")


def test_check_model_catches_a_batch_mean_reconstruction():
    class PixelMean(MLPVAE):
        name = "pixel-mean"

        def recon_log_prob(self, x, params):
            return super().recon_log_prob(x, params).mean().expand(x.shape[0])

    model = PixelMean((1, 8, 8), 2, hidden=[8])
    _fails(check_model, model, (1, 8, 8), match="pixel-mean.*recon_log_prob of example")


def test_check_model_catches_a_wrong_decode_shape():
    class Flat(MLPVAE):
        name = "flat"

        def decode(self, z):
            return super().decode(z).flatten(-3)

    _fails(check_model, Flat((1, 8, 8), 2, hidden=[8]), (1, 8, 8), match="flat.*decode of")


def test_check_objective_catches_attached_logs_and_missing_loss():
    class Attached(BetaELBO):
        name = "attached"

        def loss(self, batch, model, prior, *, step=0):
            out = super().loss(batch, model, prior, step=step)
            out["recon"] = out["loss"] * 1.0
            return out

    class NoLoss(BetaELBO):
        name = "no-loss"

        def loss(self, batch, model, prior, *, step=0):
            return {"total": super().loss(batch, model, prior, step=step)["loss"]}

    model, prior = MLPVAE((1, 8, 8), 2, hidden=[8]), GaussianPrior(2)
    batch = torch.rand(3, 1, 8, 8)
    _fails(check_objective, Attached(), model, prior, batch, match="attached.*'recon'.*detached")
    _fails(check_objective, NoLoss(), model, prior, batch, match="no-loss.*'loss' entry")


def test_check_dataset_catches_out_of_range_images(tiny_data):
    class Loud(ncpvae.DatasetPlugin):
        name = "loud"

        class Config(ComponentConfig):
            name: str = "loud"

        def build(self, ctx):
            class Scaled(ncpvae.TensorImageSource):
                def get_batch(self, index):
                    return super().get_batch(index) * 255

            return ncpvae.DataBundle(Scaled(tiny_data.train.images), tiny_data.test)

    _fails(check_dataset, Loud(Loud.Config()), match="loud.*train images lie in")


@pytest.mark.skipif("langevin" not in REGISTRY.names("sampler"), reason="langevin not registered")
def test_check_sampler_catches_the_global_rng_and_wrong_dtypes():
    base = REGISTRY.get("sampler", "langevin")

    class GlobalRNG(base):
        name = "global-rng"

        def _randn(self, like, generator):
            return torch.randn(like.shape, dtype=like.dtype)

    class Float32(base):
        name = "float32"

        def step(self, state, energy, *, generator=None, **options):
            new, info = super().step(state, energy, generator=generator, **options)
            return new._replace(position=new.position.float()), info

    _fails(check_sampler, GlobalRNG(), match="global-rng.*not reproducible")
    _fails(check_sampler, Float32(), match="float32.*samples are torch.float32")


def test_check_component_class_catches_config_mistakes():
    class OpenName(GaussianPrior):  # a plain `str` name accepts any other name
        name = "open-name"

        class Config(ComponentConfig):
            name: str = "open-name"

    class Mislabelled(GaussianPrior):
        name = "mislabelled"

        class Config(ComponentConfig):
            name: Literal["gaussian"] = "gaussian"

    class NoConfig(GaussianPrior):
        name = "no-config"
        Config = ComponentConfig

    _fails(check_component_class, OpenName, match="open-name.*accepted .*open-name-not-this-one")
    _fails(check_component_class, Mislabelled, match="Mislabelled.*default to the class name")
    _fails(check_component_class, NoConfig, match="NoConfig.*its own `class Config")
    _fails(check_component_class, GaussianPrior, "sampler", match="kind is 'prior'")


def test_check_component_class_with_required_fields():
    class NeedsPath(ncpvae.DatasetPlugin):
        name = "needs-path"

        class Config(ComponentConfig):
            name: Literal["needs-path"] = "needs-path"
            path: str

        def build(self, ctx):
            raise NotImplementedError

    check_component_class(NeedsPath, "dataset")  # identity only: nothing to build it from
    check_component_class(NeedsPath, "dataset", example={"path": "x.npz"})
    _fails(check_component_class, NeedsPath, example={"other": 1}, match="lacks the required")


def test_the_documented_usage_example_runs(monkeypatch):
    """The module docstring of ncpvae.testing is public documentation: its example must work."""
    import sys
    import textwrap
    import types

    import ncpvae.testing

    class MoGPrior(GaussianPrior):  # stands in for the docstring's third-party prior
        name = "mog"

        class Config(ComponentConfig):
            name: Literal["mog"] = "mog"

        @classmethod
        def from_config(cls, config, ctx):
            return cls(ctx.require_latent_dim("mog"))

    plugin = types.ModuleType("ncpvae_mog.plugin")
    plugin.ncpvae_register_priors = ncpvae.hookimpl(lambda: [MoGPrior])
    package = types.ModuleType("ncpvae_mog")
    package.plugin = plugin
    monkeypatch.setitem(sys.modules, "ncpvae_mog", package)
    monkeypatch.setitem(sys.modules, "ncpvae_mog.plugin", plugin)
    doc = ncpvae.testing.__doc__
    block = doc.split("Usage, in a plugin's test file::")[1].split("\nThe checks:")[0]
    namespace: dict = {}
    exec(compile(textwrap.dedent(block), "ncpvae.testing docstring", "exec"), namespace)
    namespace["test_mog_prior_contract"]()


def test_standard_normal_energy_is_batch_separable():
    z = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(standard_normal_energy(z), 0.5 * (z**2).sum(-1))
