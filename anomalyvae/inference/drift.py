"""The drift alarm of every scan: whether a batch still looks like the calibration normals.

Three checks, each against what the model file says about its calibration normals:

- **flagged rate**: with a threshold set for a false-positive rate ``p``, a batch of
  ``n`` normal images flags about ``n * p``. A one-sided test (scipy) says how unlikely
  the observed count is if the line were still normal: beta-binomial when the model
  says how many normals calibrated the threshold (the threshold is drawn from them, so
  the rate a healthy line really flags varies around ``p``: :func:`flagged_p_value`),
  binomial otherwise. Many real defects raise it too: the alarm says "look", not
  "drift" alone.
- **intensity**: each image's mean model-input intensity is compared with the
  calibration normals' own range (their 0.5 and 99.5 percentiles); a test on the share
  outside it, and the batch median's shift in units of the normals' spread, catch
  lighting drift, a changed camera gain or a different modality. The range is itself
  estimated from the normals, so the count outside follows a beta-binomial law, not a
  binomial one (:func:`outside_p_value`): with a few hundred normals, a binomial test
  raised the alarm on healthy batches.
- **contrast**: the same test on each image's standard deviation of model-input
  intensity (its RMS contrast), which a fogged lens, defocus or a flatter exposure lowers
  while the mean stays; models saved before it carry no contrast range and skip it.

numpy and scipy only (the torch-free wing).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray
from scipy.stats import betabinom, binomtest

#: p-value under which a check warns: rare enough that 1 scan in 1,000 of an unchanged
#: line raises a false alarm.
ALARM_P = 1e-3
#: The normals' intensity range is their [0.5, 99.5] percentile band: 1 % outside.
OUTSIDE_EXPECTED = 0.01
#: A median shift of this many normal standard deviations is named even when the
#: binomial test is not yet significant (small batches).
SHIFT_WARN_SD = 1.0
#: ... and a share outside the normals' range must be at least this large to warn.
OUTSIDE_WARN_SHARE = 0.05
MIN_IMAGES = 20


def intensity_summary(
    means: NDArray[np.floating], contrasts: NDArray[np.floating] | None = None
) -> dict[str, Any]:
    """What export stores of the calibration normals' per-image mean intensities.

    ``contrasts`` (their per-image standard deviations) add a ``contrast`` range alike.
    """
    summary: dict[str, Any] = _spread(means)
    if contrasts is not None:
        summary["contrast"] = _spread(contrasts)
    return summary


def _spread(values: NDArray[np.floating]) -> dict[str, Any]:
    values = np.asarray(values, dtype=np.float64)
    return {
        "n_images": int(values.size),
        "median": float(np.median(values)),
        "std": float(np.std(values)),
        "p005": float(np.quantile(values, 0.005)),
        "p995": float(np.quantile(values, 0.995)),
    }


class _RangeCheck(NamedTuple):
    """A batch's values against the normals' [0.5, 99.5] % band: numbers, and whether to warn."""

    numbers: dict[str, Any]
    warn: bool
    below: float
    above: float
    expected: float

    @property
    def lower(self) -> bool:
        """Whether the batch moved down.

        The tail with more images names the direction (a batch can be mixed), or the
        median's shift when none is outside.
        """
        if self.below + self.above:
            return self.below > self.above
        return self.numbers["shift_in_normal_sd"] < 0

    def section(self, lower: str, higher: str) -> dict[str, Any]:
        """The numbers for summary.json, with each tail's share named."""
        return {**self.numbers, f"share_{lower}": self.below, f"share_{higher}": self.above}

    def describe(self, what: str) -> str:
        """The numbers in words: "median WHAT x against y (...), and n % fall outside..."."""
        n = self.numbers
        low, high = n["normal_range"]
        return (
            f"median {what} {n['batch_median']:.3f} against {n['normal_median']:.3f} "
            f"({n['shift_in_normal_sd']:+.1f} normal standard deviations), and "
            f"{self.below + self.above:.0%} fall outside the normals' range "
            f"[{low:.3f}, {high:.3f}] (about {self.expected:.0%} expected"
        )


def outside_p_value(outside: int, n_batch: int, n_normals: int) -> tuple[float, float]:
    """How unlikely ``outside`` of ``n_batch`` new normals beyond the band is, and its mean share.

    The band is the [0.5, 99.5] % percentile band of ``n_normals`` calibration normals:
    at least as wide as the order statistics ``r = ceil(0.005 (n - 1)) + 1`` and ``s =
    floor(0.995 (n - 1)) + 1``. For exchangeable data the share of new images outside
    ``[X(r), X(s)]`` is Beta(n - s + r + 1, s - r) distributed (the coverage of order
    statistics; Wilks 1941), so the count outside a batch is beta-binomial. A binomial
    test with the mean share ignores that the band moves with the normals that drew it.
    Without a usable count of normals (older models): the binomial test at 1 %.
    """
    n = int(n_normals)
    lower = math.ceil(0.005 * (n - 1)) + 1
    upper = math.floor(0.995 * (n - 1)) + 1
    if n < 2 or upper <= lower:
        p = float(binomtest(outside, n_batch, OUTSIDE_EXPECTED, alternative="greater").pvalue)
        return p, OUTSIDE_EXPECTED
    a, b = n - upper + lower + 1, upper - lower
    return _beta_binomial_tail(outside, n_batch, a, b), a / (a + b)


