from __future__ import annotations

import numpy as np
import pytest

from anomalyvae.metrics import (
    aupro,
    evaluation_table,
    image_metrics,
    pixel_auroc,
    sensitivity_at_specificity,
)


def test_image_metrics_at_threshold():
    labels = [0, 0, 0, 1, 1]
    scores = [0.1, 0.2, 0.6, 0.5, 0.9]
    result = image_metrics(labels, scores, threshold=0.4)
    assert result["image_auroc"] == pytest.approx(5 / 6)
    # predicted anomalous: 0.6 (FP), 0.5 (TP), 0.9 (TP)
    assert result["precision"] == pytest.approx(2 / 3)
    assert result["recall"] == 1.0 and result["fpr"] == pytest.approx(1 / 3)
    assert result["f1"] == pytest.approx(0.8)
    assert np.isnan(image_metrics([0, 0], [0.1, 0.2])["image_auroc"])


def test_sensitivity_at_specificity():
    assert sensitivity_at_specificity([0, 0, 1, 1], [0.1, 0.4, 0.3, 0.9], 0.95) == 0.5


def test_pixel_auroc():
    masks = np.array([[[True, False], [False, False]]])
    assert pixel_auroc(masks, np.array([[[0.9, 0.1], [0.2, 0.3]]])) == 1.0
    assert np.isnan(pixel_auroc(np.zeros((1, 2, 2), bool), np.zeros((1, 2, 2))))


def test_aupro_hand_computed():
    # One image, two regions: A (2 px) and B (1 px), and 5 normal pixels.
    masks = np.zeros((1, 2, 4), dtype=bool)
    masks[0, 0, 0:2] = True  # region A
    masks[0, 1, 3] = True  # region B
    maps = np.zeros((1, 2, 4), dtype=np.float32)
    maps[0, 0, 0], maps[0, 0, 1] = 0.9, 0.5  # A: one pixel high, one medium
    maps[0, 1, 3] = 0.1  # B: low
    maps[0, 0, 2] = 0.6  # one normal pixel in between
    maps[0, 0, 3] = maps[0, 1, 0] = maps[0, 1, 1] = maps[0, 1, 2] = 0.0
    # Thresholds (score >= t) and (FPR, PRO):
    #   t=0.9 -> FPR 0, PRO (1/2 + 0)/2 = 0.25
    #   t=0.6 -> FPR 1/5, PRO 0.25
    #   t=0.5 -> FPR 1/5, PRO (1 + 0)/2 = 0.5
    #   t=0.1 -> FPR 1/5, PRO 1.0 ; then t=0 -> FPR 1, PRO 1
    # Up to FPR 0.3: trapezoid from (0,0)->(0,0.25) is 0, (0,.25)->(0.2,.25) = 0.05,
    # vertical at 0.2 up to 1.0, then (0.2,1)->(0.3,1) = 0.1. Total 0.15 / 0.3 = 0.5.
    assert aupro(masks, maps, fpr_limit=0.3) == pytest.approx(0.5)
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.05 + 0.8)


def test_aupro_perfect_and_no_regions():
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 2:4, 2:4] = True
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0)
    assert np.isnan(aupro(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 4))))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(masks, masks.astype(float), fpr_limit=0)


def test_evaluation_table_per_type():
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.9, 0.15])
    types = ["good", "good", "crack", "stain"]
    masks = np.zeros((4, 4, 4), bool)
    masks[2:, 1:3, 1:3] = True
    maps = masks.astype(float)
    table = evaluation_table(labels, scores, types, 0.5, masks, maps)
    assert list(table.index) == ["overall", "crack", "stain"]
    assert table.loc["crack", "image_auroc"] == 1.0
    assert table.loc["stain", "image_auroc"] == 0.5
    assert table.loc["overall", "pixel_auroc"] == 1.0
    assert table.loc["crack", "n_images"] == 3


def test_sampled_negatives_match_exact_metrics():
    rng = np.random.default_rng(0)
    masks = np.zeros((6, 64, 64), bool)
    masks[:3, 10:20, 10:20] = True
    maps = rng.random(masks.shape) + masks * 0.3
    exact_auroc, exact_pro = pixel_auroc(masks, maps), aupro(masks, maps)
    assert pixel_auroc(masks, maps, max_negatives=5000) == pytest.approx(exact_auroc, abs=0.01)
    assert aupro(masks, maps, max_negatives=5000) == pytest.approx(exact_pro, abs=0.02)


def _regions_and_noise(seed=0):
    rng = np.random.default_rng(seed)
    masks = np.zeros((6, 64, 64), dtype=bool)
    masks[:3, 20:30, 20:34] = True
    masks[1, 40:44, 5:9] = True  # a second, small region
    maps = rng.random(masks.shape).astype(np.float32) + 0.6 * masks
    return masks, maps


