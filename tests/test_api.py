"""The Python API (``ncpvae.open_run`` / ``ncpvae.train``), ``ncpvae embed`` and ``ncpvae export``.

- The notebook tutorial's code blocks run as written on a smoke run.
- A :class:`~ncpvae.api.TrainedRun` encodes with the run's encoder, decodes with its decoder,
  samples reproducibly, opens read-only and leaves the global RNG alone.
- ``ncpvae embed`` writes the encoder's outputs and the dataset's labels and factors.
- ``ncpvae export`` -> ``open_run`` loads without pickle and reproduces the run bit for bit;
  a damaged file is refused; the Hub push is tested against a local folder only.
- ``ncpvae.train`` gives the same run as ``ncpvae train`` and holds the writer lock.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import ncpvae
from ncpvae.api import TrainedRun, open_run
from ncpvae.cli import main
from ncpvae.errors import ConfigError, DataError, NcpvaeError
from ncpvae.run import export
from ncpvae.run.build import encode_source
from ncpvae.run.build import open_run as open_run_internal

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = ROOT / "docs/tutorials/python_api.md"


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def opened(smoke_run: Path) -> TrainedRun:
    return open_run(smoke_run)


def test_the_top_level_names_the_notebook_api():
    assert ncpvae.open_run is open_run
    assert {"open_run", "train"} <= set(ncpvae.__all__)


# ---------------------------------------------------------------------------------------------
# the tutorial


@pytest.mark.slow
def test_the_python_api_tutorial_runs_as_written(smoke_run, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", TUTORIAL.read_text(), flags=re.S)
    assert len(blocks) >= 5  # open, encode/decode, sample, embed, export
    shutil.copytree(smoke_run, tmp_path / "runs" / "smoke")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for number, block in enumerate(blocks):
        exec(compile(block, f"{TUTORIAL.name} block {number + 1}", "exec"), namespace)
    assert (tmp_path / "latents.npz").is_file() and export.is_export(tmp_path / "shared/smoke")


# ---------------------------------------------------------------------------------------------
# TrainedRun


@pytest.mark.slow
def test_encode_and_decode_are_the_run_models(smoke_run, opened):
    internal = open_run_internal(smoke_run, quiet=True)
    images = internal.data.test.get_batch(torch.arange(20))
    mu, logvar = encode_source(internal.model, internal.data.test, internal.device, limit=20)
    enc = opened.encode(images)
    assert torch.equal(enc.mu, mu) and torch.equal(enc.logvar, logvar)
    assert enc.mu.shape == (20, opened.config.latent_dim) and enc.mu.device.type == "cpu"
    with torch.no_grad():
        expected = internal.model.mean_image(internal.model.eval().decode(mu))
    assert torch.equal(opened.decode(mu), expected)
    assert opened.decode(mu).shape == (20, *opened.image_shape)
    one = opened.encode((images[0] * 255).round().to(torch.uint8))  # one uint8 image (C, H, W)
    assert one.mu.shape == (1, opened.config.latent_dim)


@pytest.mark.slow
def test_open_run_writes_nothing_and_leaves_the_global_rng_alone(smoke_run):
    before = _digest(smoke_run)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run = open_run(smoke_run)
    run.sample(4, seed=0)
    run.sample(4, sampler="langevin", seed=0, num_steps=3, burn_in=0)
    assert torch.equal(torch.rand(3), expected)
    assert _digest(smoke_run) == before
    assert not run.model.training and not run.prior.training


@pytest.mark.slow
def test_sample_is_seeded_and_takes_a_sampler_by_name(opened):
    a = opened.sample(8, seed=3)
    assert a.latents.shape == (8, opened.config.latent_dim)
    assert a.images.shape == (8, *opened.image_shape)
    assert torch.equal(opened.sample(8, seed=3).latents, a.latents)
    assert not torch.equal(opened.sample(8, seed=4).latents, a.latents)
    chains = opened.sample(8, sampler="langevin", seed=3, num_steps=5, burn_in=0, images=False)
    assert chains.images is None and chains.result.samples.shape[1:] == (8, 4)
    assert chains.diagnostics["num_steps"] == 5
    same = opened.sample(8, sampler="langevin", seed=3, num_steps=5, burn_in=0)
    assert torch.equal(same.latents, chains.latents)


@pytest.mark.slow
def test_bad_inputs_are_one_line_errors(opened, tmp_path):
    with pytest.raises(DataError, match=r"do not fit this run's \(N, 1, 32, 32\)"):
        opened.encode(torch.zeros(2, 3, 32, 32))
    with pytest.raises(DataError, match="float images must lie in"):
        opened.encode(torch.full((2, 1, 32, 32), 2.0))
    with pytest.raises(DataError, match=r"do not fit this run's \(n, 4\)"):
        opened.decode(torch.zeros(2, 5))
    with pytest.raises(ConfigError, match="positive integer"):
        opened.sample(0)
    with pytest.raises(ConfigError, match="need a sampler"):
        opened.sample(2, num_steps=3)
    with pytest.raises(ConfigError, match="must be smaller than num_steps"):
        opened.sample(2, sampler="langevin", num_steps=3)
    with pytest.raises(NcpvaeError, match="neither a ncpvae run directory"):
        open_run(tmp_path)
    with pytest.raises(NcpvaeError, match="is not a folder"):
        open_run(tmp_path / "nothing")


# ---------------------------------------------------------------------------------------------
# ncpvae embed


@pytest.mark.slow
def test_embed_writes_the_encoder_outputs_labels_and_factors(smoke_run, tmp_path, capsys):
    out = tmp_path / "latents.npz"
    assert main(["embed", str(smoke_run), "--split", "test", "--out", str(out)]) == 0
    assert "test embeddings written" in capsys.readouterr().out
    internal = open_run_internal(smoke_run, quiet=True)
    test = internal.data.test
    mu, logvar = encode_source(internal.model, test, internal.device)
    with np.load(out, allow_pickle=False) as arrays:
        assert np.array_equal(arrays["mu"], mu.numpy())
        assert np.array_equal(arrays["logvar"], logvar.numpy())
        assert np.array_equal(arrays["labels"], test.labels.numpy())
        assert np.array_equal(arrays["factors"], test.factors(torch.arange(len(test))).numpy())
        assert list(arrays["factor_names"]) == list(internal.data.ground_truth.factor_names)
        assert arrays["mu"].shape == (len(test), internal.config.latent_dim)


def test_embed_refuses_a_file_that_is_not_npz(tmp_path, capsys):
    assert main(["embed", str(tmp_path), "--out", str(tmp_path / "latents.txt")]) == 2
    assert "must name a .npz file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# ncpvae export


@pytest.fixture(scope="module")
def exported(smoke_run: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "smoke"
    assert main(["export", str(smoke_run), str(out)]) == 0
    return out


@pytest.mark.slow
def test_export_writes_a_self_describing_folder(smoke_run, exported):
    names = {p.name for p in exported.iterdir()}
    assert names == {"README.md", "config.toml", "model.safetensors", "prior.safetensors",
                     "state.json", "plugins.json", "summary.json", "evaluation.json",
                     "ncpvae_export.json"}
    manifest = json.loads((exported / "ncpvae_export.json").read_text())
    assert manifest["image_shape"] == [1, 32, 32] and manifest["format"] == 1
    assert set(manifest["files"]) == names - {"ncpvae_export.json"}
    card = (exported / "README.md").read_text()
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert f"{summary['vae']['test_elbo']:.2f}" in card  # the headline numbers
    assert "ncpvae train config.toml" in card and "library_name: ncpvae" in card
    assert (exported / "plugins.json").read_text() == (smoke_run / "plugins.json").read_text()


@pytest.mark.slow
def test_export_opens_without_pickle_and_reproduces_the_run(smoke_run, exported, opened,
                                                            monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an export must load without torch.load / pickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    shared = open_run(exported)
    assert shared.summary == opened.summary and shared.evaluation == opened.evaluation
    assert shared.config == opened.config
    for source in (None, "langevin"):
        options = {} if source is None else {"num_steps": 5, "burn_in": 0}
        a = shared.sample(12, source, seed=7, **options)
        b = opened.sample(12, source, seed=7, **options)
        assert torch.equal(a.latents, b.latents) and torch.equal(a.images, b.images)
    images = opened.data.test.get_batch(torch.arange(16))
    assert torch.equal(shared.encode(images).mu, opened.encode(images).mu)
    # the summary's held-out numbers from the exported weights: the VAE's test ELBO again
    from ncpvae.run.vae_eval import evaluate_vae

    again = evaluate_vae(shared.as_run(), opened.config.train.eval_size)
    assert again["test_elbo"] == opened.summary["vae"]["test_elbo"]


@pytest.mark.slow
def test_a_damaged_export_is_refused(exported, tmp_path):
    copy = Path(shutil.copytree(exported, tmp_path / "copy"))
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(DataError, match="model.safetensors does not match its digest"):
        open_run(copy)


@pytest.mark.slow
def test_export_refuses_an_occupied_folder_and_overwrites_an_export(smoke_run, exported,
                                                                    tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["export", str(smoke_run), str(other)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    copy = Path(shutil.copytree(exported, tmp_path / "copy"))
    assert main(["export", str(smoke_run), str(copy)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(smoke_run), str(copy), "--overwrite"]) == 0
    assert main(["export", str(smoke_run)]) == 2
    assert "name the folder to write" in capsys.readouterr().err


@pytest.mark.slow
def test_hub_push_uploads_the_export_folder(smoke_run, tmp_path, monkeypatch, capsys):
    hub = tmp_path / "hub"

    def upload(module, folder, repo_id, *, private):  # a local stand-in for the Hub
        shutil.copytree(folder, hub / repo_id)
        return f"file://{hub / repo_id}"

    monkeypatch.setattr(export, "_upload", upload)
    # the [hub] extra need not be installed: the stand-in upload never touches the module
    monkeypatch.setitem(sys.modules, "huggingface_hub", types.ModuleType("huggingface_hub"))
    assert main(["export", str(smoke_run), "--hub", "someone/smoke"]) == 0
    assert f"pushed to file://{hub}/someone/smoke" in capsys.readouterr().out
    pushed = open_run(hub / "someone" / "smoke")
    assert pushed.summary == json.loads((smoke_run / "summary.json").read_text())


def test_hub_push_without_the_extra_is_one_line(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    assert main(["export", str(tmp_path), "--hub", "someone/smoke"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'ncpvae[hub]'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_hub_push_offline_is_one_line(smoke_run, monkeypatch, capsys):
    constants = pytest.importorskip("huggingface_hub.constants")
    # the library's own offline mode: it refuses before any network call
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["export", str(smoke_run), "--hub", "someone/smoke"]) == 2
    err = capsys.readouterr().err
    assert "cannot push to the Hugging Face Hub repository 'someone/smoke'" in err
    assert "OfflineModeIsEnabled" in err
    assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# ncpvae.train


@pytest.mark.slow
def test_train_is_the_command_and_returns_the_opened_run(smoke_run, tmp_path):
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    run = ncpvae.train("smoke", tmp_path / "smoke")
    assert torch.equal(torch.rand(2), expected)  # the global RNG is restored
    assert isinstance(run, TrainedRun) and run.path == tmp_path / "smoke"
    assert not (tmp_path / "smoke" / ".lock").exists()  # released
    ours = json.loads((tmp_path / "smoke" / "summary.json").read_text())["vae"]
    theirs = json.loads((smoke_run / "summary.json").read_text())["vae"]
    timing = {k for k in theirs if k.endswith(("_seconds", "per_second"))}
    assert timing and "test_elbo" in theirs
    # bit for bit the session's `ncpvae train smoke` (wall-clock fields aside)
    assert {k: v for k, v in ours.items() if k not in timing} == \
        {k: v for k, v in theirs.items() if k not in timing}


def test_train_refuses_a_run_another_writer_holds(tmp_path):
    from ncpvae.run.lock import RunLockedError, hold

    with hold(tmp_path / "busy", command="ncpvae resume busy", create=True), \
            pytest.raises(RunLockedError, match="ncpvae resume busy"):
        ncpvae.train("smoke", tmp_path / "busy")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without CUDA")
def test_a_cuda_run_opened_without_cuda_names_the_device_argument(tmp_path):
    from ncpvae.config import config_to_toml, load_config

    (tmp_path / "config.toml").write_text(config_to_toml(load_config("smoke", ["device=cuda"])))
    with pytest.raises(ConfigError, match="pass device='cpu'"):
        open_run(tmp_path)


@pytest.mark.slow
def test_an_exported_learned_prior_samples_as_its_run(smoke_run_copy, tmp_path):
    """An NCP prior (base + classifier weights) survives the export bit for bit."""
    assert main(["fit-prior", str(smoke_run_copy), "--set", "prior=ncp", "--quiet"]) == 0
    assert main(["export", str(smoke_run_copy), str(tmp_path / "ncp")]) == 0
    run, shared = open_run(smoke_run_copy), open_run(tmp_path / "ncp")
    assert shared.prior.name == "ncp" and shared.prior.is_fitted
    for source in (None, "langevin"):
        options = {} if source is None else {"num_steps": 5, "burn_in": 0}
        a = shared.sample(12, source, seed=1, **options)
        b = run.sample(12, source, seed=1, **options)
        assert torch.equal(a.latents, b.latents) and torch.equal(a.images, b.images)
    z = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(shared.prior.log_prob(z), run.prior.log_prob(z))
