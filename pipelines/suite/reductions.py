"""How should the maps become views? The suite's models with other reductions, chosen LOSO.

    python pipelines/suite/reductions.py            # every feature model the suite trained
    python pipelines/suite/reductions.py --smoke    # tiny synthetic model (CI)

Ten choices of the feature family's fused views are re-made on the models the suite
trained (``runs/suite/<set>/model.pt``), without retraining:

- **knn**: which share of an image's locations the ``knn`` view averages (the default
  :data:`~anomalyvae.models.bank.KNN_TOP_FRACTION`, the mean of every location, and
  multi-scale: the mean or the largest of the z-scores at 1 %, 5 % and 20 %);
- **knn border**: how many feature locations along each edge of the map the ``knn``
  view leaves out (the model's ``knn_border``; the backbone's zero padding lifts the
  distances on the edge of every image);
- **knn neighbourhood**: the box each location's features are averaged over before the
  bank (the model's ``pool``); the standardization and the coreset bank are rebuilt
  from the training split's features as training builds them; also the mean z-score of
  the views of several neighbourhoods' banks (defects of several sizes);
- **knn extent**: the extent the location distances are averaged over before the
  largest average becomes the ``knn`` view: squares, or lines in 12 directions (a thin
  crack's evidence lies along its length), against the product's top share of locations
  wherever they lie; also the mean z-score of the top share and a line's;
- **global covariance**: how the ``global`` view's covariance of the mean feature
  vectors is estimated (Ledoit-Wolf, OAS, diagonal);
- **image**: how many principal components of the training normals (pooled, as the
  ``image`` view sees them) span the normal subspace: fixed counts, or as many as
  explain a share of the variance. The subspace is refitted on the model's own
  training split, as training fits it;
- **image reduction**: how the ``image`` view's residual map (off the model's own number
  of components) becomes one number: its smoothing and the top share averaged, or the
  largest mean along a line (as the knn extent);
- **image side**: the longest side the input is box-averaged to before the ``image``
  view's PCA (the model's own number of components, refitted at each side), a finer side
  with the residual smoothed over the same extent of the input as the product's (the
  fine detail reaches the PCA, the smoothing is unchanged), and several sides at once
  (the mean of their robust z-scores: defects at more than one scale);
- **image mirrors**: the training normals the ``image`` subspace is fitted on, with
  left-right (and up-down) mirrored copies added: more normals to span the subspace
  where there are few, at the price of a looser subspace where the normals are not
  mirror-symmetric;
- **image likelihood**: what the ``image`` view reads off the normal subspace (the model's
  own number of components): the residual off it (the product's), the Mahalanobis
  distance of the image's coordinates inside it (a defect that moves the image along
  normal directions, further than any normal), both (the mean of their robust
  z-scores), or the whole negative log-likelihood of probabilistic PCA (the subspace's
  Mahalanobis distance plus the residual over the discarded variance per dimension):
  the linear-Gaussian special case of a VAE, in full.

Each variant is scored alone and inside the fused score (the robust z-scores of
``knn``, ``global`` and ``image`` with the variant in place, weighed by the model's own
fusion rule: the image-share weights, their ``u`` recomputed under an image variant's
own subspace, or the plain mean for older models; constants from the held-out normals
only, for every variant and the default alike, so a difference is the variant's).
Then leave-one-set-out: for each set, the variant with the best mean gain over the default
on the *other* sets is chosen and scored on the left-out one. A variant qualifies as a
new default only when it is chosen in a majority of folds and its held-out mean gain is
positive; adopting it is a change to the product, measured by the suite's rerun.
Results: reports/suite/reductions.md and reductions.json.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "pipelines"))
sys.path.insert(0, str(ROOT / "pipelines" / "suite"))

from common import machine  # noqa: E402
from folds import choose_leave_one_out, fold_table  # noqa: E402
from lines import extent_view, line_kernels, share_length  # noqa: E402
from trained import options, trained_models  # noqa: E402

from anomalyvae.data import discover  # noqa: E402
from anomalyvae.detector import VAEAnomalyDetector  # noqa: E402
from anomalyvae.models.bank import (  # noqa: E402
    KNN_TOP_FRACTION,
    coreset_indices,
    interior,
    knn_view,
    nearest_distance,
)
from anomalyvae.models.feature_training import feature_standardization  # noqa: E402
from anomalyvae.models.feature_vae import IMAGE_SIGMA, IMAGE_TOP_FRACTION  # noqa: E402
from anomalyvae.models.fusion import (  # noqa: E402
    IMAGE_SHARE_POWER,
    IMAGE_SHARE_SCALE,
    VIEW_NAMES,
    robust_z_constants,
    share_weights,
)
from anomalyvae.models.smoothing import gaussian_blur, topk_size  # noqa: E402

#: knn variants: the share of locations averaged (1.0 = all), or multi-scale z-scores.
KNN_FRACTIONS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 1.0)
KNN_SCALES = (0.01, 0.05, 0.2)
#: image variants: a fixed number of components, or the share of variance they explain.
IMAGE_COUNTS = (20, 50, 100, 200)
IMAGE_SHARES = (0.9, 0.95, 0.99)
#: image reduction variants: smoothing of the residual map (px) and the top share averaged.
IMAGE_SIGMAS = (1.0, 2.0)
IMAGE_TOPS = (0.002, 0.005, 0.01, 0.05)
#: ... or the largest mean of the unsmoothed residual along lines of these lengths (px).
IMAGE_LINES = (5, 9)
#: image side variants: the longest side (px) the input is box-averaged to for the view.
IMAGE_SIDES = (64, 128, 256)
#: ... and sides read together, the mean of each side's robust z-score.
IMAGE_SIDE_MIXES = ((128, 256), (64, 128, 256))
#: knn border variants: the feature locations along each edge the knn view leaves out.
KNN_BORDERS = (0, 1, 2)
#: knn neighbourhood variants: the side of the box each location's features average.
NEIGHBOURHOODS = (1, 3, 5)
NEIGHBOURHOOD_MIXES = ((1, 3), (1, 3, 5))
#: knn extent variants: the side (feature locations) of the squares, and the length of
#: the lines (in :data:`LINE_ORIENTATIONS` directions), the location distances are
#: averaged over before the largest average is the view: evidence integrated over a
#: defect's extent (an area, or a thin crack's length) instead of the top share of
#: locations wherever they lie.
EXTENT_SQUARES = (3, 5, 9)
EXTENT_LINES = (5, 9, 17)
#: ... and lines as long as these shares of the map's longer side (the defects' extent in
#: proportion to the image, whatever its size).
EXTENT_SHARES = (0.1, 0.2)
BATCH = 16
#: Each set's per-image values of every variant, saved beside its model.
VALUES_FILE = "reduction_values.npz"
#: The views the product's fused score weighs (in this order).
FUSED = ("knn", "global", "image")
#: The fused view each family of variants replaces.
VIEW_OF = {
    "knn": "knn",
    "knn border": "knn",
    "knn neighbourhood": "knn",
    "knn extent": "knn",
    "global covariance": "global",
    "image": "image",
    "image reduction": "image",
    "image side": "image",
    "image mirrors": "image",
    "image likelihood": "image",
}
#: The image likelihood variants (the first is the product's view).
LIKELIHOODS = (
    "residual off the subspace",
    "+ Mahalanobis inside it, mean z",
    "Mahalanobis inside it alone",
    "probabilistic PCA negative log-likelihood",
)
#: The image subspace's training normals, mirrored copies added (a generic augmentation:
#: which mirrors a data set is invariant to is not known without labels).
MIRRORS = {
    "as they are": (),
    "+ mirrored left-right": (-1,),
    "+ mirrored left-right and up-down": (-1, -2),
}


def knn_key(fraction: float) -> str:
    return f"top {100 * fraction:g}%" if fraction < 1 else "mean"


def top_mean(values: np.ndarray, k: int) -> np.ndarray:
    flat = values.reshape(len(values), -1)
    return np.partition(flat, -k, axis=1)[:, -k:].mean(1)


def batches(detector: VAEAnomalyDetector, paths: list[Path]):
    """The model inputs of ``paths``, ``BATCH`` images at a time."""
    for start in range(0, len(paths), BATCH):
        images = detector.preprocess(paths[start : start + BATCH])
        yield torch.from_numpy(np.ascontiguousarray(images))


def pooled(x: torch.Tensor, pool: int) -> np.ndarray:
    """Model inputs as the image view sees them (box-pooled)."""
    return (F.avg_pool2d(x, pool) if pool > 1 else x).numpy()


def side_sigmas(side: int, box: int, pool: int) -> dict[str, float]:
    """The smoothings an image-side variant is read with, by row label: the product's
    (in pooled px), and for a side finer than the model's own (``box`` < ``pool``) the
    same extent of the input: the residual's fine detail kept, the noise averaged as at
    the default."""
    sigmas = {f"{side} px": IMAGE_SIGMA}
    if box < pool:
        scaled = IMAGE_SIGMA * pool / box
        sigmas[f"{side} px, smoothed {scaled:g} px"] = scaled
    return sigmas


def side_pools(config) -> dict[int, int]:
    """The box each image-side variant averages the input over (the product's rule)."""
    return {side: dataclasses.replace(config, image_side=side).image_pool for side in IMAGE_SIDES}


def passes(detector: VAEAnomalyDetector, paths: list[Path], pool: int) -> dict[str, np.ndarray]:
    """Per image: the bank distances of every location, the pooled input (at the model's
    pool and at each image-side variant's), the views."""
    model = detector.model_.eval()
    sides = {f"pooled {side}": box for side, box in side_pools(model.config).items()}
    names = ("distances", "pooled", "global", "image", "residual", "spread", *sides)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    with torch.no_grad():
        for x in batches(detector, paths):
            raw = model.raw_features(x)
            parts["distances"].append(model.knn_locations(model.standardize(raw)).numpy())
            parts["pooled"].append(pooled(x, pool))
            for key, box in sides.items():
                parts[key].append(pooled(x, box))
            parts["global"].append(model.global_distance(raw).double().numpy())
            parts["image"].append(model.image_view(x).double().numpy())
            residual, spread = model.image_variance(x)  # the image-share fusion's signal
            parts["residual"].append(residual.double().numpy())
            parts["spread"].append(spread.double().numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def residual_maps(pca: PCA, k: int, groups: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each group's squared residual off the first ``k`` components, (n, 1, h, w)."""
    basis = pca.components_[:k]
    out = {}
    for group, pooled in groups.items():
        centred = pooled.reshape(len(pooled), -1).astype(np.float64) - pca.mean_
        residual = centred - (centred @ basis.T) @ basis
        out[group] = (residual**2).reshape(pooled.shape).mean(1, keepdims=True)
    return out


def reduced(squared: np.ndarray, sigma: float, share: float) -> np.ndarray:
    """The image view's reduction: smoothed at ``sigma`` px, mean of the top ``share``."""
    smoothed = gaussian_blur(torch.from_numpy(squared).float(), sigma).numpy()
    n = smoothed.shape[-2] * smoothed.shape[-1]
    return top_mean(smoothed, topk_size(share, sigma, n))


def subspace(train: np.ndarray) -> PCA:
    """Every principal component of the pooled training normals (the rules take a prefix)."""
    flat = train.reshape(len(train), -1).astype(np.float64)
    return PCA(min(len(flat) - 1, flat.shape[1]), random_state=0).fit(flat)


def image_views(
    train: np.ndarray,
    groups: dict[str, np.ndarray],
    components: int,
    counts_only: bool = False,
    sigma: float = IMAGE_SIGMA,
    pca: PCA | None = None,
) -> tuple[dict[str, dict], dict[str, dict]]:
    """The image view of each group for every component rule (PCA of ``train``, or the
    :func:`subspace` of it given as ``pca``; residual maps smoothed at ``sigma`` px), and
    for every reduction of the residual map off the model's own ``components`` (none with
    ``counts_only``)."""
    pca = pca if pca is not None else subspace(train)
    share = np.cumsum(pca.explained_variance_ratio_)
    rules = {f"{k} components": k for k in sorted({*IMAGE_COUNTS, components})}
    rules |= {f"{s:.0%} of variance": int(np.searchsorted(share, s)) + 1 for s in IMAGE_SHARES}
    counts: dict[str, dict] = {}
    for name, k in rules.items():
        k = max(1, min(k, len(share)))
        maps = residual_maps(pca, k, groups)
        counts[name] = {g: reduced(m, sigma, IMAGE_TOP_FRACTION) for g, m in maps.items()}
        counts[name]["components"] = k
        # the image-share fusion's signal under this subspace, from the held-out normals
        centred = groups["val"].reshape(len(groups["val"]), -1) - pca.mean_
        spread = float((centred**2).mean(1).sum())
        counts[name]["unexplained"] = float(maps["val"].mean(axis=(1, 2, 3)).sum()) / spread
    if counts_only:
        return counts, {}
    maps = residual_maps(pca, max(1, min(components, len(share))), groups)
    reductions = {
        image_key(sigma, top): {g: reduced(m, sigma, top) for g, m in maps.items()}
        for sigma in IMAGE_SIGMAS
        for top in IMAGE_TOPS
    }
    for length in IMAGE_LINES:  # the residual's evidence along a line (a thin crack's)
        lines = line_kernels(length)
        reductions[extent_key("lines", length)] = {
            g: extent_view(m[:, 0], lines) for g, m in maps.items()
        }
    return counts, reductions


def likelihood_views(
    pca: PCA, k: int, groups: dict[str, np.ndarray], residual: dict[str, np.ndarray]
) -> dict[str, dict]:
    """The :data:`LIKELIHOODS` variants of each group (pooled inputs, the held-out normals
    as "val"): ``residual`` is the product's view off the first ``k`` components of
    ``pca``; the Mahalanobis distance uses their variances, the probabilistic PCA
    likelihood adds the squared residual over the mean variance of the discarded
    directions (its maximum-likelihood noise)."""
    variance = pca.explained_variance_
    k = max(1, min(k, len(variance)))
    basis = pca.components_[:k]
    noise = max(float(variance[k:].sum()) / max(pca.mean_.size - k, 1), 1e-300)
    inside, whole = {}, {}
    for group, x in groups.items():
        centred = x.reshape(len(x), -1).astype(np.float64) - pca.mean_
        coords = centred @ basis.T
        inside[group] = (coords**2 / variance[:k]).sum(1)
        off = np.maximum((centred**2).sum(1) - (coords**2).sum(1), 0.0)
        whole[group] = inside[group] + off / noise
    both = {
        g: (z_of(residual["val"], residual[g]) + z_of(inside["val"], inside[g])) / 2 for g in groups
    }
    return dict(zip(LIKELIHOODS, (residual, both, inside, whole), strict=True))


def image_key(sigma: float, share: float) -> str:
    return f"smoothed {sigma:g} px, top {share:.1%}"


def border_key(border: int) -> str:
    return f"{border} location{'s' if border != 1 else ''} left out"


def border_views(groups: dict[str, np.ndarray]) -> dict[str, dict]:
    """The knn view of each group with each border left out (the product's reduction)."""
    return {
        border_key(b): {
            g: knn_view(torch.from_numpy(d), b).double().numpy() for g, d in groups.items()
        }
        for b in KNN_BORDERS
    }


def knn_views(groups: dict[str, np.ndarray], border: int = 0) -> dict[str, dict]:
    """The knn view of each group for every reduction of the location distances (the
    model's ``border`` left out)."""
    groups = {g: interior(d, border) for g, d in groups.items()}
    out: dict[str, dict] = {}
    for fraction in KNN_FRACTIONS:
        out[knn_key(fraction)] = {
            g: top_mean(d, max(1, int(fraction * d[0].size))) for g, d in groups.items()
        }
    scales = [out[knn_key(f)] for f in KNN_SCALES]
    for how, combine in (("mean", np.mean), ("max", np.max)):
        out[f"multi-scale {how}-z"] = {
            g: combine([z_of(s["val"], s[g]) for s in scales], axis=0) for g in groups
        }
    return out


def extent_views(groups: dict[str, np.ndarray], border: int) -> dict[str, dict]:
    """The knn view of each group under every extent (the model's ``border`` left out),
    the product's top share first."""
    groups = {g: interior(d, border) for g, d in groups.items()}
    k = {g: max(1, int(KNN_TOP_FRACTION * d[0].size)) for g, d in groups.items()}
    out = {knn_key(KNN_TOP_FRACTION): {g: top_mean(d, k[g]) for g, d in groups.items()}}
    for side in EXTENT_SQUARES:
        square = torch.full((1, 1, side, side), 1.0 / side**2)
        out[extent_key("squares", side)] = {g: extent_view(d, square) for g, d in groups.items()}
    for length in EXTENT_LINES:
        lines = line_kernels(length)
        out[extent_key("lines", length)] = {g: extent_view(d, lines) for g, d in groups.items()}
    longer = max(next(iter(groups.values())).shape[-2:])
    for share in EXTENT_SHARES:  # a length in proportion to the map (odd, at least 3)
        lines = line_kernels(share_length(share, longer))
        out[f"largest mean over lines of {share:.0%} of the map's longer side"] = {
            g: extent_view(d, lines) for g, d in groups.items()
        }
    top = out[knn_key(KNN_TOP_FRACTION)]
    for length in EXTENT_LINES[:2]:
        line = out[extent_key("lines", length)]
        out[f"{knn_key(KNN_TOP_FRACTION)} + lines of {length}, mean z"] = {
            g: (z_of(top["val"], top[g]) + z_of(line["val"], line[g])) / 2 for g in groups
        }
    return out


def extent_key(kind: str, size: int) -> str:
    return f"largest mean over {kind} of {size}" + (" x " + str(size) if kind == "squares" else "")


def features(detector: VAEAnomalyDetector, paths: list[Path]) -> torch.Tensor:
    """Raw backbone features (n, c, h, w) of ``paths`` under the model's current config."""
    with torch.no_grad():
        return torch.cat([detector.model_.raw_features(x) for x in batches(detector, paths)])


def neighbourhood_views(
    detector: VAEAnomalyDetector, paths: dict[str, list[Path]]
) -> tuple[dict[str, dict], dict[str, dict]]:
    """knn views with the bank rebuilt from features averaged over each neighbourhood
    (standardization and coreset refitted as training fits them), and the global view
    under each covariance estimate (the model's own neighbourhood)."""
    from sklearn.covariance import OAS, LedoitWolf

    model = detector.model_.eval()
    config = model.config
    edge = config.knn_border  # the locations the knn view leaves out
    knn: dict[str, dict] = {}
    covariances: dict[str, dict] = {}
    try:
        for side in NEIGHBOURHOODS:
            model.config = dataclasses.replace(config, pool=side)
            raw = {group: features(detector, p) for group, p in paths.items()}
            mean, scale = feature_standardization(raw["train"])
            rows = ((raw["train"] - mean) / scale).permute(0, 2, 3, 1).flatten(0, 2)
            bank = rows[coreset_indices(rows, config.bank_size, detector.seed)].clone()
            del rows
            knn[neighbourhood_key(side)] = {
                group: np.array(
                    [
                        float(
                            knn_view(nearest_distance((r[i : i + 1] - mean) / scale, bank), edge)[0]
                        )
                        for i in range(len(r))
                    ]
                )
                for group, r in raw.items()
                if group != "train"
            }
            if side != config.pool:
                continue
            means = {group: r.mean(dim=(2, 3)).double().numpy() for group, r in raw.items()}
            for name, estimator in (("Ledoit-Wolf", LedoitWolf()), ("OAS", OAS())):
                estimator.fit(means["train"])
                covariances[name] = {
                    g: estimator.mahalanobis(m) for g, m in means.items() if g != "train"
                }
            centre, variance = means["train"].mean(0), means["train"].var(0) + 1e-12
            covariances["diagonal"] = {
                g: (((m - centre) ** 2) / variance).sum(1) for g, m in means.items() if g != "train"
            }
    finally:
        model.config = config
    # several neighbourhoods at once: the mean of their z-scores (two banks to search)
    for sides in NEIGHBOURHOOD_MIXES:
        parts = [knn[neighbourhood_key(side)] for side in sides]
        knn[" + ".join(f"{side} x {side}" for side in sides) + ", mean z"] = {
            g: np.mean([z_of(part["val"], part[g]) for part in parts], axis=0)
            for g in ("val", "test")
        }
    return knn, covariances


def neighbourhood_key(side: int) -> str:
    return f"{side} x {side} neighbourhood"


def z_of(reference: np.ndarray, values: np.ndarray) -> np.ndarray:
    center, scale = robust_z_constants(np.asarray(reference, dtype=np.float64)[:, None])
    return (np.asarray(values, dtype=np.float64) - center[0]) / scale[0]


def measure(detector: VAEAnomalyDetector, source: Path) -> dict:
    config = detector.model_.config
    train = [s.path for s in discover(source, "train") if s.label == 0]
    val_index, train_index = detector.split_indices(len(train))
    test = discover(source, "test")
    labels = np.array([s.label for s in test])
    pool = config.image_pool
    val = passes(detector, [train[i] for i in val_index], pool)
    tested = passes(detector, [s.path for s in test], pool)
    boxes = {pool, *side_pools(config).values()}
    pooled_train: dict[int, list[np.ndarray]] = {box: [] for box in boxes}
    for x in batches(detector, [train[i] for i in train_index]):
        for box in boxes:
            pooled_train[box].append(pooled(x, box))
    base = np.concatenate(pooled_train[pool])  # the model's own pooled training normals
    own_pca = subspace(base)
    own_groups = {"val": val["pooled"], "test": tested["pooled"]}
    counts, reductions = image_views(base, own_groups, config.image_components, pca=own_pca)
    likelihoods = likelihood_views(
        own_pca,
        config.image_components,
        own_groups,
        reductions[image_key(IMAGE_SIGMA, IMAGE_TOP_FRACTION)],
    )
    sides = {}
    for side, box in side_pools(config).items():
        sigmas = side_sigmas(side, box, config.image_pool)
        train_box = np.concatenate(pooled_train[box])
        fitted = subspace(train_box)  # once per side, for every smoothing
        for label, sigma in sigmas.items():
            own, _ = image_views(
                train_box,
                {"val": val[f"pooled {side}"], "test": tested[f"pooled {side}"]},
                config.image_components,
                counts_only=True,
                sigma=sigma,
                pca=fitted,
            )
            sides[label] = own[f"{config.image_components} components"]
    for mix in IMAGE_SIDE_MIXES:
        parts = [sides[f"{side} px"] for side in mix]
        sides[" + ".join(map(str, mix)) + " px, mean z"] = {
            # the fusion's image weight keeps the model's own side's signal
            "unexplained": sides[f"{config.image_side} px"]["unexplained"],
            **{g: np.mean([z_of(p["val"], p[g]) for p in parts], axis=0) for g in ("val", "test")},
        }
    mirrors = {}
    for name, axes in MIRRORS.items():
        stack = np.concatenate([base, *(np.flip(base, axis) for axis in axes)])
        own, _ = image_views(
            stack,
            own_groups,
            config.image_components,
            counts_only=True,
        )
        mirrors[name] = own[f"{config.image_components} components"]
    neighbourhoods, covariances = neighbourhood_views(
        detector,
        {
            "train": [train[i] for i in train_index],
            "val": [train[i] for i in val_index],
            "test": [s.path for s in test],
        },
    )
    families = {
        "knn": knn_views({"val": val["distances"], "test": tested["distances"]}, config.knn_border),
        "knn border": border_views({"val": val["distances"], "test": tested["distances"]}),
        "knn neighbourhood": neighbourhoods,
        "knn extent": extent_views(
            {"val": val["distances"], "test": tested["distances"]}, config.knn_border
        ),
        "global covariance": covariances,
        "image": counts,
        "image reduction": reductions,
        "image side": sides,
        "image mirrors": mirrors,
        "image likelihood": likelihoods,
    }
    default = {
        "knn": knn_key(KNN_TOP_FRACTION),
        "knn border": border_key(config.knn_border),
        "knn neighbourhood": neighbourhood_key(config.pool),
        "knn extent": knn_key(KNN_TOP_FRACTION),
        "global covariance": "Ledoit-Wolf",
        "image": f"{config.image_components} components",
        "image reduction": image_key(IMAGE_SIGMA, IMAGE_TOP_FRACTION),
        "image side": f"{config.image_side} px",
        "image mirrors": "as they are",
        "image likelihood": LIKELIHOODS[0],
    }
    views = {"val": val, "test": tested}
    unexplained = float(val["residual"].sum() / max(val["spread"].sum(), 1e-300))

    def weights(share: float) -> np.ndarray:
        # the model's own rule: the image-share weights, or the plain mean (older models)
        if config.fusion == "image-share":
            all_views = share_weights(share, index=config.fused_index)
            return np.array([all_views[VIEW_NAMES.index(n)] for n in FUSED])
        return np.full(len(FUSED), 1.0 / len(FUSED))

    def fused(family: str, values: dict) -> float:
        replace = VIEW_OF[family]
        z = {}
        for name in FUSED:
            own = values if name == replace else None
            if own is None and name == "knn":
                own = families["knn"][default["knn"]]
            if own is None:
                own = {g: views[g][name] for g in views}
            z[name] = z_of(own["val"], own["test"])
        share = values.get("unexplained", unexplained)  # an image variant's own subspace
        score = np.tensordot(weights(share), [z[n] for n in FUSED], axes=1)
        # the product's local excess term, on the variant's knn view where it has one
        return float(roc_auc_score(labels, score + config.local_excess.of(z)))

    out: dict = {
        "n_val": len(val_index),
        "n_test": len(test),
        "default": default,
        "fusion": config.fusion,
        "unexplained": unexplained,
        "families": {},
    }
    for family, variants in families.items():
        rows = {}
        for name, values in variants.items():
            rows[name] = {
                "alone": float(roc_auc_score(labels, values["test"])),
                "fused": fused(family, values),
            }
            for extra in ("components", "unexplained"):
                if extra in values:
                    rows[name][extra] = values[extra]
        out["families"][family] = rows
    # the product's own image view (the model's subspace) beside its refitted twin
    out["product_image_view"] = float(roc_auc_score(labels, tested["image"]))
    # every variant's per-image values, for fusions measured on them later (not reported)
    arrays = {"labels": labels, "unexplained": np.array(unexplained)}
    for group in views:
        for name in FUSED:
            own = families["knn"][default["knn"]] if name == "knn" else None
            arrays[f"{group}/{name}"] = own[group] if own else views[group][name]
    for family, variants in families.items():
        for name, values in variants.items():
            for group in views:
                arrays[f"{group}/{family}/{name}"] = np.asarray(values[group], dtype=np.float64)
    out["values"] = arrays
    return out


def loso(results: dict, family: str) -> dict:
    """For each set: the variant with the best mean fused gain on the others, held out."""
    default = next(iter(results.values()))["default"][family]  # the same on every set
    gain = {
        s: {
            v: r["fused"] - results[s]["families"][family][results[s]["default"][family]]["fused"]
            for v, r in results[s]["families"][family].items()
        }
        for s in results
    }
    return choose_leave_one_out(gain, default)


def write(results: dict, out: Path, smoke: bool) -> None:
    decisions = {family: loso(results, family) for family in VIEW_OF} if results else {}
    (out / "reductions.json").write_text(
        json.dumps({"machine": machine(), "sets": results, "loso": decisions}, indent=2)
    )
    sets = list(results)
    lines = [
        "# How the maps become views: reductions chosen leave-one-set-out"
        + (" (smoke run)" if smoke else ""),
        "",
        f"Produced by `python pipelines/suite/reductions.py` on the suite's trained models "
        f"({machine()}). Image AUROC of each variant alone and inside the fused score (the "
        "robust z-scores of knn, global and image, the variant in place, weighed by the "
        "model's own fusion rule: for `image-share`, knn and global 1 each and image "
        f"{IMAGE_SHARE_SCALE:g} (u / (1 - u))^{IMAGE_SHARE_POWER:g} (the product's scale "
        "and power when the models were measured), u recomputed under an image variant's own "
        "subspace; constants from the held-out normals only, the default under the same "
        "protocol, so a difference is the variant's). No model is retrained: the image "
        "subspace is refitted on each model's own training split. Fusion rule and u of "
        "the default per set: "
        + ", ".join(
            f"{s} {r.get('fusion', 'mean')} (u = {r.get('unexplained', float('nan')):.3f})"
            for s, r in results.items()
        )
        + ".",
        "",
    ]
    titles = {
        "knn": "knn view: which locations' bank distances are averaged",
        "knn border": "knn view: the feature locations along each edge of the map it leaves out",
        "knn neighbourhood": "knn view: the neighbourhood each location's features average "
        "(bank rebuilt)",
        "knn extent": "knn view: the extent its location distances are averaged over "
        "(squares or lines, in feature locations)",
        "global covariance": "global view: the covariance of the mean feature vectors",
        "image": "image view: how many principal components span the normals",
        "image reduction": "image view: how its residual map is reduced (model's own components)",
        "image side": "image view: the longest side the input is box-averaged to (model's own "
        "components)",
        "image mirrors": "image view: the normals its subspace is fitted on, mirrored copies "
        "added (model's own components)",
        "image likelihood": "image view: what it reads off the normal subspace (model's own "
        "components)",
    }
    for family, decision in decisions.items():
        lines += [f"## {titles[family]}", ""]
        lines += ["| variant | " + " | ".join(f"{s} alone | {s} fused" for s in sets) + " |"]
        lines += ["|---|" + "---|---|" * len(sets)]
        names = list(next(iter(results.values()))["families"][family])
        for name in names:
            cells = []
            for s in sets:
                row = results[s]["families"][family].get(name)
                mark = " (default)" if name == results[s]["default"][family] else ""
                extra = f" [{row['components']}]" if row and "components" in row else ""
                cells.append(f"{row['alone']:.3f}{extra} | {row['fused']:.3f}" if row else "– | –")
            lines.append(f"| {name}{mark} | " + " | ".join(cells) + " |")
        lines += ["", *fold_table(decision)]
        verdict = (
            "**qualifies as the default** (to adopt it: set it in the product, retrain, "
            "rerun the suite; this script changes nothing)"
            if decision["adopt"]
            else "**the default stays**"
        )
        lines += [
            "",
            f"Majority choice: {decision['majority']}; held-out mean gain of the fold choices "
            f"{decision['held_mean_gain']:+.3f} fused AUROC: {verdict}.",
            "",
        ]
    if "image" in decisions:
        lines.append(
            "Component counts in brackets. The product's image view (its own subspace) "
            "scores: "
            + ", ".join(f"{s} {results[s]['product_image_view']:.3f}" for s in sets)
            + "."
        )
    (out / "reductions.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def feature_models(args) -> Iterator[tuple[str, Path, VAEAnomalyDetector]]:
    """(set, source, detector) of every suite model with a memory bank and an image view."""
    for name, source, _, detector in trained_models(
        args,
        lambda c: bool(getattr(c, "bank_size", 0) and getattr(c, "image_components", 0)),
        "memory bank or image view",
    ):
        yield name, source, detector


def main() -> None:
    args = options(__doc__)
    results = {}
    for name, source, detector in feature_models(args):
        results[name] = measure(detector, source)
        # beside the model: each image's value under every variant (runs/, not reports/)
        np.savez_compressed(args.runs / name / VALUES_FILE, **results[name].pop("values"))
    write(results, args.out, args.smoke)


if __name__ == "__main__":
    main()
