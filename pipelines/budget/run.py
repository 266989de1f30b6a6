"""The default commands' time and memory on a large colour set: train, then evaluate.

    python pipelines/budget/run.py            # 481 normals + 400 test images, 1130 x 460 RGB
    python pipelines/budget/run.py --smoke    # a few small images (CI)
    python pipelines/budget/run.py --train-args "--backbone efficientnet-lite2" \
        --out reports/budget/lite2               # what a train option costs, apart

The product promises that `anomalyvae train DIR -o model.pt --time-budget 900` (training
and calibration, the whole command) ends within 15 minutes on 2 cores, and that
`anomalyvae evaluate` of 400 images of 1130 x 460 px takes at most 3 minutes. This
pipeline measures both on data shaped like the held-out ball-screw photos those limits
were set for (RGB, 1130 x 460, 481 normals, pits of about 0.25 % of the image): a
synthetic brushed-metal texture, tinted, with small dark pits and their masks. Each
command runs in a fresh process, as a user runs it; its wall time and peak resident
memory (VmHWM) are recorded, with numpy's matmul peak of the same run. A third run
trains on the same set under tight budgets (`--time-budget 300 --memory-budget 4`):
training then reads a seeded random choice of the normals, and the run shows that the
command keeps to both budgets. A fourth run recalibrates the trained model on the 481
normals (`anomalyvae calibrate model.pt DATA --subset train`): a set of normals larger
than a chunk, read and scored a chunk at a time. The synthetic
set's AUROC is printed for completeness, not as evidence of detection quality (the
suite measures that on real sets).

Writes reports/budget/{README.md,results.json,seconds.png}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "pipelines"))

from common import fresh_process_peak, machine, matmul_peak, write_json  # noqa: E402

from anomalyvae.data import synthetic_texture  # noqa: E402
from anomalyvae.version import __version__  # noqa: E402

#: The limits the product promises (seconds): train's whole command, evaluate of 400
#: images of 1130 x 460.
TRAIN_LIMIT_S = 900.0
EVALUATE_LIMIT_S = 180.0
#: The tight budgets of the third run: seconds and GB, under what the whole set needs.
TIGHT_TIME_S = 300.0
TIGHT_MEMORY_GB = 4.0

#: The CLI run in a fresh interpreter by :func:`common.fresh_process_peak`, which prints
#: its peak memory after it: standalone_mode=False returns instead of calling sys.exit.
_CLI = (
    "import sys\nfrom anomalyvae.cli import main\n"
    "main(sys.argv[1:], prog_name='anomalyvae', standalone_mode=False)\n"
)


def part_image(rng: np.random.Generator, height: int, width: int, tint: np.ndarray) -> np.ndarray:
    """A tinted brushed-metal texture (height, width, 3) in [0, 1]."""
    side = max(height, width)
    grey = synthetic_texture(rng, side)[:height, :width]
    return np.clip(grey[..., None] * tint[None, None, :], 0.0, 1.0)


def add_pit(rng: np.random.Generator, image: np.ndarray, area: float) -> np.ndarray:
    """Darken one round pit covering ``area`` of the image; return its mask."""
    height, width = image.shape[:2]
    radius = np.sqrt(area * height * width / np.pi)
    cy = rng.uniform(radius, height - radius)
    cx = rng.uniform(radius, width - radius)
    yy, xx = np.mgrid[0:height, 0:width]
    mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    image[mask] *= 0.35
    return mask


def write_set(
    root: Path, n_train: int, n_good: int, n_defect: int, height: int, width: int, seed: int = 0
) -> Path:
    """An MVTec-style folder: train/good, test/good, test/pit and ground_truth/pit."""
    rng = np.random.default_rng(seed)
    tint = np.array([1.0, 0.93, 0.82])  # a warm steel; each part's lighting varies a little

    def save(array: np.ndarray, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8)).save(path)

    def part() -> np.ndarray:
        return part_image(rng, height, width, tint * rng.uniform(0.95, 1.05, 3))

    for i in range(n_train):
        save(part(), root / "train" / "good" / f"{i:04d}.png")
    for i in range(n_good):
        save(part(), root / "test" / "good" / f"{i:04d}.png")
    for i in range(n_defect):
        image = part()
        mask = add_pit(rng, image, area=0.0025)
        save(image, root / "test" / "pit" / f"{i:04d}.png")
        save(mask.astype(np.float32), root / "ground_truth" / "pit" / f"{i:04d}_mask.png")
    return root


def run_cli(work: Path, *args: str) -> dict:
    """``anomalyvae ARGS`` in a fresh interpreter: wall seconds, peak memory (MB) and what
    it printed (the scratch folder ``work`` shown as WORK: no machine path in a report)."""
    started = time.monotonic()
    peak_mb, printed = fresh_process_peak(_CLI, *args)
    return {
        "seconds": round(time.monotonic() - started, 1),
        "peak_mb": round(peak_mb, 1),
        "stdout": [line.replace(str(work), "WORK") for line in printed.splitlines()],
    }


def train_run(work: Path, data: Path, model: Path, time_budget: float, *options: str) -> dict:
    """``anomalyvae train DATA -o MODEL --time-budget S [OPTIONS]``, timed (:func:`run_cli`)."""
    budget = ("--time-budget", str(time_budget))
    return run_cli(work, "train", str(data), "-o", str(model), *budget, "--silent", *options)


def tight_run(work: Path, data: Path, smoke: bool, extra: tuple[str, ...] = ()) -> dict:
    """Train under budgets tighter than the set needs; what it read, and what it took."""
    from anomalyvae.capacity import BASE_BYTES
    from anomalyvae.detector import VAEAnomalyDetector

    # a smoke set is tiny: a budget just over the base cuts it all the same
    time_budget = 30.0 if smoke else TIGHT_TIME_S
    memory_gb = (BASE_BYTES + 2_000_000) / 1e9 if smoke else TIGHT_MEMORY_GB
    model = work / "model-tight.pt"
    run = train_run(work, data, model, time_budget, "--memory-budget", str(memory_gb), *extra)
    summary = VAEAnomalyDetector.load(model, progress=False).data_summary_
    capacity = summary.get("capacity") or {}
    return run | {
        "time_budget": time_budget,
        "memory_budget_gb": memory_gb,
        "n_read": summary["n_train"] + summary["n_val"],
        "n_given": summary.get("n_given", summary["n_train"] + summary["n_val"]),
        "limit": capacity.get("limit", "none (read whole)"),
        "bytes_per_image": capacity.get("bytes_per_image", 0.0),
        "seconds_per_image": capacity.get("seconds_per_image") or 0.0,
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["train (whole command)", "evaluate", "train, tight budgets"]
    runs = ("train", "evaluate", "tight")
    seconds = [results[run]["seconds"] for run in runs]
    limits = [results["limits_s"][run] for run in runs]
    fig, ax = plt.subplots(figsize=(6, 2.6))
    ax.barh(names, seconds, color="#4a78b5", label="measured")
    ax.scatter(limits, names, marker="|", s=400, color="#b00020", label="limit", zorder=3)
    ax.set_xlabel("seconds")
    # room right of the longest bar, so that the legend covers no bar and no limit
    ax.set_xlim(0, 1.3 * max(seconds + limits))
    ax.legend(loc="upper right", fontsize=8, markerscale=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: dict, out: Path) -> None:
    data = results["data"]
    train, evaluate = results["train"], results["evaluate"]
    tight = results["tight"]
    calibrate = results["calibrate"]
    rows = [
        ("`train` (training + calibration)", train, results["limits_s"]["train"], None),
        (f"`evaluate` ({data['n_test']} images)", evaluate, results["limits_s"]["evaluate"], None),
        (
            f"`train --time-budget {tight['time_budget']:.0f} --memory-budget "
            f"{tight['memory_budget_gb']:g}`",
            tight,
            results["limits_s"]["tight"],
            tight["memory_budget_gb"] * 1000,
        ),
        (
            f"`calibrate --subset train` ({data['n_train']} normals)",
            calibrate,
            None,
            None,
        ),
    ]
    table = [
        "| command | seconds | limit | within | peak memory MB | memory budget MB |",
        "|---|---|---|---|---|---|",
    ]
    for name, run, limit, memory in rows:
        within = (limit is None or run["seconds"] <= limit) and (
            memory is None or run["peak_mb"] <= memory
        )
        shown_limit = "–" if limit is None else f"{limit:.0f}"
        verdict = "–" if limit is None and memory is None else "yes" if within else "**no**"
        table.append(
            f"| {name} | {run['seconds']:.0f} | {shown_limit} | {verdict} | "
            f"{run['peak_mb']:.0f} | {'–' if memory is None else f'{memory:.0f}'} |"
        )
    metrics = results["metrics"]
    options = " ".join(results.get("train_args", []))
    command = "python pipelines/budget/run.py" + (f' --train-args "{options}"' if options else "")
    title = f"train with `{options}`" if options else "The default commands"
    shown = f" {options}" if options else ""
    text = f"""# {title} on a large colour set: time and memory

