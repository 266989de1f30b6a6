"""Heatmaps of a scan: the map drawn over the image, with the pixel-threshold contour.

Saved atomically, under a name that the file system accepts. No torch on this path.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from anomalyvae.imaging.files import atomic_write_bytes
from anomalyvae.imaging.io import ImageReadError, read_image
from anomalyvae.imaging.tiles import map_to_size

#: Longest side of a drawn heatmap, in px (about 50 MB of float64 to draw at most).
MAX_HEATMAP_SIDE = 2048
#: An image whose 0.5-99.5 % grey levels span less than this share of full scale is
#: stretched to that band for display (a dim file would otherwise draw black).
DISPLAY_STRETCH_BELOW = 0.5


def display_grey(grey: NDArray[np.floating]) -> NDArray[np.float64]:
    """The grey image as a heatmap shows it: as stored, or stretched when it is dim.

    Files that use a sliver of their range (8-bit slices in three grey levels, 12-bit
    data in 16-bit files) are stretched from their 0.5 % to their 99.5 % grey level, for
    display only; the scores never see this.
    """
    grey = np.asarray(grey, dtype=np.float64)
    if grey.size == 0:
        return grey
    low, high = np.percentile(grey, [0.5, 99.5])
    if high - low <= 1e-9:  # flat but for a few pixels: their range, if any
        low, high = float(grey.min()), float(grey.max())
    if high - low <= 1e-9 or high - low >= DISPLAY_STRETCH_BELOW:
        return grey
    return np.clip((grey - low) / (high - low), 0.0, 1.0)


def heatmap_overlay(
    pixels: NDArray[np.float32],
    anomaly_map: NDArray[np.float32],
    pixel_threshold: float,
    vmax: float,
) -> Image.Image:
    """Overlay the map in colour on the image, with the pixel-threshold contour.

    The result has the image's own resolution, up to ``MAX_HEATMAP_SIDE`` px on the long
    side: a larger image (a huge volume slice) is subsampled first, so drawing a heatmap
    never needs more memory than one of that size.
    """
    from matplotlib import colormaps
    from scipy import ndimage

    step = -(-max(pixels.shape[:2]) // MAX_HEATMAP_SIDE)  # ceil
    if step > 1:
        pixels = pixels[::step, ::step]
    height, width = pixels.shape[:2]
    grey = display_grey(pixels.mean(axis=2) if pixels.shape[2] > 1 else pixels[:, :, 0])
    big = map_to_size(anomaly_map, height, width)
    level = np.clip(big / max(vmax, 1e-12), 0, 1)
    colour = colormaps["inferno"](level)[:, :, :3]
    alpha = 0.55 * level[:, :, None]
    base = np.repeat(grey[:, :, None], 3, axis=2)
    out = (1 - alpha) * base + alpha * colour
    over = big > pixel_threshold
    edge = over & ~ndimage.binary_erosion(over, iterations=max(1, min(height, width) // 200))
    out[edge] = (0.0, 1.0, 1.0)
    return Image.fromarray((np.clip(out, 0, 1) * 255).astype(np.uint8))


def save_heatmap(
    path: Path,
    out_path: Path,
    anomaly_map: NDArray[np.float32],
    pixel_threshold: float,
    vmax: float,
    pixels: NDArray[np.float32] | None = None,
) -> None:
    """Draw ``anomaly_map`` over the image of ``path`` (or ``pixels``) into ``out_path``."""
    import io as _io

    if pixels is None:
        try:  # a heatmap needs no more than about 1,000 px: huge files are decoded reduced
            pixels = read_image(path, 512).pixels
        except ImageReadError:
            # the file changed or vanished after it was scored: the map is still drawn,
            # on a blank background, rather than the scan stopping for a picture
            pixels = np.zeros((*anomaly_map.shape, 1), np.float32)
    source = pixels
    image = heatmap_overlay(source, anomaly_map, pixel_threshold, vmax)
    buffer = _io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(out_path, buffer.getvalue())


#: Longest file-name component (bytes) the scan writes: file systems allow 255, and
#: the atomic writer adds a temporary prefix and suffix.
MAX_NAME_BYTES = 180


def output_name(relative: str, suffix: str) -> str:
    """A file's path under an output folder: its own relative path plus ``suffix``.

    The full name is kept (a.png and a.jpg must not collide); a name too long for the
    file system keeps its start and gets a hash of the whole instead of the rest, so a
    241-byte file name still gets its heatmap and map instead of stopping the scan.
    """
    parts = (relative.replace("\\", "_") + suffix).split("/")
    name = parts[-1]
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        digest = hashlib.sha256(relative.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        stem = name.encode("utf-8", "surrogateescape")[:120].decode("utf-8", "ignore")
        name = f"{stem}~{digest}{suffix}"
    return "/".join([*parts[:-1], name])


def heatmap_name(relative: str) -> str:
    """The heatmap's path under heatmaps/: the file's path plus ".heatmap.png"."""
    return output_name(relative, ".heatmap.png")


def save_map(path: Path, anomaly_map: NDArray[np.float32]) -> None:
    """Write one map as ``anomaly_map`` in a compressed .npz, atomically."""
    import io as _io

    buffer = _io.BytesIO()
    np.savez_compressed(buffer, anomaly_map=anomaly_map)
    atomic_write_bytes(path, buffer.getvalue())
