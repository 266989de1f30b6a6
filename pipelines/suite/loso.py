"""Leave-one-set-out: choose how views are fused on four sets, score on the fifth.

    python pipelines/suite/loso.py            # from reports/suite/views/*.json

Every suite run dumps, per set, the trained default model's candidate views (image
scores, higher = more anomalous) of three groups of images: the held-out normals
(``val``), the same normals with one synthetic defect pasted in (``synthetic``,
:func:`anomalyvae.imaging.synthetic_defects.paste_defects`) and the test images (with
their labels). Nothing here needs a label of the set it scores except the final AUROC.

A *rule* turns a set's views into one score, label-free: each view becomes a robust
z-score against the held-out normals (the product's :func:`robust_z_constants`), then a
fixed combination (mean / max over a fixed list), or an adaptive one that weighs or
picks views by how well each separates the synthetic defects from the held-out normals
(its AUROC there: no real label). For each fold, the rule with the best mean margin over
the floor on the four other sets is chosen and scored on the fifth; the table of those
scores is the honest estimate for a set nobody tuned on. The image-share score's local
excess term is chosen the same way, with the synthetic defects as the criterion among
the settings that cost the other sets' real scores nothing (``excess_loso``).

Writes reports/suite/loso.md and loso.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from anomalyvae.calibration import DEFAULT_TAIL, TAILS, threshold_from_normals  # noqa: E402
from anomalyvae.models.fusion import (  # noqa: E402
    EXCESS_VIEWS,
    IMAGE_SHARE_POWER,
    IMAGE_SHARE_SCALE,
    LOCAL_EXCESS_WEIGHT,
    LOCAL_EXCESS_Z,
    SYNTHETIC_FUSIONS,
    VIEW_NAMES,
    LocalExcess,
    robust_z_constants,
    share_weights,
    view_weights,
)

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "reports" / "suite"
#: Views that are the product's (the rest are probes the suite computes beside it).
PRODUCT_VIEWS = ("local", "elbo", "global", "image", "knn")
#: The product's fixed fused views per family (the score the default model reports).
FIXED = {"feature": ("knn", "global", "image"), "pixel": ("local", "global")}

Views = dict[str, np.ndarray]
#: Shrinkage of the views' correlation toward the identity (the correlation-weighted rule).
GLS_SHRINK = 0.3
#: Scales of the image-share fusion tried (the product's ``IMAGE_SHARE_SCALE`` among them).
SHARE_SCALES = tuple(
    sorted({1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, IMAGE_SHARE_SCALE})
)
#: Powers of the odds u / (1 - u) tried (the product's ``IMAGE_SHARE_POWER`` among them):
#: above 1 the image view's weight switches more sharply between low-u and high-u sets.
SHARE_POWERS = tuple(sorted({1.0, 2.0, 3.0, IMAGE_SHARE_POWER}))


def z_scores(views: Views, reference: Views) -> Views:
    out = {}
    for name, values in views.items():
        center, scale = robust_z_constants(np.asarray(reference[name])[:, None])
        out[name] = (np.asarray(values) - center[0]) / scale[0]
    return out


def synthetic_separation(data: dict, names: list[str]) -> dict[str, float]:
    """Each view's AUROC of synthetic defects against the held-out normals (no labels)."""
    val, synth = data["val"], data["synthetic"]
    out = {}
    for name in names:
        y = np.r_[np.zeros(len(val[name])), np.ones(len(synth[name]))]
        out[name] = float(roc_auc_score(y, np.r_[val[name], synth[name]]))
    return out


#: Which views a rule may use: the trained model's own ("views"), the same with the
#: image view as the product now computes it ("views*": the 128 px top-k PCA residual,
#: probe ``pca128_topk``, in place of the 64 px mean), or every view and probe.
VIEW_SETS = ("views", "views*", "views+probes")
#: The image view of models trained from this commit on (FeatureVAEConfig.image_reduce).
NEW_IMAGE_VIEW = "pca128_topk"


def available(data: dict, tag: str) -> list[str]:
    names = [n for n in data["test"] if n not in ("fused", "label")]
    if tag == "views+probes":
        return names
    names = [n for n in names if n in PRODUCT_VIEWS]
    if tag == "views*" and "image" in names and NEW_IMAGE_VIEW in data["test"]:
        names[names.index("image")] = NEW_IMAGE_VIEW
    return names


