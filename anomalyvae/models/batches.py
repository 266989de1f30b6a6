"""Score many model-ready images in batches: the one loop over :func:`score_batch`.

The detector's scoring, fitting of constants and calibration all go through here, so
batch size, device and progress are handled once.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from anomalyvae.errors import InvalidValueError
from anomalyvae.models.maps import MapStats, ScoringConfig
from anomalyvae.models.scoring import score_batch
from anomalyvae.progress import progress_bar


def score_images(
    model: nn.Module,
    images: NDArray[np.float32],
    scoring: ScoringConfig,
    stats: MapStats | None,
    batch_size: int,
    device: torch.device,
    progress: bool = False,
    valid: NDArray[np.bool_] | None = None,
) -> tuple[NDArray[np.float32], NDArray[np.float64], NDArray[np.float64] | None]:
    """Maps (n, h, w), scores (n,) and views (n, k) of images (n, c, h, w).

    Higher = more anomalous. ``valid`` (n, h, w) bool restricts every view to the valid
    pixels (pixel model). Views are None when the model gives none.
    """
    model.to(device).eval()
    maps, scores, views = [], [], []
    starts = range(0, len(images), batch_size)
    bar = progress_bar(
        starts,
        desc="scoring",
        unit="batch",
        disable=not progress or len(starts) < 4,
        file=sys.stderr,
        leave=False,
    )
    for start in bar:
        x = torch.from_numpy(images[start : start + batch_size]).to(device)
        mask = None
        if valid is not None:
            mask = torch.from_numpy(np.ascontiguousarray(valid[start : start + len(x)]))
        result = score_batch(model, x, scoring, stats, mask)
        maps.append(result.anomaly_map[:, 0].cpu().numpy())
        scores.append(result.score.cpu().numpy())
        if result.views is not None:
            views.append(result.views.cpu().numpy())
    if not maps:
        raise InvalidValueError("no images to score")
    return (
        np.concatenate(maps),
        np.concatenate(scores).astype(np.float64),
        np.concatenate(views).astype(np.float64) if views else None,
    )


def fill_invalid(
    model: nn.Module, images: NDArray[np.float32], valid_mask: NDArray[np.bool_]
) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """Inpaint the invalid pixels of model-ready images, before scoring the valid ones.

    ``valid_mask`` (h, w) or (n, h, w) at model resolution, True = valid. Returns the
    filled images and the mask as (n, h, w); images with every pixel valid are kept as
    they are. The model's family must decode pixels (:func:`anomalyvae.models.generate.inpaint`).
    """
    from anomalyvae.models.families import family_of
    from anomalyvae.models.generate import inpaint

    family = family_of(model)
    if not family.generative:
        raise InvalidValueError(
            "scoring with valid_mask inpaints the invalid pixels, which needs the pixel "
            f"model (model='pixel'), one that decodes pixels; this is the {family.name} model"
        )
    valid = np.asarray(valid_mask, dtype=bool)
    if valid.ndim == 2:
        valid = np.broadcast_to(valid, (len(images), *valid.shape))
    if valid.shape != (len(images), *images.shape[2:]):
        raise InvalidValueError(
            f"valid_mask must be (h, w) or (n, h, w) at model resolution "
            f"{images.shape[2]}x{images.shape[3]}, got {valid.shape}"
        )
    if not valid.reshape(len(valid), -1).any(axis=1).all():
        raise InvalidValueError("valid_mask leaves an image with no valid pixels to score")
    filled = images.copy()
    partial = ~valid.reshape(len(valid), -1).all(axis=1)
    if partial.any():
        filled[partial] = inpaint(
            model, images[partial], ~valid[partial], method="clamp", iterations=20
        )
    return filled, valid
