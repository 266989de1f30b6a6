"""The ONNX contract in one place: names, metadata keys, format version, content hash.

``anomalyvae.export`` writes files by these rules and :mod:`anomalyvae.inference.runtime`
reads them back; docs/onnx-contract.md describes them for integrators. numpy/onnx only.
"""

from __future__ import annotations

import hashlib

import onnx

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


def content_hash(model: onnx.ModelProto) -> str:
    """SHA-256 of the graph and every metadata entry except the hash itself.

    It catches accidental edits and truncation, not tampering: anyone can recompute it.
    """
    digest = hashlib.sha256(model.graph.SerializeToString(deterministic=True))
    for prop in sorted(model.metadata_props, key=lambda p: p.key):
        if prop.key != CONTENT_HASH_KEY:
            digest.update(f"{prop.key}={prop.value}\n".encode())
    return digest.hexdigest()