Rule = Callable[..., np.ndarray]


#: The product's local excess term (views, weight, level): see ``excess_grid``.
PRODUCT_EXCESS = (EXCESS_VIEWS, LOCAL_EXCESS_WEIGHT, LOCAL_EXCESS_Z)


def image_share_rule(
    scale: float = IMAGE_SHARE_SCALE,
    power: float = IMAGE_SHARE_POWER,
    excess: tuple[tuple[str, ...], float, float] = PRODUCT_EXCESS,
) -> Rule:
    """The product's image-share fused score, from a dump's views.

    Weights from the share of the held-out normals' pixel variance off the model's
    subspace (:func:`share_weights`), plus ``weight`` times the excess of the local views'
    z-scores over ``level`` (``excess`` = (views, weight, level), the product's
    :class:`~anomalyvae.models.fusion.LocalExcess`). A model without that signal (pixel
    family) keeps its fused score.
    """
    views, weight, level = excess

    def rule(data: dict, group: str = "test") -> np.ndarray:
        if "adaptation" not in data:
            return np.asarray(data[group]["fused"])
        names = list(FIXED["feature"])
        unexplained = float(data["adaptation"]["image_unexplained"][0])
        weights = share_weights(unexplained, scale, power=power)
        z = z_scores({n: data[group][n] for n in {*names, *views}}, data["val"])
        score = sum(weights[VIEW_NAMES.index(n)] * z[n] for n in names)
        known = tuple(n for n in views if n in VIEW_NAMES)  # the product's own views
        score = score + LocalExcess(tuple(map(VIEW_NAMES.index, known)), weight, level).of(z)
        # a probe view (the bank distances along a line, run.py's ``extent``): the same term
        over = [np.maximum(z[n] - level, 0.0) for n in views if n not in known]
        return score + (weight * np.sum(over, axis=0) if over and weight > 0 else 0.0)

    return rule


def make_rules() -> dict[str, Rule]:
    """Every candidate rule: name -> function(dump, group="test") -> that group's scores.

    z-scores are always against the held-out normals (``val``), and a synthetic-* rule
    always picks its views from the held-out normals and their synthetic defects, so
    the val scores a rule gives are what its threshold would be calibrated on.
    """

    def zs(data: dict, names: list[str], group: str) -> Views:
        return z_scores({n: data[group][n] for n in names}, data["val"])

    def fixed(data: dict, group: str = "test") -> np.ndarray:
        return np.asarray(data[group]["fused"])

    def fixed_new(data: dict, group: str = "test") -> np.ndarray:
        # the product's fused views, with the image view as models now compute it
        names = list(FIXED["feature" if "knn" in data["test"] else "pixel"])
        if "image" in names and NEW_IMAGE_VIEW in data["test"]:
            names[names.index("image")] = NEW_IMAGE_VIEW
        z = zs(data, names, group)
        return np.mean([z[n] for n in names], axis=0)

    def combine(kind: str, tag: str) -> Rule:
        def rule(data: dict, group: str = "test") -> np.ndarray:
            names = available(data, tag)
            z = zs(data, names, group)
            stack = np.stack([z[n] for n in names])
            return stack.mean(0) if kind == "mean" else stack.max(0)

        return rule

    def adaptive(fusion: str, tag: str) -> Rule:
        # the product's own weights (anomalyvae.models.fusion.view_weights); the
        # adaptive fusions are the feature model's: a pixel model keeps its fused score
        def rule(data: dict, group: str = "test") -> np.ndarray:
            if "knn" not in data["test"]:
                return fixed(data, group)
            names = available(data, tag)
            sep = synthetic_separation(data, names)
            z = zs(data, names, group)
            weights = view_weights(np.array([sep[n] for n in names]), fusion)
            return np.tensordot(weights, np.stack([z[n] for n in names]), axes=1)

        return rule

    def fixed_names(data: dict) -> list[str]:
        return list(FIXED["feature" if "knn" in data["test"] else "pixel"])

    def correlation_weighted(data: dict, group: str = "test") -> np.ndarray:
        # generalized least squares: views that move together on normals share a weight
        names = fixed_names(data)
        ref, z = zs(data, names, "val"), zs(data, names, group)
        corr = np.corrcoef(np.stack([ref[n] for n in names])) if len(names) > 1 else np.ones((1, 1))
        corr = (1 - GLS_SHRINK) * np.nan_to_num(corr) + GLS_SHRINK * np.eye(len(names))
        weights = np.maximum(np.linalg.solve(corr, np.ones(len(names))), 0.0)
        return np.tensordot(weights / weights.sum(), np.stack([z[n] for n in names]), axes=1)

    def rank_soft_max(data: dict, group: str = "test") -> np.ndarray:
        # each view's normal distribution made standard normal by its ranks (beyond the
        # largest normal: the z-score's excess), then a soft maximum (log-sum-exp)
        from scipy.special import logsumexp
        from scipy.stats import norm

        names = fixed_names(data)
        ref, z = zs(data, names, "val"), zs(data, names, group)
        parts = []
        for name in names:
            normal = np.sort(ref[name])
            n = len(normal)
            ranked = norm.ppf((np.searchsorted(normal, z[name], side="right") + 0.5) / (n + 1))
            top = norm.ppf((n + 0.5) / (n + 1))
            parts.append(np.where(z[name] > normal[-1], top + z[name] - normal[-1], ranked))
        # stable: a view far past every normal (z of hundreds) would overflow np.exp
        return logsumexp(np.stack(parts), axis=0)

    rules: dict[str, Rule] = {
        "fixed (as trained)": fixed,
        "fixed views, constants from held-out normals only": fixed_new,
        "fixed views, weights from their correlation on held-out normals": correlation_weighted,
        "fixed views, rank-Gaussian z, soft maximum": rank_soft_max,
    }

    for power in SHARE_POWERS:
        for scale in SHARE_SCALES:
            tag = "" if power == IMAGE_SHARE_POWER else f" p{power:g}"
            rules[f"image-share x{scale:g}{tag}"] = image_share_rule(scale, power)
    for tag in VIEW_SETS:
        rules[f"mean-z({tag})"] = combine("mean", tag)
        rules[f"max-z({tag})"] = combine("max", tag)
        for fusion in SYNTHETIC_FUSIONS:
            rules[f"{fusion}({tag})"] = adaptive(fusion, tag)
    return rules


