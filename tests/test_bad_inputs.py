"""The bad-input battery: every case goes through the real CLI and must end with a non-zero exit,
no traceback, ONE line on stderr naming the problem, and (where a run directory is involved) that
run byte-identical afterwards.

The session's trained smoke run (``smoke_run`` of tests/conftest.py) is copied for each test that
needs one. Signals run the CLI in a subprocess.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ncpvae import cli
from ncpvae.plugin_manager import get_plugin_manager

SMOKE = ["smoke", "--set", "train.epochs=1", "--set", "evaluate.enabled=false"]


# ------------------------------------------------------------------------------------- helpers


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``ncpvae argv`` in-process; returns (exit status, stdout, stderr)."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(result: tuple[int, str, str], *needles: str) -> str:
    """Non-zero exit, no traceback, exactly one stderr line, containing every ``needle``."""
    code, _, err = result
    assert code not in (0, None), f"exit status {code}; stderr: {err!r}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{err}"
    for needle in needles:
        assert needle.lower() in lines[0].lower(), f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def snapshot(path: Path) -> dict[str, str]:
    """SHA-256 of every file under ``path`` (relative path -> digest), directories included."""
    result = {}
    for item in sorted(path.rglob("*")):
        rel = str(item.relative_to(path))
        result[rel] = hashlib.sha256(item.read_bytes()).hexdigest() if item.is_file() else "dir"
    return result


@pytest.fixture
def run_dir(smoke_run, tmp_path) -> Path:
    """A private copy of the trained run; the test checks it is unchanged at the end."""
    copy = tmp_path / "run"
    shutil.copytree(smoke_run, copy)
    before = snapshot(copy)
    yield copy
    assert snapshot(copy) == before, "the run directory changed"


# ------------------------------------------------------------------------------------- configs

CONFIG_CASES = [
    ("objective.beta=inf", "objective.beta", "finite"),
    ("objective.beta=nan", "objective.beta", "finite"),
    ("objective.beta=-inf", "objective.beta", "finite"),
    ("objective.beta=-1", "objective.beta", "greater than"),
    ("train.lr=nan", "train.lr", "finite"),
    ("train.lr=inf", "train.lr", "finite"),
    ("train.lr=0", "train.lr", "greater than"),
    ("train.epochs=0", "train.epochs", ""),
    ("train.batch_size=-4", "train.batch_size", ""),
    ("train.grad_clip=inf", "train.grad_clip", "finite"),
    ("latent_dim=0", "latent_dim", ""),
    ("seed=-1", "seed", ""),
    ("device=tpu", "device", "tpu"),
    ("data.split_seed=-1", "data.split_seed", ""),
    ("data.test_size=0", "data.test_size", ""),
    ("trian.epochs=3", "trian", "did you mean 'train'"),
    ("prior=gausian", "gausian", "did you mean 'gaussian'"),
    ("objective.bta=2", "bta", "did you mean 'beta'"),
    ("seed.x=1", "seed", "not a table"),
    ("beta", "beta", "dotted.key=value"),
]


@pytest.mark.parametrize(("override", "field", "words"), CONFIG_CASES,
                         ids=[case[0] for case in CONFIG_CASES])
def test_bad_config_value(capsys, override, field, words):
    result = run_cli(capsys, "validate", "smoke", "--set", override)
    assert_one_line_error(result, field, words)


SAMPLER_CASES = [
    ("sampler.step_size=inf", "sampler.step_size", "finite"),
    ("sampler.step_size=nan", "sampler.step_size", "finite"),
    ("sampler.num_steps=-1", "sampler.num_steps", "greater than"),
]


@pytest.mark.parametrize(("override", "field", "words"), SAMPLER_CASES,
                         ids=[case[0] for case in SAMPLER_CASES])
def test_bad_sampler_setting(capsys, override, field, words):
    result = run_cli(capsys, "validate", "smoke", "--set", "sampler=langevin", "--set", override)
    assert_one_line_error(result, field, words)


def test_config_path_is_a_directory(capsys, tmp_path):
    assert_one_line_error(run_cli(capsys, "validate", str(tmp_path)), str(tmp_path), "directory")


def test_config_file_missing(capsys, tmp_path):
    missing = tmp_path / "nope.toml"
    assert_one_line_error(run_cli(capsys, "validate", str(missing)), "nope.toml", "does not exist")


def test_config_file_not_toml(capsys, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("name = [unclosed\n")
    assert_one_line_error(run_cli(capsys, "validate", str(path)), "bad.toml", "not valid TOML")


def test_config_file_binary(capsys, tmp_path):
    path = tmp_path / "binary.toml"
    path.write_bytes(b"\xff\xfe\x00\x81garbage")
    assert_one_line_error(run_cli(capsys, "validate", str(path)), "binary.toml")


def test_unknown_builtin_config_name(capsys):
    assert_one_line_error(run_cli(capsys, "validate", "smok"), "smok", "did you mean 'smoke'")


# ------------------------------------------------------------------------------------- CLI values


def test_sample_zero_chains(capsys, run_dir):
    result = run_cli(capsys, "sample", str(run_dir), "--sampler", "langevin", "--chains", "0")
    assert_one_line_error(result, "--chains", "0")


def test_sample_negative_chains(capsys, run_dir):
    result = run_cli(capsys, "sample", str(run_dir), "--sampler", "langevin", "--chains", "-3")
    assert_one_line_error(result, "--chains", "-3")


def test_sample_negative_steps(capsys, run_dir):
    result = run_cli(capsys, "sample", str(run_dir), "--sampler", "langevin", "--steps", "-5")
    assert_one_line_error(result, "--steps", "-5")


def test_sample_chains_not_a_number(capsys, run_dir):
    result = run_cli(capsys, "sample", str(run_dir), "--sampler", "langevin", "--chains", "many")
    assert_one_line_error(result, "--chains", "many")


def test_unknown_command(capsys):
    assert_one_line_error(run_cli(capsys, "trian"), "trian", "invalid choice")


def test_unknown_option(capsys, run_dir):
    assert_one_line_error(run_cli(capsys, "sample", str(run_dir), "--chians", "3"), "--chians")


def test_sample_does_not_overwrite_earlier_samples(capsys, smoke_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    first = run_cli(capsys, "sample", str(run), "--sampler", "langevin", "--steps", "300")
    assert first[0] == 0, first[2]
    before = snapshot(run)
    result = run_cli(capsys, "sample", str(run), "--sampler", "sgld", "--steps", "300")
    assert_one_line_error(result, str(run / "sampling"), "--overwrite")
    assert snapshot(run) == before


def test_sample_unknown_sampler(capsys, run_dir):
    result = run_cli(capsys, "sample", str(run_dir), "--sampler", "langevn")
    assert_one_line_error(result, "langevn", "did you mean 'langevin'")


def test_sample_unwritable_output(capsys, run_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = run_cli(capsys, "sample", str(run_dir), "--sampler", "langevin",
                     "--out", str(blocker / "samples"))
    assert_one_line_error(result, str(blocker / "samples"))


def test_train_unwritable_output(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = run_cli(capsys, "train", *SMOKE, "--out", str(blocker / "run"), "--quiet")
    assert_one_line_error(result, str(blocker / "run"))
    assert blocker.read_text() == "not a directory"


def test_train_into_an_existing_run_without_overwrite(capsys, run_dir):
    result = run_cli(capsys, "train", *SMOKE, "--out", str(run_dir), "--quiet")
    assert_one_line_error(result, str(run_dir), "already holds a run")


def test_overwrite_with_a_bad_data_path_keeps_the_old_run(capsys, run_dir, tmp_path):
    result = run_cli(capsys, "train", *SMOKE, "--set", "data=npz", "--set",
                     f"data.path='{tmp_path / 'typo.npz'}'", "--out", str(run_dir), "--overwrite",
                     "--quiet")
    assert_one_line_error(result, "typo.npz", "not found")


def test_overwrite_with_a_failing_component_keeps_the_old_run(capsys, run_dir, install):
    install("ncpvae-boom", BOOM_PLUGIN)
    result = run_cli(capsys, "train", *SMOKE, "--set", "prior=boom", "--out", str(run_dir),
                     "--overwrite", "--quiet")
    assert_one_line_error(result, "prior 'boom'", "failed to build")


def test_checkpoint_does_not_match_latent_dim(capsys, run_dir):
    result = run_cli(capsys, "sample", str(run_dir), "--sampler", "langevin",
                     "--set", "latent_dim=7")
    assert_one_line_error(result, "checkpoint", "does not match", "latent_dim is 7 here but 4")


def test_checkpoint_does_not_match_model_size(capsys, run_dir):
    result = run_cli(capsys, "evaluate", str(run_dir), "--set", "model.channels=16")
    assert_one_line_error(result, "checkpoint", "model.channels is 16 here but 8")


def test_unfitted_prior_swapped_in(capsys, run_dir):
    result = run_cli(capsys, "evaluate", str(run_dir), "--set", "prior=ncp",
                     "--set", "evaluate.enabled=true")
    assert_one_line_error(result, "ncp", "not fitted", "fit-prior")


def mark_unfinished(run: Path) -> None:
    """Make ``run`` look like a run killed after its training stage."""
    import json

    summary = json.loads((run / "summary.json").read_text())
    summary["progress"] = {"planned": ["train", "fit_prior", "sample", "evaluate"],
                           "completed": ["train"], "finished": False}
    (run / "summary.json").write_text(json.dumps(summary))


@pytest.mark.parametrize("command", [["fit-prior", "--set", "prior=ncp"],
                                     ["sample", "--sampler", "langevin"], ["evaluate"]])
def test_unfinished_run_points_to_resume(capsys, broken_run, command):
    mark_unfinished(broken_run)
    line = check_unchanged(broken_run, lambda: assert_one_line_error(
        run_cli(capsys, command[0], str(broken_run), *command[1:]), "unfinished",
        f"ncpvae resume {broken_run}"))
    assert "next: fit_prior" in line


def test_train_into_an_unfinished_run_suggests_resume(capsys, broken_run):
    mark_unfinished(broken_run)
    check_unchanged(broken_run, lambda: assert_one_line_error(
        run_cli(capsys, "train", *SMOKE, "--out", str(broken_run), "--quiet"), "unfinished",
        f"ncpvae resume {broken_run}"))


def test_resume_a_finished_run(capsys, run_dir):
    assert_one_line_error(run_cli(capsys, "resume", str(run_dir)), "already finished")


def test_resume_a_directory_that_is_not_a_run(capsys, tmp_path):
    assert_one_line_error(run_cli(capsys, "resume", str(tmp_path)), "not a ncpvae run")


def test_evaluate_a_directory_that_is_not_a_run(capsys, tmp_path):
    assert_one_line_error(run_cli(capsys, "evaluate", str(tmp_path)), str(tmp_path),
                          "not a ncpvae run")


def test_fit_prior_on_a_prior_without_fit(capsys, run_dir):
    assert_one_line_error(run_cli(capsys, "fit-prior", str(run_dir)), "gaussian",
                          "nothing to fit")


def test_sample_set_applies_to_the_sampler_given_by_name(capsys, run_dir):
    result = run_cli(capsys, "sample", str(run_dir), "--sampler", "langevin",
                     "--set", "sampler.step_size=nan")
    assert_one_line_error(result, "sampler.step_size", "finite")


def test_sample_bad_override_on_a_run(capsys, run_dir):
    result = run_cli(capsys, "sample", str(run_dir), "--set", "sampler=langevin",
                     "--set", "sampler.step_size=inf")
    assert_one_line_error(result, "step_size", "finite")


# ------------------------------------------------------------------------------------- data files


def train_on(capsys, tmp_path, *overrides: str) -> tuple[int, str, str]:
    args = ["train", *SMOKE, "--out", str(tmp_path / "out"), "--quiet"]
    for override in overrides:
        args += ["--set", override]
    return run_cli(capsys, *args)


def npz_case(capsys, tmp_path, **arrays) -> str:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    result = train_on(capsys, tmp_path, "data=npz", f"data.path='{path}'")
    return assert_one_line_error(result, "npz")


def test_npz_rank_2(capsys, tmp_path):
    line = npz_case(capsys, tmp_path, images=np.zeros((10, 64), np.uint8))
    assert "dimensions" in line


def test_npz_rank_5(capsys, tmp_path):
    line = npz_case(capsys, tmp_path, images=np.zeros((10, 1, 8, 8, 1), np.uint8))
    assert "dimensions" in line


def test_npz_with_nan(capsys, tmp_path):
    images = np.full((10, 8, 8), 0.5, np.float32)
    images[3, 2, 1] = np.nan
    assert "NaN" in npz_case(capsys, tmp_path, images=images)


def test_npz_with_inf(capsys, tmp_path):
    images = np.full((10, 8, 8), 0.5, np.float32)
    images[0, 0, 0] = np.inf
    assert "infinite" in npz_case(capsys, tmp_path, images=images)


def test_npz_float_out_of_range(capsys, tmp_path):
    assert "[0, 1]" in npz_case(capsys, tmp_path, images=np.full((10, 8, 8), 2.0, np.float32))


def test_npz_integers_out_of_range(capsys, tmp_path):
    assert "0..255" in npz_case(capsys, tmp_path, images=np.full((10, 8, 8), 300, np.int32))


def test_npz_missing_key(capsys, tmp_path):
    assert "no array 'images'" in npz_case(capsys, tmp_path, pixels=np.zeros((10, 8, 8)))


def test_npz_not_an_archive(capsys, tmp_path):
    path = tmp_path / "data.npz"
    path.write_text("these are not images")
    result = train_on(capsys, tmp_path, "data=npz", f"data.path='{path}'")
    assert_one_line_error(result, str(path), "not a valid .npz")


def test_npz_missing_file(capsys, tmp_path):
    path = tmp_path / "absent.npz"
    result = train_on(capsys, tmp_path, "data=npz", f"data.path='{path}'")
    assert_one_line_error(result, str(path), "not found")


def test_npz_object_array_is_not_unpickled(capsys, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "data.npz"
    np.savez(path, images=np.array([Boom(str(marker))], dtype=object))
    result = train_on(capsys, tmp_path, "data=npz", f"data.path='{path}'")
    assert_one_line_error(result, "npz")
    assert not marker.exists()


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">i4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def mnist_root(tmp_path: Path) -> Path:
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "train-images-idx3-ubyte", np.zeros((20, 28, 28)))
    write_idx(raw / "train-labels-idx1-ubyte", np.arange(20) % 10)
    write_idx(raw / "t10k-images-idx3-ubyte", np.zeros((10, 28, 28)))
    write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(10) % 10)
    return raw


def test_truncated_idx_images(capsys, tmp_path):
    raw = mnist_root(tmp_path)
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[: 16 + 28 * 28 * 5 + 100])  # 5.1 of 20 images
    result = train_on(capsys, tmp_path, "data=mnist", f"data.root='{raw.parent.parent}'")
    assert_one_line_error(result, "mnist", str(raw))


def test_truncated_idx_header(capsys, tmp_path):
    raw = mnist_root(tmp_path)
    path = raw / "t10k-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:6])
    result = train_on(capsys, tmp_path, "data=mnist", f"data.root='{raw.parent.parent}'")
    assert_one_line_error(result, "mnist", str(raw))


def test_idx_with_wrong_label_count(capsys, tmp_path):
    raw = mnist_root(tmp_path)
    write_idx(raw / "train-labels-idx1-ubyte", np.arange(7) % 10)
    result = train_on(capsys, tmp_path, "data=mnist", f"data.root='{raw.parent.parent}'")
    assert_one_line_error(result, "mnist")


def test_mnist_files_missing(capsys, tmp_path):
    result = train_on(capsys, tmp_path, "data=mnist", f"data.root='{tmp_path / 'empty'}'")
    assert_one_line_error(result, "mnist", "data not found")


def test_dsprites_not_the_full_grid(capsys, tmp_path):
    path = tmp_path / "dsprites.npz"
    np.savez(path, imgs=np.zeros((4, 64, 64), np.uint8),
             latents_classes=np.zeros((4, 6), np.int64))
    result = train_on(capsys, tmp_path, "data=dsprites", f"data.path='{path}'")
    assert_one_line_error(result, "dsprites", "full factor grid")


# ------------------------------------------------------------------------------------- checkpoints


class Boom:
    """Unpickling this would create a file (the test asserts it never does)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def replace_checkpoint(run_dir: Path, write) -> None:
    """Swap the run's checkpoint for a bad one (outside the byte-identity check)."""
    write(run_dir / "checkpoint.pt")


