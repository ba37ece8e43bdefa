"""Run configs: clear one-line errors naming the location, ``--set`` overrides, TOML round trips."""

from __future__ import annotations

import json
import re
import types
from typing import Literal

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import Field

import ncpvae
from ncpvae.component import ComponentConfig
from ncpvae.config import (
    RunConfig,
    apply_overrides,
    builtin_config_names,
    config_to_toml,
    load_config,
    parse_override,
    read_toml,
    tomllib,  # the stdlib parser, or tomli on Python 3.10
    validate_config,
)
from ncpvae.errors import ConfigError, UnknownComponentError
from ncpvae.plugin_manager import PluginManager


class ToyPrior(ncpvae.Prior):
    """A throw-away second prior, so swapping priors does not depend on other plugins."""

    name = "toy"

    class Config(ComponentConfig):
        name: Literal["toy"] = "toy"
        width: float = Field(3.0, gt=0)

    def __init__(self, latent_dim: int, width: float = 3.0):
        super().__init__(latent_dim)
        self.width = width

    @classmethod
    def from_config(cls, config, ctx):
        return cls(ctx.require_latent_dim("toy"), config.width)

    def log_prob(self, z):
        return -(z / self.width).pow(2).sum(-1)

    def sample(self, n, *, generator=None):
        return self.width * torch.randn(n, self.latent_dim, generator=generator)


@pytest.fixture(scope="module")
def toy_registry():
    plugin = types.SimpleNamespace(
        __name__="toy-plugin",
        ncpvae_register_priors=ncpvae.hookimpl(lambda: [ToyPrior]),
    )
    return PluginManager(entrypoints=False, plugins=[plugin]).registry


def config_error(raw, registry) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(raw, registry)
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    return message


def assert_names_key(message: str, location: str, key: str) -> None:
    """The message names ``location.key``, spelt out or as ``location: unknown key 'key'``."""
    prefix = f"{location}." if location else ""
    full = f"{prefix}{key}"
    pattern = rf"(^|[\s;]){re.escape(full)}\b|(^|[\s;]){re.escape(location)}: unknown key '{key}'"
    if not location:
        pattern = rf"(^|[\s;:]){re.escape(key)}\b|unknown key '{key}'"
    assert re.search(pattern, message), f"expected the location {full!r} in: {message}"


# --------------------------------------------------------------------------------------------
# unknown names


@pytest.mark.parametrize("section,kind", [("data", "dataset"), ("model", "model"),
                                          ("prior", "prior"), ("objective", "objective"),
                                          ("sampler", "sampler")])
def test_unknown_plugin_name_lists_available_and_suggests(registry, section, kind):
    names = registry.names(kind)
    if not names:
        pytest.skip(f"no {kind}s registered")
    typo = names[0][:-1] + ("x" if names[0][-1] != "x" else "y")
    message = config_error({section: {"name": typo}}, registry)
    assert f"{section}: unknown {kind} '{typo}'" in message
    assert f"did you mean '{names[0]}'" in message
    assert "available: " + ", ".join(names) in message


def test_unknown_name_without_close_match_gives_no_suggestion(registry):
    message = config_error({"prior": {"name": "zzzzzz"}}, registry)
    assert "did you mean" not in message
    assert "available:" in message and "gaussian" in message


def test_missing_name_lists_available(registry):
    message = config_error({"prior": {"scale": 2.0}}, registry)
    assert "prior: missing 'name'" in message and "gaussian" in message


def test_create_with_unknown_name_or_kind(registry):
    with pytest.raises(UnknownComponentError, match="did you mean 'gaussian'"):
        ncpvae.create("prior", "gausian", latent_dim=2, registry=registry)
    with pytest.raises(UnknownComponentError, match="unknown component kind 'priors'.*'prior'"):
        ncpvae.create("priors", "gaussian", latent_dim=2, registry=registry)
    with pytest.raises(ConfigError, match="prior 'gaussian' config: scale: .*greater than 0"):
        ncpvae.create("prior", "gaussian", latent_dim=2, scale=-1.0, registry=registry)


