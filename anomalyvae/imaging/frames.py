"""Files of several images (multi-page TIFF, animated GIF/WebP/PNG, multi-frame DICOM).

Such a file is scored frame by frame, as a volume is slice by slice: one score for the
whole file would speak for its first frame alone. :class:`FrameInput` turns it into model
input a block of frames at a time, each frame preprocessed as a file of its own would
be; :func:`anomalyvae.imaging.io.content_frames` says which frames are images (a TIFF's
reduced-resolution copies and masks are not). Torch-free.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from anomalyvae.imaging.io import iter_frames
from anomalyvae.imaging.preprocessing import Preprocessing, model_input


class FrameInput:
    """The image frames of one file as model input, read a block at a time.

    Memory: one decoded frame and one block, whatever the frame count. Picklable (no
    open file between calls), so a decoding worker can hand it to the scorer.
    """

    def __init__(
        self, path: str | os.PathLike[str], spec: Preprocessing, frames: Sequence[int]
    ) -> None:
        self.path, self.spec, self.frames = Path(path), spec, tuple(int(k) for k in frames)
        #: each frame read so far: its own width, height, channels and bit depth (a
        #: TIFF's pages may differ in size, and a row's peak is in its frame's pixels)
        self.facts: dict[int, dict[str, int]] = {}

    def __len__(self) -> int:
        return len(self.frames)

    def blocks(self, size: int) -> Iterator[tuple[NDArray[np.int64], NDArray[np.float32]]]:
        """(frame indices, model input (m, c, h, w)) of at most ``size`` frames each."""
        index: list[int] = []
        block: list[NDArray[np.float32]] = []
        max_side = max(self.spec.height, self.spec.width)
        for k, decoded in iter_frames(self.path, self.frames, max_side):
            image = model_input(self.path, decoded, self.spec)
            self.facts[k] = {
                "width": decoded.width,
                "height": decoded.height,
                "channels": decoded.channels,
                "bit_depth": decoded.bit_depth,
            }
            index.append(k)
            block.append(image)
            if len(block) >= size:
                yield np.array(index, dtype=np.int64), np.stack(block)
                index, block = [], []
        if block:
            yield np.array(index, dtype=np.int64), np.stack(block)

    def stack(self) -> NDArray[np.float32]:
        """Every frame as model input (frames, c, h, w)."""
        return np.concatenate([block for _, block in self.blocks(64)])
