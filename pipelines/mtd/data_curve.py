"""How many normal images are needed: MTD image AUROC with 10, 25, 50 and 100 % of train_good.

    python pipelines/mtd/data_curve.py [--steps 300]

Each point trains the pixel model (``model="pixel"``, the MTD default when this curve
was first measured; the feature model's training is not counted in optimizer steps of
images) on a seeded subset of train_good for the same number of optimizer steps (so
every point gets the same compute, whatever else runs on the machine; early stopping
off), and evaluates on the whole test set with the model's default scoring and its
max-score variant. Writes
reports/mtd/data_curve.{md,json,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "pipelines"))

from common import machine, variant_name  # noqa: E402

from anomalyvae.data import split_file_samples  # noqa: E402
from anomalyvae.detector import VAEAnomalyDetector  # noqa: E402
from anomalyvae.imaging.batch import read_images  # noqa: E402
from anomalyvae.metrics import image_metrics  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "mtd" / "split.json"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "mtd")
    parser.add_argument("--steps", type=int, default=300, help="Optimizer steps per point.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0])
    args = parser.parse_args()
    train = split_file_samples(args.data, "train")
    test = split_file_samples(args.data, "test")
    labels = np.array([s.label for s in test])
    rows = []
    for fraction in args.fractions:
        count = max(4, int(round(fraction * len(train))))
        chosen = sorted(np.random.default_rng(0).permutation(len(train))[:count])
        probe = VAEAnomalyDetector(model="pixel")
        n_fit = count - len(probe.split_indices(count)[0])  # images left after the hold-out
        epochs = max(1, -(-args.steps * args.batch_size // n_fit))
        detector = VAEAnomalyDetector(
            model="pixel",
            epochs=epochs,
            patience=epochs,
            batch_size=args.batch_size,
            target_fpr=0.05,
            progress=False,
        )
        detector.fit([train[i].path for i in chosen])
        images, _, _ = read_images([s.path for s in test], detector.preprocessing_)
        row = {
            "fraction": fraction,
            "n_normal_images": count,
            "epochs": detector.training_summary_["epochs_run"],
        }
        default = detector.scoring_
        for score_kind in ("topk_mean", "max"):
            detector.scoring_ = dataclasses.replace(default, score_kind=score_kind)
            row[f"image_auroc_{score_kind}"] = image_metrics(
                labels, detector.anomaly_score(images)
            )["image_auroc"]
        row["scoring"] = variant_name(default)
        rows.append(row)
        print(row, flush=True)
    (args.out / "data_curve.json").write_text(
        json.dumps(
            {
                "machine": machine(),
                "steps": args.steps,
                "batch_size": args.batch_size,
                "rows": rows,
            },
            indent=2,
        )
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    name = rows[0]["scoring"].split("/")[0]
    for key in ("image_auroc_topk_mean", "image_auroc_max"):
        ax.plot(
            [r["n_normal_images"] for r in rows],
            [r[key] for r in rows],
            "o-",
            label=f"{name}/{key.replace('image_auroc_', '')}",
        )
    ax.set(
        xlabel="normal training images",
        ylabel="image AUROC",
        xscale="log",
        title=f"MTD, {args.steps} optimizer steps each",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "data_curve.png", dpi=120)
    plt.close(fig)
    lines = [
        "# MTD: image AUROC against the number of normal training images",
        "",
        "Produced by `python pipelines/mtd/data_curve.py`; every number comes from that run.",
        f"Machine: {machine()}. Each point: a seeded subset of train_good, the pixel model "
        f"(`--model pixel`) trained for {args.steps} optimizer steps of {args.batch_size} "
        "images (the same compute for every point; early stopping off), the full test set. "
        "The pixel checkpoint of the other MTD pipelines (runs/mtd/pixel.pt) had about "
        "twice as many steps (its 15-minute budget).",
        "",
        f"| share of train_good | normal images | epochs | AUROC {name}/topk_mean | "
        f"AUROC {name}/max |",
        "|---|---|---|---|---|",
        *[
            f"| {100 * r['fraction']:.0f} % | {r['n_normal_images']} | {r['epochs']} | "
            f"{r['image_auroc_topk_mean']:.3f} | {r['image_auroc_max']:.3f} |"
            for r in rows
        ],
        "",
        "![data curve](data_curve.png)",
        "",
    ]
    (args.out / "data_curve.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
