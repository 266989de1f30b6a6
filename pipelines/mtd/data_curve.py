"""How many normal images are needed: MTD image AUROC with 10, 25, 50 and 100 % of train_good.

    python pipelines/mtd/data_curve.py [--time-budget 150]

Each point trains the product's default detector on a seeded subset of train_good with the
same wall-time budget (short, so the curve fits in minutes; the full-budget model is in
README.md), and evaluates on the whole test set. Writes reports/mtd/data_curve.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "pipelines"))

from common import machine  # noqa: E402

from anomalyvae.data import split_file_samples  # noqa: E402
from anomalyvae.detector import VAEAnomalyDetector  # noqa: E402
from anomalyvae.io import read_images  # noqa: E402
from anomalyvae.maps import ScoringConfig  # noqa: E402
from anomalyvae.metrics import image_metrics  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "mtd" / "split.json"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "mtd")
    parser.add_argument("--time-budget", type=float, default=150.0)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0])
    args = parser.parse_args()
    train = split_file_samples(args.data, "train")
    test = split_file_samples(args.data, "test")
    labels = np.array([s.label for s in test])
    rows = []
    for fraction in args.fractions:
        count = max(4, int(round(fraction * len(train))))
        chosen = sorted(np.random.default_rng(0).permutation(len(train))[:count])
        detector = VAEAnomalyDetector(
            time_budget_s=args.time_budget, target_fpr=0.05, progress=False
        )
        detector.fit([train[i].path for i in chosen])
        images, _, _ = read_images([s.path for s in test], detector.preprocessing_)
        row = {
            "fraction": fraction,
            "n_normal_images": count,
            "epochs": detector.training_summary_["epochs_run"],
        }
        for map_kind, score_kind in (("nll", "topk_mean"), ("nll", "max")):
            detector.scoring_ = ScoringConfig(map_kind, score_kind)
            row[f"image_auroc_{map_kind}_{score_kind}"] = image_metrics(
                labels, detector.anomaly_score(images)
            )["image_auroc"]
        rows.append(row)
        print(row, flush=True)
    (args.out / "data_curve.json").write_text(
        json.dumps(
            {"machine": machine(), "time_budget_s": args.time_budget, "rows": rows}, indent=2
        )
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key in ("image_auroc_nll_topk_mean", "image_auroc_nll_max"):
        ax.plot(
            [r["n_normal_images"] for r in rows],
            [r[key] for r in rows],
            "o-",
            label=key.replace("image_auroc_", ""),
        )
    ax.set(
        xlabel="normal training images",
        ylabel="image AUROC",
        xscale="log",
        title=f"MTD, {args.time_budget:.0f} s training each",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "data_curve.png", dpi=120)
    plt.close(fig)
    lines = [
        "# MTD: image AUROC against the number of normal training images",
        "",
        "Produced by `python pipelines/mtd/data_curve.py`; every number comes from that run.",
        f"Machine: {machine()}. Each point: a seeded subset of train_good, the default "
        f"detector, {args.time_budget:.0f} s of training, the full test set.",
        "",
        "| share of train_good | normal images | epochs | AUROC nll/topk_mean | AUROC nll/max |",
        "|---|---|---|---|---|",
        *[
            f"| {100 * r['fraction']:.0f} % | {r['n_normal_images']} | {r['epochs']} | "
            f"{r['image_auroc_nll_topk_mean']:.3f} | {r['image_auroc_nll_max']:.3f} |"
            for r in rows
        ],
        "",
        "![data curve](data_curve.png)",
        "",
    ]
    (args.out / "data_curve.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
