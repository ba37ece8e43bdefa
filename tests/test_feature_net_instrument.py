"""The feature net as an instrument: trained to a plateau, checked against its accuracy targets,
cached once per machine (user cache folder, build lock, corrupt entries refused), and its
accuracy stated beside every number that rests on it (evaluation.json, report, summary)."""

from __future__ import annotations

import json
import logging
import threading

import pytest
import torch

from ncpvae.data import TensorImageSource
from ncpvae.errors import DataError
from ncpvae.metrics.feature_net import (
    CACHE_ENV,
    DEFAULT_TARGETS,
    FeatureNet,
    FeatureNetConfig,
    FeatureNetSpec,
    accuracy_check,
    cached_feature_net,
    default_cache_dir,
    feature_net_cache_key,
    feature_net_for_labels,
    load_feature_net,
    save_feature_net,
)
from ncpvae.run.summary_text import format_run_summary

SPRITE_HEADS = ("shape", "scale", "orientation", "posX", "posY")


def _net(accuracy: list[float] | None = None, heads: tuple[str, ...] = SPRITE_HEADS) -> FeatureNet:
    torch.manual_seed(0)
    net = FeatureNet(FeatureNetSpec(image_shape=(1, 8, 8), head_sizes=(2,) * len(heads),
                                    head_names=heads, width=4, feature_dim=8))
    net.info = {"val_accuracy": accuracy or []}
    return net


