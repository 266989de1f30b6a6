"""Anomaly maps and image scores from a VAE (higher = more anomalous everywhere).

The blocks every family's scoring is built of (map kinds, smoothing, reductions,
:class:`ScoringConfig`, :class:`MapStats`) and the pixel family's recipe
(:func:`pixel_scores`). A batch is scored through its model's family by
:mod:`anomalyvae.models.scoring`, which is the one entry point.

Smoothing and SSIM are written here as plain depthwise convolutions rather than taken
from MONAI, so that the whole scoring graph exports to ONNX as standard Conv ops.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from anomalyvae.errors import InvalidValueError
from anomalyvae.models.fusion import fuse_views, robust_z_constants
from anomalyvae.models.smoothing import (
    gaussian_blur,
    topk_size,
)
from anomalyvae.models.vae import LOG_2PI, ConvVAE, VAEOutput, gaussian_nll, kl_divergence

MAP_KINDS: tuple[str, ...] = ("recon", "ssim", "nll", "elbo", "elbo_grad")
SCORE_KINDS: tuple[str, ...] = ("max", "topk_mean", "elbo", "global", "image", "knn", "fused")
#: Score kinds only the feature family computes (see :mod:`anomalyvae.models.feature_vae`).
FEATURE_ONLY_SCORE_KINDS: tuple[str, ...] = ("image", "knn")
#: Score kinds of the pixel family.
PIXEL_SCORE_KINDS: tuple[str, ...] = ("max", "topk_mean", "elbo", "global", "fused")
#: The pixel family's views, in the order of its ``ScoreResult.views`` columns: the local
#: view (top-k mean of the map) and the global view (mean of the whole map).
PIXEL_VIEW_NAMES: tuple[str, ...] = ("local", "global")
#: SSIM window (Gaussian sigma, px) of maps saved before ``ssim_sigma`` was recorded.
LEGACY_SSIM_SIGMA = 1.5
#: Model inputs at most this many pixels on a side get SSIM maps by default (see
#: :func:`default_map_kind`).
SMALL_IMAGE_SIDE = 32
#: Map kinds whose graph has no input gradient, so they export to ONNX.
EXPORTABLE_MAP_KINDS: tuple[str, ...] = ("recon", "ssim", "nll", "elbo")


@dataclass(frozen=True)
class ScoringConfig:
    """Which anomaly map and image score a detector uses.

    Attributes
    ----------
    map_kind : str
        One of ``MAP_KINDS``; see :func:`anomaly_map` and docs/maps.md.
    score_kind : str
        "max" (largest map value), "topk_mean" (mean of the ``topk_fraction``
        largest values), "elbo" (the image's negative ELBO in nats), "global" and
        "fused". Pixel family: "global" is the mean of the whole standardized map and
        "fused" the mean z-score of the local (top-k mean) and global views against
        held-out normals. Feature family: "global" is the distance of the image's mean
        feature vector to the normals', and it adds "image" (the pooled image's
        residual off the normals' PCA subspace), "knn" (nearest-neighbour distance to a
        memory bank of normal feature vectors) and "fused" (the z-scores of the knn,
        global and image views against held-out normals, combined by the model's
        fusion rule, :func:`anomalyvae.models.fusion.fuse_views`).
    smoothing_sigma : float
        Gaussian blur of the map in pixels; 0 disables it.
    topk_fraction : float
        Share of pixels averaged by "topk_mean", in (0, 1]; never fewer pixels than
        one smoothing footprint (see :func:`topk_count`).
    standardize : bool
        Express the smoothed map per pixel in standard deviations above the normal
        images' mean at that pixel, floored at 0 (:class:`MapStats`, fitted on the
        training normals). Removes what every normal image has at the same place
        (edges, anatomy, borders), so what is left is unusual *for that position*.
    ssim_sigma : float
        Gaussian window (sigma, px) of the "ssim" map. The default equals the default
        smoothing: structure is compared at the scale the map is read at (on
        PneumoniaMNIST's labelled val split, 2.0 ranked images better than the
        classic 1.5 of Wang et al.; reports/suite/experiments.md). Scorings saved
        before this field was recorded used 1.5 (``from_dict`` keeps that).
    """

    map_kind: str = "nll"
    score_kind: str = "topk_mean"
    smoothing_sigma: float = 2.0
    topk_fraction: float = 0.01
    standardize: bool = False
    ssim_sigma: float = 2.0

    def __post_init__(self) -> None:
        if self.map_kind not in MAP_KINDS:
            raise InvalidValueError(f"map_kind must be one of {MAP_KINDS}, got {self.map_kind!r}")
        if self.score_kind not in SCORE_KINDS:
            raise InvalidValueError(
                f"score_kind must be one of {SCORE_KINDS}, got {self.score_kind!r}"
            )
        if self.smoothing_sigma < 0:
            raise InvalidValueError(f"smoothing_sigma must be >= 0, got {self.smoothing_sigma}")
        if not 0 < self.topk_fraction <= 1:
            raise InvalidValueError(f"topk_fraction must be in (0, 1], got {self.topk_fraction}")
        if self.ssim_sigma <= 0:
            raise InvalidValueError(f"ssim_sigma must be > 0, got {self.ssim_sigma}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScoringConfig:
        return cls(**{"ssim_sigma": LEGACY_SSIM_SIGMA, **data})


def default_map_kind(height: int, width: int) -> str:
    """The map kind "auto" resolves to for a model input of ``height`` x ``width``.

    Thumbnail-sized inputs (<= ``SMALL_IMAGE_SIDE``; e.g. 28 px chest X-rays) show a
    whole scene in a few hundred pixels: a finding changes local structure, which the
    SSIM map measures, while per-pixel likelihoods are dominated by the decoder's noise
    model. Larger inputs get the NLL map, which weighs each pixel's error by the
    variance the decoder expects there. Measured in reports/pneumonia and reports/mtd.
    """
    return "ssim" if min(height, width) <= SMALL_IMAGE_SIDE else "nll"


def ssim_map(x: Tensor, y: Tensor, sigma: float = 1.5, data_range: float = 1.0) -> Tensor:
    """Local SSIM (Wang et al. 2004, Gaussian window, K1=0.01, K2=0.03), shape of x."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = gaussian_blur(x, sigma), gaussian_blur(y, sigma)
    var_x = gaussian_blur(x * x, sigma) - mu_x**2
    var_y = gaussian_blur(y * y, sigma) - mu_y**2
    cov = gaussian_blur(x * y, sigma) - mu_x * mu_y
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )


