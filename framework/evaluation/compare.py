"""``ncpvae compare-priors RUN``: fit several priors on one frozen VAE and compare them (MATH.md §7).

Every listed prior is built with the run's latent size, fitted (if it is a learned prior) on the
frozen encoder's outputs for the whole training set, and scored on the **same** held-out draws
``z_i ~ q(z|x_i)`` of test images:

- ``cross_entropy`` ``= mean_i -log p(z_i)`` (nats per latent vector), with ``log Z`` subtracted
  for unnormalized priors; its SE adds the SE of the mean and that of ``log Z`` in quadrature;
- ``gain`` over N(0, I), **paired**: the mean of ``log p(z_i) - log N(z_i; 0, I)`` over the same
  draws, with the SE of that mean (and ``log Z``'s); it equals the reduction of
  ``KL(q || prior)`` relative to N(0, I). Paired differences cancel the draw-to-draw spread that
  dominates the SE of each cross-entropy;
- ``fit_seconds`` and ``samples_per_second`` (``prior.sample`` throughput);
- for tilted priors over a learned base (``ncp:gmm``) also ``gain_over_base`` with its SE.

Spec syntax: a prior name (``gaussian`` = N(0, I), ``gmm``, ``flow``, ``ncp``, ``ebm``, any
registered prior) or ``tilted:base`` (``ncp:gmm``: NCP over a fitted GMM); ``run`` is the run's
own prior (fitted here if its checkpoint holds no fit). Each prior is built from its config
defaults; a jointly trained prior such as ``vamp`` can only be compared as ``run`` (it needs
the VAE it was trained with).

Not computed here (yet): the importance-weighted bound on held-out images and the KID of decoded
samples as paired differences; ``ncpvae evaluate`` gives both for the run's own prior.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ncpvae.config import validate_component
from ncpvae.errors import ConfigError
from ncpvae.factory import build_component
from ncpvae.io import to_plain_json, write_json, write_text
from ncpvae.prior import LearnedPrior, Prior
from ncpvae.registry import Registry
from ncpvae.run.build import Run, encode_source, heldout_latents, open_run

DEFAULT_PRIORS = ("gaussian", "gmm", "flow", "ncp", "ebm", "ncp:gmm")
#: seeds of the comparison's random streams (fits, held-out draws, log Z, sampling)
_FIT_SEED, _HELDOUT_SEED, _LOG_Z_SEED, _SAMPLE_SEED = 11, 12, 13, 14


def parse_spec(spec: str) -> dict[str, Any]:
    """``"ncp:gmm"`` -> ``{"name": "ncp", "base": {"name": "gmm"}}``; ``"gmm"`` -> ``{"name": "gmm"}``."""
    parts = [p.strip() for p in spec.split(":")]
    if not all(parts) or len(parts) > 2:
        raise ConfigError(f"compare-priors: bad prior spec '{spec}'; use a prior name such as "
                          f"'gmm' or 'tilted:base' such as 'ncp:gmm'")
    section: dict[str, Any] = {"name": parts[0]}
    if len(parts) == 2:
        section["base"] = {"name": parts[1]}
    return section


def _with_options(section: dict[str, Any], options: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``section`` with ``options[name]`` merged into it and into its base (recursively)."""
    out = {**section, **options.get(section["name"], {})}
    if isinstance(out.get("base"), dict):
        out["base"] = _with_options(out["base"], options)
    return out


