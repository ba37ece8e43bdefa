"""What the RNG state adds to every per-epoch checkpoint (``ncpvae resume`` needs it).

Measures, for the default and smoke configs' checkpoints: the time to capture every RNG state
(:func:`ncpvae.run.rng.capture`), the time to serialize it on its own, its size, and the size of
the rest of the checkpoint. Timings are minima over repeats (medians in brackets)::

    .venv/bin/python benchmarks/bench_checkpoint_rng.py
"""

from __future__ import annotations

import io
import statistics
import time

import torch

from ncpvae.config import load_config
from ncpvae.run import rng
from ncpvae.run.build import build_run


def timings(step, repeats: int = 300) -> tuple[float, float]:
    """(min, median) seconds of ``step()``."""
    values = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        values.append(time.perf_counter() - start)
    return min(values), statistics.median(values)


def size(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return len(buffer.getvalue())


def main() -> None:
    order = torch.Generator().manual_seed(0)
    snapshot = rng.capture({"order": order})
    capture = timings(lambda: rng.capture({"order": order}))
    serialize = timings(lambda: torch.save(snapshot, io.BytesIO()))
    print(f"capture {capture[0] * 1e3:.2f} ms [{capture[1] * 1e3:.2f}], serialize "
          f"{serialize[0] * 1e3:.2f} ms [{serialize[1] * 1e3:.2f}], {size(snapshot) / 1024:.1f} KiB")
    for name in ("default", "smoke"):
        run = build_run(load_config(name, ["device=cpu"]), quiet=True)
        optimizer = torch.optim.Adam(run.model.parameters())
        sum((p ** 2).sum() for p in run.model.parameters()).backward()
        optimizer.step()
        rest = {"model": run.model.state_dict(), "prior": run.prior.state_dict(),
                "optimizer": optimizer.state_dict()}
        print(f"{name}: checkpoint without the RNG state {size(rest) / 2**20:.2f} MiB; the RNG "
              f"state adds {100 * size(snapshot) / size(rest):.2f}% of its size")


if __name__ == "__main__":
    main()
