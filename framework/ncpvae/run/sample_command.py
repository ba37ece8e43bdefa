"""``ncpvae sample``: run a sampler on a trained run's prior, decode, save and plot."""

from __future__ import annotations

from pathlib import Path

from ncpvae import plots
from ncpvae.defaults import shipped_default
from ncpvae.errors import ConfigError
from ncpvae.io import save_torch, write_json
from ncpvae.registry import Registry
from ncpvae.run import directory as files
from ncpvae.run import seeds
from ncpvae.run.build import open_run
from ncpvae.run.sample import sample_images

#: the sampler suggested when a run has none (the shipped configs/defaults.toml)
DEFAULT_SAMPLER: str = shipped_default("sample", "sampler")


def sample_command(run_path: str | Path, overrides: list[str], *, chains: int | None = None,
                   out: str | Path | None = None, quiet: bool = False,
                   registry: Registry | None = None, overwrite: bool = False) -> Path:
    """Sample ``run_path``'s prior with its (or the overridden) sampler and write the results to
    ``out`` (default ``RUN/sampling``): ``samples.png``, ``latents.pt`` (final states ``(C, D)``
    and the chain history ``(S, C, D)``), ``diagnostics.json``, ``energy_trace.png`` and
    ``trajectories.png``."""
    from ncpvae.run import progress
    from ncpvae.run.directory import RunDirectory

    progress.require_finished(RunDirectory.open(run_path), "sample")
    run = open_run(run_path, overrides, registry=registry, quiet=quiet)
    if run.sampler is None:
        raise ConfigError(f"the run has no sampler configured; pass --sampler NAME "
                          f"(e.g. --sampler {DEFAULT_SAMPLER})")
    if chains is not None and chains < 1:
        raise ConfigError(f"--chains must be >= 1, got {chains}")
    num_chains = chains if chains is not None else run.config.sample.num_samples
    if run.is_writer:  # the process that writes: never over earlier samples
        out_dir = Path(out) if out is not None else run.directory.sampling
        outputs = (files.SAMPLING_GRID, files.SAMPLING_LATENTS, files.SAMPLING_DIAGNOSTICS,
                   files.SAMPLING_ENERGY, files.SAMPLING_TRAJECTORIES)
        earlier = [name for name in outputs if (out_dir / name).exists()]
        if earlier and not overwrite:
            raise ConfigError(f"'{out_dir}' already holds samples of an earlier `ncpvae sample` "
                              f"({', '.join(earlier)}); pass --overwrite to replace them or "
                              "--out to write elsewhere")
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in earlier:  # no file of the earlier sampling survives next to the new ones
            (out_dir / name).unlink()
    title = f"{run.prior.name} prior by {run.sampler.name} ({num_chains} chains)"
    drawn = sample_images(run, run.sampler, num_chains, run.generator(seeds.SAMPLE_COMMAND),
                          title=title)  # under torchrun: chains split over ranks, gathered
    if not run.is_writer:  # a rank > 0 of a distributed run writes nothing
        return Path(out) if out is not None else Path(run_path) / "sampling"
    out_dir = Path(out) if out is not None else run.directory.sampling
    out_dir.mkdir(parents=True, exist_ok=True)
    result = drawn.result
    assert result is not None and drawn.images is not None
    plots.plot_image_grid(drawn.images[:64], out_dir / files.SAMPLING_GRID, title=title)
    save_torch(out_dir / files.SAMPLING_LATENTS, {"final": drawn.latents.cpu(),
                                                  "samples": result.samples.detach().cpu()})
    write_json(out_dir / files.SAMPLING_DIAGNOSTICS,
               {"prior": run.prior.name, "sampler": run.sampler.name,
                "config": run.sampler.config.model_dump(mode="json"), "chains": num_chains,
                **drawn.diagnostics})
    energies = result.info.get("energy")
    if energies is not None:
        plots.plot_energy_traces(energies, out_dir / files.SAMPLING_ENERGY)
    if result.samples.shape[0] > 1 and drawn.latents.shape[-1] >= 2:
        plots.plot_trajectories(result.samples, run.prior.energy,
                                out_dir / files.SAMPLING_TRAJECTORIES)
    return out_dir
