"""DICOM and NIfTI decoding and intensity normalization, torch-free.

MONAI's ``LoadImage`` wraps these same libraries (pydicom for DICOM, nibabel for NIfTI),
and its ``ScaleIntensityRange*`` transforms do the normalizations below. We read and
normalize with pydicom, nibabel and numpy directly because this module also serves the
ONNX inspection path, which must not import torch (MONAI does); the tests check that the
results equal MONAI's.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from anomalyvae.errors import AnomalyVAEError, InvalidValueError

NORMALIZATIONS = ("none", "minmax", "percentile", "window")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


class MedicalReadError(AnomalyVAEError, ValueError):
    """A DICOM or NIfTI file cannot be used; ``reason`` says why, ``fix`` what to do."""

    def __init__(self, reason: str, fix: str) -> None:
        self.reason, self.fix = reason, fix
        super().__init__(f"{reason} ({fix})")


class Volume(NamedTuple):
    """A decoded volume: ``data`` (d, h, w) float32 in stored units, the 4x4 ``affine``."""

    data: NDArray[np.float32]
    affine: NDArray[np.float64]
    bit_depth: int


def is_nifti(path: str | os.PathLike[str]) -> bool:
    """True for .nii and .nii.gz names."""
    name = Path(path).name.lower()
    return name.endswith(NIFTI_SUFFIXES)


def is_dicom(path: str | os.PathLike[str]) -> bool:
    """True for .dcm names, and for extensionless files with the DICM preamble."""
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        return True
    if path.suffix:
        return False
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


#: The elements a DICOM image keeps its pixels in: integer samples, and the float and
#: double samples of parametric maps (e.g. an MR diffusion ADC map).
PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class DicomFrame(NamedTuple):
    """One decoded DICOM frame.

    ``values`` (h, w) or (h, w, 3) in modality units (after rescale slope/intercept),
    the bits stored, and whether higher values display darker (``MONOCHROME1``: common
    in computed and digital radiography and mammography).
    """

    values: NDArray[np.float32]
    bits: int
    inverted: bool


def read_dicom(path: str | os.PathLike[str], frame: int = 0) -> DicomFrame:
    """Pixels of one frame of a DICOM in stored units, after rescale slope/intercept.

    ``frame``: which frame of a multi-frame object (decoded alone); the first by default.
    The values keep their units; ``inverted`` says the file shows them dark-for-high,
    which the reader turns round after normalization (bright is bright in every file).
    """
    return next(iter_dicom_frames(path, (frame,)))


def iter_dicom_frames(path: str | os.PathLike[str], frames: Sequence[int]) -> Iterator[DicomFrame]:
    """Each frame of ``frames`` as :func:`read_dicom` reads it, the file read once."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import pixel_array

    try:
        dataset = pydicom.dcmread(path)
    except InvalidDicomError as error:
        # pydicom's message tells a programmer to pass force=True: not a fix for a user
        raise MedicalReadError(
            "not a valid DICOM file (no DICOM file header, or the file is damaged)",
            "check the file is complete; an old headerless (ACR-NEMA) file needs converting "
            "to DICOM first, e.g. with DCMTK's dcmconv",
        ) from error
    if not any(key in dataset for key in PIXEL_DATA_KEYWORDS):
        raise MedicalReadError(
            "DICOM file has no pixel data (e.g. a structured report)", "score image objects only"
        )
    count = _frame_count(dataset)
    _check_frame_size(dataset)  # before a decoder allocates what the header claims
    syntax = getattr(dataset.file_meta, "TransferSyntaxUID", None)
    slope = float(getattr(dataset, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(dataset, "RescaleIntercept", 0.0) or 0.0)
    inverted = str(getattr(dataset, "PhotometricInterpretation", "")).strip() == "MONOCHROME1"
    for frame in frames:
        if not 0 <= frame < count:
            raise MedicalReadError(
                f"has no frame {frame} (it holds {count})", "name a frame it has"
            )
        try:
            pixels = pixel_array(dataset, index=frame) if count > 1 else dataset.pixel_array
        except Exception as error:  # pydicom names the plugin a compressed syntax needs
            if syntax is not None and not syntax.is_compressed:  # no plugin to blame
                raise MedicalReadError(
                    f"damaged DICOM pixel data ({error})", "check the file is complete"
                ) from error
            raise MedicalReadError(
                f"cannot decode DICOM pixel data with transfer syntax {syntax}: {error}",
                "decompress the file (e.g. DCMTK's dcmdjpeg), or install a decoder for "
                "it: python-gdcm, installed with anomalyvae, reads JPEG Lossless, JPEG-LS "
                "and JPEG 2000; 12-bit JPEG Extended needs pip install pylibjpeg "
                "pylibjpeg-libjpeg (GPL)",
            ) from error
        values = pixels.astype(np.float32) * slope + intercept
        bits = int(getattr(dataset, "BitsStored", pixels.dtype.itemsize * 8))
        yield DicomFrame(values, bits, inverted)


def _check_frame_size(dataset: Any) -> None:
    """A :class:`MedicalReadError` when a frame is larger than any image may be."""
    try:
        rows, columns = int(dataset.Rows), int(dataset.Columns)
        samples = int(getattr(dataset, "SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError) as error:
        raise MedicalReadError(
            "DICOM image without a readable size (Rows, Columns)", "check the file is complete"
        ) from error
    if rows * columns > MAX_SLICE_PIXELS or samples > 4:
        raise MedicalReadError(
            f"DICOM frames are too large ({columns} x {rows} pixels, {samples} samples; the "
            f"limit is {MAX_SLICE_PIXELS:,} pixels, as for any image)",
            "split or downscale it before scoring",
        )


def _frame_count(dataset: Any) -> int:
    try:
        return max(1, int(getattr(dataset, "NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):  # a malformed count: the pixel data still has a frame
        return 1


def dicom_frame_count(path: str | os.PathLike[str]) -> int:
    """How many frames a DICOM object holds, read from its header (1 when unsure).

    Raises :class:`MedicalReadError` when the header claims more frames than the file
    can hold (each frame takes at least a byte) or than any volume may (``MAX_VOXELS``):
    a damaged or hostile count must not make a reader list a billion frames.
    """
    import pydicom

    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # an unreadable file: read_dicom names its error
        return 1
    frames = _frame_count(dataset)
    if frames > 1:
        _check_frame_size(dataset)  # a frame too large for any image is named as such
        pixels = max(1, int(dataset.Rows) * int(dataset.Columns))
        limit = min(os.path.getsize(path), MAX_VOXELS // pixels)
        if frames > limit:
            raise MedicalReadError(
                f"the DICOM header claims {frames:,} frames, more than the file (or any "
                f"volume: {MAX_VOXELS:,} voxels) can hold",
                "check the file is complete",
            )
    return frames


#: Largest slice a NIfTI volume may have, in pixels: the limit every 2-D image has
#: (Pillow's decompression-bomb limit), so a volume is no way around it.
MAX_SLICE_PIXELS = 89_478_485
#: Largest volume, in voxels (1 GiB as float32), checked on the header before the
#: voxels are read.
MAX_VOXELS = 1 << 28


class NiftiSlices:
    """A NIfTI file read one slice at a time: memory of one slice, whatever the volume.

    The header is checked on opening (2-D or 3-D, ``MAX_SLICE_PIXELS`` per slice,
    ``MAX_VOXELS`` in all) before any voxel is read; :meth:`read` returns slice ``k``
    along ``axis`` as (h, w) float32 in stored units (``scl_slope``/``scl_inter``
    applied), refusing NaN or infinite voxels. Slices read in order decompress a
    ``.nii.gz`` once (the file is kept open).
    """

    def __init__(self, path: str | os.PathLike[str], axis: int = 2) -> None:
        import nibabel

        self.path, self.axis = Path(path), axis
        try:
            self._image = nibabel.load(str(path), keep_file_open=True)
        except Exception as error:
            raise MedicalReadError(
                f"not a readable NIfTI file ({error})", "check the file is complete"
            ) from error
        stored = tuple(int(n) for n in self._image.shape)
        shape = stored
        while len(shape) > 3 and shape[-1] == 1:  # (x, y, z, 1): one time point or channel
            shape = shape[:-1]
        #: indices that pick the one entry of each trailing singleton dimension
        self._rest = (0,) * (len(stored) - len(shape))
        self._dims = len(shape)
        if len(shape) not in (2, 3):
            raise MedicalReadError(
                f"NIfTI image has {len(shape)} dimensions {shape}; only 2-D and 3-D are scored",
                "extract one time point or channel (e.g. with nibabel) first",
            )
        self._shape3 = shape if len(shape) == 3 else (*shape, 1)
        self._axis = axis if len(shape) == 3 else 2
        plane = [n for i, n in enumerate(self._shape3) if i != self._axis]
        if int(np.prod(plane)) > MAX_SLICE_PIXELS:
            raise MedicalReadError(
                f"NIfTI slices are too large ({plane[1]} x {plane[0]} pixels; the limit is "
                f"{MAX_SLICE_PIXELS:,} pixels, as for any image)",
                "crop or downsample the volume before scoring",
            )
        if int(np.prod(shape)) > MAX_VOXELS:
            raise MedicalReadError(
                f"NIfTI volume is too large ({' x '.join(map(str, shape))} voxels; the limit "
                f"is {MAX_VOXELS:,})",
                "split it into smaller volumes before scoring",
            )
        #: (slices, h, w) as :func:`read_nifti` returns them
        self.shape = (self._shape3[self._axis], plane[0], plane[1])
        self.affine = np.asarray(self._image.affine, dtype=np.float64)
        self.bit_depth = int(np.dtype(self._image.get_data_dtype()).itemsize * 8)

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, k: int) -> NDArray[np.float32]:
        """Slice ``k`` (0-based, along ``axis``) as (h, w) float32 in stored units."""
        index: list[Any] = [slice(None)] * 3
        index[self._axis] = k
        try:
            proxy = self._image.dataobj
            index = index if self._dims == 3 else [slice(None)] * 2
            data = proxy[(*index, *self._rest)]
            plane = np.asarray(data, dtype=np.float32)
        except Exception as error:
            raise MedicalReadError(
                f"not a readable NIfTI file ({error})", "check the file is complete"
            ) from error
        if not np.isfinite(plane).all():
            raise MedicalReadError(
                "NIfTI image contains NaN or infinite voxels",
                "replace them (e.g. with the background value) first",
            )
        return np.ascontiguousarray(plane)

    def close(self) -> None:
        """Let go of the file (also when the object is dropped)."""
        opener = getattr(self._image.dataobj, "_opener", None)
        if opener is not None and hasattr(opener, "close"):
            opener.close()


def read_nifti(path: str | os.PathLike[str], axis: int = 2) -> Volume:
    """A 2-D or 3-D NIfTI image as (slices, h, w) along ``axis`` (2 = axial in RAS order).

    4-D images are refused (choose a time point or channel first), unless their further
    dimensions are 1, as some tools write a single volume (x, y, z, 1). The header's shape is
    checked against ``MAX_SLICE_PIXELS`` and ``MAX_VOXELS`` before any voxel is read.
    The whole volume in memory: :class:`NiftiSlices` reads one slice at a time.
    """
    reader = NiftiSlices(path, axis)
    try:
        data = np.empty(reader.shape, dtype=np.float32)
        for k in range(len(reader)):
            data[k] = reader.read(k)
    finally:
        reader.close()
    return Volume(data, reader.affine, reader.bit_depth)


def normalize_intensity(
    raw: NDArray[np.floating],
    method: str,
    window_center: float | None = None,
    window_width: float | None = None,
    percentile_low: float = 1.0,
    percentile_high: float = 99.0,
) -> NDArray[np.float32]:
    """Map stored intensities to [0, 1].

    - minmax: (x - min) / (max - min) per image (MONAI ``ScaleIntensity``);
    - percentile: clip to the image's [low, high] percentiles, then scale (MONAI
      ``ScaleIntensityRangePercentiles(lower, upper, 0, 1, clip=True)``);
    - window: clip to center +- width / 2, then scale, as for CT (MONAI
      ``ScaleIntensityRange(center - width/2, center + width/2, 0, 1, clip=True)``).
    """
    values = np.asarray(raw, dtype=np.float32)
    low, high = intensity_range(
        values, method, window_center, window_width, percentile_low, percentile_high
    )
    if high <= low:
        return np.zeros_like(values, dtype=np.float32)
    return np.clip((values - low) / (high - low), 0.0, 1.0).astype(np.float32)


def intensity_range(
    raw: NDArray[np.floating],
    method: str,
    window_center: float | None = None,
    window_width: float | None = None,
    percentile_low: float = 1.0,
    percentile_high: float = 99.0,
) -> tuple[float, float]:
    """The stored values (low, high) that :func:`normalize_intensity` maps to 0 and 1."""
    values = np.asarray(raw, dtype=np.float32)
    if method == "minmax":
        low, high = float(values.min()), float(values.max())
    elif method == "percentile":
        if not 0 <= percentile_low < percentile_high <= 100:
            raise InvalidValueError(
                "percentiles must satisfy 0 <= low < high <= 100, got "
                f"{percentile_low}, {percentile_high}"
            )
        low, high = (float(v) for v in np.percentile(values, [percentile_low, percentile_high]))
    elif method == "window":
        if window_center is None or window_width is None or window_width <= 0:
            raise InvalidValueError(
                "window normalization needs window_center and a positive window_width"
            )
        low, high = window_center - window_width / 2, window_center + window_width / 2
    else:
        raise InvalidValueError(
            f"normalization must be one of {NORMALIZATIONS[1:]}, got {method!r}"
        )
    return low, high
