"""``OnnxDetector``: torch-free inference from an exported model.onnx.

Imports numpy, onnx, onnxruntime and the torch-free :mod:`anomalyvae.imaging` only, so an
inspection line needs no PyTorch (a test checks that ``torch`` stays out of ``sys.modules``).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray

from anomalyvae.errors import AnomalyVAEError, InvalidValueError
from anomalyvae.imaging.files import display_path
from anomalyvae.imaging.io import ImageReadError
from anomalyvae.imaging.preprocessing import Preprocessing, load_image
from anomalyvae.imaging.tiles import auto_batch_size
from anomalyvae.inference.contract import (
    CONTENT_HASH_KEY,
    FORMAT_NAME,
    INPUT_NAME,
    KEY_ENV,
    KEY_FILE_ENV,
    METADATA_PREFIX,
    OUTPUT_NAMES,
    SIGNATURE_KEY,
    SUPPORTED_FORMAT_VERSIONS,
    THRESHOLD_NAME,
    check_threshold,
    content_hash,
    signature_matches,
    signing_key,
)

#: Files ``predict_rows`` reads and scores at a time (memory flat in the file count).
PREDICT_BLOCK = 64


def format_prediction(row: dict[str, Any]) -> str:
    """One ``predict_rows`` row as the tab-separated line ``anomalyvae predict`` prints.

    path, score, normalized score and verdict ("ANOMALY" or "ok"), or the path and the
    file's error.
    """
    if row["error"]:
        return f"{row['path']}\t\t\tERROR: {row['error']}"
    verdict = "ANOMALY" if row["is_anomaly"] else "ok"
    return f"{row['path']}\t{row['score']:.6g}\t{row['normalized_score']:.4f}\t{verdict}"


def json_line(row: dict[str, Any]) -> str:
    """One ``predict_rows`` row as strict JSON.

    A score that does not exist (an unreadable file) is null, not NaN, which the JSON
    parsers of C#, JavaScript and Go refuse.
    """
    clean = {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()
    }
    return json.dumps(clean, allow_nan=False)


def session_options(
    intra_op_threads: int | None = None, inter_op_threads: int | None = None
) -> ort.SessionOptions:
    """The ONNX Runtime session settings of every scan and ``predict`` (docs/onnx-contract.md).

    - all graph optimizations (fusions, constant folding), sequential execution: the
      graph is one chain, so a parallel executor only adds threads;
    - intra-op threads: ``intra_op_threads``, else ONNX Runtime's default (one per
      physical core); inter-op: ``inter_op_threads``, else its default;
    - the CPU memory arena and memory pattern on: a scan runs one batch shape again and
      again, so buffers planned once are reused (memory stays flat, bounded by the
      batch: ``auto_batch_size``);
    - intra-op threads do not spin between batches (``session.intra_op.allow_spinning``
      0): a scan decodes files on the same cores meanwhile, and a spinning pool takes
      their time.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    if inter_op_threads:
        options.inter_op_num_threads = inter_op_threads
    options.enable_cpu_mem_arena = True
    options.enable_mem_pattern = True
    options.add_session_config_entry("session.intra_op.allow_spinning", SPINNING)
    return options


#: ``session.intra_op.allow_spinning`` of :func:`session_options` (reports/scan measures it).
SPINNING = "0"


class OnnxModelError(AnomalyVAEError, ValueError):
    """The file is not an anomalyvae ONNX model, or it was altered after export."""


class OnnxInputError(AnomalyVAEError, ValueError):
    """An input batch does not match what the model expects."""


class OnnxResult(NamedTuple):
    """Outputs for a batch: map (n, 1, h, w), score, normalized_score, is_anomaly (n,)."""

    anomaly_map: NDArray[np.float32]
    score: NDArray[np.float32]
    normalized_score: NDArray[np.float32]
    is_anomaly: NDArray[np.bool_]
    #: (n,) mean of each model input, filled in by the scan (None from ``predict_*``)
    mean_intensity: NDArray[np.float32] | None = None
    #: (n,) standard deviation of each model input (its RMS contrast), as ``mean_intensity``
    contrast: NDArray[np.float32] | None = None


