"""The classic VAE uses behind the CLI: sampling, denoising, inpainting, embeddings.

Each function is one CLI command's work on files, callable from Python as well; the
tensor-level algorithms are in :mod:`anomalyvae.models.generate`. They need the pixel
model (:func:`pixel_model` says so clearly for a feature checkpoint).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from anomalyvae.detector import VAEAnomalyDetector
from anomalyvae.imaging.io import atomic_path, read_mask


def pixel_model(detector: VAEAnomalyDetector) -> Any:
    """The detector's pixel VAE, or a clear error: the generative uses need pixels."""
    if getattr(detector.model_, "family", "pixel") != "pixel":
        raise ValueError(
            "sampling, denoising, inpainting and embeddings need a pixel model; this "
            "checkpoint holds the feature model. Train one with `anomalyvae train DATA "
            "-o pixel.pt --model pixel`"
        )
    return detector.model_


def _save_png(array: np.ndarray, path: Path) -> Path:
    """Save a (c, h, w) float image in [0, 1] as an 8-bit PNG."""
    from PIL import Image

    pixels = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    image = pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


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
) -> list[Path]:
    """Write ``n`` prior samples, singly and as ``grid.png``.

    With ``interpolate_between`` (two image paths), also a latent interpolation strip.
    """
    from anomalyvae.imaging.io import load_image
    from anomalyvae.models.generate import interpolate, sample

    detector = VAEAnomalyDetector.load(checkpoint, progress=False)
    output_dir = Path(output_dir)
    images = sample(pixel_model(detector), n, temperature, seed)
    written = [
        _save_png(image, output_dir / f"sample_{i:04d}.png") for i, image in enumerate(images)
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
) -> list[Path]:
    """Reconstruct each file through the VAE; write ``<stem>_denoised.png`` at model size."""
    from anomalyvae.imaging.io import read_images
    from anomalyvae.models.generate import denoise

    detector = VAEAnomalyDetector.load(checkpoint, progress=False)
    images, kept, _ = read_images(paths, detector.preprocessing_, on_error="raise")
    clean = denoise(pixel_model(detector), images, n_samples=n_samples)
    names = unique_names([path for path in kept], "_denoised.png")
    return [
        _save_png(image, Path(output_dir) / name) for image, name in zip(clean, names, strict=True)
    ]


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
) -> Path:
    """Fill the masked pixels (mask nonzero = missing) of one image; write it at model size."""
    from anomalyvae.imaging.io import load_image, read_image
    from anomalyvae.models.generate import inpaint

    detector = VAEAnomalyDetector.load(checkpoint, progress=False)
    spec = detector.preprocessing_
    image = read_image(image_path)
    missing = read_mask(
        mask_path, (spec.height, spec.width), 0.0, expected_shape=(image.height, image.width)
    )
    filled = inpaint(
        pixel_model(detector), load_image(image_path, spec)[None], missing, method, iterations
    )
    return _save_png(filled[0], Path(output))


def embed_folder(
    checkpoint: str | os.PathLike[str],
    folder: str | os.PathLike[str],
    output: str | os.PathLike[str],
    plot: str | os.PathLike[str] | None = None,
    neighbours_of: str | os.PathLike[str] | None = None,
    k: int = 5,
) -> pd.DataFrame:
    """Latent means and variances per image to Parquet; optional PCA plot and neighbours.

    Columns: ``path``, ``group`` (first folder under ``folder``), ``mu_0..``,
    ``logvar_0..``. ``neighbours_of`` adds ``distance`` to that image (Euclidean in
    the latent means) and returns the table sorted by it.
    """
    from anomalyvae.imaging.io import find_images, load_image, read_images
    from anomalyvae.models.generate import embed

    detector = VAEAnomalyDetector.load(checkpoint, progress=False)
    folder = Path(folder)
    paths = find_images(folder)
    if not paths:
        raise FileNotFoundError(f"no images under '{folder}'")
    images, kept, _ = read_images(paths, detector.preprocessing_, on_error="warn")
    codes = embed(pixel_model(detector), images)
    groups = [
        p.relative_to(folder).parts[0] if len(p.relative_to(folder).parts) > 1 else "."
        for p in kept
    ]
    table = pd.DataFrame({"path": [str(p) for p in kept], "group": groups})
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
