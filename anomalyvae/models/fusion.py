"""How the feature family's views become one image score: robust z-scores and their fusion.

The views of an image (:data:`VIEW_NAMES`) each become a z-score against the held-out
normals (:func:`robust_z_constants`), and :func:`fuse_views` combines them: the mean or
the largest of the fused views, or a weighted sum whose weights adapt to each data set
without labels (:func:`share_weights`, the default "image-share"; :func:`view_weights`,
the "synthetic-*" rules). Plain numpy for the constants and weights, plain tensor ops for
the fused score, so the exported graph carries it. The pixel family fuses its two views
(local, global) with the same :func:`fuse_views`. The rules were chosen leave-one-set-out
(reports/suite/loso.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray
from torch import Tensor

from anomalyvae.errors import InvalidValueError

#: The candidate image scores of the feature family, in the order of ``views`` tensors.
VIEW_NAMES: tuple[str, ...] = ("local", "elbo", "global", "image", "knn")
#: The views the fused score averages the z-scores of: the local defect evidence (the
#: memory bank's nearest-neighbour distance), the global look in feature space and the
#: whole image in pixel space. The VAE's own views are reported, not fused: on the sets
#: measured the bank's distance ranked images better than the ELBO map's top-k
#: (reports/suite/experiments.md). Older models fuse what they have
#: (:attr:`FeatureVAEConfig.fused_index`).
FUSED_VIEWS: tuple[str, ...] = ("knn", "global", "image")
FUSED_INDEX: tuple[int, ...] = tuple(VIEW_NAMES.index(v) for v in FUSED_VIEWS)
#: How :func:`fuse_views` combines the z-scores: "mean" (the default) or "max".
FUSION_RULES: tuple[str, ...] = ("mean", "max")
#: Fusion rules that adapt to each data set without labels. "synthetic-*": every view's
#: z-score is weighted by how well that view separates synthetic defects pasted into the
#: held-out normals from the same normals (its AUROC there, :func:`view_weights`).
#: "best": the one best view; "top2"/"top3": the mean of the two or three best;
#: "weighted": weights in proportion to AUROC - 0.5. "image-share": the fused views
#: (knn, global, image) with the image view's weight growing with the share of the
#: held-out normals' pixel variance that the normal subspace leaves unexplained
#: (:func:`share_weights`). Chosen by leave-one-set-out (reports/suite/loso.md).
SYNTHETIC_FUSIONS: tuple[str, ...] = (
    "synthetic-best",
    "synthetic-top2",
    "synthetic-top3",
    "synthetic-weighted",
)
ADAPTIVE_FUSIONS: tuple[str, ...] = (*SYNTHETIC_FUSIONS, "image-share")
#: The "image-share" fusion's image weight beside knn and global (1 each) is
#: ``IMAGE_SHARE_SCALE * (u / (1 - u)) ** IMAGE_SHARE_POWER``, u the unexplained share
#: (:func:`share_weights`): about 1 at u = 0.09, near 0 below, dominant above. Scale and
#: power chosen together by leave-one-set-out from scales 1 to 1000 and powers 1 to 3
#: (reports/suite/loso.md): 1000 and 3 in three of five folds on the models whose image
#: view chooses its own components; before, 20 and 1 (models saved then keep them).
IMAGE_SHARE_SCALE = 1000.0
#: The odds' power in that weight (a sharper switch between the views than power 1).
IMAGE_SHARE_POWER = 3.0
#: The local views whose excess over the normal range the "image-share" fused score adds
#: (:class:`LocalExcess`): where the image view carries nearly all the weight, a small
#: defect that only the local views see would otherwise be lost. The memory bank's view
#: only: the training normals' cross-fitted scores have it, so every normal still
#: calibrates the threshold (the VAE's local view would need the VAE retrained per fold).
EXCESS_VIEWS: tuple[str, ...] = ("knn",)
#: The excess term's weight and the robust z it counts above (``LOCAL_EXCESS_WEIGHT *
#: sum(max(z - LOCAL_EXCESS_Z, 0))`` over :data:`EXCESS_VIEWS`). Chosen leave-one-set-out
#: (reports/suite/loso.md): among the settings within 0.005 image AUROC of no excess on
#: every other set of a fold, the one that best separates synthetic defects pasted into
#: the held-out normals: over 4 in 4 of 5 folds (over 2, the level before, costs
#: KolektorSDD 0.008 since the knn view leaves the map's edge out). Models saved before it
#: have weight 0; models saved with it keep the level they were calibrated with.
LOCAL_EXCESS_WEIGHT = 0.3
LOCAL_EXCESS_Z = 4.0


class LocalExcess(NamedTuple):
    """The excess term of a fused score: ``weight * sum(max(z[:, index] - above, 0))``.

    ``index``: columns of the views (:data:`VIEW_NAMES`) it reads; ``above``: the robust
    z-score below which a view adds nothing (normals rarely reach it), so the term leaves
    the normals' scores, and the threshold calibrated on them, nearly as they were.
    """

    index: tuple[int, ...]
    weight: float
    above: float

    def of(self, z: Mapping[str, NDArray[np.floating]]) -> NDArray[np.float64] | float:
        """The term from the views' z-scores by name (numpy; the graph has :func:`fuse_views`)."""
        if self.weight <= 0:
            return 0.0
        over = [np.maximum(np.asarray(z[VIEW_NAMES[i]], float) - self.above, 0) for i in self.index]
        return self.weight * np.sum(over, axis=0) if over else 0.0

    def to_dict(self) -> dict[str, object]:
        """The term as the model's summary and the ONNX metadata describe it."""
        return {
            "views": [VIEW_NAMES[i] for i in self.index],
            "weight": round(float(self.weight), 6),
            "above_z": round(float(self.above), 6),
        }