def read_metadata(path: str | os.PathLike[str], verify: bool = True) -> dict[str, Any]:
    """Read and check an exported model's metadata (keys without the prefix; JSON decoded).

    Raises
    ------
    OnnxModelError
        Not an ONNX file, no anomalyvae metadata, an unsupported format version, or
        (with ``verify``) a content hash that does not match the file.
    """
    path = Path(path)
    if not path.is_file():
        raise OnnxModelError(f"model file '{path}' does not exist")
    try:
        model = onnx.load(str(path))
    except Exception as error:  # onnx raises DecodeError, OSError, ...
        raise OnnxModelError(
            f"'{path}' is not an ONNX model ({type(error).__name__}); export one with "
            "`anomalyvae export CHECKPOINT -o model.onnx`"
        ) from error
    props = {p.key: p.value for p in model.metadata_props}
    if props.get(METADATA_PREFIX + "format") != FORMAT_NAME:
        raise OnnxModelError(
            f"'{path}' is an ONNX model without anomalyvae metadata; only files written "
            "by `anomalyvae export` carry the threshold and preprocessing it needs"
        )
    version = props.get(METADATA_PREFIX + "format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise OnnxModelError(
            f"'{path}' has anomalyvae ONNX format {version}; this version reads "
            f"{SUPPORTED_FORMAT_VERSIONS}; upgrade anomalyvae"
        )
    key = signing_key()
    if key is not None:  # a configured key makes signatures mandatory, verify or not
        if not signature_matches(content_hash(model), props.get(SIGNATURE_KEY), key):
            raise OnnxModelError(
                f"'{path}' is not signed with the configured key "
                f"({KEY_ENV} / {KEY_FILE_ENV}): unsigned, signed with another key, or "
                "altered after signing; export it again with the key set"
            )
    if verify:
        stored = props.get(CONTENT_HASH_KEY)
        if stored != content_hash(model):
            raise OnnxModelError(
                f"'{path}' was altered after export (content hash mismatch): damaged in "
                "transfer or edited; re-export it from its checkpoint (`anomalyvae export`). "
                "A deliberate edit can be read with verify=False in the Python API"
            )
    out: dict[str, Any] = {}
    for key, value in props.items():
        if key.startswith(METADATA_PREFIX):
            try:
                out[key[len(METADATA_PREFIX) :]] = json.loads(value)
            except json.JSONDecodeError:
                out[key[len(METADATA_PREFIX) :]] = value
    if verify:
        check_calibration_agrees(path, out)
    return out


def check_calibration_agrees(path: str | os.PathLike[str], metadata: dict[str, Any]) -> None:
    """An :class:`OnnxModelError` when the threshold disagrees with the calibration block.

    The content hash only says the file is as its last writer left it: without a signing
    key, a threshold edited with the hash recomputed passes it. The calibration block
    records the value calibration chose (an int8 variant scales it by its recorded
    ratio); a threshold that is neither was edited by hand.
    """
    calibration = (metadata.get("calibration") or {}).get("image") or {}
    if "value" not in calibration or "threshold" not in metadata:
        return
    expected = float(calibration["value"])
    adjustment = metadata.get("threshold_adjustment")
    if isinstance(adjustment, dict) and "ratio" in adjustment:
        expected *= float(adjustment["ratio"])
    threshold = float(metadata["threshold"])
    if not math.isclose(threshold, expected, rel_tol=1e-6, abs_tol=1e-12):
        raise OnnxModelError(
            f"'{path}' was altered after export: its threshold {threshold:g} disagrees with "
            f"its calibration block ({expected:g}); re-export it, recalibrate with "
            "`anomalyvae calibrate`, or pass --threshold to override it at run time"
        )