def operating_point(data: dict, rule: Rule, target_fpr: float = 0.01) -> dict:
    """Each calibration tail's threshold, the test normals' FPR and the anomalies'
    recall at it, and the sensitivity at 95 % specificity (threshold-free).

    For the product's default score the threshold is read from the normal scores the
    model itself calibrated on (held-out and cross-fitted: ``calibration``); for another
    rule, from its scores of the held-out normals.
    """
    import warnings

    from anomalyvae.metrics import sensitivity_at_specificity

    labels = np.asarray(data["test"]["label"])
    test, val = rule(data, "test"), rule(data, "val")
    if rule.__name__ == "fixed" and "calibration" in data:
        val = np.asarray(data["calibration"]["fused"])
    out = {
        "n_calibration_normals": int(len(val)),
        "n_test_normals": int((labels == 0).sum()),
        "sens_at_95_spec": float(sensitivity_at_specificity(labels, test, 0.95)),
    }
    for tail in TAILS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # few normals: reported in the table
            value = threshold_from_normals(val, target_fpr, tail).value
        out[tail] = {
            "test_normal_fpr": float(np.mean(test[labels == 0] > value)),
            "recall": float(np.mean(test[labels == 1] > value)),
        }
    return out


def floor_of(result: dict) -> float:
    """The better of the two label-free baselines (PCA-50, mean grey level |z|)."""
    candidates = [result["pca_floor"]["image_auroc"]]
    if "grey_floor" in result:
        candidates.append(result["grey_floor"]["image_auroc"])
    return float(max(candidates))