def parse_options(items: list[str] | tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``["flow.epochs=30", "flow.flow_type=maf"]`` -> ``{"flow": {"epochs": 30, "flow_type":
    "maf"}}`` (values read as JSON when they parse, else as strings)."""
    import json

    options: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        name, dot, field = key.strip().partition(".")
        if not sep or not dot or not name or not field:
            raise ConfigError(f"compare-priors: bad option '{item}'; use PRIOR.FIELD=VALUE, "
                              f"e.g. flow.epochs=30")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        options.setdefault(name, {})[field] = value
    return options


def build_prior(spec: str, run: Run, registry: Registry,
                options: dict[str, dict[str, Any]] | None = None) -> Prior:
    """A fresh prior for ``spec`` with the run's latent size and device (``run``: the run's own);
    ``options[name]`` overrides config fields of every prior section called ``name``."""
    if spec == "run":
        return run.prior
    config = validate_component("prior", _with_options(parse_spec(spec), options or {}),
                                registry)
    ctx = run.build_context()
    ctx.image_shape = run.data.image_shape
    prior = build_component(config, "prior", ctx)
    assert isinstance(prior, Prior)
    prior.bind_model(run.model)
    return prior


def _mean_se(values: Tensor, extra_se: float = 0.0) -> tuple[float, float]:
    v = values.detach().to(torch.float64).reshape(-1)
    se = float(v.std() / math.sqrt(v.numel())) if v.numel() > 1 else math.inf
    return float(v.mean()), math.hypot(se, extra_se)


@torch.no_grad()
def score_prior(prior: Prior, heldout: Tensor, reference_log_prob: Tensor, *,
                log_z_samples: int | None, generator: torch.Generator) -> dict[str, float]:
    """Cross-entropy and paired gain over the reference on ``heldout`` ``(N, D)`` draws."""
    log_z, log_z_se = 0.0, 0.0
    if isinstance(prior, LearnedPrior) and not prior.normalized:
        log_z, log_z_se = prior.log_normalizer(log_z_samples, generator=generator)
    log_p = torch.cat([prior.log_prob(part) for part in heldout.split(65_536)]).double() - log_z
    cross_entropy, ce_se = _mean_se(-log_p, log_z_se)
    gain, gain_se = _mean_se(log_p - reference_log_prob.double(), log_z_se)
    return {"cross_entropy": cross_entropy, "cross_entropy_se": ce_se, "gain": gain,
            "gain_se": gain_se, "log_z": log_z, "log_z_se": log_z_se}


def compare_priors(run_dir: str | Path, priors: list[str] | tuple[str, ...] = DEFAULT_PRIORS, *,
                   overrides: list[str] | tuple[str, ...] = (), num_heldout: int | None = None,
                   num_train: int | None = None, options: dict[str, dict[str, Any]] | None = None,
                   num_speed_samples: int = 2000, log_z_samples: int | None = None,
                   out: str | Path | None = None, registry: Registry | None = None,
                   quiet: bool = False) -> dict[str, Any]:
    """Fit and score ``priors`` on the frozen VAE of ``run_dir``; write ``table.json``,
    ``table.md`` and ``gains.png`` into ``out`` (default ``RUN/compare_priors``) and return the
    table (``{"rows": [...], "num_heldout": ..., ...}``, plain data). ``num_heldout`` test images
    are scored (default all); learned priors are fitted on ``num_train`` training encodings
    (a seeded subset; default all). ``options`` (see :func:`parse_options`) override config
    fields per prior name."""
    from ncpvae.plugin_manager import get_plugin_manager

    registry = registry if registry is not None else get_plugin_manager().registry
    if not priors:
        raise ConfigError("compare-priors: no priors listed")
    run = open_run(run_dir, list(overrides), registry=registry, quiet=quiet)
    run.model.eval()
    for p in run.model.parameters():
        p.requires_grad_(False)
    n_test = len(run.data.test)
    n_held = n_test if num_heldout is None else min(int(num_heldout), n_test)
    if n_held < 2:
        raise ConfigError(f"compare-priors: need at least 2 held-out images, got {n_held}")
    heldout = heldout_latents(run, n_held, run.generator(_HELDOUT_SEED))
    reference = build_prior("gaussian", run, registry)
    reference_log_prob = reference.log_prob(heldout)
    mu, logvar = encode_source(run.model, run.data.train, run.device)
    if num_train is not None and num_train < len(mu):  # a seeded subset, for quicker fits
        keep = torch.randperm(len(mu), generator=torch.Generator().manual_seed(_FIT_SEED))
        keep = keep[: max(2, int(num_train))].to(mu.device)
        mu, logvar = mu[keep], logvar[keep]

    rows: list[dict[str, Any]] = []
    for spec in priors:
        prior = build_prior(spec, run, registry, options)
        fit_seconds = 0.0
        fit_summary: dict[str, Any] = {}
        if isinstance(prior, LearnedPrior) and (spec != "run" or not prior.is_fitted):
            started = time.perf_counter()
            fit_summary = dict(prior.fit(mu, logvar, generator=run.generator(_FIT_SEED),
                                         progress=not quiet))
            fit_seconds = time.perf_counter() - started
        row: dict[str, Any] = {"prior": spec, "label": prior.label,
                               "normalized": prior.normalized,
                               "sampling": prior.sampling_method,
                               "fit_seconds": fit_seconds}
        row.update(score_prior(prior, heldout, reference_log_prob, log_z_samples=log_z_samples,
                               generator=run.generator(_LOG_Z_SEED)))
        over_base = getattr(prior, "kl_gain_over_base", None)
        if callable(over_base) and getattr(prior, "base", None) is not prior.base_prior:
            delta, delta_se = over_base(heldout, num_samples=log_z_samples,
                                        generator=run.generator(_LOG_Z_SEED))
            row.update(gain_over_base=delta, gain_over_base_se=delta_se)
        started = time.perf_counter()
        with torch.no_grad():
            prior.sample(num_speed_samples, generator=run.generator(_SAMPLE_SEED))
        row["samples_per_second"] = num_speed_samples / max(time.perf_counter() - started, 1e-9)
        if isinstance(prior, LearnedPrior):
            row.update({f"sampling_{k}": v for k, v in prior.sampling_info().items()})
        if fit_summary:
            row["fit"] = fit_summary
        rows.append(row)

    result = {"run": str(run.directory.path) if run.directory is not None else str(run_dir),
              "num_heldout": n_held, "num_train": int(mu.shape[0]),
              "latent_dim": int(mu.shape[1]), "reference": "N(0, I)", "rows": rows,
              "options": options or {},
              "not_computed": ["iw_bound", "kid_paired_difference"]}
    result = to_plain_json(result)
    target = Path(out) if out is not None else (Path(run_dir) / "compare_priors")
    target.mkdir(parents=True, exist_ok=True)
    write_json(target / "table.json", result)
    write_text(target / "table.md", format_table(result))
    plot_gains(result, target / "gains.png")
    return result


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table of the comparison."""
    lines = [
        f"Held-out aggregate posterior: {result['num_heldout']} draws z ~ q(z|x) of test images "
        f"(the same draws for every row; gains are paired differences against N(0, I)).",
        "",
        "| prior | cross-entropy E_q[-log p] (nats) | gain over N(0, I) (nats) | gain over its "
        "base | fit (s) | samples/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        base = (f"{r['gain_over_base']:.3f} ± {r['gain_over_base_se']:.3f}"
                if "gain_over_base" in r else "")
        lines.append(f"| {r['label']} (`{r['prior']}`) | {r['cross_entropy']:.3f} ± "
                     f"{r['cross_entropy_se']:.3f} | {r['gain']:.3f} ± {r['gain_se']:.3f} | "
                     f"{base} | {r['fit_seconds']:.1f} | {r['samples_per_second']:.3g} |")
    lines += ["", "Not computed: " + ", ".join(result["not_computed"]) + "."]
    return "\n".join(lines) + "\n"


def plot_gains(result: dict[str, Any], path: str | Path) -> Path:
    """Bar chart of each prior's paired gain over N(0, I) with ±2 SE error bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ncpvae.plots.training import save_figure

    rows = result["rows"]
    fig = Figure(figsize=(max(4.0, 1.1 * len(rows) + 1.5), 3.4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    x = list(range(len(rows)))
    ax.bar(x, [r["gain"] for r in rows], yerr=[2 * r["gain_se"] for r in rows], capsize=4,
           color="tab:blue")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels([r["prior"] for r in rows], rotation=20)
    ax.set_ylabel("gain over N(0, I) (nats, ±2 SE)")
    ax.set_title(f"aggregate-posterior fit on {result['num_heldout']} held-out draws")
    return save_figure(fig, path)
