"""A labelled or normal set read and scored a chunk at a time, with its pixel truth.

What the dataset jobs of :mod:`anomalyvae.evaluation` (evaluate, calibrate) read: files
scored a chunk of images at a time, so that memory does not hold the set; the masks of
2-D images at model resolution; a NIfTI test volume's slices with their labels and masks.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

from anomalyvae.data import Sample
from anomalyvae.detector import VAEAnomalyDetector
from anomalyvae.imaging.batch import read_images
from anomalyvae.imaging.files import display_path
from anomalyvae.imaging.io import ImageReadError, stored_size
from anomalyvae.imaging.medical import is_nifti
from anomalyvae.imaging.preprocessing import MaskError, Preprocessing, read_mask
from anomalyvae.imaging.volumes import read_volume, read_volume_mask, volume_slices
from anomalyvae.progress import progress_bar

#: Model-input bytes of the images read and scored at a time: memory holds a chunk being
#: scored and the next one being read, not the set (400 colour images of 1130 x 460 px
#: are 2.3 GB as model input).
CHUNK_BYTES = 128 * 2**20


def images_per_chunk(spec: Preprocessing) -> int:
    """How many images of ``spec``'s model input make a chunk (at least 8)."""
    return max(8, CHUNK_BYTES // (spec.channels * spec.height * spec.width * 4))


class ScoredChunk(NamedTuple):
    """One chunk of files read and scored by :func:`scored_chunks`."""

    #: the files of the chunk that were read, in order
    samples: list[Sample]
    #: the file of each image (a volume's or multi-frame file's path once per image)
    paths: list[Path]
    scores: NDArray[np.float64]
    maps: NDArray[np.float32]
    #: candidate views by name (only with ``views=True``)
    views: dict[str, NDArray[np.float64]]


def scored_chunks(
    detector: VAEAnomalyDetector,
    samples: list[Sample],
    left_out: list[dict[str, str]],
    progress: bool,
    volumes: str = "error",
    views: bool = True,
    desc: str = "evaluating",
) -> Iterator[ScoredChunk]:
    """Read and score files a chunk at a time, so that memory holds two chunks of images.

    Each file is read once, as the model sees it; an unreadable file is left out with a
    warning and named in ``left_out``. The next chunk is read in a thread while this one
    is scored (decoding and resizing are about a tenth of a large image's time, and the
    scoring leaves gaps on the cores). ``volumes="slices"`` scores every slice of a NIfTI
    volume (each volume a chunk of its own) and every frame of a multi-frame file;
    ``views`` adds the model's candidate views (:meth:`VAEAnomalyDetector.score_map_views`).
    """
    spec = detector.preprocessing_
    size = images_per_chunk(spec)
    parts: list[list[Sample]] = []
    for sample in samples:  # a volume alone: its slices are a stack of their own
        alone = volumes == "slices" and is_nifti(sample.path)
        if alone or not parts or len(parts[-1]) >= size or is_nifti(parts[-1][-1].path):
            parts.append([sample])
        else:
            parts[-1].append(sample)
    bar = progress_bar(
        total=len(samples), desc=desc, unit="img", disable=not progress or not samples
    )
    reader = ThreadPoolExecutor(1, thread_name_prefix="anomalyvae-read")

    def read_ahead(part: list[Sample]) -> Future:
        return reader.submit(read_images, [s.path for s in part], spec, "warn", volumes)

    try:
        pending = [read_ahead(part) for part in parts[:1]]
        for index, part in enumerate(parts):
            images, kept, errors = pending.pop().result()
            if index + 1 < len(parts):
                pending.append(read_ahead(parts[index + 1]))
            left_out += [{"path": display_path(e.path), "error": str(e)} for e in errors]
            if len(kept):
                if views:
                    scores, maps, found = detector.score_map_views(images)
                else:
                    (scores, maps), found = detector.score_and_map(images), {}
                del images
                read = {Path(p) for p in kept}
                readable = [s for s in part if Path(s.path) in read]
                yield ScoredChunk(readable, kept, scores, maps, found)
            bar.update(len(part))
    finally:
        reader.shutdown(wait=True, cancel_futures=True)  # a read under way ends first
        bar.close()


def score_set_files(
    detector: VAEAnomalyDetector,
    samples: list[Sample],
    left_out: list[dict[str, str]],
    progress: bool,
    keep_maps: bool = True,
    views: bool = True,
    desc: str = "evaluating",
) -> tuple[list[Sample], NDArray[np.float64], NDArray[np.float32] | None, dict[str, list[NDArray]]]:
    """Read and score 2-D files a chunk at a time: (readable samples, scores, maps, views).

    The maps (n, h, w) are filled in place, so memory holds every map once and one chunk
    of images (:func:`scored_chunks`); without ``keep_maps``, no map (None).
    """
    spec = detector.preprocessing_
    shape = (len(samples), spec.height, spec.width) if keep_maps else (len(samples), 0, 0)
    maps = np.empty(shape, np.float32)
    scores: list[NDArray[np.float64]] = []
    found: dict[str, list[NDArray]] = {}
    readable: list[Sample] = []
    for chunk in scored_chunks(detector, samples, left_out, progress, "error", views, desc):
        if keep_maps:
            maps[len(readable) : len(readable) + len(chunk.samples)] = chunk.maps
        scores.append(chunk.scores)
        for name, values in chunk.views.items():
            found.setdefault(name, []).append(values)
        readable += chunk.samples
    joined = np.concatenate(scores) if scores else np.zeros(0)
    joined_views = {name: [np.concatenate(parts)] for name, parts in found.items()}
    return readable, joined, maps[: len(readable)] if keep_maps else None, joined_views


class VolumeUnits(NamedTuple):
    """A NIfTI test volume as evaluation units: its slices, their labels and masks."""

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    has_mask: np.ndarray


def volume_units(
    sample: Sample, detector: VAEAnomalyDetector, mask_threshold: float = 0.0
) -> VolumeUnits:
    """Every slice of ``sample``'s volume with its label and mask at model resolution.

    Raises
    ------
    MaskError
        The mask volume's shape or affine differs from the image volume's (both named).
    """
    spec = detector.preprocessing_
    volume = read_volume(sample.path)
    images = volume_slices(sample.path, spec, volume=volume)  # all slices, in order
    n = len(images)
    masks = np.zeros((n, spec.height, spec.width), dtype=bool)
    if sample.mask_path is None:
        labels = np.full(n, sample.label, dtype=np.int64)
        return VolumeUnits(images, labels, masks, np.full(n, sample.label == 0))
    masks = read_volume_mask(
        sample.mask_path, volume, sample.path, (spec.height, spec.width), mask_threshold
    )
    labels = masks.reshape(n, -1).any(axis=1).astype(np.int64)
    return VolumeUnits(images, labels, masks, np.ones(n, dtype=bool))


def masks_for(
    samples: list[Sample],
    detector: VAEAnomalyDetector,
    mask_threshold: float,
    errors: dict[int, MaskError] | None = None,
) -> np.ndarray:
    """Defect masks (n, h, w) at model resolution; all-False for samples without a mask.

    Each mask must match its image's size (checked, with both files named). A mask that
    cannot be read, or does not fit its image, raises :class:`MaskError`; with ``errors``
    (a dict) it is recorded there by sample index instead, and its row stays all-False
    (so does the row of an image that cannot be read, whose error is then not raised).
    """
    spec = detector.preprocessing_
    out = np.zeros((len(samples), spec.height, spec.width), dtype=bool)
    for i, sample in enumerate(samples):
        if sample.mask_path is None:
            continue
        try:
            size = stored_size(sample.path)
        except ImageReadError:
            if errors is None:
                raise
            continue  # the image's own error is the scoring's to report
        try:
            out[i] = read_mask(
                sample.mask_path,
                (spec.height, spec.width),
                mask_threshold,
                expected_shape=size,
            )
        except MaskError as error:
            found = MaskError(
                f"{error} (image '{sample.path}'; fix or remove the mask, or move the image "
                "out of the set)"
            )
            if errors is None:
                raise found from error
            errors[i] = found
    return out


def readable_masks(
    samples: list[Sample],
    detector: VAEAnomalyDetector,
    mask_threshold: float,
    left_out: list[dict[str, str]],
) -> tuple[list[Sample], NDArray[np.bool_]]:
    """The samples whose mask (if any) can be read and fits its image, and their masks.

    An image whose mask cannot be read or does not fit it is left out with a warning
    naming both files, and named in ``left_out``: its pixel truth is unknown, as a
    volume's with a bad mask is. Read before the scoring, so no left-out image is scored.
    """
    broken: dict[int, MaskError] = {}
    masks = masks_for(samples, detector, mask_threshold, broken)
    for i, error in broken.items():
        warnings.warn(f"left out of the evaluation: {error}", UserWarning, stacklevel=3)
        left_out.append({"path": display_path(Path(samples[i].path)), "error": str(error)})
    if not broken:
        return samples, masks
    keep = [i not in broken for i in range(len(samples))]
    return [s for s, k in zip(samples, keep, strict=True) if k], masks[keep]