Produced by `{command}`; every number comes from that run
({results["date"]}, anomalyvae {results["version"]}).
Machine: {results["machine"]}. Dense float32 matmul peak measured in the same run (numpy,
2048²): **{results["matmul_gflops"]:.0f} GFLOP/s**.

Data: synthetic, shaped like the held-out ball-screw photos the limits were set for:
{data["n_train"]} normal training images and {data["n_test"]} test images
({data["n_defect"]} with a dark pit of 0.25 % of the image, masks included), RGB,
{data["width"]} x {data["height"]} px PNG. Each command runs in a fresh process as a
user runs it (`anomalyvae train DATA -o model.pt --time-budget {data["time_budget"]:.0f}{shown}`,
then `anomalyvae evaluate model.pt DATA -o evaluation`); peak memory is the process's VmHWM.

{chr(10).join(table)}

![seconds against the limits](seconds.png)

What `train` printed: {" / ".join(train["stdout"][:2])}

Under the tight budgets, training read {tight["n_read"]} of the {tight["n_given"]} normals
(a seeded random choice; the budget that set it: {tight["limit"]}, at an estimated
{tight["bytes_per_image"] / 1e6:.1f} MB and {tight["seconds_per_image"]:.2f} s an image
outside the epochs) and printed: {" / ".join(tight["stdout"][:2])}

