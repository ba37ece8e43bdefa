"""Stage 1: train the VAE with the objective against the prior's tractable base."""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ncpvae import plots
from ncpvae.errors import ConfigError, NonFiniteError
from ncpvae.io import to_plain_json
from ncpvae.metrics._common import eval_mode
from ncpvae.optim import adam
from ncpvae.run import directory as files
from ncpvae.run import distributed, faults, progress, rng, seeds
from ncpvae.run.build import Run, encode_source
from ncpvae.run.checkpoint import save_checkpoint

#: latents whose posterior-mean variance over the data exceeds this are "active" (Burda 2016)
ACTIVE_UNIT_THRESHOLD = 0.01
#: training steps between reads of the on-device finiteness flags (and at every epoch's end):
#: the only host synchronisations of the step loop
FINITE_CHECK_INTERVAL = 50


def _first_bad_step(flags: list[Tensor], first_number: int, dist: Any) -> int | None:
    """The batch number of the first non-finite loss among ``flags`` (0-dim bool tensors, True
    = finite, for batch numbers ``first_number, first_number + 1, ...``), or None; one host
    read (under torchrun: the flags of every rank, summed, so every rank stops together)."""
    if not flags:
        return None
    bad = (~torch.stack(flags)).to(torch.float32)  # (k,)
    if dist.active:
        bad = dist.all_reduce_tensor_sum(bad)
    if not bool(bad.any()):
        return None
    return first_number + int(torch.nonzero(bad)[0, 0])


def _check_finite(flags: list[Tensor], last_number: int, epoch: int, step: int,
                  dist: Any) -> None:
    """Read the unread finiteness ``flags`` (batches up to ``last_number`` of ``epoch``; ``step``
    is the global step count after it) and clear them; raise :class:`NonFiniteError` naming the
    first bad epoch/step. Called before the epoch's checkpoint is written, so none holds a
    non-finite step's updates."""
    first = _first_bad_step(flags, last_number - len(flags) + 1, dist)
    flags.clear()
    if first is not None:
        kept = (f"the checkpoint of epoch {epoch - 1} is kept"
                if epoch > 1 else "no checkpoint had been written yet")
        raise NonFiniteError(
            f"non-finite training loss at epoch {epoch}, step {first} (global step "
            f"{step - last_number + first}); {kept}; lower train.lr or enable train.grad_clip")


def _batches(n: int, batch_size: int, generator: torch.Generator,
             max_steps: int | None) -> list[Tensor]:
    order = torch.randperm(n, generator=generator)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < batch_size // 2:
        batches.pop()  # a tiny last batch adds gradient noise and nothing else
    return batches[:max_steps] if max_steps else batches


@torch.no_grad()
def evaluate_vae(run: Run, limit: int, *, step: int = 0) -> dict[str, Any]:
    """Test-set loss terms (per image), KL per dim and active units on ``limit`` test images
    (eval mode; the model's training flag is restored). ``step`` is the global training step
    (objectives with a schedule, e.g. the capacity ``C(step)``, use it). Under torchrun each
    rank takes its shard of every test batch and the sums are all-reduced (global numbers on
    every rank).

    The objective's draws come from the global RNG seeded for this pass alone and restored
    afterwards, so evaluating (and how much) never changes what training draws."""
    dist = run.dist
    totals: dict[str, float] = {}
    kl_dims = None
    count = 0
    devices = [run.device] if run.device.type == "cuda" else []
    with eval_mode(run.model), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seeds.torch_seed(run.config.seed, seeds.TRAIN_EVAL))
        for batch in torch.arange(min(limit, len(run.data.test))).split(512):
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
        mu, _ = encode_source(run.model, run.data.test, run.device, limit=limit)
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


