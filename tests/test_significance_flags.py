"""The visible flag of a learned prior worse than what it should improve on: a compare-priors
row more than 2 SE below N(0, I) or below its learned base (table.md, the report, the printed
table), and the run's own Delta more than 2 SE below 0 (the run summary). Synthetic tables: no
fitting."""

from __future__ import annotations

import json

import pytest

from ncpvae.evaluation.compare import format_table
from ncpvae.evaluation.report import compare_blocks
from ncpvae.metrics.significance import FLAG, gain_flags, significantly_below
from ncpvae.run import directory as files
from ncpvae.run.directory import RunDirectory
from ncpvae.run.summary_text import format_run_summary

SE = 0.1
#: just past and just short of the 2 SE threshold, on both sides of it
BELOW, NOT_BELOW = -2 * SE - 1e-3, -2 * SE + 1e-3


def test_threshold_both_sides():
    assert significantly_below(BELOW, SE) and not significantly_below(NOT_BELOW, SE)
    assert not significantly_below(0.5, SE) and not significantly_below(-1.0, float("inf"))
    assert not significantly_below(None, SE) and not significantly_below(-1.0, None)


def row(prior: str, gain: float, over_base: float | None = None) -> dict:
    out = {"prior": prior, "label": prior.upper(), "cross_entropy": 10.0,
           "cross_entropy_se": SE, "gain": gain, "gain_se": SE, "fit_seconds": 1.0,
           "samples_per_second": 100.0}
    if over_base is not None:
        out.update(gain_over_base=over_base, gain_over_base_se=SE)
    return out


def table(*rows: dict) -> dict:
    return {"num_heldout": 64, "rows": list(rows), "iw": None, "kid": None, "pending": [],
            "notes": []}


@pytest.mark.parametrize(("gain", "over_base", "flags"), [
    (BELOW, None, ["below N(0, I)"]),
    (NOT_BELOW, None, []),
    (0.3, BELOW, ["below its base"]),
    (0.3, NOT_BELOW, []),
    (BELOW, BELOW, ["below N(0, I)", "below its base"]),
])
def test_a_row_is_flagged_exactly_when_it_is_below(gain, over_base, flags, tmp_path):
    flagged = row("ncp:gmm", gain, over_base)
    assert gain_flags(flagged) == flags
    result = table(row("gaussian", 0.0), flagged)
    text = format_table(result)
    line = next(x for x in text.splitlines() if "`ncp:gmm`" in x)
    assert (FLAG in line) == bool(flags)
    assert (FLAG in text) == bool(flags)  # nothing else carries it, N(0, I)'s row included
    for flag in flags:
        assert flag in line
    notes = [x for x in text.splitlines() if x.startswith(f"- {FLAG}")]
    assert len(notes) == (1 if flags else 0)
    if "below its base" in flags:
        assert f"gain over its base {over_base:.3f} ± {SE:.3f} nats" in notes[0]

    # the report's comparison section shows the same flag
    run = RunDirectory(tmp_path)
    run.compare_priors.mkdir(parents=True)
    (run.compare_priors / files.COMPARE_TABLE).write_text(json.dumps(result))
    blocks = compare_blocks(run)
    assert (FLAG in repr(blocks)) == bool(flags)


@pytest.mark.parametrize(("delta", "flagged"), [(BELOW, True), (NOT_BELOW, False), (0.8, False)])
def test_the_run_summary_flags_a_negative_delta(delta, flagged, tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps(
        {"prior_fit": {"delta": delta, "delta_se": SE}}))
    line = next(x for x in format_run_summary(tmp_path).splitlines() if "Delta" in x)
    assert (FLAG in line) == flagged
    assert ("worse than the base prior" in line) == flagged
