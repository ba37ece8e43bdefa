"""The evaluation stage: metrics of a trained run, ``evaluation.json`` and the report.

``evaluate_run(run)`` answers three questions about a run (sizes from its ``[evaluate]``
section, see :mod:`ncpvae.evaluation.config`):

- *Is the representation disentangled?* The metrics of the table
  (:mod:`ncpvae.evaluation.metrics_table`: beta-VAE, FactorVAE, MIG, DCI, SAP) on the encoder
  means ``model.encode(x)[0]`` (eval mode, no grad), for data with ground-truth factors.
- *Are the samples good?* For each row of the prior x sampler table (the base prior, e.g.
  N(0, I); and for a learned prior each configured sampler: NCP by SIR, ULA, MALA, ...), ``n``
  latents are drawn and decoded (decoder means; :mod:`ncpvae.run.sample`, the path the sample
  stage uses too) and compared with held-out test images on the features of a locally trained
  network (scaled to unit RMS on the held-out images, see :func:`feature_scale`): KID
  (unbiased, with SE), Fréchet distance, precision/recall, and for ground-truth data the
  coverage of the factor grid. The net is trained once per machine, dataset and net config and
  cached (``evaluate.cache_dir``, default the user cache folder of
  :func:`ncpvae.metrics.feature_net.default_cache_dir`); its held-out accuracy per factor
  against ``evaluate.feature_net.targets`` is the ``feature_net`` block of evaluation.json, and
  every number resting on the net carries an ``instrument`` entry (accuracy, target met);
  below target, a note and a logged warning say so. With ``evaluate.inception_weights`` (a
  local FID Inception file, :mod:`ncpvae.metrics.inception`) every row also gets Inception FID
  and KID; without it, a note says how to get the file. Rows are labelled by the components
  themselves (``prior.label``, ``sampler.label``); a sampler's ``acceptance_note`` is kept
  with its row.
- *Did the learned prior help?* Per row, MMD (permutation p-value) and a fresh classifier
  two-sample test between the row's latents and held-out encodings ``z ~ q(z|x)``; for a
  :class:`~ncpvae.LearnedPrior` its ``log Z`` and ``Delta`` over the base prior with SEs
  (:func:`ncpvae.run.fit.learned_prior_summary`); and the importance-weighted bound (K
  samples) and ELBO on held-out images under the run's prior and under its base prior, with
  their paired difference (``log Z``'s SE included for an unnormalized prior).

Every random draw is seeded from the run seed and a named offset of :mod:`ncpvae.run.seeds`
(``run.generator(offset)`` for torch, numpy Generators seeded by ``(seed, offset)``), so
evaluating the same run twice gives the same ``evaluation.json`` except its ``runtime`` section
(timings, cache hits).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ncpvae import metrics as M
from ncpvae import plots
from ncpvae.component import ComponentConfig
from ncpvae.errors import ConfigError, DataError, NcpvaeError, NotFittedError
from ncpvae.evaluation.config import EvaluateConfig, without_switch
from ncpvae.evaluation.metrics_table import DISENTANGLEMENT
from ncpvae.evaluation.report import write_report
from ncpvae.io import to_plain_json, write_json
from ncpvae.metrics.feature_net import accuracy_check, default_cache_dir
from ncpvae.metrics.likelihood import ImportanceSample
from ncpvae.model import reparameterize
from ncpvae.modes import eval_mode
from ncpvae.prior import LearnedPrior
from ncpvae.registry import Registry
from ncpvae.run import directory as files
from ncpvae.run import hooks, seeds
from ncpvae.run.build import Run, encode_source, open_run
from ncpvae.run.directory import RunDirectory
from ncpvae.run.fit import learned_prior_summary
from ncpvae.run.sample import sample_images
from ncpvae.run.vae_eval import EVAL_BATCH, evaluate_vae
from ncpvae.sampler import Sampler

#: version of the evaluation.json layout
FORMAT = 1
#: sampler diagnostics that measure time, moved to the runtime section
_TIMING_KEYS = ("wall_time_s", "chain_steps_per_s", "samples_per_s")
#: the subfolder of the user cache folder holding feature nets
FEATURE_NET_CACHE = "feature_nets"

_log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# seeding and timing


def _rng(run: Run, offset: int) -> np.random.Generator:
    return seeds.numpy_rng(run.config.seed, offset)


@contextlib.contextmanager
def _seeded_global_rng(run: Run, offset: int) -> Iterator[None]:
    """Seed the global RNG for code that draws from it (the objective's reparameterization in
    ``evaluate_vae``), and restore the caller's RNG state afterwards."""
    devices = [run.device] if run.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seeds.torch_seed(run.config.seed, offset))
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


