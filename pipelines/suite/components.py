"""How many principal components the image view keeps: a fixed 50, or the count whose
probabilistic PCA best predicts held-out normals, chosen per set without labels.

    python pipelines/suite/components.py [--runs runs/suite] [--out reports/suite]
    python pipelines/suite/components.py --smoke

For every suite set with a feature model (``--runs``, as ``run.py --work`` leaves them):
the training normals, pooled as the model's image view pools them, give a PCA of each
rule's component count (the product's :func:`choose_image_components` for the chosen
one). Each rule's image view (residual map, smoothed, top-k mean) and its image-share
weight (from the held-out normals' unexplained variance) are fused with the model's own
knn and global views, every view a robust z-score against the held-out normals alone,
so that both rules are measured the same way whichever one trained the model. The
choice between the rules is made leave-one-set-out (``folds.py``). Writes
``components.md`` and ``components.json``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import machine  # noqa: E402
from folds import choose_leave_one_out, fold_table  # noqa: E402
from reductions import FUSED, batches, feature_models, pooled, reduced, z_of  # noqa: E402
from trained import options  # noqa: E402

from anomalyvae.data import discover  # noqa: E402
from anomalyvae.detector import VAEAnomalyDetector  # noqa: E402
from anomalyvae.models.feature_training import (  # noqa: E402
    IMAGE_COMPONENT_CHOICES,
    choose_image_components,
)
from anomalyvae.models.feature_vae import IMAGE_SIGMA, IMAGE_TOP_FRACTION  # noqa: E402
from anomalyvae.models.fusion import VIEW_NAMES, share_weights  # noqa: E402

FIXED = "50 components"
CHOSEN = "held-out likelihood"


def pooled_set(detector: VAEAnomalyDetector, paths: list[Path]) -> np.ndarray:
    pool = detector.model_.config.image_pool
    return np.concatenate([pooled(x, pool) for x in batches(detector, paths)])


def rule_views(
    train: np.ndarray, val: np.ndarray, test: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """The image view of the held-out and test images off a k-component PCA of ``train``,
    and the held-out normals' unexplained share (the image-share fusion's signal)."""
    flat = train.reshape(len(train), -1).astype(np.float64)
    k = max(1, min(k, len(flat) - 1, flat.shape[1]))
    pca = PCA(k, random_state=0).fit(flat)

    def residual(images: np.ndarray) -> tuple[np.ndarray, float, float]:
        centred = images.reshape(len(images), -1).astype(np.float64) - pca.mean_
        off = centred - (centred @ pca.components_.T) @ pca.components_
        squared = (off**2).reshape(images.shape).mean(1, keepdims=True)
        return reduced(squared, IMAGE_SIGMA, IMAGE_TOP_FRACTION), (off**2).sum(), (centred**2).sum()

    val_view, val_off, val_spread = residual(val)
    test_view, _, _ = residual(test)
    return val_view, test_view, float(val_off / max(val_spread, 1e-300))


def measure(detector: VAEAnomalyDetector, source: Path) -> dict:
    config = detector.model_.config
    train = [s.path for s in discover(source, "train") if s.label == 0]
    val_index, train_index = detector.split_indices(len(train))
    test = discover(source, "test")
    labels = np.array([s.label for s in test])
    train_pooled = pooled_set(detector, [train[i] for i in train_index])
    val_paths = [train[i] for i in val_index]
    val_pooled = pooled_set(detector, val_paths)
    test_pooled = pooled_set(detector, [s.path for s in test])
    started = time.monotonic()
    chosen, likelihoods = choose_image_components(
        train_pooled.reshape(len(train_pooled), -1).astype(np.float64)
    )
    choice_seconds = time.monotonic() - started
    val_views = detector.view_scores(val_paths)
    test_views = detector.view_scores([s.path for s in test])
    rules = {}
    for rule, k in ((FIXED, 50), (CHOSEN, chosen)):
        val_image, test_image, unexplained = rule_views(train_pooled, val_pooled, test_pooled, k)
        weights = share_weights(unexplained, index=config.fused_index)
        z = {name: z_of(val_views[name], test_views[name]) for name in FUSED if name != "image"}
        z["image"] = z_of(val_image, test_image)
        fused = sum(weights[VIEW_NAMES.index(n)] * z[n] for n in FUSED)
        fused = fused + config.local_excess.of(z)  # the product's term (its knn view)
        rules[rule] = {
            "components": int(min(k, len(train_pooled) - 1)),
            "alone": float(roc_auc_score(labels, test_image)),
            "fused": float(roc_auc_score(labels, fused)),
            "unexplained": unexplained,
        }
    return {
        "n_train": len(train_index),
        "n_val": len(val_index),
        "n_test": len(test),
        "image_dim": int(config.image_dim),
        "likelihoods": {str(k): v for k, v in likelihoods.items()},
        "choice_seconds": choice_seconds,
        "model_components": int(config.image_components),
        "rules": rules,
    }


def write(results: dict, out: Path, smoke: bool) -> None:
    gain = {
        s: {rule: r["rules"][rule]["fused"] - r["rules"][FIXED]["fused"] for rule in r["rules"]}
        for s, r in results.items()
    }
    decision = choose_leave_one_out(gain, FIXED) if results else {}
    payload = {
        "machine": machine(),
        "choices": list(IMAGE_COMPONENT_CHOICES),
        "sets": results,
        "decision": decision,
    }
    (out / "components.json").write_text(json.dumps(payload, indent=1))
    lines = [
        "# Image view: how many principal components",
        "",
        "Regenerate: `python pipelines/suite/components.py` (on the models `run.py --work` "
        f"left; {machine()}).{' **Smoke run on synthetic data.**' if smoke else ''}",
        "",
        f"`{FIXED}`: the PCA of the pooled training normals keeps 50 components (or one "
        f"fewer than the images). `{CHOSEN}`: the count among "
        f"{', '.join(map(str, IMAGE_COMPONENT_CHOICES))} whose probabilistic PCA gives "
        "the highest mean log-likelihood to held-out training normals (5 folds; "
        "`anomalyvae.models.feature_training.choose_image_components`; no label). Each "
        "rule's image view and image-share weight are fused with the model's knn and global "
        "views, every z-score against the held-out normals alone, so both rules are "
        "measured alike whichever trained the model.",
        "",
        "| set | training normals | chosen k | 50: alone | 50: fused | 50: u | chosen: alone "
        "| chosen: fused | chosen: u | fused gain | choice s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        fixed, chosen = r["rules"][FIXED], r["rules"][CHOSEN]
        lines.append(
            f"| {name} | {r['n_train']} | {chosen['components']} | {fixed['alone']:.3f} | "
            f"{fixed['fused']:.3f} | {fixed['unexplained']:.3f} | {chosen['alone']:.3f} | "
            f"{chosen['fused']:.3f} | {chosen['unexplained']:.3f} | "
            f"{chosen['fused'] - fixed['fused']:+.3f} | {r['choice_seconds']:.2f} |"
        )
    lines += ["", "Held-out log-likelihood per candidate (mean over folds, nats per image):", ""]
    for name, r in results.items():
        shown = ", ".join(f"{k}: {v:.0f}" for k, v in r["likelihoods"].items())
        lines.append(f"- {name}: {shown or 'too few normals to compare'}")
    if decision:
        lines += ["", *fold_table(decision)]
        verdict = "**adopted**" if decision["adopt"] else "**not adopted**"
        lines += [
            "",
            f"Majority choice: {decision['majority']}; held-out mean gain of the fold choices "
            f"{decision['held_mean_gain']:+.3f} fused AUROC: {verdict} (a rule needs a "
            "majority of the folds and a positive held-out mean).",
        ]
    (out / "components.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'components.md'}{' (smoke run)' if smoke else ''}")


def main() -> None:
    args = options(__doc__)
    results = {name: measure(detector, source) for name, source, detector in feature_models(args)}
    write(results, args.out, args.smoke)


if __name__ == "__main__":
    main()
