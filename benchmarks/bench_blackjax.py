"""MALA speed: ncpvae ``run()`` against a bare torch loop and BlackJAX, on the identical energy.

Energy (an NCP-like prior, issue 11): ``U(z) = |z|^2 / 2 - f(z)``, ``f`` an MLP
``D -> H -> H -> 1`` with SiLU (default D = 10, H = 256), random frozen weights drawn once by
torch from ``--seed``. The weights go to an ``.npz`` that the JAX side loads, so both sides
evaluate the same function (checked at start: energies and gradients at a few points).

Columns, in chain-steps per second (median over interleaved rounds: one call of each column per
round, in rotating order, so load changes hit every column alike):

- ``ncpvae``: ``LangevinSampler(step_size, metropolis=True).run(energy, z0, steps)`` with its
  default settings (every draw kept, per-step info, ESS/R-hat at the end);
- ``ncpvae lean``: the same with ``keep_info="summary"``, ``thin=steps``, ``diagnose=False``;
- ``ncpvae oneDNN``: defaults plus ``fast_linear=True`` (the opt-in oneDNN linear layers);
- ``ncpvae compiled``: defaults on a :class:`ncpvae.mcmc.fastpath.CompiledEnergy` (what
  ``compile_energy=True`` wraps; wrapped once per chain count, so compilation falls in the
  untimed warm-up round):
  the whole MALA step compiled as one graph around the energy's gradient;
- ``ncpvae compiled+oneDNN``: the same with ``CompiledEnergy(energy, fast_linear=True)`` (what
  ``compile_energy=True, fast_linear=True`` wraps): oneDNN matrix products inside the compiled
  function, Inductor's fused kernels between them;
- ``bare torch``: a hand-written autograd MALA loop (no checks, no info, final state only);
- ``blackjax``: ``blackjax.mala`` vmapped over chains inside ``lax.scan`` under ``jit``
  (positions and acceptance of every step returned, like ``run()``), compile time excluded.

``--threads 1`` holds both sides to one core: ``torch.set_num_threads(1)`` for torch, and for
the JAX worker the XLA flags plus the process pinned to one core (:class:`JaxWorker`; the flags
alone left JAX 0.10 on 1.8-1.9 cores of this machine; runs under ``taskset -c 0`` were pinned
already).

``--retain-freed-memory`` calls :func:`ncpvae.mcmc.fastpath.retain_freed_memory` first, which
fixes glibc's malloc thresholds for this process (every torch column then runs with them; the
compiled columns gain most). ncpvae never makes that call itself; without the flag every column
runs with glibc's defaults, as a user's process does.

JAX and BlackJAX are not project dependencies: they live in a separate environment, e.g.::

    python3 -m venv /work/bench-venv && /work/bench-venv/bin/pip install jax blackjax numpy

and run there in a worker process (``--jax-python``, default ``/work/bench-venv/bin/python``
when it exists). Without them the JAX column is skipped with a message.

    .venv/bin/python benchmarks/bench_blackjax.py                 # 1 and 1024, 4096 chains
    .venv/bin/python benchmarks/bench_blackjax.py --quick         # smoke run
    .venv/bin/python benchmarks/bench_blackjax.py --threads 1 --json out.json
    .venv/bin/python benchmarks/bench_blackjax.py --device cuda    # torch side on a GPU

``--device cuda`` runs the torch columns on the GPU (energy, chains and generators there; each
timed call ends with ``torch.cuda.synchronize()``) and skips the BlackJAX column (its worker is
CPU-only here), as does ``--no-jax``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from ncpvae_plugins.langevin import LangevinSampler
from torch import Tensor, nn

from ncpvae.mcmc.fastpath import CompiledEnergy, retain_freed_memory

DEFAULT_JAX_PYTHON = "/work/bench-venv/bin/python"

# ----------------------------------------------------------------------------------------------
# the JAX worker (runs in the benchmark environment; reads commands on stdin, one JSON a line)

JAX_WORKER = r'''
import json, os, sys, time
import numpy as np
try:
    import jax, jax.numpy as jnp, blackjax
except Exception as exc:  # reported to the parent, which skips the column
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
    sys.exit(0)
w = np.load(sys.argv[1])
params = [jnp.asarray(w[k]) for k in ("w1", "b1", "w2", "b2", "w3", "b3")]

def energy(z):  # one chain (D,) -> scalar; torch Linear: y = x W^T + b
    w1, b1, w2, b2, w3, b3 = params
    h = jax.nn.silu(z @ w1.T + b1)
    h = jax.nn.silu(h @ w2.T + b2)
    return 0.5 * jnp.sum(z * z) - (h @ w3.T + b3)[0]

logdensity = lambda z: -energy(z)
check = jax.jit(jax.vmap(jax.value_and_grad(energy)))
cache = {}

def runner(chains, steps, step_size):
    key = (chains, steps, step_size)
    if key not in cache:
        mala = blackjax.mala(logdensity, step_size)

        @jax.jit
        def run(rng, z0):
            states = jax.vmap(mala.init)(z0)
            def body(states, k):
                states, info = jax.vmap(mala.step)(jax.random.split(k, chains), states)
                return states, (states.position, info.acceptance_rate)
            return jax.lax.scan(body, states, jax.random.split(rng, steps))
        cache[key] = run
    return cache[key]

print(json.dumps({"ready": jax.__version__, "blackjax": blackjax.__version__,
                  "devices": str(jax.devices())}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "check":
        u, g = check(jnp.asarray(np.asarray(cmd["z"], dtype=np.float32)))
        print(json.dumps({"u": np.asarray(u).tolist(), "g": np.asarray(g).tolist()}), flush=True)
    elif cmd["op"] == "run":
        run = runner(cmd["chains"], cmd["steps"], cmd["step_size"])
        z0 = jnp.asarray(np.asarray(cmd["z0"], dtype=np.float32))
        rng = jax.random.PRNGKey(cmd["seed"])
        start, cpu_start = time.perf_counter(), time.process_time()
        out = run(rng, z0)
        jax.block_until_ready(out)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        accept = float(np.asarray(out[1][1]).mean())
        print(json.dumps({"seconds": elapsed, "cpu_seconds": cpu, "acceptance": accept}),
              flush=True)
'''


def one_core() -> set[int] | None:
    """The core a one-thread comparison runs on (the lowest this process may use), or None
    where the platform cannot pin processes."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    return {min(os.sched_getaffinity(0))}