def choose_providers(device: str = "auto", strict: bool = False) -> list[str]:
    """Execution providers for ``device`` ("auto", "cuda" or "cpu").

    "auto" takes CUDA when ONNX Runtime offers it; "cuda" without it warns and uses
    the CPU, or raises with ``strict``.
    """
    available = ort.get_available_providers()
    if device not in ("auto", "cuda", "cpu"):
        raise InvalidValueError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        message = (
            f"CUDA was requested but this ONNX Runtime offers only {available}; "
            "install onnxruntime-gpu with a matching CUDA, or use device='cpu'"
        )
        if strict:
            raise RuntimeError(message)
        warnings.warn(message + "; running on the CPU", UserWarning, stacklevel=3)
    return ["CPUExecutionProvider"]


class OnnxDetector:
    """Run an exported anomalyvae model with ONNX Runtime, without torch.

    Parameters
    ----------
    path : path
        A model.onnx written by ``anomalyvae export``.
    device : {"auto", "cuda", "cpu"}
        "auto" uses CUDA when ONNX Runtime can, else the CPU.
    strict : bool
        Raise instead of warning when CUDA was asked for and is not used.
    intra_op_threads, inter_op_threads : int, optional
        ONNX Runtime thread pools (0 or None = its default, all cores).
    batch_size : int, optional
        Images per ``session.run``; None (default) takes ``BATCH_PIXELS`` of model input
        (:func:`auto_batch_size`), so memory does not grow with the input size.
    verify : bool
        Check the content hash (refuses altered files).

    Attributes
    ----------
    metadata : dict
        The model card: thresholds, calibration, preprocessing, training data, versions.
    preprocessing : Preprocessing
    threshold : float
        The calibrated threshold (the graph's default).
    providers : list of str
        Providers the session really uses.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        device: str = "auto",
        strict: bool = False,
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        batch_size: int | None = None,
        verify: bool = True,
    ) -> None:
        if batch_size is not None and batch_size < 1:
            raise InvalidValueError(f"batch_size must be >= 1, got {batch_size}")
        self.path = Path(path)
        self.metadata = read_metadata(self.path, verify=verify)
        self.preprocessing = Preprocessing.from_dict(self.metadata["preprocessing"])
        self.threshold = float(self.metadata["threshold"])
        self.pixel_threshold = float(self.metadata["pixel_threshold"])
        self.model_hash = str(self.metadata.get("content_hash", ""))
        #: whether the file carries a signature (without one, anyone can edit a threshold
        #: and recompute the hash; the calibration-block check catches only crude edits)
        self.signed = "signature" in self.metadata
        if batch_size is None:  # memory bounded by the input size (auto_batch_size)
            batch_size = auto_batch_size(self.preprocessing.height, self.preprocessing.width)
        self.batch_size = batch_size
        options = session_options(intra_op_threads, inter_op_threads)
        requested = choose_providers(device, strict)
        # 3 = errors only: ONNX Runtime otherwise notes at every load that the threshold
        # input has a default (by design); 4 hushes the failed CUDA probe of "auto".
        options.log_severity_level = 4 if device == "auto" else 3
        if device == "auto" and requested[0] == "CUDAExecutionProvider":
            ort.set_default_logger_severity(4)  # the CUDA probe logs through the global logger
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=requested)
        finally:
            ort.set_default_logger_severity(2)
        self.providers = self.session.get_providers()
        if (
            device == "cuda"
            and requested[0] == "CUDAExecutionProvider"
            and self.providers[0] != requested[0]
        ):
            message = (
                f"CUDA provider could not start (CUDA libraries missing?); "
                f"running on {self.providers[0]}"
            )
            if strict:
                raise RuntimeError(message)
            warnings.warn(message, UserWarning, stacklevel=2)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) the model takes."""
        spec = self.preprocessing
        return spec.channels, spec.height, spec.width

    def check_batch(self, images: NDArray[Any]) -> NDArray[np.float32]:
        """Validate an (n, c, h, w) float32 batch in [0, 1]; return it contiguous."""
        if not isinstance(images, np.ndarray):
            raise OnnxInputError(f"images must be a numpy array, got {type(images).__name__}")
        expected = self.input_shape
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise OnnxInputError(
                f"images must have shape (N, {expected[0]}, {expected[1]}, {expected[2]}), "
                f"got {images.shape}; preprocess files with predict_files()"
            )
        if images.dtype != np.float32:
            raise OnnxInputError(f"images must be float32 in [0, 1], got dtype {images.dtype}")
        if not np.isfinite(images).all():
            raise OnnxInputError("images contain NaN or infinite pixels")
        if images.size and (images.min() < 0 or images.max() > 1):
            raise OnnxInputError(
                f"pixel values must be in [0, 1], got [{images.min():.3g}, {images.max():.3g}]"
            )
        return np.ascontiguousarray(images)

    def predict_arrays(
        self, images: NDArray[np.float32], threshold: float | None = None
    ) -> OnnxResult:
        """Score model-ready images (n, c, h, w); higher scores = more anomalous."""
        images = self.check_batch(images)
        threshold = check_threshold(threshold)
        feeds_threshold = np.array(
            self.threshold if threshold is None else threshold, dtype=np.float32
        )
        parts: list[list[NDArray[Any]]] = [[], [], [], []]
        for start in range(0, len(images), self.batch_size):
            outputs = self.session.run(
                list(OUTPUT_NAMES),
                {
                    INPUT_NAME: images[start : start + self.batch_size],
                    THRESHOLD_NAME: feeds_threshold,
                },
            )
            for part, output in zip(parts, outputs, strict=True):
                part.append(output)
        if not parts[0]:
            c, h, w = self.input_shape
            return OnnxResult(
                np.zeros((0, 1, h, w), np.float32),
                np.zeros(0, np.float32),
                np.zeros(0, np.float32),
                np.zeros(0, bool),
            )
        return OnnxResult(*(np.concatenate(p) for p in parts))  # type: ignore[call-arg]

    def load_files(self, paths: Sequence[str | os.PathLike[str]]) -> NDArray[np.float32]:
        """Decode and preprocess files exactly as training did, to (n, c, h, w)."""
        c, h, w = self.input_shape
        out = np.empty((len(paths), c, h, w), dtype=np.float32)
        for i, path in enumerate(paths):
            out[i] = load_image(path, self.preprocessing)
        return out

    def predict_rows(
        self, paths: Sequence[str | os.PathLike[str]], threshold: float | None = None
    ) -> list[dict[str, Any]]:
        """One row per file: path, score, normalized_score, is_anomaly and error.

        A file that cannot be read gets a row with its error (and NaN scores) instead of
        stopping the others; higher scores are more anomalous.
        """
        rows: list[dict[str, Any]] = []
        paths = list(paths)
        # files are read and scored a block at a time: memory stays flat with their count
        for start in range(0, len(paths), PREDICT_BLOCK):
            good: list[tuple[int, NDArray[np.float32]]] = []
            for path in paths[start : start + PREDICT_BLOCK]:
                row = {
                    "path": display_path(path),
                    "score": float("nan"),
                    "normalized_score": float("nan"),
                }
                row.update(is_anomaly=None, error="")
                try:
                    good.append((len(rows), load_image(path, self.preprocessing)))
                except ImageReadError as error:
                    row["error"] = str(error)
                rows.append(row)
            if not good:
                continue
            result = self.predict_arrays(np.stack([x for _, x in good]), threshold)
            for k, (i, _) in enumerate(good):
                rows[i].update(
                    score=float(result.score[k]),
                    normalized_score=float(result.normalized_score[k]),
                    is_anomaly=bool(result.is_anomaly[k]),
                )
        return rows

    def predict_files(
        self, paths: Sequence[str | os.PathLike[str]], threshold: float | None = None
    ) -> OnnxResult:
        """Score image files; raises :class:`anomalyvae.imaging.io.ImageReadError` for a bad one."""
        return self.predict_arrays(self.load_files(paths), threshold)
