"""The Python API for notebooks: open a trained run (or train one) and use its parts.

::

    import ncpvae
    run = ncpvae.open_run("runs/smoke")          # a run directory or an `ncpvae export` folder
    run = ncpvae.train("smoke", "runs/smoke")     # or train one (same object back)
    run.summary["vae"], run.evaluation            # what the run recorded (plain data)
    enc = run.encode(images)                      # images (N, C, H, W) in [0, 1] -> enc.mu, enc.logvar (N, D)
    images = run.decode(z)                        # latents (n, D) -> decoder means (n, C, H, W) in [0, 1]
    draw = run.sample(16, sampler="langevin", seed=0)   # draw.latents (16, D), draw.images

A :class:`TrainedRun` holds the run's model and prior in eval mode; encoding and decoding run
without autograd (a sampler's energy gradients are its own business) and every returned tensor
is on the CPU. Opening a run changes nothing in the process (the global RNG is restored after
the parameters are built, no process group is joined) and writes nothing into the run.
:func:`train` holds the run's writer lock while it trains, as ``ncpvae train`` does.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ncpvae.component import BuildContext
from ncpvae.config import RunConfig, apply_overrides, load_config, validate_config
from ncpvae.data import DataBundle, TensorImageSource
from ncpvae.errors import ConfigError, DataError, NcpvaeError
from ncpvae.factory import build_component
from ncpvae.io import read_json
from ncpvae.model import LatentModel, reparameterize
from ncpvae.plugin_manager import get_plugin_manager
from ncpvae.prior import Prior
from ncpvae.registry import Registry
from ncpvae.run import export, progress, seeds
from ncpvae.run.build import Run, build_parts, encode_source, mismatch_message, resolve_device
from ncpvae.run.checkpoint import load_checkpoint
from ncpvae.run.directory import RunDirectory
from ncpvae.run.sample import Draw, decode, draw
from ncpvae.sampler import Sampler
from ncpvae.sections import validate_component

__all__ = ["Encoding", "TrainedRun", "open_run", "train"]


@dataclass(frozen=True)
class Encoding:
    """The encoder's posterior ``q(z|x) = N(mu, diag(exp(logvar)))`` of ``N`` images."""

    mu: Tensor  # (N, D), on the CPU
    logvar: Tensor  # (N, D), on the CPU

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """One draw ``z ~ q(z|x)`` per image, ``(N, D)``."""
        return reparameterize(self.mu, self.logvar, generator=generator)


