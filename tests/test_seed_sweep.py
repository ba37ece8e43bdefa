"""``ncpvae train --seeds`` and ``ncpvae aggregate``: seeds parsed, one run per seed (finished seeds
skipped, unfinished ones resumed), and the mean ± SE over seeds against hand-computed values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from test_cli import ncpvae  # the console-script runner

from ncpvae.cli import main
from ncpvae.config import config_to_toml, load_config, to_toml
from ncpvae.errors import ConfigError, NcpvaeError
from ncpvae.evaluation.aggregate import (
    aggregate,
    aggregate_runs,
    format_aggregate,
    headline_numbers,
    mean_se,
    write_aggregate,
)
from ncpvae.run.seed_sweep import (
    aggregate_directory,
    parse_seeds,
    plan_seeds,
    run_seeds,
    seed_directory,
    sweep_base,
    with_seed,
)

# ---------------------------------------------------------------------------------------------
# seeds and directories


@pytest.mark.parametrize("text, seeds", [("0,1,2", [0, 1, 2]), ("0-2", [0, 1, 2]), ("7", [7]),
                                         ("3, 0-1", [3, 0, 1]), ("4-4,9", [4, 9])])
def test_parse_seeds(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text, fragment", [("", "is not a seed"), ("0,,1", "is not a seed"),
                                            ("-1", "is not a seed"), ("a", "is not a seed"),
                                            ("1.5", "is not a seed"), ("3-1", "decreases"),
                                            ("0,1,0-2", "names seed 0 twice")])
def test_parse_seeds_refuses_bad_input_in_one_line(text, fragment):
    with pytest.raises(ConfigError, match=fragment) as info:
        parse_seeds(text)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("seeds", ["0-a", "2-1", "0,0", ","])
def test_bad_seeds_option_is_a_one_line_error(seeds, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "smoke", "--seeds", seeds])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "argument --seeds" in err, err


def test_sibling_directories():
    assert seed_directory("runs/default", 2) == Path("runs/default-seed2")
    assert aggregate_directory("out/x") == Path("out/x-seeds")
    assert sweep_base("out/x-seed12") == Path("out/x")
    assert sweep_base("out/x") is None


# ---------------------------------------------------------------------------------------------
# the aggregate, against hand-computed means and SEs


def fake_run(test_elbo: float, delta: float, kid: dict[str, float], *, units: int = 5,
             gain: float = 0.5) -> tuple[dict, dict]:
    """summary.json and evaluation.json of a finished, evaluated run (the keys the pipeline
    writes)."""
    summary = {"progress": {"planned": ["train"], "completed": ["train"], "finished": True},
               "vae": {"test_elbo": test_elbo - 3.0, "active_units": units + 1},
               "prior_fit": {"delta": delta / 2, "delta_se": 0.01},
               "evaluation": {"test_elbo": test_elbo, "test_elbo_bits_per_dim": -test_elbo / 100,
                              "delta": delta, "delta_se": 0.02, "kid": kid,
                              "factor_recovery": {"shape": 0.9, "posX": 1.0}}}
    evaluation = {"vae": {"test_elbo": test_elbo, "active_units": units},
                  "likelihood": {"iw_gain": {"mean": gain, "se": 0.1}},
                  "factor_recovery": {"recovery": {"shape": 0.9, "posX": 1.0},
                                      "mean_recovery": 0.95,
                                      "accuracy_reconstruction": {"shape": 0.6, "posX": 0.8}}}
    return summary, evaluation


def test_mean_se_by_hand():
    # values 1, 2, 4: mean 7/3; SD^2 = (16/9 + 1/9 + 25/9) / 2 = 7/3; SE = SD / sqrt(3) = sqrt(7)/3
    mean, se = mean_se([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3, rel=1e-15)
    assert se == pytest.approx(math.sqrt(7) / 3, rel=1e-15)
    assert mean_se([5.0]) == (5.0, None)
    assert mean_se([2.0, 2.0]) == (2.0, 0.0)


def test_aggregate_of_three_seeds_by_hand():
    runs = {0: fake_run(-100.0, 0.8, {"N(0, I)": 0.010, "NCP by MALA": 0.006}, units=5),
            1: fake_run(-102.0, 0.6, {"N(0, I)": 0.014}, units=6, gain=0.3),
            2: fake_run(-101.0, 1.0, {"N(0, I)": 0.012, "NCP by MALA": 0.004}, units=7)}
    agg = aggregate({s: headline_numbers(*r) for s, r in runs.items()}, name="fake")
    metrics = {m["key"]: m for m in agg["metrics"]}
    assert agg["seeds"] == [0, 1, 2]

    elbo = metrics["test_elbo"]  # -100, -102, -101: mean -101, SD 1, SE 1/sqrt(3)
    assert elbo["values"] == [-100.0, -102.0, -101.0]  # the evaluation's, not the training's
    assert elbo["mean"] == pytest.approx(-101.0, rel=1e-15)
    assert elbo["sd"] == pytest.approx(1.0, rel=1e-12)
    assert elbo["se"] == pytest.approx(1 / math.sqrt(3), rel=1e-12)
    assert elbo["n"] == 3
    delta = metrics["delta"]  # 0.8, 0.6, 1.0: mean 0.8, SD 0.2, SE 0.2/sqrt(3)
    assert delta["mean"] == pytest.approx(0.8, rel=1e-12)
    assert delta["se"] == pytest.approx(0.2 / math.sqrt(3), rel=1e-12)
    assert metrics["fit_delta"]["values"] == [0.4, 0.3, 0.5]
    units = metrics["active_units"]  # 5, 6, 7 (the evaluation's): mean 6, SD 1
    assert units["values"] == [5.0, 6.0, 7.0] and units["se"] == pytest.approx(1 / math.sqrt(3))
    gain = metrics["iw_gain"]  # 0.5, 0.3, 0.5: mean 13/30, deviations 1/15, -2/15, 1/15
    assert gain["mean"] == pytest.approx(13 / 30, rel=1e-12)
    assert gain["se"] == pytest.approx(math.sqrt(((1 / 15) ** 2 * 2 + (2 / 15) ** 2) / 2)
                                       / math.sqrt(3), rel=1e-12)
    assert metrics["test_elbo_bits_per_dim"]["values"] == [1.0, 1.02, 1.01]
    assert metrics["kid/N(0, I)"]["mean"] == pytest.approx(0.012, rel=1e-12)
    # a row seed 1 lacks: left out of its mean, counted in n, None among the values
    mala = metrics["kid/NCP by MALA"]
    assert mala["values"] == [0.006, None, 0.004] and mala["n"] == 2
    assert mala["mean"] == pytest.approx(0.005, rel=1e-12)
    assert mala["se"] == pytest.approx(0.001, rel=1e-9)  # SD sqrt(2) * 0.001, / sqrt(2)
    assert metrics["factor_recovery/shape"]["values"] == [0.9, 0.9, 0.9]
    assert metrics["factor_recovery/mean"]["mean"] == pytest.approx(0.95)
    assert metrics["reconstruction_accuracy/posX"]["se"] == pytest.approx(0.0, abs=1e-15)


def test_one_seed_has_no_se():
    agg = aggregate({3: headline_numbers(*fake_run(-50.0, 0.1, {}))})
    elbo = agg["metrics"][0]
    assert (elbo["key"], elbo["mean"], elbo["se"], elbo["sd"], elbo["n"]) == \
        ("test_elbo", -50.0, None, None, 1)


def test_headline_numbers_skip_missing_and_non_finite_values():
    summary = {"vae": {"test_elbo": -7.0, "active_units": 2},
               "evaluation": {"delta": float("nan"), "kid": {"x": None}}}
    assert headline_numbers(summary, {}) == [("test_elbo", "test ELBO (nats)", -7.0),
                                             ("active_units", "active units", 2.0)]


def write_fake_run(path: Path, seed: int, test_elbo: float, *, finished: bool = True,
                   epochs: int = 2) -> Path:
    summary, evaluation = fake_run(test_elbo, 0.5, {"N(0, I)": 0.01})
    summary["progress"]["finished"] = finished
    path.mkdir(parents=True)
    (path / "config.toml").write_text(to_toml({"name": "fake", "seed": seed,
                                               "train": {"epochs": epochs}}))
    (path / "summary.json").write_text(json.dumps(summary))
    (path / "evaluation.json").write_text(json.dumps(evaluation))
    return path


def test_aggregate_runs_orders_by_seed_and_writes_json_markdown_html(tmp_path):
    runs = [write_fake_run(tmp_path / f"x-seed{s}", s, elbo)
            for s, elbo in ((2, -103.0), (0, -101.0), (1, -102.0))]
    agg = aggregate_runs(runs)
    assert agg["seeds"] == [0, 1, 2] and agg["name"] == "fake"
    assert agg["runs"] == [str(tmp_path / f"x-seed{s}") for s in (0, 1, 2)]
    elbo = agg["metrics"][0]
    assert elbo["values"] == [-101.0, -102.0, -103.0]
    assert elbo["mean"] == pytest.approx(-102.0) and elbo["se"] == pytest.approx(1 / math.sqrt(3))

    files = write_aggregate(tmp_path / "x-seeds", agg)
    assert [f.name for f in files] == ["aggregate.json", "aggregate.md", "aggregate.html"]
    assert json.loads(files[0].read_text()) == json.loads(json.dumps(agg))
    markdown = files[1].read_text()
    assert "| metric | mean ± SE | n | seed 0 | seed 1 | seed 2 |" in markdown
    assert "| test ELBO (nats) | -102.000 ± 0.58 | 3 | -101.000 | -102.000 | -103.000 |" in markdown
    assert "sample SD / sqrt(n)" in markdown
    page = files[2].read_text()
    assert page.startswith("<!DOCTYPE html>") and "<td>-102.000 ± 0.58</td>" in page
    text = format_aggregate(agg)
    assert text.splitlines()[0] == "fake: mean ± SE over 3 seeds (0, 1, 2)"
    assert text.splitlines()[-1].split()[:4] == ["factor", "accuracy", "on", "reconstructions:"]


def test_aggregate_runs_refuses_a_mix(tmp_path):
    a = write_fake_run(tmp_path / "a", 0, -1.0)
    with pytest.raises(NcpvaeError, match="both runs of seed 0"):
        aggregate_runs([a, write_fake_run(tmp_path / "b", 0, -1.0)])
    with pytest.raises(NcpvaeError, match=r"more than the seed \(train.epochs is 2 vs 3\)"):
        aggregate_runs([a, write_fake_run(tmp_path / "c", 1, -1.0, epochs=3)])
    with pytest.raises(NcpvaeError, match="unfinished run .*ncpvae resume"):
        aggregate_runs([a, write_fake_run(tmp_path / "d", 2, -1.0, finished=False)])
    with pytest.raises(NcpvaeError, match="not a ncpvae run directory"):
        aggregate_runs([a, tmp_path / "nothing"])


def test_aggregate_command_defaults_to_the_sweeps_folder(tmp_path, capsys):
    for s in (0, 1):
        write_fake_run(tmp_path / f"x-seed{s}", s, -10.0 - s)
    assert main(["aggregate", str(tmp_path / "x-seed0"), str(tmp_path / "x-seed1")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert (tmp_path / "x-seeds" / "aggregate.json").is_file()
    assert out[1] == "fake: mean ± SE over 2 seeds (0, 1)"
    assert out[3].split()[:6] == ["test", "ELBO", "(nats)", "-10.500", "±", "0.5"]
    write_fake_run(tmp_path / "other", 2, -1.0)
    assert main(["aggregate", str(tmp_path / "x-seed0"), str(tmp_path / "other")]) == 2
    assert "pass --out DIR" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the sweep: train, skip, resume (stages that record their calls; no training)


class Failing(NcpvaeError):
    pass


def test_sweep_trains_skips_finished_and_resumes_unfinished_seeds(tmp_path, registry):
    calls: list[tuple[str, int]] = []
    fail_on: set[int] = {1}

    def first(run):
        calls.append(("first", run.config.seed))

    def second(run):
        calls.append(("second", run.config.seed))
        if run.config.seed in fail_on:
            raise Failing("stopped")

    config = load_config("smoke", (), registry)
    base = tmp_path / "sweep"
    with pytest.raises(Failing):
        run_seeds(config, [0, 1, 2], base, (first, second), quiet=True)
    assert calls == [("first", 0), ("second", 0), ("first", 1), ("second", 1)]
    assert [p.action for p in plan_seeds(config, [0, 1, 2], base, registry=registry)] == \
        ["skip", "resume", "train"]
    saved = load_config(base.with_name("sweep-seed1") / "config.toml", (), registry)
    assert saved == with_seed(config, 1)

    calls.clear()
    fail_on.clear()
    seen = []
    paths = run_seeds(config, [0, 1, 2], base, (first, second), quiet=True,
                      on_seed=lambda item: seen.append((item.seed, item.action)))
    assert paths == [tmp_path / f"sweep-seed{s}" for s in (0, 1, 2)]
    assert seen == [(0, "skip"), (1, "resume"), (2, "train")]
    assert calls == [("second", 1), ("first", 2), ("second", 2)]  # seed 1 from its stage 2
    assert [p.action for p in plan_seeds(config, [0, 1, 2], base, registry=registry)] == \
        ["skip"] * 3

    # a seed directory of another config is refused before anything runs
    other = load_config("smoke", ["train.epochs=3"], registry)
    calls.clear()
    with pytest.raises(NcpvaeError, match="another config .*train.epochs is 2 there, 3 here"):
        run_seeds(other, [2, 0], base, (first, second), quiet=True)
    assert calls == []
    assert [p.action for p in plan_seeds(other, [0], base, overwrite=True)] == ["train"]


# ---------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow  # two smoke runs through the console script
def test_train_seeds_end_to_end(tmp_path, smoke_run):
    out = tmp_path / "smoke"
    result = ncpvae("train", "smoke", "--seeds", "0,1", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    runs = [tmp_path / "smoke-seed0", tmp_path / "smoke-seed1"]
    agg = json.loads((tmp_path / "smoke-seeds" / "aggregate.json").read_text())
    assert agg["seeds"] == [0, 1] and agg["runs"] == [str(r) for r in runs]
    metrics = {m["key"]: m for m in agg["metrics"]}
    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
    assert [s["evaluation"]["test_elbo"] for s in summaries] == metrics["test_elbo"]["values"]
    for label, kid in summaries[1]["evaluation"]["kid"].items():
        assert metrics[f"kid/{label}"]["values"][1] == kid
    evaluations = [json.loads((r / "evaluation.json").read_text()) for r in runs]
    assert [e["vae"]["active_units"] for e in evaluations] == metrics["active_units"]["values"]
    assert summaries[0]["evaluation"]["test_elbo"] != summaries[1]["evaluation"]["test_elbo"]
    # seed 0 of the sweep is `ncpvae train smoke` (the config's seed 0), number for number
    plain = json.loads((smoke_run / "summary.json").read_text())
    timing = {"seconds"}
    assert {k: v for k, v in summaries[0]["evaluation"].items() if k not in timing} == \
        {k: v for k, v in plain["evaluation"].items() if k not in timing}
    # the printed output ends with the aggregate table
    assert result.stdout.rstrip("\n").endswith(format_aggregate(agg))
    assert (tmp_path / "smoke-seeds" / "aggregate.md").is_file()

    # run again: both seeds skipped, their files untouched, the same aggregate
    before = [(r / "checkpoint.pt").read_bytes() for r in runs]
    again = ncpvae("train", "smoke", "--seeds", "0-1", "--out", str(out), "--quiet")
    assert again.returncode == 0, again.stderr
    assert f"seed 0: finished run in {runs[0]}, skipped" in again.stdout
    assert f"seed 1: finished run in {runs[1]}, skipped" in again.stdout
    assert [(r / "checkpoint.pt").read_bytes() for r in runs] == before
    assert json.loads((tmp_path / "smoke-seeds" / "aggregate.json").read_text()) == agg
    assert config_to_toml(with_seed(load_config("smoke"), 1)) == \
        (runs[1] / "config.toml").read_text()


@pytest.mark.slow  # two 1-epoch smoke runs on two forked ranks
def test_train_seeds_under_torchrun_writes_once_and_skips_on_a_rerun(tmp_path):
    from test_distributed import _forked_ranks  # torchrun's environment, ranks forked

    args = ["train", "smoke", "--seeds", "0-1", "--out", str(tmp_path / "s"), "--quiet",
            "--set", "evaluate.enabled=false", "--set", "train.epochs=1"]
    first = _forked_ranks(args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("aggregate over seeds written to") == 1  # rank 1 prints nothing
    agg = json.loads((tmp_path / "s-seeds" / "aggregate.json").read_text())
    summaries = [json.loads((tmp_path / f"s-seed{s}" / "summary.json").read_text())
                 for s in (0, 1)]
    assert agg["seeds"] == [0, 1] and all(s["progress"]["finished"] for s in summaries)
    assert agg["metrics"][0]["values"] == [s["vae"]["test_elbo"] for s in summaries]
    again = _forked_ranks(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count(", skipped") == 2
