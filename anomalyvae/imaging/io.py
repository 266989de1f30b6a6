"""Decoding image files to float32 arrays in [0, 1]: formats, bit depths, frames.

Finding the files and writing them atomically: :mod:`anomalyvae.imaging.files`; how a
decoded image becomes model input (the preprocessing spec, resizing, masks):
:mod:`anomalyvae.imaging.preprocessing`.

This module is imported by the torch-free ONNX path, so it uses numpy and Pillow only.
Decoding keeps the source precision: 16-bit images are scaled by 65535, never squeezed
through 8 bits, and the bit depth is reported so it can be written into the model card.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageFile, UnidentifiedImageError

from anomalyvae.errors import AnomalyVAEError, InvalidValueError
from anomalyvae.imaging.files import atomic_write_bytes, display_path
from anomalyvae.imaging.medical import (
    MedicalReadError,
    dicom_frame_count,
    is_dicom,
    is_nifti,
    iter_dicom_frames,
    normalize_intensity,
    read_nifti,
)


class ImageReadError(AnomalyVAEError, ValueError):
    """An image file could not be decoded; the message names the file and a fix."""

    def __init__(self, path: str | os.PathLike[str], reason: str, fix: str = "") -> None:
        self.path = Path(path)
        self.reason = reason
        self.fix = fix or "check that the file is a complete, supported image"
        # any file name survives the message (a non-UTF-8 byte shows as \xNN)
        super().__init__(f"cannot read image '{display_path(self.path)}': {reason} ({self.fix})")


class DecodedImage(NamedTuple):
    """A decoded image: ``pixels`` of shape (h, w, c), float32 in [0, 1]."""

    pixels: NDArray[np.float32]
    bit_depth: int
    mode: str
    raw: NDArray[np.float32] | None = None  # stored units (16-bit, DICOM, NIfTI), (h, w, c)
    #: (height, width) of the file when it was decoded reduced (see :func:`read_image`)
    stored_size: tuple[int, int] | None = None
    #: the stored values display dark-for-high (DICOM ``MONOCHROME1``): ``pixels`` are
    #: turned round (1 - x), and the model input too where the spec says so
    #: (:meth:`Preprocessing.turns`)
    inverted: bool = False

    @property
    def height(self) -> int:
        """The file's own height (also when it was decoded reduced)."""
        return int(self.stored_size[0] if self.stored_size else self.pixels.shape[0])

    @property
    def width(self) -> int:
        """The file's own width (also when it was decoded reduced)."""
        return int(self.stored_size[1] if self.stored_size else self.pixels.shape[1])

    @property
    def channels(self) -> int:
        return int(self.pixels.shape[2])


#: Images are decoded reduced when their long side is at least this many times the
#: model input's long side (JPEG: DCT scaling; other formats: box-filter ``reduce``),
#: down to about twice the input size. A 8000 x 8000 photo for a 256 px model then
#: takes tens of MB, not gigabytes; smaller images are decoded in full.
REDUCE_FACTOR = 4
#: Largest image decoded at all: Pillow's decompression-bomb limit (about 89
#: megapixels); larger files become "image is too large" errors.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS


def read_image(
    path: str | os.PathLike[str], max_side: int | None = None, frame: int | None = None
) -> DecodedImage:
    """Decode an image file to float32 (h, w, c) in [0, 1], keeping its bit depth.

    With ``max_side`` (the model input's long side), a much larger image is decoded
    reduced by an integer factor (see ``REDUCE_FACTOR``) to bound memory and time;
    ``width``/``height`` of the result still give the file's own size. ``frame`` picks
    one frame of a multi-frame file (:func:`content_frames` lists them); by default the
    first that is an image (a TIFF may open with a thumbnail page).

    Raises
    ------
    ImageReadError
        When the file is missing, unreadable, truncated, too large or not an image.
    """
    if frame is None:
        frame = content_frames(path)[0]
    frames = iter_frames(path, (frame,), max_side)
    try:
        return next(frames)[1]
    finally:
        frames.close()  # the file is closed now, not when the generator is collected


