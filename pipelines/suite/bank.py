"""How small can the memory bank be? The suite's trained models with the first k bank rows.

    python pipelines/suite/bank.py                  # every set the suite trained
    python pipelines/suite/bank.py --smoke          # tiny synthetic model (CI)

The bank is a greedy k-center coreset stored in selection order
(:func:`anomalyvae.models.feature_vae.coreset_indices`), so its first k rows are exactly
the bank a model trained with ``bank_size=k`` would hold. For each set the suite trained
with the feature model (``runs/suite/<set>/model.pt``) and each bank size, the model keeps
those rows, its fusion constants (the bank distance's among them) are refitted on the
held-out normals of its own training split, and ``evaluate`` scores the test set. The
reference is the full bank under the same protocol (constants from the held-out normals
only), so a difference is the bank's alone. Also written: the scoring graph's FLOPs per
image at each size. Results: reports/suite/bank.md and bank.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "pipelines"))
sys.path.insert(0, str(ROOT / "pipelines" / "suite"))

from common import machine, shown  # noqa: E402
from run import DEFAULT_DATA, discover_sets  # noqa: E402

from anomalyvae.data import discover  # noqa: E402
from anomalyvae.detector import VAEAnomalyDetector  # noqa: E402
from anomalyvae.evaluation import evaluate_on  # noqa: E402
from anomalyvae.models.maps import ScoringGraph  # noqa: E402

SIZES = (8192, 4096, 2048, 1024)
#: A smaller bank is kept when image and pixel AUROC stay within this of the full bank.
TOLERANCE = 0.005


def with_bank(detector: VAEAnomalyDetector, size: int) -> VAEAnomalyDetector:
    """The detector with the first ``size`` rows of its bank (its own coreset order)."""
    model = detector.model_
    model.config = dataclasses.replace(model.config, bank_size=size)
    model.bank = model.bank[:size].clone()
    return detector


def gflops(detector: VAEAnomalyDetector) -> float:
    spec = detector.preprocessing_
    graph = ScoringGraph(detector.model_.eval(), detector.scoring_, None).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        graph(torch.rand(1, spec.channels, spec.height, spec.width))
    return counter.get_total_flops() / 1e9


def measure(checkpoint: Path, source: Path, sizes: tuple[int, ...]) -> dict:
    train = [s.path for s in discover(source, "train") if s.label == 0]
    out = {}
    for size in sizes:
        detector = VAEAnomalyDetector.load(checkpoint, progress=False)
        full = detector.model_.config.bank_size
        if size > full:
            continue
        val_index, _ = detector.split_indices(len(train))
        with_bank(detector, size).fit_fusion([train[i] for i in val_index])
        overall = evaluate_on(detector, source, progress=False).table.loc["overall"]
        out[size] = {
            "image_auroc": float(overall["image_auroc"]),
            "pixel_auroc": float(overall.get("pixel_auroc", float("nan"))),
            "aupro": float(overall.get("aupro", float("nan"))),
            "gflops_per_image": gflops(detector),
        }
        print(f"  bank {size}: {out[size]}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "suite")
    parser.add_argument("--out", type=Path, default=None, help="[default: reports/suite]")
    parser.add_argument("--smoke", action="store_true", help="tiny synthetic feature model")
    args = parser.parse_args()
    sizes = SIZES
    if args.smoke:
        from anomalyvae.data import make_synthetic_dataset

        tmp = Path(tempfile.mkdtemp())
        data = make_synthetic_dataset(
            tmp / "data", n_train=24, n_test_good=6, n_test_defect=6, size=96
        )
        model = tmp / "runs" / "synthetic" / "model.pt"
        model.parent.mkdir(parents=True)
        paths = [s.path for s in discover(data, "train")]
        detector = VAEAnomalyDetector(model="feature", epochs=1, progress=False)
        detector.fit(paths).save(model)
        sets, args.runs = {"synthetic": data}, tmp / "runs"
        args.out = args.out or tmp / "report"
        sizes = (detector.model_.config.bank_size, 64)
    else:
        sets = discover_sets(args.data)
    args.out = args.out or ROOT / "reports" / "suite"
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, source in sets.items():
        checkpoint = args.runs / name / "model.pt"
        if not checkpoint.is_file():
            print(f"[{name}] no trained model at {shown(checkpoint)}; skipped", flush=True)
            continue
        probe = VAEAnomalyDetector.load(checkpoint, progress=False)
        if not getattr(probe.model_.config, "bank_size", 0):
            print(f"[{name}] the {probe.family_} model has no memory bank; skipped", flush=True)
            continue
        print(f"[{name}] {shown(checkpoint)}", flush=True)
        results[name] = measure(checkpoint, source, sizes)
    (args.out / "bank.json").write_text(
        json.dumps({"machine": machine(), "tolerance": TOLERANCE, "sets": results}, indent=2)
    )
    lines = [
        "# Memory bank size: quality against cost" + (" (smoke run)" if args.smoke else ""),
        "",
        "Produced by `python pipelines/suite/bank.py` on the suite's trained models "
        f"({machine()}). Each model keeps the first k rows of its bank (its coreset order: "
        "the bank training with `bank_size=k` builds); fusion constants refitted on the "
        "held-out normals at every size, the full bank included, so differences are the "
        f"bank's. A size qualifies when image and pixel AUROC stay within {TOLERANCE} of "
        "the full bank on every set.",
        "",
        "| set | bank | image AUROC | Δ | pixel AUROC | Δ | AUPRO | GFLOP / image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    worst: dict[int, float] = {}
    for name, rows in results.items():
        ref = rows[max(rows, key=int)]
        for size, r in rows.items():
            d_img = r["image_auroc"] - ref["image_auroc"]
            d_pix = r["pixel_auroc"] - ref["pixel_auroc"]
            drops = [-d for d in (d_img, d_pix) if d == d]  # NaN (no masks) left out
            worst[int(size)] = max(worst.get(int(size), 0.0), *drops)
            lines.append(
                f"| {name} | {size} | {r['image_auroc']:.3f} | {d_img:+.3f} | "
                f"{r['pixel_auroc']:.3f} | {d_pix:+.3f} | {r['aupro']:.3f} | "
                f"{r['gflops_per_image']:.2f} |"
            )
    qualified = [s for s in sorted(worst) if worst[s] <= TOLERANCE]
    lines += [
        "",
        "Largest drop of image or pixel AUROC over the sets, by bank size: "
        + ", ".join(f"{s}: {worst[s]:.3f}" for s in sorted(worst))
        + ".",
        f"Smallest bank within {TOLERANCE} on every set: "
        + (f"**{min(qualified)}**." if qualified else "none."),
        "",
    ]
    (args.out / "bank.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
