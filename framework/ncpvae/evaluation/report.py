"""The evaluation report of a run: one self-contained HTML page (figures embedded as base64
PNGs, inline CSS, no external assets) or Markdown beside the PNGs.

Built from plain data only (``evaluation.json``, ``summary.json``, the resolved config and the
PNGs under ``plots/``), so it can be regenerated without the model. The content is assembled
once as a list of blocks (headings, paragraphs, tables whose cells may hold images, figures)
and then rendered to either format.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from ncpvae.evaluation.format import accuracy_against_targets, instrument_status, num, pm
from ncpvae.evaluation.metrics_table import DISENTANGLEMENT
from ncpvae.io import to_plain_json, write_text
from ncpvae.metrics.significance import FLAG, flag_notes, gain_flags
from ncpvae.run import directory as files
from ncpvae.run.directory import RunDirectory

# ---------------------------------------------------------------------------------------------
# the document model


@dataclass
class Image:
    """A PNG of the run directory (path relative to it), shown at ``width`` pixels."""

    path: str
    width: int = 260
    alt: str = ""
    thumbnail: bool = False


Cell = str | Image | None


@dataclass
class Block:
    kind: Literal["heading", "text", "table", "figure", "list"]
    text: str = ""
    level: int = 2
    header: list[str] = field(default_factory=list)
    rows: list[list[Cell]] = field(default_factory=list)
    items: list[str] = field(default_factory=list)
    image: Image | None = None


def heading(text: str, level: int = 2) -> Block:
    return Block("heading", text, level=level)


def paragraph(text: str) -> Block:
    return Block("text", text)


def table(header: list[str], rows: list[list[Cell]]) -> Block:
    return Block("table", header=header, rows=rows)


def figure(path: str, caption: str, width: int = 900) -> Block:
    return Block("figure", caption, image=Image(path, width, caption))


def bullet_list(items: list[str]) -> Block:
    return Block("list", items=items)


# ---------------------------------------------------------------------------------------------
# helpers


def _get(data: Mapping[str, Any] | None, *path: str) -> Any:
    for key in path:
        if not isinstance(data, Mapping) or key not in data:
            return None
        data = data[key]
    return data


def _compact(value: Any) -> str:
    """A config value on one line: tables as ``name(k=v, ...)``."""
    if isinstance(value, Mapping):
        inner = ", ".join(f"{k}={_compact(v)}" for k, v in value.items()
                          if k != "name" and v is not None)
        name = value.get("name")
        return f"{name}({inner})" if name else f"{{{inner}}}"
    if isinstance(value, list):
        return "[" + ", ".join(_compact(v) for v in value) + "]"
    return num(value) if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------
# the content


def config_summary(config: Mapping[str, Any]) -> Block:
    """Key hyperparameters: one line per section of the resolved config."""
    rows: list[list[Cell]] = [
        ["run", f"{config.get('name')} (seed {config.get('seed')}, device "
                f"{config.get('device')}, latent_dim {config.get('latent_dim')})"]]
    for section in ("data", "model", "objective", "prior", "sampler", "train", "sample"):
        if config.get(section) is not None:
            rows.append([section, _compact(config[section])])
    ev = config.get("evaluate", {})
    rows.append(["evaluate", (
        f"{ev.get('num_samples')} samples per row, {ev.get('num_heldout')} held-out images, IW "
        f"K = {_get(ev, 'likelihood', 'num_samples')} on "
        f"{_get(ev, 'likelihood', 'num_examples')} images, MIG {_get(ev, 'mig', 'num_train')} "
        f"points, DCI {_get(ev, 'dci', 'num_train')}/{_get(ev, 'dci', 'num_test')}, "
        f"feature net {_get(ev, 'feature_net', 'num_train')} images x at most "
        f"{_get(ev, 'feature_net', 'epochs')} epochs (stops on a plateau, patience "
        f"{_get(ev, 'feature_net', 'patience')})")])
    return table(["section", "settings"], rows)


def headline(evaluation: Mapping[str, Any]) -> Block:
    """The three questions, answered with the headline numbers."""
    items = []
    d = evaluation.get("disentanglement", {})
    if d:
        parts = [f"{spec.label} {num(spec.headline_value(d[spec.name]))}"
                 for spec in DISENTANGLEMENT if spec.name in d]
        items.append("Disentangled? " + ", ".join(parts) + " (Locatello et al. 2019 report "
                     "MIG 0.05–0.35, FactorVAE 0.6–0.75 for beta-VAEs on dSprites).")
    net = evaluation.get("feature_net") or {}
    caveat = (f" (The feature net behind these numbers: {instrument_status(net)}.)"
              if net.get("meets_target") is False else "")
    scored = [r for r in evaluation.get("rows", []) if "sample_quality" in r]
    if scored:
        best = min(scored, key=lambda r: r["sample_quality"]["kid"])
        others = "; ".join(f"{r['label']} {num(r['sample_quality']['kid'] * 1e3)}"
                           for r in scored if r is not best)
        kid = best["sample_quality"]
        items.append(f"Good samples? Lowest KID ×10³: {best['label']} "
                     f"({pm(kid['kid'] * 1e3, kid['kid_se'] * 1e3)})"
                     + (f"; {others}" if others else "") + " (lower is better)." + caveat)
    fr = evaluation.get("factor_recovery", {})
    if fr.get("recovery"):
        # what a person sees in the reconstruction grid: how often the net still names the
        # right factor value on a reconstruction (absolute), then the ratio to the originals
        items.append("Do reconstructions keep the factors? The feature net names the true "
                     "value on reconstructions for "
                     + ", ".join(f"{k} {num(fr['accuracy_reconstruction'][k], 2)} (originals "
                                 f"{num(fr['accuracy_original'][k], 2)}, chance "
                                 f"{num(fr['chance'][k], 2)})" for k in fr["recovery"])
                     + " of test images; reconstructions / originals: "
                     + ", ".join(f"{k} {num(v, 2)}" for k, v in fr["recovery"].items())
                     + " (1 = as recognisable as the originals)." + caveat)
    lp = evaluation.get("learned_prior", {})
    gain = _get(evaluation, "likelihood", "iw_gain")
    if "delta" in lp or gain:
        text = "Did the learned prior help? "
        if "delta" in lp:
            text += (f"Delta = E_q[f] − log Z = {pm(lp['delta'], lp['delta_se'])} nats "
                     "(> 0: the learned prior is closer to the aggregate posterior than its base)")
        if gain:
            text += (f"; IW bound gain over the base prior {pm(gain['mean'], gain['se'])} "
                     "nats per image")
        items.append(text + ".")
    return bullet_list(items)


def training_blocks(summary: Mapping[str, Any], run: RunDirectory) -> list[Block]:
    blocks: list[Block] = [heading("Training")]
    vae = summary.get("vae", {})
    if vae:
        blocks.append(table(["test ELBO", "test recon", "test KL", "active units", "epochs",
                             "train seconds"],
                            [[num(vae.get("test_elbo")), num(vae.get("test_recon")),
                              num(vae.get("test_kl")), num(vae.get("active_units")),
                              num(vae.get("epoch")), num(vae.get("train_seconds"))]]))
    for name, caption in ((files.PLOT_TRAINING_CURVES, "Training curves (nats per image)"),
                          (files.PLOT_KL_PER_DIM, "KL per latent dimension")):
        if run.plot(name).is_file():
            blocks.append(figure(run.relative(run.plot(name)), caption))
    fit = summary.get("prior_fit", {})
    fit_plot = run.plot(files.PLOT_PRIOR_FIT)
    if fit or fit_plot.is_file():
        blocks.append(heading("Learned prior fit", 3))
        if fit:
            blocks.append(fit_table(fit))
        if fit_plot.is_file():
            blocks.append(figure(run.relative(fit_plot),
                                 "The learned prior's fit, per epoch (its own fit records)"))
    return blocks


#: the learned-prior summary's numbers (ncpvae.run.fit.learned_prior_summary)
_SUMMARY_KEYS = ("log_z", "log_z_se", "delta", "delta_se")


def fit_table(fit: Mapping[str, Any], per_row: int = 3) -> Block:
    """The prior's own fit summary (plain numbers; ``x`` and ``x_se`` as one ``x ± se`` cell),
    then log Z and Delta, as ``per_row`` (quantity, value) pairs per table row: a summary
    with many numbers grows down the page, not wider than it."""
    numbers = {k: v for k, v in fit.items() if isinstance(v, (int, float))
               and not k.endswith("_seconds")}
    order = [k for k in numbers if k not in _SUMMARY_KEYS]
    order += [k for k in _SUMMARY_KEYS if numbers.get(k) is not None]
    items = [(k, pm(numbers[k], numbers.get(f"{k}_se")) if f"{k}_se" in numbers else
              num(numbers[k])) for k in order if not (k.endswith("_se") and k[:-3] in numbers)]
    rows: list[list[Cell]] = []
    for start in range(0, len(items), per_row):
        chunk = items[start:start + per_row]
        row: list[Cell] = [cell for pair in chunk for cell in pair]
        rows.append(row + [""] * (2 * per_row - len(row)))
    return table(["quantity", "value"] * min(per_row, max(len(items), 1)), rows)


def compare_blocks(run: RunDirectory) -> list[Block]:
    """The table and figure of ``ncpvae compare-priors`` (``compare_priors/table.json`` and
    ``gains.png``), when the run has them; its finished rows only if it was interrupted."""
    import json

    path = run.compare_priors / files.COMPARE_TABLE
    if not path.is_file():
        return []
    try:
        result = json.loads(path.read_text())
        rows_in = list(result["rows"])
    except (OSError, ValueError, KeyError, TypeError):
        return [heading("Prior comparison"), paragraph(f"{run.relative(path)} "
                                                       "could not be read.")]
    if not rows_in:
        return []
    iw, kid = result.get("iw"), result.get("kid")
    text = ("Priors fitted ex post on this run's frozen VAE (ncpvae compare-priors), each "
            "compared with N(0, I) on the same draws, images and subsets: differences are paired "
            f"and their SEs are those of the paired differences. Cross-entropy E_q[−log p] and "
            f"gain on {result.get('num_heldout')} held-out draws z ~ q(z|x) (nats).")
    if iw:
        text += (f" IW bound on {iw['num_examples']} test images with K = {iw['num_samples']} "
                 "(nats per image; higher is better).")
    if kid:
        text += (f" KID ×10³ of {kid['num_fake']} decoded samples against {kid['num_real']} "
                 f"{kid.get('reference', 'test')} images in {kid['num_subsets']} subsets, and "
                 "ΔKID = KID − KID of N(0, I) "
                 "on the same real subsets (lower is better).")
    header = ["prior", "cross-entropy", "gain over N(0, I)"]
    header += ["IW bound", "IW gain"] if iw else []
    header += ["KID ×10³", "ΔKID ×10³", "precision / recall"] if kid else []
    header += ["fit s", "samples/s"]
    rows: list[list[Cell]] = []
    for r in rows_in:
        flags = gain_flags(r)
        gain = pm(r.get("gain"), r.get("gain_se"))
        gain += f" {FLAG}" if "below N(0, I)" in flags else ""
        if r.get("gain_over_base") is not None:
            gain += f" (over its base {pm(r['gain_over_base'], r.get('gain_over_base_se'))}"
            gain += f" {FLAG})" if "below its base" in flags else ")"
        row: list[Cell] = [f"{r.get('label')} ({r.get('prior')})",
                           pm(r.get("cross_entropy"), r.get("cross_entropy_se")), gain]
        if iw:
            row += [pm(r.get("iw_bound"), r.get("iw_bound_se")),
                    pm(r.get("iw_gain"), r.get("iw_gain_se"))]
        if kid:
            scaled = {k: r[k] * 1e3 if r.get(k) is not None else None
                      for k in ("kid", "kid_se", "kid_diff", "kid_diff_se")}
            row += [pm(scaled["kid"], scaled["kid_se"]),
                    pm(scaled["kid_diff"], scaled["kid_diff_se"]),
                    f"{num(r.get('precision'), 2)} / {num(r.get('recall'), 2)}"]
        row += [num(r.get("fit_seconds")), num(r.get("samples_per_second"))]
        rows.append(row)
    blocks = [heading("Prior comparison"), paragraph(text), table(header, rows)]
    blocks += [paragraph(note) for note in flag_notes(rows_in)]
    if result.get("pending"):
        blocks.append(paragraph("Not finished: " + ", ".join(result["pending"]) + "."))
    figure_path = path.with_name(files.COMPARE_GAINS)
    if figure_path.is_file():
        blocks.append(figure(run.relative(figure_path), "Paired differences against N(0, I), "
                             "±2 SE"))
    return blocks


def metric_table(evaluation: Mapping[str, Any]) -> list[Block]:
    d = evaluation.get("disentanglement", {})
    rows: list[list[Cell]] = [
        [spec.label, num(spec.headline_value(d[spec.name])), spec.details(d[spec.name])]
        for spec in DISENTANGLEMENT if spec.name in d]
    vae = evaluation.get("vae", {})
    if vae:
        rows.append(["test reconstruction", num(vae.get("test_recon")),
                     "−E_q log p(x|z), nats per image"])
        bpd = (f"; {num(vae['test_elbo_bits_per_dim'])} bits/dim"
               if "test_elbo_bits_per_dim" in vae else "")
        rows.append(["test ELBO (1 sample)", num(vae.get("test_elbo")),
                     f"KL {num(vae.get('test_kl'))}; {vae.get('active_units')} active units{bpd}"])
    lik = evaluation.get("likelihood", {})
    for key in ("base", "prior"):
        if key in lik:
            e = lik[key]
            k = e["iw"]["num_samples"]
            extra = (f"; includes log Z SE {num(e['iw']['se_log_normalizer'], 2)}"
                     if e["iw"]["se_log_normalizer"] else "")
            bits = ""
            if "iw_bits_per_dim" in e and "elbo_bits_per_dim" in e:
                bits = (f"; bits/dim: IW {pm(e['iw_bits_per_dim']['mean'], e['iw_bits_per_dim']['se'])}, "
                        f"ELBO {pm(e['elbo_bits_per_dim']['mean'], e['elbo_bits_per_dim']['se'])}")
            rows.append([f"IW bound, {e['prior']} prior (K = {k})",
                         pm(e["iw"]["mean"], e["iw"]["se"]),
                         f"ELBO {pm(e['elbo']['mean'], e['elbo']['se'])}; "
                         f"{e['iw']['num_examples']} test images{extra}{bits}"])
    if "iw_gain" in lik:
        g = lik["iw_gain"]
        rows.append(["IW bound gain of the learned prior", pm(g["mean"], g["se"]),
                     "paired difference on the same draws (log Z SE included)"])
    lp = evaluation.get("learned_prior", {})
    if "log_z" in lp:
        draws = lp.get("log_z_samples")
        rows.append(["log Z", pm(lp["log_z"], lp["log_z_se"]),
                     f"{draws} base draws" if draws is not None
                     else "the prior's default number of base draws"])
    if "delta" in lp:
        rows.append(["Delta = E_q[f] − log Z", pm(lp["delta"], lp["delta_se"]),
                     f"on {lp.get('num_encodings')} held-out encodings; > 0: the learned prior "
                     "fits better"])
    if lp.get("group_delta"):
        rows.append(["per-group Delta_k (top group first)",
                     "; ".join(pm(d, e) for d, e in zip(lp["group_delta"], lp["group_delta_se"])),
                     "each group's gain over its base conditional, log Z_k estimated per "
                     "context; they add up to Delta"])
    fr = evaluation.get("factor_recovery", {})
    if fr.get("recovery"):
        rows.append(["factor recovery (mean ratio over factors)", num(fr.get("mean_recovery")),
                     "per factor, feature-net accuracy on reconstructions (on originals; "
                     "chance) and their ratio: "
                     + ", ".join(f"{k} {num(fr['accuracy_reconstruction'][k], 2)} "
                                 f"({num(fr['accuracy_original'][k], 2)}; "
                                 f"{num(fr['chance'][k], 2)}) ratio {num(v, 2)}"
                                 for k, v in fr["recovery"].items())
                     + f"; {fr.get('num_images')} test images"])
    net = evaluation.get("feature_net", {})
    if net:
        rows.append(["feature net held-out accuracy", instrument_status(net),
                     accuracy_against_targets(net)
                     + f" (predicts {net.get('target')}; {net.get('num_examples')} images, "
                     f"{net.get('num_val')} held out; {net.get('epochs_run')} of at most "
                     f"{net.get('epochs_max')} epochs); KID, FD, precision/recall, grid "
                     "coverage and factor recovery rest on it"])
    if not rows:
        return []
    return [heading("Metrics"), table(["metric", "value", "details"], rows)]


def _sampler_cell(row: Mapping[str, Any]) -> str:
    diag = row.get("diagnostics", {})
    parts = []
    if diag.get("ess_fraction") is not None:
        parts.append(f"ESS fraction {num(diag['ess_fraction'])}")
    sampler = row.get("sampler")
    if diag.get("acceptance_rate") is not None:
        # what the rate means, in the sampler's own words (e.g. ULA: the would-be MH acceptance)
        note = row.get("acceptance_note")
        parts.append(f"acceptance {num(diag['acceptance_rate'])}"
                     + (f" ({note})" if note else ""))
    if diag.get("final_step_size") is not None:
        parts.append(f"step {num(diag['final_step_size'])}")
    if diag.get("rhat_max") is not None:
        parts.append(f"R-hat max {num(diag['rhat_max'])}")
    if diag.get("num_nonfinite"):
        parts.append(f"{diag['num_nonfinite']} non-finite")
    if sampler:
        steps = diag.get("num_steps")  # what the sampler ran (its diagnostics), not its config
        parts.insert(0, f"{sampler['name']}" + (f", {steps} steps" if steps else ""))
    else:
        parts.insert(0, "exact")
    return "; ".join(parts)


def sample_table(evaluation: Mapping[str, Any]) -> list[Block]:
    rows_in = evaluation.get("rows", [])
    if not rows_in:
        return []
    rows: list[list[Cell]] = []
    with_inception = any("inception" in r for r in rows_in)
    for r in rows_in:
        sq, pf, cov = r.get("sample_quality"), r.get("prior_fit"), r.get("coverage")
        rows.append([
            r["label"],
            Image(r["plot"], 260, r["label"], thumbnail=True) if r.get("plot") else None,
            pm(sq["kid"] * 1e3, sq["kid_se"] * 1e3) if sq else "—",
            num(sq["frechet"]) if sq else "—",
            f"{num(sq['precision'], 2)} / {num(sq['recall'], 2)}" if sq else "—",
            num(cov["joint"], 2) if cov and cov.get("joint") is not None else "—",
            (f"{num(pf['mmd']['mmd2'])} (p = {num(pf['mmd']['p_value'], 2)})" if pf else "—"),
            pm(pf["c2st"]["accuracy"], pf["c2st"]["se"], 2) if pf else "—",
            _sampler_cell(r),
        ])
        if with_inception:
            inc = r.get("inception")
            rows[-1].insert(5, f"{num(inc['fid'])} / {pm(inc['kid'] * 1e3, inc['kid_se'] * 1e3)}"
                            if inc else "—")
    ref = evaluation.get("coverage_reference")
    scale = num(evaluation.get("feature_scale"))
    net = evaluation.get("feature_net") or {}
    bins = (ref or {}).get("joint_bins") or {}
    coverage = (f"; coverage: fraction of the {' × '.join(bins)} grid of the data's factors "
                f"({' × '.join(str(b) for b in bins.values())} = {ref.get('joint_cells')} cells) "
                "hit by the classified samples" if bins else "")
    blocks = [heading("Prior × sampler"),
              paragraph("Each row draws latents from a prior with a sampler and decodes them "
                        "(decoder means). Sample quality compares the decoded samples with "
                        "held-out test images on the features of a locally trained network "
                        f"(held-out accuracy {accuracy_against_targets(net)}: "
                        f"{instrument_status(net)}), "
                        f"divided by their RMS on held-out images ({scale}) "
                        "(KID: unbiased, lower is better, can be negative; Fréchet distance; "
                        f"precision / recall of k-NN manifolds{coverage}). Prior fit compares "
                        "the latents with held-out encodings z ~ q(z|x): MMD² "
                        "with its permutation p-value, and the held-out accuracy of a fresh "
                        "classifier (0.5: indistinguishable)."),
              table(["prior / sampler", "decoded samples", "KID ×10³", "FD", "precision / recall",
                     *(["Inception FID / KID ×10³"] if with_inception else []),
                     "grid coverage", "MMD² (p)", "C2ST accuracy", "sampler"], rows)]
    if with_inception:
        blocks.append(paragraph("Inception FID / KID: the same decoded samples and held-out "
                                "images on the 2048 pool features of the FID Inception-v3 "
                                "(evaluate.inception_weights; images resized to 299, grey "
                                "repeated to 3 channels); comparable with published numbers "
                                "only at the same sample sizes."))
    if ref and ref.get("joint") is not None:
        blocks.append(paragraph(f"Grid coverage of {ref.get('num_images')} held-out images "
                                f"(the ceiling for a row): {num(ref['joint'], 2)}."))
    return blocks


def build_blocks(evaluation: Mapping[str, Any], summary: Mapping[str, Any],
                 config: Mapping[str, Any], run_dir: Path) -> list[Block]:
    run = RunDirectory(run_dir)
    blocks = [heading(f"ncpvae evaluation: run '{config.get('name')}'", 1),
              paragraph(f"Dataset {evaluation.get('dataset')}, prior {evaluation.get('prior')}.")]
    net = evaluation.get("feature_net") or {}
    if net.get("warning"):
        blocks.append(paragraph(f"{FLAG} {net['warning']}."))
    blocks += [headline(evaluation), heading("Configuration"), config_summary(config)]
    blocks += training_blocks(summary, run)
    pictures = [(n, c) for n, c in ((files.PLOT_RECONSTRUCTIONS, "Test images (odd rows) and "
                                     "their reconstructions (even rows)"),
                                    (files.PLOT_TRAVERSALS, "Latent traversals of the first test "
                                     "image's code, dims sorted by KL"))
                if run.plot(n).is_file()]
    if pictures:
        blocks.append(heading("Reconstructions and traversals"))
        blocks += [figure(run.relative(run.plot(n)), c, 700) for n, c in pictures]
    blocks += metric_table(evaluation)
    group_plot = (evaluation.get("learned_prior") or {}).get("group_plot")
    if group_plot and (run.path / group_plot).is_file():
        blocks.append(figure(group_plot, "Hierarchical NCP: the gain of each latent group over "
                             "its base conditional (±2 SE)", 500))
    blocks += sample_table(evaluation)
    blocks += compare_blocks(run)
    if evaluation.get("notes"):
        blocks += [heading("Notes"), bullet_list(list(evaluation["notes"]))]
    runtime = evaluation.get("runtime", {})
    if runtime:
        seconds = runtime.get("seconds", {})
        blocks += [heading("Runtime"), paragraph(
            f"{num(runtime.get('total_seconds'))} s in all on {runtime.get('device')} "
            f"({runtime.get('torch_threads')} threads); feature net from cache: "
            f"{num(runtime.get('feature_net_cache_hit'))}. "
            + "; ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))]
    return blocks


# ---------------------------------------------------------------------------------------------
# rendering

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.6em;border-bottom:2px solid #ccc}h2{font-size:1.3em;margin-top:1.6em;
border-bottom:1px solid #ddd}h3{font-size:1.1em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
.scroll{overflow-x:auto;max-width:100%}
th,td{border:1px solid #ccc;padding:.3em .55em;vertical-align:middle;text-align:left}
th{background:#f3f3f3}tr:nth-child(even) td{background:#fafafa}
figure{margin:1em 0}figcaption{font-size:.9em;color:#555}img{image-rendering:pixelated}
ul{padding-left:1.4em}
"""