# --------------------------------------------------------------------------------------------
# misspelt keys, wrong types, out-of-range values


def test_misspelt_top_level_key(registry):
    message = config_error({"latnet_dim": 4}, registry)
    assert_names_key(message, "", "latnet_dim")
    assert "did you mean 'latent_dim'" in message


@pytest.mark.parametrize("raw,location,key,suggestion", [
    ({"prior": {"name": "gaussian", "sclae": 2.0}}, "prior", "sclae", "scale"),
    ({"train": {"lrr": 0.1}}, "train", "lrr", "lr"),
    ({"sample": {"num_sample": 3}}, "sample", "num_sample", "num_samples"),
    ({"objective": {"name": "beta_elbo", "betta": 2.0}}, "objective", "betta", "beta"),
])
def test_misspelt_key_in_a_section(registry, raw, location, key, suggestion):
    message = config_error(raw, registry)
    assert_names_key(message, location, key)
    assert f"did you mean '{suggestion}'" in message


def test_misspelt_key_in_a_nested_section(registry):
    if ("prior", "ncp") not in registry:
        pytest.skip("the ncp prior is not registered")
    raw = {"prior": {"name": "ncp", "base": {"name": "gaussian", "sclae": 2.0}}}
    message = config_error(raw, registry)
    assert_names_key(message, "prior.base", "sclae")
    assert "did you mean 'scale'" in message
    message = config_error({"prior": {"name": "ncp", "base": {"name": "gaussian",
                                                               "scale": -1.0}}}, registry)
    assert "prior.base.scale:" in message and "-1.0" in message


@pytest.mark.parametrize("raw,location,shown", [
    ({"latent_dim": "four"}, "latent_dim", "four"),
    ({"latent_dim": 2.5}, "latent_dim", None),
    ({"seed": [1]}, "seed", None),
    ({"train": {"epochs": "ten"}}, "train.epochs", "ten"),
    ({"train": {"lr": "fast"}}, "train.lr", "fast"),
    ({"prior": {"name": "gaussian", "scale": "wide"}}, "prior.scale", "wide"),
    ({"prior": {"name": "gaussian", "learn_mean": "maybe"}}, "prior.learn_mean", "maybe"),
    ({"device": "tpu"}, "device", "tpu"),
    ({"prior": 3}, "prior", None),
    ({"train": 3}, "train", None),
])
def test_wrong_type_names_the_location(registry, raw, location, shown):
    message = config_error(raw, registry)
    assert re.search(rf"(^|[\s;:]){re.escape(location)}:", message), message
    if shown is not None:
        assert shown in message


@pytest.mark.parametrize("raw,location,value", [
    ({"objective": {"name": "beta_elbo", "beta": -0.5}}, "objective.beta", "-0.5"),
    ({"train": {"lr": 0.0}}, "train.lr", "0.0"),
    ({"train": {"lr": -1e-3}}, "train.lr", "-0.001"),
    ({"latent_dim": 0}, "latent_dim", "0"),
    ({"train": {"batch_size": 0}}, "train.batch_size", "0"),
    ({"train": {"epochs": 0}}, "train.epochs", "0"),
    ({"prior": {"name": "gaussian", "scale": 0.0}}, "prior.scale", "0.0"),
    ({"seed": -1}, "seed", "-1"),
])
def test_out_of_range_names_location_and_value(registry, raw, location, value):
    message = config_error(raw, registry)
    assert re.search(rf"(^|[\s;:]){re.escape(location)}: .*\(got {re.escape(value)}\)", message), \
        message


def test_every_error_is_reported_at_once(registry):
    message = config_error({"latent_dim": 0, "train": {"lr": 0.0}}, registry)
    assert "latent_dim:" in message and "train.lr:" in message


