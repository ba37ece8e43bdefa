"""Prior-fit two-sample tests, sample-quality metrics and the local feature network."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from ncpvae.errors import DataError
from ncpvae.metrics import (
    FeatureNetConfig,
    cached_feature_net,
    classifier_two_sample_test,
    extract_features,
    factor_coverage,
    feature_net_cache_key,
    feature_net_for_ground_truth,
    feature_net_for_labels,
    frechet_distance,
    frechet_distance_from_stats,
    kid,
    load_feature_net,
    mmd_permutation_test,
    precision_recall,
    predict_factors,
    prior_fit,
    sample_quality,
    save_feature_net,
)
from ncpvae.metrics.feature_net import FeatureNet, FeatureNetSpec
from ncpvae.metrics.mmd import gaussian_kernel, median_heuristic, mmd2_unbiased, polynomial_kernel

# --------------------------------------------------------------------------- MMD building blocks


def test_mmd2_unbiased_matches_definition():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(4, 3)) + 0.5
    k = lambda a, b: math.exp(-np.sum((a - b) ** 2) / 2)  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / 20
    yy = sum(k(y[i], y[j]) for i in range(4) for j in range(4) if i != j) / 12
    xy = sum(k(a, b) for a in x for b in y) / 20
    got = mmd2_unbiased(gaussian_kernel(x, x, 1.0), gaussian_kernel(y, y, 1.0),
                        gaussian_kernel(x, y, 1.0))
    assert got == pytest.approx(xx + yy - 2 * xy, rel=1e-12)
    assert polynomial_kernel(x, y)[1, 2] == pytest.approx((x[1] @ y[2] / 3 + 1) ** 3)


def test_median_heuristic_is_median_pairwise_distance():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 2)), rng.normal(size=(7, 2))
    z = np.vstack([x, y])
    dists = [np.linalg.norm(z[i] - z[j]) for i in range(13) for j in range(i + 1, 13)]
    assert median_heuristic(x, y) == pytest.approx(np.median(dists))


def test_mmd_permutation_statistic_equals_direct_estimate():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(30, 3)), rng.normal(size=(20, 3)) + 0.3
    res = mmd_permutation_test(x, y, num_permutations=10, bandwidth=1.5, seed=0)
    direct = mmd2_unbiased(gaussian_kernel(x, x, 1.5), gaussian_kernel(y, y, 1.5),
                           gaussian_kernel(x, y, 1.5))
    assert res.mmd2 == pytest.approx(direct, rel=1e-10)
    assert (res.n_x, res.n_y, res.bandwidth) == (30, 20, 1.5)


@pytest.mark.slow
def test_mmd_under_null_unbiased_and_uniform_p_values():
    # H0: both samples N(0, I). The permutation p-value is exactly valid, so over R independent
    # repetitions its mean is ~1/2 (Uniform sd 1/sqrt(12 R)) and MMD^2_u has mean 0.
    rng = np.random.default_rng(3)
    reps = 40
    stats, pvals = [], []
    for r in range(reps):
        x, y = rng.normal(size=(60, 3)), rng.normal(size=(60, 3))
        res = mmd_permutation_test(x, y, num_permutations=99, seed=r)
        stats.append(res.mmd2)
        pvals.append(res.p_value)
    stats, pvals = np.array(stats), np.array(pvals)
    assert abs(pvals.mean() - 0.5) < 5 / math.sqrt(12 * reps)
    assert abs(stats.mean()) < 5 * stats.std(ddof=1) / math.sqrt(reps)
    # The smallest attainable p-value is 1 / (P + 1); P(p > 0.2) = 0.8 under H0 (5 SE margin).
    assert pvals.min() >= 1 / 100
    assert (pvals > 0.2).mean() > 0.8 - 5 * math.sqrt(0.8 * 0.2 / reps)


def test_mmd_detects_a_shift():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(200, 2)), rng.normal(size=(200, 2)) + np.array([1.0, 0.0])
    res = mmd_permutation_test(torch.from_numpy(x), y, num_permutations=199, seed=0)
    # A unit mean shift with 200 points per side: no relabelling comes close; p = 1 / 200.
    assert res.p_value == pytest.approx(1 / 200) and res.mmd2 > 0


def test_two_sample_tests_reject_bad_input():
    with pytest.raises(DataError, match="same dimension"):
        mmd_permutation_test(np.zeros((5, 2)), np.zeros((5, 3)))
    with pytest.raises(DataError, match="NaN"):
        classifier_two_sample_test(np.full((5, 2), np.nan), np.zeros((5, 2)))
    with pytest.raises(DataError, match="at least 2 samples"):
        mmd_permutation_test(np.zeros(5), np.zeros((5, 1)))


# --------------------------------------------------------------------------- C2ST

C2ST_N = 1000  # per side; half held out -> 1000 test points


def test_c2st_null_accuracy_near_half():
    # Under H0 predictions on the balanced held-out set are independent of its labels:
    # accuracy ~ 1/2 with binomial SE 0.5 / sqrt(n_test).
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(C2ST_N, 4)), rng.normal(size=(C2ST_N + 300, 4))
    res = classifier_two_sample_test(x, y, seed=0)
    assert res.n_test == C2ST_N and res.n_train == C2ST_N
    assert abs(res.accuracy - 0.5) < 5 * 0.5 / math.sqrt(res.n_test)
    assert res.se == pytest.approx(math.sqrt(res.accuracy * (1 - res.accuracy) / res.n_test))


def test_c2st_detects_scale_only_with_quadratic_features():
    # N(0, I) vs N(0, 4 I) in 2-D. Any linear rule sign(w.z + b) scores
    # (Phi(t) + Phi(-t/2)) / 2 with t = b/|w|, at most 0.581 (t = 1.36); the Bayes rule
    # thresholds |z|^2 at 8 ln4 / 3 and scores 0.736, which quadratic features can express.
    n = 2000
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(n, 2)), 2.0 * rng.normal(size=(n, 2))
    half_width = 5 * 0.5 / math.sqrt(n)
    best_linear = 0.581
    linear = classifier_two_sample_test(x, y, classifier="linear", seed=0)
    quad = classifier_two_sample_test(x, y, classifier="quadratic", seed=0)
    assert linear.accuracy < best_linear + half_width
    assert quad.accuracy > best_linear + half_width and quad.p_value < 1e-6
    assert quad.accuracy < 0.736 + half_width  # nothing beats the Bayes rule


@pytest.mark.slow
def test_c2st_mlp_detects_a_shift_and_prior_fit_wraps_both():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(600, 3)), rng.normal(size=(600, 3)) + np.array([1.0, 0, 0])
    # Bayes accuracy Phi(1/2) = 0.69 for a unit shift.
    assert classifier_two_sample_test(x, y, classifier="mlp", seed=0).accuracy > 0.6
    res = prior_fit(x, y, seed=0)
    assert res.mmd.p_value < 0.01 and res.c2st.accuracy > 0.6
    assert set(res.to_dict()) == {"mmd", "c2st"}


# --------------------------------------------------------------------------- KID


def test_kid_same_law_within_se_and_different_law_positive():
    rng = np.random.default_rng(8)
    a, b = rng.normal(size=(2000, 16)), rng.normal(size=(2000, 16))
    same = kid(a, b, seed=0)
    # Disjoint blocks give independent unbiased estimates: mean 0 under one law.
    assert same.num_subsets == 10 and same.subset_size == 200
    assert abs(same.kid) < 5 * same.se
    c = rng.normal(size=(2000, 16)) + np.r_[1.0, np.zeros(15)]
    diff = kid(a, c, seed=0)
    assert diff.kid > 5 * diff.se


def test_kid_needs_enough_points():
    with pytest.raises(DataError, match="KID needs"):
        kid(np.zeros((15, 2)), np.zeros((15, 2)), num_subsets=10)


# --------------------------------------------------------------------------- Fréchet distance


def test_frechet_closed_forms():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    # Commuting (diagonal) covariances: |dmu|^2 + sum (sqrt(a) - sqrt(b))^2.
    expected = 5.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0.0
    assert frechet_distance_from_stats(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected)
    assert frechet_distance_from_stats(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0, abs=1e-9)
    # General case against the textbook formula with scipy's sqrtm.
    rng = np.random.default_rng(9)
    m1, m2 = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(4), m2 @ m2.T
    ref = np.sum((mu1[:1] - mu2[:1]) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    got = frechet_distance_from_stats(np.r_[mu1[:1], 0, 0, 0], s1, np.r_[mu2[:1], 0, 0, 0], s2)
    assert got == pytest.approx(ref, rel=1e-8)


def test_frechet_distance_of_samples_near_closed_form():
    # N((0,0), I) vs N((1,0), diag(4, 1)): FD = 1 + (2 - 1)^2 = 2. Delta method: the mean term
    # has variance 4 dmu'(S1 + S2) dmu / n = 20/n, the first variance term (d/da = -1,
    # d/db = 1/2, Var a = 2/n, Var b = 32/n) 10/n, the rest is second order: SE = sqrt(30/n).
    n = 20_000
    rng = np.random.default_rng(10)
    x = rng.normal(size=(n, 2))
    y = rng.normal(size=(n, 2)) * np.array([2.0, 1.0]) + np.array([1.0, 0.0])
    assert abs(frechet_distance(x, y) - 2.0) < 5 * math.sqrt(30 / n)


# --------------------------------------------------------------------------- precision / recall


def test_precision_recall_closed_cases():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(500, 3))
    # A set against itself: every point lies in its own ball.
    assert precision_recall(x, x).to_dict() == {"precision": 1.0, "recall": 1.0}
    # Disjoint supports far apart: nothing is covered.
    far = precision_recall(x, x + 100.0)
    assert far.precision == 0.0 and far.recall == 0.0


def test_precision_recall_identical_laws_and_mode_dropping():
    rng = np.random.default_rng(12)
    # Identical 2-D laws: a fresh point misses every real point's 3-NN ball only in sparse
    # tails; Kynkäänniemi et al. report values near 1 in low dimension: both > 0.95.
    a, b = rng.normal(size=(2000, 2)), rng.normal(size=(2000, 2))
    same = precision_recall(a, b)
    assert same.precision > 0.95 and same.recall > 0.95
    # Real = two far-apart clusters, fake = one of them: precision stays ~1 while recall is
    # the real mass of the covered cluster, Binomial(n, 1/2) / n.
    side = rng.integers(0, 2, size=2000)
    real = rng.normal(size=(2000, 2)) + 50.0 * side[:, None]
    fake = rng.normal(size=(1000, 2))
    pr = precision_recall(real, fake)
    assert pr.precision > 0.95
    assert abs(pr.recall - 0.5) < 5 * 0.5 / math.sqrt(2000) + 0.05  # + misses in the tails


def test_sample_quality_bundle():
    rng = np.random.default_rng(13)
    a, b = rng.normal(size=(400, 4)), rng.normal(size=(300, 4))
    res = sample_quality(a, b)
    assert (res.n_real, res.n_fake) == (400, 300)
    assert res.frechet == pytest.approx(frechet_distance(a, b))
    assert res.kid == pytest.approx(kid(a, b).kid)


# --------------------------------------------------------------------------- factor coverage


def test_factor_coverage_closed_form():
    names, sizes = ("shape", "scale", "orientation", "posX", "posY"), (3, 6, 40, 32, 32)
    pred = np.array([[0, 0, 0, 0, 0], [0, 5, 1, 7, 8], [2, 5, 39, 31, 31]])
    res = factor_coverage(pred, sizes, factor_names=names)
    assert res.per_factor == {"shape": 2 / 3, "scale": 2 / 6, "orientation": 3 / 40,
                              "posX": 3 / 32, "posY": 3 / 32}
    # Sprites grid: 3 x 6 x 4 x 4 = 288 cells; rows 1 and 2 share posX/posY bin 0 but differ in
    # scale: three distinct cells.
    assert res.joint_cells == 288 and res.joint == pytest.approx(3 / 288)
    full = np.stack(np.meshgrid(*[np.arange(s) for s in (3, 6, 1, 32, 32)], indexing="ij"),
                    -1).reshape(-1, 5)
    assert factor_coverage(full, sizes, factor_names=names).joint == 1.0
    custom = factor_coverage(pred[:, :2], (3, 6), joint_bins={"factor0": 3})
    assert custom.joint == pytest.approx(2 / 3) and custom.joint_bins == {"factor0": 3}
    assert factor_coverage(pred[:, :2], (3, 6)).joint is None
    with pytest.raises(DataError, match="indices"):
        factor_coverage(pred + 100, sizes, factor_names=names)


# --------------------------------------------------------------------------- feature network


class Blocks:
    """8x8 images with a 2x2 bright block at (posX, posY) on a 4x4 grid."""

    factor_sizes = (4, 4)
    factor_names = ("posX", "posY")

    def sample_factors(self, n, generator=None):
        return torch.stack([torch.randint(0, s, (n,), generator=generator)
                            for s in self.factor_sizes], 1)

    def images_from_factors(self, f):
        img = torch.zeros(f.shape[0], 1, 8, 8)
        rows = torch.arange(f.shape[0])
        for dx in range(2):
            for dy in range(2):
                img[rows, 0, 2 * f[:, 1] + dy, 2 * f[:, 0] + dx] = 1.0
        return img


SMALL_NET = FeatureNetConfig(num_train=1200, epochs=2, batch_size=32, width=8, feature_dim=16,
                             val_fraction=0.25)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (1, 64, 64)])
def test_feature_net_accepts_any_image_size(shape):
    net = FeatureNet(FeatureNetSpec(shape, (3, 5), ("a", "b"), width=4, feature_dim=12))
    x = torch.rand(2, *shape)
    assert net.features(x).shape == (2, 12)
    assert [t.shape for t in net(x)] == [(2, 3), (2, 5)]
    with pytest.raises(DataError, match="expects images"):
        extract_features(net, torch.rand(2, 1, 9, 9))


@pytest.mark.slow
def test_feature_net_trains_and_round_trips(tmp_path):
    data = Blocks()
    net = feature_net_for_ground_truth(data, config=SMALL_NET)
    # 300 held-out images, chance 1/4 per head: require far above chance (> 0.25 + 5 SE).
    assert all(acc > 0.25 + 5 * math.sqrt(0.25 * 0.75 / 300) for acc in net.info["val_accuracy"])
    images = data.images_from_factors(data.sample_factors(50, torch.Generator().manual_seed(1)))
    path = tmp_path / "cache" / "net.pt"
    save_feature_net(net, path)
    assert [p.name for p in path.parent.iterdir()] == ["net.pt"]  # no temp file left behind
    loaded = load_feature_net(path)
    assert np.array_equal(extract_features(net, images), extract_features(loaded, images))
    assert np.array_equal(predict_factors(net, images), predict_factors(loaded, images))
    assert loaded.spec == net.spec and loaded.info == net.info
    # The cache loads instead of rebuilding.
    key = feature_net_cache_key("blocks", {"size": 8}, SMALL_NET)
    save_feature_net(net, tmp_path / f"{key}.pt")
    again = cached_feature_net(tmp_path, key, build=lambda: pytest.fail("rebuilt a cached net"))
    assert np.array_equal(extract_features(again, images), extract_features(net, images))


def test_feature_net_for_labels_and_cache_build(tmp_path):
    from ncpvae.data import TensorImageSource

    labels = torch.arange(40) % 2
    source = TensorImageSource(torch.rand(40, 1, 8, 8), labels)
    cfg = FeatureNetConfig(epochs=1, batch_size=16, width=4, feature_dim=8, val_fraction=0)
    built = []
    net = cached_feature_net(tmp_path, "labels", lambda: built.append(1) or
                             feature_net_for_labels(source, config=cfg))
    assert built == [1] and (tmp_path / "labels.pt").is_file()
    assert net.spec.head_sizes == (2,) and net.spec.head_names == ("label",)
    assert extract_features(net, source).shape == (40, 8)
    with pytest.raises(DataError, match="no labels"):
        feature_net_for_labels(TensorImageSource(torch.rand(4, 1, 8, 8)))


def test_feature_net_cache_key_and_bad_files(tmp_path):
    k = feature_net_cache_key("sprites", {"n": 1}, FeatureNetConfig())
    assert k == feature_net_cache_key("sprites", {"n": 1}, FeatureNetConfig())
    assert k != feature_net_cache_key("sprites", {"n": 2}, FeatureNetConfig())
    assert k != feature_net_cache_key("sprites", {"n": 1}, FeatureNetConfig(epochs=4))
    assert k.startswith("sprites-")
    with pytest.raises(DataError, match="not found"):
        load_feature_net(tmp_path / "missing.pt")
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(DataError, match="not an ncpvae feature net"):
        load_feature_net(tmp_path / "other.pt")
