"""Shared pieces of the benchmark pipelines: every kind of map/score, a PCA baseline, figures.

Everything is measured through the product's own API (VAEAnomalyDetector, metrics,
calibration), so the pipelines double as end-to-end tests on real data.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from anomalyvae.calibration import threshold_from_normals  # noqa: E402
from anomalyvae.data import Sample, synthetic_texture  # noqa: E402
from anomalyvae.detector import VAEAnomalyDetector  # noqa: E402
from anomalyvae.imaging.batch import read_images  # noqa: E402
from anomalyvae.metrics import evaluation_table, sensitivity_at_specificity  # noqa: E402
from anomalyvae.models.maps import (  # noqa: E402
    ScoringConfig,
    gaussian_blur,
    topk_count,
)
from anomalyvae.set_scoring import masks_for  # noqa: E402


def shown(path: Path) -> str:
    """A path as reports show it: relative to the repository, never a machine path."""
    root = Path(__file__).resolve().parents[1]
    try:
        # absolute, links kept: runs/ may be a link to where the suite trained
        return Path(os.path.relpath(os.path.abspath(path), root)).as_posix()
    except ValueError:  # another drive
        return Path(path).name


#: Appended to a fresh process's script: its own peak resident memory (VmHWM, from exec
#: on; ru_maxrss is not used, Linux keeps it across exec, so a child forked from a large
#: benchmark would report the parent's peak).
_PRINT_PEAK = (
    "\nprint('PEAK_KB', [l for l in open('/proc/self/status') "
    "if l.startswith('VmHWM')][0].split()[1])"
)


def fresh_process_peak(script: str, *args: str) -> tuple[float, str]:
    """Run Python ``script`` with ``args`` in a fresh interpreter: its peak resident
    memory in MB, and what it printed."""
    done = subprocess.run(
        [sys.executable, "-c", script + _PRINT_PEAK, *args], capture_output=True, text=True
    )
    if done.returncode != 0:  # say why: a bare CalledProcessError hides the child's error
        raise RuntimeError(f"a fresh process failed ({args}):\n{done.stderr[-3000:]}")
    *printed, peak = done.stdout.strip().splitlines()
    return int(peak.split()[1]) / 1024, "\n".join(printed)


def machine() -> str:
    """One line naming this machine, for every report."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {torch.get_num_threads()} torch threads, Python "
        f"{platform.python_version()}, torch {torch.__version__}"
    )


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """Dense float32 matmul GFLOP/s with numpy (BLAS, all threads): the practical ceiling."""
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    b = np.random.default_rng(1).random((n, n), dtype=np.float32)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def timed(fn) -> float:
    """Seconds one call of ``fn`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cli(*args: str) -> float:
    """Run ``anomalyvae ARGS`` in a fresh interpreter; return its wall time in seconds."""
    started = time.monotonic()
    completed = subprocess.run(
        [sys.executable, "-m", "anomalyvae", *args], capture_output=True, text=True
    )
    if completed.returncode != 0:
        raise RuntimeError(f"anomalyvae {' '.join(args)} failed:\n{completed.stderr[-3000:]}")
    return time.monotonic() - started


PIXEL_CHECKPOINT = Path(__file__).resolve().parents[1] / "runs" / "mtd" / "pixel.pt"
MTD_SPLIT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mtd" / "split.json"


def pixel_checkpoint(path: Path, data: Path = MTD_SPLIT, budget: float = 900.0) -> Path:
    """A pixel-model checkpoint at ``path``, trained once with the CLI when it is missing.

    The generative uses and DDP training belong to the pixel model, while the product's
    default on MTD-sized images is the feature model, so these benchmarks train their own.
    """
    if not path.exists():
        print(f"training the pixel model on {shown(data)} -> {shown(path)}", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        args = ["train", str(data), "-o", str(path), "--model", "pixel"]
        cli(*args, "--time-budget", f"{budget:g}", "--silent")
    family = VAEAnomalyDetector.load(path, progress=False).family()
    if not family.generative:  # these benchmarks decode pixels
        raise SystemExit(f"{path} holds a {family.name} model; this benchmark needs --model pixel")
    return path


@dataclass
class Scored:
    """Scores and maps of one method (a map/score kind, or the PCA baseline)."""

    name: str
    scores: np.ndarray
    maps: np.ndarray | None
    threshold: float


def markdown_table(frame: pd.DataFrame, floatfmt: str = ".3f") -> str:
    """A DataFrame as a GitHub markdown table, index first (no tabulate needed)."""

    def cell(value) -> str:
        if isinstance(value, (float, np.floating)):
            return "–" if not np.isfinite(value) else format(value, floatfmt)
        return str(value)

    header = [str(frame.index.name or ""), *map(str, frame.columns)]
    rows = [
        [cell(i), *map(cell, row)] for i, row in zip(frame.index, frame.to_numpy(), strict=True)
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def smoke_model(root: Path, size: int = 64) -> tuple[Path, Path]:
    """A smoke run's (MVTec-style data root, checkpoint): tiny synthetic set, one epoch.

    Numbers from it are meaningless; it proves the pipeline still runs end to end.
    """
    from anomalyvae.data import discover, make_synthetic_dataset

    data = make_synthetic_dataset(
        root / "data", n_train=40, n_test_good=8, n_test_defect=8, size=size
    )
    checkpoint = root / "model.pt"
    paths = [s.path for s in discover(data, "train")]
    VAEAnomalyDetector(epochs=1, target_fpr=0.2, progress=False).fit(paths).save(checkpoint)
    return data, checkpoint


def synthetic_folder(root: Path, n: int, size: int = 128) -> Path:
    """``n`` synthetic normal-texture PNGs under ``root`` (1,000 per subfolder)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        path = root / f"batch{i // 1000:02d}" / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.clip(synthetic_texture(rng, size), 0, 1) * 255).astype(np.uint8)).save(
            path
        )
    return root


