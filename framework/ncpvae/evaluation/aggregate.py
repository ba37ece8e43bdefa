"""Mean ± SE over seeds of the headline numbers of finished runs (``ncpvae train --seeds``,
``ncpvae aggregate``).

A seeded run is bit-identical on one machine, not across machines: other CPUs run other
kernels and the training trajectory is chaotic, so the number to publish is the mean over seeds
with its standard error (docs/reproducibility.md). For a headline number with values
``v_1..v_n`` over ``n`` seeds::

    mean = sum(v_i) / n,   SE = SD / sqrt(n),   SD = sqrt(sum((v_i - mean)^2) / (n - 1))

(no SE for one seed). A number a seed lacks (e.g. a KID row of a sampler that diverged) is
left out of that number's mean, and its ``n`` says so.

The headline numbers of one run (:func:`headline_numbers`) are read from its summary.json and
evaluation.json: test ELBO and bits/dim, IW bounds and their gain, active units, Delta (of the
evaluation and of the fit), KID of every table row, factor recovery and the factor accuracy on
reconstructions. :func:`aggregate_runs` collects them over runs; :func:`write_aggregate` writes
``aggregate.json``, ``aggregate.md`` and a self-contained ``aggregate.html``;
:func:`format_aggregate` is the table ``ncpvae`` prints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ncpvae.config import read_toml
from ncpvae.errors import NcpvaeError
from ncpvae.evaluation.format import num, pm
from ncpvae.evaluation.report import heading, paragraph, render_html, render_markdown, table
from ncpvae.io import read_json, write_json, write_text
from ncpvae.run import progress
from ncpvae.run.directory import RunDirectory
from ncpvae.run.seed_sweep import config_differences

__all__ = ["FORMAT", "aggregate", "aggregate_runs", "format_aggregate", "headline_numbers",
           "mean_se", "write_aggregate"]

#: version of aggregate.json's layout
FORMAT = 1
#: significant digits of the printed numbers
DIGITS = 4
EXPLANATION = ("Mean ± SE over seeds: SE = sample SD / sqrt(n), n the number of seeds with the "
               "number. A seeded run is bit-identical on one machine, not across CPUs (other "
               "kernels; training is chaotic): publish the mean ± SE, not one seed's value.")


def _number(value: Any) -> float | None:
    """A finite int/float as a float; anything else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _get(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, Mapping):
            return None
        data = data.get(key)
    return data


def headline_numbers(summary: Mapping[str, Any],
                     evaluation: Mapping[str, Any]) -> list[tuple[str, str, float]]:
    """``(key, label, value)`` of every headline number a run has, in table order.

    ``summary`` and ``evaluation`` are the run's summary.json and evaluation.json (``{}`` when
    not evaluated). Values are read where ``ncpvae train`` reports them: the evaluation's
    section of summary.json first, then the training's (``vae``) and fit's (``prior_fit``)."""
    ev = _get(summary, "evaluation") or {}
    vae = {**(_get(summary, "vae") or {}), **(_get(evaluation, "vae") or {})}
    rows: list[tuple[str, str, Any]] = [
        ("test_elbo", "test ELBO (nats)", ev.get("test_elbo", vae.get("test_elbo"))),
        ("test_elbo_bits_per_dim", "test ELBO (bits/dim)",
         ev.get("test_elbo_bits_per_dim", vae.get("test_elbo_bits_per_dim"))),
        ("iw_bound_base", "IW bound, base prior (nats)", ev.get("iw_bound_base")),
        ("iw_bound_base_bits_per_dim", "IW bound, base prior (bits/dim)",
         ev.get("iw_bound_base_bits_per_dim")),
        ("iw_bound_prior", "IW bound, run's prior (nats)", ev.get("iw_bound_prior")),
        ("iw_bound_prior_bits_per_dim", "IW bound, run's prior (bits/dim)",
         ev.get("iw_bound_prior_bits_per_dim")),
        ("iw_gain", "IW bound gain (nats)", _get(evaluation, "likelihood", "iw_gain", "mean")),
        ("active_units", "active units", vae.get("active_units")),
        ("delta", "Delta, evaluation (nats)", ev.get("delta")),
        ("fit_delta", "Delta, fit (nats)", _get(summary, "prior_fit", "delta")),
    ]
    for label, value in (ev.get("kid") or {}).items():
        rows.append((f"kid/{label}", f"KID: {label}", value))
    recovery = _get(evaluation, "factor_recovery") or {}
    for factor, value in (ev.get("factor_recovery") or recovery.get("recovery") or {}).items():
        rows.append((f"factor_recovery/{factor}", f"factor recovery: {factor}", value))
    rows.append(("factor_recovery/mean", "factor recovery: mean", recovery.get("mean_recovery")))
    for factor, value in (recovery.get("accuracy_reconstruction") or {}).items():
        rows.append((f"reconstruction_accuracy/{factor}",
                     f"factor accuracy on reconstructions: {factor}", value))
    return [(key, label, v) for key, label, value in rows
            if (v := _number(value)) is not None]