@pytest.fixture
def broken_run(smoke_run, tmp_path):
    """A copy of the trained run whose checkpoint the test replaces before calling the CLI."""
    copy = tmp_path / "run"
    shutil.copytree(smoke_run, copy)
    return copy


def check_unchanged(path: Path, action) -> str:
    before = snapshot(path)
    line = action()
    assert snapshot(path) == before
    return line


def test_checkpoint_truncated(capsys, broken_run):
    ckpt = broken_run / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    line = check_unchanged(broken_run, lambda: assert_one_line_error(
        run_cli(capsys, "sample", str(broken_run), "--sampler", "langevin"),
        str(ckpt), "truncated"))
    assert "rerun" in line


def test_checkpoint_empty(capsys, broken_run):
    (broken_run / "checkpoint.pt").write_bytes(b"")
    check_unchanged(broken_run, lambda: assert_one_line_error(
        run_cli(capsys, "evaluate", str(broken_run)), "checkpoint.pt", "truncated"))


def test_checkpoint_foreign_text(capsys, broken_run):
    (broken_run / "checkpoint.pt").write_text("model weights: see attached\n")
    check_unchanged(broken_run, lambda: assert_one_line_error(
        run_cli(capsys, "sample", str(broken_run), "--sampler", "langevin"), "checkpoint.pt"))


