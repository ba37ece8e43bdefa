"""``train.precision``: the default fp32 step is unchanged, bf16 autocast on the smoke config
trains to finite losses near the fp32 ones, fp16 needs CUDA (a one-line error on the CPU; the
CUDA path is skipped without a GPU), weights and checkpoints stay float32, and a bf16 run killed
after an epoch resumes to the uninterrupted run's numbers bit for bit on the CPU."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from ncpvae.errors import ConfigError
from ncpvae.run.precision import Precision, _bf16_supported

CPU = torch.device("cpu")
bf16_cpu = pytest.mark.skipif(not _bf16_supported(CPU), reason="this CPU has no bfloat16")
#: smoke training only (no fit/evaluation), a few steps per epoch
SMOKE = ["smoke", "--set", "evaluate.enabled=false", "--set", "train.epochs=2",
         "--set", "train.steps_per_epoch=4"]


def test_precision_names_and_devices_are_checked_with_one_line_errors():
    with pytest.raises(ConfigError, match=r"fp16' needs a CUDA device \(this run is on cpu\)"):
        Precision("fp16", CPU)
    with pytest.raises(ConfigError, match="must be fp32, bf16 or fp16"):
        Precision("fp8", CPU)
    fp32 = Precision("fp32", CPU)
    assert fp32.scaler is None and fp32.state_dict() is None
    with fp32.autocast():  # no autocast at all in fp32
        assert not torch.is_autocast_enabled("cpu")


def test_the_config_default_is_fp32_and_bad_values_are_refused():
    from ncpvae.config import TrainConfig

    assert TrainConfig().precision == "fp32"
    with pytest.raises(Exception, match="precision"):
        TrainConfig(precision="half")


@bf16_cpu
def test_bf16_autocasts_the_forward_and_gives_float32_terms():
    layer = torch.nn.Linear(8, 4)
    bf16 = Precision("bf16", CPU)
    with bf16.autocast():
        y = layer(torch.randn(3, 8))
    assert y.dtype == torch.bfloat16
    out = bf16.to_fp32({"loss": y.sum(), "kl": y.mean()})
    assert all(v.dtype == torch.float32 for v in out.values())
    assert layer.weight.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 training needs CUDA")
def test_fp16_on_cuda_scales_the_loss_and_keeps_float32_weights():
    device = torch.device("cuda")
    layer = torch.nn.Linear(8, 1).to(device)
    opt = torch.optim.Adam(layer.parameters())
    fp16 = Precision("fp16", device)
    with fp16.autocast():
        loss = layer(torch.randn(16, 8, device=device)).square().mean()
    assert loss.dtype == torch.float16
    fp16.backward(fp16.to_fp32({"loss": loss})["loss"])
    fp16.step(opt, list(layer.parameters()), grad_clip=1.0)
    assert layer.weight.dtype == torch.float32 and torch.isfinite(layer.weight).all()
    assert fp16.state_dict()["scale"] > 0


def _train(out: Path, *extra: str, kill: str | None = None):
    from test_resume import cli

    return cli("train", *SMOKE, *extra, "--out", str(out), kill=kill)


def _records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if json.loads(line).get("stage") == "train"]


@pytest.mark.slow
@bf16_cpu
def test_bf16_smoke_training_is_finite_and_near_fp32(tmp_path):
    assert _train(tmp_path / "fp32").returncode == 0
    done = _train(tmp_path / "bf16", "--set", "train.precision=bf16")
    assert done.returncode == 0, done.stderr
    fp32, bf16 = _records(tmp_path / "fp32"), _records(tmp_path / "bf16")
    assert len(fp32) == len(bf16) == 2
    for a, b in zip(fp32, bf16):
        for key in ("train_loss", "test_elbo"):
            assert torch.isfinite(torch.tensor(b[key]))
            # bf16 has an 8-bit mantissa (relative rounding 2^-8 ~ 0.4 %); after 8 steps the
            # losses stay within 2 % of fp32's
            assert abs(b[key] - a[key]) <= 0.02 * abs(a[key]), (key, a[key], b[key])
        assert b[key] != a[key]  # bf16 did change the arithmetic
    weights = torch.load(tmp_path / "bf16" / "checkpoint.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in weights["model"].values()
               if v.is_floating_point())


@pytest.mark.slow
@bf16_cpu
def test_a_bf16_run_resumes_bit_for_bit(tmp_path):
    from test_resume import cli, results_without_evaluation

    bf16 = ["--set", "train.precision=bf16"]
    reference, run = tmp_path / "reference", tmp_path / "killed"
    assert _train(reference, *bf16).returncode == 0
    assert _train(run, *bf16, kill="1@epoch").returncode == -signal.SIGKILL
    final = cli("resume", str(run))
    assert final.returncode == 0, final.stderr
    assert results_without_evaluation(run) == results_without_evaluation(reference)
    weights = [torch.load(r / "checkpoint.pt", weights_only=True)["model"]
               for r in (reference, run)]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