def robust_z_constants(
    views: NDArray[np.floating],
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per column of (n, k) normal scores: the median and the scaled MAD.

    The MAD is multiplied by 1.4826 (consistent with the standard deviation for normal
    data) and floored at 1e-6 of the centre, so a constant view cannot divide by zero.
    NaN entries (a view some normals lack) are left out of their column.
    """
    views = np.asarray(views, dtype=np.float64)
    center = np.nanmedian(views, axis=0)
    scale = 1.4826 * np.nanmedian(np.abs(views - center), axis=0)
    return center, np.maximum(scale, 1e-6 * np.maximum(np.abs(center), 1.0))


def view_weights(separation: NDArray[np.floating], rule: str) -> NDArray[np.float64]:
    """Weights (k,) of the views' z-scores for an adaptive fusion, summing to 1.

    ``separation`` is each view's AUROC of synthetic defects against held-out normals
    (no real label). "synthetic-best": one-hot on the best view (the first of a tie);
    "synthetic-top2"/"-top3": equal weights on the two or three best;
    "synthetic-weighted": in proportion to ``max(AUROC - 0.5, 0)`` (equal weights when
    no view separates at all).
    """
    separation = np.nan_to_num(np.asarray(separation, dtype=np.float64), nan=0.5)
    weights = np.zeros(len(separation))
    if rule == "synthetic-best":
        weights[int(np.argmax(separation))] = 1.0
    elif rule in ("synthetic-top2", "synthetic-top3"):
        top = int(rule[-1])
        weights[np.argsort(-separation, kind="stable")[:top]] = 1.0
    elif rule == "synthetic-weighted":
        weights = np.maximum(separation - 0.5, 0.0)
        if weights.sum() <= 0:
            weights = np.ones(len(separation))
    else:
        raise InvalidValueError(
            f"a synthetic fusion must be one of {SYNTHETIC_FUSIONS}, got {rule!r}"
        )
    return weights / weights.sum()


def share_weights(
    unexplained: float,
    scale: float = IMAGE_SHARE_SCALE,
    index: tuple[int, ...] = FUSED_INDEX,
    power: float = IMAGE_SHARE_POWER,
) -> NDArray[np.float64]:
    """Weights (k,) of the "image-share" fusion, summing to 1.

    The views in ``index`` weigh 1 each, except the image view, which weighs
    ``scale * (u / (1 - u)) ** power`` with ``u`` (``unexplained``, clipped to [0, 0.999]) the share
    of the held-out normals' pooled pixel variance off the normal subspace. Where a few
    components explain nearly all of the normals' pixel variance (u near 0: plain
    backgrounds, textures under changing light), the residual is fine noise and the
    local feature views carry the evidence; where they explain little (varied anatomy,
    parts whose layout matters), the whole image carries evidence the local features
    miss, and the weight of the image view grows. Measured on the suite's sets
    (reports/suite/loso.md); no set is named here.
    """
    if not 0 <= scale < math.inf:
        raise InvalidValueError(f"the image-share scale must be >= 0 and finite, got {scale}")
    if not 0 < power < math.inf:
        raise InvalidValueError(f"the image-share power must be > 0 and finite, got {power}")
    u = min(max(float(np.nan_to_num(unexplained)), 0.0), 0.999)
    weights = np.zeros(len(VIEW_NAMES))
    weights[list(index)] = 1.0
    image = VIEW_NAMES.index("image")
    if image in index:
        weights[image] = scale * (u / (1.0 - u)) ** power
    return weights / weights.sum()


def fuse_views(
    views: Tensor,
    center: Tensor,
    scale: Tensor,
    index: tuple[int, ...] = FUSED_INDEX,
    rule: str = "mean",
    weights: Tensor | None = None,
    excess: LocalExcess | None = None,
) -> Tensor:
    """The fused image score (n,): the mean (or the largest) z-score of the fused views.

    Each view becomes ``(view - center) / scale`` with the held-out normals' median and
    scaled MAD. "mean" (Stouffer's rule up to a constant, for Gaussian-like views)
    lets evidence that several views see add up; "max" is a monotone function of the
    smallest p-value (min-p with a Bonferroni factor: Tippett 1931), so one strong view
    is enough. Measured on the suite's sets, the mean ranked images better
    (reports/suite/experiments.md). An adaptive rule (:data:`ADAPTIVE_FUSIONS`, among
    them the default "image-share") sums every view's z-score times ``weights``
    (:func:`share_weights`, :func:`view_weights`), constants in the graph. ``excess``
    (:class:`LocalExcess`), when given with a positive weight, adds the local views'
    z-scores above its level to any rule.
    """
    if rule in ADAPTIVE_FUSIONS:
        if weights is None:
            raise InvalidValueError(f"the {rule!r} fusion needs its view weights")
        z = (views - center) / scale
        keep = [i for i, w in enumerate(weights.tolist()) if w > 0]  # constants when traced
        score = (z[:, keep] * weights[keep]).sum(dim=1)
    elif rule in FUSION_RULES:
        index = list(index)  # constants in the traced graph
        z = (views[:, index] - center[index]) / scale[index]
        score = z.mean(dim=1) if rule == "mean" else z.max(dim=1).values
    else:
        raise InvalidValueError(f"fusion rule must be one of {FUSION_RULES}, got {rule!r}")
    if excess is None or excess.weight <= 0 or not excess.index:
        return score
    local = list(excess.index)
    over = (views[:, local] - center[local]) / scale[local] - excess.above
    return score + excess.weight * over.clamp(min=0).sum(dim=1)
