"""How a decoded image becomes model input: the preprocessing spec, resizing, masks.

:class:`Preprocessing` is stored with every model (and in the ONNX metadata), so training,
scoring and the inspection line turn a file into the same input. Decoding the file comes
before: :mod:`anomalyvae.imaging.io`. numpy and Pillow only (the torch-free ONNX path
imports it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from anomalyvae.errors import AnomalyVAEError, InvalidValueError
from anomalyvae.imaging.io import (
    DecodedImage,
    ImageReadError,
    content_frames,
    iter_frames,
    read_image,
)
from anomalyvae.imaging.medical import NORMALIZATIONS, normalize_intensity

RESIZE_METHODS: tuple[str, ...] = ("bilinear", "bicubic", "area", "nearest")
MONOCHROME1_RULES: tuple[str, ...] = ("invert", "as_stored")
_PIL_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
}
# ITU-R BT.601 luma, the weights Pillow's "L" conversion uses, so colour files turn
# grey the same way on every path.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class MaskError(AnomalyVAEError, ValueError):
    """A mask is missing, unreadable or does not match its image."""


@dataclass(frozen=True)
class Preprocessing:
    """How a decoded image becomes model input; stored with every model.

    Attributes
    ----------
    channels : int
        1 (grayscale, BT.601 luma) or 3 (RGB; grayscale is replicated).
    height, width : int
        Model input size in pixels.
    resize : str
        Pillow resampling filter: "bilinear", "bicubic", "area" (box) or "nearest".
        Pillow filters are antialiased when shrinking.
    scaling : str
        "dtype_max": integer images are divided by their type's maximum
        (255 for 8-bit, 65535 for 16-bit); float, DICOM and NIfTI images are min-max
        scaled, unless ``normalization`` says otherwise.
    normalization : str
        Intensity normalization on stored values, before resizing: "none",
        "minmax", "percentile" (``percentile_low``/``percentile_high``) or "window"
        (``window_center``/``window_width``, e.g. CT Hounsfield units); see
        :func:`anomalyvae.imaging.medical.normalize_intensity`.
    monochrome1 : str
        A dark-for-high DICOM (``MONOCHROME1``): "invert" (default) turns it round after
        normalization, so that bright is bright in every file; "as_stored" keeps the
        values' orientation, as models saved before this setting read it (a stored spec
        without the key is read so).
    """

    channels: int
    height: int
    width: int
    resize: str = "bilinear"
    scaling: str = "dtype_max"
    normalization: str = "none"
    window_center: float | None = None
    window_width: float | None = None
    percentile_low: float = 1.0
    percentile_high: float = 99.0
    monochrome1: str = "invert"

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise InvalidValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.height < 8 or self.width < 8:
            raise InvalidValueError(
                f"image size must be at least 8x8, got {self.height}x{self.width}"
            )
        if self.resize not in RESIZE_METHODS:
            raise InvalidValueError(f"resize must be one of {RESIZE_METHODS}, got {self.resize!r}")
        if self.scaling != "dtype_max":
            raise InvalidValueError(f"scaling must be 'dtype_max', got {self.scaling!r}")
        if self.normalization not in NORMALIZATIONS:
            raise InvalidValueError(
                f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}"
            )
        if self.normalization == "window" and (
            self.window_center is None or not (self.window_width or 0) > 0
        ):
            raise InvalidValueError(
                "normalization 'window' needs window_center and a positive window_width"
            )
        if self.monochrome1 not in MONOCHROME1_RULES:
            raise InvalidValueError(
                f"monochrome1 must be one of {MONOCHROME1_RULES}, got {self.monochrome1!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        names = {f.name for f in fields(cls)}
        data = {"monochrome1": "as_stored", **data}  # saved before the setting existed
        return cls(**{k: v for k, v in data.items() if k in names})

    def turns(self, decoded: DecodedImage) -> bool:
        """Whether ``decoded``'s normalized values are turned round (1 - x) as input."""
        return decoded.inverted and self.monochrome1 == "invert"


def is_grayscale(pixels: NDArray[np.float32], tolerance: float = 2.0 / 255.0) -> bool:
    """Return True when an (h, w, c) image carries no colour (c == 1 or equal channels)."""
    if pixels.shape[2] == 1:
        return True
    return bool(
        np.abs(pixels[:, :, 0] - pixels[:, :, 1]).max() <= tolerance
        and np.abs(pixels[:, :, 1] - pixels[:, :, 2]).max() <= tolerance
    )


def to_channels(pixels: NDArray[np.float32], channels: int) -> NDArray[np.float32]:
    """Convert an (h, w, c) image to ``channels`` (1: BT.601 luma; 3: RGB)."""
    have = pixels.shape[2]
    if have == channels:
        return pixels
    if channels == 1:
        return (pixels[:, :, :3] @ _LUMA)[:, :, None].astype(np.float32)
    if channels == 3:
        return np.repeat(pixels[:, :, :1], 3, axis=2)
    raise InvalidValueError(f"channels must be 1 or 3, got {channels}")


def resize(
    pixels: NDArray[np.float32], height: int, width: int, method: str = "bilinear"
) -> NDArray[np.float32]:
    """Resize an (h, w, c) float image channel by channel with a Pillow filter."""
    if pixels.shape[0] == height and pixels.shape[1] == width:
        return pixels
    if method not in _PIL_RESAMPLE:
        raise InvalidValueError(f"resize method must be one of {RESIZE_METHODS}, got {method!r}")
    planes = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(pixels[:, :, k]), mode="F").resize(
                (width, height), _PIL_RESAMPLE[method]
            )
        )
        for k in range(pixels.shape[2])
    ]
    return np.clip(np.stack(planes, axis=2), 0.0, 1.0).astype(np.float32)


