"""Decision thresholds for image scores and anomaly maps (numpy + scikit-learn only).

Scores follow the product convention: higher = more anomalous; a score above the
threshold is an anomaly. The normalized score ``score / threshold`` puts the decision
boundary at 1.0 for every model.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.metrics import precision_recall_curve, roc_curve

from anomalyvae.errors import InvalidValueError

CALIBRATION_METHODS: tuple[str, ...] = ("normal_quantile", "f1", "youden")
#: How the normal quantile treats its top: "conformal" (the order statistic, even when
#: that is the largest normal), "robust" (when the conformal rank is the largest
#: normal, the larger of the second largest and a Gaussian tail fitted to the median
#: and MAD, capped at the largest: one outlying normal cannot set the threshold), or
#: "auto" (the default: "robust" when the normals are too few to promise the target
#: at all, "conformal" when they can).
TAILS: tuple[str, ...] = ("auto", "conformal", "robust")
DEFAULT_TAIL = "auto"


@dataclass(frozen=True)
class Threshold:
    """A calibrated threshold and how it was obtained.

    Attributes
    ----------
    value : float
        Scores strictly above ``value`` are anomalous.
    method : str
        "normal_quantile", "f1" or "youden".
    target_fpr : float or None
        The false-positive rate asked for ("normal_quantile" only).
    expected_fpr : float
        Share of the calibration normals above ``value``.
    expected_tpr : float or None
        Share of the calibration anomalies above ``value`` (labelled methods only).
    n_normal, n_anomalous : int
        Size of the calibration set.
    min_achievable_fpr : float or None
        ``1 / (n_normal + 1)``: the smallest false-positive rate that n normals can
        promise ("normal_quantile" only; None in older models).
    tail : str or None
        The tail rule applied, "conformal" or "robust" ("auto" is stored as the one it
        chose; "normal_quantile" only; None in older models, which used "conformal").
    """

    value: float
    method: str
    target_fpr: float | None
    expected_fpr: float
    expected_tpr: float | None
    n_normal: int
    n_anomalous: int
    min_achievable_fpr: float | None = None
    tail: str | None = None

    def describe(self) -> str:
        """One line for people: the value, how it was chosen and on how many images."""
        return (
            f"Threshold {self.value:.6g} ({self.method}; {self.n_normal} normal, "
            f"{self.n_anomalous} anomalous images; FPR on them {self.expected_fpr:.3f})"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Threshold:
        return cls(**data)


def _check_scores(scores: ArrayLike, name: str = "scores") -> NDArray[np.float64]:
    array = np.asarray(scores, dtype=np.float64).ravel()
    if array.size == 0:
        raise InvalidValueError(f"{name} is empty; calibration needs at least one score")
    if not np.isfinite(array).all():
        raise InvalidValueError(f"{name} contains NaN or infinite values")
    return array


def threshold_from_normals(
    scores: ArrayLike, target_fpr: float = 0.01, tail: str = DEFAULT_TAIL
) -> Threshold:
    """Conformal threshold from held-out normal scores for a target false-positive rate.

    The threshold is the ``ceil((n + 1) * (1 - target_fpr))``-th smallest of the n
    normal scores: for a new normal image exchangeable with them, the chance of scoring
    above it is at most ``target_fpr`` (split-conformal prediction; Vovk et al. 2005,
    Angelopoulos & Bates 2021). With n normals the smallest false-positive rate that
    can be promised is ``1 / (n + 1)``: when ``target_fpr`` is finer than that, the
    largest normal score is used, ``min_achievable_fpr`` says what is really promised,
    and a warning says how many normals the target needs.

    ``tail="robust"``: when the conformal rank falls on the largest normal (fewer than
    about ``2 / target_fpr`` normals), the threshold is the larger of the second largest
    normal and ``median + z(1 - target_fpr) * 1.4826 * MAD`` (a Gaussian tail fitted
    robustly), capped at the largest. One normal far out (a mislabelled image, a
    heavy-tailed score) then cannot set the threshold, and moving it further out does
    not move the threshold at all; the price is that the promise is the second-largest
    order statistic's, about ``2 / (n + 1)`` (``expected_fpr`` says what the normals saw).

    ``tail="auto"`` (the default): "robust" when ``target_fpr`` is finer than the
    ``1 / (n + 1)`` that n normals can promise at all (fewer than ``1 / target_fpr - 1``
    normals, 99 at 1 %), "conformal" otherwise. Where the target can be promised the
    conformal order statistic keeps that promise, even when it is the largest normal;
    where it cannot, no order statistic keeps it, and the threshold should not hang on
    the single most extreme normal.
    """
    if not 0 < target_fpr < 1:
        raise InvalidValueError(f"target_fpr must be in (0, 1), got {target_fpr}")
    if tail not in TAILS:
        raise InvalidValueError(f"tail must be one of {TAILS}, got {tail!r}")
    normal = np.sort(_check_scores(scores, "normal scores"))
    n = normal.size
    rank = int(np.ceil((n + 1) * (1.0 - target_fpr)))  # 1-based order statistic
    if tail == "auto":
        tail = "robust" if rank > n else "conformal"
    if rank > n:
        using = (
            "Using the larger of the second-largest normal score and a robust Gaussian tail"
            if tail == "robust"
            else "Using the largest normal score"
        )
        warnings.warn(
            f"{n} calibration normals cannot promise a false-positive rate of "
            f"{target_fpr:g}: the smallest they can is 1/(n+1) = {1 / (n + 1):.3g}, and "
            f"{target_fpr:g} needs at least {int(np.ceil(1 / target_fpr)) - 1} normals. "
            f"{using}; calibrate on more normal images.",
            UserWarning,
            stacklevel=2,
        )
        rank = n
    value = float(normal[rank - 1])
    if tail == "robust" and rank == n and n >= 3:
        from scipy.stats import norm

        center = float(np.median(normal))
        spread = 1.4826 * float(np.median(np.abs(normal - center)))
        gaussian = center + float(norm.ppf(1.0 - target_fpr)) * spread
        value = min(float(normal[-1]), max(float(normal[-2]), gaussian))
    return Threshold(
        value,
        "normal_quantile",
        target_fpr,
        float(np.mean(normal > value)),
        None,
        int(n),
        0,
        1.0 / (n + 1),
        tail,
    )


def threshold_from_labels(scores: ArrayLike, labels: ArrayLike, method: str = "f1") -> Threshold:
    """Threshold from a labelled set (1 = anomalous): F1-max or Youden's J = TPR - FPR.

    F1 uses ``sklearn.metrics.precision_recall_curve`` and Youden ``roc_curve``. The
    threshold is placed halfway between the chosen score and the next lower one, so
    that "score > threshold" reproduces the curve's "score >= cut" decision.
    """
    values = _check_scores(scores)
    y = np.asarray(labels).ravel().astype(int)
    if y.shape != values.shape:
        raise InvalidValueError(f"scores and labels differ in length: {values.size} vs {y.size}")
    if set(np.unique(y)) != {0, 1}:
        raise InvalidValueError("labels must contain both 0 (normal) and 1 (anomalous)")
    if method == "f1":
        precision, recall, cuts = precision_recall_curve(y, values)
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        cut = float(cuts[int(np.argmax(f1))])
    elif method == "youden":
        fpr, tpr, cuts = roc_curve(y, values)
        cut = float(cuts[int(np.argmax(tpr - fpr))])
    else:
        raise InvalidValueError(f"method must be 'f1' or 'youden', got {method!r}")
    below = values[values < cut]
    value = 0.5 * (cut + float(below.max())) if below.size else float(np.nextafter(cut, -np.inf))
    return Threshold(
        value,
        method,
        None,
        float(np.mean(values[y == 0] > value)),
        float(np.mean(values[y == 1] > value)),
        int((y == 0).sum()),
        int((y == 1).sum()),
    )


#: Normal-map pixels the pixel threshold is read from, at most (a uniform random sample).
MAX_PIXELS = 2_000_000


def pixel_threshold_from_normals(
    maps: ArrayLike, target_fpr: float = 0.001, max_pixels: int = MAX_PIXELS, seed: int = 0
) -> Threshold:
    """Pixel threshold: the (1 - target_fpr) quantile of all pixels of normal maps.

    Maps of any shape are flattened; beyond ``max_pixels`` a seeded random subset is
    used, which changes the quantile by far less than its sampling error.
    """
    values = _subsample(np.asarray(maps, dtype=np.float32).ravel(), max_pixels, seed)
    return threshold_from_normals(values, target_fpr)


def pixel_threshold_from_labels(
    maps: ArrayLike,
    masks: ArrayLike,
    method: str = "f1",
    max_pixels: int = 2_000_000,
    seed: int = 0,
) -> Threshold:
    """Pixel threshold from maps and their boolean defect masks (same shape)."""
    values = np.asarray(maps, dtype=np.float32).ravel()
    truth = np.asarray(masks, dtype=bool).ravel()
    if values.shape != truth.shape:
        raise InvalidValueError(f"maps and masks differ in size: {values.size} vs {truth.size}")
    if values.size > max_pixels:
        index = np.random.default_rng(seed).choice(values.size, max_pixels, replace=False)
        values, truth = values[index], truth[index]
    return threshold_from_labels(values, truth.astype(int), method)


class Calibration(NamedTuple):
    """What :func:`calibrate` decides: both thresholds and the normal scores behind one."""

    image: Threshold
    pixel: Threshold
    #: the normal scores the image threshold was read from, sorted; None when labelled
    normal_scores: NDArray[np.float64] | None


def calibrate(
    scores: ArrayLike,
    maps: ArrayLike,
    labels: ArrayLike | None = None,
    masks: ArrayLike | None = None,
    method: str = "normal_quantile",
    target_fpr: float = 0.01,
    pixel_target_fpr: float = 0.005,
    extra_normal_scores: ArrayLike | None = None,
    tail: str = DEFAULT_TAIL,
) -> Calibration:
    """The image and pixel thresholds of scored calibration images.

    ``scores`` (n,) and ``maps`` (n, ...) of the images; ``labels`` (n,), 1 = anomalous,
    None = all normal. "normal_quantile" reads the image threshold off the normal scores
    (with ``extra_normal_scores``, normals scored elsewhere; non-finite ones dropped) at
    ``target_fpr``, its top read by ``tail`` (:func:`threshold_from_normals`); "f1" and
    "youden" need both classes. The pixel threshold comes from
    ``masks`` (n, ...) with a labelled method, else from the normal maps' pixels.
    """
    if method not in CALIBRATION_METHODS:
        raise InvalidValueError(f"method must be one of {CALIBRATION_METHODS}, got {method!r}")
    scores = np.asarray(scores, dtype=np.float64)
    maps = np.asarray(maps)
    labels = np.zeros(len(scores), dtype=int) if labels is None else np.asarray(labels).astype(int)
    if labels.shape != scores.shape:
        raise InvalidValueError(f"y has {labels.size} labels for {scores.size} images")
    normal = labels == 0
    kept: NDArray[np.float64] | None = None
    if method == "normal_quantile":
        if not normal.any():
            raise InvalidValueError("calibration needs normal images (label 0)")
        kept = scores[normal]
        if extra_normal_scores is not None:
            extra = np.asarray(extra_normal_scores, dtype=np.float64).ravel()
            kept = np.concatenate([kept, extra[np.isfinite(extra)]])
        image = threshold_from_normals(kept, target_fpr, tail)
        kept = np.sort(kept)
    else:
        image = threshold_from_labels(scores, labels, method)
    if masks is not None and method != "normal_quantile":
        pixel = pixel_threshold_from_labels(maps, masks, method)
    else:
        pixel = pixel_threshold_from_normals(maps[normal], pixel_target_fpr)
    return Calibration(image, pixel, kept)


class MapPixelSample:
    """A uniform sample of the pixels of maps seen a chunk at a time, in bounded memory.

    For a pixel threshold from normals (:func:`pixel_threshold_from_normals`) on a set
    scored a chunk at a time: each map keeps the same number of its pixels, drawn without
    replacement, about ``max_pixels`` in all for ``expected_maps`` maps. When more maps
    come (a volume's slices, a multi-frame file's frames), every map's share is halved
    whenever the sample grows past twice ``max_pixels``, so memory stays bounded and every
    pixel seen had the same chance to be kept. Maps that hold ``max_pixels`` or fewer in
    all keep every pixel, so their threshold is exactly the one the whole maps give.
    """

    def __init__(self, expected_maps: int, max_pixels: int = MAX_PIXELS, seed: int = 0):
        self.max_pixels = max_pixels
        self.per_map = -(-max_pixels // max(1, expected_maps))
        self.rng = np.random.default_rng(seed)
        self.rows: list[NDArray[np.float32]] = []

    def _cut(self, flat: NDArray[np.float32], keep: int) -> NDArray[np.float32]:
        if flat.shape[1] <= keep:
            return flat
        picks = np.stack([self.rng.choice(flat.shape[1], keep, replace=False) for _ in flat])
        return np.take_along_axis(flat, picks, axis=1)

    def add(self, maps: ArrayLike) -> None:
        """Sample the pixels of ``maps`` (n, ...), one row per map."""
        maps = np.asarray(maps, dtype=np.float32)
        self.rows.append(self._cut(maps.reshape(len(maps), -1), self.per_map))
        while sum(r.size for r in self.rows) > 2 * self.max_pixels and self.per_map > 1:
            self.per_map = -(-self.per_map // 2)
            self.rows = [self._cut(r, self.per_map) for r in self.rows]

    def pixels(self) -> NDArray[np.float32]:
        """The sample so far, (n, k): one row per map added."""
        if not self.rows:
            return np.zeros((0, 0), np.float32)
        width = min(r.shape[1] for r in self.rows)  # every row is cut to the same share
        return np.concatenate([self._cut(r, width) for r in self.rows])


def _subsample(values: NDArray[np.float32], max_pixels: int, seed: int) -> NDArray[np.float32]:
    if values.size <= max_pixels:
        return values
    return values[np.random.default_rng(seed).choice(values.size, max_pixels, replace=False)]


def normalize(scores: ArrayLike, threshold: float) -> NDArray[np.float64]:
    """Normalized score = raw score / threshold; 1.0 is the decision boundary.

    Requires a positive threshold, which every score kind of this product gives
    except a negative ELBO below zero nats (then subtract a reference first).
    """
    if threshold <= 0:
        raise InvalidValueError(f"threshold must be > 0 to normalize scores, got {threshold}")
    return np.asarray(scores, dtype=np.float64) / threshold
