"""Training throughput: the framework's VAE training loop against a bare hand-written loop.

Both loops train the same model class on the same data source and batch size in the same
process; the framework loop is ``ncpvae.run.train.train_vae`` (progress bars off, no run
directory), the bare loop is the minimal Adam + beta-ELBO loop anyone would write. Runs
alternate and the median images/s of each is reported, with the overhead ratio.

    python benchmarks/bench_training.py                       # default config, CPU
    python benchmarks/bench_training.py --config smoke --steps 30 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from ncpvae.config import load_config
from ncpvae.run.build import build_run
from ncpvae.run.train import train_vae


def bare_loop(model, source, batch_size: int, steps: int, beta: float, seed: int) -> float:
    """Images per second of a minimal hand-written beta-VAE loop (Bernoulli likelihood)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(source), generator=generator)
    start = time.perf_counter()
    for i in range(steps):
        x = source.get_batch(order[i * batch_size:(i + 1) * batch_size])
        mu, logvar = model.encode(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        logits = model.decode(z)
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
        kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1)
        loss = (recon + beta * kl).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * batch_size / (time.perf_counter() - start)


def framework_loop(config, steps: int) -> float:
    config = config.model_copy(update={"train": config.train.model_copy(
        update={"epochs": 1, "steps_per_epoch": steps, "eval_size": 1})})
    run = build_run(config, quiet=True)
    summary = train_vae(run)
    return summary["images_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="config name or file (default: default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()

    config = load_config(args.config, args.overrides)
    run = build_run(config, quiet=True)  # for the bare loop: the same model class and data
    beta = getattr(run.objective, "beta", 1.0)
    bs = config.train.batch_size
    framework, bare = [], []
    framework_loop(config, 5)  # warm-up (allocator, kernels)
    for r in range(args.repeats):
        bare.append(bare_loop(run.model, run.data.train, bs, args.steps, beta, seed=r))
        framework.append(framework_loop(config, args.steps))
    result = {
        "config": config.name, "device": str(run.device), "batch_size": bs,
        "image_shape": list(run.data.image_shape), "model": config.model.name,
        "steps": args.steps, "repeats": args.repeats, "threads": torch.get_num_threads(),
        "bare_images_per_second": statistics.median(bare),
        "framework_images_per_second": statistics.median(framework),
    }
    result["overhead"] = result["bare_images_per_second"] / result["framework_images_per_second"] - 1
    print("| loop | images/s (median) |\n|---|---|")
    print(f"| bare hand-written | {result['bare_images_per_second']:.0f} |")
    print(f"| ncpvae train_vae | {result['framework_images_per_second']:.0f} |")
    print(f"\nframework overhead: {100 * result['overhead']:+.1f}% "
          f"({config.model.name}, {tuple(run.data.image_shape)}, batch {bs}, {result['device']})")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