class TrainedRun:
    """A trained run, ready to encode, decode and sample (see the module docstring).

    Attributes: ``path`` (the folder it was opened from), ``config`` (its
    :class:`~ncpvae.config.RunConfig`), ``model`` (the :class:`~ncpvae.LatentModel`), ``prior``
    (the :class:`~ncpvae.Prior`, fitted when it is a learned prior), ``sampler`` (the run's
    configured sampler or None) and ``device``.
    """

    def __init__(self, path: Path, run: Run, *, image_shape: tuple[int, int, int]) -> None:
        self.path = path
        self._run = run
        self.image_shape = image_shape
        run.model.eval()
        run.prior.eval()

    # -- what the run is and recorded ---------------------------------------------------------

    @property
    def config(self) -> RunConfig:
        return self._run.config

    @property
    def model(self) -> LatentModel:
        return self._run.model

    @property
    def prior(self) -> Prior:
        return self._run.prior

    @property
    def sampler(self) -> Sampler | None:
        return self._run.sampler

    @property
    def device(self) -> torch.device:
        return self._run.device

    @property
    def summary(self) -> dict[str, Any]:
        """summary.json: each stage's final numbers (e.g. ``summary["vae"]["test_elbo"]``)."""
        file = self.path / "summary.json"
        return read_json(file, "summary") if file.is_file() else {}

    @property
    def evaluation(self) -> dict[str, Any] | None:
        """evaluation.json (the metrics of the report), or None when the run has none."""
        file = self.path / "evaluation.json"
        return read_json(file, "evaluation") if file.is_file() else None

    @property
    def data(self) -> DataBundle:
        """The run's train and test images (built on first use: an exported run is opened
        without its dataset, which may not exist where it is opened)."""
        if self._run.data is None:
            ctx = _context(self.config, self.device, self._run.registry)
            self._run.data = build_component(self.config.data, "dataset", ctx).build(ctx)
        return self._run.data

    def as_run(self) -> Run:
        """The run as the stage functions take it (a :class:`ncpvae.run.build.Run` with its data
        and no directory: e.g. ``ncpvae.run.vae_eval.evaluate_vae(run.as_run(), 128)``)."""
        self.data  # noqa: B018 -- built on first use
        return self._run

    # -- encode, decode, sample ---------------------------------------------------------------

    def encode(self, images: Tensor | np.ndarray, *, batch_size: int = 512) -> Encoding:
        """Encode ``images`` ``(N, C, H, W)`` (float in [0, 1] or uint8 in [0, 255], the run's
        image shape) into :class:`Encoding` ``mu, logvar``, each ``(N, D)``."""
        images = torch.as_tensor(images)
        if images.ndim == 3:  # one image
            images = images.unsqueeze(0)
        if tuple(images.shape[1:]) != self.image_shape:
            raise DataError(f"encode: images of shape {tuple(images.shape)} do not fit this run's "
                            f"(N, {', '.join(map(str, self.image_shape))})")
        source = TensorImageSource(images.cpu(), what="encode")
        mu, logvar = encode_source(self.model, source, self.device, batch_size=batch_size)
        return Encoding(mu.cpu(), logvar.cpu())

    def decode(self, z: Tensor | np.ndarray, *, batch_size: int = 512) -> Tensor:
        """Decoder means of latents ``z`` ``(n, D)``: images ``(n, C, H, W)`` in [0, 1]."""
        z = torch.as_tensor(z, dtype=torch.float32)
        if z.ndim != 2 or z.shape[1] != self.config.latent_dim:
            raise DataError(f"decode: latents of shape {tuple(z.shape)} do not fit this run's "
                            f"(n, {self.config.latent_dim})")
        return decode(self._run, z, batch_size=batch_size)

    def sample(self, n: int, sampler: str | Sampler | None = None, *, seed: int | None = None,
               images: bool = True, **options: Any) -> Draw:
        """``n`` latents from the prior and their decoded images.

        ``sampler``: None draws with the prior's own ``sample`` (exact for a base prior, e.g.
        SIR for NCP); a name (``"langevin"``, ``"sgld"``, ...) runs that sampler on the prior,
        with the run's settings when the run's configured sampler has that name, and
        ``options`` overriding config fields (``num_steps=50``); a built
        :class:`~ncpvae.Sampler` runs as it is. ``seed`` seeds the draw (default: the run's
        seed at the offset ``ncpvae sample`` uses), so equal seeds give equal draws.

        Returns a :class:`~ncpvae.run.sample.Draw`: ``latents`` ``(n, D)`` (a sampler's final
        states), ``images`` ``(n, C, H, W)`` in [0, 1] on the CPU (None with
        ``images=False``), ``diagnostics`` (plain data) and a sampler's whole ``result``."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"sample: n must be a positive integer, got {n!r}")
        if sampler is None and options:
            raise ConfigError(f"sample: options {sorted(options)} need a sampler")
        source: Prior | Sampler = self.prior if sampler is None else self._sampler(sampler,
                                                                                   options)
        label = self.prior.sampling_method if sampler is None else getattr(source, "label",
                                                                            source.name)
        offset = seeds.torch_seed(self.config.seed, seeds.SAMPLE_COMMAND)
        generator = torch.Generator(device=self.device).manual_seed(
            offset if seed is None else seed)
        result = draw(self._run, source, n, generator, title=f"{self.prior.name} by {label}")
        result.latents = result.latents.cpu()
        if images:
            result.images = decode(self._run, result.latents)
        return result

    def _sampler(self, sampler: str | Sampler, options: dict[str, Any]) -> Sampler:
        if isinstance(sampler, Sampler):
            if options:
                raise ConfigError("sample: options apply to a sampler given by name")
            return sampler
        configured = self.config.sampler
        raw = ({**configured.model_dump(mode="json"), **options}
               if configured is not None and configured.name == sampler
               else {"name": sampler, **options})
        return self._run.build_sampler(validate_component("sampler", raw, self._run.registry))

    def __repr__(self) -> str:
        return (f"TrainedRun('{self.path}', prior={self.prior.name!r}, "
                f"latent_dim={self.config.latent_dim}, device={str(self.device)!r})")


def _context(config: RunConfig, device: torch.device, registry: Registry) -> BuildContext:
    return BuildContext(latent_dim=config.latent_dim, device=device, seed=config.seed,
                        registry=registry)


def _build(config: RunConfig, registry: Registry, device: torch.device,
           image_shape: tuple[int, int, int] | None) -> tuple[Run, tuple[int, int, int]]:
    """The run's parts (data too when ``image_shape`` is not known) on ``device``, built as
    :func:`ncpvae.run.build.build_run` builds them but in this process alone (no process group)
    and with the global RNG restored afterwards."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        ctx = _context(config, device, registry)
        data = None
        if image_shape is None:
            data = build_component(config.data, "dataset", ctx).build(ctx)
            image_shape = data.image_shape
        ctx.image_shape = image_shape
        model, prior, objective, sampler = build_parts(config, ctx)
    # data None: an exported run builds it on first use (TrainedRun.data)
    run = Run(config, registry, device, data, model, prior, objective, sampler,  # type: ignore[arg-type]
              quiet=True)
    return run, tuple(image_shape)  # type: ignore[return-value]