def nll_floor(logvar_min: float) -> float:
    """Smallest per-pixel NLL the decoder can give (zero error at the lowest variance).

    NLL-based maps and the image ELBO are reported in excess of this floor, so they
    are never negative and a threshold can normalize them.
    """
    return 0.5 * (LOG_2PI + logvar_min)


def _excess_nll(x: Tensor, output: VAEOutput, logvar_min: float) -> Tensor:
    return gaussian_nll(x, output.recon_mean, output.recon_logvar) - nll_floor(logvar_min)


def map_from_output(
    x: Tensor,
    output: VAEOutput,
    kind: str,
    logvar_min: float,
    ssim_sigma: float = LEGACY_SSIM_SIGMA,
) -> Tensor:
    """A raw (unsmoothed) (n, 1, h, w) anomaly map of a gradient-free kind.

    - recon: squared error (x - mean)^2, averaged over channels;
    - ssim: 1 - local SSIM between x and the reconstruction (Gaussian window of
      ``ssim_sigma`` px), averaged over channels;
    - nll: Gaussian NLL under the decoder's mean and variance, summed over channels,
      in excess of :func:`nll_floor`;
    - elbo: nll plus the image's KL divergence spread evenly over its pixels, so the
      map sums to :func:`image_elbo` (Kingma & Welling 2014).
    """
    if kind == "recon":
        return ((x - output.recon_mean) ** 2).mean(1, keepdim=True)
    if kind == "ssim":
        return (1.0 - ssim_map(x, output.recon_mean, sigma=ssim_sigma)).mean(1, keepdim=True)
    nll = _excess_nll(x, output, logvar_min).sum(1, keepdim=True)
    if kind == "nll":
        return nll
    if kind == "elbo":
        kl = kl_divergence(output.mu, output.logvar)
        return nll + (kl / (x.shape[-2] * x.shape[-1])).view(-1, 1, 1, 1)
    raise InvalidValueError(f"map kind must be one of {MAP_KINDS}, got {kind!r}")


def image_elbo(x: Tensor, output: VAEOutput, logvar_min: float) -> Tensor:
    """Negative ELBO per image in nats above the NLL floor, shape (n,).

    Higher = less likely = more anomalous; it differs from the textbook negative ELBO
    by the constant ``n_pixels * nll_floor(logvar_min)``.
    """
    nll = _excess_nll(x, output, logvar_min).flatten(1).sum(1)
    return nll + kl_divergence(output.mu, output.logvar)