class JaxWorker:
    """A BlackJAX process in the benchmark environment, driven over pipes.

    With ``threads == 1`` the worker is pinned to one core (its affinity set before ``exec``,
    so every thread XLA starts inherits it). The XLA flags alone do not hold it to one: JAX
    0.10's CPU client used 1.8-1.9 cores of this 2-core machine with
    ``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1`` (process CPU time /
    wall time over 100 jitted GEMMs). Tables taken under ``taskset -c 0`` (docs/results.md)
    were pinned already; ``bench_defaults.py``'s earlier tables, run without it, pitted one
    torch thread against two cores. Each run reports its CPU seconds, so the tables show the
    cores used.
    """

    def __init__(self, python: str, weights: Path, threads: int):
        env = dict(os.environ)
        preexec = None
        if threads == 1:  # one XLA thread, like torch.set_num_threads(1)
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                "intra_op_parallelism_threads=1").strip()
            core = one_core()
            if core is not None:
                preexec = functools.partial(os.sched_setaffinity, 0, core)
        env["JAX_PLATFORMS"] = "cpu"
        try:
            self.proc = subprocess.Popen([python, "-c", JAX_WORKER, str(weights)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                         env=env, preexec_fn=preexec)
        except OSError as exc:
            self.proc = None
            self.hello = {"error": f"cannot start {python}: {exc.strerror}"}
            return
        self.hello = json.loads(self.proc.stdout.readline() or '{"error": "no answer"}')

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


# ----------------------------------------------------------------------------------------------
# the torch side


def build_energy(dim: int, hidden: int, seed: int, device: str | torch.device = "cpu"
                 ) -> tuple[nn.Module, callable]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                        nn.Linear(hidden, 1)).to(device)
    net.requires_grad_(False)
    net.eval()

    def energy(z: Tensor) -> Tensor:
        return 0.5 * (z * z).sum(-1) - net(z).squeeze(-1)

    return net, energy


def save_weights(net: nn.Module, path: Path) -> None:
    linears = [m for m in net if isinstance(m, nn.Linear)]
    arrays = {}
    for i, layer in enumerate(linears, 1):
        arrays[f"w{i}"] = layer.weight.detach().cpu().numpy()
        arrays[f"b{i}"] = layer.bias.detach().cpu().numpy()
    np.savez(path, **arrays)


