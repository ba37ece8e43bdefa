"""A small beta sweep: how disentanglement (MIG, FactorVAE, DCI-D) trades off against
reconstruction as beta grows, on the embedded dSprites-like sprites.

Each (beta, seed) pair trains a reduced version of the default config (N(0, I) prior, fewer
images and epochs; no NCP fit, since the sweep is about the representation) and evaluates it
with ``ncpvae.evaluation.pipeline`` restricted to MIG, FactorVAE and DCI at the default config's sizes,
plus the test reconstruction term. Prints a Markdown table of mean ± sd over seeds per beta
and writes every run's numbers as JSON.

    python benchmarks/beta_sweep.py                            # beta 1 4 8, 2 seeds (~15 min CPU)
    python benchmarks/beta_sweep.py --betas 1 4 --seeds 1 --train-size 5000 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from ncpvae.config import load_config
from ncpvae.evaluation.pipeline import evaluate_stage
from ncpvae.experiment import train
from ncpvae.run.train import train_vae

#: (label, path into evaluation.json)
COLUMNS = (
    ("MIG", ("disentanglement", "mig", "mig")),
    ("FactorVAE", ("disentanglement", "factor_vae", "eval_accuracy")),
    ("DCI-D", ("disentanglement", "dci", "disentanglement")),
    ("test recon (nats)", ("vae", "test_recon")),
    ("test KL (nats)", ("vae", "test_kl")),
    ("active units", ("vae", "active_units")),
)


def run_overrides(beta: float, seed: int, args: argparse.Namespace) -> list[str]:
    """The default config, reduced: gaussian prior, fewer images and epochs, only the metrics of
    the sweep (sample quality, prior fit and the likelihood bound switched off)."""
    return [
        f"seed={seed}", "prior=gaussian",
        f"objective.beta={beta}", f"data.train_size={args.train_size}",
        f"data.test_size={args.test_size}", f"train.epochs={args.epochs}",
        f"train.eval_size={min(args.test_size, 2000)}",
        "evaluate.beta_vae.enabled=false", "evaluate.sap.enabled=false",
        "evaluate.mig.enabled=true", "evaluate.factor_vae.enabled=true",
        "evaluate.dci.enabled=true", "evaluate.sample_quality.enabled=false",
        "evaluate.prior_fit.enabled=false", "evaluate.likelihood.enabled=false",
        f"evaluate.num_heldout={min(args.test_size, 2000)}", "evaluate.num_samples=64",
        *args.overrides,
    ]


def lookup(data: dict, path: tuple[str, ...]) -> float:
    for key in path:
        data = data[key]
    return float(data)


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}"


def markdown_table(results: list[dict], betas: list[float]) -> str:
    header = "| beta | runs | " + " | ".join(label for label, _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    for beta in betas:
        rows = [r for r in results if r["beta"] == beta]
        cells = [mean_sd([r[label] for r in rows]) for label, _ in COLUMNS]
        lines.append(f"| {beta:g} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--betas", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    parser.add_argument("--seeds", type=int, default=2, help="seeds per beta (0, 1, ...)")
    parser.add_argument("--train-size", type=int, default=50_000, help="training images")
    parser.add_argument("--test-size", type=int, default=5_000, help="test images")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="further config overrides for every run (dotted.key=value)")
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temp dir)")
    parser.add_argument("--json", default=None,
                        help="where to write the results (default: OUT/beta_sweep.json)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="beta_sweep-"))
    results = []
    start = time.perf_counter()
    for beta in args.betas:
        for seed in range(args.seeds):
            config = load_config("default", run_overrides(beta, seed, args))
            # (the run name is set here: a top-level `name=` override would reset the config)
            config = config.model_copy(update={"name": f"beta{beta:g}-seed{seed}"})
            t0 = time.perf_counter()
            path = train(config, out / config.name, overwrite=True, quiet=args.quiet,
                         stages=(train_vae, evaluate_stage))
            evaluation = json.loads((path / "evaluation.json").read_text())
            row = {"beta": beta, "seed": seed, "run": str(path),
                   "seconds": time.perf_counter() - t0}
            row.update({label: lookup(evaluation, key) for label, key in COLUMNS})
            results.append(row)
            print(json.dumps(row), flush=True)
    table = markdown_table(results, args.betas)
    json_path = Path(args.json) if args.json else out / "beta_sweep.json"
    json_path.write_text(json.dumps({"args": vars(args), "runs": results,
                                           "table": table}, indent=2) + "\n")
    print(f"\n{table}\n\n{len(results)} runs in {time.perf_counter() - start:.0f} s; "
          f"runs in {out}, results in {json_path}")


if __name__ == "__main__":
    main()