# --------------------------------------------------------------------------------------------
# files


def test_config_file_that_is_not_toml(tmp_path, registry):
    path = tmp_path / "broken.toml"
    path.write_text("latent_dim = = 3\n")
    with pytest.raises(ConfigError, match=r"broken\.toml' is not valid TOML"):
        load_config(path, registry=registry)


def test_missing_config_file(tmp_path, registry):
    path = tmp_path / "nowhere.toml"
    with pytest.raises(ConfigError, match=r"nowhere\.toml' does not exist"):
        load_config(path, registry=registry)


def test_unknown_builtin_config_name_suggests():
    names = builtin_config_names()
    if not names:
        pytest.skip("no built-in configs yet")
    with pytest.raises(ConfigError, match=f"did you mean '{re.escape(names[0])}'"):
        read_toml(names[0] + "x")


def test_load_config_from_a_file_with_overrides(tmp_path, registry):
    path = tmp_path / "run.toml"
    path.write_text('name = "mine"\nlatent_dim = 3\n[prior]\nname = "gaussian"\nscale = 0.5\n'
                    '[train]\nepochs = 2\n')
    config = load_config(path, ["train.lr=0.01", "prior.learn_mean=true"], registry=registry)
    assert (config.name, config.latent_dim, config.train.epochs) == ("mine", 3, 2)
    assert config.train.lr == 0.01
    assert config.prior.scale == 0.5 and config.prior.learn_mean is True


def test_toml_date_value_is_a_config_error(tmp_path, registry):
    path = tmp_path / "dated.toml"
    path.write_text("name = 2024-01-01\n")
    with pytest.raises(ConfigError, match="name"):
        load_config(path, registry=registry)


# --------------------------------------------------------------------------------------------
# overrides


@pytest.mark.parametrize("text", ["latent_dim", "=3", "a..b=1", ".a=1", "a.=1", "", "  =x"])
def test_override_syntax_errors(text):
    with pytest.raises(ConfigError, match=re.escape(f"override '{text}'") + ".*dotted.key=value"):
        apply_overrides({}, [text])


@pytest.mark.parametrize("text,value", [
    ("a=3", 3),
    ("a=-2", -2),
    ("a=0.25", 0.25),
    ("a=1e-4", 1e-4),
    ("a=true", True),
    ("a=false", False),
    ("a=[1, 2]", [1, 2]),
    ("a=[0.5, 1.5]", [0.5, 1.5]),
    ("a=hello", "hello"),
    ('a="two words"', "two words"),
    ("a='single'", "single"),
    ('a="3"', "3"),
    ("a.b.c=1", 1),
])
def test_override_values_are_toml_typed(text, value):
    path, parsed = parse_override(text)
    assert path[0] == "a"
    assert parsed == value and type(parsed) is type(value)


def test_override_builds_nested_tables():
    assert apply_overrides({}, ["a.b.c=1", "a.b.d=x"]) == {"a": {"b": {"c": 1, "d": "x"}}}


def test_overrides_do_not_mutate_the_input():
    raw = {"prior": {"name": "gaussian", "scale": 2.0}}
    apply_overrides(raw, ["prior.scale=3", "prior=toy"])
    assert raw == {"prior": {"name": "gaussian", "scale": 2.0}}


BASE = {"latent_dim": 3, "prior": {"name": "gaussian", "scale": 2.0, "learn_mean": True}}


@pytest.mark.parametrize("override", ["prior=toy", "prior.name=toy"])
def test_swapping_a_component_replaces_its_section(toy_registry, override):
    config = validate_config(apply_overrides(BASE, [override]), toy_registry)
    assert config.prior.model_dump() == {"name": "toy", "width": 3.0}


def test_bare_name_resets_the_same_component_to_defaults(registry):
    config = validate_config(apply_overrides(BASE, ["prior=gaussian"]), registry)
    assert config.prior.model_dump() == type(config.prior)().model_dump()