def bare_mala(energy, z: Tensor, steps: int, step_size: float, gen: torch.Generator) -> Tensor:
    """The floor: a hand-written autograd MALA loop (final state only, no checks)."""

    def energy_grad(x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.detach().requires_grad_(True)
        u = energy(x)
        (g,) = torch.autograd.grad(u.sum(), x)
        return u.detach(), g

    u, g = energy_grad(z)
    scale = math.sqrt(2 * step_size)
    for _ in range(steps):
        xi = torch.randn(z.shape, generator=gen, device=z.device)
        prop = z - step_size * g + scale * xi
        up, gp = energy_grad(prop)
        r = z - prop + step_size * gp
        log_alpha = u - up - (r * r).sum(-1) / (4 * step_size) + 0.5 * (xi * xi).sum(-1)
        accept = torch.log(torch.rand(u.shape, generator=gen, device=u.device)) < log_alpha
        z = torch.where(accept[:, None], prop, z)
        u = torch.where(accept, up, u)
        g = torch.where(accept[:, None], gp, g)
    return z


def measure(chains: int, args, energy, jax: JaxWorker | None) -> dict:
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(1)
    z0 = torch.randn(chains, args.dim, generator=torch.Generator().manual_seed(1)).to(device)
    steps = args.steps if chains > 1 else args.steps_one
    mala = LangevinSampler(step_size=args.step_size, metropolis=True)
    compiled = CompiledEnergy(energy)
    compiled_fast = CompiledEnergy(energy, fast_linear=True)
    fns = {
        "ncpvae": lambda: mala.run(energy, z0, steps, generator=gen),
        "ncpvae_lean": lambda: mala.run(energy, z0, steps, generator=gen, thin=steps,
                                        keep_info="summary", diagnose=False),
        "ncpvae_fast": lambda: mala.run(energy, z0, steps, generator=gen, fast_linear=True),
        "ncpvae_compiled": lambda: mala.run(compiled, z0, steps, generator=gen),
        "ncpvae_compiled_fast": lambda: mala.run(compiled_fast, z0, steps, generator=gen),
        "bare_torch": lambda: bare_mala(energy, z0, steps, args.step_size, gen),
    }
    if jax is not None:
        z0_list = z0.tolist()
        jax.ask(op="run", chains=chains, steps=steps, step_size=args.step_size, z0=z0_list,
                seed=0)  # compile once, untimed

        def run_jax() -> float:
            return jax.ask(op="run", chains=chains, steps=steps, step_size=args.step_size,
                           z0=z0_list, seed=len(times["blackjax"]))["seconds"]

        fns["blackjax"] = run_jax
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for round_ in range(args.warmup + args.repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            out = fns[name]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = out if isinstance(out, float) else time.perf_counter() - start
            if round_ >= args.warmup:
                times[name].append(elapsed)
    row = {"chains": chains, "steps": steps, "times_s": times}
    for name, values in times.items():
        row[f"{name}_chain_steps_per_s"] = chains * steps / statistics.median(values)
        row[f"{name}_us_per_step"] = 1e6 * statistics.median(values) / steps

    def speed(a: str, b: str) -> float:  # median over rounds of (time b / time a)
        return statistics.median(tb / ta for ta, tb in zip(times[a], times[b]))

    row["ncpvae_vs_bare"] = speed("ncpvae", "bare_torch")
    row["lean_vs_bare"] = speed("ncpvae_lean", "bare_torch")
    row["fast_vs_bare"] = speed("ncpvae_fast", "bare_torch")
    row["compiled_vs_bare"] = speed("ncpvae_compiled", "bare_torch")
    row["compiled_fast_vs_bare"] = speed("ncpvae_compiled_fast", "bare_torch")
    if jax is not None:
        row["compiled_vs_blackjax"] = speed("ncpvae_compiled", "blackjax")
        row["compiled_fast_vs_blackjax"] = speed("ncpvae_compiled_fast", "blackjax")
        row["fast_vs_blackjax"] = speed("ncpvae_fast", "blackjax")
        row["ncpvae_vs_blackjax"] = speed("ncpvae", "blackjax")
        row["lean_vs_blackjax"] = speed("ncpvae_lean", "blackjax")
    return row


def check_same_energy(energy, jax: JaxWorker, dim: int) -> float:
    z = torch.randn(16, dim, generator=torch.Generator().manual_seed(3))
    x = z.detach().requires_grad_(True)
    u = energy(x)
    (g,) = torch.autograd.grad(u.sum(), x)
    answer = jax.ask(op="check", z=z.tolist())
    du = (torch.tensor(answer["u"]) - u.detach()).abs().max().item()
    dg = (torch.tensor(answer["g"]) - g).abs().max().item()
    return max(du, dg)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chains", default="1,1024,4096")
    parser.add_argument("--dim", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100, help="steps per call (chains > 1)")
    parser.add_argument("--steps-one", type=int, default=500, help="steps per call at 1 chain")
    parser.add_argument("--step-size", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch and XLA threads (0: default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jax-python", default=None,
                        help=f"python of the JAX/BlackJAX environment (default "
                             f"{DEFAULT_JAX_PYTHON} if present, else this interpreter)")
    parser.add_argument("--device", default="cpu", help="device of the torch columns: cpu or "
                        "cuda[:N] (cuda skips the BlackJAX column)")
    parser.add_argument("--no-jax", action="store_true", help="skip the BlackJAX column")
    parser.add_argument("--retain-freed-memory", action="store_true",
                        help="call ncpvae.mcmc.fastpath.retain_freed_memory() first "
                             "(process-wide glibc malloc thresholds)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available")
    if args.quick:
        args.chains, args.steps, args.steps_one, args.repeats = "1,256", 10, 20, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.retain_freed_memory and not retain_freed_memory():
        parser.error("--retain-freed-memory: not glibc, or a MALLOC_*_ variable is set")

    net, energy = build_energy(args.dim, args.hidden, args.seed, args.device)
    python = args.jax_python or (DEFAULT_JAX_PYTHON if Path(DEFAULT_JAX_PYTHON).exists()
                                 else sys.executable)
    jax = None
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.npz"
        save_weights(net, weights)
        worker = None
        if args.no_jax or args.device != "cpu":
            notes.append("BlackJAX column skipped: " + ("--no-jax" if args.no_jax else
                         f"torch runs on {args.device}, the JAX worker on the CPU"))
        else:
            worker = JaxWorker(python, weights, args.threads)
        if worker is not None and "error" in worker.hello:
            notes.append(f"BlackJAX column skipped: JAX/BlackJAX not importable with {python} "
                         f"({worker.hello['error']}); install them in a separate environment "
                         f"(see the module docstring)")
            worker.close()
        elif worker is not None:
            jax = worker
            gap = check_same_energy(energy, jax, args.dim)
            notes.append(f"JAX {worker.hello['ready']}, BlackJAX {worker.hello['blackjax']}; "
                         f"same energy: max |difference| of U and grad U at 16 points = {gap:.1e}")
        try:
            start = time.perf_counter()
            rows = [measure(int(c), args, energy, jax) for c in args.chains.split(",")]
            wall = time.perf_counter() - start
        finally:
            if jax is not None:
                jax.close()

    header = (f"MALA on U(z) = |z|^2/2 - MLP(z) (D={args.dim}, {args.dim}-{args.hidden}-"
              f"{args.hidden}-1 SiLU, float32), step size {args.step_size}; median of "
              f"{args.repeats} interleaved rounds; torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, {platform.machine()}, malloc thresholds "
              f"{'retained' if args.retain_freed_memory else 'glibc default'}, load average "
              f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}.")
    lines = [header, *notes, "",
             "| chains | steps | ncpvae run() | run() lean | run() oneDNN | run() compiled "
             "| run() compiled+oneDNN | bare torch | BlackJAX | run()/bare | lean/bare "
             "| oneDNN/bare | compiled/bare | compiled+oneDNN/bare | run()/BlackJAX "
             "| lean/BlackJAX | oneDNN/BlackJAX | compiled/BlackJAX | compiled+oneDNN/BlackJAX |",
             "|" + "---:|" * 19]
    for r in rows:
        jx = r.get("blackjax_chain_steps_per_s")
        def vs_jax(key: str, r=r, jx=jx) -> str:
            return "-" if jx is None else f"{r[key]:.2f}x"

        lines.append(
            f"| {r['chains']} | {r['steps']} | {r['ncpvae_chain_steps_per_s']:,.0f} "
            f"| {r['ncpvae_lean_chain_steps_per_s']:,.0f} | {r['ncpvae_fast_chain_steps_per_s']:,.0f} "
            f"| {r['ncpvae_compiled_chain_steps_per_s']:,.0f} "
            f"| {r['ncpvae_compiled_fast_chain_steps_per_s']:,.0f} "
            f"| {r['bare_torch_chain_steps_per_s']:,.0f} | {'-' if jx is None else f'{jx:,.0f}'} "
            f"| {r['ncpvae_vs_bare']:.2f}x | {r['lean_vs_bare']:.2f}x | {r['fast_vs_bare']:.2f}x "
            f"| {r['compiled_vs_bare']:.2f}x | {r['compiled_fast_vs_bare']:.2f}x "
            f"| {vs_jax('ncpvae_vs_blackjax')} | {vs_jax('lean_vs_blackjax')} "
            f"| {vs_jax('fast_vs_blackjax')} | {vs_jax('compiled_vs_blackjax')} "
            f"| {vs_jax('compiled_fast_vs_blackjax')} |")
    lines += ["", "Rates in chain-steps/s; ratios are speeds (higher: ncpvae faster), medians of "
              "per-round ratios. At 1 chain, us/step: " + ", ".join(
                  f"{k}: {r[k + '_us_per_step']:.0f}" for r in rows if r["chains"] == 1
                  for k in ("ncpvae", "ncpvae_lean", "ncpvae_fast", "ncpvae_compiled",
                            "ncpvae_compiled_fast", "bare_torch", "blackjax")
                  if k + "_us_per_step" in r),
              f"Total benchmark time: {wall:.0f} s."]
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows, "notes": notes, "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "loadavg": os.getloadavg(),
                       "wall_s": wall}, fh, indent=2)


if __name__ == "__main__":
    main()
