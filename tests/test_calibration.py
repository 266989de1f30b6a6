from __future__ import annotations

import warnings

import numpy as np
import pytest

from anomalyvae import calibration as cal
from anomalyvae.calibration import (
    Threshold,
    normalize,
    pixel_threshold_from_labels,
    pixel_threshold_from_normals,
    threshold_from_labels,
    threshold_from_normals,
)


@pytest.mark.parametrize("target_fpr", [0.01, 0.05, 0.1])
def test_normal_quantile_reaches_target_fpr_on_held_out_normals(target_fpr):
    rng = np.random.default_rng(0)
    calibration, held_out = rng.gamma(2.0, size=5000), rng.gamma(2.0, size=20000)
    threshold = threshold_from_normals(calibration, target_fpr)
    assert threshold.method == "normal_quantile" and threshold.n_normal == 5000
    assert threshold.expected_fpr <= target_fpr
    # Binomial sampling error of a quantile from 5000 normals: stay within 30 % relative.
    assert np.mean(held_out > threshold.value) == pytest.approx(target_fpr, rel=0.3)


def test_too_few_normals_warn_and_use_the_maximum():
    with pytest.warns(UserWarning, match="1/\\(n\\+1\\) = 0.25.*at least 99"):
        threshold = threshold_from_normals([1.0, 2.0, 3.0], 0.01, tail="conformal")
    assert threshold.value == 3.0 and threshold.expected_fpr == 0.0
    assert threshold.min_achievable_fpr == 0.25


@pytest.mark.parametrize(("n", "target_fpr", "rank"), [(19, 0.05, 19), (99, 0.1, 90), (9, 0.1, 9)])
def test_threshold_is_the_conformal_order_statistic(n, target_fpr, rank):
    scores = np.arange(1, n + 1, dtype=float)[::-1]  # order must not matter
    threshold = threshold_from_normals(scores, target_fpr)
    assert threshold.value == rank  # the ceil((n + 1)(1 - fpr))-th smallest


def test_conformal_threshold_keeps_its_promise_with_few_normals():
    # 30 normals at a 10 % target: averaged over draws, a new normal exceeds the
    # threshold at most 10 % of the time (the conformal guarantee), never far above.
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(400):
        threshold = threshold_from_normals(rng.normal(size=30), 0.1)
        rates.append(np.mean(rng.normal(size=2000) > threshold.value))
    assert 0.06 < np.mean(rates) <= 0.1


@pytest.mark.parametrize("outlier", [5.0, 50.0, 5e6])
def test_one_outlying_normal_does_not_set_the_robust_threshold(outlier):
    rng = np.random.default_rng(0)
    normals = rng.normal(size=40)
    with pytest.warns(UserWarning, match="second-largest normal score and a robust"):
        robust = threshold_from_normals([*normals, outlier], 0.01, tail="robust")
    with pytest.warns(UserWarning, match="Using the largest normal score"):
        conformal = threshold_from_normals([*normals, outlier], 0.01, tail="conformal")
    assert conformal.value == outlier and robust.tail == "robust"
    # never past the next normal or the Gaussian tail of the rest, whatever the outlier
    gaussian = np.median(normals) + 2.3263 * 1.4826 * np.median(
        np.abs(normals - np.median(normals))
    )
    assert robust.value <= max(normals.max(), gaussian) + 0.2
    assert robust.value >= normals.max()  # and never below the second largest
    # with enough normals the conformal rank is below the maximum: both tails agree
    many = rng.normal(size=500)
    assert (
        threshold_from_normals(many, 0.01, "robust").value
        == threshold_from_normals(many, 0.01, "conformal").value
    )


