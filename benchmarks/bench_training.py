"""Training throughput: ``train_vae`` against a bare hand-written loop at every shipped config,
and the default config's effective GFLOP/s against an fp32 GEMM-peak probe.

For each config of ``framework/configs/*.toml`` both loops train the same model class on the
same data source, batch size and optimizer in one process; the framework loop is
``ncpvae.run.train.train_vae`` (progress bars off, no run directory, ``eval_size = 1``), the bare
loop is the minimal Adam + beta-ELBO loop anyone would write (encode, reparameterize, decode,
the model's own ``recon_log_prob`` as the likelihood formula, closed-form Gaussian KL). Runs are
interleaved (bare, framework, bare, ...) and medians of images/s are reported with their ratio.
A config whose dataset files are absent is measured on synthetic uint8 images of the dataset's
shape (an ``npz`` file in a temporary directory; never downloads).

FLOPs: one training step (forward + backward of the objective) of the default config is counted
by ``torch.utils.flop_counter.FlopCounterMode``; effective GFLOP/s = FLOPs per image x the
framework's images/s. The GEMM-peak probe times ``(4096 x 256) @ (256 x 256)`` fp32 through
``torch.mm`` (MKL / the default BLAS) and through oneDNN (``torch.utils.mkldnn.to_mkldnn`` on
an ``nn.Linear``) in the same run; the best of the two is the peak the goal refers to.

Both loops use the model as the config builds it, so with ``train.channels_last = true`` (the
default config) both run in that layout. For the default config the bare loop is also timed in
the other layout (``bare_other_layout_images_per_second``), which shows what the setting buys,
and ``train_vae`` with ``train.fused_adam = true`` (``fused_adam_images_per_second``, in the
same interleaved rounds; opt-in: torch's fused Adam kernel, same float32 update, other rounding).

    python benchmarks/bench_training.py --json benchmarks/results/training.json   # idle machine
    python benchmarks/bench_training.py --configs default smoke --steps 10 --repeats 2  # quick
    python benchmarks/bench_training.py --device cuda --json training_cuda.json         # a GPU

``--device cuda`` sets ``device = "cuda"`` in every config, moves the bare loop's batches to the
GPU like ``train_vae`` does, synchronizes before reading a clock, skips the oneDNN probe and adds
a large (8192 x 8192) @ (8192 x 8192) product to the GEMM probe (the small one cannot fill a GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ncpvae.config import load_config
from ncpvae.errors import NcpvaeError
from ncpvae.run.build import build_run
from ncpvae.run.train import train_vae

CONFIG_DIR = Path(__file__).resolve().parents[1] / "framework" / "configs"
#: image shapes of the shipped datasets, for synthetic stand-ins when their files are absent
SHAPES = {"mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def synthetic_overrides(config, tmp: Path, n: int) -> list[str]:
    """Overrides replacing the config's dataset by ``n`` random uint8 images of its shape."""
    data = config.data
    shape = SHAPES.get(data.name)
    if shape is None:  # celeba: image_size x image_size RGB
        size = int(getattr(data, "image_size", 64))
        shape = (3, size, size)
    images = np.random.default_rng(0).integers(0, 256, size=(n, *shape), dtype=np.uint8)
    path = tmp / f"{config.name}.npz"
    np.savez(path, images=images)
    return ["data=npz", f"data.path={path}", "data.layout=nchw", "data.test_fraction=0.05"]