Evaluate's metrics on this synthetic set (not evidence of detection quality; the suite
measures that on real sets): image AUROC {metrics["image_auroc"]:.3f}, pixel AUROC
{metrics["pixel_auroc"]:.3f}, AUPRO {metrics["aupro"]:.3f}; at the calibrated threshold,
recall {metrics["recall"]:.2f} and false-positive rate {metrics["fpr"]:.3f}.
"""
    (out / "README.md").write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="a few small images (CI)")
    parser.add_argument(
        "--out", type=Path, default=None, help="[reports/budget; a smoke run: a scratch folder]"
    )
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (kept)")
    parser.add_argument(
        "--train-args",
        default="",
        help="extra `anomalyvae train` options for every training run (give --out too: "
        "the defaults' report stays theirs)",
    )
    args = parser.parse_args()
    extra = tuple(shlex.split(args.train_args))
    if extra and args.out is None and not args.smoke:
        parser.error("--train-args needs --out: reports/budget holds the defaults' numbers")
    if args.smoke:
        shape = {"n_train": 12, "n_good": 4, "n_defect": 4, "height": 100, "width": 160}
        budget = 60.0
    else:
        shape = {"n_train": 481, "n_good": 200, "n_defect": 200, "height": 460, "width": 1130}
        budget = TRAIN_LIMIT_S
    work = args.work or Path(tempfile.mkdtemp(prefix="anomalyvae-budget-"))
    if args.out is None:  # a smoke run's numbers are meaningless: never over the report
        args.out = work / "report" if args.smoke else ROOT / "reports" / "budget"
    try:
        data = work / "data"
        counts = {
            "train/good": shape["n_train"],
            "test/good": shape["n_good"],
            "test/pit": shape["n_defect"],
            "ground_truth/pit": shape["n_defect"],
        }
        if all(len(list((data / sub).glob("*.png"))) == n for sub, n in counts.items()):
            print(f"reusing the images in {data}", flush=True)  # same seed, same set
        else:
            shutil.rmtree(data, ignore_errors=True)
            write_set(data, **shape)
        results = {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "version": __version__,
            "machine": machine(),
            "matmul_gflops": round(matmul_peak(), 1),
            "smoke": args.smoke,
            "train_args": list(extra),
            "data": {
                "n_train": shape["n_train"],
                "n_test": shape["n_good"] + shape["n_defect"],
                "n_defect": shape["n_defect"],
                "height": shape["height"],
                "width": shape["width"],
                "time_budget": budget,
            },
            "limits_s": {"train": budget, "evaluate": EVALUATE_LIMIT_S},
        }
        model = work / "model.pt"
        print(f"training on {shape['n_train']} images ...", flush=True)
        results["train"] = train_run(work, data, model, budget, *extra)
        print(f"train: {results['train']['seconds']:.0f} s", flush=True)
        results["tight"] = tight_run(work, data, args.smoke, extra)
        results["limits_s"]["tight"] = results["tight"]["time_budget"]
        print(f"train under tight budgets: {results['tight']['seconds']:.0f} s", flush=True)
        evaluation = work / "evaluation"
        results["evaluate"] = run_cli(
            work, "evaluate", str(model), str(data), "-o", str(evaluation), "--silent"
        )
        print(f"evaluate: {results['evaluate']['seconds']:.0f} s", flush=True)
        # a normal set larger than one chunk, recalibrated: memory holds a chunk of images
        # and a sample of the maps' pixels, not the set
        results["calibrate"] = run_cli(
            work,
            "calibrate",
            str(model),
            str(data),
            "--subset",
            "train",
            "-o",
            str(work / "model-recalibrated.pt"),
            "--silent",
        )
        print(f"calibrate: {results['calibrate']['seconds']:.0f} s", flush=True)
        overall = json.loads((evaluation / "metrics.json").read_text())["metrics"]["overall"]
        keys = ("image_auroc", "pixel_auroc", "aupro", "recall", "fpr")
        results["metrics"] = {key: overall.get(key) for key in keys}
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "results.json", results)
        plot(results, args.out / "seconds.png")
        report(results, args.out)
        if args.smoke:
            print("smoke run: numbers are meaningless", flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