def load_test(samples: list[Sample], detector: VAEAnomalyDetector, mask_threshold: float):
    """Model-ready test images, labels, types and masks at model resolution."""
    spec = detector.preprocessing_
    images, kept, _ = read_images([s.path for s in samples], spec, on_error="raise")
    masks = masks_for(samples, detector, mask_threshold)
    has_mask = np.array([s.label == 0 or s.mask_path is not None for s in samples])
    labels = np.array([s.label for s in samples])
    types = [s.defect_type for s in samples]
    return images, labels, types, masks, has_mask


def scoring_variants(detector: VAEAnomalyDetector, train_images, holdout_images=None):
    """Set each of the model's scoring variants on ``detector`` in turn.

    Pixel model: each map kind x score kind, raw and standardized ("nll/topk_mean",
    "z-nll/topk_mean", "elbo (image)"); standardized variants first fit their per-pixel
    statistics on ``train_images`` and, given ``holdout_images`` (normals the model did
    not train on), the fusion constants, adding the "global" and "fused" scores
    ("z-ssim/fused"). Feature model: each score kind over its one map ("feature/knn",
    "feature/fused"). Yields the variant's name; restores the detector's own scoring
    (and statistics) at the end.
    """
    original = detector.scoring_
    original_stats = getattr(detector, "map_stats_", None)
    family = detector.family()
    try:
        if own_map_family(detector):  # one map of its own: its score kinds
            for score_kind in family.score_kinds:
                detector.scoring_ = dataclasses.replace(original, score_kind=score_kind)
                yield variant_name(detector.scoring_, family.name)
            return
        for map_kind in family.map_kinds:
            for standardize in (False, True):
                base = dataclasses.replace(
                    original, map_kind=map_kind, score_kind="topk_mean", standardize=standardize
                )
                kinds = ["max", "topk_mean", "elbo"]
                if standardize:
                    detector.scoring_ = base
                    detector.fit_map_stats(train_images)
                    if holdout_images is not None:
                        detector.fit_fusion(holdout_images)
                        kinds += ["global", "fused"]
                for score_kind in kinds:
                    if score_kind == "elbo" and (map_kind != "nll" or standardize):
                        continue  # the ELBO score depends on neither
                    detector.scoring_ = dataclasses.replace(base, score_kind=score_kind)
                    yield variant_name(detector.scoring_)
    finally:
        detector.scoring_ = original
        if original_stats is not None:
            detector.map_stats_ = original_stats