def _data_uri(path: Path) -> str | None:
    if not path.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _html_image(image: Image, run_dir: Path) -> str:
    """Figures keep their natural size (at most ``width`` px); table thumbnails are scaled to
    ``width`` px."""
    uri = _data_uri(run_dir / image.path)
    if uri is None:
        return f"<em>missing {html.escape(image.path)}</em>"
    size = f"width:{image.width}px" if image.thumbnail else f"max-width:min({image.width}px,100%)"
    return f'<img src="{uri}" alt="{html.escape(image.alt)}" style="{size}">'



def _html_cell(cell: Cell, run_dir: Path) -> str:
    if isinstance(cell, Image):
        return _html_image(cell, run_dir)
    return "—" if cell is None else html.escape(cell)


def render_html(blocks: Sequence[Block], run_dir: Path, title: str) -> str:
    """One self-contained page: every PNG embedded as a base64 data URI."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"]
    for b in blocks:
        if b.kind == "heading":
            out.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif b.kind == "text":
            out.append(f"<p>{html.escape(b.text)}</p>")
        elif b.kind == "list":
            out.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in b.items) + "</ul>")
        elif b.kind == "figure" and b.image is not None:
            out.append(f"<figure>{_html_image(b.image, run_dir)}"
                       f"<figcaption>{html.escape(b.text)}</figcaption></figure>")
        elif b.kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.header)
            body = "".join("<tr>" + "".join(f"<td>{_html_cell(c, run_dir)}</td>" for c in row)
                           + "</tr>" for row in b.rows)
            out.append(f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
                       f"<tbody>{body}</tbody></table></div>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _md_cell(cell: Cell) -> str:
    if isinstance(cell, Image):
        return f'<img src="{cell.path}" width="{cell.width}" alt="{cell.alt}">'
    return "—" if cell is None else cell.replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: Sequence[Block]) -> str:
    """Markdown that links the PNGs under ``plots/`` (kept beside the report)."""
    out = []
    for b in blocks:
        if b.kind == "heading":
            out.append("#" * b.level + " " + b.text)
        elif b.kind == "text":
            out.append(b.text)
        elif b.kind == "list":
            out.append("\n".join(f"- {i}" for i in b.items))
        elif b.kind == "figure" and b.image is not None:
            out.append(f"![{b.text}]({b.image.path})\n\n*{b.text}*")
        elif b.kind == "table":
            lines = ["| " + " | ".join(b.header) + " |", "|" + "---|" * len(b.header)]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def write_report(run_dir: str | Path, evaluation: Mapping[str, Any], config: Any, *,
                 fmt: Literal["html", "markdown"] = "html") -> Path:
    """Write ``report.html`` (self-contained) or ``report.md`` into ``run_dir``; return its path.

    ``config`` is the run's :class:`~ncpvae.config.RunConfig` or its plain-data dump.
    """
    run = RunDirectory(Path(run_dir))
    if isinstance(config, BaseModel):
        config = config.model_dump(mode="json")
    config = to_plain_json(config)
    blocks = build_blocks(evaluation, run.read_summary(), config, run.path)
    if fmt == "markdown":
        return write_text(run.report(fmt), render_markdown(blocks))
    title = f"ncpvae evaluation: {config.get('name')}"
    return write_text(run.report(fmt), render_html(blocks, run.path, title))