def representation(run: Run) -> Callable[[Tensor], Tensor]:
    """``images (n, C, H, W) -> encoder means (n, D)`` on ``run.device`` (eval mode, no grad)."""
    model, device = run.model, run.device

    def represent(images: Tensor) -> Tensor:
        with eval_mode(model), torch.no_grad():
            return model.encode(images.to(device))[0]

    return represent


def requested_metrics(run: Run, notes: list[str]) -> tuple[str, ...]:
    """The disentanglement metrics to compute (``[evaluate.<metric>] enabled``); raises if one
    is required (``enabled = true``) on data without ground-truth factors."""
    cfg = run.config.evaluate
    switches = {spec.name: getattr(cfg, spec.name).enabled for spec in DISENTANGLEMENT}
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
    cfg = run.config.evaluate
    data = run.data.ground_truth
    represent = representation(run)
    out: dict[str, Any] = {}
    for index, spec in enumerate(DISENTANGLEMENT):
        if spec.name not in metrics:
            continue
        bar.set_postfix_str(spec.name)
        with clock(spec.name):
            config = without_switch(getattr(cfg, spec.name), spec.config)
            result = spec.compute(data, represent, config=config,
                                  seed=_rng(run, seeds.EVAL_METRICS + index),
                                  batch_size=cfg.batch_size)
        out[spec.name] = to_plain_json(result.to_dict())
        bar.update()
    return out


# ---------------------------------------------------------------------------------------------
# the feature network


def cache_directory(run: Run) -> Path:
    """Where the feature net is cached: ``evaluate.cache_dir``, or the ``feature_nets`` folder
    of the user cache (:func:`ncpvae.metrics.feature_net.default_cache_dir`: shared by every
    run on this machine, so a dataset's net is trained once)."""
    cfg = run.config.evaluate
    if cfg.cache_dir is not None:
        return Path(cfg.cache_dir).expanduser()
    return default_cache_dir() / FEATURE_NET_CACHE


def feature_net(run: Run, notes: list[str]) -> tuple[Any, dict[str, Any], bool]:
    """The cached feature net (or None), its plain-data description, and whether the cache hit.

    Ground-truth data: a factor classifier on ``num_train`` rendered images; labelled data: a
    label classifier on the first ``num_train`` training images; otherwise None (with a note).
    The description holds the held-out accuracy per head against ``feature_net.targets``
    (:func:`ncpvae.metrics.feature_net.accuracy_check`); a net below target adds a note and
    logs a warning.
    """
    net_cfg = run.config.evaluate.feature_net
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
    built: list[bool] = []

    def build_and_note() -> Any:  # a hit is a cache entry that loaded, not merely one present
        built.append(True)
        return build()

    net = M.cached_feature_net(cache_directory(run), key, build_and_note, device=run.device)
    hit = not built
    check = accuracy_check(net, net_cfg.targets)
    warning = check.warning()
    if warning is not None:
        notes.append(warning)
        _log.warning("%s: %s", run.config.name, warning)
    info = {"target": kind, "cache_key": key, "heads": list(net.spec.head_names),
            **check.to_dict(), "num_examples": net.info.get("num_examples"),
            "num_val": net.info.get("num_val"), "epochs_run": net.info.get("epochs_run"),
            "epochs_max": net_cfg.epochs, "val_history": net.info.get("val_history")}
    return net, to_plain_json(info), hit


