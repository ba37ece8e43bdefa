"""Composing and running a whole experiment from a validated config.

Stages (each can be re-run alone on an existing run directory):

1. ``train_vae``   — train the model with the objective against the prior's tractable base
2. ``fit_prior``   — fit a learned prior (``requires_fit``, e.g. NCP) with the VAE frozen
3. ``sample_stage``— decode samples from the base prior, the learned prior, and the sampler
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ncpvae import plots
from ncpvae.component import BuildContext
from ncpvae.config import RunConfig, config_to_toml, load_config
from ncpvae.data import DataBundle, ImageSource
from ncpvae.errors import ConfigError, DataError, NonFiniteError
from ncpvae.factory import build_component
from ncpvae.io import load_torch, save_torch
from ncpvae.model import LatentModel
from ncpvae.objective import Objective
from ncpvae.plugin_manager import PluginManager, get_plugin_manager
from ncpvae.prior import Prior
from ncpvae.registry import Registry
from ncpvae.run.directory import RunDirectory
from ncpvae.sampler import Sampler

#: latents whose posterior-mean variance over the data exceeds this are "active" (Burda 2016)
ACTIVE_UNIT_THRESHOLD = 0.01
CHECKPOINT_FORMAT = 1


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


@dataclass
class Run:
    """The components of one run, built from its config."""

    config: RunConfig
    registry: Registry
    device: torch.device
    data: DataBundle
    model: LatentModel
    prior: Prior
    objective: Objective
    sampler: Sampler | None
    directory: RunDirectory | None = None
    quiet: bool = False

    def generator(self, offset: int) -> torch.Generator:
        """A fresh generator for one stage, seeded from the run seed (stages are independent)."""
        return torch.Generator(device=self.device).manual_seed(self.config.seed * 1000 + offset)

    def log(self, record: dict[str, Any]) -> None:
        if self.directory is not None:
            self.directory.log(record)


def build_run(config: RunConfig, *, registry: Registry | None = None,
              directory: RunDirectory | None = None, quiet: bool = False) -> Run:
    """Build every component of ``config`` (data first: models need its image shape)."""
    registry = registry if registry is not None else get_plugin_manager().registry
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    ctx = BuildContext(latent_dim=config.latent_dim, device=device, seed=config.seed,
                       registry=registry)
    data = build_component(config.data, "dataset", ctx).build(ctx)
    ctx.image_shape = data.image_shape
    model = build_component(config.model, "model", ctx)
    prior = build_component(config.prior, "prior", ctx)
    objective = build_component(config.objective, "objective", ctx)
    sampler = build_component(config.sampler, "sampler", ctx) if config.sampler else None
    objective.check_compatible(model, prior.base_prior)
    return Run(config, registry, device, data, model, prior, objective, sampler, directory, quiet)


# ---------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(run: Run, stage: str, **extra: Any) -> None:
    """State dicts and plain data only (loads with ``torch.load(weights_only=True)``)."""
    assert run.directory is not None
    state = {
        "format": CHECKPOINT_FORMAT,
        "stage": stage,
        "model": run.model.state_dict(),
        "prior": run.prior.state_dict(),
        **extra,
    }
    save_torch(run.directory.checkpoint, state)


def load_checkpoint(run: Run) -> dict[str, Any]:
    """Load model and prior weights of ``run.directory`` into ``run``; return the checkpoint."""
    assert run.directory is not None
    state = load_torch(run.directory.checkpoint)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"'{run.directory.checkpoint}' is not a ncpvae checkpoint")
    run.model.load_state_dict(state["model"])
    load_prior_state(run.prior, state["prior"])
    return state


def load_prior_state(prior: Prior, state: dict[str, Tensor]) -> None:
    """Load a saved prior's weights, also across a prior swap: a learned prior gets the saved
    weights of its base (a run trained with ``gaussian`` refitted as ``ncp``), and a base prior
    gets the base part of a saved learned prior (sampling an NCP run's ``gaussian`` base)."""
    base_state = {k.removeprefix("base."): v for k, v in state.items() if k.startswith("base.")}
    attempts = [(prior, state), (prior, base_state), (prior.base_prior, state)]
    for module, candidate in attempts:
        if not candidate:
            continue
        try:
            module.load_state_dict(candidate)
        except RuntimeError:
            continue
        return  # a learned prior given only its base's weights stays unfitted until fit-prior
    raise DataError(
        f"the checkpoint's prior weights do not fit a '{prior.name}' prior with this config; "
        "use the prior the run was trained with, or refit with `ncpvae fit-prior RUN --set "
        f"prior={prior.name}`")


def open_run(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *,
             registry: Registry | None = None, quiet: bool = False) -> Run:
    """Rebuild a run from its directory (its saved config plus ``overrides``) and load weights."""
    directory = RunDirectory.open(path)
    config = load_config(directory.config, overrides, registry)
    run = build_run(config, registry=registry, directory=directory, quiet=quiet)
    load_checkpoint(run)
    return run


# ---------------------------------------------------------------------------------------------
# stage 1: VAE training


def _batches(n: int, batch_size: int, generator: torch.Generator,
             max_steps: int | None) -> list[Tensor]:
    order = torch.randperm(n, generator=generator)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < batch_size // 2:
        batches.pop()  # a tiny last batch adds gradient noise and nothing else
    return batches[:max_steps] if max_steps else batches


@torch.no_grad()
def encode_source(model: LatentModel, source: ImageSource, device: torch.device, *,
                  limit: int | None = None, batch_size: int = 512) -> tuple[Tensor, Tensor]:
    """Encoder outputs ``(mu, logvar)``, each ``(N, D)``, for the first ``limit`` images."""
    was_training = model.training
    model.eval()
    n = len(source) if limit is None else min(limit, len(source))
    mus, logvars = [], []
    for index in torch.arange(n).split(batch_size):
        mu, logvar = model.encode(source.get_batch(index).to(device))
        mus.append(mu)
        logvars.append(logvar)
    model.train(was_training)
    return torch.cat(mus), torch.cat(logvars)


@torch.no_grad()
def evaluate_vae(run: Run, limit: int) -> dict[str, Any]:
    """Test-set loss terms (per image), KL per dim and active units on ``limit`` test images."""
    run.model.eval()
    totals: dict[str, float] = {}
    kl_dims = None
    count = 0
    for index in torch.arange(min(limit, len(run.data.test))).split(512):
        x = run.data.test.get_batch(index).to(run.device)
        out = run.objective.loss(x, run.model, run.prior.base_prior)
        for key, value in out.items():
            if key == "kl_per_dim":
                kl_dims = value * len(x) if kl_dims is None else kl_dims + value * len(x)
            else:
                totals[key] = totals.get(key, 0.0) + float(value) * len(x)
        count += len(x)
    mu, _ = encode_source(run.model, run.data.test, run.device, limit=limit)
    run.model.train()
    result: dict[str, Any] = {f"test_{k}": v / count for k, v in totals.items()}
    activity = mu.var(0) if len(mu) > 1 else torch.zeros(mu.shape[1])
    result["active_units"] = int((activity > ACTIVE_UNIT_THRESHOLD).sum())
    result["latent_activity"] = activity.cpu().tolist()
    if kl_dims is not None:
        result["kl_per_dim"] = (kl_dims / count).cpu().tolist()
    return result


def train_vae(run: Run) -> dict[str, Any]:
    """Stage 1: optimize the objective; checkpoint (atomically) after every epoch."""
    cfg = run.config.train
    model, prior = run.model, run.prior.base_prior
    params = list(model.parameters()) + [p for p in prior.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    order_generator = torch.Generator().manual_seed(run.config.seed)
    n_train = len(run.data.train)
    if n_train < 1:
        raise ConfigError("the training set is empty")
    step = 0
    start = time.perf_counter()
    images_seen = 0
    epoch_bar = tqdm(range(1, cfg.epochs + 1), desc="train VAE", unit="epoch", disable=run.quiet)
    record: dict[str, Any] = {}
    model.train()
    for epoch in epoch_bar:
        sums: dict[str, Tensor] = {}
        batches = _batches(n_train, cfg.batch_size, order_generator, cfg.steps_per_epoch)
        step_bar = tqdm(batches, desc=f"epoch {epoch}", leave=False, unit="step",
                        disable=run.quiet)
        epoch_start = time.perf_counter()
        for batch_number, index in enumerate(step_bar, start=1):
            x = run.data.train.get_batch(index).to(run.device, non_blocking=True)
            out = run.objective.loss(x, model, prior, step=step)
            loss = out["loss"]
            if not torch.isfinite(loss):
                kept = (f"the checkpoint of epoch {epoch - 1} is kept"
                        if epoch > 1 else "no checkpoint had been written yet")
                raise NonFiniteError(
                    f"non-finite training loss at epoch {epoch}, step {batch_number} (global step "
                    f"{step + 1}); {kept}; lower train.lr or enable train.grad_clip")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            step += 1
            images_seen += len(index)
            for key, value in out.items():
                if value.ndim == 0:
                    sums[key] = sums.get(key, 0.0) + value.detach()
            if batch_number % 25 == 0:
                step_bar.set_postfix(loss=f"{float(loss.detach()):.1f}")
        epoch_time = time.perf_counter() - epoch_start
        record = {"stage": "train", "epoch": epoch, "step": step,
                  **{f"train_{k}": float(v) / len(batches) for k, v in sums.items()},
                  **evaluate_vae(run, cfg.eval_size),
                  "images_per_second": len(batches) * cfg.batch_size / epoch_time,
                  "elapsed_seconds": time.perf_counter() - start}
        run.log(record)
        epoch_bar.set_postfix(elbo=f"{record.get('test_elbo', float('nan')):.1f}",
                              active=record["active_units"])
        if run.directory is not None:
            save_checkpoint(run, "vae", epoch=epoch, step=step,
                            optimizer=optimizer.state_dict())
    summary = {key: value for key, value in record.items() if key not in ("stage",)}
    summary["train_seconds"] = time.perf_counter() - start
    summary["images_seen"] = images_seen
    if run.directory is not None:
        run.directory.update_summary("vae", summary)
        vae_plots(run, record.get("kl_per_dim"))
    return summary


def vae_plots(run: Run, kl_per_dim: list[float] | None) -> None:
    """Training curves, reconstructions, KL per dim and traversals."""
    assert run.directory is not None
    plot_dir = run.directory.plots
    plots.plot_training_curves(run.directory.records("train"), plot_dir / "training_curves.png")
    model = run.model
    model.eval()
    with torch.no_grad():
        x = run.data.test.get_batch(torch.arange(min(16, len(run.data.test)))).to(run.device)
        mu, _ = model.encode(x)
        plots.plot_reconstructions(x, model.mean_image(model.decode(mu)),
                                   plot_dir / "reconstructions.png")
        if kl_per_dim is not None:
            kl = torch.tensor(kl_per_dim)
        else:  # no closed-form KL: rank dims by posterior-mean variance instead
            kl = encode_source(model, run.data.test, run.device, limit=1000)[0].var(0).cpu()
        plots.plot_kl_per_dim(kl, plot_dir / "kl_per_dim.png")
        plots.plot_traversals(model, mu[0], kl, plot_dir / "traversals.png")
    model.train()


# ---------------------------------------------------------------------------------------------
# stage 2: fitting a learned prior


def fit_prior(run: Run) -> dict[str, Any]:
    """Stage 2: fit ``run.prior`` to the frozen VAE's aggregate posterior (if it needs fitting)."""
    prior = run.prior
    if not prior.requires_fit:
        return {}
    mu, logvar = encode_source(run.model, run.data.train, run.device)  # the frozen VAE's q(z|x)
    history: list[dict[str, Any]] = []

    def log(record: dict[str, Any]) -> None:
        history.append(record)
        run.log({"stage": "fit_prior", **record})

    summary = dict(prior.fit(mu, logvar, generator=run.generator(2), progress=not run.quiet,
                             log=log))
    summary.update(learned_prior_report(run))
    if run.directory is not None:
        state = load_torch(run.directory.checkpoint) if run.directory.checkpoint.is_file() else {}
        state.update({"format": CHECKPOINT_FORMAT, "stage": "prior_fitted",
                      "model": run.model.state_dict(), "prior": run.prior.state_dict()})
        save_torch(run.directory.checkpoint, state)
        run.directory.update_summary("prior_fit", summary)
        if history:
            from ncpvae.plots.prior_fit import plot_classifier_loss

            plot_classifier_loss(history, run.directory.plots / "ncp_classifier_loss.png")
    return summary


def heldout_latents(run: Run, generator: torch.Generator) -> Tensor:
    """Fresh draws ``z ~ q(z|x)`` for held-out (test) images, ``(N, D)``."""
    mu, logvar = encode_source(run.model, run.data.test, run.device,
                               limit=run.config.train.eval_size)
    noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * noise


def learned_prior_report(run: Run) -> dict[str, Any]:
    """log Z and the gain Delta over the base prior on held-out encodings, with SEs."""
    prior = run.prior
    report: dict[str, Any] = {}
    with torch.no_grad():
        if hasattr(prior, "log_normalizer"):
            log_z, se = prior.log_normalizer(generator=run.generator(3))
            report.update(log_z=float(log_z), log_z_se=float(se))
        if hasattr(prior, "kl_gain"):
            delta, se = prior.kl_gain(heldout_latents(run, run.generator(4)),
                                      generator=run.generator(3))
            report.update(delta=float(delta), delta_se=float(se))
    return report


# ---------------------------------------------------------------------------------------------
# stage 3: sampling and decoding


def draw_panels(run: Run, num_samples: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Latents ``(n, D)`` per panel: the base prior, the prior itself, and the sampler."""
    prior = run.prior
    panels: dict[str, Tensor] = {}
    info: dict[str, Any] = {}
    with torch.no_grad():
        panels[f"{prior.base_prior.name} (base prior)"] = prior.base_prior.sample(
            num_samples, generator=run.generator(5))
        if prior is not prior.base_prior:
            panels[f"{prior.name} by {prior.sampling_method}"] = prior.sample(
                num_samples, generator=run.generator(6))
            if getattr(prior, "last_ess_fraction", None) is not None:
                info["ess_fraction"] = float(prior.last_ess_fraction)
    if run.sampler is not None and prior is not prior.base_prior:
        result = run.sampler.sample_prior(prior, num_samples, generator=run.generator(7),
                                          progress=not run.quiet)
        panels[f"{prior.name} by {run.sampler.label}"] = result.samples[-1]
        info["sampler"] = json.loads(json.dumps(result.diagnostics, default=_plain))
    return panels, info


def _plain(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    return float(value)


def sample_stage(run: Run) -> dict[str, Any]:
    """Stage 3: draw, decode and plot samples of every panel; save the latents."""
    panels, info = draw_panels(run, run.config.sample.num_samples)
    run.model.eval()
    with torch.no_grad():
        images = {title: run.model.mean_image(run.model.decode(z)).cpu()
                  for title, z in panels.items()}
    if run.directory is not None:
        save_torch(run.directory.path / "samples.pt",
                   {title: z.detach().cpu() for title, z in panels.items()})
        plots.plot_sample_panels(images, run.directory.plots / "samples.png")
        run.directory.update_summary("samples", {"panels": list(panels), **info})
    return info


# ---------------------------------------------------------------------------------------------
# the whole pipeline


def plugin_records(manager: PluginManager) -> list[dict[str, Any]]:
    return [{"name": p.name, "source": p.source, "version": p.version,
             "components": [f"{kind}:{name}" for kind, name in p.components]}
            for p in manager.plugins]


def train(config: RunConfig, out: str | Path | None = None, *, overwrite: bool = False,
          quiet: bool = False, manager: PluginManager | None = None,
          stages: tuple[Callable[[Run], Any], ...] | None = None) -> Path:
    """Run the whole pipeline into ``out`` (default ``runs/<config.name>``); return its path."""
    from ncpvae.io import write_json

    manager = manager if manager is not None else get_plugin_manager()
    directory = RunDirectory.create(out if out is not None else Path("runs") / config.name,
                                    overwrite=overwrite)
    directory.write_config(config_to_toml(config))
    write_json(directory.plugins, plugin_records(manager))
    run = build_run(config, registry=manager.registry, directory=directory, quiet=quiet)
    for stage in stages if stages is not None else DEFAULT_STAGES:
        stage(run)
    return directory.path


def evaluate_stage(run: Run) -> dict[str, Any]:
    """Stage 4: the evaluation report (see :mod:`ncpvae.evaluation.pipeline`), if enabled."""
    if not run.config.evaluate.enabled:
        return {}
    from ncpvae.evaluation.pipeline import evaluate_run

    return evaluate_run(run)


DEFAULT_STAGES: tuple[Callable[[Run], Any], ...] = (train_vae, fit_prior, sample_stage,
                                                     evaluate_stage)
