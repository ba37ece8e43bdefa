"""Optional Inception FID/KID: a stand-in weight file in the pytorch-fid / torch-fidelity format
(random weights of the same architecture: same keys, same shapes), the file checks, and the
one-line note when no file is configured."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ncpvae.errors import DataError
from ncpvae.metrics.inception import (
    FEATURE_DIM,
    HOW_TO_GET,
    fid_inception,
    inception_features,
    inception_scores,
    load_inception,
)

#: some keys and shapes of pt_inception-2015-12-05-6726825d.pth (pytorch-fid, torch-fidelity)
KNOWN = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Conv2d_1a_3x3.bn.running_var": (32,),
         "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
         "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
         "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
         "fc.weight": (1008, 2048), "fc.bias": (1008,)}


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> Path:
    """A weight file in the same format: the plain state dict of the architecture, randomly
    initialised (no downloaded weights; the numbers are meaningless, the format is not)."""
    torch.manual_seed(0)
    state = {k: v for k, v in fid_inception().state_dict().items()
             if not k.endswith("num_batches_tracked")}  # the TF port's files have none
    path = tmp_path_factory.mktemp("inception") / "pt_inception-stand-in.pth"
    torch.save(state, path)
    return path


def test_the_architecture_has_the_weight_files_keys():
    state = fid_inception().state_dict()
    for key, shape in KNOWN.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith("AuxLogits") for k in state)


@pytest.mark.slow  # a 299 x 299 Inception pass costs seconds per image on a CPU
def test_the_stand_in_loads_and_gives_pool3_features_of_grey_and_colour_images(stand_in):
    net = load_inception(stand_in)
    g = torch.Generator().manual_seed(0)
    grey = torch.rand(2, 1, 16, 16, generator=g)
    feats = inception_features(net, grey, batch_size=1)
    assert feats.shape == (2, FEATURE_DIM) and feats.dtype == np.float64
    assert np.isfinite(feats).all() and (feats >= 0).all()  # after ReLUs and average pooling
    # grey is repeated to three channels: the same features as the colour image it stands for
    colour = inception_features(net, grey.repeat(1, 3, 1, 1), batch_size=1)
    np.testing.assert_allclose(feats, colour, rtol=1e-5, atol=1e-6)
    with pytest.raises(DataError, match="1 or 3"):
        inception_features(net, torch.rand(2, 2, 16, 16))


def test_a_wrapped_torch_fidelity_style_dict_loads_and_a_foreign_file_is_refused(
        stand_in, tmp_path):
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": torch.load(stand_in, weights_only=True)}, wrapped)
    load_inception(wrapped)
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3)}, other)
    with pytest.raises(DataError, match="not the pytorch-fid / torch-fidelity FID Inception"):
        load_inception(other)
    with pytest.raises(DataError, match="no file") as err:
        load_inception(tmp_path / "missing.pth")
    assert "curl -LO github.com/mseitzer/pytorch-fid/" in str(err.value) and "\n" not in str(err.value)


def test_inception_scores_are_zero_ish_for_one_law_and_large_for_two():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 8)), rng.normal(size=(200, 8))
    same = inception_scores(a, b, subset_size=50, num_subsets=4, seed=0)
    shifted = inception_scores(a, b + 3.0, subset_size=50, num_subsets=4, seed=0)
    assert abs(same["kid"]) < 3 * same["kid_se"] + 1e-3 and same["fid"] < 1.0
    assert shifted["kid"] > 10 * shifted["kid_se"] and shifted["fid"] > 8 * 9 * 0.9


def test_without_weights_the_evaluation_says_in_one_line_how_to_get_them(smoke_run):
    ev = json.loads((smoke_run / "evaluation.json").read_text())
    assert HOW_TO_GET in ev["notes"] and "\n" not in HOW_TO_GET
    assert "evaluate.inception_weights" in HOW_TO_GET
    assert all("inception" not in row for row in ev["rows"])


@pytest.mark.slow
def test_the_evaluation_reports_inception_fid_and_kid_with_the_stand_in(
        smoke_run, stand_in, tmp_path):
    from ncpvae.evaluation.pipeline import evaluate_command
    from ncpvae.run.summary_text import format_run_summary

    run = Path(shutil.copytree(smoke_run, tmp_path / "run"))
    evaluate_command(run, [f"evaluate.inception_weights={stand_in}", "evaluate.num_samples=8",
                           "evaluate.num_heldout=8", "evaluate.sample_quality.kid_num_subsets=2",
                           "evaluate.likelihood.enabled=false"], quiet=True)
    ev = json.loads((run / "evaluation.json").read_text())
    row, = ev["rows"]
    inc = row["inception"]
    assert inc["n_real"] == 8 and inc["n_fake"] == 8 and inc["fid"] >= 0
    assert np.isfinite(inc["kid"]) and inc["kid_se"] >= 0
    assert HOW_TO_GET not in ev["notes"]
    assert "Inception FID / KID" in (run / "report.html").read_text()
    assert "Inception FID" in format_run_summary(run)
    with pytest.raises(DataError, match="no file"):
        evaluate_command(run, [f"evaluate.inception_weights={tmp_path / 'none.pth'}"],
                         quiet=True)
