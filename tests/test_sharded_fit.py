"""Data-parallel fits of learned priors under ``torchrun`` (2 processes, gloo, CPU): ncp, flow
and ebm (fresh ULA negatives with an energy penalty; persistent MALA chains).

``LearnedPrior.fit(..., shards=ShardGroup)`` (see :mod:`ncpvae.fitting`): every rank makes all
of the fit's random draws from an identically seeded generator, evaluates the network on its
contiguous rows of every minibatch and of the held-out set, and the gradients are summed over
the ranks. So the 2-process fit must be the 1-process fit up to float reduction order, with
every rank holding the same weights and taking the same early-stopping decision.

Tolerance, derived: the fits run in float64, so each gradient differs from the 1-process one
by the rounding of a differently ordered sum: relatively about ``n * 2**-53`` (``r ~ 1e-14``
for ``n`` ~ 100 terms), absolutely ``delta ~ 1e-14`` for summands of order one. An Adam step
moves a weight by ``lr * m / (sqrt(v) + eps)``; a relative gradient change ``r`` changes it by
at most ``lr * r``, but in a direction whose true gradient is zero (the EBM loss does not
depend on the output bias: it cancels between positives and negatives) the step is pure
rounding noise scaled by ``1 / eps``, at most ``lr * delta / eps`` (``eps = 1e-8``). Over ``T``
steps the weights can drift apart by at most ``T * lr * (r + delta / eps)``: with ``T <= 100``
steps and ``lr = 1e-2`` that is ``1e-6`` (measured: about ``2e-15`` for ncp and flow, ``1e-9``
for the EBM with persistent chains). A real difference in the data the ranks see (a wrong
shard, a gradient counted twice) moves weights by about ``lr = 1e-2`` per step, four orders of
magnitude more.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ncpvae

pytestmark = pytest.mark.slow

TOLERANCE = 1e-6

WORKER = r'''
import sys
import torch
import torch.distributed as dist
import ncpvae
sys.path.insert(0, sys.argv[2])
from sharded_fit_setup import fit_all

dist.init_process_group("gloo")
torch.set_num_threads(1)
shards = ncpvae.ShardGroup.from_process_group()
assert shards is not None and shards.world_size == 2
torch.save(fit_all(shards), f"{sys.argv[1]}/rank{dist.get_rank()}.pt")
dist.destroy_process_group()
'''

SETUP = r'''
import torch
import ncpvae


def data():
    g = torch.Generator().manual_seed(3)
    centers = torch.tensor([[1.5, 0.0], [-1.5, 0.5]], dtype=torch.float64)
    mu = centers[torch.randint(0, 2, (301,), generator=g)] + 0.3 * torch.randn(
        301, 2, generator=g, dtype=torch.float64)
    return mu, torch.full((301, 2), -3.0, dtype=torch.float64)


def fit_all(shards):
    """Fit ncp, flow and ebm priors (fresh ULA and persistent MALA negatives) in float64;
    record weights, history, summary and how
    many rows each network evaluated (forward hooks)."""
    mu, logvar = data()
    out = {}
    specs = {
        # min_steps=0: these few epochs are the budget (not the 2,000-step default)
        "ncp": dict(hidden=[16, 16], epochs=8, min_steps=0, batch_size=61, lr=1e-2,
                    patience=2, log_z_samples=1000),
        "flow": dict(flow_type="maf", transforms=1, hidden=[8], epochs=3, min_steps=0,
                     batch_size=61, lr=1e-2, patience=2),
        "ebm": dict(hidden=[16], epochs=3, min_steps=0, batch_size=61, lr=1e-2,
                    langevin_steps=3, heldout_log_z_samples=500, energy_l2=0.1),
        "ebm-pcd": dict(hidden=[16], epochs=2, min_steps=0, batch_size=61, lr=1e-2,
                        langevin_steps=3, heldout_log_z_samples=500, persistent=True,
                        reinit_fraction=0.3, metropolis=True),
    }
    for name, options in specs.items():
        prior = ncpvae.create("prior", name.split("-")[0], latent_dim=2, seed=5,
                              dtype=torch.float64, **options)
        net = prior.flow if name == "flow" else prior.classifier
        seen = [0]
        if name == "ncp":
            net.register_forward_hook(lambda m, args, result: seen.__setitem__(
                0, seen[0] + args[0].shape[0]))
        history = []
        summary = prior.fit(mu, logvar, generator=torch.Generator().manual_seed(7),
                            log=history.append, shards=shards)
        summary.pop("fit_seconds")
        out[name] = {"state": {k: v.clone() for k, v in prior.state_dict().items()},
                     "history": history, "summary": summary, "rows_seen": seen[0]}
    return out
'''


def _run_torchrun(tmp_path: Path) -> list[dict]:
    (tmp_path / "worker.py").write_text(WORKER)
    (tmp_path / "sharded_fit_setup.py").write_text(SETUP)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(tmp_path / "worker.py"), str(tmp_path), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _single_process(tmp_path: Path) -> dict:
    sys.path.insert(0, str(tmp_path))
    threads = torch.get_num_threads()
    try:
        import sharded_fit_setup

        torch.set_num_threads(1)
        return sharded_fit_setup.fit_all(None)
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(str(tmp_path))
        sys.modules.pop("sharded_fit_setup", None)


def test_two_process_fit_equals_the_one_process_fit(tmp_path: Path):
    ranks = _run_torchrun(tmp_path)
    single = _single_process(tmp_path)
    for name in ("ncp", "flow", "ebm", "ebm-pcd"):
        one, r0, r1 = single[name], ranks[0][name], ranks[1][name]
        # every rank holds the same weights and took the same early-stopping decision
        for key in r0["state"]:
            assert torch.equal(r0["state"][key], r1["state"][key]), (name, key)
        assert r0["history"] == r1["history"] and r0["summary"] == r1["summary"]
        # ... and that is the one-process fit, up to float reduction order
        assert list(r0["state"]) == list(one["state"])
        for key, value in one["state"].items():
            diff = (r0["state"][key].double() - value.double()).abs().max().item() if (
                value.numel()) else 0.0
            assert diff <= TOLERANCE, (name, key, diff)
        assert r0["summary"]["best_epoch"] == one["summary"]["best_epoch"]
        assert r0["summary"]["epochs_run"] == one["summary"]["epochs_run"]
        assert len(r0["history"]) == len(one["history"])
        for mine, theirs in zip(r0["history"], one["history"], strict=True):
            for key, value in theirs.items():
                assert mine[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (name, key)
    # the network's work was split: the ranks evaluated disjoint halves of the rows (apart
    # from the fit's 2-row output-shape probe, which every rank makes)
    seen = [ranks[r]["ncp"]["rows_seen"] - 2 for r in range(2)]
    total = single["ncp"]["rows_seen"] - 2
    assert sum(seen) == total and max(seen) - min(seen) <= total // 20, (seen, total)


def test_shard_group_without_a_process_group_is_none():
    assert ncpvae.ShardGroup.from_process_group() is None
    group = ncpvae.ShardGroup(rank=1, world_size=3)
    assert [ncpvae.ShardGroup(r, 3).bounds(10) for r in range(3)] == [(0, 4), (4, 3), (7, 3)]
    assert torch.equal(group.shard(torch.arange(10)), torch.arange(4, 7))
    with pytest.raises(ValueError, match="rank 3 of 3"):
        ncpvae.ShardGroup(rank=3, world_size=3)
