"""How cheap can the memory bank's search be? The suite's models with fewer rows or directions.

    python pipelines/suite/bank.py                  # every set the suite trained
    python pipelines/suite/bank.py --smoke          # tiny synthetic model (CI)

The bank is a greedy k-center coreset stored in selection order
(:func:`anomalyvae.models.bank.coreset_indices`), so its first k rows are exactly
the bank a model trained with ``bank_size=k`` would hold. A bank projected onto its d
principal directions (:meth:`~anomalyvae.models.feature_vae.FeatureVAE.project_bank`, the
``bank_dim`` training setting) is exactly what training with ``bank_dim=d`` makes of the
same rows. For each set the suite trained with the feature model
(``runs/suite/<set>/model.pt``) and each variant (rows, directions), the model keeps
those rows in those directions, its fusion constants (the bank distance's among them)
are refitted on the held-out normals of its own training split, and ``evaluate`` scores
the test set. The reference is the full bank under the same protocol (constants from the
held-out normals only), so a difference is the bank's alone. Also written: the scoring
graph's FLOPs per image for each variant. Results: reports/suite/bank.md and bank.json.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "pipelines"))
sys.path.insert(0, str(ROOT / "pipelines" / "suite"))

from common import machine  # noqa: E402
from trained import options, trained_models  # noqa: E402

from anomalyvae.data import discover  # noqa: E402
from anomalyvae.detector import VAEAnomalyDetector  # noqa: E402
from anomalyvae.evaluation import evaluate_on  # noqa: E402
from anomalyvae.models.scoring import ScoringGraph  # noqa: E402

#: (bank rows, principal directions; 0 = every feature channel), the full bank first
VARIANTS = (
    (8192, 0),
    (4096, 0),
    (2048, 0),
    (1024, 0),
    (8192, 96),
    (8192, 64),
    (8192, 48),
    (8192, 32),
)
#: A cheaper bank is kept when image and pixel AUROC stay within this of the full bank.
TOLERANCE = 0.005


def with_bank(detector: VAEAnomalyDetector, size: int, dim: int = 0) -> VAEAnomalyDetector:
    """The detector with the first ``size`` rows of its bank (its own coreset order),
    projected onto their ``dim`` principal directions when ``dim`` is set."""
    model = detector.model_
    model.config = dataclasses.replace(model.config, bank_size=size)
    model.bank = model.bank[:size].clone()
    model.project_bank(dim)
    return detector


def label(size: int, dim: int) -> str:
    return f"{size}" if not dim else f"{size} x {dim}d"


def gflops(detector: VAEAnomalyDetector) -> float:
    spec = detector.preprocessing_
    graph = ScoringGraph(detector.model_.eval(), detector.scoring_, None).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        graph(torch.rand(1, spec.channels, spec.height, spec.width))
    return counter.get_total_flops() / 1e9


def measure(checkpoint: Path, source: Path, variants: tuple[tuple[int, int], ...]) -> dict:
    train = [s.path for s in discover(source, "train") if s.label == 0]
    out = {}
    for size, dim in variants:
        detector = VAEAnomalyDetector.load(checkpoint, progress=False)
        config = detector.model_.config
        if size > config.bank_size or dim >= config.feature_channels:
            continue
        val_index, _ = detector.split_indices(len(train))
        with_bank(detector, size, dim).fit_fusion([train[i] for i in val_index])
        overall = evaluate_on(detector, source, progress=False).table.loc["overall"]
        out[label(size, dim)] = {
            "bank_size": size,
            "bank_dim": dim,
            "image_auroc": float(overall["image_auroc"]),
            "pixel_auroc": float(overall.get("pixel_auroc", float("nan"))),
            "aupro": float(overall.get("aupro", float("nan"))),
            "gflops_per_image": gflops(detector),
        }
        print(f"  bank {label(size, dim)}: {out[label(size, dim)]}", flush=True)
    return out


def main() -> None:
    args = options(__doc__)
    results = {}
    for name, source, checkpoint, detector in trained_models(
        args, lambda c: bool(getattr(c, "bank_size", 0)), "memory bank"
    ):
        variants = VARIANTS
        if args.smoke:  # the tiny model's bank: itself, a few rows, a few directions
            full = detector.model_.config.bank_size
            variants = ((full, 0), (64, 0), (full, 16))
        results[name] = measure(checkpoint, source, variants)
    (args.out / "bank.json").write_text(
        json.dumps({"machine": machine(), "tolerance": TOLERANCE, "sets": results}, indent=2)
    )
    lines = [
        "# Memory bank size: quality against cost" + (" (smoke run)" if args.smoke else ""),
        "",
        "Produced by `python pipelines/suite/bank.py` on the suite's trained models "
        f"({machine()}). Each model keeps the first k rows of its bank (its coreset order: "
        "the bank training with `bank_size=k` builds); `k x dd`: those rows projected onto "
        "their d principal directions (training with `bank_dim=d`: norms exact, dot "
        "products in the subspace). Fusion constants refitted on the held-out normals for "
        "every variant, the full bank included, so differences are the bank's. A variant "
        f"qualifies when image and pixel AUROC stay within {TOLERANCE} of the full bank on "
        "every set.",
        "",
        "| set | bank | image AUROC | Δ | pixel AUROC | Δ | AUPRO | GFLOP / image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    worst: dict[str, float] = {}
    cost: dict[str, float] = {}
    for name, rows in results.items():
        ref = next(iter(rows.values()))  # the full bank comes first
        for key, r in rows.items():
            d_img = r["image_auroc"] - ref["image_auroc"]
            d_pix = r["pixel_auroc"] - ref["pixel_auroc"]
            drops = [-d for d in (d_img, d_pix) if d == d]  # NaN (no masks) left out
            worst[key] = max(worst.get(key, 0.0), *drops)
            cost[key] = max(cost.get(key, 0.0), r["gflops_per_image"])
            lines.append(
                f"| {name} | {key} | {r['image_auroc']:.3f} | {d_img:+.3f} | "
                f"{r['pixel_auroc']:.3f} | {d_pix:+.3f} | {r['aupro']:.3f} | "
                f"{r['gflops_per_image']:.2f} |"
            )
    qualified = [k for k in worst if worst[k] <= TOLERANCE]
    cheapest = min(qualified, key=lambda k: cost[k]) if qualified else None
    lines += [
        "",
        "Largest drop of image or pixel AUROC over the sets, by variant: "
        + ", ".join(f"{k}: {worst[k]:.3f}" for k in worst)
        + ".",
        f"Cheapest variant within {TOLERANCE} on every set: "
        + (f"**{cheapest}**." if cheapest else "none."),
        "",
    ]
    (args.out / "bank.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
