"""Dataset-level jobs behind the CLI: train on a source, calibrate, evaluate, score, demo.

Each function is one CLI command's work, callable from Python as well. The generative
commands (sample, denoise, inpaint, embed) live in :mod:`anomalyvae.generative`.
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
from numpy.typing import NDArray

from anomalyvae.calibration import DEFAULT_TAIL, MapPixelSample, normalize
from anomalyvae.clock import command_budget
from anomalyvae.data import DatasetError, discover, make_synthetic_dataset
from anomalyvae.detector import VAEAnomalyDetector
from anomalyvae.imaging.files import atomic_write_text, display_path
from anomalyvae.imaging.io import ImageReadError
from anomalyvae.imaging.medical import is_nifti
from anomalyvae.imaging.preprocessing import MaskError
from anomalyvae.imaging.volumes import (
    slice_name,
)
from anomalyvae.inference.contract import describe_fusion, promised_fpr
from anomalyvae.metrics import evaluation_table
from anomalyvae.set_scoring import (
    masks_for,
    readable_masks,
    score_set_files,
    scored_chunks,
    volume_units,
)


def train_on(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    resume: bool = False,
    **params: Any,
) -> VAEAnomalyDetector:
    """Train a detector on the normal images of ``source`` and save it to ``output``.

    ``source`` is a folder of normal images, an MVTec-style root (its ``train/good``),
    or a JSON split file (its ``train_good``). ``params`` go to VAEAnomalyDetector;
    its ``time_budget_s`` covers the whole process (:func:`anomalyvae.clock.command_budget`):
    what was spent before the fit comes off, and a margin stays for the final save.
    """
    params["time_budget_s"] = command_budget(params.get("time_budget_s"))
    samples = discover(source, "train")
    detector = VAEAnomalyDetector(checkpoint_path=output, **params)
    return detector.fit([s.path for s in samples if s.label == 0], resume=resume)


def training_report(detector: VAEAnomalyDetector, output: str | os.PathLike[str]) -> list[str]:
    """What ``train`` says when it ends: data, model, threshold and what it can promise.

    Empty on every process but the first under ``torchrun`` (rank 0 reports and writes).
    """
    from anomalyvae.models.train import is_main_process

    if not is_main_process():
        return []
    summary, data = detector.training_summary_, detector.data_summary_
    tiles = detector.family().tiling(detector.model_).get("n_tiles", 1)
    backbone = getattr(getattr(detector.model_, "config", None), "backbone", None)
    calibration = detector.calibration_
    chosen = ""
    if "n_given" in data:  # a budget cut the set (anomalyvae.capacity)
        chosen = (
            f", a seeded choice of the {data['n_given']} given that fits the "
            f"{data['capacity']['limit']} budget,"
        )
    lines = [
        f"Trained on {data['n_train']} images ({data['n_val']} held out){chosen} for "
        f"{summary['epochs_run']} epochs in {summary['elapsed_s']:.0f} s (best epoch "
        f"{summary['best_epoch']}, stopped: {summary['stopped_reason']}).",
        f"Model: {detector.family_} ({detector.preprocessing_.height}x"
        f"{detector.preprocessing_.width}{f', {backbone}' if backbone else ''}"
        f"{f', backbone in {tiles} tiles' if tiles > 1 else ''}"
        f", score {detector.scoring_.score_kind}).",
        f"Threshold {detector.threshold_:.6g} at target FPR {detector.target_fpr:g}, from "
        f"{calibration.n_normal} normals. Saved {output}",
    ]
    promised = promised_fpr(calibration.to_dict())
    if promised and promised > detector.target_fpr:
        why = (
            "2/(n+1): the threshold is kept off the single most extreme normal"
            if calibration.tail == "robust"
            else "1/(n+1)"
        )
        lines.append(
            f"Warning: {calibration.n_normal} calibration normals cannot promise a "
            f"false-positive rate below {promised:.1%} ({why}); expect about that rate of "
            "normal images flagged, or train on more normal images."
        )
    fusion = describe_fusion(detector.family().fusion(detector))
    if fusion:
        lines.append(fusion)
    check = getattr(detector, "self_check_", {}) or {}
    if check.get("detection_rate") is not None:
        kinds = ", ".join(f"{k} {v:.0%}" for k, v in check["by_kind"].items())
        lines.append(
            f"Self-check: {check['detection_rate']:.0%} of synthetic defects pasted into the "
            f"{check['n_images']} held-out normals are detected at this threshold ({kinds}); "
            "an estimate from made-up defects, not a test on real ones."
        )
    return lines


def calibrate_on(
    checkpoint: str | os.PathLike[str],
    source: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    method: str = "normal_quantile",
    target_fpr: float | None = None,
    mask_threshold: float = 0.0,
    subset: str = "test",
    progress: bool = True,
    score_kind: str | None = None,
    tail: str = DEFAULT_TAIL,
) -> VAEAnomalyDetector:
    """Recalibrate a saved detector on ``source`` and save it (in place by default).

    With ``method="normal_quantile"`` only the normal images of ``source`` are used;
    "f1" and "youden" need labelled normal and anomalous images. ``score_kind`` switches
    the image score to another of the model's candidate scores first (``evaluate``
    lists each one's AUROC); the threshold is then read in that score's units. ``tail``:
    how "normal_quantile" reads the top of the normal scores (``anomalyvae.calibration.TAILS``).
    """
    detector = VAEAnomalyDetector.load(checkpoint, progress=progress)
    if target_fpr is not None:
        detector.target_fpr = target_fpr
    if score_kind is not None and score_kind != detector.scoring_.score_kind:
        detector.use_score_kind(score_kind)
    samples = discover(source, subset)
    labelled = method != "normal_quantile"
    if not labelled:
        samples = [s for s in samples if s.label == 0]
    # read and scored a chunk at a time, as evaluate does: memory holds one chunk of
    # images, and of each map only what the pixel threshold may read (a labelled set's
    # maps whole, for its masks; else a sample of each normal map's pixels). An unreadable
    # file is skipped with a warning naming it, as training skips it; normal volumes
    # calibrate on their slices, labelled files keep one image (and label) each
    if labelled:  # every map, filled in place as evaluate fills it
        read, scores, maps, _ = score_set_files(
            detector, samples, [], progress, views=False, desc="calibrating"
        )
    else:
        read = []
        parts: list[NDArray[np.float64]] = []
        sample = MapPixelSample(len(samples))
        for chunk in scored_chunks(
            detector, samples, [], progress, "slices", views=False, desc="calibrating"
        ):
            read += chunk.samples
            parts.append(chunk.scores)
            sample.add(chunk.maps)
        scores, maps = np.concatenate(parts) if parts else np.zeros(0), sample.pixels()
    if not read:
        raise DatasetError(
            f"no readable {'labelled' if labelled else 'normal'} images to calibrate on in "
            f"'{source}' (subset '{subset}')"
        )
    labels, masks = None, None
    if labelled:
        samples = read
        labels = np.array([s.label for s in samples])
        if all(s.mask_path or s.label == 0 for s in samples):
            masks = masks_for(samples, detector, mask_threshold)
    detector.calibrate_scored(scores, maps, labels, masks, method, tail=tail)
    detector.save(output or checkpoint)
    return detector


class Evaluation(NamedTuple):
    """What :func:`evaluate_on` returns: a metrics table and per-image rows."""

    table: pd.DataFrame
    per_image: pd.DataFrame
    #: every image's map (n, h, w), kept for the pixel metrics; None for a set without masks
    maps: np.ndarray | None
    masks: np.ndarray | None
    files: dict[str, Path]
    #: image AUROC of each candidate score of the model (:func:`score_kind_aurocs`)
    score_kinds: dict[str, float] = {}
    #: the model's own score kind (the ``score`` column)
    score_kind: str = ""
    #: files that could not be read, left out of every metric: ``path`` and ``error``
    left_out: list[dict[str, str]] = []


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
    left out with a warning naming both files, and the evaluation goes on; so is an
    image whose mask cannot be read or does not fit it, and an unreadable image. Every
    file left out is listed (``left_out``, and in
    ``metrics.json``), so that no metric silently covers fewer images than the folder.
    """
    detector = (
        checkpoint
        if isinstance(checkpoint, VAEAnomalyDetector)
        else VAEAnomalyDetector.load(checkpoint, progress=progress)
    )
    samples = discover(source, subset)
    flat = [s for s in samples if not is_nifti(s.path)]
    volumes = [s for s in samples if is_nifti(s.path)]
    left_out: list[dict[str, str]] = []
    # the maps serve the pixel metrics only: a set without masks keeps none of them, so
    # evaluate's memory does not grow with the number of images
    any_mask = any(s.mask_path for s in samples)
    masks = None
    if any_mask:  # read first: an image whose mask is broken is left out, not scored
        flat, masks = readable_masks(flat, detector, mask_threshold, left_out)
    scored, scores, maps, views = score_set_files(detector, flat, left_out, progress, any_mask)
    if masks is not None and len(scored) < len(flat):  # unreadable images: their rows go
        read = {Path(s.path) for s in scored}
        masks = masks[[Path(s.path) in read for s in flat]]
    flat = scored
    labels = np.array([s.label for s in flat], dtype=np.int64)
    types = [s.defect_type for s in flat]
    names = [display_path(Path(s.path)) for s in flat]  # any file name survives the table
    has_mask = np.array([s.label == 0 or s.mask_path is not None for s in flat], dtype=bool)
    parts = {"scores": [scores], "maps": [maps], "masks": [masks], "labels": [labels]}
    parts["has_mask"] = [has_mask]
    for sample in volumes:
        try:
            unit = volume_units(sample, detector, mask_threshold)
        except (MaskError, ImageReadError) as error:
            warnings.warn(f"left out of the evaluation: {error}", UserWarning, stacklevel=2)
            left_out.append({"path": display_path(Path(sample.path)), "error": str(error)})
            continue
        volume_scores, volume_maps, found = detector.score_map_views(unit.images)
        for name, values in found.items():
            views.setdefault(name, []).append(values)
        parts["scores"].append(volume_scores)
        parts["maps"].append(volume_maps if any_mask else None)
        parts["masks"].append(unit.masks if any_mask else None)
        parts["labels"].append(unit.labels)
        parts["has_mask"].append(unit.has_mask)
        types += [sample.defect_type] * len(unit.labels)
        names += [slice_name(display_path(Path(sample.path)), k) for k in range(len(unit.labels))]

    # one part (no volume) is kept as it is: a copy of every map would double the peak
    def join(name: str) -> Any:
        return parts[name][0] if len(parts[name]) == 1 else np.concatenate(parts[name])

    scores, labels, has_mask = join("scores"), join("labels"), join("has_mask")
    if any_mask:
        maps, masks = join("maps"), join("masks")
    if not len(labels):
        raise DatasetError(f"nothing to evaluate in '{source}': no readable test images")
    threshold = getattr(detector, "threshold_", None)
    keep = has_mask if any_mask else None
    table = evaluation_table(labels, scores, types, threshold, masks, maps, pixel_valid=keep)
    per_image = pd.DataFrame(
        {"path": names, "defect_type": types, "label": labels, "score": scores}
    )
    if threshold is not None:
        per_image["normalized_score"] = normalize(scores, threshold)
        per_image["is_anomaly"] = scores > threshold
    joined = {name: np.concatenate(parts) for name, parts in views.items()}
    kinds = score_kind_aurocs(labels, scores, detector.scoring_.score_kind, joined)
    files: dict[str, Path] = {}
    if output_dir is not None:
        files = write_evaluation(table, per_image, detector, Path(output_dir), kinds, left_out)
    return Evaluation(
        table, per_image, maps, masks, files, kinds, detector.scoring_.score_kind, left_out
    )


