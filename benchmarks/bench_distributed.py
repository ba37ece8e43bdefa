"""Wall time of one run on 1 process (plain ``python -m ncpvae``) and on N processes
(``torchrun --standalone --nproc_per_node=N -m ncpvae``), with the final ELBOs of both.

Each run is a fresh ``ncpvae train CONFIG`` into a temporary directory; the wall time includes
process start-up and imports (what a user waits for). On a CPU shared with other jobs the times
are noisy: run it on an idle machine for numbers to quote, and read them as a ratio.

    python benchmarks/bench_distributed.py                          # smoke config, 1 vs 2
    python benchmarks/bench_distributed.py --config smoke --nproc 2 --set train.epochs=1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one_run(config: str, out: Path, nproc: int, overrides: list[str]) -> dict:
    """Train ``config`` into ``out`` on ``nproc`` processes (0: no torchrun); wall time, ELBOs."""
    args = ["-m", "ncpvae", "train", config, "--out", str(out), "--quiet"]
    for item in overrides:
        args += ["--set", item]
    if nproc:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={nproc}", *args]
    else:
        command = [sys.executable, *args]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r.get("stage") == "train"][-1]
    return {"processes": max(nproc, 1), "torchrun": bool(nproc), "wall_seconds": round(wall, 2),
            "train_elbo": last.get("train_elbo"), "test_elbo": last.get("test_elbo")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="smoke")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [one_run(args.config, Path(tmp) / "one", 0, args.overrides),
                one_run(args.config, Path(tmp) / "many", args.nproc, args.overrides)]
    one, many = rows
    for key in ("train_elbo", "test_elbo"):
        if one[key] is not None and many[key] is not None:
            many[f"{key}_relative_difference"] = abs(many[key] - one[key]) / abs(one[key])
    print(json.dumps({"config": args.config, "overrides": args.overrides,
                      "cpu_count": os.cpu_count(), "runs": rows,
                      "speedup": round(one["wall_seconds"] / many["wall_seconds"], 3)}, indent=2))


if __name__ == "__main__":
    main()
