"""GPU check: the smoke pipeline on CUDA plus the training, sampler and memory benchmarks, with
all their JSON in one results folder. Meant to run once on a lent GPU machine in ~8 minutes.

Stages (each a subprocess with its own time limit, so one hang or crash does not cost the rest;
progress is printed as each starts and ends):

1. ``env``: torch / CUDA versions, the GPU's name and memory (in ``gpu_check.json``);
2. ``smoke``: ``ncpvae train smoke --set device=cuda --set prior=ncp`` into a temporary run
   directory (the whole pipeline: VAE training, NCP fitting, sampling, evaluation); it must finish
   with every number of ``summary.json`` and ``evaluation.json`` finite (``smoke.json``);
3. ``training``: ``bench_training.py --device cuda`` (``train_vae`` vs a bare loop at every
   shipped config, GEMM probe) -> ``training.json``;
4. ``samplers``: ``bench_samplers.py --device cuda`` (ULA/MALA ``run()`` vs a bare loop, up to
   131,072 chains) -> ``samplers.json``;
5. ``mala``: the torch side of ``bench_blackjax.py --device cuda`` (``run()`` default / lean /
   bare MALA; BlackJAX is skipped: its worker is CPU-only) -> ``mala.json``;
6. ``memory``: ``bench_sampler_memory.py --device cuda`` at 10^5 chains (peak CUDA allocation
   and RSS of ``run()``, full vs streamed info, 16 / 64 / 256 steps) -> ``memory.json``;
7. ``speed``: ``speed_check.py --device cuda``: smoke training at ``train.precision`` fp32 /
   bf16 / fp16, MALA with ``fast_path = "auto"`` below and above the break-even (mode, compile
   seconds, fallback), ``torchrun --nproc_per_node=1`` with NCCL, and a hierarchical run (the
   hierarchical VAE with hierarchical NCP) -> ``speed.json``; with ``--device cpu`` a dry
   run that skips the CUDA-only parts with a message.

``gpu_check.json`` lists every stage's status (``ok``, ``failed``, ``timeout``), wall time, JSON
file and, on failure, the end of its output; every stage's full output goes to ``gpu_check.log``
(8 files in all). The exit code is 0 when every stage passed, 1 otherwise. Without CUDA the
script exits with code 2 and a one-line message, unless ``--device cpu`` is given: then the
same stages run on the CPU (``--quick``: tiny sizes, for the test suite).

    .venv/bin/python benchmarks/gpu_check.py --device cpu --quick --out /tmp/gpu_check
    python3 benchmarks/gpu_check.py --out "$OUT/gpu_check"                  # on a GPU machine

On the lent H200 machine (its python3 has torch, numpy, scipy, scikit-learn, matplotlib, pluggy
and tqdm but not pydantic): carry wheels of pydantic, pydantic-core (cp312, manylinux),
annotated-types and typing-inspection in ``.whl`` (see the device tool's README), then::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site \
      && python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/ncp . \
      && export PYTHONPATH=/tmp/ncp:/tmp/site PYTHONUNBUFFERED=1 \
      && python3 benchmarks/gpu_check.py --out "$OUT/gpu_check"

with a time limit of ~9 minutes (the stages' limits add up to 8).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
#: seconds each stage may take on the GPU (sum ~8 minutes, the expected total is far less)
GPU_LIMITS = {"smoke": 90, "training": 100, "samplers": 50, "mala": 50, "memory": 50,
              "speed": 140}
#: the same with --device cpu (full sizes on a CPU are for information; --quick for tests)
CPU_LIMITS = {"smoke": 600, "training": 900, "samplers": 600, "mala": 600, "memory": 600,
              "speed": 900}


def stage_commands(device: str, quick: bool, out: Path, run_dir: Path) -> dict[str, list[str]]:
    """Each stage's command line (``sys.executable`` first), writing its JSON under ``out``."""
    py = sys.executable
    smoke = [py, "-m", "ncpvae", "train", "smoke", "--set", f"device={device}",
             "--set", "prior=ncp", "--out", str(run_dir), "--overwrite", "--quiet"]
    if quick:  # seconds on one CPU core: fewer images and epochs, a smaller evaluation
        smoke += ["--set", "train.epochs=1", "--set", "data.train_size=256",
                  "--set", "data.test_size=64", "--set", "prior.epochs=2"]
    training = [py, str(HERE / "bench_training.py"), "--device", device,
                "--json", str(out / "training.json")]
    training += (["--configs", "smoke", "--steps", "3", "--repeats", "1"] if quick
                 else ["--steps", "40", "--repeats", "3"])
    samplers = [py, str(HERE / "bench_samplers.py"), "--device", device,
                "--json", str(out / "samplers.json")]
    samplers += (["--quick"] if quick
                 else ["--chains", "1,1024,16384,131072", "--dim-chains", "16384",
                       "--steps", "50", "--repeats", "3"])
    mala = [py, str(HERE / "bench_blackjax.py"), "--device", device, "--no-jax",
            "--json", str(out / "mala.json")]
    mala += (["--quick"] if quick
             else ["--chains", "1,1024,16384,131072", "--steps", "100", "--steps-one", "200",
                   "--repeats", "3"])
    memory = [py, str(HERE / "bench_sampler_memory.py"), "--device", device,
              "--json", str(out / "memory.json")]
    memory += (["--chains", "1000", "--steps", "4", "--modes", "stream", "--threads", "1"]
               if quick else ["--chains", "100000", "--steps", "16,64,256",
                              "--modes", "full,stream"])
    speed = [py, str(HERE / "speed_check.py"), "--device", device,
             "--json", str(out / "speed.json")]
    return {"smoke": smoke, "training": training, "samplers": samplers, "mala": mala,
            "memory": memory, "speed": speed}


