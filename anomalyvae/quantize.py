"""The int8 variant of an exported model: the VAE quantized, the rest kept float32.

ONNX Runtime's static quantization (QDQ) of the VAE's convolutions and linear layers,
activation ranges calibrated on normal images; the anomaly map, smoothing, score and the
decoder head stay float32, and the threshold is carried over by the median int8/float32
score ratio on the same normals (recorded in the metadata). ``anomalyvae export --int8``
calls :func:`export_int8` through :func:`anomalyvae.export.export_all`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
from numpy.typing import NDArray

from anomalyvae.export import (
    ExportError,
    _make_threshold_default,
    _stamp,
    _write_model,
)
from anomalyvae.inference.contract import INPUT_NAME, METADATA_PREFIX
from anomalyvae.models.families import get_family

#: Name prefix of the VAE's nodes in the traced graph (ScoringGraph.model).
_VAE_SCOPE = "/scoring/model/"


def _session_scores(path: Path, images: NDArray[np.float32]) -> NDArray[np.float32]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.concatenate(
        [
            session.run(["score"], {INPUT_NAME: images[i : i + 16]})[0]
            for i in range(0, len(images), 16)
        ]
    )


def export_int8(
    fp32_path: str | os.PathLike[str],
    path: str | os.PathLike[str],
    calibration_images: NDArray[np.float32],
) -> tuple[Path, Path, float]:
    """Quantize the VAE's convolutions and linear layers to int8 (ONNX Runtime, static QDQ).

    Activation ranges are calibrated on ``calibration_images`` (normal, model-ready).
    The map, smoothing, score and the decoder head stay float32. Quantization noise
    raises every reconstruction error a little, so the threshold is carried over by the
    median ratio of int8 to float32 scores on the same normal images; the ratio is
    recorded in the metadata. Returns (model path, sidecar path, ratio).
    """
    import tempfile

    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class _Reader(CalibrationDataReader):
        def __init__(self, images: NDArray[np.float32]) -> None:
            self._batches = iter(
                [{INPUT_NAME: images[i : i + 8]} for i in range(0, len(images), 8)]
            )

        def get_next(self) -> dict[str, NDArray[np.float32]] | None:
            return next(self._batches, None)

    if len(calibration_images) < 2:
        raise ExportError("int8 export needs at least 2 normal calibration images")
    family = {p.key: p.value for p in onnx.load(str(fp32_path)).metadata_props}.get(
        METADATA_PREFIX + "model_family", "pixel"
    )
    if "int8" not in get_family(family).export_precisions:
        raise ExportError(f"int8 export is not implemented for the {family} model")
    fp32_path, path = Path(fp32_path), Path(path)
    with tempfile.TemporaryDirectory() as tmpdir:
        prepared = Path(tmpdir) / "prepared.onnx"
        quantized = Path(tmpdir) / "quantized.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        # Quantize the VAE only: an anomaly lies, by definition, outside the calibration
        # images' activation ranges, so the map and score must keep float range. The
        # decoder head stays float too: the NLL divides squared errors by variances as
        # small as e^-7, which magnifies an 8-bit step of the mean a thousandfold.
        keep_float = [
            n.name
            for n in onnx.load(str(prepared)).graph.node
            if not n.name.startswith(_VAE_SCOPE) or n.name.startswith(_VAE_SCOPE + "head")
        ]
        quantize_static(
            str(prepared),
            str(quantized),
            _Reader(calibration_images),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["Conv", "ConvTranspose", "Gemm", "MatMul"],
            nodes_to_exclude=keep_float,
        )
        proto = onnx.load(str(quantized))
        ratio = float(
            np.median(
                _session_scores(quantized, calibration_images)
                / np.maximum(_session_scores(fp32_path, calibration_images), 1e-12)
            )
        )
    metadata = {p.key: p.value for p in proto.metadata_props}
    threshold = float(metadata[METADATA_PREFIX + "threshold"]) * ratio
    _make_threshold_default(proto, threshold)
    metadata.update(
        {
            METADATA_PREFIX + "precision": "int8",
            METADATA_PREFIX + "threshold": repr(threshold),
            METADATA_PREFIX + "threshold_adjustment": json.dumps(
                {
                    "method": "float32 threshold times the median int8/float32 score ratio",
                    "ratio": ratio,
                    "n_images": int(len(calibration_images)),
                }
            ),
        }
    )
    metadata = _stamp(proto, metadata)
    onnx.checker.check_model(proto)
    return path, _write_model(proto, path, metadata), ratio
