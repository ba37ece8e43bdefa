"""The VAE's held-out numbers: test-set loss terms, KL per dimension and active units.

Used by the training stage (each epoch's record) and by the evaluation (its ``vae`` section),
so neither imports the other for it.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from ncpvae.modes import eval_mode
from ncpvae.run import seeds
from ncpvae.run.build import Run, encode_source

#: latents whose posterior-mean variance over the data exceeds this are "active" (Burda 2016)
ACTIVE_UNIT_THRESHOLD = 0.01

#: images per encoder call of :func:`evaluate_vae` (its test batches and its encoder means)
EVAL_BATCH = 512


@torch.no_grad()
def evaluate_vae(run: Run, limit: int, *, step: int = 0,
                 means: Tensor | None = None) -> dict[str, Any]:
    """Test-set loss terms (per image), KL per dim and active units on ``limit`` test images
    (eval mode; the model's training flag is restored). ``step`` is the global training step
    (objectives with a schedule, e.g. the capacity ``C(step)``, use it). ``means``: the encoder
    means ``(min(limit, N_test), D)`` of those images if the caller has them (encoded in
    batches of :data:`EVAL_BATCH`, so they are the ones encoded here), else they are encoded
    here. Under torchrun each rank takes its shard of every test batch and the sums are
    all-reduced (global numbers on every rank).

    The objective's draws come from the global RNG seeded for this pass alone and restored
    afterwards, so evaluating (and how much) never changes what training draws."""
    dist = run.dist
    totals: dict[str, float] = {}
    kl_dims = None
    count = 0
    devices = [run.device] if run.device.type == "cuda" else []
    with eval_mode(run.model), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seeds.torch_seed(run.config.seed, seeds.TRAIN_EVAL))
        for batch in torch.arange(min(limit, len(run.data.test))).split(EVAL_BATCH):
            # a batch smaller than the world is done whole by every rank, counted by rank 0
            whole = not dist.active or len(batch) < dist.world_size
            index = batch if whole else dist.shard(batch)
            x = run.data.test.get_batch(index).to(run.device)
            with nullcontext() if whole else dist.sharded(len(batch)):
                out = run.objective.loss(x, run.model, run.prior.base_prior, step=step)
            if whole and not dist.is_main:
                continue
            for key, value in out.items():
                if key == "kl_per_dim":
                    kl_dims = value * len(x) if kl_dims is None else kl_dims + value * len(x)
                else:
                    totals[key] = totals.get(key, 0.0) + float(value) * len(x)
            count += len(x)
        mu = means if means is not None else encode_source(
            run.model, run.data.test, run.device, limit=limit, batch_size=EVAL_BATCH)[0]
    if dist.active:
        totals = dist.all_reduce_sums({**totals, " count": count})
        count = int(totals.pop(" count"))
        kl_dims = None if kl_dims is None else dist.all_reduce_tensor_sum(kl_dims)
    result: dict[str, Any] = {f"test_{k}": v / count for k, v in totals.items()}
    activity = mu.var(0) if len(mu) > 1 else torch.zeros(mu.shape[1])
    result["active_units"] = int((activity > ACTIVE_UNIT_THRESHOLD).sum())
    result["latent_activity"] = activity.cpu().tolist()
    if kl_dims is not None:
        result["kl_per_dim"] = (kl_dims / count).cpu().tolist()
    return result