def sync(device: torch.device) -> None:
    """Wait for the device's queued kernels (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(name: str, tmp: Path, n_synthetic: int, device: str = "cpu",
          extra: list[str] | None = None):
    """The config (with ``extra`` overrides) and a built run; synthetic data when the dataset
    cannot be built offline."""
    extra = [f"device={device}", *(extra or [])]
    base = ["data.download=false", *extra]
    try:
        config = load_config(name, base)
    except NcpvaeError:
        base = extra
        config = load_config(name, base)
    try:
        return config, build_run(config, quiet=True), False
    except NcpvaeError:
        config = load_config(name, synthetic_overrides(config, tmp, n_synthetic) + extra)
        return config, build_run(config, quiet=True), True


def bare_loop(model, source, batch_size: int, steps: int, beta: float, seed: int,
              lr: float) -> float:
    """Images per second of a minimal hand-written beta-VAE loop (on the model's device)."""
    device = next(model.parameters()).device
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(source), generator=generator)
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        index = order[(i * batch_size) % len(source):][:batch_size]
        x = source.get_batch(index).to(device, non_blocking=True)
        mu, logvar = model.encode(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        recon = -model.recon_log_prob(x, model.decode(z))
        kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1)
        loss = (recon + beta * kl).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(device)
    return steps * batch_size / (time.perf_counter() - start)


def framework_loop(config, steps: int) -> float:
    """Images per second of ``train_vae`` (one epoch of ``steps`` steps, no run directory)."""
    config = config.model_copy(update={"train": config.train.model_copy(
        update={"epochs": 1, "steps_per_epoch": steps, "eval_size": 1})})
    run = build_run(config, quiet=True)
    return train_vae(run)["images_per_second"]


def flops_per_image(run) -> float:
    """Model FLOPs of one training step (objective forward + backward) per image."""
    from torch.utils.flop_counter import FlopCounterMode

    bs = run.config.train.batch_size
    x = run.data.train.get_batch(torch.arange(min(bs, len(run.data.train)))).to(run.device)
    counter = FlopCounterMode(display=False)
    with counter:
        out = run.objective.loss(x, run.model, run.prior.base_prior, step=0)
        out["loss"].backward()
    run.model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(x)


