"""``ncpvae sample``: run a sampler on a trained run's prior, decode, save and plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ncpvae import plots
from ncpvae.errors import ConfigError
from ncpvae.io import save_torch, write_json
from ncpvae.registry import Registry

DEFAULT_SAMPLER = "langevin"


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return float(value)


def sample_command(run_path: str | Path, overrides: list[str], *, chains: int | None = None,
                   out: str | Path | None = None, quiet: bool = False,
                   registry: Registry | None = None) -> Path:
    """Sample ``run_path``'s prior with its (or the overridden) sampler and write the results to
    ``out`` (default ``RUN/sampling``): ``samples.png``, ``latents.pt`` (final states ``(C, D)``
    and the chain history ``(S, C, D)``), ``diagnostics.json``, ``energy_trace.png`` and
    ``trajectories.png``."""
    from ncpvae.plots.samplers import plot_energy_traces, plot_trajectories
    from ncpvae.run.stages import open_run

    run = open_run(run_path, overrides, registry=registry, quiet=quiet)
    if run.sampler is None:
        raise ConfigError(f"the run has no sampler configured; pass --sampler NAME "
                          f"(e.g. --sampler {DEFAULT_SAMPLER})")
    if chains is not None and chains < 1:
        raise ConfigError(f"--chains must be >= 1, got {chains}")
    num_chains = chains if chains is not None else run.config.sample.num_samples
    out_dir = Path(out) if out is not None else run.directory.path / "sampling"
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = run.generator(8)
    result = run.sampler.sample_prior(run.prior, num_chains, generator=generator,
                                      progress=not quiet)
    final = result.samples[-1]
    run.model.eval()
    with torch.no_grad():
        images = run.model.mean_image(run.model.decode(final)).cpu()
    title = f"{run.prior.name} prior by {run.sampler.name} ({num_chains} chains)"
    plots.plot_image_grid(images[:64], out_dir / "samples.png", title=title)
    save_torch(out_dir / "latents.pt", {"final": final.detach().cpu(),
                                        "samples": result.samples.detach().cpu()})
    diagnostics = json.loads(json.dumps(result.diagnostics, default=_plain))
    write_json(out_dir / "diagnostics.json", {"prior": run.prior.name,
                                              "sampler": run.sampler.name,
                                              "config": run.sampler.config.model_dump(mode="json"),
                                              "chains": num_chains, **diagnostics})
    energies = result.info.get("energy")
    if energies is not None:
        plot_energy_traces(energies, out_dir / "energy_trace.png")
    if result.samples.shape[0] > 1 and final.shape[-1] >= 2:
        plot_trajectories(result.samples, run.prior.energy, out_dir / "trajectories.png")
    return out_dir