def _feature_net_noted(run: Run, notes: list[str],
                       runtime: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """:func:`feature_net`, with the cache hit and the net's training time (when it was built,
    from its cache entry) put into ``runtime``."""
    net, net_info, hit = feature_net(run, notes)
    runtime["feature_net_cache_hit"] = hit
    if net is not None:
        runtime["feature_net_train_seconds"] = net.info.get("train_seconds")
    return net, net_info


def inception_net(run: Run, notes: list[str]) -> Any:
    """The FID Inception feature extractor of ``evaluate.inception_weights``
    (:func:`ncpvae.metrics.inception.load_inception`), or None with a note on how to get the
    weights when unset."""
    from ncpvae.metrics import inception  # torchvision's Inception only when asked for

    path = run.config.evaluate.inception_weights
    if path is None:
        notes.append(inception.HOW_TO_GET)
        return None
    return inception.load_inception(path, device=run.device)


def instrument(net_info: dict[str, Any]) -> dict[str, Any]:
    """What a number resting on the feature net carries beside it: a reference to the
    ``feature_net`` block of evaluation.json, its held-out accuracy per head, and whether it
    meets its targets (None: no target stated)."""
    return {"ref": "feature_net", "val_accuracy": net_info.get("val_accuracy", {}),
            "meets_target": net_info.get("meets_target")}


# ---------------------------------------------------------------------------------------------
# the prior x sampler table


@dataclass
class Row:
    """One table row: a label, and the sampler drawing it (None: exact base-prior samples)."""

    label: str
    sampler_config: ComponentConfig | None = None
    sampler: Sampler | None = None


def table_rows(run: Run) -> list[Row]:
    """The base prior, then (for a learned prior) one row per sampler; labels (the components'
    own :attr:`label` s) are unique."""
    cfg = run.config.evaluate
    prior = run.prior
    rows = [Row(prior.base_prior.label)]
    if prior is prior.base_prior:
        return rows
    samplers = list(cfg.samplers)
    own = run.config.sampler
    if cfg.include_run_sampler and own is not None and all(
            own.model_dump() != s.model_dump() for s in samplers):
        samplers.append(own)
    seen: dict[str, int] = {}
    for sampler_cfg in samplers:
        sampler = run.build_sampler(sampler_cfg)
        label = f"{prior.label} by {sampler.label}"
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            label = f"{label} ({seen[label]})"
        rows.append(Row(label, sampler_cfg, sampler))
    return rows


@dataclass
class Heldout:
    """The first ``n`` test images' encoder means ``mu`` ``(n, D)`` (one pass, in batches of
    ``batch_size`` = ``evaluate.batch_size``) and draws ``z ~ q(z|x)`` ``(n, D)`` of them,
    which every table row is compared with. The reconstruction terms and the factor recovery
    reuse the means where they encode the same images in the same batches."""

    mu: Tensor
    z: Tensor
    batch_size: int

    def means_in_batches_of(self, batch_size: int) -> Tensor | None:
        """``mu`` for a caller that encodes these images in batches of ``batch_size``, or None
        when it batches differently (an encoder may round differently per batch size)."""
        return self.mu if batch_size == self.batch_size else None


def heldout_encodings(run: Run, n: int) -> Heldout:
    """The encodings and draws ``z ~ q(z|x)`` of the first ``n`` test images (see
    :class:`Heldout`)."""
    batch_size = run.config.evaluate.batch_size
    mu, logvar = encode_source(run.model, run.data.test, run.device, limit=n,
                               batch_size=batch_size)
    z = reparameterize(mu, logvar, generator=run.generator(seeds.EVAL_HELDOUT))
    return Heldout(mu, z, batch_size)


def check_kid_sizes(cfg: EvaluateConfig, n_real: int) -> None:
    need = 2 * cfg.sample_quality.kid_num_subsets
    if min(cfg.num_samples, n_real) < need:
        raise ConfigError(
            f"KID with evaluate.sample_quality.kid_num_subsets = "
            f"{cfg.sample_quality.kid_num_subsets} needs at least {need} samples per side, got "
            f"evaluate.num_samples = {cfg.num_samples} and {n_real} held-out images; lower "
            "kid_num_subsets or raise the sizes")


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


def evaluate_rows(run: Run, rows: list[Row], net: Any, heldout_z: Tensor, clock: _Clock,
                  bar: tqdm, runtime: dict[str, Any], table: dict[str, Any],
                  net_info: dict[str, Any] | None = None,
                  inception: Any = None) -> list[dict[str, Any]]:
    """Draw, decode, score and plot every row of the prior x sampler table (``rows``, of
    :func:`table_rows`). Puts the feature scale and the factor coverage of as many held-out
    images (the ceiling of a row's coverage) into ``table``. A row's sample quality and
    coverage carry the net's :func:`instrument` entry (from ``net_info``); with an
    ``inception`` feature extractor (:func:`inception_net`) a row also gets Inception FID and
    KID against the same held-out images."""
    cfg = run.config.evaluate
    directory = run.directory
    assert directory is not None
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
        if inception is not None:
            from ncpvae.metrics.inception import inception_features, inception_scores

            with clock("Inception features of held-out images"):
                real_inception = inception_features(inception, real_images,
                                                    batch_size=cfg.batch_size)
    sq_cfg = without_switch(cfg.sample_quality, M.SampleQualityConfig)
    pf_cfg = without_switch(cfg.prior_fit, M.PriorFitConfig)
    entries = []
    for i, row in enumerate(rows):
        bar.set_postfix_str(row.label)
        entry: dict[str, Any] = {"label": row.label,
                                 "sampler": None if row.sampler_config is None
                                 else row.sampler_config.model_dump(mode="json")}
        if row.sampler is not None and row.sampler.acceptance_note is not None:
            entry["acceptance_note"] = row.sampler.acceptance_note
        source = row.sampler if row.sampler is not None else run.prior.base_prior
        with clock(f"draw: {row.label}"):
            drawn = sample_images(run, source, cfg.num_samples,
                                  run.generator(seeds.row_offset(i, seeds.ROW_DRAW)),
                                  title=row.label, batch_size=cfg.batch_size)
        z, images, diagnostics = drawn.latents, drawn.images, drawn.diagnostics
        assert images is not None
        timings = {k: diagnostics.pop(k) for k in _TIMING_KEYS if k in diagnostics}
        if timings:
            runtime.setdefault("sampler_timings", {})[row.label] = timings
        entry["diagnostics"] = diagnostics
        if not torch.isfinite(z).all():
            raise NcpvaeError(f"row '{row.label}': the sampler returned non-finite latents; "
                              "lower its step_size")
        plot = directory.eval_samples_plot(row.label)
        plots.plot_image_grid(images[:cfg.grid_size], plot, title=row.label)
        entry["plot"] = directory.relative(plot)
        if cfg.prior_fit.enabled:
            with clock(f"prior fit: {row.label}"):
                seed = _rng(run, seeds.row_offset(i, seeds.ROW_PRIOR_FIT))
                entry["prior_fit"] = to_plain_json(M.prior_fit(z, heldout_z, config=pf_cfg,
                                                               seed=seed).to_dict())
        if real_features is not None:
            with clock(f"sample quality: {row.label}"):
                fake = M.extract_features(net, images, batch_size=cfg.batch_size) / scale
                seed = _rng(run, seeds.row_offset(i, seeds.ROW_SAMPLE_QUALITY))
                entry["sample_quality"] = to_plain_json(M.sample_quality(
                    real_features, fake, config=sq_cfg, seed=seed).to_dict())
                entry["sample_quality"]["instrument"] = instrument(net_info or {})
                if coverage_on:
                    predicted = M.predict_factors(net, images, batch_size=cfg.batch_size)
                    entry["coverage"] = to_plain_json(M.factor_coverage(
                        predicted, gt.factor_sizes, factor_names=gt.factor_names).to_dict())
                    entry["coverage"]["instrument"] = instrument(net_info or {})
            if inception is not None:
                with clock(f"Inception: {row.label}"):
                    fake = inception_features(inception, images, batch_size=cfg.batch_size)
                    seed = _rng(run, seeds.row_offset(i, seeds.ROW_SAMPLE_QUALITY))
                    entry["inception"] = to_plain_json(inception_scores(
                        real_inception, fake, subset_size=sq_cfg.kid_subset_size,
                        num_subsets=sq_cfg.kid_num_subsets, seed=seed))
        entries.append(entry)
        bar.update()
    if coverage_on and real_images is not None:
        # the same classifier on as many real images: what a perfect sampler would reach
        predicted = M.predict_factors(net, real_images[:cfg.num_samples],
                                      batch_size=cfg.batch_size)
        reference = to_plain_json(M.factor_coverage(predicted, gt.factor_sizes,
                                                    factor_names=gt.factor_names).to_dict())
        table["coverage_reference"] = {**reference, "num_images": int(predicted.shape[0])}
    return entries


# ---------------------------------------------------------------------------------------------
# factor recovery


def heldout_factors(run: Run, n: int) -> tuple[Tensor, Tensor, bool]:
    """``n`` held-out images ``(n, C, H, W)``, their true factor indices ``(n, K)``, and
    whether they are test images: the first ``n`` test images when the test set knows its
    images' factors (``factors(index)``), else ``n`` images rendered from factors drawn with the
    ``EVAL_FACTOR_RECOVERY`` seed."""
    test, gt = run.data.test, run.data.ground_truth
    assert gt is not None
    known = getattr(test, "factors", None)
    if callable(known):
        index = torch.arange(min(n, len(test)))
        return test.get_batch(index), torch.as_tensor(known(index)).long(), True
    factors = gt.sample_factors(n, run.generator(seeds.EVAL_FACTOR_RECOVERY)).long()
    return gt.images_from_factors(factors), factors, False


def factor_recovery(run: Run, net: Any, notes: list[str], heldout: Heldout | None = None,
                    net_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The feature net's per-factor accuracy on reconstructions (decoder means of the encoder
    means, no draws) of ``num_heldout`` held-out images, absolute and relative to the originals
    (:func:`ncpvae.metrics.factor_recovery`), with the net's :func:`instrument` entry; {} (with
    a note) when it does not apply. When the held-out images are the test images of
    ``heldout``, its means are decoded (no second encoder pass)."""
    cfg = run.config.evaluate
    gt = run.data.ground_truth
    if not cfg.factor_recovery.enabled:
        return {}
    if gt is None:
        return {}  # the disentanglement note already says the data has no factors
    if net is None or tuple(net.spec.head_names) != tuple(gt.factor_names):
        notes.append("factor recovery skipped: it needs the feature net of the data's factors "
                     "(evaluate.sample_quality.enabled = true)")
        return {}
    images, factors, are_test_images = heldout_factors(run, cfg.num_heldout)
    model = run.model
    means = (heldout.means_in_batches_of(cfg.batch_size)
             if heldout is not None and are_test_images and len(heldout.mu) == len(images)
             else None)
    recon = []
    with eval_mode(model), torch.no_grad():
        for index in torch.arange(len(images)).split(cfg.batch_size):
            mu = (means[index] if means is not None
                  else model.encode(images[index].to(run.device))[0])
            recon.append(model.mean_image(model.decode(mu)).cpu())
    result = M.factor_recovery(net, images, torch.cat(recon), factors,
                               factor_sizes=gt.factor_sizes, batch_size=cfg.batch_size)
    return to_plain_json({**result.to_dict(), "instrument": instrument(net_info or {})})


# ---------------------------------------------------------------------------------------------
# learned prior and likelihood


def plot_group_gains(run: Run, summary: dict[str, Any]) -> None:
    """A hierarchical prior's per-group gains (``group_delta`` in ``summary``) as bars in
    ``plots/group_gains.png``; its path goes into ``summary["group_plot"]``."""
    if summary.get("group_delta") and run.directory is not None:
        path = run.directory.plot(files.PLOT_GROUP_GAINS)
        plots.plot_group_gains(summary["group_delta"], summary["group_delta_se"], path)
        summary["group_plot"] = run.directory.relative(path)


def learned_prior(run: Run, heldout_z: Tensor) -> dict[str, Any]:
    """A learned prior's ``log Z`` and ``Delta`` (with SEs) from one ``log Z`` estimate (see
    :func:`ncpvae.run.fit.learned_prior_summary`); {} for any other prior."""
    return to_plain_json(learned_prior_summary(
        run.prior, heldout_z, run.generator(seeds.EVAL_LOG_Z),
        num_samples=run.config.evaluate.log_z_samples))


def bits_per_dim_of(run: Run, nats: float) -> float | None:
    """``nats`` per test image (``-ELBO`` or ``-log p``) in bits/dim, with the formula the
    model's likelihood calls for (:meth:`ncpvae.LatentModel.bits_per_dim`); None when its
    likelihood is not one of 8-bit data (Bernoulli)."""
    num_dims = int(np.prod(run.data.test.image_shape))
    return run.model.bits_per_dim(float(nats), num_dims)


def _bound_in_bits(run: Run, bound: dict[str, Any]) -> dict[str, float] | None:
    """A bound ``{mean, se}`` in nats (log-likelihood, negative) as ``{mean, se}`` in bits/dim."""
    mean = bits_per_dim_of(run, -bound["mean"])
    if mean is None:
        return None
    zero = bits_per_dim_of(run, 0.0)
    assert zero is not None
    return {"mean": mean, "se": abs(bits_per_dim_of(run, bound["se"]) - zero)}


def likelihood(run: Run, log_z: tuple[float, float] | None,
               notes: list[str]) -> dict[str, Any]:
    """IW bound and ELBO per held-out image under the base prior and the run's prior (the same
    importance draws for both), and the paired gain of the run's prior over its base."""
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
    # one set of draws z ~ q(z|x), scored under every prior (paired differences)
    draws = ImportanceSample.draw(
        run.model, (run.data.test.get_batch(index).to(run.device)
                    for index in torch.arange(n).split(cfg.batch_size)),
        cfg.num_samples, generator=run.generator(seeds.EVAL_LIKELIHOOD))
    per_example = {key: draws.bounds(prior, normalizer)
                   for key, (prior, normalizer) in priors.items()}
    out: dict[str, Any] = {"num_examples": n, "num_samples": cfg.num_samples}
    for key, (prior, normalizer) in priors.items():
        iw, el = per_example[key]
        out[key] = {"prior": prior.name,
                    "iw": to_plain_json(M.summarize_bound(iw, cfg.num_samples,
                                                          normalizer).to_dict()),
                    "elbo": to_plain_json(M.summarize_bound(el, cfg.num_samples,
                                                            normalizer).to_dict())}
        for bound in ("iw", "elbo"):  # bits/dim for likelihoods of 8-bit data
            bits = _bound_in_bits(run, out[key][bound])
            if bits is not None:
                out[key][f"{bound}_bits_per_dim"] = to_plain_json(bits)
    if "prior" in priors:
        gain = per_example["prior"][0] - per_example["base"][0]
        out["iw_gain"] = to_plain_json(M.summarize_bound(gain, cfg.num_samples,
                                                         priors["prior"][1]).to_dict())
    return out