def test_checkpoint_foreign_torch_file(capsys, broken_run):
    torch.save(torch.zeros(3), broken_run / "checkpoint.pt")
    check_unchanged(broken_run, lambda: assert_one_line_error(
        run_cli(capsys, "sample", str(broken_run), "--sampler", "langevin"), "checkpoint.pt",
        "not a ncpvae checkpoint"))


def test_checkpoint_pickle_that_would_run_code(capsys, broken_run, tmp_path):
    marker = tmp_path / "pwned"
    state = torch.load(broken_run / "checkpoint.pt", weights_only=True)
    state["extra"] = Boom(str(marker))
    torch.save(state, broken_run / "checkpoint.pt")
    line = check_unchanged(broken_run, lambda: assert_one_line_error(
        run_cli(capsys, "sample", str(broken_run), "--sampler", "langevin"),
        str(broken_run / "checkpoint.pt"), "refused for safety"))
    assert "it names" in line
    assert not marker.exists(), "unpickling ran code"


def test_checkpoint_raw_pickle_that_would_run_code(capsys, broken_run, tmp_path):
    marker = tmp_path / "pwned"
    with open(broken_run / "checkpoint.pt", "wb") as handle:
        pickle.dump({"model": Boom(str(marker))}, handle)
    check_unchanged(broken_run, lambda: assert_one_line_error(
        run_cli(capsys, "fit-prior", str(broken_run), "--set", "prior=ncp"),
        "checkpoint.pt", "refused for safety"))
    assert not marker.exists(), "unpickling ran code"


