"""Training of the feature family: features once, the bank, the fits, the VAE's epochs.

The backbone is frozen, so :func:`train_feature_vae` extracts every image's features
once, fits the standardization, the global Gaussian, the image view's pixel subspace and
the memory bank from them, computes the training normals' cross-fitted views (so every
normal can calibrate, :func:`cross_fitted_views`), then trains the per-location VAE
with early stopping and a time budget. The model itself is
:class:`~anomalyvae.models.feature_vae.FeatureVAE`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import Tensor

from anomalyvae.imaging.tiles import auto_batch_size
from anomalyvae.models.bank import coreset_indices, knn_view
from anomalyvae.models.feature_config import MIN_STD, FeatureVAEConfig
from anomalyvae.models.feature_vae import FeatureVAE, location_loss
from anomalyvae.models.fusion import VIEW_NAMES
from anomalyvae.progress import progress_bar


class FeatureTrainResult(NamedTuple):
    """What :func:`train_feature_vae` returns."""

    model: FeatureVAE
    history: list[dict[str, float]]
    best_epoch: int
    stopped_reason: str
    elapsed_s: float
    #: the training normals' cross-fitted views (:func:`cross_fitted_views`), or None
    train_views: NDArray[np.float64] | None = None


def extract_locations(
    model: FeatureVAE, images: NDArray[np.float32], batch_size: int = 16, progress: bool = False
) -> Tensor:
    """Raw backbone features of model-ready images, channels last: (n, h/8, w/8, c).

    Channels last, each location's feature vector is one contiguous row: training
    standardizes them in place and draws its batches from them without a second copy
    (:func:`standardize_locations`). ``.permute(0, 3, 1, 2)`` is the (n, c, h, w) view.
    """
    out = None  # filled in place: a list joined by torch.cat held the features twice
    with torch.no_grad():
        for start in progress_bar(
            range(0, len(images), batch_size),
            desc="features",
            unit="batch",
            disable=not progress,
            file=sys.stderr,
            leave=False,
        ):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
            features = model.raw_features(x).permute(0, 2, 3, 1)
            if out is None:
                out = features.new_empty((len(images), *features.shape[1:]))
            out[start : start + len(features)] = features
    if out is None:
        return model.raw_features(torch.from_numpy(images[:0])).permute(0, 2, 3, 1)
    return out


def extract_features(
    model: FeatureVAE, images: NDArray[np.float32], batch_size: int = 16, progress: bool = False
) -> Tensor:
    """Raw backbone features of model-ready images, (n, c, h/8, w/8) float32."""
    locations = extract_locations(model, images, batch_size, progress)
    return locations.permute(0, 3, 1, 2).contiguous()


def image_means(raw: Tensor, chunk: int = 16) -> NDArray[np.float64]:
    """Each image's mean feature (n, c) of ``raw`` (n, c, h, w), a few images at a time.

    ``raw`` may be a view of channels-last features: each chunk is laid out (c, h, w)
    first, so the means are those of the features as the backbone gives them.
    """
    parts = [raw[i : i + chunk].contiguous().mean(dim=(2, 3)) for i in range(0, len(raw), chunk)]
    return torch.cat(parts).double().numpy() if parts else np.zeros((0, raw.shape[1]))


def standardize_locations(model: FeatureVAE, locations: Tensor) -> Tensor:
    """Standardize channels-last features (n, h, w, c) in place; rows (n h w, c, 1, 1).

    The rows are a view of ``locations``: the VAE's batches and the memory bank are drawn
    from them, and no second copy of the features is made.
    """
    channels = locations.shape[-1]
    rows = locations.view(-1, channels)
    rows.sub_(model.feature_mean.view(channels)).div_(model.feature_std.view(channels))
    return rows.view(-1, channels, 1, 1)


def image_locations(locations: Tensor, index: int) -> Tensor:
    """Image ``index`` of channels-last features (n, h, w, c) as (1, c, h, w), contiguous."""
    return locations[index : index + 1].permute(0, 3, 1, 2).contiguous()


def channel_mean_std(raw: Tensor, chunk: int = 16) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (unbiased) standard deviation of (n, c, h, w), each (1, c, 1, 1).

    Summed in float64 a few images at a time, so no temporary as large as ``raw``.
    """
    total = torch.zeros(raw.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, len(raw), chunk):
        # contiguous (n, c, h, w) first: a view of channels-last features sums alike
        part = raw[start : start + chunk].contiguous().double()
        total += part.sum(dim=(0, 2, 3))
        squares += (part**2).sum(dim=(0, 2, 3))
    count = raw.numel() // raw.shape[1]
    mean = total / count
    variance = (squares - count * mean**2) / max(1, count - 1)
    shape = (1, raw.shape[1], 1, 1)
    return mean.float().view(shape), variance.clamp(min=0.0).sqrt().float().view(shape)


