"""Export a trained detector to one self-describing ONNX file, and check it against torch.

The graph holds everything from a preprocessed image to a verdict: VAE forward pass,
anomaly map, smoothing, image score, normalized score and the decision. The threshold is
a graph input with the calibrated value as its default, so an inspection line can change
it without re-exporting. Metadata (``metadata_props``) says how to preprocess, what the
outputs mean and how the threshold was chosen; :mod:`anomalyvae.inference.runtime` reads it back.
"""

from __future__ import annotations

import copy
import io as _io
import json
import os
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnx
import torch
from numpy.typing import NDArray
from onnx import numpy_helper
from torch import Tensor, nn

from anomalyvae.detector import VAEAnomalyDetector
from anomalyvae.errors import AnomalyVAEError
from anomalyvae.imaging.files import atomic_write_bytes
from anomalyvae.imaging.tiles import auto_batch_size
from anomalyvae.inference.contract import (
    CONTENT_HASH_KEY,
    FORMAT_NAME,
    FORMAT_VERSION,
    INPUT_NAME,
    METADATA_PREFIX,
    OPSET,
    OUTPUT_NAMES,
    OUTPUTS_DOC,
    SIGNATURE_KEY,
    THRESHOLD_NAME,
    content_hash,
    signature,
    signing_key,
)
from anomalyvae.models.maps import EXPORTABLE_MAP_KINDS
from anomalyvae.models.scoring import ScoringGraph
from anomalyvae.models.vae import VAEOutput, count_parameters
from anomalyvae.version import __version__

#: Largest score difference between ONNX Runtime and torch that export accepts, as a
#: share of the score's scale: the larger of |threshold| and the range of the parity
#: images' scores. A graph of 3 GFLOP per image in float32 differs by a few 1e-4 of
#: that (0.016 on scores that reach 41); verdicts must agree away from the threshold.
PARITY_TOLERANCE = 1e-3


class ExportError(AnomalyVAEError, RuntimeError):
    """Export failed, or the exported graph disagrees with torch beyond tolerance."""