def test_checkpoint_missing(capsys, broken_run):
    (broken_run / "checkpoint.pt").unlink()
    check_unchanged(broken_run, lambda: assert_one_line_error(
        run_cli(capsys, "sample", str(broken_run), "--sampler", "langevin"), "checkpoint.pt"))


# ------------------------------------------------------------------------------------- plugins

BOOM_PLUGIN = '''
from typing import Literal

from ncpvae import ComponentConfig, hookimpl
from ncpvae_plugins.gaussian import GaussianPrior


class BoomPrior(GaussianPrior):
    """A prior whose construction always fails."""

    name = "boom"

    class Config(ComponentConfig):
        name: Literal["boom"] = "boom"

    @classmethod
    def from_config(cls, config, ctx):
        raise RuntimeError("the boom prior needs\\na GPU cluster")


@hookimpl
def ncpvae_register_priors():
    return [BoomPrior]
'''

HOOK_RAISES = '''
from ncpvae import hookimpl


@hookimpl
def ncpvae_register_priors():
    import frobnicate_not_installed  # a lazy import inside the hook

    return []
'''

HOOK_NOT_A_LIST = '''
from ncpvae import hookimpl


@hookimpl
def ncpvae_register_samplers():
    return "langevin"
'''

DUPLICATE = '''
from ncpvae import hookimpl
from ncpvae_plugins.gaussian import GaussianPrior


class Another(GaussianPrior):
    name = "gaussian"


@hookimpl
def ncpvae_register_priors():
    return [Another]
'''


