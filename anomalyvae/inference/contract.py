"""The ONNX contract in one place: names, metadata keys, format version, content hash.

``anomalyvae.export`` writes files by these rules and :mod:`anomalyvae.inference.runtime`
reads them back; docs/onnx-contract.md describes them for integrators. numpy/onnx only.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the contract's readers need not load onnx (1 s of evaluate's start)
    import onnx

from anomalyvae.errors import AnomalyVAEError, InvalidValueError

#: Prefix of every ``metadata_props`` key the product writes.
METADATA_PREFIX = "anomalyvae."
FORMAT_NAME = "anomalyvae-onnx"
SUPPORTED_FORMAT_VERSIONS = ("1",)
FORMAT_VERSION = SUPPORTED_FORMAT_VERSIONS[-1]
#: ONNX opset every export is pinned to.
OPSET = 17
INPUT_NAME = "image"
THRESHOLD_NAME = "threshold"
OUTPUT_NAMES = ("anomaly_map", "score", "normalized_score", "is_anomaly")
OUTPUTS_DOC = {
    "anomaly_map": "float32 (N, 1, H, W): per-pixel anomaly, higher = more anomalous, "
    "smoothed, at model input resolution; with scoring.standardize, in standard "
    "deviations above the training normals at that pixel (floored at 0)",
    "score": "float32 (N,): image anomaly score, higher = more anomalous",
    "normalized_score": "float32 (N,): score / threshold; above 1.0 = anomalous",
    "is_anomaly": "bool (N,): score > threshold",
}
CONTENT_HASH_KEY = METADATA_PREFIX + "content_hash"
SIGNATURE_KEY = METADATA_PREFIX + "signature"
#: Where a signing key comes from: the key itself, or a file holding it.
KEY_ENV, KEY_FILE_ENV = "ANOMALYVAE_SIGNING_KEY", "ANOMALYVAE_SIGNING_KEY_FILE"


class SigningKeyError(AnomalyVAEError, ValueError):
    """A signing key was configured but cannot be read."""


def content_hash(model: onnx.ModelProto) -> str:
    """SHA-256 of the graph and every metadata entry except the hash and the signature.

    It catches accidental edits and truncation, not tampering: anyone can recompute it.
    Against tampering, sign the file (:func:`signature`).
    """
    digest = hashlib.sha256(model.graph.SerializeToString(deterministic=True))
    for prop in sorted(model.metadata_props, key=lambda p: p.key):
        if prop.key not in (CONTENT_HASH_KEY, SIGNATURE_KEY):
            digest.update(f"{prop.key}={prop.value}\n".encode())
    return digest.hexdigest()


def signing_key(key: bytes | str | os.PathLike[str] | None = None) -> bytes | None:
    """The configured signing key, or None when none is configured.

    ``key`` (bytes, or a path to a key file) first, else the ``ANOMALYVAE_SIGNING_KEY``
    environment variable, else the file named by ``ANOMALYVAE_SIGNING_KEY_FILE``.
    """
    if isinstance(key, bytes):
        return key
    if key is not None:
        return _read_key_file(Path(key))
    if os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV].encode()
    if os.environ.get(KEY_FILE_ENV):
        return _read_key_file(Path(os.environ[KEY_FILE_ENV]))
    return None


def _read_key_file(path: Path) -> bytes:
    try:
        key = path.read_bytes().strip()
    except OSError as error:
        raise SigningKeyError(f"cannot read the signing key file '{path}': {error}") from error
    if len(key) < 16:
        raise SigningKeyError(f"the signing key in '{path}' is shorter than 16 bytes")
    return key


def signature(digest: str, key: bytes) -> str:
    """HMAC-SHA256 of a content hash under ``key`` (RFC 2104): only key holders can make it."""
    return hmac.new(key, digest.encode(), hashlib.sha256).hexdigest()


def signature_matches(digest: str, stored: str | None, key: bytes) -> bool:
    """Whether ``stored`` is the signature of ``digest`` under ``key`` (constant time)."""
    return stored is not None and hmac.compare_digest(signature(digest, key), stored)


def check_threshold(value: float | None) -> float | None:
    """An override of the calibrated threshold, or a clear error (None: keep the model's).

    The one check for the CLI's ``--threshold``, ``ScanConfig`` and
    :class:`~anomalyvae.inference.runtime.OnnxDetector`: a threshold must be a positive
    finite number, since 0 or less flags every image, and NaN or infinity none.
    """
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidValueError(f"threshold must be a number, got {value!r}") from None
    if not (math.isfinite(number) and number > 0):
        raise InvalidValueError(
            f"threshold must be a positive finite number, got {value}: 0 or less flags "
            "every image, and NaN or infinity none (leave it out to use the model's "
            "calibrated threshold)"
        )
    return number


def describe_fusion(fusion: Any) -> str:
    """One sentence on how the image score weighs the views (metadata ``fusion``).

    Empty when there is nothing to say or the entry is malformed (a hand-edited file):
    ``train``'s summary and the QA report both print it.
    """
    if not isinstance(fusion, dict) or not isinstance(fusion.get("weights"), dict):
        return ""
    try:
        weights = {str(k): float(v) for k, v in fusion["weights"].items()}
    except (TypeError, ValueError):
        return ""
    if fusion.get("combine") == "max":
        how = f"the largest of the z-scores of {', '.join(weights)}"
    else:
        how = "z-scores weighted " + ", ".join(f"{k} {v:.2f}" for k, v in weights.items())
    excess = excess_phrase(fusion.get("local_excess"))
    sentence = f"Image score: {how}{excess} (fusion {fusion.get('rule', 'unknown')}"
    share = fusion.get("image_unexplained")
    if isinstance(share, (int, float)):
        components = fusion.get("image_components")
        subspace = (
            f"their {components}-component subspace"
            if isinstance(components, int) and not isinstance(components, bool)
            else "their subspace"
        )
        sentence += (
            f"; {share:.0%} of the normals' pixel variance is off {subspace}, which sets "
            "the image view's weight"
        )
    return sentence + ")."


def excess_phrase(excess: Any) -> str:
    """The phrase on a fusion's ``local_excess`` (", plus W x the excess over Z of ...").

    Empty when absent or malformed.
    """
    if not isinstance(excess, dict) or not isinstance(excess.get("views"), list):
        return ""
    try:
        weight, above = float(excess["weight"]), float(excess["above_z"])
    except (KeyError, TypeError, ValueError):
        return ""
    views = " and ".join(str(v) for v in excess["views"])
    plural = "s" if len(excess["views"]) > 1 else ""
    return f", plus {weight:g} x the excess over {above:g} of the {views} z-score{plural}"


def promised_fpr(image: Any) -> float | None:
    """The false-positive rate a normal-only threshold promises (calibration ``image``).

    The target, unless the normals were too few for it: n normals promise no less than
    ``1 / (n + 1)``, and when the robust tail kept one outlying normal from setting the
    threshold (``tail`` "robust" with fewer than ``2 / target - 1`` normals), the
    second-largest normal's ``2 / (n + 1)``. None for a labelled threshold or a malformed
    entry. ``train``'s summary, the QA report and the scan's drift alarm all use it.
    """
    if not isinstance(image, dict) or image.get("method") != "normal_quantile":
        return None
    try:
        target, n = float(image["target_fpr"]), int(image["n_normal"])
    except (KeyError, TypeError, ValueError):
        return None
    if not 0 < target < 1 or n < 1:
        return None
    floor = 1.0 / (n + 1)
    if image.get("tail") == "robust" and (n + 1) * target < 2:
        floor = 2.0 / (n + 1)
    return max(target, floor)