def loso(dumps: dict[str, dict], floors: dict[str, float]) -> dict:
    rules = make_rules()
    auroc = {
        rule: {
            name: float(roc_auc_score(data["test"]["label"], fn(data)))
            for name, data in dumps.items()
        }
        for rule, fn in rules.items()
    }
    folds = {}
    for held in dumps:
        others = [n for n in dumps if n != held]

        def margin(rule: str, sets: list[str] = others) -> float:
            return float(np.mean([auroc[rule][n] - floors[n] for n in sets]))

        chosen = max(rules, key=margin)
        folds[held] = {
            "chosen": chosen,
            "train_margin": margin(chosen),
            "image_auroc": auroc[chosen][held],
            "floor": floors[held],
            "margin": auroc[chosen][held] - floors[held],
            "operating_point": operating_point(dumps[held], rules[chosen]),
        }
    defaults = {
        name: operating_point(data, rules["fixed (as trained)"]) for name, data in dumps.items()
    }
    shares = {
        name: float(data["adaptation"]["image_unexplained"][0])
        for name, data in dumps.items()
        if "adaptation" in data
    }
    return {
        "in_sample": auroc,
        "shares": shares,
        "folds": folds,
        "floors": floors,
        "defaults": defaults,
        "decision": decide(folds, auroc),
    }


#: The rule the product's models were trained with (its fused score, as trained).
CURRENT = "fixed (as trained)"

#: The local excess settings tried on top of the product's image-share weights: which
#: local views, the z level they count above and the weight of their excess. ``extent``
#: is run.py's probe view (the bank distances averaged along a line, lines.py), in the
#: dumps written since it exists (``run.py --probes-only`` adds it to older ones).
EXCESS_VIEW_CHOICES: tuple[tuple[str, ...], ...] = (
    ("knn",),
    ("local",),
    ("local", "knn"),
    ("extent",),
)
EXCESS_LEVELS = (1.0, 2.0, 3.0, 4.0)
EXCESS_WEIGHTS = (0.1, 0.3, 1.0, 3.0)
#: A setting is admissible in a fold only if it costs no more than this image AUROC, on
#: each of the fold's other sets, against no excess at all ...
EXCESS_TOLERANCE = 0.005
#: ... and reads only views the training normals' cross-fitted scores have (the VAE's
#: local view would need the VAE retrained per fold), so that every normal still
#: calibrates the threshold. The other settings are measured and logged, not chosen.
#: ``extent`` is a reduction of the same bank distances as ``knn``, which the training
#: normals' cross-fitted scores have (each normal's distances leave its own locations out).
CROSS_FITTED_VIEWS = ("knn", "global", "image", "extent")
NO_EXCESS = "none"


def excess_name(views: tuple[str, ...], weight: float, level: float) -> str:
    return f"{'+'.join(views)} w{weight:g} z{level:g}" if views and weight else NO_EXCESS


def excess_grid() -> dict[str, tuple[tuple[str, ...], float, float]]:
    """Every excess setting tried (name -> (views, weight, level)), "none" first."""
    grid: dict[str, tuple[tuple[str, ...], float, float]] = {NO_EXCESS: ((), 0.0, 0.0)}
    for views in EXCESS_VIEW_CHOICES:
        for level in EXCESS_LEVELS:
            for weight in EXCESS_WEIGHTS:
                grid[excess_name(views, weight, level)] = (views, weight, level)
    grid.setdefault(excess_name(*PRODUCT_EXCESS), PRODUCT_EXCESS)
    return grid