def stored_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(height, width) of the image :func:`read_image` reads from ``path``, as stored.

    Read from the header where Pillow opens the file, so nothing is decoded: checking
    that a mask fits its image costs no second decode of the image. A DICOM or NIfTI
    file, or one whose header cannot be read, is decoded (an unreadable file raises the
    :class:`ImageReadError` of :func:`read_image`).
    """
    path = Path(path)
    check_regular_file(path)  # never open a FIFO or device: opening it could block
    frame = content_frames(path)[0]
    if not (is_nifti(path) or is_dicom(path)):
        try:
            with Image.open(path) as image:
                image.seek(frame)
                return image.height, image.width
        except Exception:  # decoded below, which names the cause
            pass
    decoded = read_image(path, frame=frame)
    return decoded.height, decoded.width


#: Formats whose further frames are images of their own (pages, animation frames), so a
#: file of several is scored frame by frame. Other formats' further frames are previews,
#: layers or icon sizes (JPEG's MPO, PSD, ICO): their first frame is the image.
FRAME_FORMATS = frozenset({"TIFF", "GIF", "WEBP", "PNG"})
#: TIFF ``NewSubfileType`` bits of a page that is not an image of its own: a
#: reduced-resolution copy (bit 0) or a transparency mask (bit 2).
_TIFF_AUXILIARY = 0b101


def content_frames(path: str | os.PathLike[str]) -> tuple[int, ...]:
    """The frames of a file that are images of their own: ``(0,)`` for a single image.

    Multi-page TIFF (reduced-resolution copies and masks left out), animated GIF, WebP
    and PNG, and multi-frame DICOM have several. A file that cannot be opened gives
    ``(0,)``: :func:`read_image` then names its error.

    Raises
    ------
    ImageReadError
        When a file of several frames cannot list them (damaged): scoring its first
        frame alone would pass the others unseen.
    """
    path = Path(path)
    try:
        check_regular_file(path)
        if is_nifti(path):
            return (0,)
        if is_dicom(path):
            return tuple(range(dicom_frame_count(path)))
        image = Image.open(path)
    except MedicalReadError as error:  # a frame count the file cannot hold
        raise ImageReadError(path, error.reason, error.fix) from error
    except Exception:  # unreadable here: read_image reports it with its cause
        return (0,)
    with image:
        try:
            if image.format not in FRAME_FORMATS or getattr(image, "n_frames", 1) < 2:
                return (0,)
            frames = []
            for k in range(image.n_frames):
                image.seek(k)
                kind = image.tag_v2.get(254, 0) if image.format == "TIFF" else 0
                if not int(kind) & _TIFF_AUXILIARY:
                    frames.append(k)
        except Exception as error:
            raise ImageReadError(
                path, f"a damaged file of several frames ({error})", "check the file is complete"
            ) from error
    return tuple(frames) or (0,)


def iter_frames(
    path: str | os.PathLike[str], frames: Sequence[int], max_side: int | None = None
) -> Iterator[tuple[int, DecodedImage]]:
    """``(k, image)`` for each frame ``k`` of ``frames``, decoded as :func:`read_image` does.

    The file is opened once: an animated GIF decodes its frames in order.
    """
    path = Path(path)
    check_regular_file(path)  # never open a FIFO or device: reading it could block
    if is_nifti(path) or is_dicom(path):
        yield from zip(frames, _read_medical(path, frames), strict=False)
        return
    try:
        # Pillow only warns between one and two times its limit; the limit is checked
        # here on the header, not by a warnings filter: filters are process-wide, and
        # the scan decodes on several threads at once (one thread's filter would leak
        # into, or be lifted under, another's decode).
        with Image.open(path) as image:
            for k in frames:
                if not 0 <= k < getattr(image, "n_frames", 1):
                    raise ImageReadError(
                        path,
                        f"has no frame {k} (it holds {getattr(image, 'n_frames', 1)})",
                        "name a frame it has",
                    )
                image.seek(k)
                yield k, _decode_frame(path, image, k, max_side)
    except ImageReadError:
        raise
    except FileNotFoundError as error:
        raise ImageReadError(path, "file not found", "check the path") from error
    except PermissionError as error:
        raise ImageReadError(path, "permission denied", "make the file readable") from error
    except Image.DecompressionBombError as error:
        raise ImageReadError(
            path, f"image is too large ({error})", "split or downscale it before scoring"
        ) from error
    except UnidentifiedImageError as error:
        raise ImageReadError(path, "not a recognised image format") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageReadError(path, f"corrupt or truncated image ({error})") from error


def _decode_frame(path: Path, image: Image.Image, frame: int, max_side: int | None) -> DecodedImage:
    """The frame ``image`` is at, decoded (reduced when far larger than ``max_side``)."""
    stored = (image.height, image.width)
    if MAX_PIXELS and stored[0] * stored[1] > MAX_PIXELS:
        raise ImageReadError(
            path,
            f"image is too large ({stored[1]} x {stored[0]} pixels; the limit is "
            f"{MAX_PIXELS:,} pixels)",
            "split or downscale it before scoring",
        )
    factor = 1
    if max_side and max(stored) >= REDUCE_FACTOR * max_side:
        factor = max(stored) // (2 * max_side)
        if image.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 scale
            image.draft(image.mode, (stored[1] // factor, stored[0] // factor))
    if _wide_colour(image):
        return _read_wide_colour(path, stored, factor, frame)
    image.load()
    if factor > 1 and image.size == (stored[1], stored[0]):
        image = _reduce(image, factor)
    decoded = _decode(image)
    if decoded.pixels.shape[:2] != stored:
        decoded = decoded._replace(stored_size=stored)
    return decoded


def check_regular_file(path: Path) -> None:
    """An :class:`ImageReadError` unless ``path`` is a regular file (links followed).

    A FIFO, socket or device is refused before it is opened (opening or reading one can
    block forever), and a link to nothing is called a broken link, not a missing file.
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as error:
        if path.is_symlink():
            raise ImageReadError(
                path, "broken link (it points to nothing)", "fix or remove the link"
            ) from error
        raise ImageReadError(path, "file not found", "check the path") from error
    except OSError as error:  # a link loop, a name too long
        reason = "link loop" if error.errno == errno.ELOOP else (error.strerror or str(error))
        raise ImageReadError(path, reason, "fix or remove the link or file") from error
    if not stat.S_ISREG(mode):
        kind = (
            "a FIFO"
            if stat.S_ISFIFO(mode)
            else "a folder"
            if stat.S_ISDIR(mode)
            else ("not a regular file")
        )
        raise ImageReadError(path, f"{kind}, so it was not read", "score regular image files only")


