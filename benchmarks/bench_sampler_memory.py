"""Peak memory of ``Sampler.run()`` with many chains: full per-step info vs streamed info.

Each configuration runs in a fresh subprocess; the number reported is the growth of the peak
resident set size (``ru_maxrss``) over the process's size just before ``run()`` (after imports,
the energy and the starting points), i.e. what ``run()`` itself needed. On a GPU
(``--device cuda``) the growth of ``torch.cuda.max_memory_allocated`` over the memory allocated
before ``run()`` is reported as well (the peak statistics are reset just before the call).
MALA on the NCP-like energy of ``bench_blackjax.py`` (D = 10, MLP 10-256-256-1 SiLU, float32).

Modes:

- ``full``: defaults (``keep_info="full"``, ``thin=1``): every draw ``(S, C, D)`` and every
  step's info ``(num_steps, C)`` per field are kept, so memory grows with the number of steps;
- ``stream``: ``keep_info="summary"``, ``thin=num_steps`` (only the final draw), ``diagnose=False``:
  memory is the chains' state, one block of at most 64 steps of info and one autograd pass,
  independent of the number of steps;
- ``thinned``: as ``stream`` but every ``--thin``-th draw kept: on top of ``stream``, the kept
  draws ``ceil(num_steps / thin) x C x D x 4`` bytes, which grow with the steps by design.

The table ends with a least-squares line ``peak = a + b x steps`` per mode and its value at
``--extrapolate`` steps (default 10^4; not run), next to the exact size of the kept draws there.
Streamed info is reduced in blocks of ``min(64, 2^22 // chains)`` steps (41 at 10^5 chains), so
below that many steps the block itself still grows with the steps: for ``stream`` / ``thinned``
the line is fitted to the runs with at least a block of steps when two such runs exist.

glibc's malloc raises its mmap threshold dynamically after large frees, so the many short-lived
multi-MB tensors of a 10^5-chain run end up on the heap, fragment it, and the peak RSS keeps
creeping up by about 1 MB per step (measured with a quadratic energy in ``stream`` mode: +293,
+586, +1,696, +4,346 MB at 64, 256, 1,024, 4,096 steps) although nothing is kept. With
``MALLOC_MMAP_THRESHOLD_=131072`` in the environment (fixed threshold) the same runs are flat
(+145 MB at 256 and +148 MB at 1,024 steps); the children inherit the variable::

    MALLOC_MMAP_THRESHOLD_=131072 .venv/bin/python benchmarks/bench_sampler_memory.py \
        --steps 64,256 --modes stream

    .venv/bin/python benchmarks/bench_sampler_memory.py                    # 1e5 chains
    .venv/bin/python benchmarks/bench_sampler_memory.py --steps 16,64,256 --modes stream,thinned
    .venv/bin/python benchmarks/bench_sampler_memory.py --chains 20000 --steps 10,80
    .venv/bin/python benchmarks/bench_sampler_memory.py --device cuda --json mem_cuda.json
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

CHILD = r'''
import json, resource, sys, time
import torch
from torch import nn
from ncpvae_plugins.langevin import LangevinSampler
chains, steps, mode, threads = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
thin, device = int(sys.argv[5]), torch.device(sys.argv[6])
cuda = device.type == "cuda"
if threads:
    torch.set_num_threads(threads)
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(10, 256), nn.SiLU(), nn.Linear(256, 256), nn.SiLU(),
                    nn.Linear(256, 1)).to(device)
net.requires_grad_(False)
energy = lambda z: 0.5 * (z * z).sum(-1) - net(z).squeeze(-1)
z0 = torch.randn(chains, 10).to(device)
generator = torch.Generator(device=device).manual_seed(1)
if cuda:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    allocated_before = torch.cuda.memory_allocated(device)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
sampler = LangevinSampler(step_size=0.01, metropolis=True)
kw = {"full": {}, "stream": {"keep_info": "summary", "thin": steps, "diagnose": False},
      "thinned": {"keep_info": "summary", "thin": min(thin, steps), "diagnose": False}}[mode]
start = time.perf_counter()
result = sampler.run(energy, z0, steps, generator=generator, **kw)
if cuda:
    torch.cuda.synchronize(device)
wall = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
row = {"chains": chains, "steps": steps, "mode": mode, "thin": kw.get("thin", 1),
       "device": str(device), "rss_before_mb": before / 1024, "peak_rss_mb": peak / 1024,
       "peak_growth_mb": (peak - before) / 1024, "wall_s": wall,
       "samples_shape": list(result.samples.shape),
       "samples_mb": result.samples.numel() * result.samples.element_size() / 2**20,
       "acceptance_rate": result.diagnostics["acceptance_rate"]}
if cuda:
    row["cuda_peak_growth_mb"] = (torch.cuda.max_memory_allocated(device) - allocated_before) / 2**20
    row["gpu"] = torch.cuda.get_device_name(device)
print(json.dumps(row))
'''


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares ``(a, b)`` of ``y = a + b x`` (``b = 0`` with one distinct ``x``)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx > 0 else 0.0
    return my - b * mx, b


#: ncpvae.sampler's streamed-info block: at most this many steps and chain-steps
INFO_BLOCK_STEPS, INFO_BLOCK_CHAIN_STEPS = 64, 2**22


def extrapolate(rows: list[dict], key: str, target: int, chains: int, thin: int) -> list[dict]:
    """Per mode: the fitted line of ``key`` against steps and its value at ``target`` steps (at
    least the largest measured value), with the exact size (MB) of the draws that mode keeps at
    ``target`` steps."""
    out = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        points = [(r["steps"], r[key]) for r in rows if r["mode"] == mode and key in r]
        if not points:
            continue
        block = max(1, min(INFO_BLOCK_STEPS, INFO_BLOCK_CHAIN_STEPS // chains))
        full_blocks = [p for p in points if p[0] >= block]
        if mode != "full" and len(full_blocks) >= 2:
            points = full_blocks
        a, b = fit_line(points)
        kept = {"full": target, "stream": 1, "thinned": math.ceil(target / thin)}[mode]
        # a slope within noise can point down: never predict less than the largest measured peak
        predicted = max(a + b * target, max(y for _, y in points))
        out.append({"mode": mode, "measure": key, "fitted_steps": [x for x, _ in points],
                    "intercept_mb": a, "slope_mb_per_step": b,
                    "steps": target, "predicted_peak_growth_mb": predicted,
                    "draws_kept": kept, "draws_mb": kept * chains * 10 * 4 / 2**20})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chains", type=int, default=100_000)
    parser.add_argument("--steps", default="5,20", help="comma-separated step counts")
    parser.add_argument("--modes", default="full,stream", help="of full, stream, thinned")
    parser.add_argument("--thin", type=int, default=16, help="thinning of the 'thinned' mode")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--extrapolate", type=int, default=10_000,
                        help="steps to extrapolate the fitted peak to (not run)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    unknown = set(modes) - {"full", "stream", "thinned"}
    if unknown:
        parser.error(f"--modes: unknown mode(s) {', '.join(sorted(unknown))}; "
                     f"use full, stream, thinned")
    rows = []
    for steps in (int(s) for s in args.steps.split(",")):
        for mode in modes:
            out = subprocess.run([sys.executable, "-c", CHILD, str(args.chains), str(steps), mode,
                                  str(args.threads), str(args.thin), args.device],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"bench_sampler_memory: {mode} at {steps} steps failed:\n"
                         f"{out.stderr.strip()[-2000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    cuda = any("cuda_peak_growth_mb" in r for r in rows)
    fits = extrapolate(rows, "peak_growth_mb", args.extrapolate, args.chains, args.thin)
    if cuda:
        fits += extrapolate(rows, "cuda_peak_growth_mb", args.extrapolate, args.chains, args.thin)
    print()
    print("| chains | steps | mode | thin | kept draws (MB) | peak RSS growth during run() (MB) "
          "| process peak RSS (MB) "
          + ("| peak CUDA allocation growth (MB) " if cuda else "") + "| run() wall (s) |")
    print("|---:|---:|---|---:|---:|---:|---:|" + ("---:|" if cuda else "") + "---:|")
    for r in rows:
        print(f"| {r['chains']:,} | {r['steps']} | {r['mode']} | {r['thin']} "
              f"| {r['samples_mb']:,.0f} | {r['peak_growth_mb']:,.0f} | {r['peak_rss_mb']:,.0f} "
              + (f"| {r['cuda_peak_growth_mb']:,.0f} " if cuda else "")
              + f"| {r['wall_s']:.1f} |")
    print()
    print(f"Least-squares line over the measured steps, extrapolated to {args.extrapolate:,} "
          f"steps (not run):")
    for f in fits:
        print(f"- {f['mode']} ({f['measure']}, fitted on {f['fitted_steps']} steps): "
              f"{f['intercept_mb']:,.0f} MB + "
              f"{f['slope_mb_per_step']:.3f} MB/step -> {f['predicted_peak_growth_mb']:,.0f} MB "
              f"at {f['steps']:,} steps (of which kept draws: {f['draws_kept']:,} x "
              f"{args.chains:,} x 10 float32 = {f['draws_mb']:,.0f} MB)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows,
                                               "extrapolation": fits}, indent=2))


if __name__ == "__main__":
    main()