def _labelled(n: int = 64) -> TensorImageSource:
    """Two classes told apart by the mean brightness: learnable in one epoch."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 2
    images = torch.rand(n, 1, 8, 8, generator=g) * 0.5 + 0.5 * labels[:, None, None, None]
    return TensorImageSource(images, labels)


# ---------------------------------------------------------------------------------------------
# targets


def test_accuracy_check_names_every_head_below_its_target():
    check = accuracy_check(_net([0.66, 0.99, 0.05, 0.93, 0.96]))
    assert check.targets == DEFAULT_TARGETS  # orientation has none
    assert check.below == {"shape": (0.66, 0.97), "posX": (0.93, 0.95)}
    assert check.meets_target is False
    warning = check.warning()
    assert warning is not None and "shape 0.660 < 0.97" in warning and "posX 0.930" in warning
    assert "scale" not in warning.split("):")[0] and "orientation" not in warning


def test_accuracy_check_met_and_without_targets():
    met = accuracy_check(_net([0.998, 1.0, 0.4, 0.991, 0.986]))
    assert met.meets_target is True and met.warning() is None and not met.below
    labels = accuracy_check(_net([0.5], heads=("label",)))  # no default target for labels
    assert labels.targets == {} and labels.meets_target is None and labels.warning() is None
    assert accuracy_check(_net([0.5], heads=("label",)), {"label": 0.9}).meets_target is False
    # a net without held-out accuracy cannot meet a target
    assert accuracy_check(_net([]), {"shape": 0.5}).meets_target is False


# ---------------------------------------------------------------------------------------------
# training to a plateau


def test_training_stops_on_a_plateau_and_scoring_does_not_move_the_training_stream():
    source = _labelled()
    fixed = feature_net_for_labels(source, config=FeatureNetConfig(
        width=4, feature_dim=8, epochs=3, patience=None, batch_size=16))
    assert fixed.info["epochs_run"] == 3 and len(fixed.info["val_history"]) == 1
    # a gain no epoch can make (min_delta = 1): the first epoch sets the best, the next stops
    stopped = feature_net_for_labels(source, config=FeatureNetConfig(
        width=4, feature_dim=8, epochs=5, patience=1, min_delta=1.0, batch_size=16))
    assert stopped.info["epochs_run"] == 2 and len(stopped.info["val_history"]) == 2
    # per-epoch scoring draws no random numbers: the same three epochs, the same weights
    scored = feature_net_for_labels(source, config=FeatureNetConfig(
        width=4, feature_dim=8, epochs=3, patience=10, batch_size=16))
    assert scored.info["epochs_run"] == 3 and len(scored.info["val_history"]) == 3
    for k, v in fixed.state_dict().items():
        assert torch.equal(scored.state_dict()[k], v), k
    assert scored.info["val_accuracy"] == fixed.info["val_accuracy"]
    assert fixed.info["train_seconds"] >= 0


# ---------------------------------------------------------------------------------------------
# the cache


def test_default_cache_dir_follows_ncpvae_cache_dir_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(CACHE_ENV)
    assert default_cache_dir() == tmp_path / "xdg" / "ncpvae"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "ncpvae"


def test_the_evaluation_caches_in_the_user_cache_unless_told_otherwise(smoke_run, tmp_path,
                                                                     private_cache_dir):
    from ncpvae.evaluation.pipeline import FEATURE_NET_CACHE, cache_directory
    from ncpvae.run.build import open_run

    run = open_run(smoke_run, quiet=True)
    assert cache_directory(run) == default_cache_dir() / FEATURE_NET_CACHE
    assert default_cache_dir() == private_cache_dir  # the tests' own, never the user's
    own = open_run(smoke_run, [f"evaluate.cache_dir={tmp_path}"], quiet=True)
    assert cache_directory(own) == tmp_path


def test_a_cache_hit_does_not_build(tmp_path):
    save_feature_net(_net([0.9] * 5), tmp_path / "key.pt")
    calls = []
    net = cached_feature_net(tmp_path, "key", lambda: calls.append(1) or _net())
    assert calls == [] and net.info["val_accuracy"] == [0.9] * 5


def test_a_changed_config_is_a_miss_but_changed_targets_are_not():
    base = FeatureNetConfig()
    key = feature_net_cache_key("sprites", {"image_size": 32}, base)
    assert key != feature_net_cache_key("sprites", {"image_size": 32},
                                        base.model_copy(update={"num_train": 100_000}))
    assert key != feature_net_cache_key("sprites", {"image_size": 32},
                                        base.model_copy(update={"patience": 5}))
    assert key != feature_net_cache_key("sprites", {"image_size": 64}, base)
    # the targets judge the net; they do not change it
    assert key == feature_net_cache_key("sprites", {"image_size": 32},
                                        base.model_copy(update={"targets": {"shape": 0.5}}))


def test_a_miss_builds_and_saves(tmp_path):
    save_feature_net(_net([0.1] * 5), tmp_path / "old.pt")
    calls = []
    net = cached_feature_net(tmp_path, "new", lambda: calls.append(1) or _net([0.9] * 5))
    assert calls == [1] and load_feature_net(tmp_path / "new.pt").info == net.info


def test_two_concurrent_writers_build_once_and_end_with_one_valid_entry(tmp_path):
    barrier, calls, nets = threading.Barrier(2), [], []

    def build() -> FeatureNet:
        calls.append(1)
        threading.Event().wait(0.3)  # the other thread asks while this one builds
        return _net([0.9] * 5)

    def ask() -> None:
        barrier.wait(timeout=30)
        nets.append(cached_feature_net(tmp_path, "key", build))

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(nets) == 2 and calls == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key.lock", "key.pt"]
    entry = load_feature_net(tmp_path / "key.pt")
    for net in nets:
        assert all(torch.equal(entry.state_dict()[k], v) for k, v in net.state_dict().items())


def test_a_corrupt_entry_is_refused_with_a_log_line_and_rebuilt(tmp_path, caplog):
    (tmp_path / "key.pt").write_bytes(b"half a zip file")
    with pytest.raises(DataError):
        load_feature_net(tmp_path / "key.pt")
    calls = []
    with caplog.at_level(logging.WARNING, logger="ncpvae.metrics.feature_net"):
        cached_feature_net(tmp_path, "key", lambda: calls.append(1) or _net([0.9] * 5))
    assert calls == [1] and "refused" in caplog.text
    assert load_feature_net(tmp_path / "key.pt").info["val_accuracy"] == [0.9] * 5


# ---------------------------------------------------------------------------------------------
# the accuracy beside every number (the smoke run's tiny net is below the sprites targets)


def test_the_smoke_evaluation_states_its_instrument_and_warns(smoke_run):
    ev = json.loads((smoke_run / "evaluation.json").read_text())
    net = ev["feature_net"]
    assert set(net["val_accuracy"]) == set(SPRITE_HEADS) and net["targets"] == DEFAULT_TARGETS
    assert net["meets_target"] is False and net["warning"] in ev["notes"]
    assert net["epochs_run"] == 1 and net["epochs_max"] == 1
    row, = ev["rows"]
    for part in (row["sample_quality"], row["coverage"], ev["factor_recovery"]):
        assert part["instrument"]["ref"] == "feature_net"
        assert part["instrument"]["val_accuracy"] == net["val_accuracy"]
        assert part["instrument"]["meets_target"] is False
    summary = json.loads((smoke_run / "summary.json").read_text())["evaluation"]
    assert summary["feature_net_accuracy"] == net["val_accuracy"]
    assert summary["feature_net_meets_target"] is False
    fr = ev["factor_recovery"]
    assert summary["factor_accuracy_reconstruction"] == fr["accuracy_reconstruction"]


def test_the_report_and_the_summary_show_the_accuracy_the_warning_and_absolute_recovery(
        smoke_run):
    ev = json.loads((smoke_run / "evaluation.json").read_text())
    page = (smoke_run / "report.html").read_text()
    shape = ev["feature_net"]["val_accuracy"]["shape"]
    assert "feature net below its accuracy target" in page
    assert f"shape {shape:.3f} (target 0.97 ⚠)" in page
    # the headline names the absolute accuracy on reconstructions, not only the ratio
    recon = ev["factor_recovery"]["accuracy_reconstruction"]["shape"]
    headline = page.split("Do reconstructions keep the factors?")[1].split("</li>")[0]
    assert "on reconstructions" in headline and f"shape {recon:.2g}" in headline
    text = format_run_summary(smoke_run)
    assert "feature net" in text and "⚠ below its accuracy target" in text
    assert "factor recovery" in text and "accuracy on reconstructions" in text


def test_the_below_target_warning_is_logged(smoke_run_copy, caplog):
    from ncpvae.evaluation.pipeline import feature_net
    from ncpvae.run.build import open_run

    run = open_run(smoke_run_copy, quiet=True)
    notes: list[str] = []
    with caplog.at_level(logging.WARNING, logger="ncpvae.evaluation.pipeline"):
        _, info, hit = feature_net(run, notes)
    assert hit and notes == [info["warning"]] and info["warning"] in caplog.text


def test_a_target_outside_zero_one_is_a_one_line_config_error():
    from ncpvae.config import load_config
    from ncpvae.errors import ConfigError

    with pytest.raises(ConfigError, match=r"evaluate.feature_net.targets.shape: .*less than or "
                                          r"equal to 1") as err:
        load_config("smoke", ["evaluate.feature_net.targets={shape=1.5}"])
    assert "\n" not in str(err.value)
