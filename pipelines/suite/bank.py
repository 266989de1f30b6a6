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
from anomalyvae.models.bank import BANK_FULL_PIXELS  # noqa: E402
from anomalyvae.models.scoring import ScoringGraph  # noqa: E402

#: (share of the model's own bank rows, principal directions; 0 = every feature channel
#: the model searches), the model's own bank first: 8192 rows up to 512 x 512 pixels,
#: fewer above (``bank_size="auto"``), so the cuts are relative to what the model holds
VARIANTS = (
    (1, 0),
    (1 / 2, 0),
    (1 / 4, 0),
    (1 / 8, 0),
    (1, 96),
    (1, 64),
    (1, 48),
    (1, 32),
)
#: A cheaper bank is kept when image and pixel AUROC stay within this of the full bank.
TOLERANCE = 0.005


def with_bank(detector: VAEAnomalyDetector, size: int, dim: int = 0) -> VAEAnomalyDetector:
    """The detector with the first ``size`` rows of its bank (its own coreset order),
    projected onto their ``dim`` principal directions when ``dim`` is set."""
    model = detector.model_
    model.config = dataclasses.replace(model.config, bank_size=size)
    model.bank = model.bank[:size].clone()
    if model.config.bank_dim:  # a projected bank: its rows' exact norms go with them
        model.bank_sq = model.bank_sq[:size].clone()
    model.project_bank(dim)
    return detector


def label(size: int, dim: int) -> str:
    return f"{size}" if not dim else f"{size} x {dim}d"


def variant_name(share: float, dim: int) -> str:
    """A variant by what it does to the model's own bank (the same on every set)."""
    rows = "all rows" if share == 1 else f"1/{round(1 / share)} of the rows"
    return rows if not dim else f"{rows}, {dim} directions"


def gflops(detector: VAEAnomalyDetector) -> float:
    spec = detector.preprocessing_
    graph = ScoringGraph(detector.model_.eval(), detector.scoring_, None).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        graph(torch.rand(1, spec.channels, spec.height, spec.width))
    return counter.get_total_flops() / 1e9


def measure(
    checkpoint: Path, source: Path, variants: dict[str, tuple[int, int]]
) -> dict[str, dict]:
    """Each variant (its name: rows, directions) of the model's bank, scored on the test set.

    A model that already searches its bank in fewer directions keeps them (a variant that
    asks for other directions is left out); every variant's ``bank_dim`` says what it
    searched in.
    """
    train = [s.path for s in discover(source, "train") if s.label == 0]
    out = {}
    for name, (size, dim) in variants.items():
        detector = VAEAnomalyDetector.load(checkpoint, progress=False)
        config = detector.model_.config
        if size > config.bank_size or dim >= config.feature_channels:
            continue
        if dim and config.bank_dim:
            continue
        val_index, _ = detector.split_indices(len(train))
        with_bank(detector, size, dim).fit_fusion([train[i] for i in val_index])
        overall = evaluate_on(detector, source, progress=False).table.loc["overall"]
        spec = detector.preprocessing_
        out[name] = {
            "bank_size": size,
            "bank_dim": dim or config.bank_dim,
            "input": [spec.height, spec.width],
            "image_auroc": float(overall["image_auroc"]),
            "pixel_auroc": float(overall.get("pixel_auroc", float("nan"))),
            "aupro": float(overall.get("aupro", float("nan"))),
            "gflops_per_image": gflops(detector),
        }
        print(f"  bank {name}: {out[name]}", flush=True)
    return out


def large_input(rows: dict[str, dict]) -> bool:
    """The model's input has more pixels than the bank keeps every row for (512 x 512)."""
    height, width = next(iter(rows.values()))["input"]
    return height * width > BANK_FULL_PIXELS


def verdict_groups(small: dict, large: dict) -> list[tuple[str, dict]]:
    """The sets by input size, where both sizes are there (the "auto" rules differ)."""
    if not small or not large:
        return []
    return [("sets up to 512 x 512 pixels", small), ("sets above 512 x 512 pixels", large)]


