"""The classic VAE uses behind the CLI: sampling, denoising, inpainting, embeddings.

Each function is one CLI command's work on files, callable from Python as well; the
tensor-level algorithms are in :mod:`anomalyvae.models.generate`. They need the pixel
model (:func:`pixel_model` says so clearly for a feature checkpoint).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from anomalyvae.detector import VAEAnomalyDetector
from anomalyvae.errors import InvalidValueError
from anomalyvae.imaging.files import atomic_path
from anomalyvae.imaging.io import DecodedImage, ImageReadError, read_image, write_png
from anomalyvae.imaging.medical import intensity_range
from anomalyvae.imaging.preprocessing import (
    Preprocessing,
    intensities,
    preprocess,
    read_mask,
    resize,
    to_channels,
)


def pixel_model(detector: VAEAnomalyDetector) -> Any:
    """The detector's pixel VAE, or a clear error: the generative uses need pixels."""
    detector.check_fitted()
    if not detector.family().generative:
        raise InvalidValueError(
            "sampling, denoising, inpainting and embeddings need a pixel model; this "
            "checkpoint holds the feature model. Train one with `anomalyvae train DATA "
            "-o pixel.pt --model pixel`"
        )
    return detector.model_


def _save_png(array: np.ndarray, path: Path) -> Path:
    """Save a (c, h, w) float image in [0, 1] as an 8-bit PNG (atomically)."""
    return write_png(path, np.ascontiguousarray(array.transpose(1, 2, 0)), 8)


