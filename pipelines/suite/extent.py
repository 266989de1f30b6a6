"""Should the fused score's local excess read the bank distances over a defect's extent?

    python pipelines/suite/extent.py            # the values reductions.py kept per model
    python pipelines/suite/extent.py --smoke    # tiny synthetic model (CI)

The product's fused score is the image-share weighted mean of the robust z-scores of
``knn``, ``global`` and ``image``, plus a local excess,
``LOCAL_EXCESS_WEIGHT * max(z_knn - LOCAL_EXCESS_Z, 0)``: a small defect that only the
memory bank sees still lifts the score where the image view carries the weight. The
``knn`` view is the mean of an image's largest 1 % of location distances, wherever they
lie. reductions.py's "knn extent" variants average the distances over squares or lines
first and keep the largest average: evidence integrated along a thin crack, where scattered
specks of noise average away.

Here each extent variant is tried in two places, at every weight and level of a grid:

- **excess**: the local excess reads the variant, the weighted mean keeps the product's
  ``knn`` view (where the bank carries the weight, nothing it already does changes);
- **replace**: the variant stands in for the ``knn`` view in the weighted mean and in the
  excess (reductions.py's "knn extent" family, at the product's excess only).

Every candidate is scored on the values reductions.py kept beside each suite model
(``runs/suite/<set>/reduction_values.npz``: the held-out normals' and the test images'
views; constants from the held-out normals only), then leave-one-set-out
(``folds.choose_leave_one_out``): for each set, the candidate with the best mean gain
over the product's setting on the *other* sets is chosen and scored on the one left out.
Results: reports/suite/extent.md and extent.json. No model changes: adopting a candidate
is a change to the product, measured by the suite's rerun.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "pipelines"))
sys.path.insert(0, str(ROOT / "pipelines" / "suite"))

from common import machine  # noqa: E402
from folds import choose_leave_one_out, fold_table  # noqa: E402
from reductions import FUSED, VALUES_FILE, knn_key, measure, z_of  # noqa: E402
from trained import options  # noqa: E402

from anomalyvae.models.bank import KNN_TOP_FRACTION  # noqa: E402
from anomalyvae.models.fusion import (  # noqa: E402
    LOCAL_EXCESS_WEIGHT,
    LOCAL_EXCESS_Z,
    VIEW_NAMES,
    share_weights,
)

#: The reductions.py family whose variants the excess reads.
FAMILY = "knn extent"
#: The excess grid: weights and the robust z above which a view adds.
WEIGHTS = (0.1, 0.3, 1.0, 3.0)
LEVELS = (1.0, 2.0, 3.0, 4.0)
#: Candidates shown in the in-sample table (the best by mean gain; every one is in the JSON).
SHOWN = 25


def setting(mode: str, variant: str, weight: float, level: float) -> str:
    return f"{mode}: {variant}; w {weight:g}, z {level:g}"


def default_setting() -> str:
    return setting("excess", knn_key(KNN_TOP_FRACTION), LOCAL_EXCESS_WEIGHT, LOCAL_EXCESS_Z)


def candidates(values: dict[str, np.ndarray]) -> dict[str, float]:
    """Image AUROC of every candidate on one set's kept values (reductions.py's keys)."""
    labels = values["labels"]
    share = share_weights(
        float(values["unexplained"]), index=tuple(VIEW_NAMES.index(n) for n in FUSED)
    )
    weights = {name: share[VIEW_NAMES.index(name)] for name in FUSED}
    z = {n: z_of(values[f"val/{n}"], values[f"test/{n}"]) for n in FUSED}
    kept = sum(weights[n] * z[n] for n in FUSED)  # the product's weighted mean
    variants = sorted(k.split("/", 2)[2] for k in values if k.startswith(f"test/{FAMILY}/"))
    out = {"no excess": float(roc_auc_score(labels, kept))}
    for variant in variants:
        zv = z_of(values[f"val/{FAMILY}/{variant}"], values[f"test/{FAMILY}/{variant}"])
        replaced = kept + weights["knn"] * (zv - z["knn"])
        for weight in WEIGHTS:
            for level in LEVELS:
                excess = weight * np.maximum(zv - level, 0.0)
                for mode, base in (("excess", kept), ("replace", replaced)):
                    score = base + excess
                    out[setting(mode, variant, weight, level)] = float(roc_auc_score(labels, score))
    return out


def kind_of(key: str) -> str:
    """The candidate's mode and the shape its variant averages over (a family of settings)."""
    mode, _, rest = key.partition(": ")
    variant = rest.rsplit("; ", 1)[0]
    if "mean z" in variant or variant.startswith("top"):
        shape = "top share"
    elif "squares" in variant:
        shape = "squares"
    elif "map's longer side" in variant:
        shape = "lines in proportion to the map"
    else:
        shape = "lines of fixed length"
    return f"{mode}, {shape}"


def family_folds(gain: dict[str, dict[str, float]], default: str) -> dict[str, dict]:
    """The leave-one-set-out choice inside each family of candidates (:func:`kind_of`): a
    smaller grid overfits the other sets less; every family is shown, none picked here."""
    names = next(iter(gain.values()))
    kinds = sorted({kind_of(k) for k in names if k not in (default, "no excess")})
    return {
        kind: choose_leave_one_out(
            {
                s: {
                    k: g
                    for k, g in rows.items()
                    if k == default or (k != "no excess" and kind_of(k) == kind)
                }
                for s, rows in gain.items()
            },
            default,
        )
        for kind in kinds
    }