def elbo_grad_map(model: ConvVAE, x: Tensor) -> tuple[Tensor, VAEOutput]:
    """Reconstruction error times |d(-ELBO)/dx| ("combi", Zimmerer et al. 2019).

    Needs an input gradient, so it runs in torch only (not in the ONNX graph).
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        output = model(x)
        (grad,) = torch.autograd.grad(image_elbo(x, output, 0.0).sum(), x)
    error = (x.detach() - output.recon_mean.detach()) ** 2
    anomaly = (error * grad.abs()).mean(1, keepdim=True)
    detached = VAEOutput(*(t.detach() for t in output))
    return anomaly, detached


class MapStats(NamedTuple):
    """Per-pixel statistics of normal images' smoothed maps, for ``standardize``.

    ``mean`` and ``std`` have shape (1, 1, h, w); ``map_kind`` and ``smoothing_sigma``
    say which maps they describe (they are only valid for those), and ``ssim_sigma``
    the SSIM window of "ssim" maps. ``view_center`` and
    ``view_scale`` (shape (2,), ``PIXEL_VIEW_NAMES`` order) turn the local and global
    views into z-scores for the "fused" score: the held-out normals' median and scaled
    MAD (:meth:`with_views`); None until fitted, and in statistics saved before them.
    """

    mean: Tensor
    std: Tensor
    map_kind: str
    smoothing_sigma: float
    n_images: int
    ssim_sigma: float = LEGACY_SSIM_SIGMA
    view_center: Tensor | None = None
    view_scale: Tensor | None = None

    def to_dict(self) -> dict[str, Any]:
        return self._asdict()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MapStats:
        return cls(**data)

    def with_views(self, views: NDArray[np.floating]) -> MapStats:
        """These statistics plus the fusion constants of normal images' (n, 2) views."""
        center, scale = robust_z_constants(views)
        return self._replace(
            view_center=torch.from_numpy(center).float(),
            view_scale=torch.from_numpy(scale).float(),
        )


#: The std floor, as a share of the mean std: keeps flat pixels from dividing by ~0.
STD_FLOOR = 0.05


def fit_map_stats(maps: Tensor, config: ScoringConfig) -> MapStats:
    """Per-pixel mean and (floored) std of smoothed, unstandardized maps (n, 1, h, w)."""
    if maps.ndim != 4 or len(maps) < 2:
        raise InvalidValueError(f"need maps of shape (n >= 2, 1, h, w), got {tuple(maps.shape)}")
    maps = maps.double()
    mean = maps.mean(0, keepdim=True)
    std = maps.std(0, keepdim=True)
    std = torch.sqrt(std**2 + (STD_FLOOR * std.mean()) ** 2 + 1e-24)
    return MapStats(
        mean.float(),
        std.float(),
        config.map_kind,
        float(config.smoothing_sigma),
        len(maps),
        float(config.ssim_sigma),
    )


def check_stats(stats: MapStats | None, config: ScoringConfig) -> MapStats:
    """The statistics a standardized ``config`` needs, or a clear error."""
    if stats is None:
        raise InvalidValueError(
            "this scoring standardizes the map but no normal-map statistics were fitted; "
            "call detector.fit_map_stats(normal_images) (fit() does it)"
        )
    if stats.map_kind != config.map_kind or stats.smoothing_sigma != config.smoothing_sigma:
        raise InvalidValueError(
            f"the normal-map statistics describe {stats.map_kind!r} maps smoothed with "
            f"sigma {stats.smoothing_sigma}, not {config.map_kind!r} with sigma "
            f"{config.smoothing_sigma}; call detector.fit_map_stats(normal_images) again"
        )
    if config.map_kind == "ssim" and stats.ssim_sigma != config.ssim_sigma:
        raise InvalidValueError(
            f"the normal-map statistics describe SSIM maps with a {stats.ssim_sigma} px "
            f"window, not {config.ssim_sigma} px; call detector.fit_map_stats(normal_images) "
            "again"
        )
    if config.score_kind == "fused":
        pixel_view_constants(stats)
    return stats


def standardize_map(smoothed: Tensor, stats: MapStats) -> Tensor:
    """Standard deviations above the normal mean at each pixel, floored at 0."""
    return torch.clamp((smoothed - stats.mean.to(smoothed)) / stats.std.to(smoothed), min=0.0)


def pixel_view_constants(stats: MapStats | None) -> tuple[Tensor, Tensor]:
    """The fused score's (centre, scale) of the pixel views, or a clear error."""
    if stats is None or stats.view_center is None or stats.view_scale is None:
        raise InvalidValueError(
            "the fused score needs the views' constants from held-out normals; call "
            "detector.fit_fusion(normal_images) (fit() does it)"
        )
    return stats.view_center, stats.view_scale


def topk_count(config: ScoringConfig, n_pixels: int) -> int:
    """How many of ``n_pixels`` map values "topk_mean" averages.

    The ``topk_fraction`` share, but never fewer than one smoothing footprint
    (:func:`smoothing_footprint`): after smoothing, fewer values all lie in one blob,
    so their mean is just a noisier maximum. This matters only for small inputs (at
    sigma 2, 114 pixels: 11 % of a 32 x 32 map, less than 1 % of 128 x 128).
    """
    return topk_size(config.topk_fraction, config.smoothing_sigma, n_pixels)