def test_swap_then_edit(toy_registry):
    config = validate_config(apply_overrides(BASE, ["prior.name=toy", "prior.width=0.5"]),
                             toy_registry)
    assert config.prior.model_dump() == {"name": "toy", "width": 0.5}


def test_editing_one_field_keeps_the_others(registry):
    config = validate_config(apply_overrides(BASE, ["prior.scale=0.5"]), registry)
    assert config.prior.scale == 0.5 and config.prior.learn_mean is True


def test_editing_a_field_of_a_bare_name_section(registry):
    config = validate_config(apply_overrides({"prior": "gaussian"}, ["prior.scale=4"]), registry)
    assert config.prior.name == "gaussian" and config.prior.scale == 4.0


def test_override_adds_an_absent_component_section(registry):
    names = registry.names("sampler")
    if not names:
        pytest.skip("no samplers registered")
    config = validate_config(apply_overrides({}, [f"sampler={names[0]}"]), registry)
    assert config.sampler.name == names[0]
    assert config.sampler.model_dump() == type(config.sampler)().model_dump()


def test_override_with_a_wrong_value_is_a_config_error(registry):
    with pytest.raises(ConfigError, match=r"train\.epochs: .*\(got 'many'\)"):
        validate_config(apply_overrides({}, ["train.epochs=many"]), registry)


# --------------------------------------------------------------------------------------------
# round trips, SerializeAsAny, JSON schema


def assert_round_trips(config: RunConfig, registry) -> None:
    text = config_to_toml(config)
    again = validate_config(tomllib.loads(text), registry)
    assert again.model_dump() == config.model_dump()
    assert again.model_dump(mode="json") == config.model_dump(mode="json")
    assert config_to_toml(again) == text


@pytest.mark.parametrize("name", builtin_config_names() or [
    pytest.param(None, marks=pytest.mark.skip(reason="no built-in configs yet"))])
def test_builtin_configs_round_trip(name, registry):
    assert_round_trips(load_config(name, registry=registry), registry)


def customized_config(registry) -> dict:
    """A config in which every section and every optional field is set away from defaults."""
    raw = {
        "name": "custom-run", "seed": 7, "device": "cpu", "latent_dim": 5,
        "data": {"name": "digits", "test_fraction": 0.3},
        "model": {"name": "mlp", "hidden": [32, 16], "activation": "tanh",
                  "likelihood": "gaussian", "gaussian_scale": 0.25, "learn_scale": True},
        "prior": {"name": "gaussian", "mean": 0.5, "scale": 1.5, "learn_mean": True,
                  "learn_scale": True},
        "objective": {"name": "beta_elbo", "beta": 4.0, "capacity_max": 25.0,
                      "capacity_steps": 1000, "gamma": 100.0},
        "train": {"epochs": 3, "batch_size": 16, "lr": 3e-4, "steps_per_epoch": 5,
                  "grad_clip": 1.5, "eval_size": 32},
        "sample": {"num_samples": 9},
    }
    if ("prior", "ncp") in registry:
        raw["prior"] = {"name": "ncp", "hidden": [8, 4], "epochs": 2, "lr": 0.01,
                        "base": {"name": "gaussian", "mean": -1.0, "scale": 0.5}}
    if ("sampler", "langevin") in registry:
        raw["sampler"] = {"name": "langevin", "step_size": 0.02, "metropolis": True}
    if ("dataset", "digits") not in registry:
        raw.pop("data")
    return raw


def test_customized_config_round_trips(registry):
    raw = customized_config(registry)
    config = validate_config(raw, registry)
    dumped = config.model_dump()
    for section in ("data", "model", "prior", "objective", "sampler", "train", "sample"):
        for key, value in raw.get(section, {}).items():
            if isinstance(value, dict):  # a nested component section
                assert all(dumped[section][key][k] == v for k, v in value.items())
            else:
                assert dumped[section][key] == value, f"{section}.{key}"
    assert_round_trips(config, registry)


