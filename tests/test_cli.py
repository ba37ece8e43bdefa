"""The ``ncpvae`` command, run through its installed console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

NCPVAE = shutil.which("ncpvae", path=str(Path(sys.executable).parent)) or shutil.which("ncpvae")


def ncpvae(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    assert NCPVAE is not None, "the ncpvae console script is not installed"
    return subprocess.run([NCPVAE, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.slow  # the installed script in a subprocess
def test_list_shows_every_kind():
    result = ncpvae("list")
    assert result.returncode == 0, result.stderr
    for kind, name in [("dataset", "sprites"), ("model", "conv"), ("prior", "gaussian"),
                       ("objective", "beta_elbo")]:
        assert any(line.split()[:2] == [kind, name] for line in result.stdout.splitlines())


@pytest.mark.slow  # the installed script in a subprocess
def test_plugins_lists_builtins_with_components():
    result = ncpvae("plugins")
    assert result.returncode == 0, result.stderr
    assert "ncpvae_plugins.gaussian" in result.stdout and "prior:gaussian" in result.stdout


@pytest.mark.slow  # the installed script in a subprocess
def test_describe_shows_fields_and_capabilities():
    result = ncpvae("describe", "prior", "gaussian")
    assert result.returncode == 0, result.stderr
    assert "scale" in result.stdout and "normalized=True" in result.stdout


@pytest.mark.slow  # the installed script in a subprocess
def test_schema_is_json_with_plugin_configs():
    result = ncpvae("schema")
    schema = json.loads(result.stdout)
    assert "prior:gaussian" in schema["$defs"]
    assert schema["properties"]["prior"]["oneOf"]


@pytest.mark.slow  # the installed script in a subprocess
def test_validate_prints_the_resolved_config():
    result = ncpvae("validate", "smoke", "--set", "objective.beta=4")
    assert result.returncode == 0, result.stderr
    assert "beta = 4.0" in result.stdout


def test_unknown_plugin_name_is_one_line_with_suggestion():
    result = ncpvae("validate", "smoke", "--set", "prior=gausian")
    assert_one_line_error(result, "prior", "did you mean 'gaussian'")


@pytest.mark.slow  # the installed script in a subprocess
def test_misspelt_key_names_its_location():
    result = ncpvae("validate", "smoke", "--set", "objective.btea=4")
    assert_one_line_error(result, "objective", "unknown key 'btea'", "did you mean 'beta'")


@pytest.mark.slow  # the installed script in a subprocess
def test_invalid_toml_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [unclosed\n")
    assert_one_line_error(ncpvae("validate", str(bad)), "not valid TOML")


@pytest.mark.slow  # the installed script in a subprocess
def test_debug_shows_the_traceback():
    result = ncpvae("validate", "smoke", "--set", "prior=gausian", "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_train_smoke_then_refuse_to_overwrite(smoke_run_copy):
    out = smoke_run_copy  # what `ncpvae train smoke --out OUT` wrote (tests/conftest.py)
    assert (out / "summary.json").is_file()
    before = (out / "checkpoint.pt").read_bytes()
    again = ncpvae("train", "smoke", "--out", str(out), "--quiet")
    assert_one_line_error(again, "already holds a run", "--overwrite")
    assert (out / "checkpoint.pt").read_bytes() == before