def feature_standardization(raw: Tensor) -> tuple[Tensor, Tensor]:
    """Each channel's mean and scale (1, c, 1, 1) that standardize the features ``raw``.

    The scale is the standard deviation with 5 % of the mean one added in quadrature, so
    a near-constant channel is not blown up into noise.
    """
    mean, std = channel_mean_std(raw)
    return mean, torch.sqrt(std**2 + (0.05 * std.mean()) ** 2)


#: :func:`contrast_floor`'s share of the training normals' median contrast.
MIN_STD_SHARE = 0.1


def contrast_floor(images: NDArray[np.floating], chunk: int = 64) -> float:
    """The ``min_std`` of a model trained on ``images`` (n, c, h, w) in [0, 1].

    A tenth (:data:`MIN_STD_SHARE`) of the images' median standard deviation of
    intensity, at most :data:`MIN_STD`. Images of ordinary contrast (0.05 to 0.3: every
    image of the suite's industrial sets) sit far above either floor and are normalized
    exactly as before; files that use a sliver of their range (the brain MRI slices:
    contrast 0.0008, three grey levels) get a floor to match, instead of reaching the
    backbone 25 times flatter than the rest.
    """
    stds = [
        np.asarray(images[i : i + chunk], dtype=np.float64)
        .reshape(-1, int(np.prod(images.shape[1:])))
        .std(1)
        for i in range(0, len(images), chunk)
    ]
    typical = float(np.median(np.concatenate(stds))) if stds else MIN_STD
    return float(min(MIN_STD, max(MIN_STD_SHARE * typical, 1e-6)))


def fit_global_gaussian(pooled: NDArray[np.float64]) -> tuple[Tensor, Tensor]:
    """Mean and Ledoit-Wolf shrunk precision of pooled feature vectors (n, c)."""
    from sklearn.covariance import LedoitWolf

    estimator = LedoitWolf().fit(pooled)
    return (
        torch.from_numpy(estimator.location_).float(),
        torch.from_numpy(estimator.precision_).float(),
    )


def fit_image_subspace(
    images: NDArray[np.float32], config: FeatureVAEConfig
) -> tuple[Tensor, Tensor]:
    """Mean and PCA basis (k, d) of the pooled training images, for the ``image`` view.

    Fewer images than components leave the extra basis rows zero (they project nothing).
    """
    return fit_pooled_subspace(pooled_images(images, config), config)


def pooled_images(
    images: NDArray[np.float32], config: FeatureVAEConfig, chunk: int = 64
) -> NDArray[np.float64]:
    """The images as the ``image`` view sees them, (n, image_dim): box-pooled, flattened.

    Pooled a few at a time, so that no full-resolution copy of the set is made.
    """
    pool = config.image_pool
    rows = []
    for start in range(0, len(images), chunk):
        x = torch.from_numpy(np.ascontiguousarray(images[start : start + chunk]))
        rows.append((F.avg_pool2d(x, pool) if pool > 1 else x).flatten(1).double().numpy())
    return np.concatenate(rows) if rows else np.zeros((0, config.image_dim))


def fit_pooled_subspace(
    pooled: NDArray[np.float64], config: FeatureVAEConfig
) -> tuple[Tensor, Tensor]:
    """:func:`fit_image_subspace` of images already pooled by :func:`pooled_images`."""
    from sklearn.decomposition import PCA

    basis = np.zeros((config.image_components, config.image_dim))
    k = min(config.image_components, len(pooled) - 1, pooled.shape[1])
    mean = pooled.mean(axis=0)
    if k >= 1:
        pca = PCA(k, random_state=0).fit(pooled)
        basis[:k], mean = pca.components_, pca.mean_
    return torch.from_numpy(mean).float(), torch.from_numpy(basis).float()


#: The component counts the image view chooses among (:func:`choose_image_components`).
IMAGE_COMPONENT_CHOICES = (5, 10, 20, 30, 50, 75, 100, 150)