def map_label(detector: VAEAnomalyDetector) -> str:
    """The detector's anomaly map in words for report headers.

    The feature model's map follows its ``map_rule`` ("mean-z": the mean z-score of the
    location ELBO and bank distance), not the scoring's ``map_kind``.
    """
    return detector.family().describe_map(detector.model_, detector.scoring_)


def own_map_family(detector: VAEAnomalyDetector) -> str | None:
    """The family's name when it scores one map of its own (no per-pixel statistics),
    None for a family whose variants are map x score kinds: :func:`variant_name`'s
    ``family``."""
    family = detector.family()
    return None if family.per_pixel_stats else family.name


def variant_name(scoring: ScoringConfig, family: str | None = None) -> str:
    """The name :func:`scoring_variants` gives ``scoring``.

    ``family``: the name of a family with one map of its own (the feature model), whose
    variants are its score kinds; None for the pixel model's map x score variants.
    """
    if family is not None:
        return f"{family}/{scoring.score_kind}"
    if scoring.score_kind == "elbo":
        return "elbo (image)"
    return f"{'z-' if scoring.standardize else ''}{scoring.map_kind}/{scoring.score_kind}"


def score_every_kind(
    detector: VAEAnomalyDetector,
    test_images: np.ndarray,
    val_files: list[str],
    target_fpr: float,
    train_images: np.ndarray,
) -> list[Scored]:
    """Every scoring variant, thresholds from the val normals at ``target_fpr``.

    ``val_files`` are the model's held-out normals: they also fit the pixel model's
    fusion constants (its "global" and "fused" variants).
    """
    results = []
    holdout = detector.preprocess(val_files) if detector.family().per_pixel_stats else None
    for name in scoring_variants(detector, train_images, holdout):
        val_scores = detector.anomaly_score(val_files)
        threshold = threshold_from_normals(val_scores, target_fpr).value
        scores, maps = detector.score_and_map(test_images)
        results.append(Scored(name, scores, maps, threshold))
    return results


def topk_mean(maps: np.ndarray, fraction: float, sigma: float = 2.0) -> np.ndarray:
    """Mean of the largest values of each (h, w) map: the product's own ``topk_count``
    (the ``fraction`` share, never fewer than one smoothing footprint)."""
    flat = maps.reshape(len(maps), -1)
    k = topk_count(ScoringConfig("recon", "topk_mean", sigma, fraction), flat.shape[1])
    return np.sort(flat, axis=1)[:, -k:].mean(1)


def pca_baseline(
    train_images: np.ndarray,
    val_images: np.ndarray,
    test_images: np.ndarray,
    n_components: int = 50,
    sigma: float = 2.0,
    topk_fraction: float = 0.01,
    target_fpr: float = 0.01,
    seed: int = 0,
) -> Scored:
    """Honest floor: PCA reconstruction error, smoothed, top-k mean (scikit-learn PCA)."""
    n, c, h, w = train_images.shape
    pca = PCA(n_components=min(n_components, n - 1), random_state=seed)
    pca.fit(train_images.reshape(n, -1))

    def maps_of(images: np.ndarray) -> np.ndarray:
        flat = images.reshape(len(images), -1)
        recon = pca.inverse_transform(pca.transform(flat))
        error = ((flat - recon) ** 2).reshape(len(images), c, h, w).mean(1, keepdims=True)
        return gaussian_blur(torch.from_numpy(error.astype(np.float32)), sigma)[:, 0].numpy()

    def scores_of(maps: np.ndarray) -> np.ndarray:
        return topk_mean(maps, topk_fraction, sigma)

    threshold = threshold_from_normals(scores_of(maps_of(val_images)), target_fpr).value
    test_maps = maps_of(test_images)
    return Scored(f"PCA-{pca.n_components_} baseline", scores_of(test_maps), test_maps, threshold)


