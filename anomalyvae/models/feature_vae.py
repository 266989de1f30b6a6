"""The feature family: a VAE over the feature maps of a frozen ImageNet backbone.

Each location of the backbone's feature map (stride 8, with the stride-16 map upsampled
onto it and a 3 x 3 neighbourhood averaged in, as in PatchCore, Roth et al. 2022) is a
vector; a small VAE of 1 x 1 convolutions models those vectors, the same at every
position. The anomaly map is the mean of two robust z-scores per location, each against
the held-out normals' locations of the same edge ring (``map_border``: the outermost
locations see the backbone's padding): the VAE's negative ELBO and the distance to the
memory bank (``map_rule`` "mean-z"; models saved before it map the ELBO alone, in
nats). It is upsampled to the input size: position-independent away from the edge, so
unaligned objects and textures are scored the same everywhere, and a global shift of
brightness moves ImageNet features little.

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
  al. 2022), the mean of the largest 1 % away from the map's edge (where the backbone's
  zero padding lifts every image's distances): local evidence that, unlike the VAE's
  ELBO, needs no density model, so rare but normal patterns keep a small distance.

The detector turns each view into a z-score against held-out normals and fuses them
(:func:`anomalyvae.models.fusion.fuse_views`); the fusion's constants live in this
module's buffers, so the
exported graph carries them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import Tensor, nn

from anomalyvae.errors import InvalidValueError
from anomalyvae.models.backbone import load_backbone
from anomalyvae.models.bank import edge_rings, knn_view, nearest_distance
from anomalyvae.models.feature_config import MIN_STD, FeatureVAEConfig
from anomalyvae.models.fusion import VIEW_NAMES, robust_z_constants
from anomalyvae.models.smoothing import gaussian_blur, topk_size
from anomalyvae.models.vae import LOG_2PI

#: Smoothing (px, at the pooled resolution) of the ``image`` view's residual map: the
#: product's map smoothing, so one footprint of the top-k is one blob.
IMAGE_SIGMA = 2.0
#: Share of the ``image`` view's residual map its top-k mean averages (the product's).
IMAGE_TOP_FRACTION = 0.01

#: Stride of the feature map the VAE models (the backbone's stride-8 tap).
FEATURE_STRIDE = 8


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
        if config.map_rule == "mean-z":  # (ELBO, bank distance) per edge ring, then inside
            self.register_buffer("map_center", torch.zeros(config.map_border + 1, 2))
            self.register_buffer("map_scale", torch.ones(config.map_border + 1, 2))
        self.layout = config.layout
        if self.layout.tiled:  # derived from the config: not saved with the weights
            weight, norm = self.layout.blend(FEATURE_STRIDE)
            self.register_buffer("tile_weight", torch.from_numpy(weight)[None, None], False)
            self.register_buffer("tile_norm", torch.from_numpy(norm)[None, None], False)

    def _load_from_state_dict(
        self, state_dict: dict[str, Tensor], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # a model saved before the map's edge rings holds one (ELBO, distance) pair
        for name in ("map_center", "map_scale"):
            stored = state_dict.get(prefix + name)
            if stored is not None and stored.dim() == 1:
                state_dict[prefix + name] = stored[None]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
            # pooled channels-last and handed back in the usual layout: the same values,
            # a third of the time on a 2-core CPU (the plain layout's kernel with
            # count_include_pad=False is the slow one); no-ops when traced
            features = F.avg_pool2d(
                features.contiguous(memory_format=torch.channels_last),
                pool,
                stride=1,
                padding=pool // 2,
                count_include_pad=False,
            ).contiguous()
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

        The mean of the largest 1 % (at least one) of :meth:`knn_locations`, the
        ``config.knn_border`` outermost locations left out (:func:`knn_view`).
        """
        if not self.config.bank_size:
            return features.new_zeros(features.shape[0])
        return knn_view(self.knn_locations(features), self.config.knn_border)

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
        :meth:`knn_locations`' (n, h, w) (unused by the "elbo" rule). "mean-z": each
        location's two robust z-scores against the held-out normals' locations of its own
        edge ring (:func:`~anomalyvae.models.bank.edge_rings`), averaged.
        """
        if self.config.map_rule == "elbo":
            return elbo
        maps = torch.cat([elbo, distances[:, None]], dim=1)  # (n, 2, h, w)
        return ring_z(maps, self.map_center, self.map_scale).mean(dim=1, keepdim=True)

    def global_distance(self, raw: Tensor) -> Tensor:
        """Squared Mahalanobis distance of each image's mean feature vector, (n,)."""
        pooled = raw.mean(dim=(2, 3)) - self.global_mean
        return ((pooled @ self.global_precision) * pooled).sum(1)


#: Mean and standard deviation every image is given by :func:`normalize_intensity`:
#: about those of natural images in [0, 1], where the ImageNet weights work best.
TARGET_MEAN, TARGET_STD = 0.45, 0.225


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

    :func:`ring_constants` of their :func:`location_maps`, for the model's ``map_border``.
    """
    if model.config.map_rule != "mean-z":
        return
    elbo, distance = location_maps(model, images, batch_size, device)
    center, scale = ring_constants(elbo, distance, model.config.map_border)
    model.map_center.copy_(torch.from_numpy(center).float())
    model.map_scale.copy_(torch.from_numpy(scale).float())


def ring_z(maps: Tensor, center: Tensor, scale: Tensor) -> Tensor:
    """Location maps (n, k, h, w) as z-scores against their edge ring's constants.

    ``center`` and ``scale`` are (rings, k) (:func:`ring_constants`): ring ``rings - 1``
    is the interior (:func:`~anomalyvae.models.bank.edge_rings`).
    """
    rings = edge_rings(int(maps.shape[-2]), int(maps.shape[-1]), int(center.shape[0]) - 1)
    return (maps - center[rings].permute(2, 0, 1)[None]) / scale[rings].permute(2, 0, 1)[None]


def ring_constants(
    elbo: NDArray[np.floating], distance: NDArray[np.floating], border: int, floor: bool = True
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The "mean-z" map's constants, each (border + 1, 2): (ELBO, bank distance) per ring.

    The robust z constants (:func:`~anomalyvae.models.fusion.robust_z_constants`) of the
    normal images' location maps (each (n, h, w)) over the locations of each edge ring
    (:func:`~anomalyvae.models.bank.edge_rings`: ring ``border`` is the interior). With
    ``floor``, no ring's scale is below the whole map's: a ring where the normals barely
    vary (a black background) must not read as more sensitive than the rest of the map.
    A ring a small map does not have takes the constants of all its locations.
    """
    elbo, distance = np.asarray(elbo), np.asarray(distance)
    rings = edge_rings(elbo.shape[-2], elbo.shape[-1], border).numpy()

    def constants(where: NDArray[np.bool_]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        values = np.stack([elbo[:, where].ravel(), distance[:, where].ravel()], axis=1)
        return robust_z_constants(values.astype(np.float64))

    overall = constants(np.ones_like(rings, dtype=bool))
    pairs = [constants(rings == k) if np.any(rings == k) else overall for k in range(border + 1)]
    center, scale = np.stack([c for c, _ in pairs]), np.stack([s for _, s in pairs])
    return center, np.maximum(scale, overall[1]) if floor else scale


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