def train_vae(run: Run) -> dict[str, Any]:
    """Stage 1: optimize the objective; checkpoint (atomically) after every epoch.

    Each epoch's checkpoint holds the model, prior, optimizer, epoch, step, the data-order
    generator and the global RNG states (:mod:`ncpvae.run.rng`), so a run resumed from it
    (``run.resume_from``) continues bit for bit as if it had never stopped."""
    cfg = run.config.train
    model, prior = run.model, run.prior.base_prior
    params = list(model.parameters()) + [p for p in prior.parameters() if p.requires_grad]
    optimizer = adam(params, lr=cfg.lr, fused=cfg.fused_adam)
    order_generator = torch.Generator().manual_seed(run.config.seed)
    n_train = len(run.data.train)
    if n_train < 1:
        raise ConfigError("the training set is empty")
    dist = run.dist  # under torchrun: DDP, each rank a contiguous shard of every global batch
    if dist.active and cfg.batch_size < 2 * dist.world_size:
        raise ConfigError(f"train.batch_size ({cfg.batch_size}) is the global batch, split over "
                          f"{dist.world_size} processes; use at least {2 * dist.world_size}")
    loss_fn = distributed.loss_function(dist, model, prior, run.objective)
    step = 0
    first_epoch = 1
    elapsed_before = 0.0
    images_seen = 0
    record: dict[str, Any] = {}
    state = run.resume_from
    if state is not None and state.get("stage") == "vae":  # continue an interrupted training
        optimizer.load_state_dict(state["optimizer"])
        rng.restore(state["rng"], {"order": order_generator},
                    what=f"checkpoint '{run.directory.checkpoint if run.directory else ''}'")
        step, first_epoch = int(state["step"]), int(state["epoch"]) + 1
        images_seen = int(state.get("images_seen", 0))
        elapsed_before = float(state.get("elapsed_seconds", 0.0))
        record = dict(state.get("record", {}))
    start = time.perf_counter() - elapsed_before
    epoch_bar = tqdm(range(first_epoch, cfg.epochs + 1), desc="train VAE", unit="epoch",
                     disable=run.quiet, initial=first_epoch - 1, total=cfg.epochs)
    model.train()
    for epoch in epoch_bar:
        sums: dict[str, Tensor] = {}
        batches = _batches(n_train, cfg.batch_size, order_generator, cfg.steps_per_epoch)
        step_bar = tqdm(batches, desc=f"epoch {epoch}", leave=False, unit="step",
                        disable=run.quiet)
        epoch_start = time.perf_counter()
        shards: list[Tensor] = []
        flags: list[Tensor] = []  # isfinite(loss) of the steps not yet read, on the device
        for batch_number, batch in enumerate(step_bar, start=1):
            index = dist.shard(batch)
            shards.append(index)
            x = run.data.train.get_batch(index).to(run.device, non_blocking=True)
            with dist.sharded(len(batch)):
                out = loss_fn(x, step)
            loss = out["loss"]
            # checked on the device; read every FINITE_CHECK_INTERVAL steps and at the epoch's
            # end (a non-finite step's updates are never checkpointed: see _check_finite)
            flags.append(torch.isfinite(loss.detach()))
            optimizer.zero_grad(set_to_none=True)
            weight = distributed.loss_weight(dist, len(index), len(batch))
            (loss if weight == 1.0 else loss * weight).backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            step += 1
            images_seen += len(batch)
            share = len(index) / len(batch) if dist.active else None
            for key, value in out.items():
                if value.ndim == 0:
                    value = value.detach() if share is None else value.detach() * share
                    sums[key] = sums.get(key, 0.0) + value
            if batch_number % FINITE_CHECK_INTERVAL == 0:
                _check_finite(flags, batch_number, epoch, step, dist)
                if not run.quiet:
                    step_bar.set_postfix(loss=f"{float(loss.detach()):.1f}")
        _check_finite(flags, len(batches), epoch, step, dist)
        distributed.log_shard(dist, epoch, torch.cat(shards) if shards else torch.zeros(0))
        if dist.active:  # the global batch means, summed over the epoch's steps
            sums = dist.all_reduce_sums(sums)
        epoch_time = time.perf_counter() - epoch_start
        record = {"stage": "train", "epoch": epoch, "step": step,
                  **{f"train_{k}": float(v) / len(batches) for k, v in sums.items()},
                  **evaluate_vae(run, cfg.eval_size, step=step),
                  "images_per_second": len(batches) * cfg.batch_size / epoch_time,
                  "elapsed_seconds": time.perf_counter() - start}
        run.log(record)
        epoch_bar.set_postfix(elbo=f"{record.get('test_elbo', float('nan')):.1f}",
                              active=record["active_units"])
        if run.is_writer:
            save_checkpoint(run.directory.checkpoint, run.model, run.prior, "vae", epoch=epoch,
                            step=step, optimizer=optimizer.state_dict(),
                            world_size=dist.world_size,
                            rng=rng.capture({"order": order_generator}),
                            images_seen=images_seen, record=to_plain_json(record),
                            elapsed_seconds=time.perf_counter() - start,
                            metrics_lines=progress.metrics_lines(run.directory),
                            completed=[])
            faults.boundary("epoch")
    summary = {key: value for key, value in record.items() if key not in ("stage",)}
    summary["train_seconds"] = time.perf_counter() - start
    summary["images_seen"] = images_seen
    if run.is_writer:
        run.directory.update_summary("vae", summary)
        vae_plots(run, record.get("kl_per_dim"))
    return summary


def vae_plots(run: Run, kl_per_dim: list[float] | None) -> None:
    """Training curves, reconstructions, KL per dim and traversals."""
    assert run.directory is not None
    directory = run.directory
    plots.plot_training_curves(directory.records("train"),
                               directory.plot(files.PLOT_TRAINING_CURVES))
    model = run.model
    with eval_mode(model), torch.no_grad():
        # 16 test images spread evenly over the test set (a sorted set shows every class)
        n_test = len(run.data.test)
        spread = torch.linspace(0, n_test - 1, min(16, n_test)).round().long()
        x = run.data.test.get_batch(spread).to(run.device)
        mu, _ = model.encode(x)
        plots.plot_reconstructions(x, model.mean_image(model.decode(mu)),
                                   directory.plot(files.PLOT_RECONSTRUCTIONS))
        if kl_per_dim is not None:
            kl = torch.tensor(kl_per_dim)
        else:  # no closed-form KL: rank dims by posterior-mean variance instead
            kl = encode_source(model, run.data.test, run.device, limit=1000)[0].var(0).cpu()
        plots.plot_kl_per_dim(kl, directory.plot(files.PLOT_KL_PER_DIM))
        plots.plot_traversals(model, mu[0], kl, directory.plot(files.PLOT_TRAVERSALS))
