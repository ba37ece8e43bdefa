"""Stage 3, and the one draw -> decode -> plot path that the sample stage, ``ncpvae sample``
and the evaluation's prior x sampler table all use.

:func:`draw` takes latents from a source, a prior (its own ``sample``: exact for a base prior,
e.g. SIR for NCP) or a sampler run on the run's prior; :func:`decode` turns latents into
decoder-mean images; :func:`sample_images` does both; the plots are
:func:`ncpvae.plots.plot_image_grid` (one source) and :func:`ncpvae.plots.plot_sample_panels`
(several side by side).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ncpvae import plots
from ncpvae.io import save_torch, to_plain_json
from ncpvae.modes import eval_mode
from ncpvae.prior import LearnedPrior, Prior
from ncpvae.run import directory as files
from ncpvae.run import seeds
from ncpvae.run.build import Run
from ncpvae.sampler import Sampler, SampleResult


@dataclass
class Draw:
    """Latents from one source, and what the source said about drawing them."""

    title: str
    latents: Tensor  # (n, D): a prior's draws, or a sampler's final chain states
    diagnostics: dict[str, Any] = field(default_factory=dict)  # plain data
    result: SampleResult | None = None  # a sampler's whole result (history (S, n, D), info)
    images: Tensor | None = None  # (n, C, H, W) decoder means on the CPU, once decoded


def draw(run: Run, source: Prior | Sampler, n: int, generator: torch.Generator, *,
         title: str) -> Draw:
    """``n`` latents ``(n, D)`` from ``source``: a prior's own ``sample`` (with a learned prior's
    :meth:`~ncpvae.LearnedPrior.sampling_info` as diagnostics), or a sampler run on
    ``run.prior`` (its final states; its diagnostics as plain data)."""
    if isinstance(source, Prior):
        with torch.no_grad():
            latents = source.sample(n, generator=generator)
        info = source.sampling_info() if isinstance(source, LearnedPrior) else {}
        return Draw(title, latents, to_plain_json(info))
    # under torchrun the chains are split across ranks and gathered in chain order
    result = source.sample_prior(run.prior, n, generator=generator, progress=not run.quiet,
                                 shards=run.dist.shards)
    return Draw(title, result.samples[-1].detach(), to_plain_json(result.diagnostics), result)


@torch.no_grad()
def decode(run: Run, z: Tensor, *, batch_size: int = 512) -> Tensor:
    """Decoder means of latents ``(n, D)``: images ``(n, C, H, W)`` in [0, 1], on the CPU
    (eval mode, ``batch_size`` latents per decoder call)."""
    model = run.model
    with eval_mode(model):
        return torch.cat([model.mean_image(model.decode(part.to(run.device))).cpu()
                          for part in z.split(batch_size)])


def sample_images(run: Run, source: Prior | Sampler, n: int, generator: torch.Generator, *,
                  title: str, batch_size: int = 512) -> Draw:
    """:func:`draw` then :func:`decode`: the draw with its ``images`` filled in."""
    result = draw(run, source, n, generator, title=title)
    result.images = decode(run, result.latents, batch_size=batch_size)
    return result


def sample_stage(run: Run) -> dict[str, Any]:
    """Stage 3: decode samples of the base prior, of the prior's own sampler (a learned prior)
    and of the run's sampler; plot them side by side; save the latents."""
    prior = run.prior
    n = run.config.sample.num_samples
    draws = [sample_images(run, prior.base_prior, n, run.generator(seeds.SAMPLE_BASE),
                           title=f"{prior.base_prior.name} (base prior)")]
    info: dict[str, Any] = {}
    if prior is not prior.base_prior:
        own = sample_images(run, prior, n, run.generator(seeds.SAMPLE_PRIOR),
                            title=f"{prior.name} by {prior.sampling_method}")
        draws.append(own)
        info.update(own.diagnostics)
        if run.sampler is not None:
            chains = sample_images(run, run.sampler, n, run.generator(seeds.SAMPLE_SAMPLER),
                                   title=f"{prior.name} by {run.sampler.label}")
            draws.append(chains)
            info["sampler"] = chains.diagnostics
    if run.is_writer:
        save_torch(run.directory.samples, {d.title: d.latents.detach().cpu() for d in draws})
        plots.plot_sample_panels({d.title: d.images for d in draws},
                                 run.directory.plot(files.PLOT_SAMPLES))
        run.directory.update_summary("samples", {"panels": [d.title for d in draws], **info})
    return info
