"""The feature family: a VAE over the feature maps of a frozen ImageNet backbone.

Each location of the backbone's feature map (stride 8, with the stride-16 map upsampled
onto it and a 3 x 3 neighbourhood averaged in, as in PatchCore, Roth et al. 2022) is a
vector; a small VAE of 1 x 1 convolutions models those vectors, the same at every
position. The anomaly map is the mean of two robust z-scores per location, each against
the held-out normals' locations: the VAE's negative ELBO and the distance to the memory
bank (``map_rule`` "mean-z"; models saved before it map the ELBO alone, in nats). It is
upsampled to the input size: position-independent, so unaligned objects and textures
are scored the same everywhere, and a global shift of brightness moves ImageNet features
little.

Four views of an image come out of one forward pass (all higher = more anomalous):

- ``local``: mean of the largest map values (top-k), the local defect evidence;
- ``elbo``: the mean per-location negative ELBO, the whole image's fit (reported, not
  fused: see :data:`anomalyvae.models.fusion.FUSED_VIEWS`);
- ``global``: Mahalanobis distance of the image's mean feature vector to the normal
  images' (Ledoit-Wolf shrunk covariance; Rippel et al., ICPR 2020), the global look.
- ``image``: the whole image's distance to the normal images' linear subspace in pixel
  space: the input box-averaged to at most ``image_side`` px, then the squared residual
  of a ``image_components``-component PCA of the training normals (probabilistic PCA is
  the linear-Gaussian VAE, Tipping & Bishop 1999), as a map smoothed at
  ``IMAGE_SIGMA`` px whose top-k mean is the view (``image_reduce`` "topk"; models saved
  before it: the mean of the map at 64 px). A lesion is local in pixel space: on the
  brain MRI set the top-k mean ranks 0.898 where the whole-map mean ranks 0.791
  (reports/suite/loso.md, probes ``pca128_topk`` and ``pca128``). It sees what ImageNet features of
  per-image normalized inputs miss: overall brightness, layout and texture of the whole
  image (a lesion that changes a whole MRI slice, a missing part of a fixed scene).

- ``knn``: each location's distance to the nearest of a memory bank of normal feature
  vectors (a greedy k-center coreset of the training locations, as in PatchCore, Roth et
  al. 2022), the mean of the largest 1 %: local evidence that, unlike the VAE's ELBO,
  needs no density model, so rare but normal patterns keep a small distance.

The detector turns each view into a z-score against held-out normals and fuses them
(:func:`anomalyvae.models.fusion.fuse_views`); the fusion's constants live in this
module's buffers, so the
exported graph carries them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import Tensor, nn

from anomalyvae.errors import InvalidValueError
from anomalyvae.imaging.tiles import TILE_ALIGN, TileLayout, tile_layout
from anomalyvae.models.backbone import FEATURE_TAPS, load_backbone
from anomalyvae.models.bank import knn_view, nearest_distance
from anomalyvae.models.fusion import (
    ADAPTIVE_FUSIONS,
    EXCESS_VIEWS,
    FUSED_VIEWS,
    FUSION_RULES,
    VIEW_NAMES,
    LocalExcess,
    robust_z_constants,
)
from anomalyvae.models.smoothing import gaussian_blur, topk_size
from anomalyvae.models.vae import LOG_2PI

#: How the ``image`` view reduces its residual map: "topk" (the default) or "mean".
IMAGE_REDUCTIONS: tuple[str, ...] = ("mean", "topk")
#: Smoothing (px, at the pooled resolution) of the ``image`` view's residual map: the
#: product's map smoothing, so one footprint of the top-k is one blob.
IMAGE_SIGMA = 2.0
#: Share of the ``image`` view's residual map its top-k mean averages (the product's).
IMAGE_TOP_FRACTION = 0.01
#: What the anomaly map is: "mean-z" (the default), the mean of each location's robust
#: z-scores of the VAE's negative ELBO and of the memory-bank distance; "elbo", the
#: negative ELBO alone in nats (models saved before the bank's map). On both suite sets
#: with pixel masks the mean ranked pixels better than either map alone
#: (reports/suite/experiments.md).
MAP_RULES: tuple[str, ...] = ("elbo", "mean-z")

#: Stride of the feature map the VAE models (the backbone's stride-8 tap).
FEATURE_STRIDE = 8


@dataclass(frozen=True)
class FeatureVAEConfig:
    """Architecture of :class:`FeatureVAE`.

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
        (:func:`normalize_intensity`), so that a global change of lighting or gain is
        not scored as a defect. The scan's drift alarm still sees the raw intensities.
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
    bank_dim : int
        Principal directions of the bank the nearest-neighbour search's dot products
        are taken in (:meth:`FeatureVAE.project_bank`); 0 searches in all feature
        channels. The norms stay exact, so a query or bank vector off the subspace
        keeps its full distance; only the cross term is approximated.
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
    tile_side, tile_overlap : int
        An input longer than ``tile_side`` px on a side runs through the backbone in
        overlapping tiles of at most ``tile_side`` x ``tile_side`` (at least
        ``tile_overlap`` px of overlap), blended into one feature map
        (:mod:`anomalyvae.imaging.tiles`); everything after the backbone sees the whole
        input. Bounds the backbone's memory for large inputs.
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
    min_std: float = 0.02
    image_components: int = 50
    image_side: int = 128
    image_reduce: str = "topk"
    bank_size: int = 8192
    bank_dim: int = 0
    fusion: str = "mean"
    excess_weight: float = 0.0
    excess_z: float = 2.0
    map_rule: str = "mean-z"
    tile_side: int = 512
    tile_overlap: int = 128

    def __post_init__(self) -> None:
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
        return tile_layout(self.height, self.width, self.tile_side, self.tile_overlap)

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
        return sum(channels for _, channels, _ in FEATURE_TAPS.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureVAEConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise InvalidValueError(f"unknown FeatureVAEConfig fields: {sorted(unknown)}")
        # a model saved before the image view (or the bank) existed has none, and was
        # calibrated on the largest z-score; one saved before the bank's map maps the
        # ELBO; one saved before the top-k image view averaged its residual
        old = {
            "image_components": 0,
            "bank_size": 0,
            "bank_dim": 0,
            "fusion": "max",
            "map_rule": "elbo",
            "image_reduce": "mean",
        }
        return cls(**{**old, **data})


class FeatureOutput(NamedTuple):
    """One pass over feature vectors: standardized features and the VAE's outputs.

    features, recon_mean, recon_logvar : (n, c, h, w); mu, logvar : (n, latent, h, w).
    """

    features: Tensor
    recon_mean: Tensor
    recon_logvar: Tensor
    mu: Tensor
    logvar: Tensor


class FeatureVAE(nn.Module):
    """Frozen backbone + per-location VAE + the normal statistics scoring needs.

    Buffers fitted from normal images (training,
    :func:`~anomalyvae.models.feature_training.train_feature_vae`, and the detector's
    calibration): ``feature_mean``/``feature_std`` standardize each channel,
    ``global_mean``/``global_precision`` define the global view, ``view_center`` /
    ``view_scale`` turn views into z-scores for fusion, ``map_center`` / ``map_scale``
    turn the two location maps into z-scores for the anomaly map.
    """

    family = "feature"

    def __init__(self, config: FeatureVAEConfig, pretrained: bool = True) -> None:
        super().__init__()
        self.config = config
        self.backbone = load_backbone(config.backbone, pretrained=pretrained)
        c, hidden, latent = config.feature_channels, config.hidden_dim, config.latent_dim
        self.encoder = nn.Sequential(
            nn.Conv2d(c, hidden, 1), nn.LeakyReLU(0.2), nn.Conv2d(hidden, 2 * latent, 1)
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(latent, hidden, 1), nn.LeakyReLU(0.2), nn.Conv2d(hidden, 2 * c, 1)
        )
        self.register_buffer("feature_mean", torch.zeros(1, c, 1, 1))
        self.register_buffer("feature_std", torch.ones(1, c, 1, 1))
        self.register_buffer("global_mean", torch.zeros(c))
        self.register_buffer("global_precision", torch.eye(c))
        self.register_buffer("view_center", torch.zeros(len(VIEW_NAMES)))
        self.register_buffer("view_scale", torch.ones(len(VIEW_NAMES)))
        # the adaptive fusions' weights of the views' z-scores (view_weights)
        self.register_buffer("view_weight", torch.zeros(len(VIEW_NAMES)))
        if config.image_components:
            self.register_buffer("image_mean", torch.zeros(config.image_dim))
            self.register_buffer(
                "image_basis", torch.zeros(config.image_components, config.image_dim)
            )
        if config.bank_size:
            self.register_buffer("bank", torch.zeros(config.bank_size, config.bank_dim or c))
        if config.bank_size and config.bank_dim:  # project_bank
            self.register_buffer("bank_sq", torch.zeros(config.bank_size))
            self.register_buffer("bank_mean", torch.zeros(c))
            self.register_buffer("bank_basis", torch.zeros(c, config.bank_dim))
        if config.map_rule == "mean-z":  # (ELBO, bank distance)
            self.register_buffer("map_center", torch.zeros(2))
            self.register_buffer("map_scale", torch.ones(2))
        self.layout = config.layout
        if self.layout.tiled:  # derived from the config: not saved with the weights
            weight, norm = self.layout.blend(FEATURE_STRIDE)
            self.register_buffer("tile_weight", torch.from_numpy(weight)[None, None], False)
            self.register_buffer("tile_norm", torch.from_numpy(norm)[None, None], False)

    # ------------------------------------------------------------------ forward

    def raw_features(self, x: Tensor) -> Tensor:
        """Backbone features (n, c, h/8, w/8), unstandardized; x is (n, 1|3, h, w) in [0, 1]."""
        if self.config.normalize_images:
            x = normalize_intensity(x, self.config.min_std)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        features = self._tiled_features(x) if self.layout.tiled else self._features(x)
        pool = self.config.pool
        if pool > 1:
            features = F.avg_pool2d(
                features, pool, stride=1, padding=pool // 2, count_include_pad=False
            )
        return features

    def _features(self, x: Tensor) -> Tensor:
        """The backbone's stride-8 map with the stride-16 map upsampled onto it."""
        fine, coarse = self.backbone(x)
        size = (int(fine.shape[-2]), int(fine.shape[-1]))
        coarse = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
        return torch.cat([fine, coarse], dim=1)

    def _tiled_features(self, x: Tensor) -> Tensor:
        """:meth:`_features` of the whole input, computed tile by tile and blended.

        Each tile's features are weighted by linear ramps across the overlaps and placed
        on the input's feature grid; dividing by the summed weights gives every cell the
        weighted mean of the tiles that cover it. Static slices and pads: exports as is.
        """
        layout, s = self.layout, FEATURE_STRIDE
        if (int(x.shape[-2]), int(x.shape[-1])) != (layout.height, layout.width):
            raise InvalidValueError(
                f"this model tiles {layout.height}x{layout.width} inputs, "
                f"got {int(x.shape[-2])}x{int(x.shape[-1])}"
            )
        fh, fw = layout.height // s, layout.width // s
        th, tw = layout.tile_height // s, layout.tile_width // s
        canvas = None
        for y, x0 in layout.corners():
            tile = x[:, :, y : y + layout.tile_height, x0 : x0 + layout.tile_width]
            placed = F.pad(
                self._features(tile) * self.tile_weight,
                (x0 // s, fw - x0 // s - tw, y // s, fh - y // s - th),
            )
            canvas = placed if canvas is None else canvas + placed
        return canvas * self.tile_norm

    def standardize(self, features: Tensor) -> Tensor:
        return (features - self.feature_mean) / self.feature_std

    def vae(self, features: Tensor) -> FeatureOutput:
        """Encode and decode standardized features (posterior mean in eval mode)."""
        mu, logvar = self.encoder(features).chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        mean, logvar_raw = self.decoder(z).chunk(2, dim=1)
        low, high = self.config.logvar_min, self.config.logvar_max
        recon_logvar = low + (high - low) * torch.sigmoid(logvar_raw)
        return FeatureOutput(features, mean, recon_logvar, mu, logvar)

    def forward(self, x: Tensor) -> FeatureOutput:
        return self.vae(self.standardize(self.raw_features(x)))

    def location_elbo(self, output: FeatureOutput) -> Tensor:
        """Negative ELBO per location in nats above the decoder's floor, (n, 1, h, w)."""
        return location_loss(output, 1.0, self.config.logvar_min)

    def image_residual_map(
        self, x: Tensor, subspace: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """Squared residual of the pooled input off the normal subspace, (n, 1, h', w').

        ``x`` is the model input (n, c, h, w) in [0, 1], before any normalization; the
        map is at the pooled resolution, averaged over channels. ``subspace`` (mean,
        basis) replaces the model's own (cross-fitting).
        """
        mean, basis = subspace if subspace is not None else (self.image_mean, self.image_basis)
        pool = self.config.image_pool
        pooled = F.avg_pool2d(x, pool) if pool > 1 else x
        centred = pooled.flatten(1) - mean
        residual = centred - (centred @ basis.T) @ basis
        height, width = int(pooled.shape[-2]), int(pooled.shape[-1])  # fixed per model
        squared = (residual**2).unflatten(1, (int(pooled.shape[1]), height, width))
        return squared.mean(dim=1, keepdim=True)

    def image_residual(self, x: Tensor) -> Tensor:
        """Mean squared residual of the pooled input off the normal subspace, (n,)."""
        if not self.config.image_components:
            return x.new_zeros(x.shape[0])
        return self.image_residual_map(x).flatten(1).mean(1)

    def image_variance(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per image (n,): squared residual off the normal subspace, squared deviation.

        Both are means over the pooled input's pixels: the residual off the normal
        subspace and the deviation from the normal mean. Summed over held-out normals,
        their ratio is the share of the normals' pixel variance that the subspace leaves
        unexplained (the "image-share" fusion).
        """
        if not self.config.image_components:
            zeros = x.new_zeros(x.shape[0])
            return zeros, zeros
        pool = self.config.image_pool
        centred = (F.avg_pool2d(x, pool) if pool > 1 else x).flatten(1) - self.image_mean
        residual = centred - (centred @ self.image_basis.T) @ self.image_basis
        return (residual**2).mean(1), (centred**2).mean(1)

    def image_view(self, x: Tensor, subspace: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """The ``image`` view (n,): the pixel-space PCA residual, reduced.

        "topk": the residual map smoothed at ``IMAGE_SIGMA`` px, top-k mean (1 %, at
        least one smoothing footprint); "mean" (older models): its mean. ``subspace``
        as in :meth:`image_residual_map`.
        """
        if not self.config.image_components:
            return x.new_zeros(x.shape[0])
        residual = self.image_residual_map(x, subspace)
        if self.config.image_reduce == "mean":
            return residual.flatten(1).mean(1)
        smoothed = gaussian_blur(residual, IMAGE_SIGMA)
        n_pixels = int(smoothed.shape[-2]) * int(smoothed.shape[-1])  # fixed per model
        k = topk_size(IMAGE_TOP_FRACTION, IMAGE_SIGMA, n_pixels)
        return smoothed.flatten(1).topk(k, dim=1).values.mean(dim=1)

    def knn_distance(self, features: Tensor) -> Tensor:
        """The ``knn`` view (n,) of standardized features (n, c, h, w).

        The mean of the largest 1 % (at least one) of :meth:`knn_locations`.
        """
        if not self.config.bank_size:
            return features.new_zeros(features.shape[0])
        return knn_view(self.knn_locations(features))

    def knn_locations(self, features: Tensor, rows: Tensor | None = None) -> Tensor:
        """Each location's Euclidean distance to its nearest bank vector, (n, h, w).

        :func:`nearest_distance` over the bank (the rows ``rows`` selects, when given: the
        cross-fitted views leave out an image's own rows), in the bank's principal
        subspace when the model projects it (``config.bank_dim``).
        """
        bank = self.bank if rows is None else self.bank[rows]
        if not self.config.bank_dim:
            return nearest_distance(features, bank)
        squared = self.bank_sq if rows is None else self.bank_sq[rows]
        return nearest_distance(features, bank, (self.bank_mean, self.bank_basis, squared))

    def project_bank(self, dim: int) -> None:
        """Keep the bank in its ``dim`` principal directions (``config.bank_dim``).

        The search's cost is the bank's dot products with every location; in ``dim`` of
        the 152 channels they cost ``dim / 152`` as much. ``|q - b|^2 = |q|^2 + |b|^2 -
        2 q.b`` keeps both norms exact (after centring on the bank's mean) and takes only
        ``q.b`` in the subspace, so a location off the normal subspace still scores its
        whole distance. A model that already projects its bank keeps it.
        """
        if self.config.bank_dim or not self.config.bank_size or not dim:
            return
        rows = self.bank.double()
        mean = rows.mean(0)
        centred = rows - mean
        basis = torch.linalg.svd(centred, full_matrices=False)[2][:dim].T  # (c, dim)
        self.register_buffer("bank_mean", mean.float())
        self.register_buffer("bank_basis", basis.float().contiguous())
        self.register_buffer("bank_sq", (centred**2).sum(-1).float())
        self.bank = (centred @ basis).float().contiguous()
        self.config = dataclasses.replace(self.config, bank_dim=int(basis.shape[1]))

    def location_map(self, elbo: Tensor, distances: Tensor) -> Tensor:
        """The anomaly map on the feature grid, (n, 1, h, w), by ``config.map_rule``.

        ``elbo`` is :meth:`location_elbo`'s (n, 1, h, w), ``distances``
        :meth:`knn_locations`' (n, h, w) (unused by the "elbo" rule).
        """
        if self.config.map_rule == "elbo":
            return elbo
        maps = torch.cat([elbo, distances[:, None]], dim=1)  # (n, 2, h, w)
        z = (maps - self.map_center[None, :, None, None]) / self.map_scale[None, :, None, None]
        return z.mean(dim=1, keepdim=True)

    def global_distance(self, raw: Tensor) -> Tensor:
        """Squared Mahalanobis distance of each image's mean feature vector, (n,)."""
        pooled = raw.mean(dim=(2, 3)) - self.global_mean
        return ((pooled @ self.global_precision) * pooled).sum(1)


#: Mean and standard deviation every image is given by :func:`normalize_intensity`:
#: about those of natural images in [0, 1], where the ImageNet weights work best.
TARGET_MEAN, TARGET_STD = 0.45, 0.225
#: The smallest contrast an image is credited with: flat images are not blown up to noise.
#: The ceiling of the training-time floor
#: (:func:`~anomalyvae.models.feature_training.contrast_floor`), and the floor of models
#: saved before it.
MIN_STD = 0.02


def location_maps(
    model: FeatureVAE, images: NDArray[np.float32], batch_size: int, device: torch.device
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Each location's negative ELBO and bank distance, each (n, h', w') on the feature grid.

    The two maps the "mean-z" map rule combines, of model-ready images (n x c x h x w).
    """
    elbo, distance = [], []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(images[start : start + batch_size]).to(device)
            standardized = model.standardize(model.raw_features(x))
            elbo.append(model.location_elbo(model.vae(standardized))[:, 0].cpu().numpy())
            distance.append(model.knn_locations(standardized).cpu().numpy())
    return np.concatenate(elbo), np.concatenate(distance)


def fit_map_constants(
    model: FeatureVAE, images: NDArray[np.float32], batch_size: int, device: torch.device
) -> None:
    """Set ``map_center`` / ``map_scale`` from normal images (model-ready, n x c x h x w).

    The robust z constants (:func:`~anomalyvae.models.fusion.robust_z_constants`) of every
    location's negative ELBO and bank distance (:func:`location_maps`), over all locations
    of all the images.
    """
    if model.config.map_rule != "mean-z":
        return
    elbo, distance = location_maps(model, images, batch_size, device)
    values = np.stack([elbo.ravel(), distance.ravel()], axis=1).astype(np.float64)
    center, scale = robust_z_constants(values)
    model.map_center.copy_(torch.from_numpy(center).float())
    model.map_scale.copy_(torch.from_numpy(scale).float())


def normalize_intensity(x: Tensor, min_std: float = MIN_STD) -> Tensor:
    """Each image of (n, c, h, w) shifted and scaled to one mean and standard deviation.

    A global change of brightness or gain (lighting drift, another camera setting) then
    leaves the image unchanged, so only what changes its *pattern* can raise a score.
    Per-image standardization is the usual first step for medical images with arbitrary
    intensity scales too. An image flatter than ``min_std`` is scaled as if it had that
    contrast. All plain tensor ops, so it exports to ONNX.
    """
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True).clamp(min=min_std)
    return (x - mean) / std * TARGET_STD + TARGET_MEAN


def location_loss(output: FeatureOutput, beta: float, logvar_min: float) -> Tensor:
    """Per-location negative beta-ELBO, shape (n, 1, h, w).

    Gaussian NLL summed over channels (above its floor at ``logvar_min``) plus beta times
    KL(q(z|f) || N(0, I)) (Kingma & Welling 2014).
    """
    nll = 0.5 * (
        output.recon_logvar
        - logvar_min
        + (output.features - output.recon_mean) ** 2 * torch.exp(-output.recon_logvar)
    )
    kl = -0.5 * (1.0 + output.logvar - output.mu**2 - torch.exp(output.logvar))
    return nll.sum(1, keepdim=True) + beta * kl.sum(1, keepdim=True)


def nll_floor(logvar_min: float) -> float:
    """Per-channel NLL at zero error and the smallest variance (what the map omits)."""
    return 0.5 * (LOG_2PI + logvar_min)