class _HalfVAE(nn.Module):
    """Runs the VAE in float16 between float32 casts; the scoring stays float32."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).half()
        self.config = model.config

    def forward(self, x: Tensor) -> VAEOutput:
        return VAEOutput(*(t.float() for t in self.model(x.half())))


class _ExportGraph(nn.Module):
    def __init__(self, scoring: ScoringGraph) -> None:
        super().__init__()
        self.scoring = scoring

    def forward(self, image: Tensor, threshold: Tensor) -> tuple[Tensor, ...]:
        anomaly_map, score = self.scoring(image)
        normalized = score / threshold
        return anomaly_map, score, normalized, score > threshold


class ParityReport(NamedTuple):
    """Largest differences between torch and ONNX Runtime on the same batch."""

    n_images: int
    max_abs_map_diff: float
    max_abs_score_diff: float
    #: the largest score difference over the score's scale (max(|threshold|, range))
    max_rel_score_diff: float
    verdicts_agree: bool


class ExportResult(NamedTuple):
    """What :func:`export_onnx` wrote and measured."""

    path: Path
    sidecar: Path
    metadata: dict[str, str]
    parity: ParityReport | None


def describe_export(result: ExportResult) -> str:
    """One line on what an export wrote and how it was checked (the CLI prints it)."""
    parity = result.parity
    adjustment = result.metadata.get(METADATA_PREFIX + "threshold_adjustment")
    if adjustment:
        info = json.loads(adjustment)
        detail = (
            f"threshold carried over from float32 by the median int8/float32 "
            f"score ratio {info['ratio']:.3f} on {info['n_images']} normal images"
        )
    elif parity is None:
        detail = "no parity check"
    else:
        detail = (
            f"parity on {parity.n_images} images: max |map diff| "
            f"{parity.max_abs_map_diff:.2e}, max |score diff| {parity.max_abs_score_diff:.2e} "
            f"(relative {parity.max_rel_score_diff:.2e}), verdicts agree: "
            f"{parity.verdicts_agree}"
        )
    return f"Wrote {result.path} and {result.sidecar.name} ({detail})"


def tiling_metadata(detector: VAEAnomalyDetector) -> dict[str, Any]:
    """How the graph covers its input with backbone tiles (informational: it is inside).

    ``n_tiles`` 1 means the backbone sees the whole input at once.
    """
    return detector.family().tiling(detector.model_)


def build_metadata(detector: VAEAnomalyDetector) -> dict[str, str]:
    """Everything an integrator needs, as ``metadata_props`` strings (JSON where nested)."""
    spec = detector.preprocessing_
    calibration = detector.calibration_state() or {}
    config = detector.model_.config
    preprocessing = {
        **spec.to_dict(),
        "input_range": [0.0, 1.0],
        "layout": "NCHW",
        "dtype": "float32",
        "bit_depth_scaling": "integer images divided by their type maximum "
        "(255 for 8-bit, 65535 for 16-bit); float, DICOM and NIfTI images min-max "
        "scaled, unless intensity_normalization is set (then it applies to stored values)",
        "color_conversion": "grayscale = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601); "
        "grayscale to RGB replicates the channel",
        "resize_library": "Pillow (antialiased when shrinking)",
        "intensity_normalization": spec.normalization,
    }
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "product_version": __version__,
        "threshold": repr(float(detector.threshold_)),
        "pixel_threshold": repr(float(detector.pixel_threshold_)),
        "calibration": json.dumps(calibration),
        "model_family": detector.family_,
        "tiling": json.dumps(tiling_metadata(detector)),
        "normal_intensity": json.dumps(getattr(detector, "normal_intensity_", None)),
        "self_check": json.dumps(getattr(detector, "self_check_", None)),
        "fusion": json.dumps(detector.family().fusion(detector)),
        "map_kind": detector.scoring_.map_kind,
        "anomaly_map": detector.family().describe_map(detector.model_, detector.scoring_),
        "score_kind": detector.scoring_.score_kind,
        "scoring": json.dumps(detector.scoring_.to_dict()),
        "preprocessing": json.dumps(preprocessing),
        "model_config": json.dumps(
            {**config.to_dict(), "n_parameters": count_parameters(detector.model_)}
        ),
        "training_data": json.dumps(
            {
                **detector.data_summary_,
                **{
                    k: v
                    for k, v in detector.training_summary_.items()
                    if k in ("best_epoch", "epochs_run", "stopped_reason")
                },
            }
        ),
        "inputs": json.dumps(
            {
                INPUT_NAME: f"float32 (N, {spec.channels}, {spec.height}, {spec.width}) in [0, 1]",
                THRESHOLD_NAME: "float32 scalar, optional: defaults to the calibrated threshold",
            }
        ),
        "outputs": json.dumps(OUTPUTS_DOC),
        "opset": str(OPSET),
    }
    return {METADATA_PREFIX + k: v for k, v in meta.items()}


def export_onnx(
    detector: VAEAnomalyDetector,
    path: str | os.PathLike[str],
    parity_images: NDArray[np.float32] | None = None,
    tolerance: float = PARITY_TOLERANCE,
    precision: str = "fp32",
) -> ExportResult:
    """Export the scoring graph of a calibrated detector to ``path`` (+ a JSON sidecar).

    Parameters
    ----------
    parity_images : ndarray (n, c, h, w), optional
        Model-ready images to compare torch and ONNX Runtime on; export fails when
        they differ beyond ``tolerance``. Without them nothing is compared.
    precision : {"fp32", "fp16"}
        "fp16" runs the VAE in half precision (weights and activations); the anomaly
        map and score are still computed in float32.
    """
    if precision not in ("fp32", "fp16"):
        raise ExportError(f"precision must be 'fp32' or 'fp16', got {precision!r}")
    detector.check_fitted()
    if precision not in detector.family().export_precisions:
        raise ExportError(
            f"{precision} export is not implemented for the {detector.family_} model; "
            f"it exports in {', '.join(detector.family().export_precisions)}"
        )
    if getattr(detector, "threshold_", None) is None:
        raise ExportError("the detector has no threshold; calibrate it before export")
    if detector.scoring_.map_kind not in EXPORTABLE_MAP_KINDS:
        raise ExportError(
            f"map kind {detector.scoring_.map_kind!r} needs an input gradient, which a "
            f"forward-only ONNX graph cannot compute; export with one of "
            f"{EXPORTABLE_MAP_KINDS} (recalibrate after changing it)"
        )
    path = Path(path)
    spec = detector.preprocessing_
    model = detector.model_.to("cpu").eval()
    vae: nn.Module = model if precision == "fp32" else _HalfVAE(model)
    graph = _ExportGraph(
        ScoringGraph(vae, detector.scoring_, getattr(detector, "map_stats_", None))
    ).eval()
    # traced at batch 1 (the batch axis stays dynamic): tracing holds every activation
    # of the example, so a larger one costs memory for nothing (1.6 GB at batch 2 on
    # 1216 x 480, 1.0 GB at 1)
    example = torch.rand(1, spec.channels, spec.height, spec.width)
    threshold = torch.tensor(float(detector.threshold_), dtype=torch.float32)
    buffer = _io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notices
        torch.onnx.export(
            graph,
            (example, threshold),
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME, THRESHOLD_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={INPUT_NAME: {0: "N"}, **{n: {0: "N"} for n in OUTPUT_NAMES}},
            do_constant_folding=True,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    drop_empty_trailing_inputs(proto)
    set_threshold_default(proto, float(detector.threshold_))
    proto.producer_name = "anomalyvae"
    proto.producer_version = __version__
    proto.doc_string = (
        "anomalyvae anomaly detector. Input 'image': float32 (N, C, H, W) in [0, 1], "
        "preprocessed as metadata 'anomalyvae.preprocessing' says. Outputs: anomaly_map, "
        "score, normalized_score, is_anomaly. Optional input 'threshold' overrides the "
        "calibrated threshold."
    )
    metadata = {**build_metadata(detector), METADATA_PREFIX + "precision": precision}
    metadata = stamp_metadata(proto, metadata)
    onnx.checker.check_model(proto, full_check=True)

    parity = None
    if parity_images is not None:
        # checked before it is put in place: a failed export leaves no file that looks
        # shippable (the model and its sidecar are written only after it passes)
        staging = path.with_name(f".{path.name}.{os.getpid()}.parity")
        atomic_write_bytes(staging, proto.SerializeToString())
        try:
            parity = check_parity(detector, staging, parity_images, tolerance)
        finally:
            staging.unlink(missing_ok=True)
        if (
            parity.max_rel_score_diff > tolerance
            or not parity.verdicts_agree
            or not np.isfinite(parity.max_abs_map_diff)
        ):
            raise ExportError(
                f"ONNX Runtime differs from torch beyond tolerance {tolerance:g} of the "
                f"score's scale, so nothing was written: {parity}. Retry on this machine's "
                "ONNX Runtime; if it persists, report it with the model"
            )
    sidecar = write_model(proto, path, metadata)
    return ExportResult(path, sidecar, metadata, parity)


def _maybe_json(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def drop_empty_trailing_inputs(proto: onnx.ModelProto) -> int:
    """Remove the empty names the exporter leaves for omitted optional inputs at the end.

    The legacy exporter writes ``Pad(x, pads, "")``. ONNX allows the trailing optional
    input to be left out, and ONNX Runtime fuses a Pad into the Conv after it only then
    (its PadFusion asks whether ``constant_value`` is a constant, and "" is not): with
    the empty name every backbone Pad ran as its own node, and broke the blocked
    (NCHWc) layout around it, 23 % of a 1216 x 480 image's time. Returns how many nodes
    changed.
    """
    changed = 0
    for node in proto.graph.node:
        if node.input and not node.input[-1]:
            while node.input and not node.input[-1]:
                del node.input[-1]
            changed += 1
    return changed


def set_threshold_default(proto: onnx.ModelProto, value: float) -> None:
    """Give the ``threshold`` input an initializer of the same name: its default value.

    ONNX (IR >= 4) lets an input share its name with an initializer; a caller that
    feeds the input overrides it, one that does not gets the initializer.
    """
    names = [i.name for i in proto.graph.input]
    if THRESHOLD_NAME not in names:
        raise ExportError("the traced graph lost its threshold input")
    default = numpy_helper.from_array(np.array(value, dtype=np.float32), THRESHOLD_NAME)
    for initializer in proto.graph.initializer:
        if initializer.name == THRESHOLD_NAME:  # a variant: replace the old default
            initializer.CopyFrom(default)
            break
    else:
        proto.graph.initializer.append(default)
    if proto.ir_version < 4:
        proto.ir_version = 4


def stamp_metadata(proto: onnx.ModelProto, metadata: dict[str, str]) -> dict[str, str]:
    """Replace the model's metadata with ``metadata`` plus a fresh content hash.

    When a signing key is configured (``ANOMALYVAE_SIGNING_KEY`` or
    ``ANOMALYVAE_SIGNING_KEY_FILE``), the hash is also signed (HMAC-SHA256), and a
    runtime with the same key refuses a file whose signature does not match.
    """
    metadata = {k: v for k, v in metadata.items() if k not in (CONTENT_HASH_KEY, SIGNATURE_KEY)}
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, metadata)
    digest = content_hash(proto)
    metadata[CONTENT_HASH_KEY] = digest
    key = signing_key()
    if key is not None:
        metadata[SIGNATURE_KEY] = signature(digest, key)
    onnx.helper.set_model_props(proto, metadata)
    return metadata


#: Images per graph run in parity checks and :func:`torch_outputs` (bounds their memory).
PARITY_BATCH = 16


def parity_batch(images: NDArray[np.float32]) -> int:
    """Images per run in parity checks: at most ``PARITY_BATCH``, fewer for large inputs.

    :func:`anomalyvae.imaging.tiles.auto_batch_size`, so an export stays near 2 GB.
    """
    return auto_batch_size(images.shape[-2], images.shape[-1], PARITY_BATCH)


def torch_outputs(
    detector: VAEAnomalyDetector, images: NDArray[np.float32], threshold: float | None = None
) -> dict[str, NDArray[Any]]:
    """The four outputs computed in torch, for parity checks and benchmarks."""
    graph = _ExportGraph(
        ScoringGraph(
            detector.model_.to("cpu").eval(),
            detector.scoring_,
            getattr(detector, "map_stats_", None),
        )
    )
    value = torch.tensor(float(detector.threshold_ if threshold is None else threshold))
    parts: list[list[NDArray[Any]]] = [[] for _ in OUTPUT_NAMES]
    with torch.no_grad():  # in batches: a graph's memory grows with its batch
        step = parity_batch(images)
        for start in range(0, len(images), step):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + step]))
            for part, out in zip(parts, graph(batch, value), strict=True):
                part.append(out.numpy())
    return {name: np.concatenate(part) for name, part in zip(OUTPUT_NAMES, parts, strict=True)}


def check_parity(
    detector: VAEAnomalyDetector,
    path: str | os.PathLike[str],
    images: NDArray[np.float32],
    tolerance: float = PARITY_TOLERANCE,
) -> ParityReport:
    """Compare torch and ONNX Runtime (CPU) on the same model-ready images.

    Score differences are judged in the score's own scale, the larger of |threshold| and
    the range of the reference scores (a z-score near 0 or a score near 41 alike), and
    verdicts must agree for every image farther than ``tolerance`` of that scale from
    the threshold (one within rounding of it may fall either side).
    """
    import onnxruntime as ort

    from anomalyvae.inference.runtime import session_options

    options = session_options()  # as a scan runs it
    options.log_severity_level = 3  # the threshold input's default is by design
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    step = parity_batch(images)
    # a batch at a time, both engines: memory holds one batch's maps, not every image's
    scores, verdicts, ref_scores, ref_verdicts, map_diff = [], [], [], [], 0.0
    for start in range(0, len(images), step):
        batch = images[start : start + step]
        outputs = session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch})
        run = dict(zip(OUTPUT_NAMES, outputs, strict=True))
        ref = torch_outputs(detector, batch)
        map_diff = max(map_diff, float(np.abs(run["anomaly_map"] - ref["anomaly_map"]).max()))
        scores.append(run["score"])
        verdicts.append(run["is_anomaly"])
        ref_scores.append(ref["score"])
        ref_verdicts.append(ref["is_anomaly"])
    onnx_out = {"score": np.concatenate(scores), "is_anomaly": np.concatenate(verdicts)}
    ref = {"score": np.concatenate(ref_scores), "is_anomaly": np.concatenate(ref_verdicts)}
    score_diff = np.abs(onnx_out["score"] - ref["score"])
    threshold = float(detector.threshold_)
    scale = max(abs(threshold), float(np.ptp(ref["score"])), 1e-6)
    clear = np.abs(ref["score"] - threshold) > tolerance * scale
    return ParityReport(
        n_images=len(images),
        max_abs_map_diff=map_diff,
        max_abs_score_diff=float(score_diff.max()),
        max_rel_score_diff=float(score_diff.max() / scale),
        verdicts_agree=bool(
            np.array_equal(onnx_out["is_anomaly"][clear], ref["is_anomaly"][clear])
        ),
    )


def write_model(proto: onnx.ModelProto, path: Path, metadata: dict[str, str]) -> Path:
    """Write model and JSON sidecar (same metadata, prefix dropped) atomically."""
    atomic_write_bytes(path, proto.SerializeToString())
    sidecar = path.with_suffix(".json")
    data = {k[len(METADATA_PREFIX) :]: _maybe_json(v) for k, v in metadata.items()}
    atomic_write_bytes(sidecar, json.dumps(data, indent=2).encode())
    return sidecar
