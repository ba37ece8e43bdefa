"""benchmarks/gpu_check.py: the no-CUDA exit, the finiteness check of the smoke run, and one
whole ``--device cpu --quick`` run with the JSON it writes."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
STAGES = ["smoke", "training", "samplers", "mala", "memory", "speed"]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_cuda_exits_2_with_one_line(gpu_check, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device" in err and "--device cpu" in err
    assert not (tmp_path / "r").exists()


def test_nonfinite_paths(gpu_check):
    value = {"a": 1.0, "b": [0.5, float("nan")], "c": {"d": float("inf"), "e": "x", "f": 2}}
    assert gpu_check.nonfinite_paths(value) == ["b[1]", "c.d"]
    assert gpu_check.nonfinite_paths({"a": [1.0, {"b": 3}]}) == []


def test_check_smoke_flags_unfinished_and_nonfinite(gpu_check, tmp_path):
    (tmp_path / "evaluation.json").write_text(json.dumps({"kid": {"p": 0.1}}))
    (tmp_path / "summary.json").write_text(json.dumps({"progress": {"finished": True},
                                                      "vae": {"test_elbo": -5.0}}))
    assert gpu_check.check_smoke(tmp_path)["ok"]
    (tmp_path / "summary.json").write_text(json.dumps({"progress": {"finished": True},
                                                      "vae": {"test_elbo": float("nan")}}))
    result = gpu_check.check_smoke(tmp_path)
    assert not result["ok"] and result["nonfinite"] == ["summary.vae.test_elbo"]
    (tmp_path / "summary.json").write_text(json.dumps({"progress": {"finished": False}}))
    assert not gpu_check.check_smoke(tmp_path)["ok"]


def test_run_stage_records_failure_and_timeout(gpu_check, tmp_path):
    log = tmp_path / "gpu_check.log"
    ok = gpu_check.run_stage("fine", [sys.executable, "-c", "print('hello')"], 60, log)
    assert ok["status"] == "ok" and ok["returncode"] == 0 and "output_tail" not in ok
    bad = gpu_check.run_stage("bad", [sys.executable, "-c", "print('oops'); raise SystemExit(3)"],
                              60, log)
    assert bad["status"] == "failed" and bad["returncode"] == 3
    assert bad["output_tail"].strip() == "oops"  # this stage's output only
    slow = gpu_check.run_stage(
        "slow", [sys.executable, "-c", "import time; time.sleep(60); print('finished')"], 1, log)
    # stopped at its limit: no exit status, and the stage never reached its last line
    assert slow["status"] == "timeout" and slow["returncode"] is None
    assert "finished" not in slow["output_tail"]
    text = log.read_text()
    assert "===== fine" in text and "hello" in text and "===== slow" in text


def test_cuda_commands_use_the_device(gpu_check, tmp_path):
    commands = gpu_check.stage_commands("cuda", False, tmp_path, tmp_path / "run")
    assert list(commands) == STAGES
    assert "device=cuda" in commands["smoke"]
    for name in STAGES[1:]:
        cmd = commands[name]
        assert cmd[cmd.index("--device") + 1] == "cuda"
        assert cmd[cmd.index("--json") + 1] == str(tmp_path / f"{name}.json")
    assert sum(gpu_check.GPU_LIMITS.values()) <= 8 * 60


@pytest.mark.slow
def test_quick_cpu_run_writes_every_stage_json(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[gpu_check] smoke: started" in proc.stdout  # progress is printed
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["ok"] and report["device"] == "cpu" and report["env"]["torch"]
    assert list(report["stages"]) == STAGES
    # what comes back from a device machine: at most 8 files
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["gpu_check.json", "gpu_check.log"] + [f"{name}.json" for name in STAGES])
    log = (out / "gpu_check.log").read_text()
    assert all(f"===== {name}:" in log for name in STAGES)
    for name, record in report["stages"].items():
        assert record["status"] == "ok", (name, record)
        assert record["json"] == f"{name}.json" and (out / record["json"]).is_file()

    smoke = json.loads((out / "smoke.json").read_text())
    assert smoke["finished"] and smoke["all_finite"] and smoke["nonfinite"] == []
    assert math.isfinite(smoke["summary"]["vae"]["test_elbo"])
    assert "prior_fit" in smoke["summary"]  # the NCP stage ran

    training = json.loads((out / "training.json").read_text())
    assert training["device"] == "cpu"
    row = training["configs"]["smoke"]
    assert row["bare_images_per_second"] > 0 and row["framework_images_per_second"] > 0
    assert training["gemm_probe"]["torch_mm_gflops"] > 0

    samplers = json.loads((out / "samplers.json").read_text())
    assert samplers["device"] == "cpu"
    assert all(r["mala_chain_steps_per_s"] > 0 for r in samplers["rows"])

    mala = json.loads((out / "mala.json").read_text())
    assert mala["args"]["device"] == "cpu" and "BlackJAX column skipped" in mala["notes"][0]
    assert all(r["ncpvae_chain_steps_per_s"] > 0 and "blackjax_chain_steps_per_s" not in r
               for r in mala["rows"])

    memory = json.loads((out / "memory.json").read_text())
    assert {r["mode"] for r in memory["rows"]} == {"stream"}
    assert all(r["samples_shape"] == [1, 1000, 10] for r in memory["rows"])
    assert memory["extrapolation"][0]["steps"] == 10_000

    # the CPU dry run of the speed checks: fp16 refused, CUDA-only parts skipped with a reason
    speed = json.loads((out / "speed.json").read_text())
    assert speed["precision"]["fp32"]["status"] == "ok"
    assert speed["precision"]["fp16"]["status"] == "refused"
    assert speed["torchrun"]["status"] == "skipped" and "CUDA" in speed["torchrun"]["reason"]
    assert speed["fast_path"]["rows"][-1]["mode"] == "compiled"
    assert speed["hierarchical"]["status"] == "ok"
    assert speed["hierarchical"]["model"] == "hierarchical"