def nonfinite_paths(value: Any, path: str = "") -> list[str]:
    """Where a JSON value holds a NaN or an infinity (``a.b[2]``-style paths)."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [path or "<root>"]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in nonfinite_paths(v, f"{path}.{k}" if path
                                                                         else str(k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in nonfinite_paths(v, f"{path}[{i}]")]
    return []


def check_smoke(run_dir: Path) -> dict[str, Any]:
    """The smoke run's summary: finished, and every number of its JSON finite."""
    summary = json.loads((run_dir / "summary.json").read_text())
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    bad = nonfinite_paths(summary, "summary") + nonfinite_paths(evaluation, "evaluation")
    finished = bool(summary.get("progress", {}).get("finished"))
    return {"finished": finished, "all_finite": not bad, "nonfinite": bad[:20],
            "ok": finished and not bad, "summary": summary}


def environment(device: str) -> dict[str, Any]:
    """Versions and the device this check runs on."""
    import torch

    env: dict[str, Any] = {"device": device, "torch": torch.__version__,
                           "cuda": torch.version.cuda, "python": platform.python_version(),
                           "machine": platform.machine(), "cpu_count": os.cpu_count(),
                           "threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gb=props.total_memory / 2**30,
                   capability=f"{props.major}.{props.minor}",
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                   cudnn=torch.backends.cudnn.version())
    return env


def run_stage(name: str, cmd: list[str], limit: float, log: Path) -> dict[str, Any]:
    """Run one stage with a time limit; its output is appended to ``log``."""
    print(f"[gpu_check] {name}: started (limit {limit:.0f} s)", flush=True)
    start = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "ab") as fh:
        fh.write(f"\n===== {name}: {' '.join(cmd[1:])}\n".encode())
        fh.flush()
        offset = fh.tell()
        # its own process group, so that a timeout also stops the stage's worker processes
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                cwd=HERE.parent, start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=limit)
            status = "ok" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status, code = "timeout", None
    wall = time.perf_counter() - start
    record: dict[str, Any] = {"status": status, "returncode": code, "wall_s": wall,
                              "command": cmd[1:], "log": log.name}
    if status != "ok":
        with open(log, "rb") as fh:
            fh.seek(offset)
            record["output_tail"] = fh.read().decode(errors="replace")[-3000:]
    print(f"[gpu_check] {name}: {status} in {wall:.0f} s", flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (for tests)")
    parser.add_argument("--out", default=None,
                        help="results folder (default benchmarks/results/gpu_check_<device>)")
    parser.add_argument("--stages", default=None,
                        help="comma-separated subset of smoke,training,samplers,mala,memory,"
                        "speed")
    args = parser.parse_args(argv)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device is available (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda}); run it on a GPU machine, or pass --device cpu",
              file=sys.stderr)
        return 2
    if args.device != "cpu" and not args.device.startswith("cuda"):
        parser.error(f"--device must be cuda or cpu, got {args.device!r}")
    out = Path(args.out) if args.out else HERE / "results" / f"gpu_check_{args.device}"
    out.mkdir(parents=True, exist_ok=True)
    limits = CPU_LIMITS if args.device == "cpu" else GPU_LIMITS
    started = time.perf_counter()
    report: dict[str, Any] = {"device": args.device, "quick": args.quick,
                              "env": environment(args.device), "stages": {}, "ok": True,
                              "wall_s": 0.0}
    log = out / "gpu_check.log"
    log.write_text("")
    print(f"[gpu_check] {report['env'].get('gpu', 'cpu')}, torch {torch.__version__}; "
          f"results in {out}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "smoke"
        commands = stage_commands(args.device, args.quick, out, run_dir)
        names = args.stages.split(",") if args.stages else list(commands)
        unknown = set(names) - set(commands)
        if unknown:
            parser.error(f"--stages: unknown stage(s) {', '.join(sorted(unknown))}; "
                         f"choose from {', '.join(commands)}")
        for name in names:
            (out / f"{name}.json").unlink(missing_ok=True)  # no stale result from an earlier run
            record = run_stage(name, commands[name], limits[name], log)
            if name == "smoke" and record["status"] == "ok":
                smoke = check_smoke(run_dir)
                (out / "smoke.json").write_text(json.dumps(smoke, indent=2))
                record["json"] = "smoke.json"
                if not smoke["ok"]:
                    record["status"] = "failed"
                    record["output_tail"] = ("run not finished" if not smoke["finished"] else
                                             f"non-finite numbers: {smoke['nonfinite']}")
                print(f"[gpu_check] smoke: finished {smoke['finished']}, all numbers finite "
                      f"{smoke['all_finite']}", flush=True)
            elif (out / f"{name}.json").exists():
                record["json"] = f"{name}.json"
            report["stages"][name] = record
            report["wall_s"] = time.perf_counter() - started
            report["ok"] = all(r["status"] == "ok" for r in report["stages"].values())
            (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    failed = [n for n, r in report["stages"].items() if r["status"] != "ok"]
    verdict = "FAILED: " + ", ".join(failed) if failed else "all stages passed"
    print(f"[gpu_check] {verdict} in {report['wall_s']:.0f} s; {out / 'gpu_check.json'}",
          flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
