"""A scan's input side: which files, and each decoded on a worker (errors become rows).

Workers never open a special file (FIFO, socket, device); every file gets a content
fingerprint, part of the resume key. No torch on this path.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future
from pathlib import Path
from stat import S_ISFIFO, S_ISREG
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from anomalyvae.imaging.files import (
    IMAGE_EXTENSIONS,
    MEDICAL_EXTENSIONS,
    describe_others,
    walk_images,
)
from anomalyvae.imaging.frames import FrameInput
from anomalyvae.imaging.io import ImageReadError, check_regular_file, content_frames, read_image
from anomalyvae.imaging.medical import is_nifti
from anomalyvae.imaging.preprocessing import Preprocessing, model_input
from anomalyvae.imaging.volumes import (
    VolumeInput,
)

#: What a scan reads: what training reads (images, DICOM and NIfTI). The scan finds them
#: with the one walker, :func:`anomalyvae.imaging.files.walk_images`.
SCAN_EXTENSIONS = (*IMAGE_EXTENSIONS, *MEDICAL_EXTENSIONS)


def expand_inputs(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Files as given, folders replaced by the images a scan reads in them."""
    out: list[Path] = []
    for path in map(Path, paths):
        out.extend(walk_images(path, SCAN_EXTENSIONS) if path.is_dir() else [path])
    return out


def not_scanned_note(others: Mapping[str, int]) -> str:
    """The line that says which files under the folder the scan did not read."""
    return (
        f"Not scanned: {describe_others(others)}. The scan reads "
        f"{', '.join(SCAN_EXTENSIONS)} and extensionless DICOM; convert images of another "
        "type to one of these, or --exclude what is not an image to silence this."
    )


class Decoded(NamedTuple):
    """A worker's result for one file: the model input or an error, and file facts."""

    index: int
    #: model input (c, h, w); a volume's slices or a file's frames to read
    #: (``info["slices"]`` set; a multi-frame file's frame numbers in ``info["frames"]``)
    pixels: NDArray[np.float32] | VolumeInput | FrameInput | None
    info: dict[str, Any]


def decode_file(index: int, path: Path, spec: Preprocessing) -> Decoded:
    """Decode and preprocess one file for row ``index``; a failure becomes an error row."""
    info: dict[str, Any] = {
        "width": None,
        "height": None,
        "channels": None,
        "bit_depth": None,
        "error": "",
    }
    try:
        try:
            stat = path.stat()
        except OSError:
            check_regular_file(path)  # names a broken link, a link loop, a missing file
            raise
        if not S_ISREG(stat.st_mode):  # never open a FIFO, socket or device: it can block
            kind = "a FIFO" if S_ISFIFO(stat.st_mode) else "not a regular file"
            info["error"] = f"{kind}, so it was not read (scan regular image files only)"
            return Decoded(index, None, info)
        info["fingerprint"] = file_fingerprint(path, stat)  # the resume key's content part
        if is_nifti(path):
            return _decode_volume(index, path, spec, info)
        frames = content_frames(path)
        decoded = read_image(path, max(spec.height, spec.width), frames[0])
        info.update(
            width=decoded.width,
            height=decoded.height,
            channels=decoded.channels,
            bit_depth=decoded.bit_depth,
        )
        if len(frames) > 1:  # pages or animation frames: each scored, as a volume's slices
            info.update(slices=len(frames), frames=list(frames))
            return Decoded(index, FrameInput(path, spec, frames), info)
        return Decoded(index, model_input(path, decoded, spec), info)
    except ImageReadError as error:
        info["error"] = f"{error.reason} ({error.fix})"
    except OSError as error:  # the bytes cannot be read: a disk, share or /proc failure
        reason = error.strerror or str(error)
        info["error"] = (
            f"the file cannot be read ({reason}) (check the disk or network share and that "
            "it is a stored image, then rescan: the scan retries failed files)"
        )
    except Exception as error:  # a decoder bug must not stop a 100,000-file scan
        info["error"] = f"unexpected {type(error).__name__}: {error}"
    return Decoded(index, None, info)


def _decode_volume(index: int, path: Path, spec: Preprocessing, info: dict[str, Any]) -> Decoded:
    """A NIfTI volume, checked and its intensity range read: the scorer reads its slices.

    The slices become model input a block at a time where they are scored
    (:meth:`VolumeInput.blocks`), so memory does not grow with the slice count.
    """
    volume = VolumeInput(path, spec)
    _, height, width = volume.shape
    info.update(width=width, height=height, channels=1, bit_depth=32, slices=len(volume))
    return Decoded(index, volume, info)


def decode_stream(
    executor: Executor, paths: Sequence[Path], spec: Preprocessing, in_flight: int
) -> Iterator[Decoded]:
    """Decode in order with at most ``in_flight`` files pending (bounded memory)."""
    pending: deque[Future[Decoded]] = deque()
    for index, path in enumerate(paths):
        pending.append(executor.submit(decode_file, index, path, spec))
        if len(pending) >= in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


#: Bytes read from each end of a file for its fingerprint.
FINGERPRINT_BYTES = 65536


def file_fingerprint(path: Path, stat: os.stat_result | None = None) -> str:
    """A short SHA-256 of a regular file's size, first and last 64 KiB ("" otherwise).

    Part of the resume key with the name, size and mtime: a file replaced by another of
    the same name, size and mtime (``touch -r``) is scored again. Special files (FIFO,
    socket, device) are never opened: reading one could block forever.
    """
    stat = stat or path.stat()
    if not S_ISREG(stat.st_mode):
        return ""
    digest = hashlib.sha256(str(stat.st_size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(FINGERPRINT_BYTES))
        if stat.st_size > 2 * FINGERPRINT_BYTES:
            handle.seek(-FINGERPRINT_BYTES, os.SEEK_END)
            digest.update(handle.read(FINGERPRINT_BYTES))
    return digest.hexdigest()[:16]