def excess_loso(dumps: dict[str, dict], tolerance: float = EXCESS_TOLERANCE) -> dict:
    """Leave-one-set-out choice of the image-share score's local excess term.

    The real sets' labels cannot see what the term is for: where the image view carries
    nearly all the weight (a high unexplained share), a small defect that only the local
    views see is lost, and none of the sets with a high share has such defects. So each
    fold admits the settings that cost at most ``tolerance`` image AUROC on each of its
    other sets against no excess, and among them chooses the one that best separates the
    synthetic defects pasted into the held-out normals from those normals (mean AUROC
    over the fold's other feature-model sets; ties: the smaller weight). Reported per
    held-out set: the real image AUROC and the synthetic separation, chosen against none.
    """
    feature_dumps = [d for d in dumps.values() if "adaptation" in d]
    grid = {  # a probe view the dumps lack (written before it existed) cannot be scored
        name: setting
        for name, setting in excess_grid().items()
        if all(v in d[g] for d in feature_dumps for g in ("val", "test") for v in setting[0])
    }
    rules = {name: image_share_rule(excess=setting) for name, setting in grid.items()}
    real = {
        name: {s: float(roc_auc_score(d["test"]["label"], rule(d))) for s, d in dumps.items()}
        for name, rule in rules.items()
    }
    synthetic: dict[str, dict[str, float]] = {name: {} for name in rules}
    for name, rule in rules.items():
        for s, data in dumps.items():
            if "adaptation" in data:
                clean, pasted = rule(data, "val"), rule(data, "synthetic")
                y = np.r_[np.zeros(len(clean)), np.ones(len(pasted))]
                synthetic[name][s] = float(roc_auc_score(y, np.r_[clean, pasted]))
    folds = {}
    for held in dumps:
        others = [s for s in dumps if s != held]
        admissible = [
            n
            for n, (views, _, _) in grid.items()
            if set(views) <= set(CROSS_FITTED_VIEWS)
            and all(real[n][o] >= real[NO_EXCESS][o] - tolerance for o in others)
        ]

        def separation(name: str, sets: list[str] = others) -> float:
            values = [synthetic[name][s] for s in sets if s in synthetic[name]]
            return float(np.mean(values)) if values else 0.0

        chosen = max(admissible, key=lambda n: (separation(n), -grid[n][1]))
        folds[held] = {
            "chosen": chosen,
            "admissible": len(admissible),
            "image_auroc": real[chosen][held],
            "image_auroc_none": real[NO_EXCESS][held],
            "synthetic": synthetic[chosen].get(held),
            "synthetic_none": synthetic[NO_EXCESS].get(held),
        }
    counts: dict[str, int] = {}
    for fold in folds.values():
        counts[fold["chosen"]] = counts.get(fold["chosen"], 0) + 1
    product = excess_name(*PRODUCT_EXCESS)
    return {
        "tolerance": tolerance,
        "product": product,
        "chosen_per_fold": counts,
        "majority": max(counts, key=counts.get),
        "folds": folds,
        "in_sample": {n: {"image_auroc": real[n], "synthetic": synthetic[n]} for n in grid},
    }


def decide(folds: dict, auroc: dict) -> dict:
    """The rule fixed in code that turns the folds into a default.

    A new default needs two things: the same rule chosen in a majority of the folds (a
    choice that changes with the set left out does not generalize), and a held-out
    score (each fold's left-out set) at least as good on average as the current
    default's on the same sets. Otherwise the current default stays.
    """
    counts: dict[str, int] = {}
    for fold in folds.values():
        counts[fold["chosen"]] = counts.get(fold["chosen"], 0) + 1
    top = max(counts, key=counts.get)
    held_out = float(np.mean([f["image_auroc"] for f in folds.values()]))
    current = float(np.mean([auroc[CURRENT][name] for name in folds]))
    majority = counts[top] > len(folds) / 2
    keep = top == CURRENT or not majority or held_out < current
    return {
        "chosen_per_fold": counts,
        "held_out_mean_auroc": held_out,
        "current_mean_auroc": current,
        "default": CURRENT if keep else top,
        "changed": not keep,
    }


