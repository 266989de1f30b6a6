"""The fusion of the feature family's views: robust z-scores, fixed and adaptive rules."""

import numpy as np
import pytest
import torch

from anomalyvae.errors import InvalidValueError
from anomalyvae.models.fusion import (
    IMAGE_SHARE_POWER,
    IMAGE_SHARE_SCALE,
    VIEW_NAMES,
    LocalExcess,
    fuse_views,
    robust_z_constants,
    share_weights,
    view_weights,
)


def test_fused_score_averages_or_takes_the_strongest_fused_view():
    # columns: local, elbo, global, image, knn
    views = torch.tensor(
        [[4.0, 10.0, 0.0, 3.0, 6.0], [0.0, 99.0, 6.0, 0.0, 0.0], [9.0, 99.0, 3.0, 9.0, 0.0]]
    )
    center, scale = torch.zeros(5), torch.tensor([2.0, 1.0, 1.0, 3.0, 2.0])
    # z: knn / 2, global, image / 3; the VAE's local and elbo views are not fused
    assert fuse_views(views, center, scale).tolist() == pytest.approx([4 / 3, 2.0, 2.0])
    assert fuse_views(views, center, scale, rule="max").tolist() == [3.0, 6.0, 3.0]
    with pytest.raises(ValueError, match="fusion rule"):
        fuse_views(views, center, scale, rule="median")


def test_local_excess_adds_what_the_local_views_see_beyond_the_normal_range():
    # columns: local, elbo, global, image, knn; an image view that outweighs the rest
    views = torch.tensor(
        [[1.0, 0.0, 0.0, 0.5, 2.0], [9.0, 0.0, 0.0, 0.5, 2.0], [9.0, 0, 0, 0.5, 7.0]]
    )
    center, scale = torch.zeros(5), torch.ones(5)
    weights = torch.tensor([0.0, 0.0, 0.01, 0.98, 0.01])
    plain = fuse_views(views, center, scale, rule="image-share", weights=weights)
    assert plain.tolist() == pytest.approx([0.51, 0.51, 0.56])  # the local defect is lost
    excess = LocalExcess((0, 4), weight=0.5, above=3.0)
    fused = fuse_views(views, center, scale, rule="image-share", weights=weights, excess=excess)
    # below the level (first image) nothing is added; above it, half of each view's excess
    assert fused.tolist() == pytest.approx([0.51, 0.51 + 0.5 * 6, 0.56 + 0.5 * (6 + 4)])
    # it adds to the fixed rules too, and weight 0 (models saved before it) adds nothing
    mean = fuse_views(views, center, scale)
    assert (fuse_views(views, center, scale, excess=excess) - mean).tolist() == pytest.approx(
        [0.0, 3.0, 5.0]
    )
    off = LocalExcess((0, 4), weight=0.0, above=3.0)
    assert fuse_views(views, center, scale, excess=off).tolist() == mean.tolist()
    assert excess.to_dict() == {"views": ["local", "knn"], "weight": 0.5, "above_z": 3.0}
    # the numpy twin the pipelines use gives the graph's term
    z = {name: views[:, i].numpy() for i, name in enumerate(VIEW_NAMES)}
    np.testing.assert_allclose(excess.of(z), (fused - plain).numpy(), rtol=1e-6)
    assert off.of(z) == 0.0


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("synthetic-best", [0, 0, 1, 0, 0]),
        ("synthetic-top2", [0, 0.5, 0.5, 0, 0]),
        ("synthetic-top3", [1 / 3, 1 / 3, 1 / 3, 0, 0]),
        ("synthetic-weighted", [0.1 / 0.8, 0.3 / 0.8, 0.4 / 0.8, 0, 0]),
    ],
)
def test_adaptive_fusion_weighs_the_views_that_see_synthetic_defects(rule, expected):
    separation = [0.6, 0.8, 0.9, 0.5, 0.3]  # AUROC of synthetic defects per view
    np.testing.assert_allclose(view_weights(separation, rule), expected)
    assert view_weights([0.5, 0.4], "synthetic-weighted").tolist() == [0.5, 0.5]  # no signal


@pytest.mark.parametrize(
    ("unexplained", "scale", "expected"),
    [
        (0.0, 10.0, [0, 0, 0.5, 0, 0.5]),  # nothing off the subspace: knn and global
        (0.5, 10.0, [0, 0, 1 / 12, 10 / 12, 1 / 12]),  # odds 1: the image weighs the scale
        (0.2, 2.0, [0, 0, 1 / 2.5, 0.5 / 2.5, 1 / 2.5]),
        (float("nan"), 10.0, [0, 0, 0.5, 0, 0.5]),  # no signal: the image view weighs 0
    ],
)
def test_image_share_weights_grow_with_the_variance_off_the_subspace(unexplained, scale, expected):
    np.testing.assert_allclose(share_weights(unexplained, scale, power=1.0), expected)
    # a model without the image view fuses what it has, equally
    np.testing.assert_allclose(share_weights(0.9, scale, (2, 4)), [0, 0, 0.5, 0, 0.5])
    assert share_weights(1.0)[VIEW_NAMES.index("image")] < 1  # clipped below 1: finite
    with pytest.raises(InvalidValueError, match="scale"):
        share_weights(0.5, -1.0)


def test_a_higher_power_switches_between_the_views_more_sharply():
    image = VIEW_NAMES.index("image")
    # odds 1/9 (u = 0.1) and 3 (u = 0.75): squared, the image weighs 1/81 and 9 times the scale
    low, high = share_weights(0.1, 10.0, power=2.0), share_weights(0.75, 10.0, power=2.0)
    assert low[image] == pytest.approx((10 / 81) / (2 + 10 / 81))
    assert high[image] == pytest.approx(90 / 92)
    linear = share_weights(0.1, 10.0, power=1.0)[image], share_weights(0.75, 10.0, power=1.0)[image]
    assert low[image] < linear[0] < linear[1] < high[image]
    # the defaults are the product's scale and power: about even at u = 0.09, then the image
    assert IMAGE_SHARE_SCALE == 1000 and IMAGE_SHARE_POWER == 3
    np.testing.assert_allclose(
        share_weights(0.3), share_weights(0.3, IMAGE_SHARE_SCALE, power=IMAGE_SHARE_POWER)
    )
    assert share_weights(0.03)[image] < 0.02 and share_weights(0.6)[image] > 0.99
    with pytest.raises(InvalidValueError, match="power"):
        share_weights(0.5, 10.0, power=0.0)


def test_robust_constants_ignore_one_outlying_normal_and_never_divide_by_zero():
    views = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0], [1000.0, 5.0], [np.nan, 5.0]])
    center, scale = robust_z_constants(views)
    # median and scaled MAD of 1, 2, 3, 1000 (the NaN left out): the outlier moves neither far
    np.testing.assert_allclose(center, [2.5, 5.0])
    assert scale[0] == pytest.approx(1.4826 * 1.0)
    assert scale[1] > 0  # a constant view gets a floor, not a zero scale
