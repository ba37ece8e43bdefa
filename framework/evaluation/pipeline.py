"""The evaluation stage: metrics of a trained run, ``evaluation.json`` and the report.

``evaluate_run(run)`` answers three questions about a run (sizes from its ``[evaluate]``
section, see :mod:`ncpvae.evaluation.config`):

- *Is the representation disentangled?* beta-VAE, FactorVAE, MIG, DCI and SAP on the encoder
  means ``model.encode(x)[0]`` (eval mode, no grad), for data with ground-truth factors.
- *Are the samples good?* For each row of the prior x sampler table (the base prior, e.g.
  N(0, I); and for a learned prior each configured sampler: NCP by SIR, ULA, MALA, ...), ``n``
  latents are drawn and decoded (decoder means) and compared with held-out test images on the
  features of a locally trained network (scaled to unit RMS on the held-out images, see
  :func:`feature_scale`): KID (unbiased, with SE), Fréchet distance, precision/recall, and for
  ground-truth data the coverage of the factor grid. The net is trained once per dataset and
  cached (``evaluate.cache_dir``, default ``<run>/cache``).
- *Did the learned prior help?* Per row, MMD (permutation p-value) and a fresh classifier
  two-sample test between the row's latents and held-out encodings ``z ~ q(z|x)``; for NCP
  ``log Z`` and ``Delta = E_q[f] - log Z`` with SEs; and the importance-weighted bound (K
  samples) and ELBO on held-out images under the run's prior and under its base prior, with
  their paired difference (``log Z``'s SE included for NCP).

Every random draw is seeded from the run seed (``run.generator(offset)`` for torch, numpy
Generators seeded by ``(seed, offset)``), so evaluating the same run twice gives the same
``evaluation.json`` except its ``runtime`` section (timings, cache hits).
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ncpvae.component import BuildContext, ComponentConfig
from ncpvae.errors import ConfigError, DataError, NcpvaeError, NotFittedError
from ncpvae.evaluation.config import DISENTANGLEMENT_METRICS, EvaluateConfig
from ncpvae.io import write_json
from ncpvae.metrics._common import eval_mode
from ncpvae.registry import Registry
from ncpvae.run.stages import Run, encode_source, evaluate_vae, open_run
from ncpvae.sampler import Sampler

#: version of the evaluation.json layout
FORMAT = 1
#: offsets of ``run.generator`` / the numpy seeds (the runner's stages use 0..9)
_OFFSET_METRICS = 100  # + index of the disentanglement metric
_OFFSET_HELDOUT = 110
_OFFSET_LOG_Z = 111
_OFFSET_LIKELIHOOD = 112
_OFFSET_VAE = 113
_OFFSET_ROWS = 120  # + 10 * row index (+0 draws, +1 prior fit, +2 sample quality)
#: sampler diagnostics that measure time, moved to the runtime section
_TIMING_KEYS = ("wall_time_s", "chain_steps_per_s", "samples_per_s")


# ---------------------------------------------------------------------------------------------
# plain data


def plain(value: Any) -> Any:
    """JSON-ready copy: tensors and numpy values to Python numbers/lists, tuples to lists,
    non-finite floats to None (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Tensor):
        return plain(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def _rng(run: Run, offset: int) -> np.random.Generator:
    return np.random.default_rng([run.config.seed, offset])


@contextlib.contextmanager
def _seeded_global_rng(run: Run, offset: int) -> Iterator[None]:
    """Seed the global RNG for code that draws from it (the objective's reparameterization in
    ``evaluate_vae``), and restore the caller's RNG state afterwards."""
    devices = [run.device] if run.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(run.config.seed * 1000 + offset)
        yield


class _Clock:
    """Seconds per evaluation part (kept in the runtime section only)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, part: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# representation and disentanglement


def representation(run: Run):
    """``images (n, C, H, W) -> encoder means (n, D)`` on ``run.device`` (eval mode, no grad)."""
    model, device = run.model, run.device

    def represent(images: Tensor) -> Tensor:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            mu = model.encode(images.to(device))[0]
        model.train(was_training)
        return mu

    return represent


def requested_metrics(run: Run, notes: list[str]) -> tuple[str, ...]:
    """The disentanglement metrics to compute (``[evaluate.<metric>] enabled``); raises if one
    is required (``enabled = true``) on data without ground-truth factors."""
    cfg = run.config.evaluate
    switches = {m: getattr(cfg, m).enabled for m in DISENTANGLEMENT_METRICS}
    if run.data.ground_truth is None:
        required = [m for m, on in switches.items() if on]
        data_name = run.config.data.name
        if required:
            raise DataError(
                f"evaluate.{required[0]}.enabled = true, but the '{data_name}' dataset has no "
                "ground-truth factors; unset it or use a dataset with factors (sprites, dsprites)")
        if any(on is None for on in switches.values()):
            notes.append(f"disentanglement metrics skipped: the '{data_name}' dataset has no "
                         "ground-truth factors")
        return ()
    return tuple(m for m, on in switches.items() if on is not False)


def disentanglement(run: Run, metrics: tuple[str, ...], clock: _Clock,
                    bar: tqdm) -> dict[str, Any]:
    """Every requested metric's full result (plain data), keyed by metric name."""
    from ncpvae import metrics as M

    cfg = run.config.evaluate
    data = run.data.ground_truth
    represent = representation(run)
    compute = {
        "beta_vae": (M.compute_beta_vae, M.BetaVAEConfig, cfg.beta_vae),
        "factor_vae": (M.compute_factor_vae, M.FactorVAEConfig, cfg.factor_vae),
        "mig": (M.compute_mig, M.MIGConfig, cfg.mig),
        "dci": (M.compute_dci, M.DCIConfig, cfg.dci),
        "sap": (M.compute_sap, M.SAPConfig, cfg.sap),
    }
    out: dict[str, Any] = {}
    for metric in metrics:
        bar.set_postfix_str(metric)
        fn, config_cls, sizes = compute[metric]
        index = DISENTANGLEMENT_METRICS.index(metric)
        with clock(metric):
            sizes = sizes.model_dump(exclude={"enabled"})
            result = fn(data, represent, config=config_cls(**sizes),
                        seed=_rng(run, _OFFSET_METRICS + index), batch_size=cfg.batch_size)
        out[metric] = plain(result.to_dict())
        bar.update()
    return out


# ---------------------------------------------------------------------------------------------
# the feature network


def cache_directory(run: Run) -> Path:
    """Where the feature net is cached: ``evaluate.cache_dir`` or ``<run>/cache``."""
    cfg = run.config.evaluate
    if cfg.cache_dir is not None:
        return Path(cfg.cache_dir).expanduser()
    assert run.directory is not None
    return run.directory.path / "cache"


def feature_net(run: Run, notes: list[str]) -> tuple[Any, dict[str, Any], bool]:
    """The cached feature net (or None), its plain-data description, and whether the cache hit.

    Ground-truth data: a factor classifier on ``num_train`` rendered images; labelled data: a
    label classifier on the first ``num_train`` training images; otherwise None (with a note).
    """
    from ncpvae import metrics as M

    cfg = run.config.evaluate
    net_cfg = M.FeatureNetConfig(**cfg.feature_net.model_dump())
    data = run.data
    if data.ground_truth is not None:
        kind = "factors"

        def build() -> Any:
            return M.feature_net_for_ground_truth(data.ground_truth, config=net_cfg,
                                                  device=run.device)
    elif data.train.labels is not None:
        kind = "labels"
        labels = data.train.labels.long()
        num_classes = int(labels.max()) + 1
        n = min(net_cfg.num_train, len(labels))

        def build() -> Any:
            return M.train_feature_net(data.train.get_batch, labels[:n], (num_classes,),
                                       image_shape=data.train.image_shape, head_names=("label",),
                                       config=net_cfg, device=run.device)
    else:
        notes.append(f"sample quality skipped: the '{run.config.data.name}' dataset has neither "
                     "ground-truth factors nor labels to train a feature network on")
        return None, {}, False
    key = M.feature_net_cache_key(run.config.data.name,
                                  {**run.config.data.model_dump(mode="json"), "target": kind},
                                  net_cfg)
    path = cache_directory(run) / f"{key}.pt"
    hit = path.is_file()
    net = M.cached_feature_net(cache_directory(run), key, build, device=run.device)
    info = {"target": kind, "cache_key": key, "heads": list(net.spec.head_names),
            "val_accuracy": dict(zip(net.spec.head_names, net.info.get("val_accuracy", []))),
            "num_examples": net.info.get("num_examples")}
    return net, plain(info), hit


# ---------------------------------------------------------------------------------------------
# the prior x sampler table


@dataclass
class Row:
    """One table row: a label, and the sampler drawing it (None: exact base-prior samples)."""

    label: str
    sampler_config: ComponentConfig | None = None


def _sampler_label(run: Run, config: ComponentConfig) -> str:
    """The sampler's own short label (e.g. "MALA") where it sets one, else one derived here
    (the base class's label is the registry name: "sir" is shown as "SIR")."""
    label = getattr(_build_sampler(run, config), "label", None)
    if isinstance(label, str) and label and label != config.name:
        return label
    if config.name == "langevin":
        return "MALA" if getattr(config, "metropolis", False) else "ULA"
    return {"sir": "SIR", "sgld": "SGLD"}.get(config.name, config.name)


def _prior_label(config: ComponentConfig) -> str:
    if config.name == "gaussian":
        fields = config.model_dump()
        if (fields.get("mean") == 0.0 and fields.get("scale") == 1.0
                and not fields.get("learn_mean") and not fields.get("learn_scale")):
            return "N(0, I)"
    return config.name.upper() if config.name == "ncp" else config.name


def table_rows(run: Run) -> list[Row]:
    """The base prior, then (for a learned prior) one row per sampler; labels are unique."""
    cfg = run.config.evaluate
    prior_cfg = run.config.prior
    learned = run.prior is not run.prior.base_prior
    base_cfg = getattr(prior_cfg, "base", prior_cfg) if learned else prior_cfg
    rows = [Row(_prior_label(base_cfg))]
    if not learned:
        return rows
    samplers = list(cfg.samplers)
    own = run.config.sampler
    if cfg.include_run_sampler and own is not None and all(
            own.model_dump() != s.model_dump() for s in samplers):
        samplers.append(own)
    seen: dict[str, int] = {}
    for sampler_cfg in samplers:
        label = f"{_prior_label(prior_cfg)} by {_sampler_label(run, sampler_cfg)}"
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            label = f"{label} ({seen[label]})"
        rows.append(Row(label, sampler_cfg))
    return rows


def _build_sampler(run: Run, config: ComponentConfig) -> Sampler:
    from ncpvae.factory import build_component

    ctx = BuildContext(latent_dim=run.config.latent_dim, device=run.device, seed=run.config.seed,
                       registry=run.registry)
    return build_component(config, "sampler", ctx)  # type: ignore[return-value]


def draw_row(run: Run, row: Row, n: int, generator: torch.Generator) -> tuple[Tensor, dict]:
    """``n`` latents ``(n, D)`` of one row and the sampler's diagnostics (plain data)."""
    prior = run.prior
    if row.sampler_config is None:
        with torch.no_grad():
            return prior.base_prior.sample(n, generator=generator), {}
    sampler = _build_sampler(run, row.sampler_config)
    result = sampler.sample_prior(prior, n, generator=generator, progress=not run.quiet)
    return result.samples[-1].detach(), plain(result.diagnostics)


@torch.no_grad()
def decode(run: Run, z: Tensor) -> Tensor:
    """Decoder means of latents ``(n, D)``: images ``(n, C, H, W)`` in [0, 1], on the CPU."""
    size = run.config.evaluate.batch_size
    return torch.cat([run.model.mean_image(run.model.decode(part.to(run.device))).cpu()
                      for part in z.split(size)])


def heldout_encodings(run: Run, n: int) -> Tensor:
    """Draws ``z ~ q(z|x)`` ``(n, D)`` for the first ``n`` test images."""
    mu, logvar = encode_source(run.model, run.data.test, run.device, limit=n,
                               batch_size=run.config.evaluate.batch_size)
    generator = run.generator(_OFFSET_HELDOUT)
    noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * noise


def check_kid_sizes(cfg: EvaluateConfig, n_real: int) -> None:
    need = 2 * cfg.sample_quality.kid_num_subsets
    if min(cfg.num_samples, n_real) < need:
        raise ConfigError(
            f"KID with evaluate.sample_quality.kid_num_subsets = "
            f"{cfg.sample_quality.kid_num_subsets} needs at least {need} samples per side, got "
            f"evaluate.num_samples = {cfg.num_samples} and {n_real} held-out images; lower "
            "kid_num_subsets or raise the sizes")


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_") or "row"


def feature_scale(real: np.ndarray) -> float:
    """The RMS coordinate ``sqrt(mean_i |x_i|^2 / F)`` of held-out features ``(n, F)``.

    Features are divided by it before KID and the Fréchet distance: KID's cubic kernel
    ``(x.y / F + 1)^3`` assumes features of about unit scale (as Inception's are), while a
    small net's ReLU features can be much larger, which would make KID numbers of order 10^2
    dominated by the cubic term. One scalar from real images only: every row is scaled alike,
    precision/recall are unchanged. 1 if the features are all zero.
    """
    rms = float(np.sqrt(np.mean(np.sum(real**2, axis=1)) / real.shape[1]))
    return rms if rms > 0 else 1.0


def evaluate_rows(run: Run, net: Any, heldout_z: Tensor, clock: _Clock, bar: tqdm,
                  runtime: dict[str, Any], table: dict[str, Any]) -> list[dict[str, Any]]:
    """Draw, decode, score and plot every row of the prior x sampler table. Puts the feature
    scale and the factor coverage of as many held-out images (the ceiling of a row's coverage)
    into ``table``."""
    from ncpvae import metrics as M
    from ncpvae.plots import plot_image_grid

    cfg = run.config.evaluate
    assert run.directory is not None
    n_real = min(cfg.num_heldout, len(run.data.test))
    real_features = real_images = None
    gt = run.data.ground_truth
    coverage_on = net is not None and gt is not None and tuple(net.spec.head_names) == tuple(
        gt.factor_names)
    if net is not None and cfg.sample_quality.enabled:
        check_kid_sizes(cfg, n_real)
        with clock("features of held-out images"):
            real_images = run.data.test.get_batch(torch.arange(n_real))
            real_features = M.extract_features(net, real_images, batch_size=cfg.batch_size)
            scale = feature_scale(real_features)
            real_features = real_features / scale
            table["feature_scale"] = scale
    sq_cfg = M.SampleQualityConfig(**cfg.sample_quality.model_dump(exclude={"enabled"}))
    pf_cfg = M.PriorFitConfig(**cfg.prior_fit.model_dump(exclude={"enabled"}))
    rows = []
    for i, row in enumerate(table_rows(run)):
        bar.set_postfix_str(row.label)
        offset = _OFFSET_ROWS + 10 * i
        entry: dict[str, Any] = {"label": row.label,
                                 "sampler": None if row.sampler_config is None
                                 else row.sampler_config.model_dump(mode="json")}
        with clock(f"draw: {row.label}"):
            z, diagnostics = draw_row(run, row, cfg.num_samples, run.generator(offset))
        timings = {k: diagnostics.pop(k) for k in _TIMING_KEYS if k in diagnostics}
        if timings:
            runtime.setdefault("sampler_timings", {})[row.label] = timings
        entry["diagnostics"] = diagnostics
        if not torch.isfinite(z).all():
            raise NcpvaeError(f"row '{row.label}': the sampler returned non-finite latents; "
                              "lower its step_size")
        images = decode(run, z)
        plot = run.directory.plots / f"eval_samples_{_slug(row.label)}.png"
        plot_image_grid(images[:cfg.grid_size], plot, title=row.label)
        entry["plot"] = str(plot.relative_to(run.directory.path))
        if cfg.prior_fit.enabled:
            with clock(f"prior fit: {row.label}"):
                entry["prior_fit"] = plain(M.prior_fit(z, heldout_z, config=pf_cfg,
                                                       seed=_rng(run, offset + 1)).to_dict())
        if real_features is not None:
            with clock(f"sample quality: {row.label}"):
                fake = M.extract_features(net, images, batch_size=cfg.batch_size) / scale
                entry["sample_quality"] = plain(M.sample_quality(
                    real_features, fake, config=sq_cfg, seed=_rng(run, offset + 2)).to_dict())
                if coverage_on:
                    predicted = M.predict_factors(net, images, batch_size=cfg.batch_size)
                    entry["coverage"] = plain(M.factor_coverage(
                        predicted, gt.factor_sizes, factor_names=gt.factor_names).to_dict())
        rows.append(entry)
        bar.update()
    if coverage_on and real_images is not None:
        # the same classifier on as many real images: what a perfect sampler would reach
        predicted = M.predict_factors(net, real_images[:cfg.num_samples],
                                      batch_size=cfg.batch_size)
        reference = plain(M.factor_coverage(predicted, gt.factor_sizes,
                                            factor_names=gt.factor_names).to_dict())
        table["coverage_reference"] = {**reference, "num_images": int(predicted.shape[0])}
    return rows


# ---------------------------------------------------------------------------------------------
# learned prior and likelihood


def learned_prior(run: Run, heldout_z: Tensor) -> dict[str, Any]:
    """NCP's ``log Z`` and ``Delta`` (with SEs) from one ``log Z`` estimate; {} otherwise."""
    prior = run.prior
    if not hasattr(prior, "log_normalizer"):
        return {}
    cfg = run.config.evaluate
    log_z, log_z_se = prior.log_normalizer(cfg.log_z_samples,
                                           generator=run.generator(_OFFSET_LOG_Z))
    out = {"log_z": log_z, "log_z_se": log_z_se,
           "log_z_samples": cfg.log_z_samples or getattr(prior, "log_z_samples", None)}
    if hasattr(prior, "kl_gain"):
        # the same generator seed: kl_gain's log Z is the estimate above
        delta, delta_se = prior.kl_gain(heldout_z, num_samples=cfg.log_z_samples,
                                        generator=run.generator(_OFFSET_LOG_Z))
        out.update(delta=delta, delta_se=delta_se, num_encodings=int(heldout_z.shape[0]))
    return plain(out)


def likelihood(run: Run, log_z: tuple[float, float] | None,
               notes: list[str]) -> dict[str, Any]:
    """IW bound and ELBO per held-out image under the base prior and the run's prior (the same
    importance draws for both), and the paired gain of the run's prior over its base."""
    from ncpvae import metrics as M

    cfg = run.config.evaluate.likelihood
    n = min(cfg.num_examples, len(run.data.test))
    if n < 2:
        raise DataError("the likelihood bounds need at least 2 test images")
    priors = {"base": (run.prior.base_prior, None)}
    if run.prior is not run.prior.base_prior:
        if run.prior.normalized:
            priors["prior"] = (run.prior, None)
        elif log_z is not None:
            priors["prior"] = (run.prior, log_z)
        else:
            notes.append(f"likelihood under the '{run.prior.name}' prior skipped: it is "
                         "unnormalized and has no log Z estimate")
    per_example: dict[str, tuple[list[Tensor], list[Tensor]]] = {k: ([], []) for k in priors}
    for key, (prior, normalizer) in priors.items():
        # one generator per prior, seeded alike: both priors see the same z ~ q(z|x)
        generator = run.generator(_OFFSET_LIKELIHOOD)
        for index in torch.arange(n).split(cfg.batch_size):
            x = run.data.test.get_batch(index).to(run.device)
            iw, el = M.bounds(run.model, prior, x, cfg.num_samples, log_normalizer=normalizer,
                              generator=generator)
            per_example[key][0].append(iw.cpu())
            per_example[key][1].append(el.cpu())
    out: dict[str, Any] = {"num_examples": n, "num_samples": cfg.num_samples}
    for key, (prior, normalizer) in priors.items():
        iw, el = (torch.cat(v) for v in per_example[key])
        out[key] = {"prior": prior.name,
                    "iw": plain(M.summarize_bound(iw, cfg.num_samples, normalizer).to_dict()),
                    "elbo": plain(M.summarize_bound(el, cfg.num_samples, normalizer).to_dict())}
    if "prior" in priors:
        gain = torch.cat(per_example["prior"][0]) - torch.cat(per_example["base"][0])
        out["iw_gain"] = plain(M.summarize_bound(gain, cfg.num_samples,
                                                 priors["prior"][1]).to_dict())
    return out


# ---------------------------------------------------------------------------------------------
# the whole evaluation


def _check_fitted(run: Run) -> None:
    prior = run.prior
    if prior.requires_fit and not getattr(prior, "is_fitted", True):
        raise NotFittedError(
            f"the run's '{prior.name}' prior is not fitted; run `ncpvae fit-prior RUN` first, or "
            f"evaluate its base prior with `--set prior={prior.base_prior.name}`")


def summary_section(evaluation: dict[str, Any]) -> dict[str, Any]:
    """The short ``evaluation`` section of summary.json: headline numbers only."""
    d = evaluation.get("disentanglement", {})
    out: dict[str, Any] = {}
    for key, path in (("beta_vae", ("beta_vae", "eval_accuracy")),
                      ("factor_vae", ("factor_vae", "eval_accuracy")), ("mig", ("mig", "mig")),
                      ("dci_disentanglement", ("dci", "disentanglement")), ("sap", ("sap", "sap"))):
        if path[0] in d:
            out[key] = d[path[0]][path[1]]
    vae = evaluation.get("vae", {})
    for key in ("test_recon", "test_elbo"):
        if key in vae:
            out[key] = vae[key]
    lik = evaluation.get("likelihood", {})
    for key in ("base", "prior"):
        if key in lik:
            out[f"iw_bound_{key}"] = lik[key]["iw"]["mean"]
    lp = evaluation.get("learned_prior", {})
    if "delta" in lp:
        out["delta"], out["delta_se"] = lp["delta"], lp["delta_se"]
    kid = {r["label"]: r["sample_quality"]["kid"] for r in evaluation.get("rows", [])
           if "sample_quality" in r}
    if kid:
        out["kid"] = kid
    out["report"] = evaluation.get("report")
    out["seconds"] = evaluation.get("runtime", {}).get("total_seconds")
    return out


def evaluate_run(run: Run) -> dict[str, Any]:
    """Evaluate a trained (and, for a learned prior, fitted) run; see the module docstring.

    Writes ``<run>/evaluation.json`` (atomically), the per-row sample grids
    ``<run>/plots/eval_samples_*.png``, the report (``report.html``, or ``report.md`` with
    ``evaluate.report = "markdown"``), and an ``evaluation`` section of summary.json. Returns
    the evaluation as plain data.
    """
    from ncpvae.evaluation.report import write_report

    if run.directory is None:
        raise NcpvaeError("evaluate_run needs a run with a run directory (use open_run or train)")
    _check_fitted(run)
    cfg = run.config.evaluate
    start = time.perf_counter()
    clock = _Clock()
    notes: list[str] = []
    runtime: dict[str, Any] = {"torch_threads": torch.get_num_threads(),
                               "device": str(run.device)}
    metrics = requested_metrics(run, notes)
    rows_count = len(table_rows(run))
    bar = tqdm(total=len(metrics) + rows_count + 3, desc="evaluate", unit="part",
               disable=run.quiet)
    evaluation: dict[str, Any] = {"format": FORMAT, "run": run.config.name,
                                  "dataset": run.config.data.name, "prior": run.prior.name,
                                  "config": cfg.model_dump(mode="json")}
    try:
        with eval_mode(run.model, run.prior):
            bar.set_postfix_str("reconstruction")
            with clock("reconstruction"), _seeded_global_rng(run, _OFFSET_VAE):
                vae = evaluate_vae(run, cfg.num_heldout)
            run.model.eval()  # evaluate_vae leaves the model in training mode
            evaluation["vae"] = plain({k: v for k, v in vae.items() if k != "latent_activity"})
            bar.update()
            evaluation["disentanglement"] = disentanglement(run, metrics, clock, bar)
            with clock("feature net"):
                bar.set_postfix_str("feature net")
                net, net_info, hit = (feature_net(run, notes) if cfg.sample_quality.enabled
                                      else (None, {}, False))
            runtime["feature_net_cache_hit"] = hit
            evaluation["feature_net"] = net_info
            bar.update()
            heldout_z = heldout_encodings(run, min(cfg.num_heldout, len(run.data.test)))
            with clock("learned prior"):
                evaluation["learned_prior"] = learned_prior(run, heldout_z)
            table: dict[str, Any] = {"feature_scale": None, "coverage_reference": None}
            evaluation["rows"] = evaluate_rows(run, net, heldout_z, clock, bar, runtime, table)
            evaluation.update(table)
            lp = evaluation["learned_prior"]
            if cfg.likelihood.enabled:
                bar.set_postfix_str("likelihood")
                with clock("likelihood"):
                    log_z = (lp["log_z"], lp["log_z_se"]) if "log_z" in lp else None
                    evaluation["likelihood"] = likelihood(run, log_z, notes)
            bar.update()
    finally:
        bar.close()
    evaluation["notes"] = notes
    evaluation["report"] = "report.md" if cfg.report == "markdown" else "report.html"
    runtime["seconds"] = clock.seconds
    runtime["total_seconds"] = time.perf_counter() - start
    evaluation["runtime"] = runtime
    evaluation = plain(evaluation)
    write_json(run.directory.path / "evaluation.json", evaluation)
    write_report(run.directory.path, evaluation, run.config, fmt=cfg.report)
    run.directory.update_summary("evaluation", summary_section(evaluation))
    return evaluation


def evaluate_command(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *,
                     quiet: bool = False, registry: Registry | None = None) -> Path:
    """``ncpvae evaluate RUN [--set evaluate.mig.num_train=2000 ...]``: open the run (its saved
    config plus ``overrides``), evaluate it, and return the report's path."""
    from ncpvae.run.directory import RunDirectory

    directory = RunDirectory.open(path)
    if not directory.checkpoint.is_file():
        raise DataError(f"'{directory.path}' has no checkpoint.pt: train it first with "
                        "`ncpvae train` (an interrupted run may have stopped before one epoch)")
    run = open_run(directory.path, overrides, registry=registry, quiet=quiet)
    evaluation = evaluate_run(run)
    return directory.path / evaluation["report"]
