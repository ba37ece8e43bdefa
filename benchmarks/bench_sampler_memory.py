"""Peak memory of ``Sampler.run()`` with many chains: full per-step info vs streamed info.

Each configuration runs in a fresh subprocess; the number reported is the growth of the peak
resident set size (``ru_maxrss``) over the process's size just before ``run()`` (after imports,
the energy and the starting points), i.e. what ``run()`` itself needed. MALA on the NCP-like
energy of ``bench_blackjax.py`` (D = 10, MLP 10-256-256-1 SiLU, float32).

- ``full``: defaults (``keep_info="full"``, ``thin=1``): every draw ``(S, C, D)`` and every
  step's info ``(num_steps, C)`` per field are kept, so memory grows with the number of steps;
- ``stream``: ``keep_info="summary"``, ``thin=num_steps`` (only the final draw), ``diagnose=False``:
  memory is the chains' state, one block of at most 64 steps of info and one autograd pass,
  independent of the number of steps.

    .venv/bin/python benchmarks/bench_sampler_memory.py                    # 1e5 chains
    .venv/bin/python benchmarks/bench_sampler_memory.py --chains 20000 --steps 10,80
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r'''
import json, resource, sys, time
import torch
from torch import nn
from ncpvae.plugins.langevin import LangevinSampler
chains, steps, mode, threads = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
if threads:
    torch.set_num_threads(threads)
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(10, 256), nn.SiLU(), nn.Linear(256, 256), nn.SiLU(), nn.Linear(256, 1))
net.requires_grad_(False)
energy = lambda z: 0.5 * (z * z).sum(-1) - net(z).squeeze(-1)
z0 = torch.randn(chains, 10)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
sampler = LangevinSampler(step_size=0.01, metropolis=True)
kw = {} if mode == "full" else {"keep_info": "summary", "thin": steps, "diagnose": False}
start = time.perf_counter()
result = sampler.run(energy, z0, steps, generator=torch.Generator().manual_seed(1), **kw)
wall = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"chains": chains, "steps": steps, "mode": mode, "rss_before_mb": before / 1024,
                  "peak_growth_mb": (peak - before) / 1024, "wall_s": wall,
                  "samples_shape": list(result.samples.shape),
                  "acceptance_rate": result.diagnostics["acceptance_rate"]}))
'''


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chains", type=int, default=100_000)
    parser.add_argument("--steps", default="5,20", help="comma-separated step counts")
    parser.add_argument("--modes", default="full,stream")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = []
    for steps in (int(s) for s in args.steps.split(",")):
        for mode in args.modes.split(","):
            out = subprocess.run([sys.executable, "-c", CHILD, str(args.chains), str(steps), mode,
                                  str(args.threads)], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    print()
    print("| chains | steps | mode | peak RSS growth during run() (MB) | run() wall (s) |")
    print("|---:|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['chains']:,} | {r['steps']} | {r['mode']} | {r['peak_growth_mb']:,.0f} "
              f"| {r['wall_s']:.1f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
