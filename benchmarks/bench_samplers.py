"""Benchmark the Langevin samplers on an NCP-like energy.

Energy: ``U(z) = |z|^2 / 2 - f(z)`` (N(0, I) base prior reweighted by an MLP logit ``f``:
D -> 256 -> 256 -> 1 with SiLU, random frozen weights), as when sampling a fitted NCP prior.

Measured, in chain-steps per second (median over repeats, after warm-up):

- ``ula`` / ``mala``: the framework's ``LangevinSampler.run`` (everything included: state
  caching, finiteness checks, per-step info, kept draws, diagnostics at the end);
- ``bare``: a hand-written autograd ULA loop in the same process (one gradient per step, no
  bookkeeping), the floor the framework's overhead is measured against;
- ``per-chain loop``: the bare step applied to one chain at a time in a Python loop (the naive
  alternative to chains-as-batch), timed on a few chains and steps and normalized per chain-step.

Ratios: vectorized / per-chain loop (goal >= 10x at >= 1024 chains), framework overhead vs the
bare loop (goal <= 10 %), MALA step time / ULA step time (goal <= 1.3x); plus cost growth with
the latent size at 1024 chains.

    .venv/bin/python benchmarks/bench_samplers.py            # full run, a few minutes
    .venv/bin/python benchmarks/bench_samplers.py --quick    # smoke run, seconds
    .venv/bin/python benchmarks/bench_samplers.py --json bench.json
    .venv/bin/python benchmarks/bench_samplers.py --device cuda --chains 1,1024,16384,131072

With ``--device cuda`` the energy, the chains and the generators live on the GPU and every timed
call ends with ``torch.cuda.synchronize()`` (kernels are asynchronous).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from ncpvae_plugins.langevin import LangevinSampler
from torch import Tensor, nn

STEP_SIZE = 0.01


def ncp_like_energy(dim: int, hidden: int, dtype: torch.dtype, seed: int = 0,
                    device: str | torch.device = "cpu") -> Callable[[Tensor], Tensor]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                        nn.Linear(hidden, 1)).to(dtype=dtype, device=device)
    net.requires_grad_(False)  # a fitted prior is frozen while sampling
    net.eval()

    def energy(z: Tensor) -> Tensor:
        return 0.5 * (z * z).sum(-1) - net(z).squeeze(-1)

    return energy


def bare_ula(energy, z: Tensor, steps: int, generator: torch.Generator) -> Tensor:
    """The floor: a plain autograd ULA loop, no caching or checks."""
    noise_scale = math.sqrt(2 * STEP_SIZE)
    for _ in range(steps):
        z = z.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(energy(z).sum(), z)
        noise = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
        z = z.detach() - STEP_SIZE * grad + noise_scale * noise
    return z


def per_chain_loop(energy, z: Tensor, steps: int, generator: torch.Generator) -> Tensor:
    """The naive alternative: every chain stepped alone, one after the other."""
    return torch.cat([bare_ula(energy, z[c: c + 1], steps, generator) for c in range(z.shape[0])])


def sync(device: torch.device | None) -> None:
    """Wait for the device's queued kernels (a no-op on the CPU)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int,
                      device: torch.device | None = None) -> dict[str, list[float]]:
    """Seconds per call of each function, measured in rounds (one call of each per round, in a
    rotating order) so that a change in machine load hits every variant alike; ``warmup``
    rounds are discarded. On a GPU each call is timed from a synchronized start to a
    synchronized end."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for round_ in range(warmup + repeats):
        shift = round_ % len(names)  # rotate the order: no variant always runs first
        for name in names[shift:] + names[:shift]:
            fn = fns[name]
            sync(device)
            start = time.perf_counter()
            out = fn()
            sync(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
                if hasattr(out, "diagnostics"):  # a SampleResult: also its stepping-loop time
                    times.setdefault(f"{name}_loop", []).append(out.diagnostics["wall_time_s"])
    return times


def paired_median(num: list[float], den: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(num, den))


def measure(dim: int, chains: int, args, *, with_baselines: bool) -> dict:
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    energy = ncp_like_energy(dim, args.hidden, dtype, device=device)
    z0 = torch.randn(chains, dim, generator=torch.Generator().manual_seed(1), dtype=dtype).to(device)
    ula = LangevinSampler(step_size=STEP_SIZE)
    mala = LangevinSampler(step_size=STEP_SIZE, metropolis=True)
    steps = args.steps
    g = torch.Generator(device=device).manual_seed(2)
    fns = {
        "ula": lambda: ula.run(energy, z0, steps, generator=g),
        "mala": lambda: mala.run(energy, z0, steps, generator=g),
    }
    if with_baselines:
        fns["bare"] = lambda: bare_ula(energy, z0, steps, g)
    times = timed_interleaved(fns, args.repeats, args.warmup, device)
    row = {"dim": dim, "chains": chains, "steps": steps, "times_s": times}
    for name, values in times.items():
        t = statistics.median(values)
        row[f"{name}_chain_steps_per_s"] = chains * steps / t
        row[f"{name}_ms_per_step"] = 1e3 * t / steps
    row["mala_over_ula"] = paired_median(times["mala"], times["ula"])
    if with_baselines:
        row["overhead_vs_bare"] = paired_median(times["ula"], times["bare"]) - 1
        row["loop_overhead_vs_bare"] = paired_median(times["ula_loop"], times["bare"]) - 1
        loop_chains = min(chains, args.loop_chains)
        z_loop = z0[:loop_chains]
        loop = timed_interleaved({"loop": lambda: per_chain_loop(energy, z_loop, args.loop_steps,
                                                                  g)}, 1, 1, device)["loop"]
        row["loop_chain_steps_per_s"] = loop_chains * args.loop_steps / loop[0]
        row["vectorized_over_loop"] = row["ula_chain_steps_per_s"] / row["loop_chain_steps_per_s"]
    return row


def device_name(device: str) -> str:
    """``cpu``, or the GPU's name."""
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def markdown(rows: list[dict], dim_rows: list[dict], args, wall: float) -> str:
    out = [
        f"NCP-like energy: N(0, I) base + MLP logit ({args.dim} -> {args.hidden} -> {args.hidden}"
        f" -> 1, SiLU), {args.dtype}, {args.steps} steps per run (the framework's run also "
        f"evaluates the gradient once at init), median of {args.repeats} interleaved rounds "
        f"after {args.warmup} warm-up (ratios: medians of per-round ratios); "
        f"torch {torch.__version__}, {device_name(args.device)}, {torch.get_num_threads()} "
        f"threads, {platform.processor() or platform.machine()}, load average "
        f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}.",
        "",
        "| chains | ULA (framework) | MALA (framework) | bare ULA loop | per-chain loop "
        "| vectorized / loop | overhead vs bare: run() | : stepping loop | MALA / ULA |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['chains']} | {fmt_rate(r['ula_chain_steps_per_s'])} "
            f"| {fmt_rate(r['mala_chain_steps_per_s'])} | {fmt_rate(r['bare_chain_steps_per_s'])} "
            f"| {fmt_rate(r['loop_chain_steps_per_s'])} | {r['vectorized_over_loop']:.1f}x "
            f"| {100 * r['overhead_vs_bare']:+.1f} % | {100 * r['loop_overhead_vs_bare']:+.1f} % "
            f"| {r['mala_over_ula']:.2f}x |"
        )
    out += ["", "Rates in chain-steps per second. run(): the whole call (init, steps, per-step "
            "info, kept draws, ESS/R-hat at the end); stepping loop: init + steps only "
            "(diagnostics['wall_time_s']).", "",
            f"Cost growth with the latent size ({args.dim_chains} chains):", "",
            "| D | ULA chain-steps/s | MALA chain-steps/s | ULA ms/step | MALA ms/step |",
            "|---:|---:|---:|---:|---:|"]
    for r in dim_rows:
        out.append(f"| {r['dim']} | {fmt_rate(r['ula_chain_steps_per_s'])} "
                   f"| {fmt_rate(r['mala_chain_steps_per_s'])} | {r['ula_ms_per_step']:.2f} "
                   f"| {r['mala_ms_per_step']:.2f} |")
    big = [r for r in rows if r["chains"] >= 1024]
    if big:
        out += ["", "Goals (rows with >= 1024 chains):",
                f"- vectorized / per-chain loop >= 10x: min "
                f"{min(r['vectorized_over_loop'] for r in big):.0f}x",
                f"- framework overhead vs bare loop <= 10 %: max "
                f"{100 * max(r['overhead_vs_bare'] for r in big):+.1f} % for run(), "
                f"{100 * max(r['loop_overhead_vs_bare'] for r in big):+.1f} % for the stepping "
                f"loop",
                f"- MALA / ULA step time <= 1.3x: max {max(r['mala_over_ula'] for r in big):.2f}x"]
    out += ["", f"Total benchmark time: {wall:.0f} s."]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chains", default="1,16,256,1024,4096,16384",
                        help="comma-separated chain counts")
    parser.add_argument("--dims", default="2,10,50,100",
                        help="latent sizes for the cost-growth table")
    parser.add_argument("--dim", type=int, default=10, help="latent size of the main table")
    parser.add_argument("--dim-chains", type=int, default=1024,
                        help="chains for the cost-growth table")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument("--loop-chains", type=int, default=32,
                        help="chains timed in the per-chain loop (then normalized)")
    parser.add_argument("--loop-steps", type=int, default=5, help="steps per chain in the loop")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--json", default=None, help="also write the raw numbers here")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available")
    if args.quick:
        args.chains, args.dims, args.dim_chains = "1,16,256", "2,10", 256
        args.steps, args.repeats, args.warmup, args.loop_chains, args.loop_steps = 5, 1, 1, 4, 2
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    rows = [measure(args.dim, int(c), args, with_baselines=True) for c in args.chains.split(",")]
    dim_rows = [measure(int(d), args.dim_chains, args, with_baselines=False)
                for d in args.dims.split(",")]
    wall = time.perf_counter() - start
    print(markdown(rows, dim_rows, args, wall))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows, "dim_rows": dim_rows,
                       "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "device": device_name(args.device),
                       "loadavg": os.getloadavg(), "wall_s": wall}, fh, indent=2)


if __name__ == "__main__":
    main()
