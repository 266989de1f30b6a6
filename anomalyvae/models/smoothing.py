"""Gaussian smoothing of maps and the top-k share it implies: a leaf of models/.

Plain tensor ops (separable convolutions), so every map built on them exports to ONNX;
written here rather than taken from MONAI's ``GaussianFilter`` for that reason. Both the
scoring recipe (:mod:`anomalyvae.models.maps`) and the feature model's pixel-space view
(:mod:`anomalyvae.models.feature_vae`) use it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from anomalyvae.errors import InvalidValueError


def gaussian_kernel1d(sigma: float, truncate: float = 3.0) -> Tensor:
    """Normalised 1-D Gaussian kernel of radius ceil(truncate * sigma)."""
    radius = max(1, int(math.ceil(truncate * sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (n, c, h, w) with reflect padding (no dark border)."""
    if sigma <= 0:
        return x
    kernel = gaussian_kernel1d(sigma).to(x)
    radius = kernel.numel() // 2
    if radius >= min(x.shape[-2:]):
        raise InvalidValueError(
            f"smoothing_sigma {sigma} is too large for a {tuple(x.shape[-2:])} map"
        )
    c = int(x.shape[1])  # a constant for ONNX tracing: the kernel shape must be static
    horizontal = kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    vertical = kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1)
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, horizontal, groups=c)
    return F.conv2d(x, vertical, groups=c)


def smoothing_footprint(sigma: float, truncate: float = 3.0) -> int:
    """Pixels within the smoothing kernel's radius (``truncate`` sigmas): one blob's area."""
    if sigma <= 0:
        return 1
    return int(math.ceil(math.pi * (truncate * sigma) ** 2))


def topk_size(fraction: float, sigma: float, n_pixels: int) -> int:
    """How many of ``n_pixels`` values a top-k mean averages.

    The ``fraction`` share, never fewer than one smoothing footprint
    (:func:`smoothing_footprint`), never more than all.
    """
    k = max(int(round(fraction * n_pixels)), smoothing_footprint(sigma))
    return max(1, min(n_pixels, k))
