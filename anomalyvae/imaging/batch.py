"""Many files to one model-ready array: the loader of training, calibration and scoring.

Its own module so that imports flow one way: it reads 2-D files through
:mod:`anomalyvae.imaging.preprocessing`, NIfTI volumes slice by slice through
:mod:`anomalyvae.imaging.volumes` and multi-frame files frame by frame through
:mod:`anomalyvae.imaging.frames`, which themselves build on ``io`` and ``preprocessing``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from anomalyvae.errors import InvalidValueError
from anomalyvae.imaging.frames import FrameInput
from anomalyvae.imaging.io import ImageReadError, content_frames
from anomalyvae.imaging.medical import is_nifti
from anomalyvae.imaging.preprocessing import Preprocessing, load_image
from anomalyvae.imaging.volumes import volume_slices
from anomalyvae.progress import progress_bar


def read_images(
    paths: Sequence[str | os.PathLike[str]],
    spec: Preprocessing,
    on_error: str = "warn",
    volumes: str = "slices",
    max_images: int | None = None,
    progress: bool = False,
) -> tuple[NDArray[np.float32], list[Path], list[ImageReadError]]:
    """Load many files to one (n, c, h, w) array; unreadable files are reported, not fatal.

    Parameters
    ----------
    on_error : {"warn", "raise", "ignore"}
        "warn" skips an unreadable file with a warning naming it; "raise" stops.
    volumes : {"slices", "error"}
        A NIfTI volume contributes its non-background slices and a file of several
        images (multi-page TIFF, animated GIF, multi-frame DICOM) every frame ("slices",
        for training), or either is an error like any file that is not one 2-D image
        ("error").
    max_images : int, optional
        Stop reading once this many images are held (a volume's or a multi-frame file's
        last stack is cut to fit): the files after it are not opened.
    progress : bool
        A bar of the files read on stderr (:func:`anomalyvae.progress.progress_bar`).

    Returns
    -------
    images : ndarray of shape (n_ok, c, h, w)
    kept : list of Path, the file of each image (a volume's path once per slice, a
        multi-frame file's once per frame)
    errors : list of ImageReadError, one per skipped file
    """
    if on_error not in ("warn", "raise", "ignore"):
        raise InvalidValueError(f"on_error must be 'warn', 'raise' or 'ignore', got {on_error!r}")
    if volumes not in ("slices", "error"):
        raise InvalidValueError(f"volumes must be 'slices' or 'error', got {volumes!r}")
    images: list[NDArray[np.float32]] = []
    kept: list[Path] = []
    errors: list[ImageReadError] = []
    if max_images is not None and max_images < 1:
        raise InvalidValueError(f"max_images must be at least 1, got {max_images}")
    files = progress_bar(paths, desc="reading", unit="file", disable=not progress, leave=False)
    try:
        for path in files:
            if max_images is not None and len(images) >= max_images:
                break
            try:
                if volumes == "slices" and is_nifti(path):
                    stack = volume_slices(path, spec, skip_background=True)
                else:
                    frames = content_frames(path) if volumes == "slices" else None
                    if frames is not None and len(frames) > 1:
                        stack = FrameInput(path, spec, frames).stack()
                    else:  # one image; with volumes="error" a file of several is an error
                        stack = load_image(path, spec, frames)[None]
            except ImageReadError as error:
                if on_error == "raise":
                    raise
                if on_error == "warn":
                    warnings.warn(f"skipping {error}", UserWarning, stacklevel=2)
                errors.append(error)
                continue
            if max_images is not None:
                stack = stack[: max_images - len(images)]
            images.extend(stack)
            kept.extend([Path(path)] * len(stack))
    finally:
        files.close()
    if not images:
        return np.empty((0, spec.channels, spec.height, spec.width), np.float32), kept, errors
    return np.stack(images), kept, errors
