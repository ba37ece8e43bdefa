"""Per-layer profile of the default config's training step in fp32 and bf16, against a GEMM
probe of the same precision: which convolutions (and linear layers) cost what, at how many
GFLOP/s, and what share of the step they are.

For every ``Conv2d`` / ``ConvTranspose2d`` / ``Linear`` of the model, a forward hook captures
its input shape during one real training step; the layer is then timed alone at that shape,
forward + backward (input and weight gradients, as in training), in the config's memory layout
(``train.channels_last``), and its FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode``.
The whole step (``objective.loss`` forward + backward + Adam step) is timed the same way; the
layers' sum against the step gives the share of the step spent outside these layers (activations,
the loss, the optimizer). The GEMM probe is ``(4096 x 256) @ (256 x 256)`` through ``torch.mm``
in fp32 and in bf16 (the peak each precision's share refers to). ``bf16`` runs the step under
``torch.autocast("cpu", torch.bfloat16)``, as ``train.precision = "bf16"`` does.

    python benchmarks/profile_training.py --json benchmarks/results/profile_training.json
    python benchmarks/profile_training.py --quick            # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ncpvae.config import load_config
from ncpvae.run.build import build_run

LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def timed(fn, repeats: int, iters: int) -> float:
    """Median seconds per call of ``fn`` over ``repeats`` blocks of ``iters`` calls."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        times.append((time.perf_counter() - start) / iters)
    return statistics.median(times)


def flops_of(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def autocast(precision: str):
    return (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
            else contextlib.nullcontext())


def gemm_probe(precision: str, repeats: int, iters: int) -> float:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    x, w = torch.randn(4096, 256, dtype=dtype), torch.randn(256, 256, dtype=dtype)
    return 2 * 4096 * 256 * 256 / timed(lambda: torch.mm(x, w), repeats, iters) / 1e9


def layer_inputs(run, x: torch.Tensor) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """(name, layer, a copy of its input) for every profiled layer, from one forward pass."""
    seen: list[tuple[str, nn.Module, torch.Tensor]] = []
    hooks = [module.register_forward_hook(
        lambda m, args, out, name=name: seen.append((name, m, args[0].detach().clone())))
        for name, module in run.model.named_modules() if isinstance(module, LAYERS)]
    try:
        run.objective.loss(x, run.model, run.prior.base_prior, step=0)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def profile(run, precision: str, repeats: int, iters: int) -> dict:
    bs = run.config.train.batch_size
    x = run.data.train.get_batch(torch.arange(bs)).to(run.device)
    optimizer = torch.optim.Adam(run.model.parameters(), lr=1e-4)

    def step():
        with autocast(precision):
            loss = run.objective.loss(x, run.model, run.prior.base_prior, step=0)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.float().backward()
        optimizer.step()

    step_s = timed(step, repeats, max(1, iters // 4))
    step_flops = flops_of(step)
    layers = []
    for name, layer, inp in layer_inputs(run, x):
        inp = inp.requires_grad_(True)

        def fwd_bwd(layer=layer, inp=inp):
            with autocast(precision):
                out = layer(inp)
            out.float().sum().backward()

        seconds = timed(fwd_bwd, repeats, iters)
        flops = flops_of(fwd_bwd)
        layer.zero_grad(set_to_none=True)
        layers.append({"layer": name, "type": type(layer).__name__,
                       "input_shape": list(inp.shape),
                       "channels_last": bool(inp.dim() == 4 and inp.is_contiguous(
                           memory_format=torch.channels_last)),
                       "seconds": seconds, "gflop": flops / 1e9,
                       "gflops_per_s": flops / seconds / 1e9})
    layer_s = sum(r["seconds"] for r in layers)
    return {"step_seconds": step_s, "step_gflop": step_flops / 1e9,
            "step_gflops_per_s": step_flops / step_s / 1e9,
            "images_per_second": bs / step_s, "layers": layers,
            "layers_seconds": layer_s, "layers_share_of_step": layer_s / step_s,
            "gemm_probe_gflops": gemm_probe(precision, repeats, iters)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="default")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--quick", action="store_true", help="smoke config, few repeats")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.config, args.repeats, args.iters = "smoke", 2, 2
    overrides = ["device=cpu", "data.train_size=1024", "data.test_size=256"]
    config = load_config(args.config, overrides)
    run = build_run(config, quiet=True)
    run.model.train()
    out = {"config": args.config, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "loadavg": os.getloadavg(),
           "channels_last": config.train.channels_last, "precisions": {}}
    for precision in args.precisions.split(","):
        result = profile(run, precision, args.repeats, args.iters)
        out["precisions"][precision] = result
        peak = result["gemm_probe_gflops"]
        print(f"\n{precision}: step {1e3 * result['step_seconds']:.1f} ms "
              f"({result['images_per_second']:.0f} img/s), {result['step_gflop']:.2f} GFLOP, "
              f"{result['step_gflops_per_s']:.0f} GFLOP/s = "
              f"{100 * result['step_gflops_per_s'] / peak:.0f}% of the {precision} GEMM probe "
              f"({peak:.0f} GFLOP/s); profiled layers "
              f"{100 * result['layers_share_of_step']:.0f}% of the step")
        print("| layer | type | input | ms fwd+bwd | GFLOP | GFLOP/s | % of probe |")
        print("|---|---|---|---:|---:|---:|---:|")
        for r in result["layers"]:
            print(f"| {r['layer']} | {r['type']} | {'x'.join(map(str, r['input_shape']))} "
                  f"| {1e3 * r['seconds']:.2f} | {r['gflop']:.3f} | {r['gflops_per_s']:.0f} "
                  f"| {100 * r['gflops_per_s'] / peak:.0f}% |")
    print(f"\nload average {', '.join(f'{v:.1f}' for v in os.getloadavg())} "
          f"(timings on a shared machine are indicative only)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
