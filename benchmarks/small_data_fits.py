"""NCP's own fit against a long fit of the same network, on small data (issue 21, finding 1).

On a few thousand images an NCP fit counted in epochs takes a handful of Adam steps per epoch,
and early stopping on a noisy held-out loss ends it before it has learned. This benchmark
measures, per run seed, the gain ``Delta`` (nats; docs/math.md) of

- ``own``: the NCP fit exactly as ``ncpvae train`` configures it (the ``default`` config's prior
  table, with whatever budget and stopping rule the code on ``PYTHONPATH`` has), and
- ``long``: the same network fitted 300 epochs with a patience that never runs out (and no
  minimum step count), the reference of what the network can reach,

on the encodings of one frozen VAE per seed: the ``default`` config with an ``mlp`` model,
40 epochs, on 4,000 MNIST-sized digits (scikit-learn's 8x8 digits upsampled to 28x28 with a
random affine jitter, written as an ``.npz`` for the ``npz`` dataset plugin), or on
scikit-learn's ``digits`` plugin itself (``--data digits``). ``Delta`` is measured as the
runner's fit stage does (``ncpvae.run.fit.learned_prior_summary``, on draws of the test
images' posteriors).

Phases, so that the code before and after a change fits the same encodings::

    python benchmarks/small_data_fits.py vae --out DIR [--data npz|digits] [--seeds 0 1 2]
    PYTHONPATH=<code>/framework:<code>/plugins \\
        python benchmarks/small_data_fits.py fit --out DIR --label after [--seeds 0 1 2]

``vae`` writes ``DIR/digits4000.npz`` (npz data), trains one VAE per seed into ``DIR/run_S``
and saves its encodings to ``DIR/encodings_S.pt``; ``fit`` fits both priors per seed and
writes ``DIR/fits_<label>.json`` (per seed: own and long Delta with SE, their ratio, the own
fit's epochs and steps and seconds). Run with ``OMP_NUM_THREADS=1`` on a shared CPU (torch's
threads otherwise spin against each other). The results under ``benchmarks/results/``
(``small_data_fits_<data>_<label>.json``) are these files: ``before`` with the main checkout at
eb0c737 (its fit code is that of 4c56cde), ``after`` with the fits of docs/priors.md §9.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: the long reference fit: many epochs, a patience that never runs out
LONG_FIT = {"epochs": 300, "patience": 100_000}


def make_digits(path: Path, n: int = 4000, size: int = 28, seed: int = 0) -> None:
    """``n`` grey ``size`` x ``size`` digits in [0, 1] from scikit-learn's 8x8 digits: each a
    random digit, bilinearly upsampled, then a random affine jitter (rotation within 12
    degrees, scale 0.9-1.1, shift within 2 pixels). Saved as ``images`` ``(n, size, size)``
    float32 and ``labels`` ``(n,)``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(digits.images), (n,), generator=g)
    small = torch.from_numpy(digits.images / 16.0).float()[pick].unsqueeze(1)
    big = torch.nn.functional.interpolate(small, size=(size - 8, size - 8), mode="bilinear",
                                          align_corners=False)
    big = torch.nn.functional.pad(big, (4, 4, 4, 4))  # a margin, as MNIST's 20x20 in 28x28
    angle = (torch.rand(n, generator=g) * 2 - 1) * math.radians(12)
    scale = 0.9 + 0.2 * torch.rand(n, generator=g)
    shift = (torch.rand(n, 2, generator=g) * 2 - 1) * (2 * 2 / size)  # 2 px in [-1, 1] units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, list(big.shape), align_corners=False)
    images = torch.nn.functional.grid_sample(big, grid, align_corners=False).clamp(0, 1)
    np.savez_compressed(path, images=images[:, 0].numpy().astype(np.float32),
                        labels=digits.target[pick.numpy()].astype(np.int64))


def run_overrides(args: argparse.Namespace, seed: int) -> list[str]:
    """The ``default`` config with an mlp VAE on the small data, without evaluation."""
    data = (f'data={{name="npz", path="{args.out / "digits4000.npz"}"}}' if args.data == "npz"
            else 'data={name="digits"}')
    return [f"seed={seed}", data, "model=mlp", f"train.epochs={args.epochs}",
            "evaluate.enabled=false"]


