"""The runner: the smoke pipeline end to end, determinism, checkpoints, and failure handling."""

from __future__ import annotations

import collections
import json
import types
from pathlib import Path
from typing import Literal

import pytest
import torch

from ncpvae import ComponentConfig, Objective, hookimpl
from ncpvae.config import (
    config_to_toml,
    load_config,
    tomllib,  # the stdlib parser, or tomli on Python 3.10
    validate_config,
)
from ncpvae.errors import NcpvaeError, NonFiniteError
from ncpvae.experiment import train
from ncpvae.plugin_manager import PluginManager
from ncpvae.run.build import open_run

TIMING_KEYS = {"images_per_second", "elapsed_seconds", "train_seconds", "fit_seconds",
               "wall_time", "seconds"}


def _without_timing(record):
    if isinstance(record, dict):
        return {k: _without_timing(v) for k, v in record.items()
                if k not in TIMING_KEYS and not k.endswith("_seconds")}
    if isinstance(record, list):
        return [_without_timing(v) for v in record]
    return record


#: files written (atomically) and read back while the smoke run is made, by file name
SMOKE_IO: dict[str, collections.Counter] = {"written": collections.Counter(),
                                            "read": collections.Counter()}


@pytest.fixture(scope="module")
def counted_smoke_run(tmp_path_factory):
    import ncpvae.io
    import ncpvae.run.checkpoint

    out = tmp_path_factory.mktemp("runs") / "smoke"
    write, load = ncpvae.io.atomic_write, ncpvae.run.checkpoint.load_torch

    def counted_write(path, *args, **kwargs):
        SMOKE_IO["written"][Path(path).name] += 1
        return write(path, *args, **kwargs)

    def counted_load(path, *args, **kwargs):
        SMOKE_IO["read"][Path(path).name] += 1
        return load(path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ncpvae.io, "atomic_write", counted_write)
        patch.setattr(ncpvae.run.checkpoint, "load_torch", counted_load)
        train(load_config("smoke"), out, quiet=True)
    return out


@pytest.mark.slow  # a training of its own, with its writes counted
def test_each_epoch_and_stage_writes_the_checkpoint_and_summary_once(counted_smoke_run):
    """2 epochs, 4 stages (train, fit_prior, sample, evaluate): a checkpoint per epoch and per
    stage, never read back; summary.json once at the start and once per stage."""
    stages = json.loads((counted_smoke_run / "summary.json").read_text())["progress"]["completed"]
    assert len(stages) == 4
    assert SMOKE_IO["written"]["checkpoint.pt"] == 2 + 4
    assert SMOKE_IO["written"]["summary.json"] == 1 + 4
    assert SMOKE_IO["read"]["checkpoint.pt"] == 0


# smoke_run: the session's `ncpvae train smoke` run (tests/conftest.py)


def test_smoke_run_writes_a_complete_run_directory(smoke_run):
    for name in ("config.toml", "plugins.json", "checkpoint.pt", "metrics.jsonl", "summary.json"):
        assert (smoke_run / name).is_file(), name
    for plot in ("training_curves.png", "reconstructions.png", "samples.png", "traversals.png"):
        assert (smoke_run / "plots" / plot).stat().st_size > 1000, plot
    records = [json.loads(line) for line in (smoke_run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["stage"] == "train"]
    assert [r["epoch"] for r in train_records] == [1, 2]
    for key in ("train_loss", "train_recon", "train_kl", "train_elbo", "test_elbo",
                "active_units", "kl_per_dim"):
        assert key in train_records[-1], key
    plugins = json.loads((smoke_run / "plugins.json").read_text())
    assert any(p["name"] == "ncpvae_plugins.gaussian" for p in plugins)


def test_checkpoint_holds_state_dicts_only(smoke_run):
    state = torch.load(smoke_run / "checkpoint.pt", weights_only=True)
    assert set(state) >= {"format", "stage", "model", "prior"}
    assert all(isinstance(v, torch.Tensor) for v in state["model"].values())


def test_saved_config_round_trips_to_the_same_run(smoke_run):
    saved = (smoke_run / "config.toml").read_text()
    config = validate_config(tomllib.loads(saved))
    assert config_to_toml(config) == saved
    assert config == load_config("smoke")


def test_reloaded_run_reproduces_the_trained_model(smoke_run):
    run = open_run(smoke_run, quiet=True)
    state = torch.load(smoke_run / "checkpoint.pt", weights_only=True)
    for key, value in run.model.state_dict().items():
        assert torch.equal(value, state["model"][key]), key


@pytest.mark.slow
def test_same_seed_gives_bit_identical_metrics(tmp_path):
    config = load_config("smoke", ["train.epochs=1"])
    a = train(config, tmp_path / "a", quiet=True)
    b = train(config, tmp_path / "b", quiet=True)
    rows_a = [_without_timing(json.loads(x)) for x in (a / "metrics.jsonl").read_text().splitlines()]
    rows_b = [_without_timing(json.loads(x)) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert rows_a == rows_b
    other = train(load_config("smoke", ["train.epochs=1", "seed=1"]), tmp_path / "c", quiet=True)
    rows_c = [_without_timing(json.loads(x)) for x in (other / "metrics.jsonl").read_text().splitlines()]
    assert rows_c != rows_a


def test_existing_run_directory_is_refused_without_overwrite(tmp_path):
    (tmp_path / "config.toml").write_text("name = 'x'\n")
    with pytest.raises(NcpvaeError, match="already holds a run.*--overwrite"):
        train(load_config("smoke"), tmp_path, quiet=True)
    assert (tmp_path / "config.toml").read_text() == "name = 'x'\n"


class NaNAfterOneEpoch(Objective):
    """A throw-away objective whose loss turns NaN at a chosen global step."""

    name = "nan_after"

    class Config(ComponentConfig):
        name: Literal["nan_after"] = "nan_after"
        bad_step: int = 3

    def __init__(self, bad_step: int):
        self.bad_step = bad_step

    @classmethod
    def from_config(cls, config, ctx):
        return cls(config.bad_step)

    def loss(self, batch, model, prior, *, step=0):
        mu, _ = model.encode(batch)
        loss = (model.decode(mu) - batch).pow(2).mean()
        if step >= self.bad_step:
            loss = loss * float("nan")
        return {"loss": loss}


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    plugin = types.SimpleNamespace(
        ncpvae_register_objectives=hookimpl(lambda: [NaNAfterOneEpoch]), __name__="nan-plugin")
    manager = PluginManager(entrypoints=False, plugins=[plugin])
    # smoke: 512 train images / batch 64 = 8 steps per epoch; NaN in epoch 2, step 3
    config = load_config("smoke", ["objective=nan_after", "objective.bad_step=10"],
                         manager.registry)
    with pytest.raises(NonFiniteError, match="epoch 2, step 3.*checkpoint of epoch 1 is kept"):
        train(config, tmp_path / "run", quiet=True, manager=manager)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())
