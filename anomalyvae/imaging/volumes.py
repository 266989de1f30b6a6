"""NIfTI volumes, the one home: reading, model input, row names, masks and map files.

A volume is scored slice by slice: :func:`volume_slices` turns it into model input
(normalized per volume, each slice preprocessed as a 2-D image), :func:`slice_name` names
each slice's row, :func:`read_volume_mask` checks and reads a mask volume, and
:func:`write_volume_map` writes a scan's maps back on the volume's grid. Decoding itself
is :func:`anomalyvae.imaging.medical.read_nifti`. Torch-free.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from anomalyvae.imaging.io import (
    ImageReadError,
    MaskError,
    Preprocessing,
    atomic_path,
    preprocess,
    resize_mask,
)
from anomalyvae.imaging.medical import (
    MedicalReadError,
    Volume,
    normalize_intensity,
    read_nifti,
)


def read_volume(path: str | os.PathLike[str], axis: int = 2):
    """A NIfTI volume as (slices, h, w) stored values plus its affine; see medical.read_nifti."""
    try:
        return read_nifti(path, axis)
    except MedicalReadError as error:
        raise ImageReadError(path, error.reason, error.fix) from error


def volume_slices(
    path: str | os.PathLike[str],
    spec: Preprocessing,
    skip_background: bool = False,
    axis: int = 2,
    volume: Volume | None = None,
) -> NDArray[np.float32]:
    """Every slice of a NIfTI volume as model input (slices, c, h, w), normalized per volume.

    ``skip_background`` drops slices that are mostly empty (fewer than 10 % of pixels
    above 5 % of the volume's intensity range), as training on air teaches nothing.
    ``volume`` is the already decoded file, when the caller has it.
    """
    if volume is None:
        volume = read_volume(path, axis)
    method = "minmax" if spec.normalization == "none" else spec.normalization
    scaled = normalize_intensity(
        volume.data[..., None],
        method,
        spec.window_center,
        spec.window_width,
        spec.percentile_low,
        spec.percentile_high,
    )
    if skip_background:
        foreground = (scaled > 0.05).reshape(len(scaled), -1).mean(axis=1) >= 0.10
        scaled = scaled[foreground]
    out = np.empty((len(scaled), spec.channels, spec.height, spec.width), dtype=np.float32)
    for k, plane in enumerate(scaled):
        out[k] = preprocess(plane, spec)
    return out


def slice_name(name: str | os.PathLike[str], index: int) -> str:
    """The row name of one slice of a volume: ``name#slice=NNNN`` (0-based, 4 digits).

    The one naming rule of the scan's table, ``evaluate``'s scores and ``score``'s lines.
    A name is shown, never parsed back: a file may be called ``a#slice=1.png`` too.
    """
    return f"{name}#slice={index:04d}"


def read_volume_mask(
    mask_path: str | os.PathLike[str],
    volume: Volume,
    image_path: str | os.PathLike[str],
    size: tuple[int, int],
    threshold: float = 0.0,
) -> np.ndarray:
    """A NIfTI mask volume as (slices, h, w) booleans at ``size``, checked against its image.

    The mask must have the image's voxel grid: the same shape and the same affine (to
    1e-3 mm). ``threshold`` is a fraction of the mask's largest value (label volumes
    store 0/1 or 0/255).
    """
    mask = read_volume(mask_path)
    if mask.data.shape != volume.data.shape:
        raise MaskError(
            f"mask '{mask_path}' has {mask.data.shape[0]} slices of "
            f"{mask.data.shape[1]}x{mask.data.shape[2]} but its volume '{image_path}' has "
            f"{volume.data.shape[0]} of {volume.data.shape[1]}x{volume.data.shape[2]}; "
            "resample the mask onto the image grid (e.g. nibabel.processing."
            "resample_from_to(mask, image, order=0))"
        )
    if not np.allclose(mask.affine, volume.affine, atol=1e-3):
        raise MaskError(
            f"mask '{mask_path}' and its volume '{image_path}' have different affines "
            "(voxel-to-world mappings), so their voxels do not line up; resample the mask "
            "onto the image grid (e.g. nibabel.processing.resample_from_to(mask, image, "
            "order=0))"
        )
    scale = max(float(mask.data.max()), 1.0)
    defect = mask.data > threshold * scale
    out = np.zeros((len(defect), size[0], size[1]), dtype=bool)
    for k, plane in enumerate(defect):
        out[k] = resize_mask(plane, size)
    return out


def write_volume_map(source: Path, out_path: Path, maps: NDArray[np.float32]) -> None:
    """Write a volume's slice maps, resized to the slices, as NIfTI with the source affine."""
    import nibabel
    from PIL import Image

    volume = read_volume(source)
    _, height, width = volume.data.shape
    planes = [
        np.asarray(
            Image.fromarray(m.astype(np.float32), mode="F").resize(
                (width, height), Image.Resampling.BILINEAR
            )
        )
        for m in maps
    ]
    data = np.moveaxis(np.stack(planes), 0, 2)  # back to the source's (x, y, slice) order
    with atomic_path(out_path, keep_suffix=True) as tmp:  # nibabel reads .nii.gz from the name
        nibabel.save(nibabel.Nifti1Image(data.astype(np.float32), volume.affine), str(tmp))
