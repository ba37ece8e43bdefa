"""One writer per run directory (:mod:`ncpvae.run.lock`): a second writer is refused with one line
naming the holder and changes nothing; a killed writer leaves no stale lock; readers are never
blocked; caches shared between runs survive concurrent writers and corrupt entries.

Deterministic: the test itself holds a run's lock (or a child process does, and says so on its
stdout) before the command under test starts, so nothing depends on timing.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ncpvae import cli
from ncpvae.config import load_config
from ncpvae.experiment import train
from ncpvae.run import lock as run_lock
from ncpvae.run.directory import LOCK_FILE
from ncpvae.run.fit import fit_prior
from ncpvae.run.train import train_vae

SMOKE = ["smoke", "--set", "train.epochs=1", "--set", "evaluate.enabled=false"]
REFUSAL = "wait for it to finish or stop it"


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``ncpvae ARGS`` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refusal_line(result: tuple[int, str, str], run: Path) -> str:
    """The one stderr line of a refused writer (exit 2), naming the run and what to do."""
    code, _, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"'{run}' is being written by another process" in lines[0]
    assert REFUSAL in lines[0] and lines[0].endswith("the run is unchanged")
    return lines[0]


def snapshot(path: Path) -> dict[str, str]:
    """SHA-256 of every file under ``path`` (directories as "dir")."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else "dir" for p in sorted(path.rglob("*"))}


def _interrupted_sample(run) -> None:
    raise KeyboardInterrupt  # as Ctrl-C at the start of the sample stage


