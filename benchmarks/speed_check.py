"""The speed features on a device, one JSON: mixed-precision training, the automatic sampler
fast path, ``torchrun`` with NCCL on one GPU, and a hierarchical run. The ``speed`` stage of
``gpu_check.py``; on a CPU it is a dry run that skips the CUDA-only parts with a message.

Checks (each recorded as ``{"status": "ok" | "failed" | "skipped", ...}``):

- ``precision``: ``ncpvae train smoke`` (training only, 1 epoch) at ``train.precision`` fp32,
  bf16 and fp16: test ELBO, images/s and status each; on a CPU fp16 must be refused with a
  one-line error (recorded as ``refused``), bf16 runs where the CPU supports it;
- ``fast_path``: MALA ``run()`` on the benchmark MLP energy with ``fast_path="auto"`` at a size
  above the break-even (CUDA: 16,384 chains; compiled) and below it (eager), with the recorded
  mode, compile seconds, fallback and chain-steps/s; on a CPU (dry run) 256 chains x 20 steps
  with ``fast_path="compiled"`` vs ``"eager"`` instead (a full-size compiled run takes minutes);
- ``torchrun``: ``torchrun --standalone --nproc_per_node=1 -m ncpvae train smoke`` on CUDA
  (backend ``auto`` = NCCL): finished and finite; skipped without CUDA;
- ``hierarchical``: a smoke-sized run of the hierarchical VAE (2 groups) with hierarchical NCP:
  finished and finite, training images/s.

    python benchmarks/speed_check.py --device cpu --json /tmp/speed.json   # dry run
    python benchmarks/speed_check.py --device cuda --json speed.json
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
SMOKE = ["smoke", "--set", "evaluate.enabled=false", "--set", "train.epochs=1",
         "--set", "prior=gaussian"]


def _ncpvae(args: list[str], timeout: float, launcher: list[str] | None = None
            ) -> subprocess.CompletedProcess:
    cmd = [*(launcher or [sys.executable]), "-m", "ncpvae", *args, "--quiet"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE.parent)


def _train_record(proc: subprocess.CompletedProcess, run: Path) -> dict[str, Any]:
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        return {"status": "failed", "error": lines[-1] if lines else f"exit {proc.returncode}"}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r.get("stage") == "train"][-1]
    finite = all(math.isfinite(v) for v in (last["test_elbo"], last["train_loss"]))
    return {"status": "ok" if finite else "failed", "test_elbo": last["test_elbo"],
            "train_loss": last["train_loss"], "images_per_second": last["images_per_second"]}


def check_precision(device: str, tmp: Path, timeout: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for precision in ("fp32", "bf16", "fp16"):
        run = tmp / f"precision_{precision}"
        proc = _ncpvae(["train", *SMOKE, "--set", f"device={device}",
                        "--set", f"train.precision={precision}", "--out", str(run)], timeout)
        record = _train_record(proc, run)
        if record["status"] == "failed" and "train.precision" in record["error"]:
            # the hardware lacks it: a one-line configuration error is the expected answer
            record["status"] = "refused"
        out[precision] = record
    expected_refusal = {"fp16"} if device == "cpu" else set()
    out["status"] = "ok" if all(
        out[p]["status"] == ("refused" if p in expected_refusal else "ok")
        or (p == "bf16" and out[p]["status"] == "refused")
        for p in ("fp32", "bf16", "fp16")) else "failed"
    return out


def check_fast_path(device: str) -> dict[str, Any]:
    from bench_blackjax import build_energy
    from ncpvae_plugins.langevin import LangevinSampler

    from ncpvae.mcmc.fastpath.auto import COMPILE_BREAK_EVEN

    _, energy = build_energy(10, 256, 0, device)
    mala = LangevinSampler(step_size=0.01, metropolis=True)
    if device == "cpu":  # dry run: the explicit modes at a small size
        sizes = [(256, 20, "eager"), (256, 20, "compiled")]
    else:
        chains = 16384
        sizes = [(chains, 20, "auto"), (chains, math.ceil(COMPILE_BREAK_EVEN / chains), "auto")]
    rows = []
    for chains, steps, mode in sizes:
        z0 = torch.randn(chains, 10, generator=torch.Generator().manual_seed(1)).to(device)
        gen = torch.Generator(device=device).manual_seed(1)
        start = time.perf_counter()
        result = mala.run(energy, z0, steps, generator=gen, fast_path=mode, diagnose=False,
                          keep_info="summary", thin=steps)
        wall = time.perf_counter() - start
        record = result.diagnostics["fast_path"]
        rows.append({"chains": chains, "steps": steps, "requested": mode, **record,
                     "wall_s": wall, "chain_steps_per_s": chains * steps / wall,
                     "finite": bool(torch.isfinite(result.samples).all())})
    ok = all(r["finite"] for r in rows) and rows[-1]["mode"] == "compiled"
    return {"status": "ok" if ok else "failed", "break_even": COMPILE_BREAK_EVEN, "rows": rows}


def check_torchrun(device: str, tmp: Path, timeout: float) -> dict[str, Any]:
    if not device.startswith("cuda"):
        return {"status": "skipped", "reason": "torchrun with NCCL needs CUDA (dry run on cpu)"}
    torchrun = shutil.which("torchrun")
    launcher = ([torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"])
    run = tmp / "torchrun"
    proc = _ncpvae(["train", *SMOKE, "--set", "device=cuda", "--out", str(run)], timeout,
                   launcher=[*launcher, "--standalone", "--nproc_per_node=1"])
    record = _train_record(proc, run)
    record["backend"] = "nccl (auto on CUDA)"
    return record


def check_hierarchical(device: str, tmp: Path, timeout: float) -> dict[str, Any]:
    """A smoke-sized hierarchical run on ``device``: the ``hierarchical`` model (2 groups),
    ``hierarchical_elbo`` and ``hier_ncp`` (training and the per-group NCP fit): finished and
    finite, with the training images/s."""
    run = tmp / "hierarchical"
    proc = _ncpvae(["train", *SMOKE, "--set", f"device={device}",
                    "--set", "model.name=hierarchical", "--set", "model.groups=2",
                    "--set", "objective.name=hierarchical_elbo", "--set", "prior.name=hier_ncp",
                    "--out", str(run)], timeout)
    return {"model": "hierarchical", **_train_record(proc, run)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--timeout", type=float, default=300, help="per subprocess")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("speed_check: no CUDA device; pass --device cpu for the dry run", file=sys.stderr)
        return 2
    report: dict[str, Any] = {"device": args.device, "torch": torch.__version__}
    if args.device == "cpu":
        report["note"] = "CPU dry run: fp16, torchrun/NCCL and the full-size fast path skipped"
        print(f"speed_check: {report['note']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        checks = {"precision": lambda: check_precision(args.device, tmp, args.timeout),
                  "fast_path": lambda: check_fast_path(args.device),
                  "torchrun": lambda: check_torchrun(args.device, tmp, args.timeout),
                  "hierarchical": lambda: check_hierarchical(args.device, tmp, args.timeout)}
        for name, check in checks.items():
            start = time.perf_counter()
            try:
                record = check()
            except Exception as exc:  # noqa: BLE001 - one failed check must not cost the rest
                record = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:500]}
            record["check_wall_s"] = time.perf_counter() - start
            report[name] = record
            print(f"speed_check {name}: {record['status']}"
                  + (f" ({record['reason']})" if "reason" in record else ""), flush=True)
    report["ok"] = all(report[n]["status"] in ("ok", "skipped") for n in checks)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
