"""Tiles: how a large or elongated model input is covered by overlapping tiles.

The feature model keeps each image's aspect ratio and works at up to 512 px on the short
side (:data:`anomalyvae.models.families.feature.FEATURE_MAX_SIZE`), so its input can be
512 x 1536. Its
backbone then runs tile by tile (:class:`TileLayout`): every tile has the same fixed size,
neighbouring tiles overlap, and the tiles' feature maps are blended back into one feature
map of the whole input with linear ramps across each overlap, so no seam shows in the
anomaly map. It all happens inside the exported graph; docs/onnx-contract.md states the
rule and the metadata carries the offsets.

Numpy only (the torch-free wing): the runtime and the scan use :func:`map_to_size` to give
maps back at each file's own resolution.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from anomalyvae.errors import InvalidValueError
from anomalyvae.imaging.preprocessing import resize

#: Tile offsets are multiples of this (the backbone's coarsest feature stride), so tile
#: features land on whole cells of the input's feature grid.
TILE_ALIGN = 16


def tile_offsets(size: int, tile: int, overlap: int, align: int = TILE_ALIGN) -> list[int]:
    """Start of each tile along one axis of ``size`` px: evenly spread, first 0, last flush.

    ``size <= tile`` gives one tile (``[0]``). Otherwise ``n = ceil((size - tile) /
    (tile - overlap)) + 1`` tiles start at ``round(i * (size - tile) / (n - 1) / align) *
    align`` for i in 0..n-1, so every neighbouring pair overlaps by at least ``overlap``
    (less only by the rounding to ``align``) and the last tile ends at ``size``.
    """
    if tile < 1 or overlap < 0 or overlap >= tile:
        raise InvalidValueError(f"need tile >= 1 and 0 <= overlap < tile, got {tile} and {overlap}")
    if size <= tile:
        return [0]
    if (size - tile) % align:
        raise InvalidValueError(
            f"a tiled side must exceed the tile by a multiple of {align} px, got {size} and {tile}"
        )
    n = math.ceil((size - tile) / (tile - overlap)) + 1
    span = (size - tile) // align
    return [int(round(i * span / (n - 1))) * align for i in range(n)]


def ramp_weights(length: int, overlap: int) -> NDArray[np.float32]:
    """Blend weights along one tile axis for neighbours that overlap by ``overlap`` cells.

    From each end: a quarter of the overlap at almost no weight (1e-3: the cells a
    convolution padded at the tile's edge, which the neighbour sees with real context),
    then a linear rise over half the overlap to 1. So in an overlap one tile fades out
    as the next fades in, the blend is continuous, and a cell only one tile covers (the
    input's own border) keeps its value after normalization.
    """
    if overlap < 1:
        return np.ones(length, np.float32)
    margin, ramp = overlap / 4.0, max(overlap / 2.0, 1.0)
    index = np.arange(length, dtype=np.float64) + 0.5
    edge = np.minimum(index, length - index)
    return np.clip((edge - margin) / ramp, 1e-3, 1.0).astype(np.float32)


class TileLayout(NamedTuple):
    """The tiles that cover an input of ``height`` x ``width`` px.

    ``tile_height`` x ``tile_width`` is each tile's size (the tile side, or the input's
    side where that is smaller); ``offsets_y``/``offsets_x`` are their top-left corners
    (every combination is a tile); ``overlap`` is the least overlap asked for, in px.
    """

    height: int
    width: int
    tile_height: int
    tile_width: int
    offsets_y: tuple[int, ...]
    offsets_x: tuple[int, ...]
    overlap: int

    @property
    def n_tiles(self) -> int:
        return len(self.offsets_y) * len(self.offsets_x)

    @property
    def tiled(self) -> bool:
        return self.n_tiles > 1

    def corners(self) -> list[tuple[int, int]]:
        """(y, x) of every tile's top-left corner, row by row."""
        return [(y, x) for y in self.offsets_y for x in self.offsets_x]

    def blend(self, stride: int) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """Per-tile weights and the normalization at feature ``stride``.

        Returns the (th, tw) weight of one tile's cells and the (h, w) reciprocal of the
        weights summed over all tiles, both at ``stride`` (cells of ``stride`` px).
        """
        th, tw = self.tile_height // stride, self.tile_width // stride
        cells = self.overlap // stride
        weight = np.outer(
            ramp_weights(th, cells if len(self.offsets_y) > 1 else 0),
            ramp_weights(tw, cells if len(self.offsets_x) > 1 else 0),
        )
        total = np.zeros((self.height // stride, self.width // stride), np.float64)
        for y, x in self.corners():
            total[y // stride : y // stride + th, x // stride : x // stride + tw] += weight
        return weight.astype(np.float32), (1.0 / total).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tile_height": self.tile_height,
            "tile_width": self.tile_width,
            "overlap": self.overlap,
            "offsets_y": list(self.offsets_y),
            "offsets_x": list(self.offsets_x),
            "n_tiles": self.n_tiles,
        }


def tight_tile(size: int, tile: int, overlap: int, align: int = TILE_ALIGN) -> int:
    """The shortest tile, at most ``tile`` px, that covers ``size`` in the fewest tiles.

    The fewest tiles of at most ``tile`` px that overlap by ``overlap`` are ``n =
    ceil((size - overlap) / (tile - overlap))``; each then needs ``(size + (n - 1) *
    overlap) / n`` px, rounded up to ``align``. A 1088 px side in tiles of at most 512
    (overlap 128) takes 3 tiles of 448 px, 1344 px of backbone work, where 3 tiles of 512
    take 1536. ``size <= tile`` gives ``size`` (one tile).
    """
    if size <= tile:
        return size
    n = math.ceil((size - overlap) / (tile - overlap))
    return min(tile, math.ceil((size + (n - 1) * overlap) / n / align) * align)


def tile_layout(
    height: int, width: int, tile: int, overlap: int, tight: bool = False
) -> TileLayout:
    """The :class:`TileLayout` of an input of ``height`` x ``width``, tiles of <= ``tile`` px.

    ``tight``: each side's tiles are as short as its fewest tiles allow
    (:func:`tight_tile`); otherwise ``tile`` px (models saved before tight tiles).
    """
    tile_offsets(max(height, width), tile, overlap)  # checks the geometry
    lengths = [tight_tile(side, tile, overlap) if tight else tile for side in (height, width)]
    offsets = [
        tile_offsets(side, length, overlap) if side > tile else [0]
        for side, length in zip((height, width), lengths, strict=True)
    ]
    return TileLayout(
        height,
        width,
        min(lengths[0], height),
        min(lengths[1], width),
        tuple(offsets[0]),
        tuple(offsets[1]),
        overlap,
    )


def map_to_size(anomaly_map: NDArray[np.floating], height: int, width: int) -> NDArray[np.float32]:
    """An (h, w) anomaly map resized to ``height`` x ``width`` (a file's own resolution).

    Bilinear, antialiased when shrinking (Pillow's filter, as the images are resized);
    values are not clipped (maps are not in [0, 1]).
    """
    source = np.ascontiguousarray(anomaly_map, dtype=np.float32)
    if source.shape == (height, width):
        return source
    low, high = float(source.min()), float(source.max())
    span = high - low if high > low else 1.0
    unit = (source - low) / span  # io.resize clips to [0, 1]: resize in unit range
    resized = resize(unit[:, :, None], height, width, "bilinear")[:, :, 0]
    return (resized * span + low).astype(np.float32)


#: Model-input pixels per run (ONNX Runtime or torch) when the batch size is left to the product
#: (two 256 x 256 images). The feature model's graph holds about 1.0 to 1.7 KB per
#: input pixel and image in flight: a 480 x 1216 scan peaked at 11.1 GB with 32 images a
#: run, 2.7 GB with 4 and 0.93 GB with 1 (and was fastest with 1); a 224 x 224 scan at
#: 3.1 GB with 32, 0.99 GB with 8 and 0.48 GB with 2, again fastest with 2
#: (anomalyvae scan under /usr/bin/time on a 2-core CPU; reports/scan measures the
#: default at both sizes). Larger batches buy nothing on CPU for these inputs.
BATCH_PIXELS = 1 << 17
#: The most images per run however small the input (thumbnails).
MAX_AUTO_BATCH = 32


def auto_batch_size(height: int, width: int, at_most: int = MAX_AUTO_BATCH) -> int:
    """Images per run for an input of ``height`` x ``width``: ``BATCH_PIXELS`` of them.

    ``at_most`` caps it (a batch size the caller asked for): memory bounded by the input
    size either way.
    """
    return max(1, min(at_most, BATCH_PIXELS // max(1, int(height) * int(width))))