def gemm_probe(repeats: int = 5, iters: int = 50, device: str = "cpu") -> dict[str, float]:
    """GFLOP/s (median over ``repeats``) of a (4096 x 256) @ (256 x 256) fp32 product; on a GPU
    also of (8192 x 8192) @ (8192 x 8192) (TF32 as torch's current setting has it)."""
    dev = torch.device(device)
    x = torch.randn(4096, 256, device=dev)
    w = torch.randn(256, 256, device=dev)
    out: dict[str, float] = {}

    def rate(fn, flops: int, iters: int = iters) -> float:
        fn()
        times = []
        for _ in range(repeats):
            sync(dev)
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            sync(dev)
            times.append((time.perf_counter() - start) / iters)
        return flops / statistics.median(times) / 1e9

    out["torch_mm_gflops"] = rate(lambda: torch.mm(x, w), 2 * 4096 * 256 * 256)
    if dev.type == "cuda":
        a = torch.randn(8192, 8192, device=dev)
        out["torch_mm_8192_gflops"] = rate(lambda: torch.mm(a, a), 2 * 8192**3, iters=10)
        out["tf32_matmul"] = float(torch.backends.cuda.matmul.allow_tf32)
    elif torch.backends.mkldnn.is_available():
        from torch.utils import mkldnn as mkldnn_utils

        linear = nn.Linear(256, 256, bias=False)
        with torch.no_grad():
            linear.weight.copy_(w.t())
            fast = mkldnn_utils.to_mkldnn(linear)
            xm = x.to_mkldnn()
            out["onednn_linear_gflops"] = rate(lambda: fast(xm), 2 * 4096 * 256 * 256)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="*", default=None,
                        help="config names (default: every framework/configs/*.toml)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per measurement "
                        "(scaled down for configs with large images)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available")
    names = args.configs or sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
    results: dict = {"threads": torch.get_num_threads(), "torch": torch.__version__,
                     "steps": args.steps, "repeats": args.repeats, "device": args.device,
                     "configs": {}}
    if args.device.startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name(args.device)
    results["gemm_probe"] = gemm_probe(device=args.device)
    print("GEMM probe (4096x256)@(256x256) fp32:", {k: round(v, 1)
                                                    for k, v in results["gemm_probe"].items()})
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            bs = load_config(name).train.batch_size
            n_synthetic = bs * (args.steps + 2)
            config, run, synthetic = build(name, Path(tmp), n_synthetic, args.device)
            pixels = math.prod(run.data.image_shape)
            steps = max(3, int(args.steps * min(1.0, 3072 / pixels)))
            beta = getattr(run.objective, "beta", 1.0)
            lr = config.train.lr
            framework_loop(config, 2)  # warm-up (allocator, kernels)
            bare, framework, fused = [], [], []
            fused_config = config.model_copy(update={"train": config.train.model_copy(
                update={"fused_adam": True})})
            for r in range(args.repeats):
                bare.append(bare_loop(run.model, run.data.train, bs, steps, beta, r, lr))
                framework.append(framework_loop(config, steps))
                if name == "default":
                    fused.append(framework_loop(fused_config, steps))
            row = {"model": config.model.name, "batch_size": bs,
                   "image_shape": list(run.data.image_shape), "synthetic_data": synthetic,
                   "steps": steps, "bare_images_per_second": statistics.median(bare),
                   "framework_images_per_second": statistics.median(framework),
                   "bare_runs": bare, "framework_runs": framework}
            row["ratio"] = row["framework_images_per_second"] / row["bare_images_per_second"]
            if name == "default":
                fpi = flops_per_image(run)
                row["flops_per_image"] = fpi
                row["effective_gflops"] = fpi * row["framework_images_per_second"] / 1e9
                peak = max(v for k, v in results["gemm_probe"].items() if k.endswith("_gflops"))
                row["fraction_of_gemm_peak"] = row["effective_gflops"] / peak
                row["fused_adam_images_per_second"] = statistics.median(fused)
                row["fused_adam_runs"] = fused
                # per-round ratios: the host's speed drifts between rounds more than this differs
                row["fused_adam_vs_framework"] = statistics.median(
                    f / b for f, b in zip(fused, framework))
                row["fused_adam_fraction_of_gemm_peak"] = (
                    fpi * row["fused_adam_images_per_second"] / 1e9 / peak)
                row["channels_last"] = config.train.channels_last
                other = f"train.channels_last={str(not config.train.channels_last).lower()}"
                _, run_other, _ = build(name, Path(tmp), n_synthetic, args.device, [other])
                row["bare_other_layout_images_per_second"] = statistics.median(
                    bare_loop(run_other.model, run_other.data.train, bs, steps, beta, r, lr)
                    for r in range(args.repeats))
            results["configs"][name] = row
            print(f"{name}: bare {row['bare_images_per_second']:.0f} img/s, train_vae "
                  f"{row['framework_images_per_second']:.0f} img/s, ratio {row['ratio']:.3f}"
                  + (" (synthetic data)" if synthetic else "")
                  + (f"; {row['flops_per_image'] / 1e6:.1f} MFLOP/image, "
                     f"{row['effective_gflops']:.0f} GFLOP/s = "
                     f"{100 * row['fraction_of_gemm_peak']:.0f}% of the GEMM peak; "
                     f"train.fused_adam=true: {row['fused_adam_images_per_second']:.0f} img/s = "
                     f"{100 * row['fused_adam_fraction_of_gemm_peak']:.0f}% (per round "
                     f"{row['fused_adam_vs_framework']:.2f}x train_vae); "
                     f"bare loop with channels_last={not row['channels_last']}: "
                     f"{row['bare_other_layout_images_per_second']:.0f} img/s"
                     if name == "default" else ""), flush=True)
    print("\n| config | model, batch, image | bare img/s | train_vae img/s | ratio |")
    print("|---|---|---|---|---|")
    for name, row in results["configs"].items():
        print(f"| {name} | {row['model']}, {row['batch_size']}, "
              f"{'x'.join(map(str, row['image_shape']))}{' (synthetic)' if row['synthetic_data'] else ''}"
              f" | {row['bare_images_per_second']:.0f} | {row['framework_images_per_second']:.0f}"
              f" | {row['ratio']:.2f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