_interrupted_sample.stage_name = "sample"  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def unfinished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smoke run (1 epoch, no evaluation) interrupted after its fit stage: `resume` finishes
    it (the sample and evaluate stages)."""
    from ncpvae.evaluation.pipeline import evaluate_stage
    from ncpvae.run.stages import RunInterrupted

    out = tmp_path_factory.mktemp("lock") / "unfinished"
    config = load_config(SMOKE[0], [SMOKE[2], SMOKE[4]])
    with torch.random.fork_rng(), pytest.raises(RunInterrupted):
        train(config, out, quiet=True,
              stages=(train_vae, fit_prior, _interrupted_sample, evaluate_stage))
    assert not (out / LOCK_FILE).exists()
    return out


@pytest.fixture
def run(unfinished_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(unfinished_run, copy)
    return copy


def test_a_second_resume_is_refused_naming_the_holder_and_nothing_changes(capsys, run: Path):
    command = f"ncpvae resume {run}"
    with run_lock.hold(run, command=command) as held:
        assert held == run / LOCK_FILE and held.is_file()
        before = snapshot(run)
        line = refusal_line(run_cli(capsys, "resume", str(run), "--quiet"), run)
        for command_name in ("fit-prior", "sample", "evaluate", "compare-priors"):
            other = refusal_line(run_cli(capsys, command_name, str(run)), run)
            assert other == line.replace("ncpvae resume:", f"ncpvae {command_name}:")
        assert snapshot(run) == before
    pid = os.getpid()
    assert (f"(pid {pid} on host {socket.gethostname()}, `{command}`, since " in line
            and f"(kill {pid})" in line)
    assert not (run / LOCK_FILE).exists()  # the holder removes the file when it is done


def test_two_trains_into_one_directory_give_one_run_and_one_refusal(capsys, tmp_path: Path):
    out = tmp_path / "new" / "run"
    with run_lock.hold(out, command="ncpvae train smoke", create=True):  # the first train
        refused = run_cli(capsys, "train", *SMOKE, "--out", str(out), "--quiet")
        refusal_line(refused, out)
        assert [p.name for p in out.iterdir()] == [LOCK_FILE]
    assert not (tmp_path / "new").exists()  # the folders the lock made are gone with it
    first = run_cli(capsys, "train", *SMOKE, "--out", str(out), "--quiet")
    assert first[0] == 0, first[2]
    again = run_cli(capsys, "train", *SMOKE, "--out", str(out), "--quiet")
    assert again[0] == 2 and "already holds a run" in again[2]  # checked under the lock
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_a_writer_killed_with_sigkill_leaves_no_stale_lock(capsys, run: Path):
    code = ("import sys\nfrom ncpvae.run.lock import hold\n"
            f"with hold({str(run)!r}, command='ncpvae resume (killed)'):\n"
            "    print('locked', flush=True)\n    sys.stdin.read()\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "locked\n"
        line = refusal_line(run_cli(capsys, "resume", str(run), "--quiet"), run)
        assert f"pid {child.pid} " in line and "`ncpvae resume (killed)`" in line
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert (run / LOCK_FILE).is_file()  # left behind by kill -9, but nobody holds it
    code_, out, err = run_cli(capsys, "resume", str(run), "--quiet")
    assert code_ == 0, err
    assert f"run finished in {run}" in out
    assert not (run / LOCK_FILE).exists()


def test_readers_are_not_blocked_by_a_writer(capsys, run: Path):
    from ncpvae.run.build import open_run
    from ncpvae.run.summary_text import format_run_summary

    with run_lock.hold(run, command="ncpvae resume"):
        assert run_cli(capsys, "plugins")[0] == 0
        code, out, err = run_cli(capsys, "validate", str(run / "config.toml"))
        assert code == 0 and 'name = "smoke"' in out, err
        assert "test ELBO" in format_run_summary(run)
        assert open_run(run, quiet=True).directory is not None


def test_a_directory_that_is_not_there_is_not_created(tmp_path: Path):
    missing = tmp_path / "missing"
    with run_lock.hold(missing) as held:
        assert held is None
    assert not missing.exists()


def test_without_fcntl_the_filelock_package_excludes_a_second_writer(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setattr(run_lock, "fcntl", None)
    with run_lock.hold(tmp_path), pytest.raises(run_lock.RunLockedError, match=REFUSAL), \
            run_lock.hold(tmp_path):
        pass
    with run_lock.hold(tmp_path):  # released
        pass


@pytest.mark.slow
def test_a_second_torchrun_launch_on_a_run_is_refused(run: Path):
    """A real ``torchrun`` on a run whose lock the test holds: rank 0 is refused with one line
    (rank 1 writes nothing and is stopped by torchrun), the run is unchanged."""
    with run_lock.hold(run, command="torchrun ... ncpvae resume"):
        before = snapshot(run)
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             "--nproc_per_node=2", "-m", "ncpvae", "resume", str(run), "--quiet"],
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert snapshot(run) == before
    assert done.returncode != 0
    # what the ranks print comes before torchrun's own failure report ("... elastic ...")
    ours = done.stderr.split("torch/distributed/elastic")[0].splitlines()
    ours = [line for line in ours if line.strip() and not line.startswith(("E1", "W1", "I1"))]
    assert len(ours) == 1, done.stderr[-3000:]
    assert ours[0].startswith("ncpvae resume: error: ") and REFUSAL in ours[0]
    assert "`torchrun ... ncpvae resume`" in ours[0]


# ------------------------------------------------------------------------------------- caches


def _small_net():
    from ncpvae.metrics.feature_net import FeatureNet, FeatureNetSpec

    torch.manual_seed(0)
    return FeatureNet(FeatureNetSpec(image_shape=(1, 8, 8), head_sizes=(2,),
                                     head_names=("label",), width=4, feature_dim=8))


def _cache_writer(folder: str, barrier, result, builds) -> None:
    """One process of the concurrent-writer test: both ask for the entry at once; the build
    lock lets one build while the other waits, then loads what it wrote."""
    import time

    from ncpvae.metrics.feature_net import cached_feature_net

    def build():
        with open(builds, "a") as log:
            log.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # the other process asks meanwhile
        return _small_net()

    barrier.wait(timeout=120)  # both start together, on an empty cache
    net = cached_feature_net(folder, "key", build)
    result.put(sorted(net.state_dict()))


def test_two_processes_writing_one_feature_net_cache_entry_both_end_with_a_valid_entry(
        tmp_path: Path):
    from ncpvae.metrics.feature_net import cached_feature_net, load_feature_net

    context = mp.get_context("fork")
    barrier, result = context.Barrier(2), context.Queue()
    builds = tmp_path.parent / f"{tmp_path.name}-builds.txt"
    procs = [context.Process(target=_cache_writer, args=(str(tmp_path), barrier, result,
                                                         str(builds)))
             for _ in range(2)]
    for proc in procs:
        proc.start()
    keys = [result.get(timeout=300) for _ in procs]
    for proc in procs:
        proc.join(timeout=300)
    assert [proc.exitcode for proc in procs] == [0, 0]
    expected = _small_net().state_dict()
    assert keys == [sorted(expected)] * 2
    assert len(builds.read_text().split()) == 1  # the second one waited for the first's entry
    # the entry and its lock file, no temporary file left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key.lock", "key.pt"]
    loaded = load_feature_net(tmp_path / "key.pt").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    again = cached_feature_net(tmp_path, "key", build=lambda: pytest.fail("rebuilt a good entry"))
    assert all(torch.equal(again.state_dict()[k], v) for k, v in expected.items())


@pytest.mark.parametrize("content", [b"", b"not a torch file", "truncated"])
def test_a_corrupt_feature_net_cache_entry_is_rebuilt(tmp_path: Path, content):
    from ncpvae.metrics.feature_net import cached_feature_net, load_feature_net, save_feature_net

    entry = tmp_path / "key.pt"
    save_feature_net(_small_net(), entry)
    data = entry.read_bytes()
    entry.write_bytes(data[: len(data) // 2] if content == "truncated" else content)
    built = []
    cached_feature_net(tmp_path, "key", lambda: built.append(1) or _small_net())
    assert built == [1]
    loaded = load_feature_net(entry).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in _small_net().state_dict().items())


@pytest.mark.parametrize("damage", ["empty", "truncated", "float"])
def test_a_corrupt_celeba_npy_cache_is_rebuilt(tmp_path: Path, damage: str):
    from ncpvae_plugins.datasets.colour import CelebADataset
    from test_datasets_colour import all_images, build, write_celeba

    write_celeba(tmp_path)
    images = all_images(build(CelebADataset, root=str(tmp_path)).train)
    (cache,) = (p for p in (tmp_path / "celeba" / "ncpvae-cache").iterdir()
                if p.name.startswith("train-"))
    good = cache.read_bytes()
    if damage == "float":  # a whole array of the wrong type
        np.save(cache, np.load(cache).astype(np.float32))
    else:
        cache.write_bytes(b"" if damage == "empty" else good[: len(good) // 2])
    again = all_images(build(CelebADataset, root=str(tmp_path)).train)
    assert torch.equal(again, images)
    assert cache.read_bytes() == good  # rebuilt in place