def mean_se(values: Sequence[float]) -> tuple[float, float | None]:
    """The mean of ``values`` and its SE (sample SD / sqrt(n); None for one value)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_se of no values")
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, sd / math.sqrt(n)


def aggregate(per_seed: Mapping[int, Sequence[tuple[str, str, float]]], *,
              name: str | None = None,
              runs: Mapping[int, str] | None = None) -> dict[str, Any]:
    """The aggregate (aggregate.json's content) of ``{seed: headline_numbers(...)}``.

    ``metrics`` lists each number once, in the order the runs first name it: ``key``, ``label``,
    ``mean``, ``se`` (None for one seed), ``sd``, ``n`` and ``values`` (one per seed, in the
    order of ``seeds``; None where that seed lacks it)."""
    seeds = list(per_seed)
    labels: dict[str, str] = {}
    values: dict[str, dict[int, float]] = {}
    for seed, rows in per_seed.items():
        for key, label, value in rows:
            labels.setdefault(key, label)
            values.setdefault(key, {})[seed] = value
    metrics = []
    for key, label in labels.items():
        present = [values[key][s] for s in seeds if s in values[key]]
        mean, se = mean_se(present)
        metrics.append({"key": key, "label": label, "mean": mean, "se": se,
                        "sd": None if se is None else se * math.sqrt(len(present)),
                        "n": len(present), "values": [values[key].get(s) for s in seeds]})
    out: dict[str, Any] = {"format": FORMAT, "name": name, "seeds": seeds}
    if runs is not None:
        out["runs"] = [runs[s] for s in seeds]
    out["metrics"] = metrics
    out["note"] = EXPLANATION
    return out


def _read_run(path: Path) -> tuple[int, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A finished run's seed, raw config, summary and evaluation ({} when not evaluated)."""
    directory = RunDirectory.open(path)
    if progress.is_unfinished(directory):
        raise NcpvaeError(f"'{path}' holds an unfinished run ({progress.describe(directory)}); "
                          f"finish it with `ncpvae resume {path}` first")
    config = read_toml(directory.config)
    summary = directory.read_summary()
    evaluation = (read_json(directory.evaluation, "evaluation")
                  if directory.evaluation.is_file() else {})
    return int(config.get("seed", 0)), config, summary, evaluation


def aggregate_runs(paths: Sequence[str | Path]) -> dict[str, Any]:
    """The aggregate of finished runs of one config that differ in their seed alone (ordered by
    seed). Raises :class:`NcpvaeError` (one line) for an unfinished run, two runs of one seed,
    or runs of different configs."""
    if not paths:
        raise NcpvaeError("no run to aggregate; name the run directories of the seeds")
    read = {}
    first: tuple[Path, dict[str, Any]] | None = None
    for path in map(Path, paths):
        seed, config, summary, evaluation = _read_run(path)
        if seed in read:
            raise NcpvaeError(f"'{read[seed][0]}' and '{path}' are both runs of seed {seed}; "
                              "aggregate one run per seed")
        if first is None:
            first = (path, config)
        else:
            changed = config_differences(first[1], config, ignore=("seed",))
            if changed:
                what = "; ".join(f"{k} is {a!r} vs {b!r}" for k, a, b in changed[:3])
                raise NcpvaeError(f"'{first[0]}' and '{path}' differ in more than the seed "
                                  f"({what}); aggregate runs of one config")
        read[seed] = (path, headline_numbers(summary, evaluation))
    order = sorted(read)
    assert first is not None
    return aggregate({s: read[s][1] for s in order}, name=first[1].get("name"),
                     runs={s: str(read[s][0]) for s in order})


def _cells(agg: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The aggregate table: header and rows of strings (metric, mean ± SE, n, one per seed)."""
    header = ["metric", "mean ± SE", "n", *(f"seed {s}" for s in agg["seeds"])]
    rows = [[m["label"], pm(m["mean"], m["se"], DIGITS), str(m["n"]),
             *(num(v, DIGITS) for v in m["values"])] for m in agg["metrics"]]
    return header, rows


def _title(agg: Mapping[str, Any]) -> str:
    seeds = agg["seeds"]
    count = f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''}"
    return (f"{agg.get('name') or 'runs'}: mean ± SE over {count} "
            f"({', '.join(str(s) for s in seeds)})")


def _blocks(agg: Mapping[str, Any]) -> list:
    header, rows = _cells(agg)
    blocks = [heading(_title(agg), 1), paragraph(EXPLANATION), table(header, list(rows))]
    if agg.get("runs"):
        blocks.append(paragraph("Runs: " + ", ".join(agg["runs"])))
    return blocks


def format_aggregate(agg: Mapping[str, Any]) -> str:
    """The aggregate as aligned plain text (no trailing newline): a title line, then the
    table."""
    header, rows = _cells(agg)
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in (header, *rows)]
    return "\n".join([_title(agg), *("  " + line for line in lines)])


def write_aggregate(out: str | Path, agg: Mapping[str, Any]) -> list[Path]:
    """Write ``aggregate.json``, ``aggregate.md`` and ``aggregate.html`` into ``out`` (made if
    needed; each file written atomically); return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    blocks = _blocks(agg)
    return [write_json(out / "aggregate.json", agg),
            write_text(out / "aggregate.md", render_markdown(blocks)),
            write_text(out / "aggregate.html", render_html(blocks, out, _title(agg)))]