def grid(images: np.ndarray, columns: int = 8) -> np.ndarray:
    """Tile (n, c, h, w) images into one (c, H, W) image, row-major."""
    n, c, h, w = images.shape
    rows = -(-n // columns)
    out = np.ones((c, rows * h, min(n, columns) * w), dtype=np.float32)
    for i, image in enumerate(images):
        r, k = divmod(i, columns)
        out[:, r * h : (r + 1) * h, k * w : (k + 1) * w] = image
    return out


def sample_to(
    checkpoint: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    n: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    interpolate_between: tuple[str, str] | None = None,
    progress: bool = False,
) -> list[Path]:
    """Write ``n`` prior samples, singly and as ``grid.png``.

    With ``interpolate_between`` (two image paths), also a latent interpolation strip.
    """
    from anomalyvae.imaging.preprocessing import load_image
    from anomalyvae.models.generate import interpolate, sample
    from anomalyvae.progress import progress_bar

    detector = VAEAnomalyDetector.load(checkpoint, progress=False)
    output_dir = Path(output_dir)
    images = sample(pixel_model(detector), n, temperature, seed)
    written = [
        _save_png(image, output_dir / f"sample_{i:04d}.png")
        for i, image in enumerate(
            progress_bar(images, desc="writing samples", unit="image", disable=not progress)
        )
    ]
    written.append(_save_png(grid(images), output_dir / "grid.png"))
    if interpolate_between is not None:
        pair = [load_image(p, detector.preprocessing_) for p in interpolate_between]
        strip = interpolate(pixel_model(detector), pair[0], pair[1], steps=8)
        written.append(_save_png(grid(strip, columns=len(strip)), output_dir / "interpolation.png"))
    return written


def denoise_files(
    checkpoint: str | os.PathLike[str],
    paths: list[Path],
    output_dir: str | os.PathLike[str],
    n_samples: int = 0,
    batch_size: int = 32,
    progress: bool = False,
) -> list[Path]:
    """Reconstruct each file through the VAE; write ``<stem>_denoised.png``.

    The output has the input's size, channels and bit depth (8 or 16 bits; see
    :func:`to_file`); the VAE works at model size, so fine detail beyond it is lost. A
    file that cannot be read is skipped with a warning naming it; the others are written.
    """
    from anomalyvae.models.generate import denoise
    from anomalyvae.progress import progress_bar

    detector = VAEAnomalyDetector.load(checkpoint, progress=False)
    model, spec = pixel_model(detector), detector.preprocessing_
    names = unique_names(list(paths), "_denoised.png")
    written = []
    for start in progress_bar(
        range(0, len(paths), batch_size), desc="denoising", unit="batch", disable=not progress
    ):
        decoded, kept = [], []
        for path, name in zip(paths[start : start + batch_size], names[start:], strict=False):
            try:
                decoded.append(read_image(path))
            except ImageReadError as error:
                warnings.warn(f"skipping {error}", UserWarning, stacklevel=2)
                continue
            kept.append(name)
        if not decoded:
            continue
        images = np.stack([preprocess(intensities(d, spec), spec) for d in decoded])
        clean = denoise(model, images, n_samples=n_samples)
        for image, source, name in zip(clean, decoded, kept, strict=True):
            out = to_file(image, source, spec)
            written.append(write_png(Path(output_dir) / name, out, source.bit_depth))
    return written


def to_file(image: np.ndarray, source: DecodedImage, spec: Preprocessing) -> np.ndarray:
    """A (c, h, w) model-space image back in ``source``'s size, channels and units.

    Resized (bilinear) to the file's size and converted to its channels; with an
    intensity normalization (window, percentile, minmax), the normalization's linear
    map is undone with the file's own range, so the result is in the file's units.
    Returns (h, w, c) in the decoded image's [0, 1] pixel scale.
    """
    height, width, channels = source.pixels.shape
    values = resize(np.ascontiguousarray(image.transpose(1, 2, 0)), height, width, "bilinear")
    values = to_channels(values, channels)
    if spec.normalization == "none":  # model space is the pixels' (or turned back)
        return 1.0 - values if source.inverted and not spec.turns(source) else values
    stored = source.raw if source.raw is not None else source.pixels
    low, high = intensity_range(
        stored,
        spec.normalization,
        spec.window_center,
        spec.window_width,
        spec.percentile_low,
        spec.percentile_high,
    )
    if spec.turns(source):  # model space is turned round
        values = 1.0 - values
    in_stored = low + values * (high - low)
    # the decoded pixels are a linear function of the stored values (falling for a
    # dark-for-high file); recover it
    s_low, s_high = float(stored.min()), float(stored.max())
    p_low, p_high = float(source.pixels.min()), float(source.pixels.max())
    if source.inverted:
        p_low, p_high = p_high, p_low  # the pixel of the lowest stored value is the brightest
    slope = (p_high - p_low) / (s_high - s_low) if s_high > s_low else 0.0
    return np.clip(p_low + (in_stored - s_low) * slope, 0.0, 1.0).astype(np.float32)


def unique_names(paths: list[Path], suffix: str) -> list[str]:
    """``<stem><suffix>`` per path; stems shared by several files get their folders too.

    ``a/0003.png`` and ``b/0003.png`` must not overwrite each other's output.
    """
    stems = [path.stem for path in paths]
    out = []
    for path, stem in zip(paths, stems, strict=True):
        if stems.count(stem) > 1:
            parts = [p for p in path.with_suffix("").parts if p not in ("/", "..", ".")]
            stem = "__".join(parts[-3:])
        out.append(stem + suffix)
    if len(set(out)) < len(out):  # still equal: number them
        out = [f"{i:05d}_{name}" for i, name in enumerate(out)]
    return out


def inpaint_file(
    checkpoint: str | os.PathLike[str],
    image_path: Path,
    mask_path: Path,
    output: str | os.PathLike[str],
    method: str = "optimize",
    iterations: int = 100,
    progress: bool = False,
) -> Path:
    """Fill the masked pixels (mask nonzero = missing) of one image and write it.

    The output has the input's size, channels and bit depth; every known pixel keeps
    its value exactly. The VAE fills the hole at model size: a model pixel that the
    hole touches at all counts as missing there, so the fill never copies the
    unknown values it replaces.
    """
    from anomalyvae.models.generate import inpaint

    detector = VAEAnomalyDetector.load(checkpoint, progress=False)
    spec = detector.preprocessing_
    source = read_image(image_path)
    missing = read_mask(mask_path, None, 0.0, expected_shape=(source.height, source.width))
    touched = resize(missing.astype(np.float32)[:, :, None], spec.height, spec.width, "area")
    filled = inpaint(
        pixel_model(detector),
        preprocess(intensities(source, spec), spec)[None],
        touched[:, :, 0] > 0,
        method,
        iterations,
        progress=progress,
    )
    out = np.where(missing[:, :, None], to_file(filled[0], source, spec), source.pixels)
    return write_png(Path(output), out, source.bit_depth)


def embed_folder(
    checkpoint: str | os.PathLike[str],
    folder: str | os.PathLike[str],
    output: str | os.PathLike[str],
    plot: str | os.PathLike[str] | None = None,
    neighbours_of: str | os.PathLike[str] | None = None,
    k: int = 5,
    progress: bool = False,
) -> pd.DataFrame:
    """Latent means and variances per image to Parquet; optional PCA plot and neighbours.

    Columns: ``path``, ``group`` (first folder under ``folder``), ``mu_0..``,
    ``logvar_0..``. ``neighbours_of`` adds ``distance`` to that image (Euclidean in
    the latent means) and returns the table sorted by it.
    """
    from anomalyvae.imaging.batch import read_images
    from anomalyvae.imaging.files import display_path, find_images
    from anomalyvae.imaging.preprocessing import load_image
    from anomalyvae.models.generate import Embedding, embed
    from anomalyvae.progress import progress_bar

    detector = VAEAnomalyDetector.load(checkpoint, progress=False)
    folder = Path(folder)
    paths = find_images(folder)
    if not paths:
        raise FileNotFoundError(f"no images under '{folder}'")
    model = pixel_model(detector)
    kept, mu, logvar = [], [], []
    chunk = 64
    for start in progress_bar(
        range(0, len(paths), chunk), desc="embedding", unit="batch", disable=not progress
    ):
        images, read, _ = read_images(
            paths[start : start + chunk], detector.preprocessing_, on_error="warn"
        )
        if len(images):
            part = embed(model, images)
            kept += read
            mu.append(part.mu)
            logvar.append(part.logvar)
    if not kept:
        raise InvalidValueError(f"no readable images under '{folder}'")
    codes = Embedding(np.concatenate(mu), np.concatenate(logvar))
    groups = [
        display_path(p.relative_to(folder).parts[0])
        if len(p.relative_to(folder).parts) > 1
        else "."
        for p in kept
    ]
    # any file name survives the table (Parquet strings are UTF-8: \xNN for other bytes)
    table = pd.DataFrame({"path": [display_path(p) for p in kept], "group": groups})
    latent = codes.mu.shape[1]
    table = pd.concat(
        [
            table,
            pd.DataFrame(codes.mu, columns=[f"mu_{i}" for i in range(latent)]),
            pd.DataFrame(codes.logvar, columns=[f"logvar_{i}" for i in range(latent)]),
        ],
        axis=1,
    )
    if neighbours_of is not None:
        query = embed(
            pixel_model(detector), load_image(neighbours_of, detector.preprocessing_)[None]
        )
        table["distance"] = np.linalg.norm(codes.mu - query.mu[0], axis=1)
        table = table.sort_values("distance").reset_index(drop=True)
    with atomic_path(output) as tmp:
        table.to_parquet(tmp, index=False)
    if plot is not None:
        _plot_embedding(codes.mu, groups, Path(plot))
    return table


def _plot_embedding(mu: np.ndarray, groups: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    points = PCA(n_components=2, random_state=0).fit_transform(mu) if len(mu) > 2 else mu[:, :2]
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for group in sorted(set(groups)):
        index = [i for i, g in enumerate(groups) if g == group]
        ax.scatter(points[index, 0], points[index, 1], s=10, label=group, alpha=0.7)
    ax.set(xlabel="PC 1", ylabel="PC 2", title="Latent means (PCA)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
