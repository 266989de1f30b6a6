"""NIfTI volumes, the one home: reading, model input, row names, masks and map files.

A volume is scored slice by slice: :func:`volume_slices` turns it into model input
(normalized per volume, each slice preprocessed as a 2-D image), :func:`slice_name` names
each slice's row, :func:`read_volume_mask` checks and reads a mask volume, and
:func:`write_volume_map` writes a scan's maps back on the volume's grid. Decoding itself
is :func:`anomalyvae.imaging.medical.read_nifti`. Torch-free.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from anomalyvae.imaging.files import atomic_path
from anomalyvae.imaging.io import ImageReadError
from anomalyvae.imaging.medical import (
    MedicalReadError,
    NiftiSlices,
    Volume,
    intensity_range,
    read_nifti,
)
from anomalyvae.imaging.preprocessing import MaskError, Preprocessing, preprocess, resize_mask


def read_volume(path: str | os.PathLike[str], axis: int = 2):
    """A NIfTI volume as (slices, h, w) stored values plus its affine; see medical.read_nifti."""
    try:
        return read_nifti(path, axis)
    except MedicalReadError as error:
        raise ImageReadError(path, error.reason, error.fix) from error


#: Voxels a volume's percentile range is read from: all of them up to this many, else
#: an even sample of this size (the percentiles then move by far less than a grey level).
PERCENTILE_SAMPLE = 1 << 24


class _Planes:
    """A volume's raw slices: from a decoded :class:`Volume`, or read one at a time."""

    def __init__(self, path: Path, axis: int, volume: Volume | None) -> None:
        self._volume, self._reader = volume, None
        if volume is None:
            try:
                self._reader = NiftiSlices(path, axis)
            except MedicalReadError as error:
                raise ImageReadError(path, error.reason, error.fix) from error
        self.path = path
        self.shape = volume.data.shape if volume is not None else self._reader.shape

    def read(self, k: int) -> NDArray[np.float32]:
        if self._volume is not None:
            return self._volume.data[k]
        try:
            return self._reader.read(k)
        except MedicalReadError as error:
            raise ImageReadError(self.path, error.reason, error.fix) from error

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


class VolumeInput:
    """A NIfTI volume as model input, a block of slices at a time, normalized per volume.

    Opening reads the volume once for its intensity range (min and max, or the
    percentiles of at most ``PERCENTILE_SAMPLE`` voxels) with one slice in memory;
    :meth:`blocks` then reads the slices again, in order, as model input. Memory: one
    raw slice and one block, whatever the volume's size. ``volume``: the already decoded
    file, when the caller has it. Picklable (no open file between calls).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        spec: Preprocessing,
        axis: int = 2,
        volume: Volume | None = None,
    ) -> None:
        self.path, self.spec, self.axis, self._volume = Path(path), spec, axis, volume
        planes = _Planes(self.path, axis, volume)
        try:
            #: (slices, h, w) of the stored volume
            self.shape: tuple[int, int, int] = tuple(int(n) for n in planes.shape)
            self.low, self.high = _volume_range(planes, len(self), spec)
        finally:
            planes.close()

    def __len__(self) -> int:
        return self.shape[0]

    def plane(self, raw: NDArray[np.float32]) -> NDArray[np.float32]:
        """A raw slice (h, w) normalized with the volume's range, (h, w, 1) in [0, 1]."""
        if self.high <= self.low:
            return np.zeros((*raw.shape, 1), dtype=np.float32)
        scaled = (raw[..., None] - np.float32(self.low)) / np.float32(self.high - self.low)
        return np.clip(scaled, 0.0, 1.0).astype(np.float32)

    def blocks(
        self, size: int, skip_background: bool = False
    ) -> Iterator[tuple[NDArray[np.int64], NDArray[np.float32]]]:
        """(slice indices, model input (m, c, h, w)) of at most ``size`` slices each.

        ``skip_background`` drops slices that are mostly empty (fewer than 10 % of
        pixels above 5 % of the volume's intensity range).
        """
        spec = self.spec
        planes = _Planes(self.path, self.axis, self._volume)
        try:
            index: list[int] = []
            block: list[NDArray[np.float32]] = []
            for k in range(len(self)):
                scaled = self.plane(planes.read(k))
                if skip_background and (scaled > 0.05).mean() < 0.10:
                    continue
                index.append(k)
                block.append(preprocess(scaled, spec))
                if len(block) >= size:
                    yield np.array(index, dtype=np.int64), np.stack(block)
                    index, block = [], []
            if block:
                yield np.array(index, dtype=np.int64), np.stack(block)
        finally:
            planes.close()

    def stack(self, skip_background: bool = False) -> NDArray[np.float32]:
        """Every (kept) slice as model input (slices, c, h, w)."""
        spec = self.spec
        parts = [block for _, block in self.blocks(64, skip_background)]
        if not parts:
            return np.empty((0, spec.channels, spec.height, spec.width), dtype=np.float32)
        return np.concatenate(parts)


def _volume_range(planes: _Planes, n: int, spec: Preprocessing) -> tuple[float, float]:
    """The stored (low, high) a volume's normalization maps to 0 and 1, slice by slice."""
    method = "minmax" if spec.normalization == "none" else spec.normalization
    args = (spec.window_center, spec.window_width, spec.percentile_low, spec.percentile_high)
    if method == "window":
        return intensity_range(np.zeros(1, np.float32), method, *args)
    if method == "minmax":
        low, high = np.inf, -np.inf
        for k in range(n):
            plane = planes.read(k)
            low, high = min(low, float(plane.min())), max(high, float(plane.max()))
        return low, high
    total = n * int(np.prod(planes.shape[1:]))
    step = max(1, -(-total // PERCENTILE_SAMPLE))
    sample = np.concatenate([planes.read(k).ravel()[::step] for k in range(n)])
    return intensity_range(sample, method, *args)


def read_slice(path: str | os.PathLike[str], k: int, axis: int = 2) -> NDArray[np.float32]:
    """Slice ``k`` of a NIfTI volume in stored units (h, w), read alone."""
    planes = _Planes(Path(path), axis, None)
    try:
        return planes.read(k)
    finally:
        planes.close()


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
    ``volume`` is the already decoded file, when the caller has it. Read slice by slice
    (:class:`VolumeInput`): memory of the model input, not of the stored volume.
    """
    return VolumeInput(path, spec, axis, volume).stack(skip_background)


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
