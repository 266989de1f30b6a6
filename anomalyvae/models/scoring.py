"""The one scoring entry point: a model's family scores a batch, in torch or in the graph.

:func:`score_batch` (the detector's batches and the pipelines) and :class:`ScoringGraph`
(the module ONNX export traces) both hand the batch to the model's family
(:meth:`anomalyvae.models.families.ModelFamily.score`), found by the model's ``family``
name; neither knows which families exist. The building blocks they share (maps, smoothing,
reductions, :class:`~anomalyvae.models.maps.ScoringConfig`) live in
:mod:`anomalyvae.models.maps`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from anomalyvae.errors import InvalidValueError
from anomalyvae.models.families import family_of
from anomalyvae.models.maps import (
    EXPORTABLE_MAP_KINDS,
    MapStats,
    ScoreResult,
    ScoringConfig,
    check_stats,
)


def score_batch(
    model: nn.Module,
    x: Tensor,
    config: ScoringConfig,
    stats: MapStats | None = None,
    valid: Tensor | None = None,
) -> ScoreResult:
    """Anomaly maps and image scores of a batch; the model must be in eval mode.

    ``stats`` is required when ``config.standardize``; pass ``config`` with
    ``standardize=False`` to get the raw smoothed maps that
    :func:`~anomalyvae.models.maps.fit_map_stats` takes. ``valid`` (n, h, w) bool, pixel
    model only: every view, and so every score kind, reads the valid pixels only, and
    invalid pixels map to 0. The one scoring recipe the detector, the exported graph and
    the pipelines share: the model's family computes it
    (:meth:`~anomalyvae.models.families.ModelFamily.score`).
    """
    family = family_of(model)
    family.check_scoring(config)
    with torch.no_grad():  # a map that needs the input gradient enables it itself
        return family.score(model, x, config, stats, valid)


class ScoringGraph(nn.Module):
    """Model + map + smoothing + image score as one module (the graph ONNX export traces).

    Only the gradient-free map kinds (``EXPORTABLE_MAP_KINDS``) are supported.
    """

    def __init__(
        self, model: nn.Module, config: ScoringConfig, stats: MapStats | None = None
    ) -> None:
        super().__init__()
        self.family = family_of(model)
        self.family.check_scoring(config)
        if config.map_kind not in EXPORTABLE_MAP_KINDS:
            raise InvalidValueError(
                f"map kind {config.map_kind!r} needs an input gradient and cannot be part "
                f"of a forward-only graph; use one of {EXPORTABLE_MAP_KINDS}"
            )
        self.model = model
        self.config = config
        self.stats = check_stats(stats, config) if config.standardize else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        result = self.family.score(self.model, x, self.config, self.stats, None)
        return result.anomaly_map, result.score