def train_vaes(args: argparse.Namespace) -> None:
    from ncpvae.config import load_config
    from ncpvae.experiment import train
    from ncpvae.run import seeds
    from ncpvae.run.build import encode_source, heldout_latents, open_run
    from ncpvae.run.train import train_vae

    args.out.mkdir(parents=True, exist_ok=True)
    if args.data == "npz" and not (args.out / "digits4000.npz").exists():
        make_digits(args.out / "digits4000.npz")
    for seed in args.seeds:
        out = args.out / f"run_{seed}"
        started = time.perf_counter()
        train(load_config("default", run_overrides(args, seed)), out, overwrite=True,
              quiet=True, stages=(train_vae,))
        run = open_run(out, quiet=True)
        mu, logvar = encode_source(run.model, run.data.train, run.device)
        heldout = heldout_latents(run, run.config.train.eval_size,
                                  run.generator(seeds.FIT_HELDOUT))
        summary = json.loads((out / "summary.json").read_text())
        torch.save({"mu": mu, "logvar": logvar, "heldout": heldout, "seed": seed,
                    "latent_dim": run.config.latent_dim,
                    "test_elbo": summary.get("vae", {}).get("test_elbo"),
                    "active_units": summary.get("vae", {}).get("active_units")},
                   args.out / f"encodings_{seed}.pt")
        print(f"seed {seed}: VAE trained in {time.perf_counter() - started:.0f} s, "
              f"{len(mu)} training encodings", flush=True)


def fit_once(prior_table: dict[str, Any], enc: dict[str, Any], seed: int) -> dict[str, Any]:
    """Fit a fresh prior of ``prior_table`` on ``enc``'s encodings (the runner's seeds) and
    measure Delta as the fit stage does."""
    import ncpvae
    from ncpvae.run import seeds
    from ncpvae.run.fit import learned_prior_summary

    prior = ncpvae.create("prior", prior_table.pop("name"), latent_dim=enc["latent_dim"],
                          seed=seed, **prior_table)
    started = time.perf_counter()
    fit = prior.fit(enc["mu"], enc["logvar"],
                    generator=torch.Generator().manual_seed(seeds.torch_seed(seed,
                                                                             seeds.PRIOR_FIT)))
    seconds = time.perf_counter() - started
    summary = learned_prior_summary(
        prior, enc["heldout"],
        torch.Generator().manual_seed(seeds.torch_seed(seed, seeds.FIT_LOG_Z)))
    return {"delta": summary["delta"], "delta_se": summary["delta_se"],
            "epochs_run": fit.get("epochs_run"), "steps_run": fit.get("steps_run"),
            "best_epoch": fit.get("best_epoch"), "fit_seconds": seconds}


def fit_priors(args: argparse.Namespace) -> None:
    import ncpvae
    from ncpvae.config import load_config

    torch.set_num_threads(args.threads)
    results = []
    for seed in args.seeds:
        enc = torch.load(args.out / f"encodings_{seed}.pt")
        config = load_config("default", run_overrides(args, seed))
        own_table = config.prior.model_dump() if hasattr(config.prior, "model_dump") else dict(
            config.prior)
        fields = type(ncpvae.create("prior", "ncp", latent_dim=2).config).model_fields
        long_table = {**own_table, **LONG_FIT}
        if "min_steps" in fields:
            long_table["min_steps"] = 0
        own = fit_once(dict(own_table), enc, seed)
        long = fit_once(dict(long_table), enc, seed)
        row = {"seed": seed, "test_elbo": enc.get("test_elbo"),
               "active_units": enc.get("active_units"), "own": own, "long": long,
               "ratio": own["delta"] / long["delta"]}
        results.append(row)
        print(f"seed {seed}: own Delta {own['delta']:.3f} ± {own['delta_se']:.3f} "
              f"({own['epochs_run']} epochs, {own['fit_seconds']:.0f} s), long "
              f"{long['delta']:.3f} ± {long['delta_se']:.3f}: ratio {row['ratio']:.2f}",
              flush=True)
    owns = [r["own"]["delta"] for r in results]
    report = {"label": args.label, "data": args.data, "epochs": args.epochs,
              "long_fit": LONG_FIT, "runs": results,
              "own_mean": statistics.mean(owns),
              "own_se_over_seeds": (statistics.stdev(owns) / math.sqrt(len(owns))
                                    if len(owns) > 1 else None),
              "min_ratio": min(r["ratio"] for r in results)}
    path = args.out / f"fits_{args.label}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["vae", "fit"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", choices=["npz", "digits"], default="npz")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=40, help="VAE epochs")
    parser.add_argument("--label", default="after")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    train_vaes(args) if args.phase == "vae" else fit_priors(args)


if __name__ == "__main__":
    main()
