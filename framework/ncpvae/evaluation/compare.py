"""``ncpvae compare-priors RUN``: fit several priors on one frozen VAE and compare them (docs/metrics.md §6).

Every listed prior is built with the run's latent size, fitted (if it is a learned prior) on the
frozen encoder's outputs for the whole training set, and scored against N(0, I) on the **same**
draws, images and subsets (every difference below is paired: a per-draw / per-image /
per-subset difference, whose SE is the SE of that difference's mean, which cancels the spread
shared by both rows):

- aggregate-posterior fit on held-out draws ``z_i ~ q(z|x_i)`` of test images:
  ``cross_entropy`` ``= mean_i -log p(z_i)`` (nats per latent vector), with ``log Z``
  subtracted for unnormalized priors (its SE adds the SE of the mean and that of ``log Z`` in
  quadrature); ``gain`` ``= mean_i log p(z_i) - log N(z_i; 0, I)``, the reduction of
  ``KL(q || prior)`` relative to N(0, I); for tilted priors over a learned base (``ncp:gmm``)
  also ``gain_over_base``;
- importance-weighted bound on held-out images (:mod:`ncpvae.metrics.likelihood`): ``iw_bound``
  ``= mean_x L_K(x)`` (nats per image, ``log Z`` subtracted, its SE included) and ``iw_gain``
  ``= mean_x L_K(x; prior) - L_K(x; N(0, I))`` on the same importance draws ``z_s ~ q(z|x)``
  (the decoder runs once; each prior only adds its ``log p(z_s)``); ``iw_gain_se_unpaired``
  is what the SE would be without pairing. Its draws use the evaluation's likelihood seed, so
  with the run's ``[evaluate.likelihood]`` sizes (the default) the N(0, I) row equals
  ``ncpvae evaluate``'s base-prior bound;
- sample quality of decoded samples (decoder means of ``prior.sample``, e.g. SIR for NCP) on the
  run's feature net (:func:`ncpvae.evaluation.pipeline.feature_net`, cached): ``kid`` with its
  SE over ``B`` disjoint subsets of ``kid_samples`` decoded samples and as many real images at
  most (the first test images; ``kid_reference="train"``: training images, for data with a small
  test set) (each subset takes ``n_real / B`` real and ``n_fake / B`` decoded points;
  :func:`ncpvae.metrics.sample_quality.kid_blocks`), and ``kid_diff`` ``= KID(prior) -
  KID(N(0, I))`` averaged over the subsets, with the **same real subsets** for every row (the
  real-real term cancels exactly), its SE from the ``B`` per-subset differences
  (``kid_diff_se``; unpaired: ``kid_diff_se_unpaired``); plus the Fréchet distance and
  precision / recall (``min(n_real, n_fake)`` points per side);
- ``fit_seconds`` and ``samples_per_second`` (``prior.sample`` throughput).

Spec syntax: a prior name (``gaussian`` = N(0, I), ``gmm``, ``flow``, ``ncp``, ``ebm``, any
registered prior) or ``tilted:base`` (``ncp:gmm``: NCP over a fitted GMM); ``run`` is the run's
own prior (fitted here if its checkpoint holds no fit). Each prior is built from its config
defaults (``options`` override fields per prior name); a jointly trained prior such as
``vamp`` (``trained_with_vae``) can only be compared as ``run`` (it needs the VAE it was
trained with): any other spec naming it is refused in one line, before anything is fitted.
A row whose gain over N(0, I), or over its learned base, is more than 2 SE below 0 carries a
visible flag (:mod:`ncpvae.metrics.significance`).

Output (``RUN/compare_priors`` by default): ``table.json``, ``table.md``, ``gains.png`` and one
grid of decoded samples per prior, **rewritten after every prior** (atomically), so an
interrupted comparison keeps its finished rows (``"complete": false``, ``"pending"`` lists the
rest). A rerun with the same settings (checkpoint, sizes, seeds) reuses the rows of priors
already done with the same config (``fresh=True``: recompute all). When the run has a report
(``report.html`` / ``report.md``) and the output is the default folder, the report is rewritten
too, with the comparison table and figure.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ncpvae import metrics as M
from ncpvae.component import ComponentConfig
from ncpvae.defaults import shipped_default
from ncpvae.errors import ConfigError
from ncpvae.factory import build_component
from ncpvae.io import to_plain_json, write_json, write_text
from ncpvae.metrics.likelihood import ImportanceSample, LogNormalizer
from ncpvae.metrics.sample_quality import kid_blocks
from ncpvae.metrics.significance import FLAG, flag_notes, flag_text, gain_flags
from ncpvae.prior import LearnedPrior, Prior
from ncpvae.registry import Registry
from ncpvae.run import directory as files
from ncpvae.run import seeds
from ncpvae.run.build import Run, encode_source, heldout_latents, open_run
from ncpvae.run.directory import COMPARE_DIR, RunDirectory
from ncpvae.sections import validate_component

#: the priors compared when none are named (the shipped configs/defaults.toml)
DEFAULT_PRIORS: tuple[str, ...] = tuple(shipped_default("compare-priors", "priors"))
#: the N(0, I) prior every row is paired with (its spec, from the same file)
REFERENCE_PRIOR: str = shipped_default("compare-priors", "reference")
#: version of the table.json layout
FORMAT = 2
#: seeds of the comparison's random streams (fits, held-out draws, log Z, sampling speed, the
#: decoded samples of KID, KID's subsets); the IW draws use seeds.EVAL_LIKELIHOOD
_FIT_SEED, _HELDOUT_SEED, _LOG_Z_SEED, _SAMPLE_SEED, _KID_DRAW_SEED, _KID_SUBSET_SEED = (
    11, 12, 13, 14, 15, 16)
#: decoded samples per prior for KID (and real test images, at most the test set)
KID_SAMPLES = 10_000
#: KID's disjoint subsets (the SE of a paired difference has KID_SUBSETS - 1 degrees of freedom)
KID_SUBSETS = 20


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


def prior_config(spec: str, run: Run, registry: Registry,
                 options: dict[str, dict[str, Any]] | None = None) -> ComponentConfig:
    """The validated ``[prior]`` section of ``spec`` (``run``: the run's own)."""
    if spec == "run":
        return run.config.prior
    return validate_component("prior", _with_options(parse_spec(spec), options or {}), registry)


def _sections(config: Any) -> list[Any]:
    """``config`` and its bases (``[prior.base]``, recursively), outermost first."""
    chain = []
    while config is not None:
        chain.append(config)
        config = getattr(config, "base", None)
    return chain


def refuse_joint_prior(spec: str, config: ComponentConfig, run: Run, registry: Registry) -> None:
    """Raise a one-line :class:`ConfigError` when ``spec`` (not ``run``) is, or builds on, a
    prior trained jointly with the VAE (``trained_with_vae``, e.g. ``vamp``): with the VAE
    frozen there is nothing to fit, and its row would score an untrained initialisation."""
    if spec == "run":
        return
    for section in _sections(config):
        cls = registry.get("prior", section.name)
        if not getattr(cls, "trained_with_vae", False):
            continue
        own = {s.name for s in _sections(run.config.prior)}
        todo = ("this run was trained with it: compare its own prior as `run`" if cls.name in own
                else f"train a run with `--set prior={cls.name}` and compare its own prior as "
                     "`run`")
        raise ConfigError(
            f"compare-priors: '{spec}' cannot be compared post hoc: the {cls.name} prior's "
            f"{getattr(cls, 'joint_parameters', 'parameters')} are trained jointly with the "
            f"encoder, so a frozen VAE leaves it nothing to fit (its row would score an "
            f"untrained initialisation); {todo}")


def build_prior(spec: str, run: Run, registry: Registry,
                options: dict[str, dict[str, Any]] | None = None) -> Prior:
    """A fresh prior for ``spec`` with the run's latent size and device (``run``: the run's own);
    ``options[name]`` overrides config fields of every prior section called ``name``."""
    if spec == "run":
        return run.prior
    ctx = run.build_context()
    ctx.image_shape = run.data.image_shape
    prior = build_component(prior_config(spec, run, registry, options), "prior", ctx)
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


# ---------------------------------------------------------------------------------------------
# the importance-weighted bound and KID, paired against N(0, I)


def importance_sample(run: Run, num_examples: int, num_samples: int,
                      batch_size: int) -> ImportanceSample:
    """The held-out images' importance draws, shared by every prior: the first
    ``num_examples`` test images in batches of ``batch_size``, with the generator stream of
    :func:`ncpvae.evaluation.pipeline.likelihood` (one ``EVAL_LIKELIHOOD`` generator)."""
    images = (run.data.test.get_batch(index).to(run.device)
              for index in torch.arange(num_examples).split(batch_size))
    return ImportanceSample.draw(run.model, images, num_samples,
                                 generator=run.generator(seeds.EVAL_LIKELIHOOD))


@dataclass
class SampleQuality:
    """Real test-image features (scaled as the evaluation does) and the feature net."""

    net: Any
    real: np.ndarray  # (n_real, F)
    scale: float
    num_fake: int
    num_subsets: int
    batch_size: int

    @classmethod
    def prepare(cls, run: Run, num_samples: int, num_subsets: int, notes: list[str], *,
                reference: str = "test") -> SampleQuality | None:
        """The cached feature net and the features of the first ``min(num_samples, size)``
        images of the ``reference`` split (``test`` or ``train``); None (with a note) when the
        data has nothing to train a feature net on."""
        from ncpvae.evaluation.pipeline import feature_net, feature_scale

        net, _, _ = feature_net(run, notes)
        if net is None:
            return None
        source = run.data.test if reference == "test" else run.data.train
        n_real = min(num_samples, len(source))
        if min(n_real, num_samples) < 2 * num_subsets:
            raise ConfigError(f"compare-priors: KID with {num_subsets} subsets needs at least "
                              f"{2 * num_subsets} samples and {reference} images, got "
                              f"{num_samples} samples and {n_real} {reference} images; lower "
                              "--kid-subsets")
        batch = run.config.evaluate.batch_size
        real = M.extract_features(net, source.get_batch(torch.arange(n_real)),
                                  batch_size=batch)
        scale = feature_scale(real)
        return cls(net, real / scale, scale, num_samples, num_subsets, batch)

    def blocks(self, features: np.ndarray, run: Run) -> np.ndarray:
        """Per-subset KID ``(B,)`` of fake ``features``, on the same real subsets every call."""
        b = self.num_subsets
        return kid_blocks(self.real, features, real_size=self.real.shape[0] // b,
                          fake_size=features.shape[0] // b, num_subsets=b,
                          seed=seeds.numpy_rng(run.config.seed, _KID_SUBSET_SEED))

    def measure(self, prior: Prior, run: Run) -> tuple[dict[str, Any], np.ndarray, Tensor]:
        """Decode ``num_fake`` samples of ``prior``: its KID (with SE), Fréchet distance and
        precision/recall, the per-subset KID values ``(B,)`` and the first 64 images."""
        from ncpvae.run.sample import sample_images

        drawn = sample_images(run, prior, self.num_fake, run.generator(_KID_DRAW_SEED),
                              title=prior.label, batch_size=self.batch_size)
        assert drawn.images is not None
        fake = M.extract_features(self.net, drawn.images, batch_size=self.batch_size) / self.scale
        values = self.blocks(fake, run)
        m = min(self.real.shape[0], fake.shape[0])
        pr = M.precision_recall(self.real[:m], fake[:m])
        out = {"kid": float(values.mean()),
               "kid_se": float(values.std(ddof=1) / math.sqrt(len(values))),
               "frechet": M.frechet_distance(self.real, fake),
               "precision": pr.precision, "recall": pr.recall}
        return out, values, drawn.images[:64]


@dataclass
class Reference:
    """N(0, I)'s per-draw, per-image and per-subset values, which every row is paired with."""

    log_prob: Tensor  # (N_heldout,) log N(z_i; 0, I)
    iw: Tensor | None  # (N_iw,) per-image IW bounds
    iw_se: float
    kid_blocks: np.ndarray | None  # (B,)
    kid_se: float


def _paired(values: np.ndarray | Tensor, extra_se: float = 0.0) -> tuple[float, float]:
    v = torch.as_tensor(np.asarray(values), dtype=torch.float64)
    return _mean_se(v, extra_se)


def _checkpoint_digest(run: Run) -> str | None:
    if not run.is_writer or not run.directory.checkpoint.is_file():
        return None
    digest = hashlib.sha256()
    with open(run.directory.checkpoint, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _reusable_rows(target: Path, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The rows of an earlier comparison in ``target`` made with the same ``settings``, keyed
    by spec; {} if there is none or its settings differ."""
    import json

    path = target / files.COMPARE_TABLE
    if not path.is_file():
        return {}
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(old, dict) or old.get("settings") != to_plain_json(settings):
        return {}
    return {r["prior"]: r for r in old.get("rows", []) if isinstance(r, dict) and "prior" in r}


def _slug(spec: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in spec)


@dataclass(frozen=True)
class CompareSettings:
    """What ``ncpvae compare-priors`` compares and at which sizes (one field per CLI flag).

    ``priors``: prior specs (:func:`parse_spec`; ``run``: the run's own); ``overrides``:
    ``--set`` overrides of the run's config. Sizes: ``num_heldout`` test images' draws for the
    cross-entropy (default all); learned priors are fitted on ``num_train`` training encodings (a
    seeded subset; default all); the IW bound on ``iw_images`` test images with ``iw_samples``
    importance draws each (default: the run's ``[evaluate.likelihood]`` sizes; 0 images:
    skipped); KID on ``kid_samples`` decoded samples per prior and as many test images (at most
    the test set; ``kid_reference="train"``: training images) in ``kid_subsets`` subsets (0
    samples: skipped; skipped with a note when the data has neither factors nor labels for a
    feature net); ``num_speed_samples`` draws time ``prior.sample``; ``log_z_samples`` base draws
    for a learned prior's log Z (None: its default). ``options`` (see :func:`parse_options`)
    override config fields per prior name. Rows of an earlier comparison in ``out`` (default
    ``RUN/compare_priors``) with the same settings are reused unless ``fresh``.

    Bad settings raise :class:`ConfigError` when the object is made, before any run is opened.
    """

    priors: tuple[str, ...] = DEFAULT_PRIORS
    overrides: tuple[str, ...] = ()
    num_heldout: int | None = None
    num_train: int | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    num_speed_samples: int = 2000
    log_z_samples: int | None = None
    iw_images: int | None = None
    iw_samples: int | None = None
    kid_samples: int = KID_SAMPLES
    kid_subsets: int = KID_SUBSETS
    kid_reference: str = "test"
    fresh: bool = False
    out: str | Path | None = None
    quiet: bool = False

    def __post_init__(self) -> None:
        # sequences given as lists are kept as tuples (the settings are a value)
        object.__setattr__(self, "priors", tuple(self.priors))
        object.__setattr__(self, "overrides", tuple(self.overrides))
        object.__setattr__(self, "options", dict(self.options or {}))
        if not self.priors:
            raise ConfigError("compare-priors: no priors listed")
        if self.kid_samples < 0 or (self.kid_samples and self.kid_subsets < 2):
            raise ConfigError(f"compare-priors: need kid_samples >= 0 and kid_subsets >= 2, got "
                              f"{self.kid_samples} and {self.kid_subsets}")
        if self.kid_reference not in ("test", "train"):
            raise ConfigError(f"compare-priors: kid_reference must be 'test' or 'train', got "
                              f"'{self.kid_reference}'")


@dataclass(frozen=True)
class Sizes:
    """The settings' sizes resolved on one run (``None`` -> the whole split or the run's
    ``[evaluate.likelihood]`` sizes): held-out draws, fit encodings, IW images, draws, batch."""

    heldout: int
    train: int
    iw_images: int
    iw_samples: int
    iw_batch: int

    @classmethod
    def resolve(cls, run: Run, settings: CompareSettings) -> Sizes:
        n_test, n_train_all = len(run.data.test), len(run.data.train)
        n_held = n_test if settings.num_heldout is None else min(int(settings.num_heldout), n_test)
        if n_held < 2:
            raise ConfigError(f"compare-priors: need at least 2 held-out images, got {n_held}")
        lik = run.config.evaluate.likelihood
        n_iw = min(lik.num_examples if settings.iw_images is None else int(settings.iw_images),
                   n_test)
        k_iw = lik.num_samples if settings.iw_samples is None else int(settings.iw_samples)
        if n_iw == 1 or (n_iw and k_iw < 1):
            raise ConfigError(f"compare-priors: the IW bound needs at least 2 test images and 1 "
                              f"importance sample, got {n_iw} and {k_iw} (0 images: skip it)")
        n_fit = (n_train_all if settings.num_train is None
                 else max(2, min(int(settings.num_train), n_train_all)))
        return cls(n_held, n_fit, n_iw, k_iw, lik.batch_size)


def _table_settings(run: Run, settings: CompareSettings, sizes: Sizes) -> dict[str, Any]:
    """What an earlier table must match for its rows to be reused."""
    kid = settings.kid_samples
    return {"format": FORMAT, "checkpoint_sha256": _checkpoint_digest(run),
            "overrides": list(settings.overrides), "seed": run.config.seed,
            "num_heldout": sizes.heldout, "num_train": sizes.train,
            "log_z_samples": settings.log_z_samples,
            "num_speed_samples": settings.num_speed_samples,
            "iw": {"num_examples": sizes.iw_images, "num_samples": sizes.iw_samples,
                   "batch_size": sizes.iw_batch} if sizes.iw_images else None,
            "kid": {"num_samples": kid, "num_subsets": settings.kid_subsets,
                    "reference": settings.kid_reference} if kid else None}


class ComparisonTable:
    """The comparison as it is built: reused and finished rows in ``settings.priors`` order,
    written to ``target`` (table.json, table.md, gains.png, the run's report) after each row."""

    def __init__(self, run: Run, run_dir: str | Path, settings: CompareSettings, sizes: Sizes,
                 configs: dict[str, ComponentConfig], registry: Registry) -> None:
        self.run, self.registry, self.priors = run, registry, settings.priors
        self.target = (Path(settings.out) if settings.out is not None
                       else RunDirectory(Path(run_dir)).compare_priors)
        self.target.mkdir(parents=True, exist_ok=True)
        table_settings = _table_settings(run, settings, sizes)
        previous = {} if settings.fresh else _reusable_rows(self.target, table_settings)
        self.done: dict[str, dict[str, Any]] = {
            spec: previous[spec] for spec in self.priors if spec in previous
            and previous[spec].get("config") == configs[spec].model_dump(mode="json")}
        #: the notes of the table (skipped columns and rows), shown under it
        self.notes: list[str] = []
        self.result: dict[str, Any] = {
            "format": FORMAT,
            "run": str(run.directory.path) if run.is_writer else str(run_dir),
            "num_heldout": sizes.heldout, "num_train": sizes.train,
            "latent_dim": run.config.latent_dim, "reference": "N(0, I)", "rows": [],
            "pending": list(self.priors), "complete": False, "reused": sorted(self.done),
            "options": settings.options, "settings": table_settings, "iw": None, "kid": None,
            "notes": self.notes,
            "group_sizes": list(getattr(run.model, "group_sizes", []) or [])}

    @property
    def pending(self) -> list[str]:
        return [s for s in self.priors if s not in self.done]

    def add(self, spec: str, row: dict[str, Any]) -> None:
        self.done[spec] = to_plain_json(row)
        self.write()

    def write(self) -> None:
        self.result["rows"] = [self.done[s] for s in self.priors if s in self.done]
        self.result["pending"] = self.pending
        self.result["complete"] = not self.result["pending"]
        _write_outputs(self.run, self.target, to_plain_json(self.result), self.registry)


@dataclass
class Baseline:
    """What every row is scored on and paired with: the held-out draws ``(N, D)``, the N(0, I)
    prior with its config and measurements, the shared IW draws and the KID features."""

    heldout: Tensor
    prior: Prior
    config: dict[str, Any]
    reference: Reference
    draws: ImportanceSample | None
    bounds: tuple[Tensor, Tensor] | None  # N(0, I)'s per-image IW bound and ELBO
    quality: SampleQuality | None
    measured: tuple[dict[str, Any], np.ndarray, Tensor] | None  # N(0, I)'s SampleQuality.measure

    @classmethod
    def measure(cls, run: Run, settings: CompareSettings, sizes: Sizes, registry: Registry,
                table: ComparisonTable) -> Baseline:
        """Draw the held-out latents and the IW draws, prepare the KID features, and measure
        N(0, I) on them; records the IW and KID sizes in ``table``."""
        heldout = heldout_latents(run, sizes.heldout, run.generator(_HELDOUT_SEED))
        config = prior_config(REFERENCE_PRIOR, run, registry).model_dump(mode="json")
        prior = build_prior(REFERENCE_PRIOR, run, registry)
        reference = Reference(prior.log_prob(heldout), None, 0.0, None, 0.0)
        draws = (importance_sample(run, sizes.iw_images, sizes.iw_samples, sizes.iw_batch)
                 if sizes.iw_images else None)
        bounds = None
        if draws is not None:
            bounds = draws.bounds(prior, None)
            reference.iw = bounds[0]
            reference.iw_se = M.summarize_bound(reference.iw, sizes.iw_samples).se_data
            table.result["iw"] = {"num_examples": sizes.iw_images, "num_samples": sizes.iw_samples}
        kid, b = settings.kid_samples, settings.kid_subsets
        quality = (SampleQuality.prepare(run, kid, b, table.notes,
                                         reference=settings.kid_reference) if kid else None)
        measured = None
        if quality is not None:
            measured = quality.measure(prior, run)
            reference.kid_blocks = measured[1]
            reference.kid_se = measured[0]["kid_se"]
            n_real = int(quality.real.shape[0])
            table.result["kid"] = {"num_real": n_real, "num_fake": kid,
                                   "reference": settings.kid_reference, "num_subsets": b,
                                   "real_per_subset": n_real // b, "fake_per_subset": kid // b,
                                   "feature_scale": quality.scale}
        return cls(heldout, prior, config, reference, draws, bounds, quality, measured)


def _fit_prior(prior: Prior, spec: str, run: Run, encodings: Callable[[], tuple[Tensor, Tensor]],
               quiet: bool) -> tuple[float, dict[str, Any]]:
    """Fit a learned prior (``run``: only when its checkpoint holds no fit) on
    ``encodings()``: seconds, summary."""
    if not isinstance(prior, LearnedPrior) or (spec == "run" and prior.is_fitted):
        return 0.0, {}
    mu, logvar = encodings()
    started = time.perf_counter()
    summary = dict(prior.fit(mu, logvar, generator=run.generator(_FIT_SEED), progress=not quiet))
    return time.perf_counter() - started, summary


def _iw_columns(prior: Prior, spec: str, normalizer: LogNormalizer | None, base: Baseline,
                as_reference: bool, num_samples: int, notes: list[str]) -> dict[str, float]:
    """The IW bound, ELBO and paired IW gain over N(0, I) (empty when skipped)."""
    if base.draws is None or base.reference.iw is None:
        return {}
    if not prior.normalized and not isinstance(prior, LearnedPrior):
        notes.append(f"{spec}: IW bound skipped (an unnormalized prior without log Z)")
        return {}
    iw, elbo = (base.bounds if as_reference and base.bounds is not None
                else base.draws.bounds(prior, normalizer))
    own = M.summarize_bound(iw, num_samples, normalizer)
    gain = M.summarize_bound(iw - base.reference.iw, num_samples, normalizer)
    return {"iw_bound": own.mean, "iw_bound_se": own.se,
            "elbo": M.summarize_bound(elbo, num_samples, normalizer).mean,
            "iw_gain": gain.mean, "iw_gain_se": gain.se,
            "iw_gain_se_unpaired": math.hypot(own.se_data, base.reference.iw_se,
                                              own.se_log_normalizer)}


def _kid_columns(prior: Prior, spec: str, run: Run, base: Baseline, as_reference: bool,
                 target: Path) -> dict[str, Any]:
    """KID (with SE), Fréchet distance, precision/recall and the paired ΔKID over N(0, I); the
    decoded grid is plotted to ``target/samples_<spec>.png`` (empty when KID is skipped)."""
    if base.quality is None or base.reference.kid_blocks is None:
        return {}
    sq, values, grid = (base.measured if as_reference and base.measured is not None
                        else base.quality.measure(prior, run))
    diff, diff_se = _paired(values - base.reference.kid_blocks)
    plot = target / f"samples_{_slug(spec)}.png"
    _plot_grid(grid, plot, f"{prior.label} ({spec})")
    return {**sq, "kid_diff": diff, "kid_diff_se": diff_se,
            "kid_diff_se_unpaired": math.hypot(sq["kid_se"], base.reference.kid_se),
            "samples_plot": plot.name}


def _over_base_columns(prior: Prior, heldout: Tensor, log_z_samples: int | None,
                       run: Run) -> dict[str, float]:
    """A tilted prior over a learned base: its gain over that base (``ncp:gmm``)."""
    over_base = getattr(prior, "kl_gain_over_base", None)
    if not callable(over_base) or getattr(prior, "base", None) is prior.base_prior:
        return {}
    delta, delta_se = over_base(heldout, num_samples=log_z_samples,
                                generator=run.generator(_LOG_Z_SEED))
    return {"gain_over_base": delta, "gain_over_base_se": delta_se}


def _samples_per_second(prior: Prior, num_samples: int, run: Run) -> float:
    started = time.perf_counter()
    with torch.no_grad():
        prior.sample(num_samples, generator=run.generator(_SAMPLE_SEED))
    return num_samples / max(time.perf_counter() - started, 1e-9)


@dataclass
class RowScorer:
    """Scores one prior spec after another on the same run, baseline and settings."""

    run: Run
    settings: CompareSettings
    sizes: Sizes
    base: Baseline
    registry: Registry
    table: ComparisonTable

    @functools.cached_property
    def encodings(self) -> tuple[Tensor, Tensor]:
        """The training encodings, computed at the first learned prior's fit and kept."""
        return _train_encodings(self.run, self.sizes.train)

    def row(self, spec: str, config: ComponentConfig) -> dict[str, Any]:
        """Build (and fit) the prior of ``spec`` and score it: one row of the table."""
        run, settings, base = self.run, self.settings, self.base
        plain = config.model_dump(mode="json")
        as_reference = plain == base.config  # N(0, I) itself: reuse its measurements
        prior = base.prior if as_reference and spec != "run" else build_prior(
            spec, run, self.registry, settings.options)
        fit_seconds, fit_summary = _fit_prior(prior, spec, run, lambda: self.encodings,
                                               settings.quiet)
        row: dict[str, Any] = {"prior": spec, "label": prior.label, "config": plain,
                               "normalized": prior.normalized,
                               "sampling": prior.sampling_method, "fit_seconds": fit_seconds}
        row.update(score_prior(prior, base.heldout, base.reference.log_prob,
                               log_z_samples=settings.log_z_samples,
                               generator=run.generator(_LOG_Z_SEED)))
        normalizer = None if prior.normalized else (row["log_z"], row["log_z_se"])
        row.update(_iw_columns(prior, spec, normalizer, base, as_reference,
                               self.sizes.iw_samples, self.table.notes))
        row.update(_kid_columns(prior, spec, run, base, as_reference, self.table.target))
        row.update(_over_base_columns(prior, base.heldout, settings.log_z_samples, run))
        row["samples_per_second"] = _samples_per_second(prior, settings.num_speed_samples, run)
        if isinstance(prior, LearnedPrior):
            row.update({f"sampling_{k}": v for k, v in prior.sampling_info().items()})
        if fit_summary:
            row["fit"] = fit_summary
        return row


def compare_priors(run_dir: str | Path, settings: CompareSettings | None = None, *,
                   registry: Registry | None = None) -> dict[str, Any]:
    """Fit and score ``settings.priors`` on the frozen VAE of ``run_dir`` (see the module
    docstring and :class:`CompareSettings`); write ``table.json``, ``table.md``, ``gains.png``
    and ``samples_<prior>.png`` into ``settings.out`` (default ``RUN/compare_priors``) after
    every prior, and return the table (plain data: ``{"rows": [...], "complete": True, ...}``).
    """
    from ncpvae.plugin_manager import get_plugin_manager

    settings = settings if settings is not None else CompareSettings()
    registry = registry if registry is not None else get_plugin_manager().registry
    run = _open_frozen(run_dir, settings, registry)
    configs = {spec: prior_config(spec, run, registry, settings.options)  # fail early
               for spec in settings.priors}
    for spec, config in configs.items():
        refuse_joint_prior(spec, config, run, registry)
    sizes = Sizes.resolve(run, settings)
    table = ComparisonTable(run, run_dir, settings, sizes, configs, registry)
    table.write()
    if not table.pending:
        return to_plain_json(table.result)
    base = Baseline.measure(run, settings, sizes, registry, table)
    scorer = RowScorer(run, settings, sizes, base, registry, table)
    for spec in settings.priors:
        if spec not in table.done:
            table.add(spec, scorer.row(spec, configs[spec]))
    return to_plain_json(table.result)


def _open_frozen(run_dir: str | Path, settings: CompareSettings, registry: Registry) -> Run:
    """The run with its VAE in eval mode and without gradients (only priors are fitted)."""
    run = open_run(run_dir, list(settings.overrides), registry=registry, quiet=settings.quiet)
    run.model.eval()
    for p in run.model.parameters():
        p.requires_grad_(False)
    return run


def _train_encodings(run: Run, n: int) -> tuple[Tensor, Tensor]:
    """Encoder outputs ``(mu, logvar)`` ``(n, D)`` of the training set (a seeded subset when
    ``n`` is smaller)."""
    mu, logvar = encode_source(run.model, run.data.train, run.device)
    if n < len(mu):  # a seeded subset, for quicker fits
        keep = torch.randperm(len(mu), generator=torch.Generator().manual_seed(_FIT_SEED))
        keep = keep[:n].to(mu.device)
        mu, logvar = mu[keep], logvar[keep]
    return mu, logvar


def _plot_grid(images: Tensor, path: Path, title: str) -> None:
    from ncpvae import plots

    plots.plot_image_grid(images, path, title=title)


def _write_outputs(run: Run, target: Path, result: dict[str, Any], registry: Registry) -> None:
    """table.json, table.md, gains.png; and the run's report when ``target`` is its
    ``compare_priors`` folder and it has one."""
    write_json(target / files.COMPARE_TABLE, result)
    write_text(target / files.COMPARE_TABLE_MD, format_table(result))
    if result["rows"]:
        plot_gains(result, target / files.COMPARE_GAINS)
    directory = run.directory
    if not run.is_writer or target.resolve() != (directory.path / COMPARE_DIR).resolve():
        return
    from ncpvae.config import load_config
    from ncpvae.evaluation.report import write_report
    from ncpvae.io import read_json

    fmt = run.config.evaluate.report
    if directory.report(fmt).is_file() and directory.evaluation.is_file():
        write_report(directory.path, read_json(directory.evaluation, "evaluation"),
                     load_config(directory.config, [], registry), fmt=fmt)


def _pm(row: dict[str, Any], key: str, scale: float = 1.0, digits: int = 3) -> str:
    if row.get(key) is None:
        return ""
    return f"{row[key] * scale:.{digits}f} ± {row[key + '_se'] * scale:.{digits}f}"


def _flagged(text: str, flag: bool) -> str:
    return f"{text} {FLAG}" if flag else text


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table of the comparison (the rows finished so far), with what its columns
    mean; a row whose gain over N(0, I) or over its base is more than 2 SE below 0 carries a
    flag (:mod:`ncpvae.metrics.significance`), in its cells, a ``flag`` column and a note."""
    iw, kid = result.get("iw"), result.get("kid")
    lines = [
        f"Reference N(0, I); every difference is paired (same draws, images and subsets) and "
        f"its SE is that of the paired difference. Aggregate posterior: {result['num_heldout']} "
        f"held-out draws z ~ q(z|x) (nats per latent vector)."]
    groups = result.get("group_sizes") or []
    if len(groups) > 1:
        lines.append(f"This run's VAE is hierarchical ({len(groups)} latent groups of sizes "
                     f"{', '.join(map(str, groups))}, top first): flat priors model the "
                     f"concatenated latent z = (z_1, ..., z_{len(groups)}); `hierarchical` is "
                     f"the model's own top-down prior, `run` the run's prior.")
    if iw:
        lines.append(f"IW bound: {iw['num_examples']} test images, K = {iw['num_samples']} "
                     f"importance draws each (nats per image; higher is better).")
    if kid:
        lines.append(f"KID ×10³ (lower is better; ΔKID < 0: better than N(0, I)): "
                     f"{kid['num_fake']} decoded samples per prior vs {kid['num_real']} "
                     f"{kid.get('reference', 'test')} images in {kid['num_subsets']} subsets of "
                     f"{kid['fake_per_subset']} / "
                     f"{kid['real_per_subset']}.")
    header = ["prior", "cross-entropy", "gain over N(0, I)", "gain over base"]
    if iw:
        header += ["IW bound", "IW gain"]
    if kid:
        header += ["KID ×10³", "ΔKID ×10³", "precision / recall"]
    header += ["fit (s)", "samples/s"]
    flagged = any(gain_flags(r) for r in result["rows"])
    header += ["flag"] if flagged else []
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in result["rows"]:
        flags = gain_flags(r)
        cells = [f"{r['label']} (`{r['prior']}`)", _pm(r, "cross_entropy"),
                 _flagged(_pm(r, "gain"), "below N(0, I)" in flags),
                 _flagged(_pm(r, "gain_over_base"), "below its base" in flags)]
        if iw:
            cells += [_pm(r, "iw_bound", digits=2), _pm(r, "iw_gain")]
        if kid:
            pr = (f"{r['precision']:.3f} / {r['recall']:.3f}" if r.get("precision") is not None
                  else "")
            cells += [_pm(r, "kid", 1e3, 2), _pm(r, "kid_diff", 1e3, 2), pr]
        cells += [f"{r['fit_seconds']:.1f}", f"{r['samples_per_second']:.3g}"]
        cells += [flag_text(flags)] if flagged else []
        lines.append("| " + " | ".join(cells) + " |")
    if flagged:
        lines += ["", *[f"- {note}" for note in flag_notes(result["rows"])]]
    if result.get("pending"):
        lines += ["", "Not finished yet: " + ", ".join(result["pending"]) + "."]
    if result.get("notes"):
        lines += ["", *[f"- {n}" for n in result["notes"]]]
    return "\n".join(lines) + "\n"


def plot_gains(result: dict[str, Any], path: str | Path) -> Path:
    """One panel per paired difference against N(0, I) (aggregate-posterior gain, IW gain,
    ΔKID), each row's value with ±2 SE error bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ncpvae.plots.training import save_figure

    rows = result["rows"]
    panels = [("gain", 1.0, "gain over N(0, I) (nats)",
               f"aggregate posterior, {result['num_heldout']} draws")]
    if any(r.get("iw_gain") is not None for r in rows):
        panels.append(("iw_gain", 1.0, "IW bound gain (nats / image)", "held-out images"))
    if any(r.get("kid_diff") is not None for r in rows):
        panels.append(("kid_diff", 1e3, "ΔKID ×10³ (lower is better)", "decoded samples"))
    width = max(4.0, 0.55 * len(rows) + 1.8)
    fig = Figure(figsize=(min(width * len(panels), 13.0), 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    x = list(range(len(rows)))
    for ax, (key, scale, ylabel, title) in zip(axes, panels):
        values = [r[key] * scale if r.get(key) is not None else math.nan for r in rows]
        errors = [2 * r[key + "_se"] * scale if r.get(key) is not None else 0.0 for r in rows]
        ax.bar(x, values, yerr=errors, capsize=4, color="tab:blue")
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(x)
        ax.set_xticklabels([r["prior"] for r in rows], rotation=30, ha="right")
        ax.set_ylabel(ylabel + ", ±2 SE")
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