def _ppca_fit(
    pooled: NDArray[np.float64],
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Mean, principal axes (r, d) and their variances (r,) of the rows of ``pooled``.

    From the (n, n) Gram matrix, since the images are fewer than their pixels: n^2 d
    operations instead of an SVD's n d min(n, d), and the same axes.
    """
    mean = pooled.mean(axis=0)
    centred = pooled - mean
    values, vectors = np.linalg.eigh(centred @ centred.T)
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    keep = values > values[0] * 1e-12 if values.size and values[0] > 0 else values > 0
    values, vectors = values[keep], vectors[:, keep]
    axes = (vectors.T @ centred) / np.sqrt(values)[:, None]
    return mean, axes, values / len(pooled)


def _ppca_log_likelihood(
    fitted: tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]],
    k: int,
    rows: NDArray[np.float64],
) -> float:
    """Mean log-likelihood (up to a constant) of ``rows`` under a k-component PPCA.

    Tipping & Bishop (1999): the k largest variances along their axes, and the rest of
    the variance spread evenly over the other ``d - k`` directions as isotropic noise.
    """
    mean, axes, variances = fitted
    d = rows.shape[1]
    noise = max(float(variances[k:].sum()) / (d - k), 1e-12)
    centred = rows - mean
    projected = centred @ axes[:k].T
    residual = (centred**2).sum(axis=1) - (projected**2).sum(axis=1)
    log_det = float(np.log(variances[:k]).sum()) + (d - k) * np.log(noise)
    mahalanobis = (projected**2 / variances[:k]).sum(axis=1) + np.maximum(residual, 0) / noise
    return float(np.mean(-0.5 * (log_det + mahalanobis)))


#: The most training normals :func:`choose_image_components` reads (a seeded sample): its
#: Gram matrices grow with their square, and 2000 images pin the choice down.
CHOICE_MAX_IMAGES = 2000


def choose_image_components(
    pooled: NDArray[np.float64],
    choices: tuple[int, ...] = IMAGE_COMPONENT_CHOICES,
    folds: int = 5,
    seed: int = 0,
) -> tuple[int, dict[int, float]]:
    """The component count whose probabilistic PCA best predicts held-out normals.

    No label: each candidate k of ``choices`` is fitted on ``folds - 1`` folds of the
    pooled training normals and scored by the mean log-likelihood of the fold left out
    (Tipping & Bishop 1999; cross-validation as in Bishop 2006, ch. 12). Too few
    components leave normal variation to the noise term, too many fit the training
    images' own noise: the best held-out likelihood sits between. Candidates the folds
    cannot fit (k at least a fold's image count) are not tried. Returns the chosen k and
    each tried k's mean held-out log-likelihood; with fewer than ``2 * folds`` images,
    the smallest candidate that they can fit. More than :data:`CHOICE_MAX_IMAGES` images
    are sampled down to that many (seeded).
    """
    if len(pooled) > CHOICE_MAX_IMAGES:
        rng = np.random.default_rng(seed)
        pooled = pooled[np.sort(rng.choice(len(pooled), CHOICE_MAX_IMAGES, replace=False))]
    n = len(pooled)
    if n < 2 * folds:
        return max(1, min(min(choices), n - 1)), {}
    parts = np.array_split(np.random.default_rng(seed).permutation(n), folds)
    smallest_fold_fit = n - max(len(part) for part in parts)
    tried = [k for k in choices if k < min(smallest_fold_fit, pooled.shape[1])]
    if not tried:
        return max(1, min(min(choices), smallest_fold_fit - 1)), {}
    scores = dict.fromkeys(tried, 0.0)
    for part in parts:
        fitted = _ppca_fit(pooled[np.setdiff1d(np.arange(n), part)])
        for k in tried:
            usable = min(k, len(fitted[2]) - 1)
            scores[k] += _ppca_log_likelihood(fitted, usable, pooled[part]) / folds
    return max(scores, key=scores.__getitem__), scores


#: Folds in which the global and image views of the training normals are cross-fitted.
CROSS_FIT_FOLDS = 5
#: Images whose cross-fitted image view is computed at once.
CROSS_FIT_CHUNK = 16


def cross_fitted_views(
    model: FeatureVAE,
    train_images: NDArray[np.float32],
    pooled: NDArray[np.float64],
    locations: Tensor,
    bank_owner: Tensor | None,
    seed: int = 0,
) -> NDArray[np.float64] | None:
    """Views (n, 5) of the training normals, each as if that image were not trained on.

    So that every normal, not only the held-out ones, can set the fusion constants and
    calibrate the threshold. ``knn``: each location's nearest bank vector among those
    taken from *other* images (``bank_owner`` gives each bank row's image). ``global``
    and ``image``: fitted on the other ``CROSS_FIT_FOLDS - 1`` folds. ``local`` and
    ``elbo`` need the VAE retrained without the image: NaN (not fused). None with fewer
    than 4 images (a fold would leave too few to fit on). ``pooled``: each image's mean
    raw feature (:func:`image_means`); ``locations``: the standardized features, channels
    last (n, h, w, c) (:func:`standardize_locations`).
    """
    n = len(train_images)
    if n < 4:
        return None
    views = np.full((n, len(VIEW_NAMES)), np.nan)
    folds = np.array_split(np.random.default_rng(seed).permutation(n), min(CROSS_FIT_FOLDS, n))
    if model.config.image_components:  # pooled once: a fold's fancy index copies the images
        small = pooled_images(train_images, model.config)
    column = {name: VIEW_NAMES.index(name) for name in VIEW_NAMES}
    with torch.no_grad():
        for fold in folds:
            others = np.setdiff1d(np.arange(n), fold)
            mean, precision = fit_global_gaussian(pooled[others])
            centred = torch.from_numpy(pooled[fold]).float() - mean
            views[fold, column["global"]] = ((centred @ precision) * centred).sum(1).numpy()
            if model.config.image_components:
                subspace = fit_pooled_subspace(small[others], model.config)
                # a few images at a time: a fold's copy (and its normalized copy) held a
                # fifth of the set twice over beside the features
                for part in np.array_split(fold, -(-len(fold) // CROSS_FIT_CHUNK)):
                    x = torch.from_numpy(np.ascontiguousarray(train_images[part]))
                    views[part, column["image"]] = model.image_view(x, subspace).numpy()
        if model.config.bank_size and bank_owner is not None:
            for i in range(n):
                others = bank_owner != i  # bank rows from other images
                distances = model.knn_locations(image_locations(locations, i), others)
                views[i, column["knn"]] = float(knn_view(distances, model.config.knn_border)[0])
    return views


#: A full scoring pass over the backbone alone (VAE, upsampling, blur, views): measured
#: about 1.3x at 256 x 256 on 2 CPU cores; rounded up so the budget errs on time.
SCORING_OVER_BACKBONE = 1.5


def train_feature_vae(
    config: FeatureVAEConfig,
    train_images: NDArray[np.float32],
    val_images: NDArray[np.float32],
    epochs: int = 200,
    batch_size: int = 4096,
    vectors_per_epoch: int = 131072,
    learning_rate: float = 1e-3,
    patience: int = 20,
    time_budget_s: float | None = None,
    seed: int = 0,
    progress: bool = True,
    reserve_passes: float = 0.0,
    image_component_choices: tuple[int, ...] | None = None,
) -> FeatureTrainResult:
    """Fit the per-location VAE on the backbone features of normal images.

    The backbone is frozen, so features are computed once; an epoch is
    ``vectors_per_epoch`` locations drawn at random from all training images (or every
    location, when there are fewer), in mini-batches of ``batch_size``. Early stopping
    watches the validation images' mean per-location ELBO; the time budget is checked
    after every mini-batch. ``reserve_passes`` keeps that many scoring passes over the
    validation images inside the budget (the detector's calibration after training),
    timed from the feature extraction here. ``image_component_choices``: the image
    view's component count is chosen among them by held-out likelihood
    (:func:`choose_image_components`) instead of ``config.image_components``.
    """
    started = time.monotonic()
    torch.manual_seed(seed)
    # the bank is chosen from full feature vectors and projected once chosen (bank_dim)
    projected, config = config.bank_dim, dataclasses.replace(config, bank_dim=0)
    if config.normalize_images:  # the contrast floor follows the normals' own contrast
        config = dataclasses.replace(config, min_std=contrast_floor(train_images))
    subspace = None  # pooled once for the choice and the fit, freed before the backbone
    if config.image_components:
        pooled = pooled_images(train_images, config)
        if image_component_choices:
            chosen, _ = choose_image_components(pooled, image_component_choices, seed=seed)
            config = dataclasses.replace(config, image_components=chosen)
        subspace = fit_pooled_subspace(pooled, config)
        del pooled
    model = FeatureVAE(config)
    extract_started = time.monotonic()
    # backbone batches sized from the input, so memory does not grow with it
    step = auto_batch_size(train_images.shape[-2], train_images.shape[-1], 16)
    # channels last, standardized in place below: one copy of the features, not two
    train_locations = extract_locations(model, train_images, step, progress=progress)
    val_locations = extract_locations(model, val_images, step, progress=progress)
    if time_budget_s is not None and reserve_passes > 0:
        per_image = (time.monotonic() - extract_started) / (len(train_images) + len(val_images))
        # a scoring pass adds the VAE, the upsampled map and its blur to the backbone
        time_budget_s -= reserve_passes * len(val_images) * per_image * SCORING_OVER_BACKBONE
    train_raw = train_locations.permute(0, 3, 1, 2)  # (n, c, h, w) views, no copies
    mean, scale = feature_standardization(train_raw)
    model.feature_mean.copy_(mean)
    model.feature_std.copy_(scale)
    pooled = image_means(train_raw)
    global_mean, precision = fit_global_gaussian(pooled)
    model.global_mean.copy_(global_mean)
    model.global_precision.copy_(precision)
    if subspace is not None:
        model.image_mean.copy_(subspace[0])
        model.image_basis.copy_(subspace[1])

    feature_shape = train_raw.shape[-2:]
    del train_raw
    train_x = standardize_locations(model, train_locations)
    val_x = standardize_locations(model, val_locations)
    bank_owner = None
    if config.bank_size:
        chosen = coreset_indices(train_x.flatten(1), config.bank_size, seed)
        bank = train_x.flatten(1)[chosen].clone()
        # each bank row's image: train_x holds each image's locations in turn
        bank_owner = chosen // (feature_shape[0] * feature_shape[1])
        if len(bank) < config.bank_size:  # fewer training locations than the bank holds
            config = dataclasses.replace(config, bank_size=len(bank))
            model.config = config
        model.bank = bank  # replaces the buffer (same name, maybe fewer rows)
        model.project_bank(projected)  # a no-op when ``projected`` is 0
        config = model.config
        if time_budget_s is not None and reserve_passes > 0 and len(val_images):
            first = range(min(8, len(val_images)))
            sample = torch.cat([image_locations(val_locations, i) for i in first])
            knn_started = time.monotonic()
            with torch.no_grad():
                model.knn_distance(sample)
            per_image = (time.monotonic() - knn_started) / len(sample)
            time_budget_s -= reserve_passes * len(val_images) * per_image
    train_views = cross_fitted_views(model, train_images, pooled, train_locations, bank_owner, seed)
    if len(val_x) > 131072:  # a fixed, seeded sample keeps validation cheap
        keep = torch.randperm(len(val_x), generator=torch.Generator().manual_seed(seed))
        val_x = val_x[keep[:131072]]
    del val_locations  # val_x holds the rows kept
    parameters = list(model.encoder.parameters()) + list(model.decoder.parameters())
    optimizer = torch.optim.Adam(parameters, lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    best_val, best_epoch, stale = math.inf, 0, 0
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    history: list[dict[str, float]] = []
    stopped_reason = "max_epochs"
    bar = progress_bar(
        range(1, epochs + 1), desc="training", unit="epoch", disable=not progress, file=sys.stderr
    )
    for epoch in bar:
        model.train()
        order = torch.randperm(len(train_x), generator=generator)[:vectors_per_epoch]
        total, seen, out_of_time = 0.0, 0, False
        for start in range(0, len(order), batch_size):
            batch = train_x[order[start : start + batch_size]]
            loss = location_loss(model.vae(batch), config.beta, config.logvar_min).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
            seen += len(batch)
            if time_budget_s is not None and time.monotonic() - started > time_budget_s:
                out_of_time = True
                break
        model.eval()
        with torch.no_grad():
            val_loss = sum(
                location_loss(model.vae(val_x[i : i + 65536]), 1.0, config.logvar_min).sum().item()
                for i in range(0, len(val_x), 65536)
            ) / max(1, len(val_x))
        history.append({"epoch": epoch, "train_loss": total / max(1, seen), "val_elbo": val_loss})
        bar.set_postfix(val_elbo=f"{val_loss:.3f}")
        if not math.isfinite(best_val) or val_loss < best_val - 1e-3 * max(1.0, abs(best_val)):
            # an improvement counts when it is at least 0.1 %
            best_val, best_epoch, stale = val_loss, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
        if out_of_time:
            stopped_reason = "time_budget"
            break
        if stale >= patience:
            stopped_reason = "early_stopping"
            break
    bar.close()
    model.load_state_dict(best_state)
    return FeatureTrainResult(
        model.eval(),
        history,
        best_epoch,
        stopped_reason,
        time.monotonic() - started,
        train_views,
    )