def open_run(path: str | Path, *, device: str | torch.device | None = None,
             overrides: Iterable[str] = (), registry: Registry | None = None) -> TrainedRun:
    """Open a finished run directory, or a folder written by ``ncpvae export`` (weights from
    safetensors, no pickle), as a :class:`TrainedRun`.

    ``device``: where to put the model (default: the run's configured device, ``auto`` -> cuda
    when available); ``overrides``: ``KEY=VALUE`` config overrides as ``--set`` takes them
    (e.g. a sampler setting; one that changes the weights' shapes is refused)."""
    path = Path(path)
    registry = registry if registry is not None else get_plugin_manager().registry
    if not path.is_dir():
        raise NcpvaeError(f"'{path}' is not a folder; open a run directory or an `ncpvae "
                          "export` folder")
    exported = export.is_export(path)
    if not exported:
        directory = RunDirectory(path)  # not RunDirectory.open: opening writes nothing
        if not directory.config.is_file():
            raise NcpvaeError(f"'{path}' is neither a ncpvae run directory nor an `ncpvae "
                              "export` folder (no config.toml)")
        if progress.is_unfinished(directory):
            raise NcpvaeError(f"'{path}' holds an unfinished run ({progress.describe(directory)}); "
                              f"finish it with `ncpvae resume {path}` first")
    config = load_config(path / "config.toml", overrides, registry)
    if device is None and config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"'{path}' was trained on cuda and no CUDA device is available here; "
                          "pass device='cpu'")
    where = torch.device(device) if device is not None else resolve_device(config.device)
    if exported:
        run, shape = _build(config, registry, where, export.read_manifest(path).image_shape)
        export.load_weights(path, run.model, run.prior)
    else:
        run, shape = _build(config, registry, where, None)
        try:
            load_checkpoint(directory.checkpoint, run.model, run.prior)
        except RuntimeError as exc:  # load_state_dict: the weights do not fit this config
            raise DataError(mismatch_message(directory, config, registry, exc)) from None
    return TrainedRun(path, run, image_shape=shape)


def train(config: str | Path | RunConfig | None = None, out: str | Path | None = None, *,
          overrides: Iterable[str] = (), overwrite: bool = False, quiet: bool = True,
          device: str | torch.device | None = None) -> TrainedRun:
    """Train a run as ``ncpvae train`` does and open it (:func:`open_run`).

    ``config``: a built-in config name (``"smoke"``), a TOML path, a
    :class:`~ncpvae.config.RunConfig`, or None for the default; ``overrides`` as ``--set``
    takes them. ``out`` defaults to ``runs/<name>``; an existing run there is replaced only
    with ``overwrite``. The run directory's writer lock is held while it trains (a second
    writer is refused, as for the command); the global RNG is restored afterwards."""
    from ncpvae import experiment  # the evaluation, loaded when a run is trained
    from ncpvae.run.lock import hold

    manager = get_plugin_manager()
    if isinstance(config, RunConfig):
        resolved = validate_config(apply_overrides(config.model_dump(mode="json"), overrides),
                                   manager.registry)
    else:
        resolved = load_config(config, overrides, manager.registry)
    target = Path(out) if out is not None else Path("runs") / resolved.name
    command = f"ncpvae.train({resolved.name!r}) in `{shlex.join(sys.argv) or 'python'}`"
    with hold(target, command=command, create=True), torch.random.fork_rng(
            devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        path = experiment.train(resolved, target, overwrite=overwrite, quiet=quiet,
                                manager=manager)
    return open_run(path, device=device, registry=manager.registry)