@pytest.fixture
def install(tmp_path, monkeypatch):
    """Install a one-module distribution with an ``ncpvae`` entry point, for this test only."""
    root = tmp_path / "site"
    root.mkdir()
    packages = []

    def install(entry: str, source: str, version: str = "0.1") -> None:
        package = f"ncpvae_battery_{entry.replace('-', '_')}"
        (root / package).mkdir()
        (root / package / "__init__.py").write_text("")
        (root / package / "plugin.py").write_text(textwrap.dedent(source))
        info = root / f"{package}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[ncpvae]\n{entry} = {package}.plugin\n")
        packages.append(package)
        importlib.invalidate_caches()
        get_plugin_manager.cache_clear()

    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delenv("NCPVAE_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    yield install
    for name in list(sys.modules):
        if any(name == p or name.startswith(p + ".") for p in packages):
            del sys.modules[name]
    importlib.invalidate_caches()
    get_plugin_manager.cache_clear()


def test_plugin_constructor_raises(capsys, install, tmp_path):
    install("ncpvae-boom", BOOM_PLUGIN)
    result = run_cli(capsys, "train", *SMOKE, "--set", "prior=boom", "--out",
                     str(tmp_path / "out"), "--quiet")
    line = assert_one_line_error(result, "prior 'boom' (plugin ncpvae-boom 0.1) failed to build: "
                                         "RuntimeError: the boom prior needs a GPU cluster")
    assert line.startswith("ncpvae train: error: ")


def test_plugin_hook_raises_is_a_warning_and_the_rest_works(capsys, install):
    install("lazy", HOOK_RAISES)
    code, out, err = run_cli(capsys, "list", "prior")
    assert code == 0 and "gaussian" in out and "ncp" in out
    (line,) = err.splitlines()
    assert line.startswith("ncpvae: warning: plugin 'lazy' failed in ncpvae_register_priors()")
    assert "ModuleNotFoundError" in line and "frobnicate" in line


def test_plugin_hook_raises_under_strict(capsys, install):
    install("lazy", HOOK_RAISES)
    result = run_cli(capsys, "list", "--strict-plugins")
    assert_one_line_error(result, "plugin 'lazy'", "ncpvae_register_priors",
                          "ModuleNotFoundError")


def test_plugin_hook_returns_a_string(capsys, install):
    install("stringy", HOOK_NOT_A_LIST)
    assert_one_line_error(run_cli(capsys, "list"), "plugin 'stringy'", "must return a list")


def test_plugin_duplicate_name(capsys, install):
    install("twin", DUPLICATE)
    assert_one_line_error(run_cli(capsys, "list"), "prior 'gaussian'", "registered twice",
                          "twin", "ncpvae_plugins.gaussian")


def test_plugin_import_fails_under_strict(capsys, install):
    install("broken", "raise ImportError('needs the missing package frobnicate')\n")
    assert_one_line_error(run_cli(capsys, "plugins", "--strict-plugins"), "plugin 'broken'",
                          "frobnicate")


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra.get("PYTHONPATH"),
                                                      os.environ.get("PYTHONPATH")]))
    return env


