"""The feature family's configuration: what a feature model is, checked and versioned.

:class:`FeatureVAEConfig` is saved with every feature model and read back by
:meth:`FeatureVAEConfig.from_dict`, which gives fields a model saved before them lacks the
values that model was calibrated with. The model itself is
:class:`anomalyvae.models.feature_vae.FeatureVAE`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from anomalyvae.errors import InvalidValueError
from anomalyvae.imaging.tiles import TILE_ALIGN, TileLayout, tile_layout
from anomalyvae.models.backbone import BACKBONES, tap_channels
from anomalyvae.models.bank import KNN_BORDER, MAP_BORDER
from anomalyvae.models.fusion import (
    ADAPTIVE_FUSIONS,
    EXCESS_VIEWS,
    FUSED_VIEWS,
    FUSION_RULES,
    LOCAL_EXCESS_Z,
    VIEW_NAMES,
    LocalExcess,
)
from anomalyvae.models.vae import check_config_fields

#: How the ``image`` view reduces its residual map: "topk" (the default) or "mean".
IMAGE_REDUCTIONS: tuple[str, ...] = ("mean", "topk")
#: What the anomaly map is: "mean-z" (the default), the mean of each location's robust
#: z-scores of the VAE's negative ELBO and of the memory-bank distance; "elbo", the
#: negative ELBO alone in nats (models saved before the bank's map). On both suite sets
#: with pixel masks the mean ranked pixels better than either map alone
#: (reports/suite/experiments.md).
MAP_RULES: tuple[str, ...] = ("elbo", "mean-z")
#: The smallest contrast an image is credited with: flat images are not blown up to noise.
#: The ceiling of the training-time floor
#: (:func:`~anomalyvae.models.feature_training.contrast_floor`), and the floor of models
#: saved before it.
MIN_STD = 0.02


@dataclass(frozen=True)
class FeatureVAEConfig:
    """Architecture of :class:`~anomalyvae.models.feature_vae.FeatureVAE`.

    Attributes
    ----------
    height, width : int
        Input size (any size; the backbone's stride is 16, features are stride 8).
    in_channels : int
        1 (grey, replicated to RGB inside the graph) or 3.
    backbone : str
        One of :data:`anomalyvae.models.backbone.BACKBONES`.
    hidden_dim : int
        Width of the 1 x 1 encoder and decoder layers.
    latent_dim : int
        Size of each location's latent code: small, so that the VAE cannot copy
        unusual features through.
    beta : float
        KL weight of the beta-VAE objective (Higgins et al. 2017).
    pool : int
        Side of the average pooling that gives each location its neighbourhood.
    logvar_min, logvar_max : float
        Bounds of the decoder's log-variance, in units of standardized features.
    normalize_images : bool
        Give every image the same mean and contrast before the backbone
        (:func:`~anomalyvae.models.feature_vae.normalize_intensity`), so that a global
        change of lighting or gain is not scored as a defect. The scan's drift alarm
        still sees the raw intensities.
    min_std : float
        The smallest contrast (standard deviation of intensity) that normalization
        credits an image with, so that a flat image is not blown up to noise. Training
        sets it relative to the training normals' own contrast
        (:func:`~anomalyvae.models.feature_training.contrast_floor`), so that files
        using a sliver of their range (8-bit files with a few grey levels, 12-bit data
        in 16-bit files) are stretched like any other; models saved before it keep the
        fixed :data:`MIN_STD`.
    image_components : int
        Components of the pixel-space ``image`` view's PCA; 0 turns the view off (models
        saved before it existed load that way). Training chooses it by held-out
        likelihood (:func:`~anomalyvae.models.feature_training.choose_image_components`);
        50 is what a config built by hand gets.
    image_side : int
        Longest side, in px, the input is box-averaged to for the ``image`` view.
    image_reduce : {"topk", "mean"}
        How the ``image`` view reduces its residual map (:data:`IMAGE_REDUCTIONS`).
        Models saved before "topk" load with "mean".
    bank_size : int
        Normal feature vectors kept for the ``knn`` view (a coreset of the training
        locations); 0 turns the view off (models saved before it existed load that way).
    knn_border : int
        Feature locations along each edge that the ``knn`` view leaves out
        (:data:`~anomalyvae.models.bank.KNN_BORDER`); models saved before it leave none.
    bank_dim : int
        Principal directions of the bank the nearest-neighbour search's dot products
        are taken in (:meth:`~anomalyvae.models.feature_vae.FeatureVAE.project_bank`);
        0 searches in all feature channels. The norms stay exact, so a query or bank
        vector off the subspace keeps its full distance; only the cross term is
        approximated.
    fusion : {"mean", "max"} or one of ADAPTIVE_FUSIONS
        How the fused score combines the views' z-scores
        (:func:`~anomalyvae.models.fusion.fuse_views`); models saved before the ``knn``
        view load with "max", the rule they were calibrated with.
    excess_weight, excess_z : float
        The fused score's local excess term (:class:`~anomalyvae.models.fusion.LocalExcess`):
        ``excess_weight`` times the sum of the local views' robust z-scores above
        ``excess_z``; weight 0 (models saved before it) adds nothing.
    map_rule : {"mean-z", "elbo"}
        The anomaly map (:data:`MAP_RULES`); "mean-z" needs the bank. Models saved
        before it load with "elbo".
    map_border : int
        Rings of locations along the feature map's edge whose ELBO and bank distance
        get their own z constants in the "mean-z" map (:data:`~anomalyvae.models.bank.MAP_BORDER`;
        ``map_border`` rings, then the interior); models saved before it use one set of
        constants for every location (0).
    tile_side, tile_overlap : int
        An input longer than ``tile_side`` px on a side runs through the backbone in
        overlapping tiles of at most ``tile_side`` x ``tile_side`` (at least
        ``tile_overlap`` px of overlap), blended into one feature map
        (:mod:`anomalyvae.imaging.tiles`); everything after the backbone sees the whole
        input. Bounds the backbone's memory for large inputs.
    tile_tight : bool
        Each tiled side's tiles are as short as its fewest tiles allow
        (:func:`~anomalyvae.imaging.tiles.tight_tile`): less backbone work for the same
        bound. Models saved before it tile at ``tile_side`` (False).
    """

    height: int = 256
    width: int = 256
    in_channels: int = 1
    backbone: str = "efficientnet-lite0"
    hidden_dim: int = 256
    latent_dim: int = 16
    beta: float = 1.0
    pool: int = 3
    logvar_min: float = -4.0
    logvar_max: float = 3.0
    normalize_images: bool = True
    min_std: float = MIN_STD
    image_components: int = 50
    image_side: int = 128
    image_reduce: str = "topk"
    bank_size: int = 8192
    bank_dim: int = 0
    knn_border: int = KNN_BORDER
    fusion: str = "mean"
    excess_weight: float = 0.0
    excess_z: float = LOCAL_EXCESS_Z
    map_rule: str = "mean-z"
    map_border: int = MAP_BORDER
    tile_side: int = 512
    tile_overlap: int = 128
    tile_tight: bool = True

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise InvalidValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.in_channels not in (1, 3):
            raise InvalidValueError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if min(self.height, self.width) < 32:
            raise InvalidValueError(
                f"the feature model needs inputs of at least 32 x 32 px (stride-16 "
                f"features), got {self.height}x{self.width}; use the pixel model"
            )
        if self.latent_dim < 1 or self.hidden_dim < 1:
            raise InvalidValueError("latent_dim and hidden_dim must be >= 1")
        if self.pool < 1 or self.pool % 2 == 0:
            raise InvalidValueError(f"pool must be a positive odd number, got {self.pool}")
        if self.beta < 0:
            raise InvalidValueError(f"beta must be >= 0, got {self.beta}")
        if not (self.min_std > 0 and math.isfinite(self.min_std)):
            raise InvalidValueError(f"min_std must be > 0 and finite, got {self.min_std}")
        if not self.logvar_min < self.logvar_max:
            raise InvalidValueError("logvar_min must be smaller than logvar_max")
        if self.knn_border < 0:
            raise InvalidValueError(f"knn_border must be >= 0, got {self.knn_border}")
        if self.map_border < 0:
            raise InvalidValueError(f"map_border must be >= 0, got {self.map_border}")
        if self.image_components < 0 or self.image_side < 1:
            raise InvalidValueError("image_components must be >= 0 and image_side >= 1")
        if self.image_reduce not in IMAGE_REDUCTIONS:
            raise InvalidValueError(
                f"image_reduce must be one of {IMAGE_REDUCTIONS}, got {self.image_reduce!r}"
            )
        if self.bank_size < 0:
            raise InvalidValueError(f"bank_size must be >= 0, got {self.bank_size}")
        if not 0 <= self.bank_dim <= self.feature_channels:
            raise InvalidValueError(
                f"bank_dim must be in [0, {self.feature_channels}] (0: every feature "
                f"channel), got {self.bank_dim}"
            )
        if self.fusion not in FUSION_RULES + ADAPTIVE_FUSIONS:
            raise InvalidValueError(
                f"fusion must be one of {FUSION_RULES + ADAPTIVE_FUSIONS}, got {self.fusion!r}"
            )
        if not (0 <= self.excess_weight < math.inf and math.isfinite(self.excess_z)):
            raise InvalidValueError(
                f"excess_weight must be >= 0 and finite and excess_z finite, got "
                f"{self.excess_weight} and {self.excess_z}"
            )
        if self.map_rule not in MAP_RULES:
            raise InvalidValueError(f"map_rule must be one of {MAP_RULES}, got {self.map_rule!r}")
        if self.map_rule == "mean-z" and not self.bank_size:
            raise InvalidValueError("map_rule 'mean-z' needs the memory bank (bank_size > 0)")
        if self.tile_side % TILE_ALIGN or not 0 <= self.tile_overlap < self.tile_side:
            raise InvalidValueError(
                f"tile_side must be a multiple of {TILE_ALIGN} and 0 <= tile_overlap < "
                f"tile_side, got {self.tile_side} and {self.tile_overlap}"
            )
        for side in (self.height, self.width):
            if side > self.tile_side and side % TILE_ALIGN:
                raise InvalidValueError(
                    f"inputs longer than the {self.tile_side} px tile are tiled, so their "
                    f"sides must be multiples of {TILE_ALIGN} px; got {self.height}x"
                    f"{self.width} (choose image_size accordingly)"
                )

    @property
    def layout(self) -> TileLayout:
        """How the backbone covers the input (one tile when it fits in ``tile_side``)."""
        return tile_layout(
            self.height, self.width, self.tile_side, self.tile_overlap, self.tile_tight
        )

    @property
    def image_pool(self) -> int:
        """Box size that brings the input's longest side to at most ``image_side``."""
        return max(1, math.ceil(max(self.height, self.width) / self.image_side))

    @property
    def image_dim(self) -> int:
        """Length of the pooled, flattened input the ``image`` view's PCA works on."""
        pool = self.image_pool
        return self.in_channels * (self.height // pool) * (self.width // pool)

    @property
    def fused_index(self) -> tuple[int, ...]:
        """Columns of ``views`` that :func:`~anomalyvae.models.fusion.fuse_views` combines.

        Older models fuse the views they have: without a bank the VAE's local view
        stands in for ``knn``, and without the image view only local and global.
        """
        names = list(FUSED_VIEWS)
        if not self.bank_size:
            names[0] = "local"
        if not self.image_components:
            names.remove("image")
        return tuple(VIEW_NAMES.index(v) for v in names)

    @property
    def local_excess(self) -> LocalExcess:
        """The fused score's local excess term over the local views this model has."""
        names = [v for v in EXCESS_VIEWS if v != "knn" or self.bank_size]
        index = tuple(VIEW_NAMES.index(v) for v in names)
        return LocalExcess(index, self.excess_weight, self.excess_z)

    @property
    def feature_channels(self) -> int:
        return sum(tap_channels(self.backbone))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureVAEConfig:
        check_config_fields(cls, data)
        # a model saved before the image view (or the bank) existed has none, and was
        # calibrated on the largest z-score; one saved before the bank's map maps the
        # ELBO; one saved before the top-k image view averaged its residual; one saved
        # before the knn view left out the map's edge read every location; one saved
        # before the map's edge rings z-scored every location with one set of constants;
        # one saved before tight tiles tiled at the full tile side
        old = {
            "image_components": 0,
            "bank_size": 0,
            "bank_dim": 0,
            "fusion": "max",
            "map_rule": "elbo",
            "image_reduce": "mean",
            "knn_border": 0,
            "map_border": 0,
            "tile_tight": False,
        }
        return cls(**{**old, **data})