def reduce_map(anomaly_map: Tensor, elbo: Tensor, config: ScoringConfig) -> Tensor:
    """Image score (n,) from a smoothed (n, 1, h, w) map; higher = more anomalous."""
    if config.score_kind == "elbo":
        return elbo
    flat = anomaly_map.flatten(1)
    if config.score_kind == "max":
        return flat.max(dim=1).values
    # Python ints from the static spatial size, so ONNX tracing sees a constant k.
    k = topk_count(config, int(anomaly_map.shape[-2]) * int(anomaly_map.shape[-1]))
    return flat.topk(k, dim=1).values.mean(dim=1)


def reduce_valid(
    anomaly_map: Tensor, valid: Tensor, config: ScoringConfig
) -> tuple[Tensor, Tensor, Tensor]:
    """(top-k mean, max, mean) of each (1, h, w) map over its valid pixels, each (n,).

    ``valid`` is (n, h, w) bool. The top-k share counts the valid pixels only
    (:func:`topk_count`), so a fully valid image reduces exactly as :func:`reduce_map`
    does. Torch only (a per-image loop): masked scoring inpaints first, which needs the
    decoder's gradient, so it never exports.
    """
    flat, keep = anomaly_map.flatten(1), valid.flatten(1)
    local, largest, mean = [], [], []
    for values, mask in zip(flat, keep, strict=True):
        kept = values[mask]
        if kept.numel() == 0:
            raise InvalidValueError("valid_mask leaves an image with no valid pixels to score")
        local.append(kept.topk(topk_count(config, int(kept.numel()))).values.mean())
        largest.append(kept.max())
        mean.append(kept.mean())
    return torch.stack(local), torch.stack(largest), torch.stack(mean)


class ScoreResult(NamedTuple):
    """Scores of a batch: ``anomaly_map`` (n, 1, h, w), ``score`` (n,), ``elbo`` (n,).

    ``views``: the feature family's (n, 5) views in ``VIEW_NAMES`` order, or the pixel
    family's (n, 2) in ``PIXEL_VIEW_NAMES`` order.
    """

    anomaly_map: Tensor
    score: Tensor
    elbo: Tensor
    views: Tensor | None = None


def pixel_scores(
    model: nn.Module,
    x: Tensor,
    config: ScoringConfig,
    stats: MapStats | None = None,
    output: VAEOutput | None = None,
    raw: Tensor | None = None,
    valid: Tensor | None = None,
) -> ScoreResult:
    """The pixel family's recipe: map, smoothing, standardization, image score.

    :func:`score_batch` and :class:`ScoringGraph` (the exported graph) both call it;
    ``output`` and ``raw`` pass in a forward pass and map computed elsewhere (the
    gradient map). Views (n, 2), ``PIXEL_VIEW_NAMES`` order, whatever the score kind:
    the local view (the top-k mean of the map) and the global view (the mean of the
    whole map); "fused" is their mean z-score against held-out normals. With ``valid``
    (n, h, w) bool, the views and the max read the valid pixels only (:func:`reduce_valid`),
    so a masked image is scored the way the threshold was calibrated, whatever the kind.
    """
    floor = model.config.logvar_min
    if output is None or raw is None:
        output = model(x)
        raw = map_from_output(x, output, config.map_kind, floor, config.ssim_sigma)
    smoothed = gaussian_blur(raw, config.smoothing_sigma)
    if config.standardize:  # constants in the exported graph
        stats = check_stats(stats, config)
        smoothed = standardize_map(smoothed, stats)
    elbo = image_elbo(x, output, floor)
    if valid is None:
        local = reduce_map(smoothed, elbo, dataclasses.replace(config, score_kind="topk_mean"))
        views = torch.stack([local, smoothed.flatten(1).mean(1)], dim=1)
        largest = None  # traced graphs hold only what the score kind reads
    else:
        valid = valid.to(device=smoothed.device, dtype=torch.bool)
        smoothed = torch.where(valid[:, None], smoothed, torch.zeros_like(smoothed))
        local, largest, mean = reduce_valid(smoothed, valid, config)
        views = torch.stack([local, mean], dim=1)
    if config.score_kind == "fused":
        center, scale = pixel_view_constants(stats)
        score = fuse_views(views, center.to(views), scale.to(views), (0, 1))
    elif config.score_kind == "global":
        score = views[:, 1]
    elif config.score_kind == "max":
        score = reduce_map(smoothed, elbo, config) if largest is None else largest
    elif config.score_kind == "elbo":
        score = elbo
    else:
        score = local
    return ScoreResult(smoothed, score, elbo, views)