def write(result: dict, out: Path) -> None:
    (out / "loso.json").write_text(json.dumps(result, indent=2))
    sets = list(result["floors"])
    lines = [
        "# Leave-one-set-out: fusion rules chosen on the other sets",
        "",
        "Regenerate: `python pipelines/suite/loso.py` (reads views/*.json, which "
        "`pipelines/suite/run.py` writes from each set's trained default model). "
        "Floor = the better of PCA-50 at 128 px and the |z| of the mean grey level.",
        "",
        "## The honest estimate: each set scored by the rule chosen on the others",
        "",
        "| left out | rule chosen on the others | their mean margin | image AUROC | floor "
        "| margin |",
        "|---|---|---|---|---|---|",
    ]
    for name, fold in result["folds"].items():
        lines.append(
            f"| {name} | {fold['chosen']} | {fold['train_margin']:+.3f} | "
            f"{fold['image_auroc']:.3f} | {fold['floor']:.3f} | {fold['margin']:+.3f} |"
        )
    decision = result["decision"]
    lines += [
        "",
        "Decision (`decide` in this script: a new default needs the same rule in a majority "
        "of folds and a held-out mean at least the current default's): chosen per fold "
        + ", ".join(f"{k} x{v}" for k, v in decision["chosen_per_fold"].items())
        + f"; held-out mean image AUROC {decision['held_out_mean_auroc']:.3f} against "
        f"{decision['current_mean_auroc']:.3f} for the current default on the same sets. "
        + (
            f"**The default becomes {decision['default']}.**"
            if decision["changed"]
            else f"**The default stays {decision['default']}**; the other rules' numbers "
            "are below (the CLI's `--fusion` offers the named rules: mean, max, the "
            "synthetic-* rules and image-share at the product's scale; other scales and "
            "powers are `share_weights` arguments in the library)."
        ),
    ]
    if "excess" in result:
        lines += excess_lines(result["excess"])
    lines += [
        "",
        "## The threshold of each fold's rule (target false-positive rate 1 %)",
        "",
        "Calibrated on the held-out normals' scores of the rule, as `fit` does; "
        "`conformal` is the order statistic (the largest normal when there are fewer than "
        "about 200), `robust` the larger of the second largest and a Gaussian tail from "
        "the median and MAD, capped at the largest, `auto` (the product's default) robust "
        "where the normals are too few to promise the target at all (fewer than 99 at "
        "1 %) and conformal elsewhere (`anomalyvae.calibration.TAILS`).",
        "",
    ]
    lines += operating_table(
        "left out", {n: f["operating_point"] for n, f in result["folds"].items()}
    )
    lines += [
        "",
        "## The product's own threshold (default score, target 1 %)",
        "",
        "Read from the normal scores the trained model calibrated on (held-out normals, "
        "and for the feature model the training normals' cross-fitted scores).",
        "",
    ]
    lines += operating_table("set", result.get("defaults", {}))
    lines += [
        "",
        "## Every rule on every set (in-sample: image AUROC with the set's own labels)",
        "",
        "| rule | " + " | ".join(sets) + " | mean margin | worst margin |",
        "|---|" + "---|" * (len(sets) + 2),
    ]
    for rule, per_set in result["in_sample"].items():
        margins = [per_set[n] - result["floors"][n] for n in sets]
        lines.append(
            f"| {rule} | "
            + " | ".join(f"{per_set[n]:.3f}" for n in sets)
            + f" | {np.mean(margins):+.3f} | {np.min(margins):+.3f} |"
        )
    lines.append("| floor | " + " | ".join(f"{result['floors'][n]:.3f}" for n in sets) + " | | |")
    lines += [
        "",
        "Views: the trained model's (local, elbo, global, image, knn for the feature model; "
        "local and global for the pixel model). Probes, computed by the suite beside the "
        "product: `pca128`, the mean squared residual of a 50-component PCA of the "
        "training normals on the model input pooled to at most 128 px; `pca128_topk`, the "
        "same residual as a map smoothed at 2 px, top-k mean: the image view as models "
        "trained from this commit on compute it (`views*` uses it in place of `image`; "
        "'fixed views, constants from held-out normals only' is the product's fused score "
        "with the image view so computed, its z-score constants from the held-out normals "
        "alone, like every rule but 'fixed (as trained)', whose constants include the "
        "cross-fitted training normals); and "
        "`grey`, the |z| of the mean grey level against the training normals. "
        "Synthetic-* rules weigh or pick views by their AUROC of synthetic defects pasted "
        "into the held-out normals against those normals. Image-share xS rules (the "
        "product's `--fusion image-share` at scale S; `IMAGE_SHARE_SCALE` is the "
        "product's) weigh knn and global 1 each and the image view S u / (1 - u), u the "
        "share of the held-out normals' pooled pixel variance off the model's normal "
        "subspace (no label); `xS pP` rules weigh it S (u / (1 - u))^P, a sharper switch "
        f"(the product's power is {IMAGE_SHARE_POWER:g}): "
        + ", ".join(f"{name} u = {share:.3f}" for name, share in result["shares"].items())
        + ".",
    ]
    (out / "loso.md").write_text("\n".join(lines) + "\n")