@pytest.mark.parametrize("max_negatives", [None, 5000])
def test_pixel_metrics_are_the_two_metrics_of_the_same_sample(max_negatives):
    from anomalyvae.metrics import pixel_metrics

    masks, maps = _regions_and_noise()
    both = pixel_metrics(masks, maps, max_negatives=max_negatives)
    assert both == (pixel_auroc(masks, maps, max_negatives), aupro(masks, maps, 0.3, max_negatives))
    assert 0.5 < both[0] < 1 and 0 < both[1] < 1
    none = np.zeros_like(masks)
    assert all(np.isnan(pixel_metrics(none, maps)))


def test_evaluation_table_measures_each_set_of_images_pixels_once(monkeypatch):
    """With one defect type, its row holds overall's images: measured once, copied."""
    import anomalyvae.metrics as metrics

    masks, maps = _regions_and_noise()
    labels = masks.any(axis=(1, 2)).astype(int)
    scores = maps.max(axis=(1, 2))
    calls = []
    real = metrics.pixel_metrics

    def counting(*args, **kwargs):
        calls.append(len(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(metrics, "pixel_metrics", counting)
    one_type = metrics.evaluation_table(labels, scores, ["pit"] * 6, None, masks, maps)
    assert calls == [6]
    assert one_type.loc["pit", ["pixel_auroc", "aupro"]].tolist() == pytest.approx(
        [pixel_auroc(masks, maps, 2_000_000), aupro(masks, maps, 0.3, 2_000_000)]
    )
    assert one_type.loc["overall", "aupro"] == one_type.loc["pit", "aupro"]
    types = ["crack", "crack", "stain", "good", "good", "good"]
    calls.clear()
    two_types = metrics.evaluation_table(labels, scores, types, None, masks, maps)
    assert calls == [6, 5, 4]  # overall, then each type with the normals
    crack = [0, 1, 3, 4, 5]
    assert two_types.loc["crack", "aupro"] == aupro(masks[crack], maps[crack], 0.3, 2_000_000)


@pytest.mark.parametrize("block", [1, 777, 4096, 1 << 24])
def test_negative_sample_block_by_block_keeps_the_same_pixels(block):
    """The sample found block by block is the one an index of every normal pixel gives."""
    from anomalyvae.metrics import _negative_sample

    rng = np.random.default_rng(3)
    truth = rng.random(20_000) < 0.07
    index = np.flatnonzero(~truth)
    chosen = np.random.default_rng(5).choice(index.size, 1500, replace=False)
    expected = truth.copy()
    expected[index[chosen]] = True
    keep = _negative_sample(truth, 1500, seed=5, block=block)
    np.testing.assert_array_equal(keep, expected)
    assert int(keep.sum()) == int(truth.sum()) + 1500
    assert _negative_sample(truth, int((~truth).sum()), block=block) is None


def test_aupro_samples_the_defect_free_pixels_it_is_asked_to(monkeypatch):
    """``max_negatives`` bounds what the PRO curve sorts (memory on large test sets), and
    moves the area by no more than the sampling error."""
    import anomalyvae.metrics as metrics

    rng = np.random.default_rng(0)
    masks = np.zeros((6, 64, 64), dtype=bool)
    masks[:3, 20:30, 20:34] = True
    maps = rng.random(masks.shape).astype(np.float32) + 0.8 * masks
    full = metrics.aupro(masks, maps)
    seen = []
    real = metrics.roc_curve

    def recording(y, *args, **kwargs):
        seen.append(len(y))
        return real(y, *args, **kwargs)

    monkeypatch.setattr(metrics, "roc_curve", recording)
    sampled = metrics.aupro(masks, maps, max_negatives=5000)
    assert seen == [5000 + int(masks.sum())]
    assert abs(sampled - full) < 0.02


def _dense_aupro(masks, maps):
    """The whole PRO area (FPR up to 1) with a weight for every pixel: the definition."""
    from scipy import ndimage
    from sklearn.metrics import roc_curve

    weights = np.zeros(masks.shape)
    n_regions = 0
    for i in range(len(masks)):
        labelled, count = ndimage.label(masks[i], structure=np.ones((3, 3), bool))
        if count:
            areas = np.bincount(labelled.ravel())
            weights[i] = np.where(labelled > 0, 1.0 / areas[labelled], 0.0)
            n_regions += count
    truth = masks.ravel()
    weights = weights.ravel() / n_regions
    weights[~truth] = 1.0 / (~truth).sum()
    fpr, pro, _ = roc_curve(truth, maps.ravel(), sample_weight=weights, drop_intermediate=False)
    return float(np.trapezoid(pro, fpr))


def test_aupro_equals_the_per_pixel_weighted_definition():
    """The weights are held for defect pixels only (memory); the area is unchanged."""
    rng = np.random.default_rng(4)
    masks = np.zeros((5, 40, 48), bool)
    masks[0, 5:9, 5:30] = True  # a long region and a small one in one image
    masks[0, 30:33, 40:44] = True
    masks[2, 10:25, 10:25] = True
    masks[4, 0:3, 0:3] = True  # in a corner
    maps = (rng.random(masks.shape) + 0.6 * masks).astype(np.float32)
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(_dense_aupro(masks, maps), abs=1e-12)
