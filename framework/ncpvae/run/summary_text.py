"""What ``ncpvae train`` prints at the end: a short, aligned summary of a finished run.

Read from the run's ``summary.json`` and (when the evaluation ran) ``evaluation.json``, so it can
be printed for any run directory. Also: where ``ncpvae train RUN/config.toml`` (repeat a run)
writes when that run's own directory would be the output.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ncpvae.evaluation.format import accuracy_against_targets, instrument_status
from ncpvae.metrics.significance import FLAG, FLAG_SE, significantly_below
from ncpvae.run.directory import RunDirectory

__all__ = ["format_run_summary", "repeat_directory"]


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _num(value: Any, digits: int = 2) -> str:
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}"


def _pm(mean: Any, se: Any, digits: int = 2) -> str:
    return f"{_num(mean, digits)} ± {_num(se, digits)}" if se is not None else _num(mean, digits)


def _align(rows: list[tuple[str, str]], indent: str = "  ") -> list[str]:
    width = max(len(label) for label, _ in rows)
    return [f"{indent}{label.ljust(width)}  {text}".rstrip() for label, text in rows]


def _sampler_table(rows: list[dict[str, Any]]) -> list[str]:
    """One line per prior x sampler row: KID x 1e3 (± SE), MMD^2 and C2ST accuracy, and the
    Inception FID when the evaluation computed it."""
    inception = any("inception" in row for row in rows)
    table = [("", "KID ×10³", "MMD²", "C2ST acc", *(["Inception FID"] if inception else []))]
    for row in rows:
        q = row.get("sample_quality", {})
        fit = row.get("prior_fit", {})
        kid = _pm(q["kid"] * 1e3, q.get("kid_se", 0.0) * 1e3, 1) if "kid" in q else "-"
        mmd = _num(fit.get("mmd", {}).get("mmd2"), 4)
        c2st = _num(fit.get("c2st", {}).get("accuracy"), 2)
        fid = [_num(row.get("inception", {}).get("fid"), 1)] if inception else []
        table.append((str(row.get("label", "?")), kid, mmd, c2st, *fid))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return ["    " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]


def format_run_summary(run_dir: str | Path) -> str:
    """The end-of-run summary of ``run_dir`` (several lines, no trailing newline)."""
    run_dir = Path(run_dir)
    files = RunDirectory(run_dir)
    summary = _read(files.summary)
    evaluation = _read(files.evaluation)
    vae = {**summary.get("vae", {}), **evaluation.get("vae", {})}
    rows: list[tuple[str, str]] = []
    if "test_elbo" in vae:
        text = f"{_num(vae['test_elbo'])} nats per image"
        if "test_elbo_bits_per_dim" in vae:
            text += f" ({_num(vae['test_elbo_bits_per_dim'], 3)} bits/dim)"
        rows.append(("test ELBO", text))
    lik = evaluation.get("likelihood", {})
    parts = []
    for key in ("base", "prior"):
        if key in lik:
            e = lik[key]
            part = f"{e.get('prior', key)} {_pm(e['iw']['mean'], e['iw'].get('se'))}"
            if "iw_bits_per_dim" in e:
                part += f" ({_num(e['iw_bits_per_dim']['mean'], 3)} bits/dim)"
            parts.append(part)
    if parts:
        rows.append((f"IW bound (K = {lik.get('num_samples')})", ";  ".join(parts) + " nats"))
    if "active_units" in vae:
        dims = summary.get("vae", {}).get("latent_activity")
        rows.append(("active units", f"{vae['active_units']}"
                     + (f" of {len(dims)}" if isinstance(dims, list) else "")))
    lp = evaluation.get("learned_prior") or summary.get("prior_fit", {})
    if "delta" in lp:
        text = f"Delta = {_pm(lp['delta'], lp.get('delta_se'), 3)} nats"
        if significantly_below(lp["delta"], lp.get("delta_se")):
            text += f" {FLAG} more than {FLAG_SE:g} SE below 0: worse than the base prior"
        gain = lik.get("iw_gain")
        if gain:
            text += f";  IW bound gain {_pm(gain['mean'], gain.get('se'), 3)} nats"
        rows.append(("learned prior gain", text))
        parts = lp if "group_delta" in lp else summary.get("prior_fit", {})
        if "group_delta" in parts:  # a hierarchical prior's per-group gains (top group first)
            rows.append(("per-group Delta", ";  ".join(
                _pm(d, se, 3) for d, se in zip(parts["group_delta"], parts["group_delta_se"]))
                + " nats"))
    fr = evaluation.get("factor_recovery", {})
    if fr.get("accuracy_reconstruction"):
        rows.append(("factor recovery", "accuracy on reconstructions (originals): " + ", ".join(
            f"{k} {_num(v)} ({_num(fr.get('accuracy_original', {}).get(k))})"
            for k, v in fr["accuracy_reconstruction"].items())))
    net = evaluation.get("feature_net", {})
    if net.get("val_accuracy"):
        rows.append(("feature net", f"held-out accuracy {accuracy_against_targets(net)}; "
                     f"{instrument_status(net)}"
                     + ("; KID and factor recovery rest on it" if net.get("meets_target") is False
                        else "")))
    report = evaluation.get("report") or summary.get("evaluation", {}).get("report")
    lines = [f"run written to {run_dir}"]
    lines += _align(rows) if rows else []
    scored = [r for r in evaluation.get("rows", []) if "sample_quality" in r or "prior_fit" in r]
    if scored:
        lines.append("  prior x sampler (lower KID and MMD², C2ST accuracy nearer 0.5: better)")
        lines += _sampler_table(scored)
    if report:
        lines.append(f"  report: {run_dir / report}")
    return "\n".join(lines)


def repeat_directory(config_source: str | None, config_name: str, out: str | None,
                     overwrite: bool) -> tuple[Path | None, str | None]:
    """Where ``ncpvae train <config_source>`` writes when no ``--out`` is given.

    ``ncpvae train runs/X/config.toml`` repeats run X; its default output ``runs/<name>`` is
    often X itself. When the config file lies in that (existing) run directory and neither
    ``--out`` nor ``--overwrite`` is given, the repeat goes to the first free ``runs/<name>-2``,
    ``-3``, ...; returns that path and a note saying so, else ``(None, None)`` (the default)."""
    if out is not None or overwrite or config_source is None:
        return None, None
    source = Path(config_source)
    default = Path("runs") / config_name
    if not source.is_file() or not default.is_dir():
        return None, None
    if source.resolve().parent != default.resolve():
        return None, None
    k = 2
    while (default.parent / f"{default.name}-{k}").exists():
        k += 1
    target = default.parent / f"{default.name}-{k}"
    note = (f"{source} belongs to the run in {default}; repeating it in {target} (pass --out to "
            "choose the directory, or --overwrite to replace the old run)")
    return target, note