@pytest.mark.parametrize("name", [
    "plain", "with space", 'quo"te', "back\\slash", "tab\tand\nnewline", "ünïcödé", "del\x7f",
    "emoji \U0001f600",
])
def test_string_values_round_trip(name, registry):
    assert_round_trips(validate_config({"name": name}, registry), registry)


@settings(derandomize=True, max_examples=25, deadline=None)
@given(lr=st.floats(min_value=1e-12, max_value=1e6, allow_nan=False),
       beta=st.floats(min_value=0.0, max_value=1e4, allow_nan=False),
       mean=st.floats(min_value=-1e6, max_value=1e6, allow_nan=False))
def test_floats_round_trip_exactly(registry, lr, beta, mean):
    raw = {"train": {"lr": lr}, "objective": {"name": "beta_elbo", "beta": beta},
           "prior": {"name": "gaussian", "mean": mean}}
    assert_round_trips(validate_config(raw, registry), registry)


def test_serialize_as_any_keeps_plugin_fields(registry):
    config = validate_config({"prior": {"name": "gaussian", "scale": 2.0}}, registry)
    prior_fields = set(registry.get("prior", "gaussian").Config.model_fields)
    assert type(config.prior) is registry.get("prior", "gaussian").Config
    assert set(config.model_dump()["prior"]) == prior_fields
    assert set(config.model_dump(mode="json")["prior"]) == prior_fields
    assert json.loads(config.model_dump_json())["prior"]["scale"] == 2.0


def test_validated_config_is_accepted_again(registry):
    config = validate_config({"prior": {"name": "gaussian", "scale": 2.0}}, registry)
    assert validate_config(config.model_dump(), registry) == config
    assert RunConfig.model_validate(config, context={"registry": registry}) == config


def test_json_schema():
    schema = RunConfig.model_json_schema()
    json.dumps(schema)
    assert {"name", "seed", "device", "latent_dim", "data", "model", "prior", "objective",
            "sampler", "train", "sample"} <= set(schema["properties"])
    assert schema["additionalProperties"] is False


def test_top_level_name_override_renames_the_run_only(registry):
    config = load_config("smoke", ["name=renamed"], registry=registry)
    assert config.name == "renamed"
    assert config.model_dump(exclude={"name"}) == load_config(
        "smoke", registry=registry).model_dump(exclude={"name"})


# ------------------------------------------------------------------------------------------
# defaults that name built-in plugins are data (ncpvae/configs/defaults.toml)


def test_the_defaults_file_is_not_a_run_config():
    from ncpvae.defaults import DEFAULTS_FILE

    assert DEFAULTS_FILE == "defaults.toml"
    assert "defaults" not in builtin_config_names()
    with pytest.raises(ConfigError, match="no built-in config of that name"):
        read_toml("defaults")


def test_a_config_that_omits_components_gets_the_shipped_defaults(registry):
    from ncpvae.defaults import shipped_default

    config = validate_config({}, registry)
    for section in ("data", "model", "prior", "objective"):
        assert getattr(config, section).name == shipped_default("run", section)["name"]
    samplers = shipped_default("run", "evaluate", "samplers")
    assert [s.name for s in config.evaluate.samplers] == [
        s["name"] for s in samplers]
    assert config.evaluate.samplers[0].num_candidates == samplers[0]["num_candidates"]
    # a section the user gives replaces the default whole
    assert validate_config({"prior": "ncp"}, registry).prior.name == "ncp"


def test_shipped_default_returns_a_copy_and_names_a_missing_key():
    from ncpvae.defaults import shipped_default

    shipped_default("run", "prior")["name"] = "changed"
    assert shipped_default("run", "prior") == {"name": "gaussian"}
    with pytest.raises(KeyError, match="defaults.toml has no 'run.nope'"):
        shipped_default("run", "nope", "deeper")
