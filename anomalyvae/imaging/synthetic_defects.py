"""Synthetic defects pasted into normal images: the self-check's stand-in for real ones.

Three kinds, each inside a random blob-shaped region (thresholded smooth noise, in the
spirit of Perlin-noise masks; Zavrtanik et al., DRAEM, ICCV 2021):

- ``patch``: the region filled with the same place of another normal image, shifted
  (cut-paste, Li et al., CVPR 2021): in-domain texture in the wrong place;
- ``shift``: the region's grey level raised or lowered by a fixed step;
- ``noise``: the region's texture replaced by smoothed noise of the image's own contrast.

numpy and scipy only (the torch-free wing).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from anomalyvae.errors import InvalidValueError

DEFECT_KINDS: tuple[str, ...] = ("patch", "shift", "noise")


class SyntheticDefects(NamedTuple):
    """Corrupted images (n, c, h, w), their masks (n, h, w) and the kind of each."""

    images: NDArray[np.float32]
    masks: NDArray[np.bool_]
    kinds: list[str]


def blob_mask(
    rng: np.random.Generator, height: int, width: int, area: float = 0.02
) -> NDArray[np.bool_]:
    """A random smooth blob covering about ``area`` of the image (at least 16 pixels)."""
    sigma = max(1.0, 0.04 * min(height, width))
    field = ndimage.gaussian_filter(rng.standard_normal((height, width)), sigma)
    # keep the top ``area`` share, then only the connected region with the peak
    cut = np.quantile(field, 1.0 - area)
    labels, _ = ndimage.label(field >= cut)
    peak = np.unravel_index(int(np.argmax(field)), field.shape)
    mask = labels == labels[peak]
    if mask.sum() < 16:
        cy, cx = peak
        yy, xx = np.ogrid[:height, :width]
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= 9
    return mask


def paste_defects(
    images: NDArray[np.float32], seed: int = 0, area: float = 0.02
) -> SyntheticDefects:
    """One synthetic defect per image, kinds in turn; images are (n, c, h, w) in [0, 1]."""
    if images.ndim != 4 or len(images) < 2:
        raise InvalidValueError(f"need at least 2 images of shape (n, c, h, w), got {images.shape}")
    rng = np.random.default_rng(seed)
    n, _, height, width = images.shape
    out = images.copy()
    masks = np.zeros((n, height, width), dtype=bool)
    kinds = []
    for i in range(n):
        kind = DEFECT_KINDS[i % len(DEFECT_KINDS)]
        mask = blob_mask(rng, height, width, area)
        image = out[i]
        if kind == "patch":
            donor = images[(i + 1 + int(rng.integers(n - 1))) % n]
            dy, dx = int(rng.integers(height)), int(rng.integers(width))
            source = np.roll(donor, (dy, dx), axis=(1, 2))
            image[:, mask] = source[:, mask]
        elif kind == "shift":
            spread = max(float(image.std()), 0.05)
            image[:, mask] += float(rng.choice([-1.0, 1.0])) * 2.0 * spread
        else:
            noise = ndimage.gaussian_filter(rng.standard_normal((height, width)), 1.0)
            noise = noise / (noise.std() + 1e-8) * max(float(image.std()), 0.05)
            image[:, mask] = float(image.mean()) + noise[mask]
        out[i] = np.clip(image, 0.0, 1.0)
        masks[i] = mask
        kinds.append(kind)
    return SyntheticDefects(out.astype(np.float32), masks, kinds)


def self_check(
    images: NDArray[np.float32],
    score: Callable[[NDArray[np.float32]], NDArray[np.float64]],
    threshold: float,
    seed: int = 0,
) -> dict[str, Any]:
    """Estimated detection rate: one synthetic defect pasted into each normal, scored.

    ``score`` maps images (n, c, h, w) to image scores (n,); the share of defect images
    above ``threshold`` estimates how many defects of that size and contrast a model
    would catch: an estimate from made-up defects, not a measurement on real ones.

    Returns
    -------
    dict
        ``detection_rate``, ``by_kind`` (rate per defect kind), ``n_images`` and
        ``normal_flag_rate`` (the same images without defects).
    """
    if len(images) < 2:
        return {"detection_rate": None, "n_images": int(len(images))}
    defects = paste_defects(images, seed=seed)
    flagged = np.asarray(score(defects.images)) > threshold
    clean = np.asarray(score(images))
    kinds = np.array(defects.kinds)
    return {
        "detection_rate": float(flagged.mean()),
        "by_kind": {k: float(flagged[kinds == k].mean()) for k in sorted(set(defects.kinds))},
        "n_images": int(len(images)),
        "normal_flag_rate": float((clean > threshold).mean()),
    }
