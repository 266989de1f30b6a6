"""The drift alarm on real data: scan each suite model's test normals, as a line would.

    python pipelines/suite/drift.py [--work runs/suite]   # after pipelines/suite/run.py
    python pipelines/suite/drift.py --smoke               # a tiny synthetic model (CI)

For every set the suite trained (``runs/suite/<set>/model.pt``), export the model to
ONNX and scan the set's normal test images with ``anomalyvae scan``: the summary's drift
section says whether the batch still looks like the calibration normals. On MVTec screw
the test normals are darker than the training normals, so the alarm should fire there.

Then a lighting failure, as a line would meet it: the same normal test images, each
made darker, brighter or flatter (:data:`LIGHTING`, written as lossless PNG copies), are
scanned again. The table says what share of them each image's verdict flags and whether
the batch's drift alarm fires. The image score is meant for local defects (its features
see each image normalized), so a global change is the drift alarm's to catch.
Writes reports/suite/drift.md and drift.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import machine  # noqa: E402
from run import DEFAULT_DATA, DEFAULT_OUT, ROOT, discover_sets  # noqa: E402

from anomalyvae.data import discover, make_synthetic_dataset  # noqa: E402

#: The lighting failures each set's normal test images are put through (stored values;
#: clipped to the file's range).
LIGHTING = {
    "darker (x0.7)": lambda a: 0.7 * a,
    "brighter (x1.3)": lambda a: 1.3 * a,
    "flatter (contrast x0.7)": lambda a: a.mean() + 0.7 * (a - a.mean()),
}


def scan_normals(model: Path, source: Path, work: Path) -> dict:
    """Export ``model``, scan the set's normal test images as they are and under each
    lighting failure; the drift section of each scan, and the share flagged."""
    onnx_path = work / "model.onnx"
    run("export", str(model), "-o", str(onnx_path))
    normals = work / "normals"
    normals.mkdir(parents=True, exist_ok=True)
    for i, sample in enumerate(s for s in discover(source, "test") if s.label == 0):
        shutil.copy(sample.path, normals / f"{i:05d}{sample.path.suffix}")
    out = scanned(onnx_path, normals, work / "scan")
    out["lighting"] = {}
    for key, change in LIGHTING.items():
        changed = work / f"lighting-{len(out['lighting'])}"
        achieved = relit(normals, changed, change)
        out["stored_levels"] = achieved.pop("levels")
        out["lighting"][key] = {
            **scanned(onnx_path, changed, changed.with_name(changed.name + "-scan")),
            "stored_mean_ratio": achieved["mean_ratio"],
        }
    return out


def scanned(onnx_path: Path, folder: Path, output: Path) -> dict:
    """``anomalyvae scan`` of ``folder``: its drift section, counts and share flagged."""
    run("scan", str(onnx_path), str(folder), "-o", str(output), "--heatmaps", "none", "--silent")
    summary = json.loads((output / "summary.json").read_text())
    flagged = summary["n_anomalies"] / max(summary["n_scored"], 1)
    return {"n_images": summary["n_scored"], "share_flagged": flagged, **summary["drift"]}


def relit(folder: Path, dest: Path, change) -> dict[str, float]:
    """Lossless PNG copies of the images in ``folder`` with ``change`` applied to their
    stored values (8 or 16 bit, grey or colour), clipped to the type's range.

    Returns what the change achieved once rounded to the stored levels: ``mean_ratio``,
    the copies' summed stored values over the originals', and ``levels``, the median
    number of distinct stored values per original (a file with few levels rounds a
    small change back to where it was).
    """
    import numpy as np
    from PIL import Image

    dest.mkdir(parents=True, exist_ok=True)
    before = after = 0.0
    levels = []
    for path in sorted(folder.iterdir()):
        with Image.open(path) as image:
            values = np.asarray(image)
        top = np.iinfo(values.dtype).max if values.dtype.kind in "ui" else 1.0
        changed = np.clip(np.rint(change(values.astype(np.float64))), 0, top)
        Image.fromarray(changed.astype(values.dtype)).save(dest / f"{path.stem}.png")
        before += float(values.sum(dtype=np.float64))
        after += float(changed.sum())
        levels.append(len(np.unique(values)))
    ratio = after / before if before else float("nan")
    return {"mean_ratio": ratio, "levels": float(np.median(levels))}


def run(*args: str) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "anomalyvae", *args], capture_output=True, text=True
    )
    if completed.returncode not in (0, 3):
        raise RuntimeError(f"anomalyvae {' '.join(args)} failed:\n{completed.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "suite")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="anomalyvae-drift-") as tmp:
        tmp_path = Path(tmp)
        if args.smoke:
            source = make_synthetic_dataset(
                tmp_path / "data", n_train=40, n_test_good=24, n_test_defect=4, size=32
            )
            model = tmp_path / "model.pt"
            run(
                "train",
                str(source),
                "-o",
                str(model),
                "--epochs",
                "2",
                "--target-fpr",
                "0.2",
                "--silent",
            )
            sets = {"synthetic32": (source, model)}
            out = args.out or tmp_path / "report"
        else:
            sets = {
                name: (source, args.work / name / "model.pt")
                for name, source in discover_sets(args.data_root).items()
                if (args.work / name / "model.pt").is_file()
            }
            out = args.out or DEFAULT_OUT
        if not sets:
            parser.error(f"no trained suite models under '{args.work}'; run pipelines/suite/run.py")
        results = {
            name: scan_normals(model, source, tmp_path / name)
            for name, (source, model) in sets.items()
        }
        out.mkdir(parents=True, exist_ok=True)
        (out / "drift.json").write_text(
            json.dumps({"machine": machine(), "sets": results}, indent=2, default=float)
        )
        lines = [
            "# The drift alarm on each set's normal test images",
            "",
            "Produced by `python pipelines/suite/drift.py` from the models of "
            "`pipelines/suite/run.py`: each model exported to ONNX, then `anomalyvae scan` of "
            "the set's normal test images. A healthy line flags about the target rate and "
            "stays within the calibration normals' intensity.",
            "",
            "| set | images | flagged | expected | intensity shift (normal SD) "
            "| outside normal range | alarm |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in results.items():
            flagged = r.get("flagged", {})
            intensity = r.get("intensity", {})
            lines.append(
                f"| {name} | {r['n_images']} | {flagged.get('rate', float('nan')):.1%} | "
                f"{flagged.get('expected_rate_if_normal', float('nan')):.1%} | "
                f"{intensity.get('shift_in_normal_sd', float('nan')):+.2f} | "
                f"{intensity.get('share_outside_normal_range', float('nan')):.1%} | "
                f"{'**fires**' if r['warnings'] else 'quiet'} |"
            )
        lines.append("")
        for name, r in results.items():
            for warning in r["warnings"]:
                lines.append(f"- {name}: {warning}")
        lines += [
            "",
            "## A lighting failure: the same normals, darker, brighter or flatter",
            "",
            "Each normal test image's stored values changed as named (clipped to the file's "
            "range, saved as lossless PNG) and scanned again. *Flagged*: the share of the "
            "changed images whose own verdict is anomalous (as they are: the first table's "
            "rate). *Alarm*: whether the scan's drift alarm fires on the batch. The image "
            "score is built for local defects and sees little of a change to the whole "
            "image; the drift alarm is what catches a lighting failure.",
            "",
            "| set | change | stored mean after / before | images | flagged "
            "| intensity shift (normal SD) | contrast shift (normal SD) | alarm |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, r in results.items():
            for key, changed in r["lighting"].items():
                shift = changed.get("intensity", {}).get("shift_in_normal_sd", float("nan"))
                flat = changed.get("contrast", {}).get("shift_in_normal_sd")
                ratio = changed.get("stored_mean_ratio", float("nan"))
                lines.append(
                    f"| {name} | {key} | x{ratio:.2f} | {changed['n_images']} "
                    f"| {changed['share_flagged']:.1%} "
                    f"| {shift:+.2f} | {'–' if flat is None else f'{flat:+.2f}'} "
                    f"| {'**fires**' if changed['warnings'] else 'quiet'} |"
                )
        lines += [
            "",
            "Contrast shift: – for a model saved before the contrast check (its file has no "
            "contrast range to compare with). *Stored mean after / before*: what the change "
            "achieved once rounded to the files' stored levels; files with few grey levels "
            "round it partly back, and then the batch has barely changed (median distinct "
            "stored values per image: "
            + ", ".join(f"{name} {r['stored_levels']:.0f}" for name, r in results.items())
            + ").",
        ]
        (out / "drift.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