def score_kind_of(view: str) -> str:
    """The ``score_kind`` that makes a view the image score ("local" is the top-k mean)."""
    return "topk_mean" if view == "local" else view


def score_kind_aurocs(
    labels: np.ndarray, scores: np.ndarray, score_kind: str, views: dict[str, np.ndarray]
) -> dict[str, float]:
    """Image AUROC of the model's score and of every candidate view, by score kind.

    Empty without both normal and anomalous images. Lets a user with labelled images see
    whether another score kind suits their data (``anomalyvae calibrate --score-kind``).
    """
    if len(set(labels.tolist())) < 2:
        return {}
    from sklearn.metrics import roc_auc_score

    out = {score_kind: float(roc_auc_score(labels, scores))}
    for name, values in views.items():
        out.setdefault(score_kind_of(name), float(roc_auc_score(labels, values)))
    return out


def describe_score_kinds(kinds: dict[str, float], current: str) -> str:
    """One paragraph: each score kind's image AUROC, and how to switch to a better one."""
    if len(kinds) < 2:
        return ""
    ranked = sorted(kinds.items(), key=lambda item: -item[1])
    text = "Image AUROC by score kind: " + ", ".join(
        f"{k} {v:.3f}" + (" (this model's)" if k == current else "") for k, v in ranked
    )
    best, value = ranked[0]
    if best != current and value > kinds[current] + SCORE_KIND_HINT_MARGIN:
        text += (
            f". The {best} score ranks these images better; to use it, recalibrate on a "
            f"labelled validation set (not on the test set you report): anomalyvae "
            f"calibrate MODEL DATA --subset val --score-kind {best}"
        )
    return text + "."


