"""Distributed helpers (``ncpvae.run.distributed``, ``ncpvae.sharding``) on CPU with gloo.

Multi-process tests start 2 processes with ``torch.multiprocessing`` and the environment torchrun
would set (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); each
process writes what it saw to a JSON file that the test reads.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from ncpvae import reparameterize
from ncpvae.errors import ConfigError, DataError
from ncpvae.run import distributed
from ncpvae.run.distributed import DistContext, DistributedConfig, DistributedError
from ncpvae.sharding import (
    current_row_shard,
    global_batch_mean,
    randint_rows,
    randn_rows,
    row_shard,
)

# --------------------------------------------------------------------------------------------
# one process: sharding arithmetic and the row-shard noise


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("total", [1, 7, 8, 64, 65])
def test_shards_are_disjoint_contiguous_and_cover_the_batch(world: int, total: int):
    index = torch.randperm(total, generator=torch.Generator().manual_seed(total))
    parts = [DistContext(rank=r, world_size=world).shard(index) for r in range(world)]
    assert torch.equal(torch.cat(parts), index)  # rank order = batch order, nothing lost
    sizes = [len(p) for p in parts]
    assert sum(sizes) == total and max(sizes) - min(sizes) <= 1
    bounds = [DistContext(rank=r, world_size=world).shard_bounds(total) for r in range(world)]
    for (offset, rows), (next_offset, _) in zip(bounds, bounds[1:]):
        assert offset + rows == next_offset


@pytest.mark.parametrize("shape", [(10, 3), (4, 10, 3)])
def test_row_shard_noise_is_the_single_process_noise(shape: tuple[int, ...]):
    world, total = 3, shape[-2]
    full = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    parts = []
    for rank in range(world):
        offset, rows = DistContext(rank=rank, world_size=world).shard_bounds(total)
        local = list(shape)
        local[-2] = rows
        generator = torch.Generator().manual_seed(5)
        with row_shard(offset, rows, total):
            parts.append(randn_rows(local, generator=generator))
        # the generator advanced exactly as for the full draw
        assert torch.equal(torch.randn(2, generator=generator), _after(shape, 5))
    assert torch.equal(torch.cat(parts, dim=-2), full)


def _after(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    torch.randn(shape, generator=generator)
    return torch.randn(2, generator=generator)


def test_reparameterize_under_a_row_shard_keeps_its_rows():
    mu, logvar = torch.randn(6, 2), torch.randn(6, 2)
    torch.manual_seed(3)
    whole = reparameterize(mu, logvar)
    pieces = []
    for offset, rows in ((0, 4), (4, 2)):
        torch.manual_seed(3)  # every rank's global RNG is seeded alike
        with row_shard(offset, rows, 6):
            pieces.append(reparameterize(mu[offset:offset + rows], logvar[offset:offset + rows]))
    assert torch.equal(torch.cat(pieces), whole)
    assert current_row_shard() is None  # the context is restored


def test_row_shard_rejects_a_draw_without_the_batch_rows():
    with row_shard(0, 3, 6), pytest.raises(RuntimeError, match="3 of 6 rows"):
        randn_rows((5, 2))
    with pytest.raises(ValueError, match="invalid row shard"), row_shard(4, 3, 6):
        pass


def test_global_batch_mean_is_the_plain_mean_in_one_process():
    values = torch.randn(7, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(global_batch_mean(values, 0), values.mean(0))
    assert torch.equal(global_batch_mean(values[:, 0], 0), values[:, 0].mean())
    with row_shard(0, 7, 7):  # a shard holding the whole batch
        assert torch.equal(global_batch_mean(values, 0), values.mean(0))


def test_global_batch_mean_in_a_row_shard_sums_over_the_shards():
    """Two shards (4 + 3 rows) simulated in one process: the shard sums are added by the
    shard's ``sum_over_shards`` (an all-reduce on real ranks); value and gradient per row are
    those of the whole batch's mean. Without a way to sum over shards it is refused."""
    values = torch.randn(7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sums = [values[:4].sum(0), values[4:].sum(0)]
    for rank, (offset, rows) in enumerate(((0, 4), (4, 3))):
        mine = values[offset:offset + rows].clone().requires_grad_(True)
        other = sums[1 - rank]
        with row_shard(offset, rows, 7, sum_over_shards=lambda local, o=other: local + o):
            mean = global_batch_mean(mine, 0)
        assert torch.allclose(mean, values.mean(0), rtol=1e-14, atol=0)
        mean.sum().backward()
        assert torch.allclose(mine.grad, torch.full_like(mine, 1 / 7), rtol=1e-14, atol=0)
    with row_shard(0, 4, 7), pytest.raises(RuntimeError, match="no sum over the shards"):
        global_batch_mean(values[:4], 0)
    with row_shard(0, 4, 7, sum_over_shards=lambda t: t), pytest.raises(
            RuntimeError, match="4 of 7 rows"):
        global_batch_mean(values, 0)


def test_randint_rows_under_a_row_shard_keeps_its_rows():
    whole = torch.randint(40, (9, 5), generator=torch.Generator().manual_seed(1))
    parts = []
    for offset, rows in ((0, 5), (5, 4)):
        generator = torch.Generator().manual_seed(1)
        with row_shard(offset, rows, 9):
            parts.append(randint_rows(40, (rows, 5), dim=0, generator=generator))
    assert torch.equal(torch.cat(parts), whole)
    generator = torch.Generator().manual_seed(1)
    assert torch.equal(randint_rows(40, (9, 5), dim=0, generator=generator), whole)


def test_backend_and_device_choice():
    cpu = torch.device("cpu")
    assert distributed.resolve_backend("auto", cpu) == "gloo"
    assert distributed.resolve_backend("gloo", cpu) == "gloo"
    with pytest.raises(ConfigError, match="nccl.*needs CUDA"):
        distributed.resolve_backend("nccl", cpu)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            distributed.resolve_rank_device("cuda", 0, distributed=True)
        assert distributed.resolve_rank_device("auto", 1, distributed=True) == cpu
    with pytest.raises(Exception, match="greater than 0"):
        DistributedConfig(timeout_seconds=0)


def test_one_process_has_no_process_group(monkeypatch: pytest.MonkeyPatch):
    for name in distributed.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    ctx = distributed.setup("cpu")
    assert not ctx.enabled and ctx.is_main and ctx.world_size == 1
    assert not torch.distributed.is_initialized()
    block = torch.arange(5)
    assert ctx.gather_rows(block) is block
    assert ctx.all_reduce_sums({"a": 2.0}) == {"a": 2.0}
    with pytest.raises(DataError, match="boom"):
        ctx.agree(lambda: (_ for _ in ()).throw(DataError("boom")))
    assert ctx.main_only(lambda: 7) == 7


def test_a_partial_torchrun_environment_is_refused(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(DistributedError, match="WORLD_SIZE, LOCAL_RANK missing"):
        distributed.setup("cpu")


# --------------------------------------------------------------------------------------------
# two processes (gloo)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _scenario(ctx: DistContext, rank: int, scenario: str) -> dict:
    record: dict = {"backend": ctx.backend}
    start = time.perf_counter()
    try:
        if scenario == "collectives":
            index = torch.randperm(11, generator=torch.Generator().manual_seed(0))  # alike
            mine = ctx.shard(index)
            gathered = ctx.gather_rows(mine.unsqueeze(1).float() * 10)
            record["shard"] = mine.tolist()
            record["gathered"] = None if gathered is None else gathered.squeeze(1).tolist()
            record["index"] = index.tolist()
            record["sums"] = ctx.all_reduce_sums({"n": float(len(mine)), "r": float(rank)})
            record["objects"] = ctx.gather_objects({"rank": rank})
            record["broadcast"] = ctx.broadcast_object("from 0" if ctx.is_main else None)
        elif scenario == "chains":
            import ncpvae

            prior = ncpvae.create("prior", "gaussian", latent_dim=3)
            for fields in ({"metropolis": True, "adapt_step_size": True, "adapt_per_chain": True},
                           {"metropolis": False}):
                sampler = ncpvae.create("sampler", "langevin", latent_dim=3, num_steps=12,
                                        burn_in=4, thin=2, step_size=0.3, **fields)
                split = sampler.sample_prior(prior, 9, generator=torch.Generator().manual_seed(4),
                                             shards=ctx.shards)
                whole = sampler.sample_prior(prior, 9, generator=torch.Generator().manual_seed(4))
                record.setdefault("equal", []).append(
                    torch.equal(split.samples, whole.samples)
                    and all(torch.equal(split.info[k], whole.info[k]) for k in whole.info)
                    and split.diagnostics["ess"] == whole.diagnostics["ess"]
                    and split.diagnostics["acceptance"] == whole.diagnostics["acceptance"])
                record.setdefault("shape", []).append(list(split.samples.shape))
            record["split"] = sampler.shardable_chains and ctx.shards.world_size == 2
        elif scenario == "remedies":
            record.update(_remedies(ctx))
        elif scenario == "sgld_minibatch":
            record.update(_sgld_minibatch(ctx))
        elif scenario == "fail_on_rank_1":
            def setup_stage() -> str:
                if rank == 1:
                    raise DataError("data file '/only/rank1/x.npz' does not exist")
                return "ok"
            ctx.agree(setup_stage)
        elif scenario == "fail_on_main_only":
            def evaluate() -> None:
                raise ConfigError("evaluate.samplers[0]: bad")
            ctx.main_only(evaluate)
        elif scenario == "rank_1_vanishes":
            if rank == 1:  # never joins the collective below; waits for rank 0's report
                report = Path(os.environ[_OUT_ENV], "rank0.json")
                while not report.exists() and time.perf_counter() - start < 60:
                    time.sleep(0.05)
            else:
                ctx.barrier()
        record["passed"] = True
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        record["error"] = type(exc).__name__
        record["message"] = str(exc).splitlines()[0] if str(exc) else ""
        record["report"] = distributed.should_report(exc)
    return record


def _remedies(ctx: DistContext) -> dict:
    """Free bits and a capacity (nonlinear in the batch-mean KL) on 7 examples, 4 + 3 rows on
    two ranks under DDP, against the whole batch in this process (float64, same noise)."""
    import copy

    from ncpvae_plugins.beta_elbo import BetaELBO

    import ncpvae

    batch = torch.rand(7, 1, 4, 4, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)
    torch.manual_seed(0)
    template = ncpvae.create("model", "mlp", latent_dim=3, image_shape=(1, 4, 4),
                             hidden=[8]).double()
    prior = ncpvae.create("prior", "gaussian", latent_dim=3).double()
    with torch.no_grad():  # the exact per-example KL (B, D) of the initial model
        kl = prior.kl_from_gaussian(*template.encode(batch))
    _, first = DistContext(rank=0, world_size=2).shard_bounds(len(batch))  # rank 0's rows
    whole_mean, first_mean = kl.mean(0), kl[:first].mean(0)
    # the capacity and the free-bits level lie between the first shard's mean and the global
    # one, so a rank's own shard mean would give another loss and gradient (checked below)
    capacity = float(whole_mean.sum() + first_mean.sum()) / 2
    level = float(whole_mean[0] + first_mean[0]) / 2
    out: dict = {}
    for name, objective in (
            ("capacity", BetaELBO(capacity_max=capacity, capacity_steps=1, gamma=30.0)),
            ("free_bits", BetaELBO(free_bits=level, beta=2.0))):
        model, reference = copy.deepcopy(template), copy.deepcopy(template)
        torch.manual_seed(5)
        whole = objective.loss(batch, reference, prior, step=3)
        whole["loss"].backward()
        loss_fn = distributed.loss_function(ctx, model, prior, objective)
        torch.manual_seed(5)  # the same reparameterization noise (rows of the full draw)
        with ctx.sharded(len(batch)) as (offset, rows):
            local = loss_fn(batch[offset:offset + rows], 3)
        (local["loss"] * distributed.loss_weight(ctx, rows, len(batch))).backward()
        share = rows / len(batch)
        if name == "capacity":  # what the rank's shard mean alone would give
            naive = local["recon"] + 30.0 * (local["kl"] - capacity).abs()
        else:
            naive = local["recon"] + 2.0 * local["kl_per_dim"].clamp(min=level).sum()
        sums = ctx.all_reduce_sums({"loss": local["loss"].detach() * share,
                                    "naive": naive * share})
        errors = [float((p.grad - q.grad).abs().max() / q.grad.abs().max())
                  for p, q in zip(model.parameters(), reference.parameters())]
        out[name] = {"loss": sums["loss"], "whole": float(whole["loss"].detach()),
                     "naive": sums["naive"], "grad_error": max(errors)}
    return out


def _sgld_minibatch(ctx: DistContext) -> dict:
    """SGLD with a per-chain minibatch energy (Gaussian mean model, 40 data rows): 9 chains
    split 5 + 4 over two ranks against the 9 chains run whole here."""
    from ncpvae_plugins.sgld import MinibatchEnergy

    import ncpvae

    data = torch.randn(40, 2, generator=torch.Generator().manual_seed(2)) + 1.0

    def energy(seed: int) -> MinibatchEnergy:
        return MinibatchEnergy(lambda z, x: 0.5 * ((x - z.unsqueeze(1)) ** 2).sum(-1), data, 5,
                               prior_energy=lambda z: 0.5 * (z ** 2).sum(-1),
                               generator=torch.Generator().manual_seed(seed))

    sampler = ncpvae.create("sampler", "sgld", latent_dim=2, num_steps=15, burn_in=3, thin=2,
                            a=0.01)
    start = torch.randn(9, 2, generator=torch.Generator().manual_seed(3))
    block: set[int] = set()  # the chains this rank stepped (its block of the 9)
    split = sampler.run(energy(7), start, 15, burn_in=3, thin=2,
                        generator=torch.Generator().manual_seed(4), shards=ctx.shards,
                        callback=lambda t, state, info: block.add(state.position.shape[0]))
    whole = sampler.run(energy(7), start, 15, burn_in=3, thin=2,
                        generator=torch.Generator().manual_seed(4))
    return {"equal": torch.equal(split.samples, whole.samples)
            and all(torch.equal(split.info[k], whole.info[k]) for k in whole.info)
            and split.diagnostics["ess"] == whole.diagnostics["ess"],
            "shape": list(split.samples.shape), "block": sorted(block)}


#: the folder where every rank of :func:`_spawn` writes its records
_OUT_ENV = "NCPVAE_TEST_RANKS_OUT"


def _worker(rank: int, world: int, port: int, scenarios: list[str], out: str) -> None:
    """One rank: set torchrun's variables, join the group, run ``scenarios`` in order."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **{_OUT_ENV: out})
    torch.set_num_threads(1)
    ctx = distributed.setup("cpu", DistributedConfig(timeout_seconds=3.0, wait_seconds=20.0))
    records = {name: _scenario(ctx, rank, name) for name in scenarios}
    Path(out, f"rank{rank}.json").write_text(json.dumps(records))
    if "rank_1_vanishes" not in scenarios:
        distributed.teardown()


def _preload() -> None:
    """Load once, here, what every forked rank would otherwise load for itself: the plugins,
    and torch._dynamo (DistributedDataParallel's constructor imports it: ~7 s per process)."""
    import torch._dynamo  # noqa: F401

    import ncpvae

    # a forked rank must not inherit a process group (it joins its own)
    assert not torch.distributed.is_initialized(), "a test left a process group initialized"
    ncpvae.get_registry()


def _spawn(scenarios: list[str], tmp_path: Path, world: int = 2) -> list[dict]:
    """``world`` ranks forked from this process (torch and ncpvae already imported: a fresh
    interpreter per rank costs ~10 s of imports on the shared CPU) run ``scenarios``."""
    _preload()
    mp.start_processes(_worker, args=(world, _free_port(), scenarios, str(tmp_path)),
                       nprocs=world, join=True, start_method="fork")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """One 2-process group runs every scenario that leaves it usable (starting processes is
    the slow part on a shared CPU)."""
    names = ["collectives", "chains", "remedies", "sgld_minibatch", "fail_on_rank_1",
             "fail_on_main_only"]
    ranks = _spawn(names, tmp_path_factory.mktemp("two_ranks"))
    return {name: [r[name] for r in ranks] for name in names}


def test_two_ranks_shard_gather_and_reduce(two_ranks: dict[str, list[dict]]):
    r0, r1 = two_ranks["collectives"]
    assert r0["backend"] == r1["backend"] == "gloo"
    assert r0["index"] == r1["index"]  # one order generator seeded alike on both ranks
    assert set(r0["shard"]).isdisjoint(r1["shard"])
    assert r0["shard"] + r1["shard"] == r0["index"]  # contiguous parts, in rank order
    assert r0["gathered"] == [10.0 * i for i in r0["index"]] and r1["gathered"] is None
    assert r0["sums"] == r1["sums"] == {"n": 11.0, "r": 1.0}
    assert r0["objects"] == [{"rank": 0}, {"rank": 1}] and r1["objects"] is None
    assert r0["broadcast"] == r1["broadcast"] == "from 0"


def test_chains_split_across_ranks_equal_one_process(two_ranks: dict[str, list[dict]]):
    """9 chains as 5 + 4 on two ranks: samples, per-step info and diagnostics equal the
    one-process run with the same generator (MALA with per-chain adaptation, and ULA)."""
    for record in two_ranks["chains"]:
        assert "error" not in record, record.get("message")
        assert record["split"] and record["equal"] == [True, True]
        assert record["shape"] == [[4, 9, 3], [4, 9, 3]]


#: float64 loss and gradients, reduced in another order (shard sums all-reduced, DDP's average):
#: rounding ~1e-16 per operation over a few dozen operations; a rank using its own shard's mean
#: is off by the 'naive' margin asserted below (>= 1e-4 relative)
REMEDY_TOLERANCE = 1e-10


@pytest.mark.parametrize("remedy", ["capacity", "free_bits"])
def test_capacity_and_free_bits_use_the_global_batch_mean_under_ddp(
        two_ranks: dict[str, list[dict]], remedy: str):
    """Loss and gradients of 4 + 3 rows on two DDP ranks equal the 7-row single-process ones:
    the batch-mean KL of a capacity / free-bits term is all-reduced (differentiably)."""
    for record in two_ranks["remedies"]:
        assert "error" not in record, record.get("message")
        got = record[remedy]
        assert abs(got["loss"] - got["whole"]) <= REMEDY_TOLERANCE * abs(got["whole"])
        assert got["grad_error"] <= REMEDY_TOLERANCE
        # the test can fail: each rank's own shard mean gives another loss
        assert abs(got["naive"] - got["whole"]) > 1e-4 * abs(got["whole"])


def test_sgld_minibatch_chains_split_across_ranks_equal_one_process(
        two_ranks: dict[str, list[dict]]):
    """SGLD noise (the sampler's seam) and its per-chain minibatch indices
    (:func:`ncpvae.randint_rows`) are the single-process draws' rows on every rank."""
    for record in two_ranks["sgld_minibatch"]:
        assert "error" not in record, record.get("message")
        assert record["equal"] and record["shape"] == [6, 9, 2]
    assert [r["block"] for r in two_ranks["sgld_minibatch"]] == [[5], [4]]  # really split


def test_an_error_on_rank_1_stops_both_ranks_with_one_message(two_ranks: dict[str, list[dict]]):
    r0, r1 = two_ranks["fail_on_rank_1"]
    expected = "rank 1: data file '/only/rank1/x.npz' does not exist"
    assert r0["error"] == r1["error"] == "DataError"
    assert r0["message"] == r1["message"] == expected
    assert [r0["report"], r1["report"]] == [True, False]  # printed once, by rank 0
    # the agreed error reached both ranks in one exchange: a timeout would raise gloo's
    # RuntimeError ("Timed out waiting ...") instead of rank 1's DataError


def test_an_error_in_a_rank_0_only_step_reaches_every_rank(two_ranks: dict[str, list[dict]]):
    r0, r1 = two_ranks["fail_on_main_only"]
    assert r0["error"] == r1["error"] == "ConfigError"
    assert r0["message"] == r1["message"] == "rank 0: evaluate.samplers[0]: bad"


def test_a_rank_that_never_arrives_times_out_instead_of_hanging(tmp_path: Path):
    r0, r1 = _spawn(["rank_1_vanishes"], tmp_path)
    r0, r1 = r0["rank_1_vanishes"], r1["rank_1_vanishes"]
    # rank 0's collective ends with the group's timeout error (not a hang, not another error)
    assert r0["error"] == "RuntimeError" and "timed out" in r0["message"].lower(), r0
    assert r1["passed"]


# --------------------------------------------------------------------------------------------
# end to end: `torchrun -m ncpvae train` against one process


#: the smoke config without evaluation, 2 epochs (the killed-and-resumed test's reference)
SMOKE = ["--quiet", "--set", "evaluate.enabled=false", "--set", "train.epochs=2"]
ELBO_TOLERANCE = 1e-4


def _ncpvae_start(args: list[str], *, nproc: int = 0, env: dict[str, str] | None = None
                  ) -> subprocess.Popen:
    """Start ``python -m ncpvae ARGS`` (nproc 0) or ``torchrun --nproc_per_node=NPROC -m
    ncpvae ARGS`` (fresh interpreters: ~10 s of imports each, plus ~10 s for torchrun itself on
    the shared CPU); :func:`_finish` waits for it."""
    command = [sys.executable, "-m", "ncpvae", *args]
    if nproc:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={nproc}", *command[1:]]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env)


def _finish(process: subprocess.Popen, timeout: float = 400) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _in_process(args: list[str], *, env: dict[str, str] | None = None
                ) -> subprocess.CompletedProcess:
    """``ncpvae ARGS`` as one process, run inside this one (``ncpvae.cli.main``, one thread,
    torch's global RNG state restored): the code of ``python -m ncpvae ARGS`` without the
    interpreter start-up and imports (~10 s each on the shared 2-core CPU)."""
    from ncpvae.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = {key: os.environ.get(key) for key in (env or {})}
    threads = torch.get_num_threads()
    os.environ.update(env or {})
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 in the launched processes
    try:
        with torch.random.fork_rng(), contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            code = main(args)
    finally:
        torch.set_num_threads(threads)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def _forked_rank(rank: int, world: int, port: int, args: list[str], env: dict[str, str],
                 folder: str, kill: str | None) -> None:
    """One rank of :func:`_forked_ranks`: torchrun's variables, then ``ncpvae.cli.main`` (killed
    at the boundary ``kill``, see tests/helpers/kill_at.py)."""
    from helpers.kill_at import KillAt

    from ncpvae.cli import main
    from ncpvae.run import hooks

    code = 1
    try:
        os.environ.update({**env, "RANK": str(rank), "WORLD_SIZE": str(world),
                           "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        torch.set_num_threads(1)  # torchrun's OMP_NUM_THREADS=1
        with open(Path(folder, f"rank{rank}.out"), "w") as out, \
                open(Path(folder, f"rank{rank}.err"), "w") as err, \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                with hooks.boundary_callback(KillAt(kill)):
                    code = main(args)
            except BaseException:  # noqa: BLE001 - an unhandled error, as torchrun reports it
                import traceback

                traceback.print_exc()
                code = 1
    finally:
        os._exit(code)  # never run the parent's (pytest's) exit handlers


def _forked_ranks(args: list[str], *, nproc: int = 2, env: dict[str, str] | None = None,
                  kill: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """What ``torchrun --nproc_per_node=NPROC -m ncpvae ARGS`` runs, with the ranks forked from
    this process (torch.multiprocessing's fork context) with torchrun's environment (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) instead of started fresh:
    the same ``ncpvae.cli.main`` on every rank, without ~10 s of imports per process. As
    torchrun does, once a rank fails the others are stopped (SIGTERM). Returns the first failing
    rank's exit code (0 if none), the ranks' stdout and stderr joined in rank order."""
    import tempfile

    folder = tempfile.mkdtemp(prefix="ncpvae-ranks-")
    _preload()
    context = mp.get_context("fork")
    port = _free_port()
    procs = [context.Process(target=_forked_rank,
                             args=(rank, nproc, port, args, env or {}, folder, kill))
             for rank in range(nproc)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    while any(proc.is_alive() for proc in procs):
        if any(proc.exitcode not in (None, 0) for proc in procs) or time.monotonic() > deadline:
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()
        time.sleep(0.05)
    for proc in procs:
        proc.join()
    failed = [proc.exitcode for proc in procs if proc.exitcode != 0]
    if time.monotonic() > deadline:
        raise TimeoutError(f"{args} on {nproc} forked ranks ran past {timeout} s")

    def joined(suffix: str) -> str:
        return "".join(Path(folder, f"rank{r}.{suffix}").read_text() for r in range(nproc)
                       if Path(folder, f"rank{r}.{suffix}").exists())

    return subprocess.CompletedProcess(args, failed[0] if failed else 0, joined("out"),
                                       joined("err"))


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _train_records(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("stage") == "train"]


def _last_train_record(run: Path) -> dict:
    return _train_records(run)[-1]


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke config (2 epochs, no evaluation) on one process (in this one: the same code
    as ``python -m ncpvae train``) and on two (a real ``torchrun`` launch)."""
    root = tmp_path_factory.mktemp("smoke")
    launched = _ncpvae_start(["train", "smoke", "--out", str(root / "two"), *SMOKE], nproc=2,
                             env={distributed.DEBUG_SHARDS_ENV: str(root / "shards")})
    one = _in_process(["train", "smoke", "--out", str(root / "one"), *SMOKE])  # meanwhile
    two = _finish(launched)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("run written to") == 1  # rank 1 prints nothing
    return root


@pytest.mark.slow
def test_two_process_run_writes_the_files_of_a_one_process_run(smoke_runs: Path):
    assert _files(smoke_runs / "two") == _files(smoke_runs / "one")


@pytest.mark.slow
def test_two_process_elbo_equals_one_process_within_reduction_order(smoke_runs: Path):
    """Same global batches, same noise rows: only the float summation order differs (per-rank
    batch means recombined, DDP's gradient average). Float32 rounding is ~6e-8 relative per
    operation; after one epoch (8 Adam steps) the ELBOs differ by ~1e-7 and after two by
    ~2e-7, so 1e-4 relative is a loose bound that a wrong shard, a wrong noise row or a missing
    all-reduce (errors of order 1e-2 and more) cannot meet. Checked after each epoch."""
    ones, twos = _train_records(smoke_runs / "one"), _train_records(smoke_runs / "two")
    assert [r["epoch"] for r in ones] == [r["epoch"] for r in twos] == [1, 2]
    for one, two in zip(ones, twos):
        for key in ("train_elbo", "test_elbo", "train_kl", "test_kl"):
            assert abs(two[key] - one[key]) <= ELBO_TOLERANCE * abs(one[key]), key
        assert two["active_units"] == one["active_units"]


#: objective settings whose batch-level term is active in the smoke run (KL ~0.03 nats per
#: example, ~0.001-0.013 per dimension): the capacity term adds ~0.4 to the loss, the free-bits
#: floor binds on most dimensions. On this nearly collapsed model the shard means rarely straddle
#: the levels, so this end-to-end check guards the CLI path; that each rank uses the global mean
#: (and not its own) is asserted by the DDP loss/gradient test above
#: (test_capacity_and_free_bits_use_the_global_batch_mean_under_ddp), which can tell them apart.
REMEDIES = {
    "capacity": ["--set", "objective.capacity_max=0.03", "--set", "objective.capacity_steps=1",
                 "--set", "objective.gamma=100.0"],
    "free_bits": ["--set", "objective.free_bits=0.01"],
}


@pytest.mark.slow
@pytest.mark.parametrize("remedy", sorted(REMEDIES))
def test_two_process_training_with_capacity_or_free_bits_equals_one_process(
        tmp_path: Path, remedy: str):
    """One epoch of the smoke config with a capacity schedule / free bits: the 2-rank run (the
    ranks as torchrun starts them, forked) gives the 1-process ELBO and KL within the
    reduction-order tolerance of the plain ELBO test above (the batch-level term uses the global
    batch mean: :func:`ncpvae.global_batch_mean`)."""
    args = ["train", "smoke", "--quiet", "--set", "evaluate.enabled=false", "--set",
            "train.epochs=1", *REMEDIES[remedy]]
    one = _in_process([*args, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _forked_ranks([*args, "--out", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _last_train_record(tmp_path / "one"), _last_train_record(tmp_path / "two")
    for key in ("train_loss", "train_elbo", "test_elbo", "train_kl", "test_kl"):
        assert abs(b[key] - a[key]) <= ELBO_TOLERANCE * abs(a[key]), (key, a[key], b[key])


@pytest.mark.slow
def test_each_rank_saw_a_disjoint_part_of_every_epoch(smoke_runs: Path):
    ranks = [[json.loads(line) for line in (smoke_runs / "shards" / f"rank{r}.jsonl")
              .read_text().splitlines()] for r in range(2)]
    assert [[e["epoch"] for e in r] for r in ranks] == [[1, 2], [1, 2]]
    for epoch0, epoch1 in zip(*ranks):
        seen0, seen1 = set(epoch0["indices"]), set(epoch1["indices"])
        assert len(seen0) == len(epoch0["indices"]) and seen0.isdisjoint(seen1)
        assert len(seen0) == len(seen1) == 256 and seen0 | seen1 == set(range(512))
    assert ranks[0][0]["indices"] != ranks[0][1]["indices"]  # a new permutation each epoch


@pytest.mark.slow
def test_the_two_process_checkpoint_loads_in_one_process(smoke_runs: Path):
    from ncpvae.run.build import open_run

    state = torch.load(smoke_runs / "two" / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == 2
    run = open_run(smoke_runs / "two", quiet=True)
    assert not run.dist.enabled
    reference = torch.load(smoke_runs / "one" / "checkpoint.pt", weights_only=True)
    for key, value in reference["model"].items():
        assert torch.allclose(run.model.state_dict()[key], value, rtol=1e-3, atol=1e-5), key


@pytest.mark.slow
def test_a_data_file_missing_on_rank_1_stops_both_ranks_with_one_line(tmp_path: Path):
    """Each rank runs in its own folder; only rank 0's holds the (relative) data file."""
    for rank in (0, 1):
        (tmp_path / f"rank{rank}").mkdir()
    images = torch.randint(0, 255, (48, 1, 16, 16), dtype=torch.uint8).numpy()
    np.savez(tmp_path / "rank0" / "images.npz", images=images)
    (tmp_path / "bad.toml").write_text(
        'name = "bad"\ndevice = "cpu"\nlatent_dim = 2\n[data]\nname = "npz"\n'
        'path = "images.npz"\n[model]\nname = "mlp"\nhidden = [16]\n[train]\nepochs = 1\n'
        'batch_size = 16\neval_size = 16\n[evaluate]\nenabled = false\n')
    script = (f'cd "{tmp_path}/rank$RANK" && exec "{sys.executable}" -m ncpvae train '
              f'"{tmp_path}/bad.toml" --out "{tmp_path}/out" --quiet')
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "--no-python", "sh", "-c", script], capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "NCPVAE_DIST_TIMEOUT": "600"})
    assert done.returncode != 0
    # what the ranks print comes before torchrun's own failure report ("... elastic ...")
    ours = done.stderr.split("torch/distributed/elastic")[0].splitlines()
    ours = [line for line in ours if line.strip() and not line.startswith(("E1", "W1", "I1"))]
    assert len(ours) == 1, done.stderr[-3000:]
    assert ours[0].startswith("ncpvae train: error: rank 1: npz")
    assert "images.npz" in ours[0] and "not found" in ours[0]
    # the ranks end with the error status; torchrun may stop the slower one itself (SIGTERM)
    # once the first has exited, so it is not always listed as a failure of its own
    assert 1 <= done.stderr.count("exitcode  : 2") <= 2
    assert "exitcode  : 1" not in done.stderr  # no rank died of an unhandled exception
    # the agreed error ended both ranks: the 600 s collective timeout would have run past the
    # 300 s of subprocess.run (TimeoutExpired), and the one line above is rank 1's, not a timeout


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["langevin", "sgld"])
def test_two_process_sampling_equals_one_process(smoke_runs: Path, sampler: str):
    """`ncpvae sample` with 9 Langevin / SGLD chains: split 5 + 4 over two ranks and gathered
    on rank 0, the chains are the one-process chains (the same generator, the same noise rows:
    the sampler's ``_randn`` seam, which SGLD also draws its noise through)."""
    args = ["sample", str(smoke_runs / "one"), "--sampler", sampler, "--chains", "9",
            "--steps", "260", "--quiet"]  # the default burn-in is 250 steps
    one = _in_process([*args, "--out", str(smoke_runs / f"{sampler}_one")])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _forked_ranks([*args, "--out", str(smoke_runs / f"{sampler}_two")])
    assert two.returncode == 0, two.stderr[-3000:]
    a = torch.load(smoke_runs / f"{sampler}_one" / "latents.pt", weights_only=True)
    b = torch.load(smoke_runs / f"{sampler}_two" / "latents.pt", weights_only=True)
    assert a["samples"].shape == b["samples"].shape and a["samples"].shape[1:] == (9, 4)
    assert torch.equal(a["samples"], b["samples"]) and torch.equal(a["final"], b["final"])
    da = json.loads((smoke_runs / f"{sampler}_one" / "diagnostics.json").read_text())
    db = json.loads((smoke_runs / f"{sampler}_two" / "diagnostics.json").read_text())
    assert db["ess"] == da["ess"] and db["rhat"] == da["rhat"]


def test_resuming_with_another_world_size_is_refused():
    ctx = DistContext(rank=0, world_size=2)
    distributed.check_world_size(ctx, {"world_size": 2}, "'ckpt'")
    with pytest.raises(ConfigError, match="1 process.*has 2; resume it without torchrun"):
        distributed.check_world_size(ctx, {}, "'ckpt'")  # written by one process
    with pytest.raises(ConfigError, match="--nproc_per_node=2"):
        distributed.check_world_size(DistContext(), {"world_size": 2}, "'ckpt'")


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_on_two_processes_only(smoke_runs: Path,
                                                               tmp_path: Path):
    """Rank 0 is killed (SIGKILL) after the first epoch's checkpoint; rank 1 is then stopped
    (as torchrun does). `ncpvae resume` on one process is refused (another world size); on two
    it finishes with the numbers of the uninterrupted two-process smoke run (torchrun), bit for
    bit. (The ranks are forked with torchrun's environment, one thread each as under torchrun.)
    """
    killed = _forked_ranks(["train", "smoke", "--out", str(tmp_path / "run"), *SMOKE],
                           kill="1@epoch")
    assert killed.returncode != 0
    assert [r["epoch"] for r in _train_records(tmp_path / "run")] == [1]
    refused = _in_process(["resume", str(tmp_path / "run")])
    assert refused.returncode == 2
    assert "2 process(es) but this one has 1" in refused.stderr
    assert "--nproc_per_node=2" in refused.stderr
    resumed = _forked_ranks(["resume", str(tmp_path / "run"), "--quiet"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _last_train_record(tmp_path / "run"), _last_train_record(smoke_runs / "two")
    assert a["epoch"] == b["epoch"] == 2
    for key in ("train_elbo", "test_elbo", "train_kl", "test_kl"):
        assert a[key] == b[key], key  # same world size: the same reductions, bit for bit
