"""The pixel family: a convolutional VAE on the pixels (also serves the generative uses)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from anomalyvae.errors import InvalidValueError
from anomalyvae.imaging.preprocessing import Preprocessing
from anomalyvae.models.families.base import ModelFamily, Trained
from anomalyvae.models.fusion import fuse_views
from anomalyvae.models.maps import (
    FEATURE_ONLY_SCORE_KINDS,
    MAP_KINDS,
    PIXEL_SCORE_KINDS,
    PIXEL_VIEW_NAMES,
    SMALL_IMAGE_SIDE,
    MapStats,
    ScoreResult,
    ScoringConfig,
    default_map_kind,
    elbo_grad_map,
    pixel_scores,
    pixel_view_constants,
)
from anomalyvae.models.train import train_vae
from anomalyvae.models.vae import ConvVAE, VAEConfig

if TYPE_CHECKING:
    from anomalyvae.detector import VAEAnomalyDetector
    from anomalyvae.models.train import TrainConfig


def pixel_score_kind(score_kind: str, standardize: bool, map_kind: str, side: int) -> str:
    """The score kind "auto" resolves to for the pixel model.

    "fused" (the mean z-score of the map's top-k mean and whole-map mean) for thumbnails
    of at most ``SMALL_IMAGE_SIDE`` px scored with standardized SSIM maps (the auto map
    there): a 28 px chest X-ray shows the whole scene, and a finding spreads over much
    of it (PneumoniaMNIST val split: fused 0.968 against top-k mean 0.963). Else
    "topk_mean": on larger inputs a defect is local, and the whole-map mean dilutes it
    (MTD at 128 px: z-nll top-k mean 0.700, fused 0.657; reports/mtd/experiments.md).
    """
    if score_kind != "auto":
        return score_kind
    thumbnail = 0 < side <= SMALL_IMAGE_SIDE
    return "fused" if standardize and map_kind == "ssim" and thumbnail else "topk_mean"


class PixelFamily(ModelFamily):
    """A convolutional VAE with a Gaussian decoder over the model-ready pixels."""

    name = "pixel"
    view_names = PIXEL_VIEW_NAMES
    generative = True
    map_kinds = MAP_KINDS
    score_kinds = PIXEL_SCORE_KINDS
    per_pixel_stats = True
    export_precisions = ("fp32", "fp16", "int8")

    def resolve_scoring(self, detector: VAEAnomalyDetector, spec: Preprocessing) -> ScoringConfig:
        map_kind = detector.map_kind
        if map_kind == "auto":
            map_kind = default_map_kind(spec.height, spec.width)
        side = min(spec.height, spec.width)
        return ScoringConfig(
            map_kind,
            pixel_score_kind(detector.score_kind, detector.standardize, map_kind, side),
            detector.smoothing_sigma,
            detector.topk_fraction,
            detector.standardize,
        )

    def check_scoring(self, config: ScoringConfig) -> None:
        if config.score_kind in FEATURE_ONLY_SCORE_KINDS:
            raise InvalidValueError(
                f"score kind {config.score_kind!r} needs the feature model (--model "
                f"feature); the pixel model scores with one of {PIXEL_SCORE_KINDS}"
            )
        if config.score_kind in ("global", "fused") and not config.standardize:
            raise InvalidValueError(
                f"the pixel model's {config.score_kind!r} score reads the standardized map "
                "(standardize on); without it use 'topk_mean', 'max' or 'elbo'"
            )

    def score(
        self,
        model: nn.Module,
        x: Tensor,
        config: ScoringConfig,
        stats: MapStats | None,
        valid: Tensor | None,
    ) -> ScoreResult:
        if config.map_kind != "elbo_grad":
            return pixel_scores(model, x, config, stats, valid=valid)
        raw, output = elbo_grad_map(model, x)  # enables the input gradient itself
        return pixel_scores(model, x, config, stats, output, raw, valid)

    def train(
        self,
        detector: VAEAnomalyDetector,
        train_images: NDArray[np.float32],
        val_images: NDArray[np.float32],
        train_config: TrainConfig,
        resume: bool,
    ) -> Trained:
        spec = detector.preprocessing_
        model_config = VAEConfig(
            height=spec.height,
            width=spec.width,
            in_channels=spec.channels,
            channels=tuple(detector.hidden_channels),
            latent_dim=detector.latent_dim,
            beta=detector.beta,
        )
        result = train_vae(
            model_config,
            train_config,
            train_images,
            val_images,
            checkpoint_path=detector.checkpoint_path,
            resume=resume,
            checkpoint_extra=detector.checkpoint_extra,
            progress=detector.progress,
        )
        return Trained(
            result.model,
            result.history,
            result.best_epoch,
            result.stopped_reason,
            result.elapsed_s,
            result.world_size,
            None,
            result.resume_state,
        )

    def model_from_state(self, config: dict[str, Any], state: dict[str, Any]) -> ConvVAE:
        model = ConvVAE(VAEConfig.from_dict({**config, "channels": tuple(config["channels"])}))
        model.load_state_dict(state)
        return model

    def needs_fusion(self, scoring: ScoringConfig) -> bool:
        # the views read the standardized map: no fusion without it
        return scoring.standardize

    def fit_fusion(
        self,
        detector: VAEAnomalyDetector,
        images: NDArray[np.float32],
        extra_views: NDArray[np.float64] | None = None,
    ) -> None:
        # the pixel VAE gives no cross-fitted views: extra_views is always None here
        stats = getattr(detector, "map_stats_", None)
        if not detector.scoring_.standardize or stats is None:
            raise InvalidValueError(
                "the pixel model's views read the standardized map: score with "
                "standardize on and call detector.fit_map_stats(normal_images) first"
            )
        detector.map_stats_ = stats.with_views(detector.view_matrix(images))

    def view_scoring(self, scoring: ScoringConfig) -> ScoringConfig:
        # the views need no fusion constants (fit_fusion computes them from these)
        return dataclasses.replace(scoring, score_kind="topk_mean")

    def fuse(
        self, detector: VAEAnomalyDetector, views: NDArray[np.float64]
    ) -> NDArray[np.float64] | None:
        stats = getattr(detector, "map_stats_", None)
        if stats is None or stats.view_center is None:
            return None
        center, scale = pixel_view_constants(stats)
        fused = fuse_views(torch.from_numpy(views).float(), center, scale, (0, 1))
        return fused.numpy().astype(np.float64)