def write_evaluation(
    table: pd.DataFrame,
    per_image: pd.DataFrame,
    detector: VAEAnomalyDetector,
    output_dir: Path,
    score_kinds: dict[str, float] | None = None,
    left_out: list[dict[str, str]] | None = None,
) -> dict[str, Path]:
    """Write the metrics table (CSV + JSON) and per-image scores (CSV) atomically.

    ``left_out``: the files the metrics do not cover (unreadable), listed in the JSON.
    """
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
        "image_auroc_by_score_kind": score_kinds or {},
        "left_out": list(left_out or []),
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


def describe_demo(result: DemoResult) -> str:
    """What ``anomalyvae demo`` prints after its metrics table: the headline and files."""
    overall = result.evaluation.table.loc["overall"]
    files = result.evaluation.files
    return (
        f"\nImage AUROC {overall['image_auroc']:.3f}, pixel AUROC "
        f"{overall.get('pixel_auroc', float('nan')):.3f}, AUPRO "
        f"{overall.get('aupro', float('nan')):.3f}; trained in {result.train_seconds:.0f} s, "
        f"total {result.total_seconds:.0f} s.\n"
        f"Data: {result.data_dir}\nModel: {result.checkpoint}\n"
        f"Metrics: {files['metrics_csv']}, {files['metrics_json']}\n"
        f"Per-image scores: {files['scores_csv']}"
    )