def tables(results: list[Scored], labels, types, masks, has_mask) -> dict[str, pd.DataFrame]:
    """One evaluation table (overall + per defect type) per method."""
    out = {}
    for result in results:
        table = evaluation_table(
            labels, result.scores, types, result.threshold, masks, result.maps, pixel_valid=has_mask
        )
        table["sens_at_95_spec"] = [
            sensitivity_at_specificity(
                labels[(labels == 0) | (np.array(types) == t)] if t != "overall" else labels,
                result.scores[(labels == 0) | (np.array(types) == t)]
                if t != "overall"
                else result.scores,
                0.95,
            )
            for t in table.index
        ]
        out[result.name] = table
    return out


def overview(all_tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The overall row of every method, one row per method."""
    rows = {name: table.loc["overall"] for name, table in all_tables.items()}
    frame = pd.DataFrame(rows).T
    frame.index.name = "method"
    keep = [
        c
        for c in (
            "image_auroc",
            "image_aupr",
            "f1",
            "fpr",
            "recall",
            "sens_at_95_spec",
            "pixel_auroc",
            "aupro",
        )
        if c in frame.columns
    ]
    return frame[keep].astype(float)


def plot_roc(results: list[Scored], labels, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    for result in results:
        fpr, tpr, _ = roc_curve(labels, result.scores)
        ax.plot(fpr, tpr, label=result.name, lw=1)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title="Image ROC")
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_histogram(result: Scored, labels, types, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    types = np.array(types)
    bins = np.histogram_bin_edges(result.scores, bins=40)
    for t in sorted(set(types)):
        ax.hist(result.scores[types == t], bins=bins, histtype="step", label=t, lw=1.2)
    ax.axvline(result.threshold, color="k", ls="--", lw=1, label="threshold")
    ax.set(xlabel="image score", ylabel="images", title=f"Scores by class: {result.name}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_examples(result: Scored, images, masks, labels, path: Path, n: int = 4) -> None:
    """Best and worst cases: highest-scored defects, lowest-scored defects, top normals."""
    order = np.argsort(result.scores)
    defects = [i for i in order if labels[i] == 1]
    normals = [i for i in order if labels[i] == 0]
    rows = [
        ("defect, highest score", defects[::-1][:n]),
        ("defect, lowest score", defects[:n]),
        ("normal, highest score", normals[::-1][:n]),
    ]
    fig, axes = plt.subplots(len(rows), 2 * n, figsize=(2 * n * 1.3, len(rows) * 1.5))
    for r, (title, index) in enumerate(rows):
        for j, i in enumerate(index):
            axes[r, 2 * j].imshow(images[i].transpose(1, 2, 0).squeeze(), cmap="gray")
            if masks[i].any():
                axes[r, 2 * j].contour(masks[i], levels=[0.5], colors="lime", linewidths=0.6)
            axes[r, 2 * j + 1].imshow(result.maps[i], cmap="inferno")
            axes[r, 2 * j].set_title(f"{result.scores[i]:.3g}", fontsize=6)
        axes[r, 0].set_ylabel(title, fontsize=6)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{result.name}: image, map (mask outline in green)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, default=float))


class Timer:
    def __enter__(self):
        self.start = time.monotonic()
        return self

    def __exit__(self, *exc):
        self.seconds = time.monotonic() - self.start
