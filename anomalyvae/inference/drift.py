"""The drift alarm of every scan: whether a batch still looks like the calibration normals.

Two checks, both against what the model file says about its calibration normals:

- **flagged rate**: with a threshold set for a false-positive rate ``p``, a batch of
  ``n`` normal images flags about ``n * p``. A one-sided binomial test (scipy) says how
  unlikely the observed count is if the line were still normal. Many real defects
  raise it too: the alarm says "look", not "drift" alone.
- **intensity**: each image's mean model-input intensity is compared with the
  calibration normals' own range (their 0.5 and 99.5 percentiles); a binomial test on
  the share outside it, and the batch median's shift in units of the normals' spread,
  catch lighting drift, a changed camera gain or a different modality.

numpy and scipy only (the torch-free wing).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.stats import binomtest

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


def intensity_summary(means: NDArray[np.floating]) -> dict[str, float]:
    """What export stores of the calibration normals' per-image mean intensities."""
    means = np.asarray(means, dtype=np.float64)
    return {
        "n_images": int(means.size),
        "median": float(np.median(means)),
        "std": float(np.std(means)),
        "p005": float(np.quantile(means, 0.005)),
        "p995": float(np.quantile(means, 0.995)),
    }


def drift_report(
    is_anomaly: NDArray[np.bool_],
    mean_intensity: NDArray[np.floating],
    target_fpr: float | None,
    normal_intensity: dict[str, Any] | None,
    extra_warnings: list[str] | None = None,
) -> dict[str, Any]:
    """The drift section of a scan summary: numbers, and warnings in plain words.

    ``extra_warnings`` (such as colour files into a grey model) are passed through.
    """
    flags = np.asarray(is_anomaly, dtype=bool)
    n = int(flags.size)
    out: dict[str, Any] = {"n_images": n, "warnings": list(extra_warnings or [])}
    if n < MIN_IMAGES:
        out["note"] = f"fewer than {MIN_IMAGES} scored images: no drift check"
        return out
    k = int(flags.sum())
    if target_fpr:
        p = float(binomtest(k, n, target_fpr, alternative="greater").pvalue)
        out["flagged"] = {
            "rate": k / n,
            "expected_rate_if_normal": float(target_fpr),
            "p_value": p,
        }
        if p < ALARM_P:
            out["warnings"].append(
                f"{k / n:.1%} of the images were flagged, where the threshold was set to "
                f"flag {target_fpr:.1%} of normal images (binomial p = {p:.1e}). Either this "
                "batch has many defects, or the line no longer looks like the training "
                "data (lighting, camera, product change): check a sample of the flagged "
                "images before trusting the verdicts, and recalibrate if they are normal."
            )
    means = np.asarray(mean_intensity, dtype=np.float64)
    means = means[np.isfinite(means)]
    if normal_intensity and means.size >= MIN_IMAGES:
        low, high = normal_intensity["p005"], normal_intensity["p995"]
        below, above = int((means < low).sum()), int((means > high).sum())
        outside = below + above
        # a band estimated from n normals holds back about 2/(n+1) of new normals
        expected = max(OUTSIDE_EXPECTED, 2.0 / (int(normal_intensity.get("n_images", 0)) + 1))
        p = float(binomtest(outside, means.size, expected, alternative="greater").pvalue)
        spread = max(float(normal_intensity["std"]), 1e-6)
        shift = (float(np.median(means)) - float(normal_intensity["median"])) / spread
        out["intensity"] = {
            "batch_median": float(np.median(means)),
            "normal_median": float(normal_intensity["median"]),
            "shift_in_normal_sd": shift,
            "share_outside_normal_range": outside / means.size,
            "share_darker": below / means.size,
            "share_brighter": above / means.size,
            "normal_range": [low, high],
            "p_value": p,
        }
        share_alarm = p < ALARM_P and outside / means.size >= OUTSIDE_WARN_SHARE
        if share_alarm or abs(shift) >= SHIFT_WARN_SD:
            # the tail with more images names the direction (a batch can be mixed)
            direction = "darker" if (below > above if outside else shift < 0) else "brighter"
            out["warnings"].append(
                f"Images are {direction} than the calibration normals: median "
                f"intensity {np.median(means):.3f} against {normal_intensity['median']:.3f} "
                f"({shift:+.1f} normal standard deviations), and "
                f"{outside / means.size:.0%} fall outside the normals' range "
                f"[{low:.3f}, {high:.3f}] (about {expected:.0%} expected; "
                f"{below / means.size:.0%} darker, {above / means.size:.0%} brighter). "
                "Lighting or "
                "acquisition has changed; scores may rise or fall for reasons other than defects."
            )
    return out
