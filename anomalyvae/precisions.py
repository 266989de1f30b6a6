"""Precision variants of an exported model, and the export command's job that writes them.

``model.fp16.onnx``: the same graph in float16 (:func:`anomalyvae.export.export_onnx`
with ``precision="fp16"``), checked against torch at :data:`FP16_TOLERANCE`.
``model.int8.onnx``: ONNX Runtime's static quantization (QDQ) of the VAE's convolutions
and linear layers, activation ranges calibrated on normal images; the anomaly map,
smoothing, score and the decoder head stay float32, and the threshold is carried over by
the median int8/float32 score ratio on the same normals (recorded in the metadata).
:func:`export_all` (``anomalyvae export``) writes the float32 model and the variants asked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
from numpy.typing import NDArray

from anomalyvae.detector import VAEAnomalyDetector
from anomalyvae.export import (
    ExportError,
    ExportResult,
    export_onnx,
    set_threshold_default,
    stamp_metadata,
    write_model,
)
from anomalyvae.inference.contract import INPUT_NAME, METADATA_PREFIX
from anomalyvae.models.families import get_family

#: Relative score tolerance of the float16 variant against torch float32.
FP16_TOLERANCE = 2e-2
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
    set_threshold_default(proto, threshold)
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
    metadata = stamp_metadata(proto, metadata)
    onnx.checker.check_model(proto)
    return path, write_model(proto, path, metadata), ratio


def variant_path(path: str | os.PathLike[str], precision: str) -> Path:
    """``model.onnx`` -> ``model.fp16.onnx`` / ``model.int8.onnx``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.{precision}{path.suffix}")


def export_all(
    checkpoint: str | os.PathLike[str],
    output: str | os.PathLike[str],
    images: str | os.PathLike[str] | None = None,
    fp16: bool = False,
    int8: bool = False,
    max_images: int = 64,
) -> list[ExportResult]:
    """Export a checkpoint (and optional fp16/int8 variants), with parity checks.

    ``images`` (folder, MVTec root or split file; its normal training images) feed the
    parity check and int8 calibration; without them a seeded random batch is compared.
    """
    from anomalyvae.data import discover
    from anomalyvae.imaging.batch import read_images

    detector = VAEAnomalyDetector.load(checkpoint, progress=False)
    spec = detector.preprocessing_
    rng = np.random.default_rng(0)
    if images is not None:
        paths = [s.path for s in discover(images, "train") if s.label == 0]
        chosen = sorted(rng.permutation(len(paths))[:max_images])
        batch, _, _ = read_images([paths[i] for i in chosen], spec, on_error="ignore")
    elif int8:
        raise ExportError("--int8 needs --images: normal images to calibrate on")
    else:
        batch = rng.random((8, spec.channels, spec.height, spec.width), dtype=np.float32)
    results = [export_onnx(detector, output, batch)]
    if fp16:
        results.append(
            export_onnx(
                detector,
                variant_path(output, "fp16"),
                batch,
                tolerance=FP16_TOLERANCE,
                precision="fp16",
            )
        )
    if int8:
        path, sidecar, _ = export_int8(output, variant_path(output, "int8"), batch)
        metadata = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        results.append(ExportResult(path, sidecar, metadata, None))
    return results
