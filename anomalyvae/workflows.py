"""Dataset-level workflows behind the CLI: train, calibrate, evaluate, demo.

Each function is one CLI command's work, callable from Python as well.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from anomalyvae.calibration import normalize
from anomalyvae.data import DatasetError, Sample, discover, make_synthetic_dataset
from anomalyvae.detector import VAEAnomalyDetector
from anomalyvae.imaging.io import (
    ImageReadError,
    MaskError,
    atomic_path,
    atomic_write_text,
    read_image,
    read_mask,
    read_volume,
    resize_mask,
    volume_slices,
)
from anomalyvae.imaging.medical import is_nifti
from anomalyvae.metrics import evaluation_table


def train_on(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    resume: bool = False,
    **params: Any,
) -> VAEAnomalyDetector:
    """Train a detector on the normal images of ``source`` and save it to ``output``.

    ``source`` is a folder of normal images, an MVTec-style root (its ``train/good``),
    or a JSON split file (its ``train_good``). ``params`` go to VAEAnomalyDetector.
    """
    samples = discover(source, "train")
    detector = VAEAnomalyDetector(checkpoint_path=output, **params)
    return detector.fit([s.path for s in samples if s.label == 0], resume=resume)


def calibrate_on(
    checkpoint: str | os.PathLike[str],
    source: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    method: str = "normal_quantile",
    target_fpr: float | None = None,
    mask_threshold: float = 0.0,
    subset: str = "test",
    progress: bool = True,
) -> VAEAnomalyDetector:
    """Recalibrate a saved detector on ``source`` and save it (in place by default).

    With ``method="normal_quantile"`` only the normal images of ``source`` are used;
    "f1" and "youden" need labelled normal and anomalous images.
    """
    detector = VAEAnomalyDetector.load(checkpoint, progress=progress)
    if target_fpr is not None:
        detector.target_fpr = target_fpr
    samples = discover(source, subset)
    if method == "normal_quantile":
        samples = [s for s in samples if s.label == 0]
    labels = np.array([s.label for s in samples])
    masks = None
    if method != "normal_quantile" and all(s.mask_path or s.label == 0 for s in samples):
        masks = masks_for(samples, detector, mask_threshold)
    detector.calibrate([s.path for s in samples], labels, masks, method)
    detector.save(output or checkpoint)
    return detector


class Evaluation(NamedTuple):
    """What :func:`evaluate_on` returns: a metrics table and per-image rows."""

    table: pd.DataFrame
    per_image: pd.DataFrame
    maps: np.ndarray
    masks: np.ndarray | None
    files: dict[str, Path]


def evaluate_on(
    checkpoint: str | os.PathLike[str] | VAEAnomalyDetector,
    source: str | os.PathLike[str],
    output_dir: str | os.PathLike[str] | None = None,
    mask_threshold: float = 0.0,
    subset: str = "test",
    progress: bool = True,
) -> Evaluation:
    """Score a labelled test set; write ``metrics.csv``, ``metrics.json`` and ``scores.csv``.

    Pixel metrics (pixel AUROC, AUPRO) are computed at model resolution over normal
    images and the defect images that have a mask; masks are read with
    ``mask_threshold`` (0 = any nonzero pixel is defect).

    NIfTI volumes are evaluated slice by slice (rows ``name#slice=NNNN``): a slice of a
    volume with a mask volume is defective when its mask slice has a defect pixel. A
    volume whose mask disagrees with it in shape or affine, or that cannot be read, is
    left out with a warning naming both files, and the evaluation goes on.
    """
    detector = (
        checkpoint
        if isinstance(checkpoint, VAEAnomalyDetector)
        else VAEAnomalyDetector.load(checkpoint, progress=progress)
    )
    samples = discover(source, subset)
    flat = [s for s in samples if not is_nifti(s.path)]
    volumes = [s for s in samples if is_nifti(s.path)]
    labels = np.array([s.label for s in flat], dtype=np.int64)
    types = [s.defect_type for s in flat]
    names = [str(s.path) for s in flat]
    spec = detector.preprocessing_
    scores = np.zeros(0)
    maps = np.zeros((0, spec.height, spec.width), np.float32)
    if flat:
        scores, maps = detector.score_and_map([s.path for s in flat])
    has_mask = np.array([s.label == 0 or s.mask_path is not None for s in flat], dtype=bool)
    masks = np.zeros((len(flat), spec.height, spec.width), dtype=bool)
    if any(s.mask_path for s in flat):
        masks = masks_for(flat, detector, mask_threshold)
    any_mask = any(s.mask_path for s in samples)
    for sample in volumes:
        try:
            unit = volume_units(sample, detector, mask_threshold)
        except (MaskError, ImageReadError) as error:
            warnings.warn(f"left out of the evaluation: {error}", UserWarning, stacklevel=2)
            continue
        volume_scores, volume_maps = detector.score_and_map(unit.images)
        scores = np.concatenate([scores, volume_scores])
        maps = np.concatenate([maps, volume_maps])
        masks = np.concatenate([masks, unit.masks])
        labels = np.concatenate([labels, unit.labels])
        has_mask = np.concatenate([has_mask, unit.has_mask])
        types += [sample.defect_type] * len(unit.labels)
        names += [f"{sample.path}#slice={k:04d}" for k in range(len(unit.labels))]
    if not len(labels):
        raise DatasetError(f"nothing to evaluate in '{source}': no readable test images")
    threshold = getattr(detector, "threshold_", None)
    pixel_masks = masks if any_mask else None
    keep = has_mask if any_mask else None
    table = evaluation_table(labels, scores, types, threshold, pixel_masks, maps, pixel_valid=keep)
    per_image = pd.DataFrame(
        {"path": names, "defect_type": types, "label": labels, "score": scores}
    )
    if threshold is not None:
        per_image["normalized_score"] = normalize(scores, threshold)
        per_image["is_anomaly"] = scores > threshold
    files: dict[str, Path] = {}
    if output_dir is not None:
        files = write_evaluation(table, per_image, detector, Path(output_dir))
    return Evaluation(table, per_image, maps, pixel_masks, files)


class VolumeUnits(NamedTuple):
    """A NIfTI test volume as evaluation units: its slices, their labels and masks."""

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    has_mask: np.ndarray


def volume_units(
    sample: Sample, detector: VAEAnomalyDetector, mask_threshold: float = 0.0
) -> VolumeUnits:
    """Every slice of ``sample``'s volume with its label and mask at model resolution.

    Raises
    ------
    MaskError
        The mask volume's shape or affine differs from the image volume's (both named).
    """
    spec = detector.preprocessing_
    volume = read_volume(sample.path)
    images = volume_slices(sample.path, spec, volume=volume)  # all slices, in order
    n = len(images)
    masks = np.zeros((n, spec.height, spec.width), dtype=bool)
    if sample.mask_path is None:
        labels = np.full(n, sample.label, dtype=np.int64)
        return VolumeUnits(images, labels, masks, np.full(n, sample.label == 0))
    masks = read_volume_mask(
        sample.mask_path, volume, sample.path, (spec.height, spec.width), mask_threshold
    )
    labels = masks.reshape(n, -1).any(axis=1).astype(np.int64)
    return VolumeUnits(images, labels, masks, np.ones(n, dtype=bool))


def read_volume_mask(
    mask_path: str | os.PathLike[str],
    volume: Any,
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


def masks_for(
    samples: list[Sample], detector: VAEAnomalyDetector, mask_threshold: float
) -> np.ndarray:
    """Defect masks (n, h, w) at model resolution; all-False for samples without a mask.

    Each mask must match its image's size (checked, with both files named).
    """
    spec = detector.preprocessing_
    out = np.zeros((len(samples), spec.height, spec.width), dtype=bool)
    for i, sample in enumerate(samples):
        if sample.mask_path is None:
            continue
        image = read_image(sample.path)
        try:
            out[i] = read_mask(
                sample.mask_path,
                (spec.height, spec.width),
                mask_threshold,
                expected_shape=(image.height, image.width),
            )
        except MaskError as error:
            raise MaskError(f"{error} (image '{sample.path}')") from error
    return out


def write_evaluation(
    table: pd.DataFrame, per_image: pd.DataFrame, detector: VAEAnomalyDetector, output_dir: Path
) -> dict[str, Path]:
    """Write the metrics table (CSV + JSON) and per-image scores (CSV) atomically."""
    output_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "metrics_csv": output_dir / "metrics.csv",
        "metrics_json": output_dir / "metrics.json",
        "scores_csv": output_dir / "scores.csv",
    }
    payload = {
        "metrics": json.loads(table.to_json(orient="index")),
        "threshold": getattr(detector, "threshold_", None),
        "calibration": detector.calibration_state(),
        "scoring": detector.scoring_.to_dict(),
        "preprocessing": detector.preprocessing_.to_dict(),
    }
    atomic_write_text(files["metrics_csv"], table.to_csv())
    atomic_write_text(files["metrics_json"], json.dumps(payload, indent=2, default=str))
    atomic_write_text(files["scores_csv"], per_image.to_csv(index=False))
    return files


class DemoResult(NamedTuple):
    """What :func:`run_demo` made and measured."""

    data_dir: Path
    checkpoint: Path
    evaluation: Evaluation
    train_seconds: float
    total_seconds: float


def run_demo(
    output_dir: str | os.PathLike[str],
    size: int = 64,
    n_train: int = 240,
    epochs: int = 40,
    seed: int = 0,
    progress: bool = True,
) -> DemoResult:
    """Synthesize a textured dataset with defects, train, calibrate, evaluate.

    Everything goes under ``output_dir``: ``data/`` (MVTec-style), ``model.pt``,
    and ``evaluation/`` (metrics.csv, metrics.json, scores.csv).
    """
    started = time.monotonic()
    output_dir = Path(output_dir)
    data_dir = make_synthetic_dataset(
        output_dir / "data", n_train=n_train, n_test_good=60, n_test_defect=60, size=size, seed=seed
    )
    checkpoint = output_dir / "model.pt"
    train_started = time.monotonic()
    # 15 % of 240 normals gives 36 calibration images: a 5 % target FPR is what
    # they can resolve (1 % would need 100).
    train_on(
        data_dir,
        checkpoint,
        epochs=epochs,
        patience=10,
        seed=seed,
        target_fpr=0.05,
        progress=progress,
    )
    train_seconds = time.monotonic() - train_started
    evaluation = evaluate_on(checkpoint, data_dir, output_dir / "evaluation", progress=progress)
    return DemoResult(data_dir, checkpoint, evaluation, train_seconds, time.monotonic() - started)


# --------------------------------------------------------------------------- generative


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


def score_files(
    checkpoint: str | os.PathLike[str],
    paths: list[Path],
    valid_mask: str | os.PathLike[str] | None = None,
) -> list[tuple[Path, float, float, bool]]:
    """(name, score, normalized score, is_anomaly) per file with a saved detector.

    A NIfTI volume of several slices gives one row per slice (``path#slice=NNNN``, all
    slices, normalized per volume as in training) and a last row ``path`` for the volume
    itself, with the score of its worst slice, as the scan reports volumes.
    """
    detector = VAEAnomalyDetector.load(checkpoint, progress=False)
    spec = detector.preprocessing_
    valid = None
    if valid_mask is not None:
        valid = read_mask(valid_mask, (spec.height, spec.width), 0.0)
    threshold = detector.decision_threshold()
    names: list[Path | str] = []
    scores: list[float] = []
    flat: list[Path] = []  # 2-D files, scored together in batches

    def flush() -> None:
        if flat:
            names.extend(flat)
            scores.extend(detector.anomaly_score(flat, valid_mask=valid).tolist())
            flat.clear()

    for path in paths:
        volume = read_volume(path) if is_nifti(path) else None
        if volume is None or volume.data.shape[0] == 1:
            flat.append(path)
            continue
        flush()
        slices = detector.anomaly_score(volume_slices(path, spec, volume=volume), valid)
        names.extend(f"{path}#slice={k:04d}" for k in range(len(slices)))
        names.append(path)
        scores.extend([*slices.tolist(), float(slices.max())])
    flush()
    return [
        (name, float(s), float(s / threshold), bool(s > threshold))
        for name, s in zip(names, scores, strict=True)
    ]