@pytest.mark.parametrize(
    ("n", "target_fpr", "chosen"),
    [
        (40, 0.01, "robust"),
        (97, 0.01, "robust"),
        (99, 0.01, "conformal"),
        (150, 0.01, "conformal"),
        (15, 0.05, "robust"),
        (19, 0.05, "conformal"),
        (500, 0.01, "conformal"),
    ],
)
def test_the_default_tail_is_robust_only_where_the_target_cannot_be_promised(n, target_fpr, chosen):
    # n normals promise 1/(n + 1) at best: below that no order statistic keeps the target,
    # so one outlying normal must not set the threshold; above it the conformal order
    # statistic keeps the promise, even where it is the largest normal (n < 2 / fpr - 1)
    rng = np.random.default_rng(n)
    scores = [*rng.normal(size=n - 1), 1e6]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = threshold_from_normals(scores, target_fpr)
        explicit = threshold_from_normals(scores, target_fpr, chosen)
    assert default.tail == chosen and default.value == explicit.value
    if chosen == "robust":
        assert default.value < 1e6  # the outlier does not set it
    elif n + 1 < 2 / target_fpr:
        assert default.value == 1e6  # the promise needs the largest normal


@pytest.mark.parametrize(
    ("entry", "promised"),
    [
        (
            {"method": "normal_quantile", "target_fpr": 0.01, "n_normal": 999, "tail": "conformal"},
            0.01,
        ),
        (
            {"method": "normal_quantile", "target_fpr": 0.01, "n_normal": 150, "tail": "conformal"},
            0.01,
        ),
        (
            {"method": "normal_quantile", "target_fpr": 0.01, "n_normal": 61, "tail": "conformal"},
            1 / 62,
        ),
        (
            {"method": "normal_quantile", "target_fpr": 0.01, "n_normal": 61, "tail": "robust"},
            2 / 62,
        ),
        ({"method": "normal_quantile", "target_fpr": 0.01, "n_normal": 61, "tail": None}, 1 / 62),
        (
            {"method": "normal_quantile", "target_fpr": 0.01, "n_normal": 500, "tail": "robust"},
            0.01,
        ),
        ({"method": "f1", "target_fpr": None, "n_normal": 61}, None),
        ({"method": "normal_quantile", "target_fpr": "x", "n_normal": 61}, None),
        (None, None),
    ],
)
def test_what_a_threshold_promises(entry, promised):
    from anomalyvae.inference.contract import promised_fpr

    assert promised_fpr(entry) == (None if promised is None else pytest.approx(promised))


def test_old_thresholds_without_the_floor_still_load():
    data = threshold_from_normals(np.arange(200.0), 0.01).to_dict()
    data.pop("min_achievable_fpr")
    data.pop("tail")
    loaded = Threshold.from_dict(data)
    assert loaded.min_achievable_fpr is None and loaded.tail is None


@pytest.mark.parametrize(
    ("scores", "message"),
    [([], "empty"), ([1.0, np.nan], "NaN")],
)
def test_bad_scores(scores, message):
    with pytest.raises(ValueError, match=message):
        threshold_from_normals(scores, 0.5)


def test_bad_target():
    with pytest.raises(ValueError, match="target_fpr must be in"):
        threshold_from_normals([1.0], 0.0)


@pytest.mark.parametrize("method", ["f1", "youden"])
def test_labelled_methods_split_separable_scores(method):
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    labels = np.array([0, 0, 0, 1, 1, 1])
    threshold = threshold_from_labels(scores, labels, method)
    assert 0.3 <= threshold.value < 0.7
    assert threshold.expected_fpr == 0.0 and threshold.expected_tpr == 1.0
    assert (threshold.n_normal, threshold.n_anomalous) == (3, 3)