def kept_values(args) -> dict[str, dict[str, np.ndarray]]:
    """Each set's kept values: under ``--runs`` (the suite's), or measured now (smoke)."""
    found = {}
    for name, source in args.sets_found.items():
        path = args.runs / name / VALUES_FILE
        if args.smoke and not path.is_file():
            from anomalyvae.detector import VAEAnomalyDetector

            detector = VAEAnomalyDetector.load(args.runs / name / "model.pt", progress=False)
            np.savez_compressed(path, **measure(detector, source)["values"])
        if not path.is_file():
            print(f"[{name}] no {VALUES_FILE}; run pipelines/suite/reductions.py", flush=True)
            continue
        with np.load(path) as stored:
            found[name] = {k: stored[k] for k in stored.files}
    return found


def write(results: dict[str, dict[str, float]], out: Path, smoke: bool) -> None:
    default = default_setting()
    sets = list(results)
    gain = {s: {k: v - results[s][default] for k, v in rows.items()} for s, rows in results.items()}
    decision = choose_leave_one_out(gain, default) if results else None
    families = family_folds(gain, default) if results else {}
    (out / "extent.json").write_text(
        json.dumps(
            {"machine": machine(), "sets": results, "loso": decision, "families": families},
            indent=2,
        )
    )
    lines = [
        "# The local excess over a defect's extent: chosen leave-one-set-out"
        + (" (smoke run)" if smoke else ""),
        "",
        f"Produced by `python pipelines/suite/extent.py` ({machine()}) from the values "
        "`pipelines/suite/reductions.py` kept beside each suite model. Image AUROC of the "
        "fused score with the local excess reading a `knn extent` variant (`excess`: the "
        "weighted mean keeps the product's knn view; `replace`: the variant stands in for it "
        "there too), at weight w and level z: `w * max(z_variant - z, 0)`. The product: "
        f"`{default}`. Constants from the held-out normals only.",
        "",
    ]
    if not results:
        (out / "extent.md").write_text("\n".join([*lines, "No set had kept values.", ""]))
        return
    ranked = sorted(
        results[sets[0]], key=lambda k: (-np.mean([gain[s].get(k, -1) for s in sets]), k)
    )
    shown_rows = [default, "no excess", *(k for k in ranked if k not in (default, "no excess"))]
    lines += ["| setting | " + " | ".join(sets) + " | mean gain |", "|---|" + "---|" * len(sets)]
    lines[-1] += "---|"
    for key in shown_rows[: SHOWN + 2]:
        mark = " (product)" if key == default else ""
        cells = " | ".join(f"{results[s][key]:.3f}" for s in sets)
        mean = np.mean([gain[s][key] for s in sets])
        lines.append(f"| {key}{mark} | {cells} | {mean:+.3f} |")
    lines += [
        "",
        f"The {SHOWN} best of {len(ranked)} candidates by mean gain over the product's "
        "setting in-sample; every one is in extent.json.",
        "",
        *fold_table(decision, held_score=lambda held, chosen: results[held][chosen]),
    ]
    picked = [fold["chosen"] for fold in decision["folds"].values()]
    verdict = (
        "**qualifies as the default** (to adopt it: the product's fused score and its "
        "cross-fitted calibration read the variant, retrain, rerun the suite; this script "
        "changes nothing)"
        if decision["adopt"]
        else "**the product's setting stays**"
    )
    lines += [
        "",
        f"Majority choice: {decision['majority']} ({picked.count(decision['majority'])} of "
        f"{len(picked)} folds); held-out mean gain of the fold choices "
        f"{decision['held_mean_gain']:+.3f} image AUROC: {verdict}.",
        "",
        "The same choice inside each family of candidates (one mode, one shape; the "
        "product's setting is a candidate in each). A family is a smaller grid for the "
        "other sets to overfit, but choosing the family after seeing this table is itself "
        "a choice made on every set: these rows show how stable the choice is, they adopt "
        "nothing.",
        "",
        "| family | candidates | fold choices (left out: chosen, held-out gain) | "
        "majority | held-out mean gain |",
        "|---|---|---|---|---|",
    ]
    for kind, fold in families.items():
        size = sum(kind_of(k) == kind for k in results[sets[0]] if k not in (default, "no excess"))
        chosen = "; ".join(
            f"{held}: {f['chosen'].split(': ', 1)[-1]} ({f['held_gain']:+.3f})"
            for held, f in fold["folds"].items()
        )
        picks = [f["chosen"] for f in fold["folds"].values()]
        majority = fold["majority"].split(": ", 1)[-1]
        lines.append(
            f"| {kind} | {size} | {chosen} | {majority} ({picks.count(fold['majority'])} of "
            f"{len(picks)} folds) | {fold['held_mean_gain']:+.3f} |"
        )
    lines.append("")
    (out / "extent.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    args = options(__doc__)
    results = {name: candidates(values) for name, values in kept_values(args).items()}
    write(results, args.out, args.smoke)


if __name__ == "__main__":
    main()
