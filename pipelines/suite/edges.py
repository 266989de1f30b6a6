"""The anomaly map's edge: constants per edge ring of the feature map, chosen LOSO.

    python pipelines/suite/edges.py [--runs runs/suite]   # after pipelines/suite/run.py
    python pipelines/suite/edges.py --smoke               # tiny synthetic model (CI)

The outermost locations of the feature map see the backbone's padding, so the VAE's
ELBO and the bank distance sit higher there on every image, normal ones included. With
one set of z constants for the whole map, most normal images' maps peak on their edge:
heatmaps of good parts show bright borders, and the edge competes with real defects for
the top pixels. The "mean-z" map can z-score each edge ring against the held-out normals'
locations of the same ring (``FeatureVAEConfig.map_border``,
:func:`~anomalyvae.models.feature_vae.ring_constants`).

On every feature model the suite trained (``runs/suite/<set>/model.pt``), without
retraining: the location maps of the model's own held-out normals (the split training
holds out, which fits the product's constants) and of its test images are computed once;
for each border (:data:`BORDERS`, 0 = one set of constants; each ring's scale floored at
the whole map's as the product does, and not) the product's map
(:meth:`~anomalyvae.models.feature_vae.FeatureVAE.location_map`, upsampled and smoothed
as scoring does) gives, on the sets with pixel masks, pixel AUROC and AUPRO over the
test images with a mask or no defect, and on every set the share of the normal test
images whose map peaks on the outermost ring. The border is chosen leave-one-set-out on
the mean of pixel AUROC and AUPRO (``folds.choose_leave_one_out``: the same choice in a
majority of folds and a held-out gain over one set of constants).
Writes reports/suite/edges.md, edges.json and edges.png (each set's first normal test
image with its map under one set of constants and under the product's rings).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "pipelines"))
sys.path.insert(0, str(ROOT / "pipelines" / "suite"))

from common import machine, plt  # noqa: E402
from folds import choose_leave_one_out, fold_table  # noqa: E402
from trained import options, trained_models  # noqa: E402

from anomalyvae.data import discover  # noqa: E402
from anomalyvae.detector import VAEAnomalyDetector  # noqa: E402
from anomalyvae.metrics import pixel_metrics  # noqa: E402
from anomalyvae.models.bank import MAP_BORDER, edge_rings  # noqa: E402
from anomalyvae.models.feature_vae import location_maps, ring_constants  # noqa: E402
from anomalyvae.models.smoothing import gaussian_blur  # noqa: E402
from anomalyvae.set_scoring import masks_for  # noqa: E402

#: Rings along the edge with their own constants; 0 = one set for the whole map.
BORDERS = (0, 1, 2, 3)
#: Each border with every ring's scale floored at the whole map's (the product's
#: ``ring_constants``), and without the floor.
FLOORS = (True, False)


def key(border: int, floor: bool = True) -> str:
    return f"border {border}" + ("" if floor or not border else " unfloored")


CANDIDATES = [(b, f) for b in BORDERS for f in FLOORS if f or b]


def location_level(
    detector: VAEAnomalyDetector,
    maps: tuple[np.ndarray, np.ndarray],
    constants: tuple[np.ndarray, np.ndarray],
    border: int,
) -> torch.Tensor:
    """The product's map on the feature grid, (n, 1, h', w'), of location maps (ELBO and
    distance, each (n, h', w')) with the ring constants of ``border``."""
    model = detector.model_
    saved = model.config, model.map_center, model.map_scale
    model.config = dataclasses.replace(model.config, map_border=border)
    model.map_center = torch.from_numpy(constants[0]).float()
    model.map_scale = torch.from_numpy(constants[1]).float()
    try:
        with torch.no_grad():
            elbo, distance = (torch.from_numpy(m).float() for m in maps)
            return model.location_map(elbo[:, None], distance)
    finally:
        model.config, model.map_center, model.map_scale = saved


def upsampled(detector: VAEAnomalyDetector, location: torch.Tensor) -> np.ndarray:
    """(n, h, w) maps at model resolution, upsampled and smoothed as scoring does."""
    size = (detector.preprocessing_.height, detector.preprocessing_.width)
    full = F.interpolate(location, size=size, mode="bilinear", align_corners=False)
    return gaussian_blur(full, detector.scoring_.smoothing_sigma)[:, 0].numpy()


def edge_peak_share(location: np.ndarray) -> float:
    """The share of (n, h, w) maps whose largest value is on the outermost ring."""
    rings = edge_rings(location.shape[-2], location.shape[-1], 1).numpy().ravel()
    peaks = location.reshape(len(location), -1).argmax(1)
    return float(np.mean(rings[peaks] == 0))


def measure(detector: VAEAnomalyDetector, source: Path) -> dict:
    model = detector.model_
    train = [s.path for s in discover(source, "train") if s.label == 0]
    held_out = [train[i] for i in detector.split_indices(len(train))[0]]
    test = discover(source, "test")
    masked = [s for s in test if s.label == 0 or s.mask_path is not None]
    has_masks = any(s.mask_path is not None for s in test)
    device = torch.device("cpu")

    def maps_of(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
        return location_maps(model, detector.preprocess(paths), 8, device)

    reference = maps_of(held_out)
    scored = maps_of([s.path for s in masked])
    normal = np.array([s.label == 0 for s in masked])
    masks = masks_for(masked, detector, 0.5) if has_masks else None
    h, w = reference[0].shape[-2:]
    out = {
        "feature_grid": [int(h), int(w)],
        "outer_ring_share": float(np.mean(edge_rings(h, w, 1).numpy() == 0)),
        "n_held_out": len(held_out),
        "n_test_normals": int(normal.sum()),
        "n_test_masked": int((~normal).sum()) if has_masks else 0,
        "model_border": int(getattr(model.config, "map_border", 0)),
        "borders": {},
    }
    examples: dict[str, np.ndarray] = {}
    for border, floor in CANDIDATES:
        constants = ring_constants(*reference, border, floor)
        location = location_level(detector, scored, constants, border)
        row = {"normals_peaking_on_edge": edge_peak_share(location[normal, 0].numpy())}
        if masks is not None:
            full = upsampled(detector, location)
            row["pixel_auroc"], row["aupro"] = pixel_metrics(masks, full)
        if border in (0, MAP_BORDER) and floor:  # the figure: first normal test image
            first = int(np.flatnonzero(normal)[0])
            example = upsampled(detector, location[first : first + 1])[0]
            examples[key(border)] = example
        out["borders"][key(border, floor)] = row
        print(f"  {key(border, floor)}: {row}", flush=True)
    image = detector.preprocess([masked[int(np.flatnonzero(normal)[0])].path])[0]
    return out, {"image": image.mean(0), **examples}


def quality(row: dict) -> float:
    return (row["pixel_auroc"] + row["aupro"]) / 2


def choose(results: dict) -> dict | None:
    """The border chosen leave-one-set-out on the sets with pixel masks, or None."""
    masked = {n: r for n, r in results.items() if "pixel_auroc" in r["borders"][key(0)]}
    if not masked:
        return None
    baseline = key(0)
    gain = {
        n: {k: quality(row) - quality(r["borders"][baseline]) for k, row in r["borders"].items()}
        for n, r in masked.items()
    }
    return choose_leave_one_out(gain, baseline)


def figure(examples: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    """Each set's first normal test image and its map, one set of constants against the
    product's rings, on one colour scale per set (z units)."""
    fig, axes = plt.subplots(len(examples), 3, figsize=(9, 2.6 * len(examples)), squeeze=False)
    for row, (name, ex) in zip(axes, examples.items(), strict=True):
        maps = [ex[key(0)], ex[key(MAP_BORDER)]]
        top = max(float(np.max(m)) for m in maps)
        row[0].imshow(ex["image"], cmap="gray")
        row[0].set_title(f"{name}: a normal test image", fontsize=8)
        for ax, m, title in zip(
            row[1:], maps, ("one set of constants", f"map_border {MAP_BORDER}"), strict=True
        ):
            shown_map = ax.imshow(m, cmap="inferno", vmin=0, vmax=top)
            ax.set_title(f"{title} (max {float(np.max(m)):.1f})", fontsize=8)
            fig.colorbar(shown_map, ax=ax, fraction=0.046)
        for ax in row:
            ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(results: dict, out: Path, smoke: bool) -> None:
    decision = choose(results)
    (out / "edges.json").write_text(
        json.dumps(
            {"machine": machine(), "smoke": smoke, "sets": results, "loso": decision},
            indent=2,
        )
    )
    names = list(results)
    lines = [
        "# The anomaly map's edge: z constants per edge ring, chosen leave-one-set-out",
        "",
        f"Produced by `python pipelines/suite/edges.py` on the suite's trained models "
        f"({machine()}){' - SMOKE run on a synthetic set, not a measurement' if smoke else ''}. "
        "No model is retrained: each model's location maps (negative ELBO and bank "
        "distance per feature location) of its held-out normals fit the constants, as "
        "training fits them; the map is the product's (`FeatureVAE.location_map`, upsampled "
        "and smoothed as scoring does) with `map_border` rings along the edge z-scored "
        "against the same ring of the held-out normals (0: one set of constants, the "
        "models saved before it), each ring's scale floored at the whole map's (the product's "
        "`ring_constants`) or not (`unfloored`). The product's default: "
        f"`map_border` {MAP_BORDER} (`anomalyvae.models.bank.MAP_BORDER`).",
        "",
        "## Normal test images whose map peaks on the outermost ring",
        "",
        "The outermost ring holds the share of the map's locations in the second column; "
        "a map without an edge effect peaks there about as often.",
        "",
        "| set | outer ring's share of locations | "
        + " | ".join(key(*c) for c in CANDIDATES)
        + " |",
        "|---|---|" + "---|" * len(CANDIDATES),
    ]
    for n in names:
        r = results[n]
        cells = [f"{r['borders'][key(*c)]['normals_peaking_on_edge']:.0%}" for c in CANDIDATES]
        lines.append(f"| {n} | {r['outer_ring_share']:.0%} | " + " | ".join(cells) + " |")
    masked = [n for n in names if "pixel_auroc" in results[n]["borders"][key(0)]]
    if masked:
        lines += [
            "",
            "## Pixel AUROC / AUPRO",
            "",
            "| border | " + " | ".join(masked) + " | mean |",
            "|---|" + "---|" * (len(masked) + 1),
        ]
        for c in CANDIDATES:
            rows = [results[n]["borders"][key(*c)] for n in masked]
            cells = [f"{r['pixel_auroc']:.3f} / {r['aupro']:.3f}" for r in rows]
            mean = f"{np.mean([r['pixel_auroc'] for r in rows]):.3f} / " + (
                f"{np.mean([r['aupro'] for r in rows]):.3f}"
            )
            lines.append(f"| {key(*c)} | " + " | ".join(cells) + f" | {mean} |")
    if decision:
        lines += [
            "",
            "## Leave-one-set-out",
            "",
            "Each set with masks left out in turn; the border is chosen on the others by the "
            "mean of pixel AUROC and AUPRO (gain over one set of constants, `border 0`).",
            "",
            *fold_table(decision, digits=4),
        ]
        verdict = (
            f"adopt {decision['majority']}"
            if decision["adopt"]
            else f"no border qualifies over one set of constants (majority {decision['majority']})"
        )
        lines += [
            "",
            f"Majority: {decision['majority']}; held-out mean gain "
            f"{decision['held_mean_gain']:+.4f}: **{verdict}**. The product's "
            f"`MAP_BORDER` is {MAP_BORDER}.",
        ]
    lines += ["", "![a normal test image's map per set](edges.png)"]
    (out / "edges.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    args = options(__doc__)
    results, examples = {}, {}
    for name, source, _, detector in trained_models(
        args,
        lambda c: bool(getattr(c, "bank_size", 0)) and getattr(c, "map_rule", "elbo") == "mean-z",
        "memory-bank map",
    ):
        results[name], examples[name] = measure(detector, source)
    if not results:
        raise SystemExit(
            f"no trained feature model with a memory-bank map under '{args.runs}': run "
            "pipelines/suite/run.py first (or pass --runs); nothing was written"
        )
    write(results, args.out, args.smoke)
    figure(examples, args.out / "edges.png")


if __name__ == "__main__":
    main()