#: How much better (image AUROC) another score kind must rank the evaluated images before
#: ``evaluate`` suggests switching to it.
SCORE_KIND_HINT_MARGIN = 0.02
#: The metrics columns a printed table shows, in order (those present).
PRINTED_METRICS = (
    "n_images",
    "image_auroc",
    "image_aupr",
    "f1",
    "precision",
    "recall",
    "fpr",
    "pixel_auroc",
    "aupro",
)


def missing_class_note(table: pd.DataFrame) -> str | None:
    """Why the ranking metrics are NaN, when the images hold one class only; else None."""
    overall = table.loc["overall"]
    if overall["n_anomalous"] and overall["n_normal"]:
        return None
    if not overall["n_anomalous"]:
        return (
            "No anomalous images: AUROC, AUPR and recall need both classes and are NaN; "
            "'fpr' is the share of these normals over the threshold. Add labelled defects "
            "(a folder per defect type beside 'good') to rank them."
        )
    return (
        "No normal images: AUROC, AUPR and the false-positive rate need both classes and "
        "are NaN; 'recall' is the share of these anomalies over the threshold. Add normal "
        "images (a 'good' folder) to rank them."
    )


def format_metrics(table: pd.DataFrame) -> str:
    """A metrics table (rows per defect type) as aligned text with 3 decimals."""
    columns = [c for c in PRINTED_METRICS if c in table.columns]
    return table[columns].to_string(float_format=lambda v: f"{v:.3f}")


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
