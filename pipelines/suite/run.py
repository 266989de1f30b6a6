"""The benchmark suite: every real data set, the product's defaults against a PCA floor.

    python pipelines/suite/run.py                 # every set under ../shared/datasets
    python pipelines/suite/run.py --smoke         # two tiny synthetic sets, one round (CI)
    python pipelines/suite/run.py --lean          # without the slow probe and map tables
    python pipelines/suite/run.py --probes-only --work DIR
                                                  # recompute the probes of trained models
    python pipelines/suite/run.py --variant NAME --train-args "--model feature" --sets X
                                                  # a variant, logged in variants.jsonl
                                                  # (judged by retrained.py)

Sets are discovered, never listed: a folder under the data root with a ``split.json``
(MTD-style split file) or an MVTec layout (``train/good``) is a set. For each set:

- **defaults**: ``anomalyvae train SOURCE -o model.pt --time-budget 900`` and
  ``anomalyvae evaluate model.pt SOURCE``, through the CLI only, no per-set option;
- **PCA-50 floor**: scikit-learn PCA with 50 components on the training normals at
  128 x 128, reconstruction error smoothed, top-k mean (the same reduction as the
  product), threshold from the same held-out share of normals;
- **alternatives**: the product's other candidate scores of the same trained model
  (the feature model's local / ELBO / global views, or the pixel model's map kinds),
  from which the per-set best is reported - an upper bound nobody could pick without
  labels, shown so that the defaults' distance to it is visible.

Writes reports/suite/README.md, results.json and auroc.png (or, with --smoke, the same
under a temporary folder unless --out is given).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from common import cli, machine, pca_baseline, plt, shown, tables  # noqa: E402
from lines import PROBE_LINE_SHARE, extent_view, line_kernels, share_length  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from anomalyvae.data import discover, make_synthetic_dataset  # noqa: E402
from anomalyvae.detector import VAEAnomalyDetector  # noqa: E402
from anomalyvae.imaging.batch import read_images  # noqa: E402
from anomalyvae.imaging.preprocessing import Preprocessing
from anomalyvae.metrics import sensitivity_at_specificity  # noqa: E402
from anomalyvae.models.bank import interior  # noqa: E402
from anomalyvae.models.fusion import (  # noqa: E402
    IMAGE_SHARE_POWER,
    IMAGE_SHARE_SCALE,
    robust_z_constants,
)
from anomalyvae.set_scoring import masks_for  # noqa: E402
from anomalyvae.training_data import few_levels_note, probe_sources  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = ROOT.parent / "shared" / "datasets"
DEFAULT_OUT = ROOT / "reports" / "suite"
#: The floor's input size and components, as the issue that set the rule measured them.
PCA_SIZE, PCA_COMPONENTS = 128, 50
#: The rule every set must meet: defaults >= floor + MARGIN image AUROC.
MARGIN = 0.10


def discover_sets(data_root: Path) -> dict[str, Path]:
    """Name -> training source (split file or MVTec root) of every set under ``data_root``."""
    sets = {}
    for folder in sorted(p for p in data_root.iterdir() if p.is_dir()):
        if (folder / "split.json").is_file():
            sets[folder.name] = folder / "split.json"
        elif (folder / "train" / "good").is_dir():
            sets[folder.name] = folder
    return sets


def pca_floor(source: Path, train: list[Path], detector: VAEAnomalyDetector, test) -> dict:
    """PCA-50 at 128 x 128: image AUROC, pixel AUROC and AUPRO, with its own threshold."""
    spec = Preprocessing(detector.preprocessing_.channels, PCA_SIZE, PCA_SIZE)
    images, _, _ = read_images(train, spec, on_error="ignore")
    val_index, train_index = detector.split_indices(len(images))
    test_images, _, _ = read_images([s.path for s in test], spec, on_error="raise")
    result = pca_baseline(
        images[train_index], images[val_index], test_images, n_components=PCA_COMPONENTS
    )
    labels = np.array([s.label for s in test])
    has_masks = any(s.mask_path for s in test)
    masks = maps = None
    if has_masks:
        pca_detector = VAEAnomalyDetector()
        pca_detector.preprocessing_ = spec  # masks at the floor's resolution
        masks = masks_for(test, pca_detector, 0.5)
        maps = result.maps
    return _metrics(labels, result.scores, result.threshold, test, masks, maps)


def _metrics(labels, scores, threshold, test, masks=None, maps=None) -> dict:
    from common import Scored

    types = [s.defect_type for s in test]
    has_mask = np.array([s.label == 0 or s.mask_path is not None for s in test])
    table = tables(
        [Scored("x", scores, maps, threshold)],
        labels,
        types,
        masks if masks is not None else None,
        has_mask,
    )["x"]
    row = table.loc["overall"]
    out = {
        "image_auroc": float(row["image_auroc"]),
        "sens_at_95_spec": float(sensitivity_at_specificity(labels, scores, 0.95)),
        "normals_flagged": float(np.mean(scores[labels == 0] > threshold)),
    }
    for key in ("pixel_auroc", "aupro"):
        if key in row and masks is not None:
            out[key] = float(row[key])
    return out


def fusion_variants(views: dict, val_views: dict) -> dict[str, np.ndarray]:
    """Ways to fuse the feature model's views, scored against the held-out normals.

    z-scores use the held-out normals' median and MAD (as the product does); p-values
    are the conformal ones, (1 + #normals at or above) / (n + 1).
    """
    names = ("local", "elbo", "global", "image", "knn")
    z, p = {}, {}
    for name in names:
        ref = np.sort(val_views[name])
        center, scale = robust_z_constants(ref[:, None])  # the product's own constants
        z[name] = (views[name] - center[0]) / scale[0]
        above = len(ref) - np.searchsorted(ref, views[name], side="left")
        p[name] = (1 + above) / (len(ref) + 1)
    fused = ("knn", "global", "image")
    before = ("local", "global", "image")  # the fused views before the memory bank

    def rule(kind: str, views_: tuple[str, ...]) -> np.ndarray:
        stack = [z[n] for n in views_]
        return np.mean(stack, axis=0) if kind == "mean" else np.max(stack, axis=0)

    out = {
        "mean-z(knn, global, image)": rule("mean", fused),
        "max-z(knn, global, image)": rule("max", fused),
        "mean-z(knn, local, global, image)": rule("mean", ("knn", *before)),
        "mean-z(knn, global)": rule("mean", ("knn", "global")),
        "max-z(local, elbo, global, image)": rule("max", ("local", "elbo", "global", "image")),
        "max-z(local, global, image)": rule("max", before),
        "mean-z(local, global, image)": rule("mean", before),
        "max-z(local, global)": rule("max", ("local", "global")),
        "mean-z(local, global)": rule("mean", ("local", "global")),
        "fisher-p(knn, global, image)": -2 * np.sum([np.log(p[n]) for n in fused], axis=0),
        "min-p(knn, global, image)": -np.min([p[n] for n in fused], axis=0),
    }
    return out


#: The probe ``pca128``: the image view's PCA at twice its resolution (<= 128 px).
PROBE_PCA_SIDE, PROBE_PCA_COMPONENTS = 128, 50


def view_dump(detector, train_paths, val_paths, test, model_views: bool = True) -> dict:
    """The default model's candidate views of the held-out normals, of the same normals
    with a synthetic defect pasted in, and of the test images (with labels), plus two
    probes: ``pca128`` (squared residual of a PCA of the training normals pooled to at
    most 128 px), ``pca128_topk`` (the same residual as a map, smoothed at 2 px, top-k
    mean), ``grey`` (|z| of the mean grey level against the training normals) and, for a
    feature model with a bank, ``extent`` (the bank distances along a line, lines.py).
    pipelines/suite/loso.py chooses fusion rules from these, leave-one-set-out.
    ``model_views=False`` computes the probes only (``--probes-only``). For a feature
    model, ``adaptation`` holds the label-free signal of the image-share fusion: the share
    of the held-out normals' pixel variance off the model's normal subspace.
    """
    import torch
    import torch.nn.functional as F
    from sklearn.decomposition import PCA

    from anomalyvae.imaging.synthetic_defects import paste_defects

    spec = detector.preprocessing_
    pool = max(1, int(np.ceil(max(spec.height, spec.width) / PROBE_PCA_SIDE)))

    def pooled(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images))
        return (F.avg_pool2d(x, pool) if pool > 1 else x).flatten(1).double().numpy()

    model = detector.model_
    has_bank = bool(getattr(model.config, "bank_size", 0)) and hasattr(model, "knn_locations")

    def extent_of(images: np.ndarray) -> np.ndarray:
        """(n,) the largest mean of the bank distances along a line of
        ``PROBE_LINE_SHARE`` of the location map (the model's border left out) of
        model-ready images; feature models with a bank only."""
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(images))
            distances = model.knn_locations(model.standardize(model.raw_features(x))).numpy()
        distances = interior(distances, model.config.knn_border)
        length = share_length(PROBE_LINE_SHARE, max(distances.shape[-2:]))
        return extent_view(distances, line_kernels(length))

    def pooled_files(paths, extents: list | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Pooled images and mean grey levels of ``paths``; each chunk's ``extent_of``
        appended to ``extents`` when given (the files are read once)."""
        parts, greys = [], []
        for start in range(0, len(paths), 32):
            images = detector.preprocess(paths[start : start + 32])
            parts.append(pooled(images))
            greys.append(images.reshape(len(images), -1).mean(1))
            if extents is not None:
                extents.append(extent_of(images))
        return np.concatenate(parts), np.concatenate(greys)

    train_pooled, train_grey = pooled_files(train_paths)
    pca = PCA(min(PROBE_PCA_COMPONENTS, len(train_pooled) - 1), random_state=0)
    pca.fit(train_pooled)
    grey_mean, grey_std = float(train_grey.mean()), float(train_grey.std()) + 1e-12

    from anomalyvae.models.maps import ScoringConfig, gaussian_blur, topk_count

    height, width = spec.height // pool, spec.width // pool  # avg_pool2d floors

    def probes_of(flat: np.ndarray, grey: np.ndarray) -> dict[str, np.ndarray]:
        residual = flat - pca.inverse_transform(pca.transform(flat))
        squared = (residual**2).reshape(len(flat), spec.channels, height, width).mean(1)
        smoothed = gaussian_blur(torch.from_numpy(squared[:, None].astype(np.float32)), 2.0)
        values = np.sort(smoothed.flatten(1).numpy(), axis=1)
        k = topk_count(ScoringConfig(), values.shape[1])
        return {
            "pca128": (residual**2).mean(1),
            "pca128_topk": values[:, -k:].mean(1),
            "grey": np.abs(grey - grey_mean) / grey_std,
        }

    def extent_probe(parts: list[np.ndarray]) -> dict[str, np.ndarray]:
        """``extent`` of the chunks' :func:`extent_of` values (nothing without a bank)."""
        return {"extent": np.concatenate(parts)} if has_bank and parts else {}

    def extents_in(images: np.ndarray) -> list[np.ndarray]:
        if not has_bank:
            return []
        return [extent_of(images[start : start + 32]) for start in range(0, len(images), 32)]

    val_images = detector.preprocess(val_paths)
    synthetic = paste_defects(val_images, seed=0).images

    def views_of(images) -> dict:
        return detector.view_scores(images) if model_views else {}

    groups = {}
    for group, views, flat, grey in (
        (
            "val",
            views_of(val_images),
            pooled(val_images),
            val_images.reshape(len(val_images), -1).mean(1),
        ),
        (
            "synthetic",
            views_of(synthetic),
            pooled(synthetic),
            synthetic.reshape(len(synthetic), -1).mean(1),
        ),
    ):
        groups[group] = {**views, **probes_of(flat, grey)}
    groups["val"].update(extent_probe(extents_in(val_images)))
    groups["synthetic"].update(extent_probe(extents_in(synthetic)))
    test_paths = [s.path for s in test]
    test_extents: list[np.ndarray] | None = [] if has_bank else None
    test_flat, test_grey = pooled_files(test_paths, test_extents)
    scores = getattr(detector, "calibration_scores_", None)
    if model_views and scores is not None:  # what the product's threshold was read from
        groups["calibration"] = {"fused": np.asarray(scores)}
    family = detector.family()
    if hasattr(family, "unexplained_share"):  # the image-share fusion's signal
        share = family.unexplained_share(detector, val_images)
        groups["adaptation"] = {"image_unexplained": np.array([share])}
    groups["test"] = {
        **views_of(test_paths),
        **probes_of(test_flat, test_grey),
        **extent_probe(test_extents or []),
        "label": np.array([s.label for s in test], dtype=float),
    }
    return {
        g: {k: np.asarray(v, dtype=float).tolist() for k, v in d.items()} for g, d in groups.items()
    }


#: Probes: scores the product does not offer, measured on the same trained model and
#: split so that the experiment log shows what they would give on every set.
PROBE_BANK = 20_000


def _z(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    center, scale = robust_z_constants(np.asarray(reference)[:, None])
    return (np.asarray(values) - center[0]) / scale[0]


def map_variants(detector, val_paths: list[Path], test) -> dict[str, list[float]]:
    """Pixel AUROC and AUPRO of the feature model's candidate anomaly maps.

    On the feature grid: the VAE's negative ELBO, the memory bank's distance, and the
    mean and the largest of their robust z-scores against the held-out normals'
    locations (per edge ring, as the model's ``map_border``); each upsampled and
    smoothed as the product's map, at model resolution (masks >= 128), over test images
    that have a mask or are normal. Empty for the pixel model, for a model without a
    bank, or a set without pixel masks.
    """
    import torch
    import torch.nn.functional as F

    from anomalyvae.metrics import aupro, pixel_auroc
    from anomalyvae.models.feature_vae import location_maps, ring_constants, ring_z
    from anomalyvae.models.maps import gaussian_blur

    model = detector.model_
    # the bank's map against the ELBO's: families with a memory-bank view only
    if "knn" not in detector.family().view_names or not model.config.bank_size:
        return {}
    if not any(s.mask_path is not None for s in test):
        return {}
    has_mask = np.array([s.label == 0 or s.mask_path is not None for s in test])
    masks = masks_for(test, detector, 0.5)[has_mask]
    sigma = detector.scoring_.smoothing_sigma

    def maps_of(paths) -> tuple[np.ndarray, np.ndarray]:
        return location_maps(model, detector.preprocess(paths), 16, torch.device("cpu"))

    def upsampled(maps: np.ndarray) -> np.ndarray:
        size = (detector.preprocessing_.height, detector.preprocessing_.width)
        t = torch.from_numpy(maps)[:, None].float()
        t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
        return gaussian_blur(t, sigma)[:, 0].numpy()

    test_elbo, test_knn = maps_of([s.path for s, m in zip(test, has_mask, strict=True) if m])
    val_elbo, val_knn = maps_of(val_paths)
    # z constants per edge ring of the model's map_border, as the product's map
    border = getattr(model.config, "map_border", 0)
    center, scale = (torch.from_numpy(c) for c in ring_constants(val_elbo, val_knn, border))
    stacked = torch.from_numpy(np.stack([test_elbo, test_knn], axis=1)).double()
    z_elbo, z_knn = ring_z(stacked, center, scale).numpy().transpose(1, 0, 2, 3)
    candidates = {
        "map/elbo": test_elbo,
        "map/knn": test_knn,
        "map/mean-z(elbo, knn)": (z_elbo + z_knn) / 2,
        "map/max-z(elbo, knn)": np.maximum(z_elbo, z_knn),
    }
    out = {}
    for name, maps in candidates.items():
        full = upsampled(maps.astype(np.float32))
        out[name] = [float(pixel_auroc(masks, full)), float(aupro(masks, full))]
    return out


def probes(detector, train_paths, val_paths, test, views, val_views) -> dict[str, float]:
    """Image AUROC of probe scores on a feature model: nearest-neighbour memory banks.

    knn-latent / knn-feature: distance of each location to the nearest of 20,000 normal
    locations (VAE latent means / standardized backbone features), top-1 % mean, alone
    and fused (max z) with the global and image views.
    """
    import torch

    from anomalyvae.imaging.batch import read_images

    labels = np.array([s.label for s in test])
    spec = detector.preprocessing_
    model = detector.model_.eval()
    rng = np.random.default_rng(0)
    per_image = max(1, int(np.ceil(PROBE_BANK / max(1, len(train_paths)))))

    def passes(paths, sample: bool):
        feats, latents, bank_f, bank_l = [], [], [], []
        for start in range(0, len(paths), 16):
            images, _, _ = read_images(paths[start : start + 16], spec, on_error="ignore")
            with torch.no_grad():
                f = model.standardize(model.raw_features(torch.from_numpy(images)))
                mu = model.vae(f).mu
            f = f.permute(0, 2, 3, 1).reshape(len(images), -1, f.shape[1]).numpy()
            mu = mu.permute(0, 2, 3, 1).reshape(len(images), -1, mu.shape[1]).numpy()
            if sample:
                for k in range(len(images)):
                    pick = rng.choice(f.shape[1], min(per_image, f.shape[1]), replace=False)
                    bank_f.append(f[k, pick])
                    bank_l.append(mu[k, pick])
            else:
                feats.append(f)
                latents.append(mu)
        if sample:
            return np.concatenate(bank_f), np.concatenate(bank_l)
        return np.concatenate(feats), np.concatenate(latents)

    bank_f, bank_l = passes(train_paths, sample=True)
    val_f, val_l = passes(val_paths, sample=False)
    test_f, test_l = passes([s.path for s in test], sample=False)

    def knn(queries: np.ndarray, bank: np.ndarray) -> np.ndarray:
        bank_t = torch.from_numpy(bank[:PROBE_BANK])
        norms = (bank_t**2).sum(1)
        out = []
        for image in queries:
            q = torch.from_numpy(image)
            d2 = (q**2).sum(1, keepdim=True) - 2 * q @ bank_t.T + norms
            dist = d2.min(1).values.clamp(min=0).sqrt()
            k = max(1, int(0.01 * len(dist)))
            out.append(float(dist.topk(k).values.mean()))
        return np.array(out)

    z = {name: _z(views[name], val_views[name]) for name in ("local", "global", "image")}
    z["knn-latent"] = _z(knn(test_l, bank_l), knn(val_l, bank_l))
    z["knn-feature"] = _z(knn(test_f, bank_f), knn(val_f, bank_f))
    scores = {
        "knn-latent": z["knn-latent"],
        "max-z(knn-latent, global, image)": np.max([z["knn-latent"], z["global"], z["image"]], 0),
        "knn-feature": z["knn-feature"],
        "max-z(knn-feature, global, image)": np.max([z["knn-feature"], z["global"], z["image"]], 0),
    }
    return {f"probe/{k}": float(roc_auc_score(labels, v)) for k, v in scores.items()}


def alternatives(
    detector: VAEAnomalyDetector,
    test,
    val_paths: list[Path],
    train_paths: list[Path],
    dump: dict,
    lean: bool = False,
) -> tuple[dict[str, float], dict[str, float]]:
    """Image AUROC of the product's other candidate scores on the same trained model,
    and of the probes (scores the product does not offer; feature model only, not with
    ``lean``). The feature model's views come from the leave-one-set-out ``dump``."""
    labels = np.array([s.label for s in test])
    paths = [s.path for s in test]
    if not detector.family().per_pixel_stats:  # a map of its own: the dumped views
        names = (*detector.family().view_names, "fused")
        views = {n: np.asarray(dump["test"][n]) for n in names}
        val_views = {n: np.asarray(dump["val"][n]) for n in names}
        out = {f"feature/{name}": float(roc_auc_score(labels, v)) for name, v in views.items()}
        fused = fusion_variants(views, val_views)
        out.update({f"fusion/{k}": float(roc_auc_score(labels, v)) for k, v in fused.items()})
        if lean:
            return out, {}
        return out, probes(detector, train_paths, val_paths, test, views, val_views)
    import dataclasses

    out = {}
    original = detector.scoring_
    kinds = ["max", "topk_mean", "elbo"]
    stats = getattr(detector, "map_stats_", None)
    if stats is not None and stats.view_center is not None:  # models since the pixel fusion
        kinds += ["global", "fused"]
    for score_kind in kinds:
        detector.scoring_ = dataclasses.replace(original, score_kind=score_kind)
        out[f"pixel/{score_kind}"] = float(roc_auc_score(labels, detector.anomaly_score(paths)))
    detector.scoring_ = original
    return out, {}


def run_set(
    name: str,
    source: Path,
    work: Path,
    budget: float,
    smoke: bool,
    extra: tuple[str, ...] = (),
    lean: bool = False,
) -> dict:
    print(f"[{name}] training the defaults (budget {budget:g} s)", flush=True)
    model = work / name / "model.pt"
    model.parent.mkdir(parents=True, exist_ok=True)
    train_args = ["train", str(source), "-o", str(model), "--time-budget", str(budget), "--silent"]
    train_args += list(extra)  # a variant's options (--variant); none for the defaults
    if smoke:
        train_args += ["--epochs", "1"]
    train_seconds = cli(*train_args)
    cli("evaluate", str(model), str(source), "-o", str(work / name / "eval"), "--silent")
    evaluation = json.loads((work / name / "eval" / "metrics.json").read_text())
    overall = evaluation["metrics"]["overall"]
    detector = VAEAnomalyDetector.load(model, progress=False)
    test = discover(source, "test")
    labels = np.array([s.label for s in test])
    scores = np.array(
        [
            r["score"]
            for r in _read_scores(work / name / "eval" / "scores.csv", [str(s.path) for s in test])
        ]
    )
    defaults = {
        "image_auroc": overall["image_auroc"],
        "sens_at_95_spec": float(sensitivity_at_specificity(labels, scores, 0.95)),
        "normals_flagged": float(np.mean(scores[labels == 0] > detector.threshold_)),
        "train_seconds": round(train_seconds, 1),
        "model_family": detector.family_,
        "input_size": [detector.preprocessing_.height, detector.preprocessing_.width],
        "score_kind": detector.scoring_.score_kind,
        "n_calibration_normals": detector.calibration_.n_normal,
    }
    for key in ("pixel_auroc", "aupro"):
        if overall.get(key) is not None and np.isfinite(overall[key]):
            defaults[key] = overall[key]
    print(f"[{name}] PCA floor", flush=True)
    train = [s.path for s in discover(source, "train") if s.label == 0]
    floor = pca_floor(source, train, detector, test)
    val_index, train_index = detector.split_indices(len(train))  # training's own split
    print(f"[{name}] views for leave-one-set-out", flush=True)
    dump = view_dump(detector, [train[i] for i in train_index], [train[i] for i in val_index], test)
    (work / name / "views.json").write_text(json.dumps(dump))
    alt, probed = alternatives(
        detector,
        test,
        [train[i] for i in val_index],
        [train[i] for i in train_index],
        dump,
        lean,
    )
    best_name = max(alt, key=alt.get)
    maps = {} if lean else map_variants(detector, [train[i] for i in val_index], test)
    grey_auroc = float(roc_auc_score(labels, dump["test"]["grey"]))
    return {
        "grey_floor": {"image_auroc": grey_auroc},
        "views_file": str(work / name / "views.json"),
        "source": shown(source),
        "n_train_normals": len(train),
        "n_test": len(test),
        "n_test_anomalous": int(labels.sum()),
        "defaults": defaults,
        "pca_floor": floor,
        "alternatives": alt,
        "probes": probed,
        "map_variants": maps,
        "best_alternative": {"name": best_name, "image_auroc": alt[best_name]},
        # the floor is the better of the two label-free baselines
        "margin_over_floor": defaults["image_auroc"] - max(floor["image_auroc"], grey_auroc),
        "meets_rule": bool(
            defaults["image_auroc"] >= max(floor["image_auroc"], grey_auroc) + MARGIN
        ),
    }


def _read_scores(path: Path, order: list[str]) -> list[dict]:
    import pandas as pd

    frame = pd.read_csv(path).set_index("path")
    return [{"score": float(frame.loc[p, "score"])} for p in order]


def run_time(results: dict, seconds: float) -> str:
    """How long a run of every set takes, as far as the runs behind the table say."""
    per_set = [r.get("seconds") for r in results["sets"].values()]
    if all(per_set):
        return f"{sum(per_set) / 60:.0f} min for all sets, each timed in its last run, on "
    # the sets this run trained: recorded, or (older results) those with the run's code
    run = results.get("sets_run") or [
        n for n, r in results["sets"].items() if r.get("code") == results.get("code")
    ]
    if seconds and run and len(run) < len(results["sets"]):
        return f"this run, of {', '.join(run)} only: {seconds / 60:.0f} min, on "
    return f"{seconds / 60:.0f} min on " if seconds else "on "


def budget_line() -> str:
    """What the budget report measured for evaluate of the large photos, as a phrase."""
    path = ROOT / "reports" / "budget" / "results.json"
    if not path.is_file():
        return "reports/budget has not been run"
    budget = json.loads(path.read_text())
    seconds, limit = budget["evaluate"]["seconds"], budget["limits_s"]["evaluate"]
    data = budget["data"]
    return (
        f"evaluate of {data['n_test']} images of {data['width']} x {data['height']} took "
        f"{seconds:.0f} s against its {limit:.0f} (reports/budget, {budget['date']})"
    )


def data_notes(
    names: list[str], data_root: Path, sets: dict[str, Path] | None = None
) -> dict[str, str]:
    """What ``anomalyvae train`` warns of the training files of the sets ``names`` (its
    own data checks), found in ``sets`` or under ``data_root``: a partial rerun keeps the
    notes of the sets it did not train."""
    found = discover_sets(data_root) if data_root.is_dir() else {}
    found.update(sets or {})
    notes = {}
    for name, source in ((n, found[n]) for n in names if n in found):
        train = [s.path for s in discover(source, "train") if s.label == 0]
        probe = probe_sources(train) if train else None
        note = few_levels_note(probe) if probe else None
        if note:  # the file it names, as the reports show paths
            notes[name] = note.replace(probe.example_file, shown(Path(probe.example_file)))
    return notes


def write_report(
    results: dict,
    out: Path,
    budget: float,
    seconds: float,
    smoke: bool,
    notes: dict[str, str] | None = None,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    sets = results["sets"]
    names = list(sets)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(names), 3.6))
    x = np.arange(len(names))
    ax.bar(x - 0.2, [sets[n]["defaults"]["image_auroc"] for n in names], 0.4, label="defaults")
    ax.bar(x + 0.2, [sets[n]["pca_floor"]["image_auroc"] for n in names], 0.4, label="PCA-50")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("image AUROC")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "auroc.png", dpi=120)
    plt.close(fig)

    def cell(d: dict, key: str) -> str:
        value = d.get(key)
        return "–" if value is None else f"{value:.3f}"

    lines = [
        "# Benchmark suite: the defaults on every real data set",
        "",
        "Regenerate: `python pipelines/suite/run.py` ("
        + run_time(results, seconds)
        + f"{results['machine']}). Code each set ran with: "
        + ", ".join(f"{n} {r.get('code', results.get('code', '?'))}" for n, r in sets.items())
        + ".",
        f"Defaults: `anomalyvae train SOURCE -o model.pt --time-budget {budget:g}` then "
        "`anomalyvae evaluate`, the same command on every set. Floor: PCA with "
        f"{PCA_COMPONENTS} components at {PCA_SIZE}x{PCA_SIZE}, or the |z| of the mean grey "
        "level against the training normals, whichever is better. Rule: defaults >= floor + "
        f"{MARGIN:.2f} image AUROC on every set.",
        "",
        "| set | model | image AUROC | pixel AUROC | AUPRO | sens @ 95 % spec "
        "| normals over threshold | train s | PCA-50 image / pixel / AUPRO | mean grey |z| "
        "| margin | rule | best alternative |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        r = sets[name]
        d, f = r["defaults"], r["pca_floor"]
        lines.append(
            f"| {name} | {d['model_family']} {d['input_size'][0]}x{d['input_size'][1]}, "
            f"{d['score_kind']} | {cell(d, 'image_auroc')} | {cell(d, 'pixel_auroc')} | "
            f"{cell(d, 'aupro')} | {cell(d, 'sens_at_95_spec')} | "
            f"{d['normals_flagged']:.1%} of test normals ({d['n_calibration_normals']} "
            f"calibration normals) | {d['train_seconds']:.0f} | {cell(f, 'image_auroc')} / "
            f"{cell(f, 'pixel_auroc')} / {cell(f, 'aupro')} | "
            f"{cell(r.get('grey_floor', {}), 'image_auroc')} | {r['margin_over_floor']:+.3f} | "
            f"{'met' if r['meets_rule'] else '**not met**'} | "
            f"{r['best_alternative']['name']} {r['best_alternative']['image_auroc']:.3f} |"
        )
    if notes:
        lines += ["", "What `anomalyvae train` warns of the sets' training files:", ""]
        lines += [f"- {name}: {note}." for name, note in notes.items()]
    lines += [
        "",
        "![image AUROC per set](auroc.png)",
        "",
        "Every candidate score of the trained default model (image AUROC):",
        "",
    ]
    for name in names:
        alt = ", ".join(f"{k} {v:.3f}" for k, v in sets[name]["alternatives"].items())
        lines.append(f"- {name}: {alt}")
    lines += [
        "",
        "The best alternative is chosen per set with the test labels: an upper bound no "
        "label-free rule can promise, shown so that the gap to the defaults is visible.",
        "",
        "Leave-one-set-out (each fusion rule chosen on the other sets, scored on the one "
        "left out; the operating point at the product's own threshold on every set): "
        "[loso.md](loso.md).",
        "",
        "The experiment log (every variant tried, kept or dropped): "
        "[experiments.md](experiments.md). The drift alarm on each set's normal test "
        "images (`python pipelines/suite/drift.py`): [drift.md](drift.md). How the maps "
        "become views (knn share, neighbourhood and extent, global covariance, image "
        "components and reduction), chosen leave-one-set-out on these models "
        "(`python pipelines/suite/reductions.py`): [reductions.md](reductions.md); the "
        "local excess read over a defect's extent (squares or lines of bank distances) "
        "(`python pipelines/suite/extent.py`): [extent.md](extent.md); the "
        "memory bank's size against its cost (`python pipelines/suite/bank.py`): "
        "[bank.md](bank.md); the anomaly map's edge rings, chosen leave-one-set-out on "
        "pixel AUROC and AUPRO (`python pipelines/suite/edges.py`): [edges.md](edges.md). "
        "Variants retrained with other options (`--variant`), "
        "chosen leave-one-set-out against these defaults "
        "(`python pipelines/suite/retrained.py`): [retrained.md](retrained.md).",
    ]
    if smoke:
        lines.insert(2, "**Smoke run on tiny synthetic sets: these numbers mean nothing.**\n")
    (out / "README.md").write_text("\n".join(lines) + "\n")
    write_experiments(results, out)


def git_commit() -> str:
    completed = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "anomalyvae"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    return completed.stdout.strip() + ("+changes" if dirty else "")


def write_experiments(results: dict, out: Path) -> None:
    """experiments.md: every variant on every set (this run) and every run's defaults.

    Each non-smoke run appends its defaults to history.jsonl, so variants of the
    defaults tried in earlier runs (kept or dropped) stay in the log with their numbers.
    """
    sets = results["sets"]
    names = list(sets)
    variants = sorted(
        {k for r in sets.values() for k in {**r["alternatives"], **r.get("probes", {})}}
    )
    lines = [
        "# Experiment log: every variant, every set",
        "",
        "Written by `python pipelines/suite/run.py`; nothing here is typed in.",
        "",
        "## Candidate scores of the default models (this run), image AUROC",
        "",
        "Each row is a way to turn the trained default model into an image score; the "
        "product uses `feature/fused` (the image-share weighting of knn, global and image, "
        "see Decisions; before it `fusion/mean-z(knn, global, image)`, and before the "
        "memory bank `fusion/max-z(local, global, image)`) on every "
        "set that the feature model serves. Rows are kept or dropped as a whole, never "
        "per set. `probe/` rows are scores the product does not offer (see `probes` in "
        "run.py: nearest-neighbour memory banks), measured on the same model and split.",
        "",
        "| variant | " + " | ".join(names) + " | mean |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for variant in variants:
        values = [
            {**sets[n]["alternatives"], **sets[n].get("probes", {})}.get(variant) for n in names
        ]
        known = [v for v in values if v is not None]
        cells = ["–" if v is None else f"{v:.3f}" for v in values]
        mean = f"{np.mean(known):.3f}" if known else "–"
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {mean} |")
    lines += [
        "",
        "PCA-50 floor: "
        + ", ".join(f"{n} {sets[n]['pca_floor']['image_auroc']:.3f}" for n in names)
        + ".",
        "",
        "## The defaults, run by run (history.jsonl)",
        "",
        "| date | code | budget s | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    history = out / "history.jsonl"
    if history.is_file():
        for line in history.read_text().splitlines():
            run = json.loads(line)
            cells = []
            for n in names:
                d = run["sets"].get(n)
                cells.append(
                    "–"
                    if d is None
                    else f"{d['model_family']}/{d['score_kind']} {d['image_auroc']:.3f}"
                )
            lines.append(
                f"| {run['date']} | {run['code']} | {run['time_budget_s']:g} | "
                + " | ".join(cells)
                + " |"
            )
    lines += map_variant_lines(sets)
    lines += variant_lines(out, sets, results.get("machine", "–"))
    feature_sets = [n for n in names if sets[n]["defaults"]["model_family"] == "feature"]
    if feature_sets:
        means = {
            v: float(np.mean([sets[n]["alternatives"][v] for n in feature_sets]))
            for v in variants
            if all(v in sets[n]["alternatives"] for n in feature_sets)
        }
        probed = {
            v: float(np.mean([sets[n]["probes"][v] for n in feature_sets]))
            for v in variants
            if all(v in sets[n].get("probes", {}) for n in feature_sets)
        }
        best = max(means, key=means.get)
        lines += [
            "",
            "## Decisions",
            "",
            f"- Best single rule over the feature-model sets in this run: `{best}` "
            f"(mean image AUROC {means[best]:.3f}; the default `feature/fused` "
            f"{means.get('feature/fused', float('nan')):.3f}).",
            "- `fused` = the image-share weighting (`--fusion image-share`, first in the "
            "run of code a934307): the z-scores of the memory-bank (`knn`), global and "
            f"image views, weighted 1, 1 and {IMAGE_SHARE_SCALE:g} (u / (1 - u))^"
            f"{IMAGE_SHARE_POWER:g} (before the sharper switch of 2026-12-05: "
            "20 u / (1 - u)), u the share "
            "of the held-out normals' pooled pixel variance off the model's normal subspace "
            "(no label; chosen leave-one-set-out in loso.md). Before it, the plain mean of "
            "the same three z-scores (from code b931c70), and before that the largest "
            "z-score of the VAE's local view, global and image. The bank is a greedy "
            "k-center coreset of 8192 training locations; a random sample of 20,000 (the "
            "`probe/knn-feature` rows) ranked images worse on both sets. The plain mean -> "
            "the image-share weighting, same run: "
            + ", ".join(
                f"{n} {alt.get('fusion/mean-z(knn, global, image)', float('nan')):.3f}"
                f" -> {alt.get('feature/fused', float('nan')):.3f}"
                for n, alt in ((n, sets[n]["alternatives"]) for n in feature_sets)
            )
            + ".",
            "- Kept the image view in the fusion even where `mean-z(knn, global)` ranks "
            "these sets higher: on the held-out MRI set of issue 15 a whole-image PCA beat "
            "every feature score by a wide margin, and only the image view sees that. Kept "
            "the VAE's local view out: the bank's distance ranks images better on both sets.",
            "- The anomaly map is the mean z-score of each location's VAE ELBO and bank "
            'distance (the models\' `map_rule` "mean-z"; before it, the ELBO alone): '
            "see the candidate maps above.",
            "- Fusion rules over the feature-model sets in this run, by mean image AUROC: "
            + ", ".join(
                f"`{v}` {means[v]:.3f}"
                for v in sorted(
                    (v for v in means if v.startswith("fusion/")), key=means.get, reverse=True
                )
            )
            + ". The mean adds evidence that several views see; the max lets one strong "
            "view flag an image. The mean ranks higher here; a defect that only one view "
            "sees is diluted by it, which the held-out sets will judge. The mean-ELBO view "
            "stays out of the fusion (the weakest view on both feature sets since it was "
            "first measured).",
            "- Kept per-image intensity normalization in the feature model, and the pixel "
            "model for small inputs (`auto`: feature from 96 px up).",
            "- The feature model's backbone is `--backbone auto`: EfficientNet-Lite2 (since "
            "code f712404 up to 512 x 512 pixels, Lite0 above; at every size since the "
            "memory bank shrinks above 512 x 512 pixels, `--bank-size auto`). "
            "Lite2 was the leave-one-set-out choice over Lite0 in every fold of "
            "retrained.md (the `lite2` rows against the Lite0 defaults of that run; "
            "`lite0-rerun` above is Lite0 retrained at a later code). Its features cost "
            "about 1.4x Lite0's; above 512 x 512 pixels the smaller bank, searched in "
            "its 64 principal directions (`--bank-dim auto`, reports/suite/bank.md), "
            "pays for that: " + budget_line() + ".",
        ]
        if probed:
            top = max(probed, key=probed.get)
            default = means.get("feature/fused", float("nan"))
            verdict = (
                "beats the default's mean: a candidate for the product, not adopted in this run"
                if probed[top] > default
                else "does not beat the default's mean: none adopted"
            )
            lines.append(
                f"- Best probe over the feature-model sets in this run: `{top}` (mean image "
                f"AUROC {probed[top]:.3f} against {default:.3f}); it {verdict}."
            )
    lines += pixel_decision_lines(sets)
    (out / "experiments.md").write_text("\n".join(lines) + "\n")


def pixel_decision_lines(sets: dict) -> list[str]:
    """experiments.md's decision on the pixel model's image score, from this run's sets."""
    pixel = [
        n
        for n in sets
        if sets[n]["defaults"]["model_family"] == "pixel"
        and "pixel/fused" in sets[n].get("alternatives", {})
    ]
    if not pixel:
        return []
    return [
        "",
        "## Decisions: the pixel model (inputs under 96 px)",
        "",
        "- Image score `fused` for thumbnails (inputs of at most 32 px with z-SSIM maps): "
        "the mean z-score of the map's top-k mean and whole-map mean against the held-out "
        "normals, since code fc62b27; before it, and above 32 px, `topk_mean`. Same model, "
        "top-k mean -> global -> fused: "
        + ", ".join(
            f"{n} {alt['pixel/topk_mean']:.3f} -> {alt['pixel/global']:.3f} -> "
            f"{alt['pixel/fused']:.3f}"
            for n, alt in ((n, sets[n]["alternatives"]) for n in pixel)
        )
        + ". Chosen on PneumoniaMNIST's labelled val split, not on test (the views per SSIM "
        "window on val and test: reports/pneumonia). The global view alone ranks the "
        "diffuse pneumonia findings as well or better, but a small local defect in a "
        "thumbnail raises only the top-k view: the fusion keeps both. On larger inputs the "
        "whole-map mean dilutes local defects (MTD, pixel model at 128 px: "
        "reports/mtd/experiments.md), so they keep `topk_mean`.",
        "- SSIM window 2 px (the smoothing's scale) instead of Wang et al.'s 1.5 px, from "
        "the same val-split sweep (reports/pneumonia).",
    ]


def map_variant_lines(sets: dict) -> list[str]:
    """experiments.md rows of the feature models' candidate anomaly maps (this run)."""
    names = [n for n in sets if sets[n].get("map_variants")]
    if not names:
        return []
    variants = sorted({v for n in names for v in sets[n]["map_variants"]})
    lines = [
        "",
        "## Candidate anomaly maps of the default models (this run), pixel AUROC / AUPRO",
        "",
        "At model resolution over the test images with a mask or no defect (`map_variants` "
        'in run.py); the product\'s map is `map/mean-z(elbo, knn)` (before `map_rule` "mean-z", '
        "`map/elbo`).",
        "",
        "| map | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for v in variants:
        cells = []
        for n in names:
            value = sets[n]["map_variants"].get(v)
            cells.append("–" if value is None else f"{value[0]:.3f} / {value[1]:.3f}")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return lines


def variant_lines(out: Path, sets: dict, defaults_machine: str) -> list[str]:
    """experiments.md rows of variants.jsonl: models trained with other CLI options."""
    path = out / "variants.jsonl"
    if not path.is_file():
        return []
    lines = [
        "",
        "## Variants trained with other options (variants.jsonl)",
        "",
        "Each row: `python pipelines/suite/run.py --variant NAME --train-args '...' --sets ...`, "
        "the same training and evaluation as the defaults with the options added. Best view: "
        "the best of the variant model's candidate scores (chosen with the test labels). "
        "CPU: the machine it trained on (the defaults: "
        f"{defaults_machine.split(',')[0]}); a variant from another CPU "
        "differs from the defaults by the machine too (its time budget buys other epochs): "
        "rerun the defaults' options as a variant there before comparing.",
        "",
        "| date | code | CPU | variant | options | set | image AUROC | best view | defaults now |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for line in path.read_text().splitlines():
        run = json.loads(line)
        for n, r in run["sets"].items():
            best = max(r["alternatives"], key=r["alternatives"].get)
            now = sets.get(n, {}).get("defaults", {}).get("image_auroc")
            lines.append(
                f"| {run['date']} | {run['code']} | {run.get('machine', '–').split(',')[0]} | "
                f"{run['variant']} | "
                f"`{' '.join(run['train_args'])}` | {n} | "
                f"{r['defaults']['model_family']}/{r['defaults']['score_kind']} "
                f"{r['defaults']['image_auroc']:.3f} | {best} {r['alternatives'][best]:.3f} | "
                + ("–" if now is None else f"{now:.3f}")
                + " |"
            )
    return lines


def run_variant(
    args, sets: dict[str, Path], work: Path, out: Path, budget: float, smoke: bool
) -> None:
    """Train and evaluate a variant (the defaults plus ``--train-args``) on ``sets``.

    Appends one line to variants.jsonl and rewrites experiments.md; the defaults' own
    results (README.md, results.json) are left as they are.
    """
    extra = tuple(shlex.split(args.train_args))
    entry = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "code": git_commit(),
        "machine": machine(),
        "variant": args.variant,
        "train_args": list(extra),
        "time_budget_s": budget,
        "sets": {},
    }
    for name, source in sets.items():
        result = run_set(name, source, work / args.variant, budget, smoke, extra, args.lean)
        entry["sets"][name] = {
            "defaults": result["defaults"],
            "alternatives": result["alternatives"],
            "pca_floor": result["pca_floor"],
        }
        print(json.dumps({name: result["defaults"]}, default=float), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "variants.jsonl").open("a") as handle:
        handle.write(json.dumps(entry, default=float) + "\n")
    if (out / "results.json").is_file():
        write_experiments(json.loads((out / "results.json").read_text()), out)


def append_history(results: dict, out: Path, ran: list[str]) -> None:
    """One line per run: the defaults' numbers of the sets this run trained (``ran``)."""
    entry = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "code": results.get("code", git_commit()),
        "time_budget_s": results["time_budget_s"],
        "sets": {
            n: {
                k: r["defaults"][k]
                for k in ("image_auroc", "pixel_auroc", "aupro", "model_family", "score_kind")
                if k in r["defaults"]
            }
            for n, r in results["sets"].items()
            if n in ran
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    with (out / "history.jsonl").open("a") as handle:
        handle.write(json.dumps(entry, default=float) + "\n")


def smoke_sets(root: Path) -> dict[str, Path]:
    """Two tiny synthetic sets: one for each model family."""
    sets = {}
    for size in (32, 96):
        folder = root / f"synthetic{size}"
        make_synthetic_dataset(folder, n_train=24, n_test_good=6, n_test_defect=6, size=size)
        sets[folder.name] = folder
    return sets


def refresh_probes(args: argparse.Namespace) -> int:
    """Recompute the probes of each set's trained model (``--work``) into views/*.json."""
    out = args.out or DEFAULT_OUT
    sets = discover_sets(args.data_root)
    for name, source in sets.items():
        if args.sets and name not in args.sets:
            continue
        model, dump_path = args.work / name / "model.pt", out / "views" / f"{name}.json"
        if not model.is_file() or not dump_path.is_file():
            continue
        detector = VAEAnomalyDetector.load(model, progress=False)
        train = [s.path for s in discover(source, "train") if s.label == 0]
        val_index, train_index = detector.split_indices(len(train))
        probes = view_dump(
            detector,
            [train[i] for i in train_index],
            [train[i] for i in val_index],
            discover(source, "test"),
            model_views=False,
        )
        dump = json.loads(dump_path.read_text())
        for group, values in probes.items():
            dump.setdefault(group, {}).update(values)
        dump_path.write_text(json.dumps(dump))
        print(f"[{name}] probes refreshed", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--time-budget", type=float, default=900.0)
    parser.add_argument("--sets", nargs="*", default=None, help="only these sets")
    parser.add_argument("--smoke", action="store_true", help="tiny synthetic sets, one round")
    parser.add_argument(
        "--work", type=Path, default=None, help="keep the trained models here [default: temp]"
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite README.md and experiments.md from the existing results.json",
    )
    parser.add_argument(
        "--variant", default=None, help="log a variant under this name (variants.jsonl)"
    )
    parser.add_argument(
        "--train-args", default="", help="a variant's extra `anomalyvae train` options"
    )
    parser.add_argument(
        "--lean",
        action="store_true",
        help="skip the slow probes and candidate-map tables (the experiment log's extras)",
    )
    parser.add_argument(
        "--probes-only",
        action="store_true",
        help="recompute the probe views of the models under --work into views/*.json",
    )
    args = parser.parse_args(argv)
    if args.probes_only:
        return refresh_probes(args)
    if args.variant and not args.sets:
        parser.error("--variant needs --sets (the sets the variant is tried on)")
    if args.report_only:
        out = args.out or DEFAULT_OUT
        results = json.loads((out / "results.json").read_text())
        notes = data_notes(list(results["sets"]), args.data_root)
        seconds = results.get("seconds", 0.0)
        write_report(results, out, results["time_budget_s"], seconds, False, notes)
        import loso

        if len(loso.load_dumps(out)) >= 2:
            loso.main(["--out", str(out)])
        return 0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="anomalyvae-suite-") as tmp:
        work = Path(tmp)
        if args.smoke:
            sets = smoke_sets(work / "data")
            budget = 30.0
            out = args.out or work / "report"
        else:
            if not args.data_root.is_dir():
                parser.error(f"data root '{args.data_root}' does not exist; pass --data-root")
            sets = discover_sets(args.data_root)
            budget = args.time_budget
            out = args.out or DEFAULT_OUT
        if args.sets:
            sets = {k: v for k, v in sets.items() if k in args.sets}
        if not sets:
            parser.error("no data sets found (a split.json or an MVTec train/good folder)")
        if args.variant:
            run_variant(args, sets, args.work or work / "runs", out, budget, args.smoke)
            return 0
        previous = {}
        if args.sets and (out / "results.json").is_file():  # update some sets, keep the rest
            before = json.loads((out / "results.json").read_text())
            previous = {
                n: {"code": before.get("code", "?"), **r} for n, r in before.get("sets", {}).items()
            }
        # the commit the run starts from (the sets train in fresh processes, so a change
        # made during the run would reach the later sets: "+changes" says so)
        results = {
            "machine": machine(),
            "time_budget_s": budget,
            "code": git_commit(),
            "sets": dict(previous),
        }
        for name, source in sets.items():
            runs = args.work or work / "runs"
            set_started = time.monotonic()
            # each set keeps the code it ran with: `--sets` reruns mix runs in one table
            results["sets"][name] = {
                **run_set(name, source, runs, budget, args.smoke, lean=args.lean),
                "code": results["code"],
            }
            results["sets"][name]["seconds"] = round(time.monotonic() - set_started, 1)
            views = Path(results["sets"][name].pop("views_file"))
            (out / "views").mkdir(parents=True, exist_ok=True)
            (out / "views" / f"{name}.json").write_text(views.read_text())
            print(json.dumps({name: results["sets"][name]["defaults"]}, default=float), flush=True)
        results["sets"] = dict(sorted(results["sets"].items()))
        if not args.smoke:
            append_history(results, out, list(sets))
        results["seconds"] = time.monotonic() - started
        results["sets_run"] = list(sets)
        notes = data_notes(list(results["sets"]), args.data_root, sets)
        write_report(results, out, budget, results["seconds"], args.smoke, notes)
        print(f"wrote {out / 'README.md'}")
        import loso

        if len(loso.load_dumps(out)) >= 2:
            loso.main(["--out", str(out)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