def test_labelled_needs_both_classes_and_known_method():
    with pytest.raises(ValueError, match="both"):
        threshold_from_labels([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="method"):
        threshold_from_labels([0.1, 0.2], [0, 1], "magic")


def test_pixel_thresholds():
    rng = np.random.default_rng(1)
    maps = rng.random((20, 16, 16))
    masks = np.zeros_like(maps, dtype=bool)
    masks[:, :2, :2] = True
    maps[masks] += 1.0
    normal = pixel_threshold_from_normals(maps[:, 4:, 4:], 0.01)
    assert normal.value == pytest.approx(0.99, abs=0.01)
    labelled = pixel_threshold_from_labels(maps, masks, "f1")
    assert labelled.expected_tpr == 1.0 and labelled.expected_fpr < 0.01


def test_normalize_and_round_trip():
    np.testing.assert_allclose(normalize([1.0, 2.0], 2.0), [0.5, 1.0])
    with pytest.raises(ValueError, match="> 0"):
        normalize([1.0], 0.0)
    threshold = Threshold(1.0, "f1", None, 0.0, 1.0, 3, 3)
    assert Threshold.from_dict(threshold.to_dict()) == threshold


def test_calibrate_adds_extra_normals_and_sorts_what_it_read():
    rng = np.random.default_rng(0)
    scores, maps = rng.normal(size=20), rng.random((20, 4, 4))
    extra = np.r_[rng.normal(size=80), np.nan, np.inf]
    found = cal.calibrate(scores, maps, target_fpr=0.05, extra_normal_scores=extra)
    assert found.image.n_normal == 100  # the non-finite extra scores are dropped
    assert np.all(np.diff(found.normal_scores) >= 0) and len(found.normal_scores) == 100
    assert found.pixel.value == cal.pixel_threshold_from_normals(maps, 0.005).value


def test_calibrate_with_labels_and_masks():
    scores = np.r_[np.zeros(10), np.ones(10)]
    maps = np.zeros((20, 4, 4))
    masks = np.zeros((20, 4, 4), dtype=bool)
    maps[10:, :2], masks[10:, :2] = 1.0, True
    found = cal.calibrate(scores, maps, np.r_[np.zeros(10), np.ones(10)], masks, "f1")
    assert found.normal_scores is None and 0 <= found.image.value < 1
    assert found.image.method == "f1" and found.pixel.method == "f1"
    assert "Threshold" in found.image.describe() and "10 anomalous" in found.image.describe()
    with pytest.raises(ValueError, match="labels for"):
        cal.calibrate(scores, maps, np.zeros(3))
    with pytest.raises(ValueError, match="method must be"):
        cal.calibrate(scores, maps, method="nope")


def test_map_pixel_sample_keeps_every_pixel_of_a_small_set():
    maps = np.random.default_rng(0).gamma(2.0, size=(12, 8, 8)).astype(np.float32)
    sample = cal.MapPixelSample(len(maps), max_pixels=10_000)
    for start in range(0, len(maps), 5):  # chunks of 5, 5 and 2 maps
        sample.add(maps[start : start + 5])
    assert sample.pixels().shape == (12, 64)
    whole = cal.pixel_threshold_from_normals(maps, 0.01).value
    assert cal.pixel_threshold_from_normals(sample.pixels(), 0.01).value == whole


def test_map_pixel_sample_stays_bounded_and_uniform_when_more_maps_come():
    rng = np.random.default_rng(1)
    # the first maps are low, the later ones high: a sample that kept the early maps'
    # pixels at a higher rate than the later ones' would read a biased quantile
    maps = np.concatenate([rng.normal(0, 1, (40, 32, 32)), rng.normal(1, 1, (360, 32, 32))]).astype(
        np.float32
    )
    sample = cal.MapPixelSample(expected_maps=40, max_pixels=5_000, seed=3)
    for start in range(0, len(maps), 16):
        sample.add(maps[start : start + 16])
        assert sum(r.size for r in sample.rows) <= 2 * 5_000 + 16 * 1024
    pixels = sample.pixels()
    assert pixels.shape[0] == 400 and 5_000 // 4 <= pixels.size <= 2 * 5_000
    assert len(set(r.shape[1] for r in sample.rows)) <= 2
    assert pixels.mean() == pytest.approx(maps.mean(), abs=0.1)
    q = np.quantile(maps, 0.99)
    assert np.quantile(pixels, 0.99) == pytest.approx(q, abs=0.15)