def flagged_p_value(flagged: int, n_batch: int, rate: float, n_normals: int | None) -> float:
    """How unlikely ``flagged`` of ``n_batch`` flags are on a healthy line, one-sided.

    A threshold read off ``n_normals`` calibration normals at rate ``rate`` flags new
    normals at a rate that is itself random: for the order statistic that a conformal
    threshold is, Beta(rate (n + 1), (1 - rate) (n + 1)) (Vovk et al. 2005; the robust
    tail's parametric threshold varies less, so this errs toward quiet). The count of a
    batch is then beta-binomial: for a batch of 100,000 images a binomial test would call
    the spread of the threshold itself a drift. Binomial without ``n_normals``.
    """
    if not n_normals or n_normals < 2 or not 0 < rate < 1:
        return float(binomtest(flagged, n_batch, rate, alternative="greater").pvalue)
    return _beta_binomial_tail(
        flagged, n_batch, rate * (n_normals + 1), (1 - rate) * (n_normals + 1)
    )


def _beta_binomial_tail(count: int, n_batch: int, a: float, b: float) -> float:
    """P(X >= count) for X beta-binomial(n_batch, a, b), clipped to [0, 1]."""
    p = float(betabinom.sf(count - 1, n_batch, a, b)) if count > 0 else 1.0
    return min(max(p, 0.0), 1.0)


def _range_check(values: NDArray[np.floating], normal: dict[str, Any]) -> _RangeCheck:
    """The test on the share outside the normals' band, and the median's shift."""
    low, high = float(normal["p005"]), float(normal["p995"])
    below, above = int((values < low).sum()), int((values > high).sum())
    outside = below + above
    p, expected = outside_p_value(outside, values.size, int(normal.get("n_images", 0)))
    spread = max(float(normal["std"]), 1e-6)
    shift = (float(np.median(values)) - float(normal["median"])) / spread
    share_alarm = p < ALARM_P and outside / values.size >= OUTSIDE_WARN_SHARE
    numbers = {
        "batch_median": float(np.median(values)),
        "normal_median": float(normal["median"]),
        "shift_in_normal_sd": shift,
        "share_outside_normal_range": outside / values.size,
        "normal_range": [low, high],
        "p_value": p,
    }
    warn = share_alarm or abs(shift) >= SHIFT_WARN_SD
    return _RangeCheck(numbers, warn, below / values.size, above / values.size, expected)


def _finite(values: NDArray[np.floating] | None) -> NDArray[np.float64]:
    values = np.asarray([] if values is None else values, dtype=np.float64)
    return values[np.isfinite(values)]


def drift_report(
    is_anomaly: NDArray[np.bool_],
    mean_intensity: NDArray[np.floating],
    target_fpr: float | None,
    normal_intensity: dict[str, Any] | None,
    extra_warnings: list[str] | None = None,
    contrast: NDArray[np.floating] | None = None,
    n_calibration: int | None = None,
) -> dict[str, Any]:
    """The drift section of a scan summary: numbers, and warnings in plain words.

    ``extra_warnings`` (such as colour files into a grey model) are passed through;
    ``contrast``: each image's standard deviation of model-input intensity (checked
    when ``normal_intensity`` has a ``contrast`` range); ``n_calibration``: how many
    normals the threshold was read off (:func:`flagged_p_value`).
    """
    flags = np.asarray(is_anomaly, dtype=bool)
    n = int(flags.size)
    out: dict[str, Any] = {"n_images": n, "warnings": list(extra_warnings or [])}
    if n < MIN_IMAGES:
        out["note"] = f"fewer than {MIN_IMAGES} scored images: no drift check"
        return out
    k = int(flags.sum())
    if target_fpr:
        p = flagged_p_value(k, n, float(target_fpr), n_calibration)
        out["flagged"] = {
            "rate": k / n,
            "expected_rate_if_normal": float(target_fpr),
            "p_value": p,
        }
        if p < ALARM_P:
            out["warnings"].append(
                f"{k / n:.1%} of the images were flagged, where the threshold was set to "
                f"flag {target_fpr:.1%} of normal images (p = {p:.1e}). Either this "
                "batch has many defects, or the line no longer looks like the training "
                "data (lighting, camera, product change): check a sample of the flagged "
                "images before trusting the verdicts, and recalibrate if they are normal."
            )
    check = _band_check(out, "intensity", mean_intensity, normal_intensity, "darker", "brighter")
    if check is not None:
        out["warnings"].append(
            f"Images are {'darker' if check.lower else 'brighter'} than the calibration "
            f"normals: {check.describe('intensity')}; {check.below:.0%} darker, "
            f"{check.above:.0%} brighter). Lighting or acquisition has changed; scores "
            "may rise or fall for reasons other than defects."
        )
    normal_contrast = (normal_intensity or {}).get("contrast")
    check = _band_check(out, "contrast", contrast, normal_contrast, "flatter", "harsher")
    if check is not None:
        out["warnings"].append(
            f"Images have {'less' if check.lower else 'more'} contrast than the "
            f"calibration normals: {check.describe('standard deviation of intensity')}). "
            + (
                "A fogged or dirty lens, defocus, glare or a flatter exposure lowers "
                if check.lower
                else "Harsher lighting, a changed gain or sharper optics raises "
            )
            + "contrast; the image score is built for local defects and sees little of "
            "it: check the camera and lighting before trusting the verdicts."
        )
    return out


def _band_check(
    out: dict[str, Any],
    key: str,
    values: NDArray[np.floating] | None,
    normal: dict[str, Any] | None,
    lower: str,
    higher: str,
) -> _RangeCheck | None:
    """Test ``values`` against the normals' band into ``out[key]``; the check if it warns.

    Skipped (nothing written) without the normals' band or with too few finite values.
    """
    finite = _finite(values)
    if not normal or finite.size < MIN_IMAGES:
        return None
    check = _range_check(finite, normal)
    out[key] = check.section(lower, higher)
    return check if check.warn else None