def verdict(title: str, results: dict[str, dict[str, dict]]) -> list[str]:
    """The largest drop of each variant over ``results``' sets and the cheapest that
    stays within :data:`TOLERANCE` of the model's own bank on every one of them."""
    worst: dict[str, float] = {}
    cost: dict[str, float] = {}
    for rows in results.values():
        ref = next(iter(rows.values()))
        for key, r in rows.items():
            drops = [
                ref[m] - r[m] for m in ("image_auroc", "pixel_auroc") if r[m] == r[m]
            ]  # NaN (no masks) left out
            worst[key] = max(worst.get(key, 0.0), *drops)
            cost[key] = max(cost.get(key, 0.0), r["gflops_per_image"])
    qualified = [k for k in worst if worst[k] <= TOLERANCE]
    cheapest = min(qualified, key=lambda k: cost[k]) if qualified else None
    return [
        "",
        f"**{title.capitalize()}** ({', '.join(results)}). Largest drop of image or pixel "
        "AUROC, by variant: " + ", ".join(f"{k}: {worst[k]:.3f}" for k in worst) + ". "
        f"Cheapest variant within {TOLERANCE} on every one: "
        + (f"**{cheapest}**." if cheapest else "none."),
    ]


def main() -> None:
    args = options(__doc__)
    results = {}
    for name, source, checkpoint, detector in trained_models(
        args, lambda c: bool(getattr(c, "bank_size", 0)), "memory bank"
    ):
        full = detector.model_.config.bank_size
        shares = ((1, 0), (64 / full, 0), (1, 16)) if args.smoke else VARIANTS
        # the smoke run's tiny model: its bank, a few rows, a few directions
        variants = {variant_name(r, d): (round(full * r), d) for r, d in shares}
        results[name] = measure(checkpoint, source, variants)
    (args.out / "bank.json").write_text(
        json.dumps({"machine": machine(), "tolerance": TOLERANCE, "sets": results}, indent=2)
    )
    lines = [
        "# Memory bank size: quality against cost" + (" (smoke run)" if args.smoke else ""),
        "",
        "Produced by `python pipelines/suite/bank.py` on the suite's trained models "
        f"({machine()}). Each model keeps a share of its own bank's rows (8192 up to "
        "512 x 512 pixels, fewer above: `--bank-size auto`), the first ones in its coreset "
        "order, which is the bank training with that `bank_size` builds; `k x dd`: k rows "
        "searched in their d principal directions (training with `bank_dim=d`: norms exact, "
        "dot products in the subspace; a model trained that way keeps its directions). "
        "Fusion constants refitted on the held-out normals for every variant, the model's "
        "own bank included, so differences are the bank's. A variant qualifies when image "
        f"and pixel AUROC stay within {TOLERANCE} of the model's own bank on every set of "
        "a group.",
        "",
        "| set | input | variant | bank | image AUROC | Δ | pixel AUROC | Δ | AUPRO | "
        "GFLOP / image |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        ref = next(iter(rows.values()))  # the model's own bank comes first
        for key, r in rows.items():
            d_img = r["image_auroc"] - ref["image_auroc"]
            d_pix = r["pixel_auroc"] - ref["pixel_auroc"]
            height, width = r["input"]
            lines.append(
                f"| {name} | {height} x {width} | {key} | {label(r['bank_size'], r['bank_dim'])} "
                f"| {r['image_auroc']:.3f} | {d_img:+.3f} | {r['pixel_auroc']:.3f} | "
                f"{d_pix:+.3f} | {r['aupro']:.3f} | {r['gflops_per_image']:.2f} |"
            )
    large = {n: rows for n, rows in results.items() if large_input(rows)}
    small = {n: rows for n, rows in results.items() if n not in large}
    for title, group in (("every set", results), *verdict_groups(small, large)):
        lines += verdict(title, group)
    lines.append("")
    (args.out / "bank.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