#: Pillow decodes 16 bits per colour channel (48-bit RGB and 64-bit RGBA PNG or TIFF) to
#: 8 bits by keeping each sample's high byte. The same stream decoded with the byte order
#: swapped yields the low bytes (the unfiltering is the same: it depends on the bytes
#: per pixel only), so two decodes give the full 16 bits.
_SWAPPED_BYTE_ORDER = {
    "RGB;16B": "RGB;16L",
    "RGB;16L": "RGB;16B",
    "RGBA;16B": "RGBA;16L",
    "RGBA;16L": "RGBA;16B",
}


def _wide_colour(image: Image.Image) -> bool:
    """True for a 16-bit-per-channel colour image that Pillow would cut to 8 bits."""
    tiles = getattr(image, "tile", None) or []
    return bool(tiles) and all(
        isinstance(tile[3], str) and tile[3] in _SWAPPED_BYTE_ORDER for tile in tiles
    )


def _read_wide_colour(
    path: Path, stored: tuple[int, int], factor: int, frame: int = 0
) -> DecodedImage:
    """Decode a 48/64-bit colour file to 16-bit RGB (alpha dropped, as for 8-bit files)."""
    planes = []
    for swap in (False, True):
        with Image.open(path) as image:
            image.seek(frame)
            if swap:
                image.tile = [
                    tile._replace(args=_SWAPPED_BYTE_ORDER[tile[3]])
                    if hasattr(tile, "_replace")
                    else (tile[0], tile[1], tile[2], _SWAPPED_BYTE_ORDER[tile[3]])
                    for tile in image.tile
                ]
            image.load()
            planes.append(np.asarray(image, dtype=np.uint16)[:, :, :3])
    high, low = planes
    raw = (high * 256 + low).astype(np.float32)
    if factor > 1:  # box filter, as Image.reduce does for narrower images
        h, w = raw.shape[0] // factor * factor, raw.shape[1] // factor * factor
        raw = raw[:h, :w].reshape(h // factor, factor, w // factor, factor, 3).mean(axis=(1, 3))
        raw = raw.astype(np.float32)
    decoded = DecodedImage(np.ascontiguousarray(raw / 65535.0), 16, "RGB;16", raw)
    return decoded._replace(stored_size=stored) if raw.shape[:2] != stored else decoded


def write_png(path: str | os.PathLike[str], pixels: NDArray[np.floating], bit_depth: int) -> Path:
    """Write an (h, w, 1|3) image in [0, 1] as an 8-bit or (``bit_depth`` > 8) 16-bit PNG.

    Atomic. 16-bit colour (48-bit RGB), which Pillow cannot write, is encoded here.
    """
    import io as _io
    import zlib

    height, width, channels = pixels.shape
    if channels not in (1, 3):
        raise InvalidValueError(f"write_png takes 1 or 3 channels, got {channels}")
    wide = bit_depth > 8
    top = 65535 if wide else 255
    values = np.clip(np.round(np.asarray(pixels, np.float64) * top), 0, top)
    values = values.astype(np.uint16 if wide else np.uint8)
    if wide and channels == 3:

        def chunk(kind: bytes, body: bytes) -> bytes:
            crc = zlib.crc32(kind + body).to_bytes(4, "big")
            return len(body).to_bytes(4, "big") + kind + body + crc

        header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([16, 2, 0, 0, 0])
        rows = np.zeros((height, 1 + width * 6), np.uint8)  # filter byte 0, then samples
        rows[:, 1:] = values.astype(">u2").view(np.uint8).reshape(height, width * 6)
        data = (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + chunk(b"IEND", b"")
        )
    else:
        image = Image.fromarray(values[:, :, 0] if channels == 1 else values)
        buffer = _io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
    atomic_write_bytes(path, data)
    return Path(path)


def _reduce(image: Image.Image, factor: int) -> Image.Image:
    """Box-filter ``image`` down by ``factor``, in a mode whose values can be averaged."""
    if image.mode.startswith("I;16"):
        image = image.convert("I")  # still 16-bit values; _decode keeps them 16-bit
    elif image.mode in ("1", "LA", "La"):  # bits cannot be averaged; alpha is dropped
        image = image.convert("L")
    elif image.mode not in ("L", "RGB", "I", "F"):  # palette, alpha, CMYK, ...: as _decode
        image = image.convert("RGB")
    return image.reduce(factor)


def _read_medical(path: Path, frames: Sequence[int] = (0,)) -> Iterator[DecodedImage]:
    """The frames of a DICOM (the file read once) or the one image of a 2-D NIfTI."""
    try:
        if is_nifti(path):
            volume = read_nifti(path)
            if volume.data.shape[0] != 1:
                raise MedicalReadError(
                    f"a 3-D volume of {volume.data.shape[0]} slices, not a 2-D image",
                    "score volumes slice by slice: `scan`, `score`, or "
                    "anomalyvae.imaging.volumes.volume_slices",
                )
            yield _medical_image(path, volume.data[0], volume.bit_depth, "NIfTI", False)
            return
        for raw, bits, inverted in iter_dicom_frames(path, frames):
            yield _medical_image(path, raw, bits, "DICOM", inverted)
    except FileNotFoundError as error:
        raise ImageReadError(path, "file not found", "check the path") from error
    except PermissionError as error:
        raise ImageReadError(path, "permission denied", "make the file readable") from error
    except MedicalReadError as error:
        raise ImageReadError(path, error.reason, error.fix) from error


def _medical_image(
    path: Path, raw: NDArray[np.float32], bits: int, mode: str, inverted: bool
) -> DecodedImage:
    if raw.ndim == 2:
        raw = raw[:, :, None]
    if not np.isfinite(raw).all():
        raise ImageReadError(
            path, "image contains NaN or infinite values", "replace them before scoring"
        )
    pixels = normalize_intensity(raw, "minmax")
    if inverted:
        pixels = 1.0 - pixels
    raw = np.ascontiguousarray(raw, dtype=np.float32)
    return DecodedImage(pixels, bits, mode, raw, inverted=inverted)


def _decode(image: Image.Image) -> DecodedImage:
    mode = image.mode
    raw_values = None
    if mode == "1":
        pixels = np.asarray(image, dtype=np.float32)
        bit_depth = 1
    elif mode in ("L", "RGB"):
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        bit_depth = 8
    elif mode.startswith("I;16"):
        raw_values = np.asarray(image).astype(np.float32)
        pixels = raw_values / 65535.0
        bit_depth = 16
    elif mode == "I":
        raw = np.asarray(image)
        # Pillow opens 16-bit PNGs as 32-bit "I"; their values still fit 16 bits.
        raw_values = raw.astype(np.float32)
        if raw.min() >= 0 and raw.max() <= 65535:
            pixels, bit_depth = raw_values / 65535.0, 16
        else:
            pixels, bit_depth = _min_max(raw.astype(np.float64)), 32
    elif mode == "F":
        pixels, bit_depth = _min_max(np.asarray(image, dtype=np.float64)), 32
    elif mode in ("LA", "La"):
        pixels = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
        bit_depth = 8
    else:  # P, RGBA, CMYK, YCbCr, LAB, HSV, ...: Pillow knows how to make RGB of them
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        bit_depth = 8
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if raw_values is not None and raw_values.ndim == 2:
        raw_values = raw_values[:, :, None]
    if not np.isfinite(pixels).all():
        raise InvalidValueError("image contains NaN or infinite values")
    return DecodedImage(np.ascontiguousarray(pixels, dtype=np.float32), bit_depth, mode, raw_values)


def _min_max(values: NDArray[np.float64]) -> NDArray[np.float32]:
    if not np.isfinite(values).all():
        raise InvalidValueError("image contains NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    scale = high - low if high > low else 1.0
    return ((values - low) / scale).astype(np.float32)


# Pillow refuses truncated files by default; keep it that way explicitly, so a
# half-copied JPEG becomes an error row rather than a silently grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False