def preprocess(pixels: NDArray[np.float32], spec: Preprocessing) -> NDArray[np.float32]:
    """Turn a decoded (h, w, c) image into model input of shape (c, height, width)."""
    pixels = to_channels(pixels, spec.channels)
    pixels = resize(pixels, spec.height, spec.width, spec.resize)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)


def intensities(decoded: DecodedImage, spec: Preprocessing) -> NDArray[np.float32]:
    """The decoded image in [0, 1] under ``spec.normalization`` (on stored values).

    A window or percentiles apply to the stored values (Hounsfield units stay units); a
    dark-for-high file (DICOM ``MONOCHROME1``) is turned round after, so that bright is
    bright whatever the modality wrote (``spec.monochrome1``).
    """
    if spec.normalization == "none":
        # the pixels are bright-for-high already; a model that reads files as stored
        # gets a dark-for-high file's orientation back
        keep_stored = decoded.inverted and not spec.turns(decoded)
        return 1.0 - decoded.pixels if keep_stored else decoded.pixels
    source = decoded.raw if decoded.raw is not None else decoded.pixels
    scaled = normalize_intensity(
        source,
        spec.normalization,
        spec.window_center,
        spec.window_width,
        spec.percentile_low,
        spec.percentile_high,
    )
    return 1.0 - scaled if spec.turns(decoded) else scaled


def model_input(
    path: str | os.PathLike[str], decoded: DecodedImage, spec: Preprocessing
) -> NDArray[np.float32]:
    """A decoded image (or frame) as model input (c, h, w): normalized and resized.

    A blank image (one value in every pixel: a covered lens, a dead camera, an empty
    render) is an :class:`ImageReadError`: it holds nothing to score, and a model would
    call it normal as readily as anything (a background-like frame scores lowest).
    """
    values = decoded.raw if decoded.raw is not None else decoded.pixels
    if values.size and float(values.max()) == float(values.min()):
        what = (
            "a single pixel"
            if values.shape[0] * values.shape[1] == 1
            else f"blank (every pixel holds {float(values.flat[0]):g})"
        )
        raise ImageReadError(
            path,
            f"the image is {what}",
            "check the camera, the exposure or the file: a blank image has nothing to score",
        )
    return preprocess(intensities(decoded, spec), spec)


def load_image(
    path: str | os.PathLike[str], spec: Preprocessing, frames: Sequence[int] | None = None
) -> NDArray[np.float32]:
    """Read and preprocess one file to (c, h, w) float32 in [0, 1].

    A file of several images (see :func:`content_frames`) is an error here: one score
    for it would speak for its first frame alone. :func:`load_frames` reads them all.
    ``frames``: the file's :func:`content_frames`, when the caller has listed them.
    """
    frames = content_frames(path) if frames is None else frames
    if len(frames) > 1:
        raise ImageReadError(
            path,
            f"holds {len(frames)} images (pages or frames), not one",
            "score it with `anomalyvae scan` or `anomalyvae score` (a row per frame), or "
            "save each frame as its own file",
        )
    return model_input(path, read_image(path, max(spec.height, spec.width), frames[0]), spec)


def load_frames(
    path: str | os.PathLike[str], spec: Preprocessing, frames: Sequence[int] | None = None
) -> Iterator[tuple[int, NDArray[np.float32]]]:
    """``(k, model input (c, h, w))`` for each image frame of a file, one at a time.

    ``frames``: which (default: :func:`content_frames`). Each frame is preprocessed as a
    file of its own would be.
    """
    frames = content_frames(path) if frames is None else frames
    for k, decoded in iter_frames(path, frames, max(spec.height, spec.width)):
        yield k, model_input(path, decoded, spec)


def read_mask(
    path: str | os.PathLike[str],
    size: tuple[int, int] | None = None,
    threshold: float = 0.0,
    expected_shape: tuple[int, int] | None = None,
) -> NDArray[np.bool_]:
    """Read a defect mask as a boolean (h, w) array; values above ``threshold`` are defect.

    ``threshold`` is a fraction of full scale: 0.0 means "nonzero is defect"; 0.5
    suits masks with soft anti-aliased edges. ``expected_shape`` (h, w) is the source
    image's size, checked before resizing; ``size`` (h, w) resizes the mask (area
    average, then >= 0.5), as the image is resized.
    """
    try:
        decoded = read_image(path)
    except ImageReadError as error:
        raise MaskError(f"cannot read mask '{path}': {error.reason}") from error
    if expected_shape is not None and (decoded.height, decoded.width) != tuple(expected_shape):
        raise MaskError(
            f"mask '{path}' is {decoded.height}x{decoded.width} but its image is "
            f"{expected_shape[0]}x{expected_shape[1]}; masks must match their image's size"
        )
    mask = to_channels(decoded.pixels, 1)[:, :, 0] > threshold
    return mask if size is None else resize_mask(mask, size)


def resize_mask(mask: NDArray[np.bool_], size: tuple[int, int]) -> NDArray[np.bool_]:
    """A boolean (h, w) mask at ``size`` (h, w): area average, then >= 0.5, as images."""
    if mask.shape == tuple(size):
        return mask
    area = resize(mask.astype(np.float32)[:, :, None], size[0], size[1], "area")
    return area[:, :, 0] >= 0.5
