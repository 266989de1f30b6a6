"""MTD benchmark: train on the fixed split's normal tiles, calibrate, evaluate, report.

    python pipelines/mtd/run.py [--data ../shared/datasets/mtd/split.json] [--out reports/mtd]
    python pipelines/mtd/run.py --smoke    # tiny synthetic data, one epoch (CI)

Trains on train_good only (calibration normals are split off train_good by the detector,
never taken from the test set), evaluates every map and score kind and a PCA baseline on
the test set, and writes README.md, metrics.json and figures to --out. The checkpoint goes
to runs/mtd/model.pt for the ONNX and scan benchmarks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "pipelines"))

from common import (  # noqa: E402
    Timer,
    load_test,
    machine,
    markdown_table,
    overview,
    own_map_family,
    pca_baseline,
    plot_examples,
    plot_histogram,
    plot_roc,
    score_every_kind,
    shown,
    tables,
    variant_name,
    write_json,
)

from anomalyvae.data import discover, make_synthetic_dataset  # noqa: E402
from anomalyvae.detector import VAEAnomalyDetector  # noqa: E402
from anomalyvae.imaging.batch import read_images  # noqa: E402
from anomalyvae.models.vae import count_parameters  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "mtd" / "split.json"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "mtd")
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "runs" / "mtd" / "model.pt")
    parser.add_argument("--time-budget", type=float, default=900.0)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="Evaluate the existing --checkpoint instead of training it.",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny synthetic data, one epoch")
    args = parser.parse_args()
    if args.smoke:  # everything on a tiny synthetic set, written to a temp folder
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="anomalyvae-mtd-smoke-"))
        args.data = make_synthetic_dataset(tmp / "data", 40, 8, 8, size=64)
        args.out, args.checkpoint, args.epochs, args.reuse = tmp / "report", tmp / "m.pt", 1, False
    args.out.mkdir(parents=True, exist_ok=True)
    target_fpr, mask_threshold = 0.01, 0.5  # MTD masks have soft edges: >= 128 is defect

    train = discover(args.data, "train")
    test = discover(args.data, "test")
    if args.reuse:
        detector = VAEAnomalyDetector.load(args.checkpoint)
        # the same seeded split fit() made (every MTD file is readable)
        val_index, _ = detector.split_indices(len(train))
        detector.validation_files_ = [str(train[i].path) for i in val_index]
    else:
        detector = VAEAnomalyDetector(
            epochs=args.epochs,
            time_budget_s=args.time_budget,
            seed=args.seed,
            target_fpr=target_fpr,
            checkpoint_path=args.checkpoint,
        ).fit([s.path for s in train])
    val_files = detector.validation_files_
    val_set = set(val_files)
    train_files = [str(s.path) for s in train if s.path.as_posix() not in val_set]

    images, labels, types, masks, has_mask = load_test(test, detector, mask_threshold)
    spec = detector.preprocessing_
    train_images, _, _ = read_images(train_files, spec)
    val_images, _, _ = read_images(val_files, spec)
    with Timer() as score_timer:
        results = score_every_kind(detector, images, val_files, target_fpr, train_images)
    results.append(pca_baseline(train_images, val_images, images, target_fpr=target_fpr))

    all_tables = tables(results, labels, types, masks, has_mask)
    summary = overview(all_tables)
    default_name = variant_name(detector.scoring_, own_map_family(detector))
    best_name = summary["image_auroc"].idxmax()

    plot_roc(results, labels, args.out / "roc.png")
    by_name = {r.name: r for r in results}
    plot_histogram(by_name[default_name], labels, types, args.out / "histogram_default.png")
    plot_examples(by_name[default_name], images, masks, labels, args.out / "examples_default.png")
    if best_name != default_name and by_name[best_name].maps is not None:
        plot_examples(by_name[best_name], images, masks, labels, args.out / "examples_best.png")

    settings = {
        **{
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in detector.get_params().items()
            if k not in ("checkpoint_path", "progress")
        },
        "preprocessing": spec.to_dict(),
        "mask_threshold": mask_threshold,
        "n_parameters": count_parameters(detector.model_),
    }
    metrics = {
        "machine": machine(),
        "data": shown(args.data),
        "n_train": detector.data_summary_["n_train"],
        "n_val": detector.data_summary_["n_val"],
        "n_test": len(test),
        "training": dict(detector.training_summary_),
        "scoring_seconds_all_kinds": score_timer.seconds,
        "settings": settings,
        "default_method": default_name,
        "overall": {name: row.to_dict() for name, row in summary.iterrows()},
        "per_defect_type": {
            name: table.to_dict(orient="index") for name, table in all_tables.items()
        },
    }
    write_json(args.out / "metrics.json", metrics)

    fmt = lambda v: f"{v:.3f}"  # noqa: E731
    lines = [
        "# MTD benchmark (Magnetic Tile Defect)"
        + (" (smoke run: meaningless numbers)" if args.smoke else ""),
        "",
        f"Produced by `{' '.join(['python pipelines/mtd/run.py', *sys.argv[1:]])}`; every "
        "number below comes from that run. "
        "`python pipelines/mtd/all.py` regenerates the whole folder (with the experiment log "
        "and the data curve).",
        "Data: the fixed split `split.json` (train on `train_good` only; calibration normals "
        "are held out of `train_good` by the detector; test = `test_good` + all defects).",
        "Pixel metrics at model resolution; masks >= 128 are defect.",
        "",
        f"Machine: {machine()}",
        "",
        f"Training: {detector.data_summary_['n_train']} images "
        f"(+{detector.data_summary_['n_val']} held out), "
        f"{detector.training_summary_['epochs_run']} epochs in "
        f"{detector.training_summary_['elapsed_s']:.0f} s "
        f"(stopped: {detector.training_summary_['stopped_reason']}, best epoch "
        f"{detector.training_summary_['best_epoch']}).",
        "",
        f"Product default: **{default_name}**. Thresholds: 1 % target FPR on the held-out "
        "normals, per method. `z-` = the map standardized per pixel against the training "
        "normals (docs/maps.md).",
        "",
        "## All methods (overall)",
        "",
        markdown_table(summary, ".3f"),
        "",
        f"## Per defect type: default ({default_name})",
        "",
        markdown_table(all_tables[default_name].drop(columns=["threshold"], errors="ignore")),
        "",
        f"## Per defect type: best image AUROC ({best_name})",
        "",
        markdown_table(all_tables[best_name].drop(columns=["threshold"], errors="ignore")),
        "",
        "## Figures",
        "",
        "![ROC](roc.png)",
        "",
        "![Histogram](histogram_default.png)",
        "",
        "![Examples](examples_default.png)",
        "",
        "## Settings",
        "",
        "```json",
        __import__("json").dumps(settings, indent=2, default=str),
        "```",
    ]
    if (args.out / "examples_best.png").exists():
        lines.insert(lines.index("## Settings") - 1, "![Examples, best](examples_best.png)\n")
    (args.out / "README.md").write_text("\n".join(lines) + "\n")
    print(summary.to_string(float_format=fmt))
    print(f"Wrote {args.out}" + (" (smoke run)" if args.smoke else ""))


if __name__ == "__main__":
    main()