def excess_lines(excess: dict) -> list[str]:
    """The local excess section of loso.md (see :func:`excess_loso`)."""
    lines = [
        "",
        "## The local excess: small defects where the image view carries the score",
        "",
        "The product's image-share score adds `w` times the excess of the local views' "
        "robust z-scores over `z` (`anomalyvae.models.fusion.LocalExcess`). Each fold "
        f"admits the settings within {excess['tolerance']:g} image AUROC of no excess on "
        "each of its other sets that read only views the training normals' cross-fitted "
        "scores have (knn, global, image, and `extent`, the bank distances' largest mean "
        "along a line of 20 % of the location map, a probe of pipelines/suite/run.py, "
        "from the same distances as knn: every normal calibrates the threshold; the "
        "`local` settings are measured and listed, not admitted), and chooses among them "
        "the one that best separates "
        "synthetic defects (2 % blobs pasted into the held-out normals) from those normals "
        "on its other feature-model sets (`excess_loso` in this script). Real labels "
        "cannot choose it alone: the sets where the image view dominates have no small "
        "local defects.",
        "",
        "| left out | chosen on the others | admissible settings | image AUROC | without "
        "excess | synthetic separation | without excess |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, fold in excess["folds"].items():
        synth = (
            f"{fold['synthetic']:.3f} | {fold['synthetic_none']:.3f}"
            if fold["synthetic"] is not None
            else "– | –"
        )
        lines.append(
            f"| {name} | {fold['chosen']} | {fold['admissible']} | {fold['image_auroc']:.3f} "
            f"| {fold['image_auroc_none']:.3f} | {synth} |"
        )
    held = np.mean([f["image_auroc"] for f in excess["folds"].values()])
    none = np.mean([f["image_auroc_none"] for f in excess["folds"].values()])
    counts = ", ".join(f"{k} x{v}" for k, v in excess["chosen_per_fold"].items())
    verdict = (
        f"the product's `{excess['product']}` is the majority choice"
        if excess["majority"] == excess["product"]
        and excess["chosen_per_fold"][excess["majority"]] > len(excess["folds"]) / 2
        else f"**the product's `{excess['product']}` is not the majority choice "
        f"(`{excess['majority']}`)**"
    )
    lines += [
        "",
        f"Chosen per fold: {counts}; {verdict}. Held-out mean image AUROC "
        f"{held:.3f} against {none:.3f} without excess.",
        "",
        "Every setting, in-sample (image AUROC per set; synthetic separation per "
        "feature-model set):",
        "",
    ]
    sets = list(excess["folds"])
    synth_sets = [s for s in sets if s in excess["in_sample"][NO_EXCESS]["synthetic"]]
    lines += [
        "| setting | "
        + " | ".join(sets)
        + " | "
        + " | ".join(f"synthetic {s}" for s in synth_sets)
        + " |",
        "|---|" + "---|" * (len(sets) + len(synth_sets)),
    ]
    for name, row in excess["in_sample"].items():
        lines.append(
            f"| {name} | "
            + " | ".join(f"{row['image_auroc'][s]:.3f}" for s in sets)
            + " | "
            + " | ".join(f"{row['synthetic'][s]:.3f}" for s in synth_sets)
            + " |"
        )
    return lines


def operating_table(first: str, points: dict[str, dict]) -> list[str]:
    """Rows of test-normal FPR and recall under each calibration tail, one set a row."""
    tails = [t for t in TAILS if all(t in op for op in points.values())]  # older dumps
    named = {t: f"{t} (default)" if t == DEFAULT_TAIL else t for t in tails}
    lines = [
        f"| {first} | calibration normals | test normals | "
        + " | ".join(f"{named[t]}: test-normal FPR | recall" for t in tails)
        + " | sens @ 95 % spec |",
        "|---|---|---|" + "---|---|" * len(tails) + "---|",
    ]
    for name, op in points.items():
        cells = " | ".join(f"{op[t]['test_normal_fpr']:.1%} | {op[t]['recall']:.1%}" for t in tails)
        lines.append(
            f"| {name} | {op['n_calibration_normals']} | {op['n_test_normals']} | {cells} | "
            f"{op['sens_at_95_spec']:.3f} |"
        )
    return lines


def load_dumps(out: Path) -> dict[str, dict]:
    dumps = {}
    for path in sorted((out / "views").glob("*.json")):
        data = json.loads(path.read_text())
        dumps[path.stem] = {
            group: {k: np.asarray(v, dtype=float) for k, v in data[group].items()}
            for group in ("val", "synthetic", "test", "calibration", "adaptation")
            if group in data
        }
    return dumps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    dumps = load_dumps(args.out)
    if len(dumps) < 2:
        parser.error(f"need the view dumps of at least 2 sets under {args.out / 'views'}")
    results = json.loads((args.out / "results.json").read_text())["sets"]
    floors = {name: floor_of(results[name]) for name in dumps}
    result = loso(dumps, floors)
    result["excess"] = excess_loso(dumps)
    write(result, args.out)
    print(f"wrote {args.out / 'loso.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
