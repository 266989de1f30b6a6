"""Synthetic defects for the self-check: inside their mask only, seeded, in range."""

from __future__ import annotations

import numpy as np
import pytest

from anomalyvae.imaging.synthetic_defects import DEFECT_KINDS, blob_mask, paste_defects


@pytest.mark.parametrize(("height", "width"), [(32, 32), (64, 48), (128, 256)])
def test_blob_masks_are_one_region_of_about_the_asked_area(height, width):
    mask = blob_mask(np.random.default_rng(0), height, width, area=0.02)
    assert 16 <= mask.sum() <= 0.05 * height * width + 30


def test_defects_change_pixels_inside_their_mask_only():
    rng = np.random.default_rng(0)
    images = rng.uniform(0.3, 0.7, (9, 1, 48, 48)).astype(np.float32)
    result = paste_defects(images, seed=3)
    assert sorted(set(result.kinds)) == sorted(DEFECT_KINDS)
    for original, changed, mask in zip(images, result.images, result.masks, strict=True):
        assert np.array_equal(original[:, ~mask], changed[:, ~mask])
        assert np.abs(original[:, mask] - changed[:, mask]).mean() > 0.01
    assert result.images.min() >= 0 and result.images.max() <= 1
    again = paste_defects(images, seed=3)
    assert np.array_equal(again.images, result.images)


def test_too_few_images_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 2"):
        paste_defects(np.zeros((1, 1, 8, 8), np.float32))
