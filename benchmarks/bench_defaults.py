"""What every user gets: MALA ``run()`` with default settings against a bare torch loop and
BlackJAX, side by side in one process, at 1, 1,024, 4,096 and 16,384 chains.

The energy, the bare loop and the BlackJAX worker are those of ``bench_blackjax.py`` (the
benchmark MLP ``U(z) = |z|^2/2 - MLP(z)``, D = 10, 10-256-256-1 SiLU, float32; the same weights
on both sides, checked at start). Columns, per chain count:

- ``defaults``: ``LangevinSampler(step_size, metropolis=True).run(energy, z0, steps)`` with no
  other argument (``fast_path = "auto"``: eager below the break-even of
  :data:`ncpvae.mcmc.fastpath.auto.COMPILE_BREAK_EVEN` chain-steps, compiled from it on, the
  compilation counted in the call's time, as a user pays it); the mode it chose and its compile
  seconds are reported;
- ``bare``: the hand-written autograd MALA loop (final state only, no checks, no info);
- ``blackjax``: ``blackjax.mala`` vmapped over chains in ``lax.scan`` under ``jit``, compile
  time excluded (compiled once, untimed).

Interleaved rounds (one call of each column per round, the order rotating), a warm-up round,
medians of the times and of the per-round speed ratios. ``--threads 1`` (the default) holds
each side to one core (the JAX worker pinned, see ``bench_blackjax.JaxWorker``); the last
column, CPU seconds over wall seconds per call, shows the cores each side used. ``--steps``
are per call (chains > 1; ``--steps-one`` at 1 chain); ``--long`` gives every chain count
>= 1,024 enough steps to reach the break-even (``ceil(COMPILE_BREAK_EVEN /
chains)``), so the defaults column compiles.

    python benchmarks/bench_defaults.py --json benchmarks/results/defaults_cpu.json
    python benchmarks/bench_defaults.py --quick            # a smoke run (seconds)
    python benchmarks/bench_defaults.py --long --repeats 3 # the compiled side of the rule

JAX and BlackJAX live in a separate environment (``/work/bench-venv``, see ``bench_blackjax.py``);
without them the column is skipped with a message. Timings on a shared machine are labelled with
its load average; rerun on an idle machine for numbers to quote.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_blackjax import (
    DEFAULT_JAX_PYTHON,
    JaxWorker,
    bare_mala,
    build_energy,
    check_same_energy,
    save_weights,
)
from ncpvae_plugins.langevin import LangevinSampler

from ncpvae.mcmc.fastpath.auto import COMPILE_BREAK_EVEN

COLUMNS = ("defaults", "bare", "blackjax")


def steps_for(chains: int, args) -> int:
    if chains == 1:
        return args.steps_one
    return max(args.steps, math.ceil(COMPILE_BREAK_EVEN / chains)) if args.long else args.steps


def measure(chains: int, args, energy, jax: JaxWorker | None) -> dict:
    steps = steps_for(chains, args)
    z0 = torch.randn(chains, args.dim, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    mala = LangevinSampler(step_size=args.step_size, metropolis=True)
    records: list[dict] = []

    def defaults() -> None:
        records.append(mala.run(energy, z0, steps, generator=gen).diagnostics["fast_path"])

    fns = {"defaults": defaults,
           "bare": lambda: bare_mala(energy, z0, steps, args.step_size, gen)}
    if jax is not None:
        z0_list = z0.tolist()
        jax.ask(op="run", chains=chains, steps=steps, step_size=args.step_size, z0=z0_list,
                seed=0)  # compile once, untimed

        def run_jax() -> tuple[float, float]:
            out = jax.ask(op="run", chains=chains, steps=steps, step_size=args.step_size,
                          z0=z0_list, seed=len(times["blackjax"]))
            return out["seconds"], out["cpu_seconds"]

        fns["blackjax"] = run_jax
    times: dict[str, list[float]] = {name: [] for name in fns}
    cores: dict[str, list[float]] = {name: [] for name in fns}  # CPU seconds / wall seconds
    names = list(fns)
    for round_ in range(args.warmup + args.repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start, cpu_start = time.perf_counter(), time.process_time()
            out = fns[name]()
            elapsed, cpu = (out if isinstance(out, tuple) else
                            (time.perf_counter() - start, time.process_time() - cpu_start))
            if round_ >= args.warmup:
                times[name].append(elapsed)
                cores[name].append(cpu / elapsed)
    row: dict = {"chains": chains, "steps": steps, "times_s": times,
                 "cores_used": {name: statistics.median(v) for name, v in cores.items()},
                 "fast_path": records[-1]["mode"],
                 "compile_seconds": [r.get("compile_seconds", 0.0) for r in records]}
    for name, values in times.items():
        row[f"{name}_chain_steps_per_s"] = chains * steps / statistics.median(values)
    for other in names[1:]:  # speed of the defaults relative to each other column
        row[f"defaults_vs_{other}"] = statistics.median(
            t_other / t_def for t_def, t_other in zip(times["defaults"], times[other]))
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chains", default="1,1024,4096,16384")
    parser.add_argument("--dim", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40, help="steps per call (chains > 1)")
    parser.add_argument("--steps-one", type=int, default=300, help="steps per call at 1 chain")
    parser.add_argument("--long", action="store_true", help="steps up to the break-even "
                        "(chains >= 1,024), so the defaults compile")
    parser.add_argument("--step-size", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch and XLA threads "
                        "(0: the libraries' defaults)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jax-python", default=None)
    parser.add_argument("--no-jax", action="store_true")
    parser.add_argument("--quick", action="store_true", help="1 and 256 chains, 10 steps")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.chains, args.steps, args.steps_one, args.repeats = "1,256", 10, 20, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    net, energy = build_energy(args.dim, args.hidden, args.seed)
    python = args.jax_python or (DEFAULT_JAX_PYTHON if Path(DEFAULT_JAX_PYTHON).exists()
                                 else sys.executable)
    notes: list[str] = []
    jax = None
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.npz"
        save_weights(net, weights)
        if args.no_jax:
            notes.append("BlackJAX column skipped: --no-jax")
        else:
            worker = JaxWorker(python, weights, args.threads)
            if "error" in worker.hello:
                notes.append(f"BlackJAX column skipped: not importable with {python} "
                             f"({worker.hello['error']})")
                worker.close()
            else:
                jax = worker
                gap = check_same_energy(energy, jax, args.dim)
                notes.append(f"JAX {worker.hello['ready']}, BlackJAX {worker.hello['blackjax']}; "
                             f"same energy: max |difference| of U and grad U = {gap:.1e}")
        load_before = os.getloadavg()
        try:
            start = time.perf_counter()
            rows = [measure(int(c), args, energy, jax) for c in args.chains.split(",")]
            wall = time.perf_counter() - start
        finally:
            if jax is not None:
                jax.close()
    load = os.getloadavg()
    lines = [f"MALA, default run() vs bare loop vs BlackJAX (D={args.dim}, {args.dim}-"
             f"{args.hidden}-{args.hidden}-1 SiLU, float32, step size {args.step_size}); median "
             f"of {args.repeats} interleaved rounds; torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, {platform.machine()}; load average "
             f"{load_before[0]:.1f} before, {load[0]:.1f} after"
             + (" (UNDER LOAD: indicative only)" if max(load_before[0], load[0]) > 1.5 else ""),
             *notes, "",
             "| chains | steps | defaults mode | defaults | bare | BlackJAX | defaults/bare "
             "| defaults/BlackJAX | cores used: defaults / bare / BlackJAX |", "|" + "---:|" * 9]
    for r in rows:
        jx = r.get("blackjax_chain_steps_per_s")
        vs_jax = "-" if jx is None else f"{r['defaults_vs_blackjax']:.2f}x"
        lines.append(
            f"| {r['chains']:,} | {r['steps']:,} | {r['fast_path']} "
            f"| {r['defaults_chain_steps_per_s']:,.0f} | {r['bare_chain_steps_per_s']:,.0f} "
            f"| {'-' if jx is None else f'{jx:,.0f}'} | {r['defaults_vs_bare']:.2f}x "
            f"| {vs_jax} | {' / '.join(f'{c:.2f}' for c in r['cores_used'].values())} |")
    lines += ["", f"Rates in chain-steps/s; ratios are speeds (higher: defaults faster), medians "
              f"of per-round ratios. Break-even of fast_path='auto': {COMPILE_BREAK_EVEN:,} "
              f"chain-steps. Total time {wall:.0f} s."]
    print("\n".join(lines))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(
            {"args": vars(args), "rows": rows, "notes": notes, "torch": torch.__version__,
             "threads": torch.get_num_threads(), "loadavg_before": load_before,
             "loadavg_after": load, "under_load": max(load_before[0], load[0]) > 1.5,
             "break_even_chain_steps": COMPILE_BREAK_EVEN, "wall_s": wall}, indent=2))


if __name__ == "__main__":
    main()
