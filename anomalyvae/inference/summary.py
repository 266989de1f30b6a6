"""A scan's summary.json: counts, score quantiles, warnings and the drift alarm."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from anomalyvae.inference.contract import promised_fpr
from anomalyvae.inference.drift import drift_report
from anomalyvae.inference.records import file_rows

if TYPE_CHECKING:
    from anomalyvae.inference.scan import ScanConfig


def channel_warnings(ok: pd.DataFrame, metadata: dict[str, Any]) -> list[str]:
    """Plain words when files carry other channels than the model was trained on."""
    model_channels = int((metadata.get("preprocessing") or {}).get("channels", 0) or 0)
    channels = ok["channels"].astype("float64")
    out = []
    colour_into_grey = int((channels == 3).sum()) if model_channels == 1 else 0
    grey_into_colour = int((channels == 1).sum()) if model_channels == 3 else 0
    if colour_into_grey:
        out.append(
            f"{colour_into_grey} colour "
            f"{'image was' if colour_into_grey == 1 else 'images were'} turned into grey "
            "(luma) for this grey model: a defect that changes only the colour, not the "
            "brightness, is invisible to it. Train on colour images if colour matters."
        )
    if grey_into_colour:
        out.append(
            f"{grey_into_colour} grey "
            f"{'image was' if grey_into_colour == 1 else 'images were'} scored by a colour "
            "model (the grey value copied to R, G and B); the model never saw grey parts in "
            "training."
        )
    return out


#: An image's width / height may differ this much from the training images' range before
#: the scan says so (the feature model keeps square inputs square up to the same 1.25).
ASPECT_TOLERANCE = 1.25
#: An image whose short side is below the smallest training image's by this factor is
#: blown up to the model input more than any training image was.
SIZE_TOLERANCE = 2.0


def shape_warnings(ok: pd.DataFrame, metadata: dict[str, Any]) -> list[str]:
    """Plain words when files are shaped or sized unlike every training image.

    Every image is stretched to the model input, so one with another width-to-height
    ratio, or far smaller, looks unlike the normals even without a defect: its score and
    verdict say more about its shape than about the part. Compared with the training
    files' ranges (metadata ``training_data.source_shape``; nothing for older models).
    """
    shape = (metadata.get("training_data") or {}).get("source_shape")
    try:
        low, high = (float(v) for v in shape["aspect"])
        smallest = float(shape["short_side"][0])
    except (TypeError, KeyError, ValueError, IndexError):
        return []
    if not (0 < low <= high and smallest > 0) or not len(ok):
        return []
    width = ok["width"].astype("float64").to_numpy()
    height = ok["height"].astype("float64").to_numpy()
    names = ok["relative_path"].astype(str).to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        aspect = width / height
    off = (aspect < low / ASPECT_TOLERANCE) | (aspect > high * ASPECT_TOLERANCE)
    short = np.fmin(width, height)
    tiny = short < smallest / SIZE_TOLERANCE
    spec = metadata.get("preprocessing") or {}
    model = f"{spec.get('width', '?')} x {spec.get('height', '?')}"
    out = []
    for flags, has, text in (
        (
            off,
            ("image has", "images have"),
            lambda k: (
                f"a width:height unlike every training image's ({low:.2f} to "
                f"{high:.2f}; e.g. {names[k]} at {aspect[k]:.2f}): each is stretched to the "
                f"model's {model} input, which alone raises its score. Crop or pad them to the "
                "training shape, or train on images shaped like them."
            ),
        ),
        (
            tiny,
            ("image is", "images are"),
            lambda k: (
                f"less than half the size of the smallest training image "
                f"({smallest:.0f} px on the short side; e.g. {names[k]} at {short[k]:.0f} px): "
                f"blown up to the model's {model} input they lack the detail the model learned, "
                "so their scores say little. Scan images taken like the training ones."
            ),
        ),
    ):
        if flags.any():
            n = int(flags.sum())
            out.append(f"{n} {has[n != 1]} {text(int(np.flatnonzero(flags)[0]))}")
    return out


def target_fpr_of(metadata: dict[str, Any]) -> float | None:
    """The false-positive rate the model's threshold was set for (normal-only calibration)."""
    # a labelled threshold promises no normal flag rate; few normals promise less
    return promised_fpr((metadata.get("calibration") or {}).get("image"))


def calibration_normals(metadata: dict[str, Any]) -> int | None:
    """How many normals the threshold was read off (None: labelled, unknown or malformed)."""
    image = (metadata.get("calibration") or {}).get("image")
    if not isinstance(image, dict) or image.get("method") != "normal_quantile":
        return None
    try:
        return int(image["n_normal"])
    except (KeyError, TypeError, ValueError):
        return None


def summarize(
    table: pd.DataFrame,
    metadata: dict[str, Any],
    n_scored_now: int,
    seconds: float,
    config: ScanConfig,
) -> dict[str, Any]:
    """Counts, anomaly rate, score quantiles, errors, throughput and the model card.

    Per file: a volume or multi-frame file counts once (its worst slice or frame).
    """
    table = file_rows(table)
    ok = table[table["error"] == ""]
    scores = ok["score"].to_numpy(dtype=float)
    quantiles = (
        {
            f"q{int(q * 100):02d}": float(np.quantile(scores, q))
            for q in (0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
        }
        if len(scores)
        else {}
    )
    return {
        "n_files": int(len(table)),
        "n_scored": int(len(ok)),
        "n_errors": int(len(table) - len(ok)),
        "n_anomalies": int(ok["is_anomaly"].sum()),
        "anomaly_rate": float(ok["is_anomaly"].mean()) if len(ok) else 0.0,
        "score_quantiles": quantiles,
        "errors": table.loc[table["error"] != "", ["relative_path", "error"]]
        .head(1000)
        .to_dict(orient="records"),
        "throughput": {
            "files_this_run": n_scored_now,
            "seconds_this_run": seconds,
            "images_per_second": n_scored_now / seconds if seconds > 0 else 0.0,
        },
        "drift": drift_report(
            ok["is_anomaly"].to_numpy(dtype=bool),
            ok["mean_intensity"].to_numpy(dtype=float),
            target_fpr_of(metadata),
            metadata.get("normal_intensity"),
            channel_warnings(ok, metadata) + shape_warnings(ok, metadata),
            ok["contrast"].to_numpy(dtype=float),
            calibration_normals(metadata),
        ),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        # unsigned: anyone could have edited the threshold and recomputed the hash
        "model_signed": "signature" in metadata,
        "model": metadata,
    }
