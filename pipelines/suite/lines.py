"""Bank distances averaged over a defect's extent: squares or lines of feature locations.

Shared by pipelines/suite/reductions.py (the ``knn extent`` variants) and run.py (the
``extent`` probe view that loso.py's local excess study reads); torch and numpy only.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

#: Directions of the line kernels, evenly spread over half a turn.
LINE_ORIENTATIONS = 12
#: The probe's line length: this share of the location map's longer side (the leading
#: variant of reports/suite/extent.md, measured there beside the rest).
PROBE_LINE_SHARE = 0.2


def line_kernels(length: int, orientations: int = LINE_ORIENTATIONS) -> torch.Tensor:
    """Averaging kernels (orientations, 1, length, length) along lines through the centre,
    the directions evenly spread over half a turn, each line ``length`` locations long
    along its steeper axis (one location per row or column; weights 1 / length)."""
    radius = length // 2
    kernels = torch.zeros(orientations, 1, length, length)
    steps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    for i in range(orientations):
        angle = np.pi * i / orientations
        sin, cos = np.sin(angle), np.cos(angle)
        stretch = 1.0 / max(abs(sin), abs(cos))  # a diagonal line spans the whole kernel
        rows = torch.round(radius + steps * sin * stretch).long()
        cols = torch.round(radius + steps * cos * stretch).long()
        kernels[i, 0, rows, cols] = 1.0
    return kernels / kernels.sum(dim=(2, 3), keepdim=True)


def share_length(share: float, longer: int) -> int:
    """An odd line length (at least 3) of ``share`` of a map's ``longer`` side."""
    return max(3, 2 * round(share * longer / 2) + 1)


def extent_view(distances: np.ndarray, kernels: torch.Tensor) -> np.ndarray:
    """(n,) the largest average of the location distances (n, h, w) under any of the
    averaging ``kernels`` (k, 1, s, s), inside the map only (no padding); a map smaller
    than a kernel is averaged whole."""
    x = torch.from_numpy(np.ascontiguousarray(distances, dtype=np.float32))[:, None]
    side = int(kernels.shape[-1])
    if min(x.shape[-2:]) < side:
        return x.flatten(1).mean(1).double().numpy()
    return F.conv2d(x, kernels).flatten(1).amax(1).double().numpy()