# ---------------------------------------------------------------------------------------------
# the whole evaluation


def _check_fitted(run: Run) -> None:
    prior = run.prior
    if isinstance(prior, LearnedPrior) and not prior.is_fitted:
        raise NotFittedError(
            f"the run's '{prior.name}' prior is not fitted; run `ncpvae fit-prior RUN` first, or "
            f"evaluate its base prior with `--set prior={prior.base_prior.name}`")


def summary_section(evaluation: dict[str, Any]) -> dict[str, Any]:
    """The short ``evaluation`` section of summary.json: headline numbers only."""
    d = evaluation.get("disentanglement", {})
    out: dict[str, Any] = {spec.summary_key: spec.headline_value(d[spec.name])
                           for spec in DISENTANGLEMENT if spec.name in d}
    vae = evaluation.get("vae", {})
    for key in ("test_recon", "test_elbo"):
        if key in vae:
            out[key] = vae[key]
    lik = evaluation.get("likelihood", {})
    if "test_elbo_bits_per_dim" in vae:
        out["test_elbo_bits_per_dim"] = vae["test_elbo_bits_per_dim"]
    for key in ("base", "prior"):
        if key in lik:
            out[f"iw_bound_{key}"] = lik[key]["iw"]["mean"]
            if "iw_bits_per_dim" in lik[key]:
                out[f"iw_bound_{key}_bits_per_dim"] = lik[key]["iw_bits_per_dim"]["mean"]
    lp = evaluation.get("learned_prior", {})
    if "delta" in lp:
        out["delta"], out["delta_se"] = lp["delta"], lp["delta_se"]
    recovery = evaluation.get("factor_recovery", {})
    if "recovery" in recovery:
        out["factor_recovery"] = recovery["recovery"]
        out["factor_accuracy_reconstruction"] = recovery["accuracy_reconstruction"]
    net = evaluation.get("feature_net", {})
    if net.get("val_accuracy"):
        out["feature_net_accuracy"] = net["val_accuracy"]
        out["feature_net_meets_target"] = net.get("meets_target")
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
    rows = table_rows(run)
    # loaded first: a wrong weights file fails before the long parts
    inception = inception_net(run, notes) if cfg.sample_quality.enabled else None
    bar = tqdm(total=len(metrics) + len(rows) + 3, desc="evaluate", unit="part",
               disable=run.quiet)
    evaluation: dict[str, Any] = {"format": FORMAT, "run": run.config.name,
                                  "dataset": run.config.data.name, "prior": run.prior.name,
                                  "config": cfg.model_dump(mode="json")}
    try:
        with eval_mode(run.model, run.prior):
            # the held-out images' one encoder pass (the draws every row is compared with)
            heldout = heldout_encodings(run, min(cfg.num_heldout, len(run.data.test)))
            bar.set_postfix_str("reconstruction")
            with clock("reconstruction"), _seeded_global_rng(run, seeds.EVAL_VAE):
                vae = evaluate_vae(run, cfg.num_heldout,
                                   means=heldout.means_in_batches_of(EVAL_BATCH))
            evaluation["vae"] = to_plain_json({k: v for k, v in vae.items()
                                               if k != "latent_activity"})
            if "test_elbo" in vae and bits_per_dim_of(run, -vae["test_elbo"]) is not None:
                evaluation["vae"]["test_elbo_bits_per_dim"] = bits_per_dim_of(
                    run, -vae["test_elbo"])
            bar.update()
            evaluation["disentanglement"] = disentanglement(run, metrics, clock, bar)
            with clock("feature net"):
                bar.set_postfix_str("feature net")
                net, net_info = (_feature_net_noted(run, notes, runtime)
                                 if cfg.sample_quality.enabled else (None, {}))
            runtime.setdefault("feature_net_cache_hit", False)
            evaluation["feature_net"] = net_info
            bar.update()
            with clock("learned prior"):
                evaluation["learned_prior"] = learned_prior(run, heldout.z)
                plot_group_gains(run, evaluation["learned_prior"])
            table: dict[str, Any] = {"feature_scale": None, "coverage_reference": None}
            evaluation["rows"] = evaluate_rows(run, rows, net, heldout.z, clock, bar, runtime,
                                               table, net_info,
                                               inception if net is not None else None)
            evaluation.update(table)
            hooks.boundary("evaluate")
            if net is None and cfg.factor_recovery.enabled and run.data.ground_truth is not None:
                with clock("feature net"):  # factor recovery wants it even without KID
                    net, net_info = _feature_net_noted(run, notes, runtime)
                evaluation["feature_net"] = net_info
            with clock("factor recovery"):
                evaluation["factor_recovery"] = factor_recovery(run, net, notes, heldout,
                                                                net_info)
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
    evaluation["report"] = run.directory.report(cfg.report).name
    runtime["seconds"] = clock.seconds
    runtime["total_seconds"] = time.perf_counter() - start
    evaluation["runtime"] = runtime
    evaluation = to_plain_json(evaluation)
    write_json(run.directory.evaluation, evaluation)
    write_report(run.directory.path, evaluation, run.config, fmt=cfg.report)
    run.directory.update_summary("evaluation", summary_section(evaluation))
    return evaluation


def evaluate_stage(run: Run) -> dict[str, Any]:
    """Stage 4 of ``ncpvae train``: the evaluation report, if ``evaluate.enabled``."""
    if not run.config.evaluate.enabled:
        return {}
    return evaluate_run(run)


def evaluate_command(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *,
                     quiet: bool = False, registry: Registry | None = None) -> Path:
    """``ncpvae evaluate RUN [--set evaluate.mig.num_train=2000 ...]``: open the run (its saved
    config plus ``overrides``), evaluate it, and return the report's path."""
    directory = RunDirectory.open(path)
    if not directory.checkpoint.is_file():
        raise DataError(f"'{directory.path}' has no checkpoint.pt: train it first with "
                        "`ncpvae train` (an interrupted run may have stopped before one epoch)")
    run = open_run(directory.path, overrides, registry=registry, quiet=quiet)
    # under torchrun: rank 0 evaluates alone, the other ranks wait and share its errors
    evaluation = run.dist.main_only(lambda: evaluate_run(run))
    return directory.path / run.dist.broadcast_object(
        evaluation["report"] if evaluation is not None else None)