def test_plugin_warning_is_one_line_without_source_echo(install, tmp_path):
    install("lazy", HOOK_RAISES)
    env = subprocess_env(PYTHONPATH=str(tmp_path / "site"))
    proc = subprocess.run([sys.executable, "-m", "ncpvae.cli", "list", "prior"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ncpvae: warning: plugin 'lazy'") and "frobnicate" in lines[0]
    assert "warnings.warn" not in proc.stderr and "Warning:" not in proc.stderr


# ------------------------------------------------------------------------------------- signals


@pytest.mark.slow  # a real training in a subprocess, interrupted
def test_ctrl_c_during_training(tmp_path):
    """SIGINT in the middle of training: exit 130 and one line on stderr."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "ncpvae.cli", "train", "smoke", "--set", "train.epochs=50",
            "--set", "evaluate.enabled=false", "--out", str(out), "--quiet"]
    # A job started in the background by a non-interactive shell (CI, `cmd &`) inherits SIGINT
    # as ignored, and Python keeps it ignored: give the child the default handling of Ctrl-C.
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    assert (out / "checkpoint.pt").exists(), "no checkpoint was written"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert_one_line_error((proc.returncode, "", err), "interrupted", str(out / "checkpoint.pt"),
                          "after epoch", f"ncpvae resume {out}")
