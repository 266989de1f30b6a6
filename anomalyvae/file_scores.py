"""The ``score`` command's library call: one row per file with a saved detector.

A file of several images (a NIfTI volume, a multi-page TIFF, an animated GIF, a
multi-frame DICOM) gets a row per slice or frame and a row for the file with its worst
one's score, as the scan reports them; an unreadable file gets a row with its error and
no verdict. The folder-wide QA job with a table, heatmaps and a report is the scan
(:mod:`anomalyvae.inference.scan`); dataset metrics are :mod:`anomalyvae.evaluation`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from anomalyvae.detector import VAEAnomalyDetector
from anomalyvae.imaging.batch import read_images
from anomalyvae.imaging.files import display_path
from anomalyvae.imaging.frames import FrameInput
from anomalyvae.imaging.io import ImageReadError, content_frames
from anomalyvae.imaging.medical import is_nifti
from anomalyvae.imaging.preprocessing import Preprocessing, read_mask
from anomalyvae.imaging.volumes import VolumeInput, slice_name
from anomalyvae.set_scoring import images_per_chunk


class ScoredFile(NamedTuple):
    """One row of :func:`score_files`: a file (or a volume's slice) and its verdict."""

    name: str
    score: float
    normalized: float
    #: None for a file that could not be scored: no verdict, never a pass
    is_anomaly: bool | None
    #: why the file could not be scored; "" when it was
    error: str = ""


def _stack_of(path: Path, spec: Preprocessing) -> VolumeInput | FrameInput | None:
    """What a file of several images is read as, or None for a file of one image.

    A NIfTI volume is read slice by slice, a multi-page or animated file frame by frame.
    """
    if is_nifti(path):
        return VolumeInput(path, spec)
    frames = content_frames(path)
    return FrameInput(path, spec, frames) if len(frames) > 1 else None


def score_files(
    checkpoint: str | os.PathLike[str],
    paths: list[Path],
    valid_mask: str | os.PathLike[str] | None = None,
) -> list[ScoredFile]:
    """One row per file with a saved detector, in the order given.

    A NIfTI volume of several slices gives one row per slice (``path#slice=NNNN``, all
    slices, normalized per volume as in training) and a last row ``path`` for the volume
    itself, with the score of its worst slice, as the scan reports volumes; a file of
    several images (multi-page TIFF, animated GIF, multi-frame DICOM) one row per frame
    and one for the file, the same way. A file that
    cannot be read gets a row with its error (and no score); the others are still scored.
    Names are shown as the scan shows them (undecodable bytes as ``\\xNN``).
    """
    detector = VAEAnomalyDetector.load(checkpoint, progress=False)
    spec = detector.preprocessing_
    valid = None
    if valid_mask is not None:
        valid = read_mask(valid_mask, (spec.height, spec.width), 0.0)
    threshold = detector.decision_threshold()
    rows: list[ScoredFile] = []
    flat: list[Path] = []  # 2-D files, scored together a chunk at a time
    chunk = images_per_chunk(spec)  # memory holds one chunk of images, not the list

    def scored(name: str, value: float) -> ScoredFile:
        normalized = value / threshold if threshold > 0 else float("nan")
        return ScoredFile(name, value, normalized, value > threshold)

    def failed(path: Path, error: Exception) -> ScoredFile:
        return ScoredFile(display_path(path), float("nan"), float("nan"), None, str(error))

    def flush() -> None:
        # read once by the shared reader: an unreadable file becomes its row, in order
        images, kept, errors = read_images(flat, spec, on_error="ignore", volumes="error")
        values = iter(detector.anomaly_score(images, valid_mask=valid).tolist() if kept else [])
        readable, failures = iter(kept), iter(errors)
        next_kept = next(readable, None)
        for path in flat:
            if next_kept is not None and Path(next_kept) == Path(path):
                rows.append(scored(display_path(path), next(values)))
                next_kept = next(readable, None)
            else:
                rows.append(failed(path, next(failures)))
        flat.clear()

    for path in paths:
        try:
            stack = _stack_of(path, spec)
            if stack is None or len(stack) == 1:
                flat.append(path)
                if len(flat) >= chunk:
                    flush()
                continue
            slices = detector.anomaly_score(stack.stack(), valid)
        except ImageReadError as error:
            if flat:
                flush()
            rows.append(failed(path, error))
            continue
        if flat:
            flush()
        name = display_path(path)
        numbers = stack.frames if isinstance(stack, FrameInput) else range(len(slices))
        for k, value in zip(numbers, slices, strict=True):
            rows.append(scored(slice_name(name, k), float(value)))
        rows.append(scored(name, float(slices.max())))
    if flat:
        flush()
    return rows
