"""Scan throughput end to end vs model-only ONNX Runtime, threads vs processes, memory.

    python pipelines/scan/bench.py [--checkpoint runs/suite/mtd/model.pt] [--mtd DATA/mtd]
    python pipelines/scan/bench.py --smoke    # a tiny synthetic model and folders (CI)

1. MTD (all images, JPEG of varying size): end-to-end `scan` (decode + preprocess on the
   worker pool, ONNX Runtime batches, results table; heatmaps off) with thread and with
   process workers, against model-only ONNX Runtime on the same preprocessed tensors,
   in one run.
2. A 10,000-file synthetic folder (PNG): the same comparison.
3. Peak RSS of a scan of 1,000 vs 10,000 files (each in a fresh process).
numpy's dense float32 matmul peak is measured before and after (the machine's ceiling, so
the rates can be compared with another machine's). Writes reports/scan/{README.md,results.json}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "pipelines"))

from common import (  # noqa: E402
    fresh_process_peak,
    machine,
    matmul_peak,
    shown,
    smoke_model,
    synthetic_folder,
)

from anomalyvae.detector import VAEAnomalyDetector  # noqa: E402
from anomalyvae.export import export_onnx  # noqa: E402
from anomalyvae.imaging.files import walk_images  # noqa: E402
from anomalyvae.imaging.io import ImageReadError  # noqa: E402
from anomalyvae.imaging.preprocessing import load_image  # noqa: E402
from anomalyvae.inference import runtime  # noqa: E402
from anomalyvae.inference.decoding import SCAN_EXTENSIONS  # noqa: E402
from anomalyvae.inference.runtime import OnnxDetector  # noqa: E402
from anomalyvae.inference.scan import ScanConfig, scan  # noqa: E402

RSS_SCRIPT = """
import sys
from anomalyvae.inference.scan import ScanConfig, scan
r = scan(sys.argv[1], sys.argv[2], sys.argv[3], ScanConfig(heatmaps="none"), progress=False)
print(r.n_files)
"""


def model_only(model: Path, folder: Path, batch_size: int) -> tuple[float, int]:
    """Images/s of ONNX Runtime alone on already preprocessed tensors of ``folder``, and
    how many files it scored (the ones the scan scores: the others are its error rows,
    such as the all-zero masks of defect-free tiles, which are blank)."""
    detector = OnnxDetector(model, device="cpu", batch_size=batch_size)
    loaded = []
    for path in walk_images(folder, SCAN_EXTENSIONS):
        try:
            loaded.append(load_image(path, detector.preprocessing))
        except ImageReadError:
            continue
    tensors = np.stack(loaded)
    detector.predict_arrays(tensors[:batch_size])  # warm-up
    start = time.perf_counter()
    detector.predict_arrays(tensors)
    return len(tensors) / (time.perf_counter() - start), len(tensors)


def end_to_end(
    model: Path,
    folder: Path,
    executor: str,
    workers: int,
    batch_size: int,
    out: Path,
    spinning: str = runtime.SPINNING,
) -> float:
    """Files/s of a whole scan; ``spinning``: ONNX Runtime's intra-op spinning setting."""
    shutil.rmtree(out, ignore_errors=True)
    product, runtime.SPINNING = runtime.SPINNING, spinning  # read when the session opens
    config = ScanConfig(
        heatmaps="none", executor=executor, workers=workers, batch_size=batch_size, device="cpu"
    )
    try:
        start = time.perf_counter()
        result = scan(model, folder, out, config, progress=False)
        seconds = time.perf_counter() - start
    finally:
        runtime.SPINNING = product
    return (result.n_files - result.n_errors) / seconds  # scored files, as model_only


def peak_rss(model: Path, folder: Path, out: Path) -> dict:
    """A whole scan in a fresh process: its file count and peak resident memory."""
    peak, printed = fresh_process_peak(RSS_SCRIPT, str(model), str(folder), str(out))
    return {"files": int(printed.splitlines()[-1]), "peak_rss_mb": peak}


def compare(
    model: Path, folder: Path, batch_size: int, workers: int, work: Path, spinning: bool = False
) -> dict:
    """Model-only and end-to-end throughput on ``folder``; with ``spinning``, the thread
    scan again with ONNX Runtime's spinning threads on (its default) and off (ours)."""
    rate, scored = model_only(model, folder, batch_size)
    row = {
        "n_files": len(walk_images(folder, SCAN_EXTENSIONS)),
        "n_scored": scored,
        "model_only_images_per_s": rate,
    }
    for executor in ("thread", "process"):
        ips = end_to_end(model, folder, executor, workers, batch_size, work / executor)
        row[f"end_to_end_{executor}_images_per_s"] = ips
        row[f"end_to_end_{executor}_share_of_model_only"] = ips / row["model_only_images_per_s"]
    if spinning:
        for value in ("1", "0"):  # alternated after the runs above, each once more
            ips = end_to_end(model, folder, "thread", workers, batch_size, work / "s", value)
            row[f"end_to_end_thread_spinning_{value}_images_per_s"] = ips
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", type=Path, default=ROOT / "runs" / "suite" / "mtd" / "model.pt"
    )
    parser.add_argument("--mtd", type=Path, default=ROOT.parent / "shared" / "datasets" / "mtd")
    parser.add_argument(
        "--large-checkpoint",
        type=Path,
        default=ROOT / "runs" / "suite" / "kolektorsdd" / "model.pt",
        help="the default model at a large input (the suite's on 500 x 1250 images)",
    )
    parser.add_argument(
        "--large", type=Path, default=ROOT.parent / "shared" / "datasets" / "kolektorsdd"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "scan")
    parser.add_argument("--n-synthetic", type=int, default=10_000)
    parser.add_argument(
        "--batch-size", type=int, default=None, help="[default: the product's, from the input size]"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny synthetic model and folders")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="anomalyvae-scan-bench-"))
    if args.smoke:  # everything on tiny synthetic data, written to a temp folder
        data, args.checkpoint = smoke_model(work / "smoke")
        args.mtd, args.n_synthetic, args.batch_size = data / "test", 30, 4
        args.out, args.large_checkpoint, args.large = work / "report", args.checkpoint, data
    args.out.mkdir(parents=True, exist_ok=True)
    detector = VAEAnomalyDetector.load(args.checkpoint, progress=False)
    model = export_onnx(detector, work / "model.onnx").path
    if args.batch_size is None:  # the product's default: sized from the model input
        args.batch_size = OnnxDetector(model, device="cpu").batch_size

    results = {
        "machine": machine(),
        "matmul_peak_gflops": [matmul_peak()],
        "backbone": getattr(detector.model_.config, "backbone", None),
        "batch_size": args.batch_size,
        "workers": args.workers,
        "input": [
            detector.preprocessing_.channels,
            detector.preprocessing_.height,
            detector.preprocessing_.width,
        ],
    }
    results["mtd"] = compare(
        model, args.mtd, args.batch_size, args.workers, work / "mtd", spinning=True
    )
    synthetic = synthetic_folder(work / "synthetic", args.n_synthetic)
    results["synthetic"] = compare(model, synthetic, args.batch_size, args.workers, work / "syn")
    small = work / "small"
    shutil.copytree(synthetic / "batch00", small / "batch00")
    memory = {
        name: peak_rss(model, folder, work / f"rss{name}")
        for name, folder in (("1000", small), (str(args.n_synthetic), synthetic))
    }
    results["peak_rss"] = memory
    large = VAEAnomalyDetector.load(args.large_checkpoint, progress=False)
    large_model = export_onnx(large, work / "large.onnx").path
    large_batch = OnnxDetector(large_model, device="cpu").batch_size
    results["large"] = {
        "checkpoint": shown(args.large_checkpoint),
        "input": [
            large.preprocessing_.channels,
            large.preprocessing_.height,
            large.preprocessing_.width,
        ],
        "backbone": getattr(large.model_.config, "backbone", None),
        "batch_size": large_batch,
        **compare(large_model, args.large, large_batch, args.workers, work / "large"),
        "peak_rss": peak_rss(large_model, args.large, work / "rss-large"),
    }
    results["matmul_peak_gflops"].append(matmul_peak())
    (args.out / "results.json").write_text(json.dumps(results, indent=2))

    def line(name: str, row: dict) -> str:
        return (
            f"| {name} | {row['n_files']} ({row['n_scored']}) | "
            f"{row['model_only_images_per_s']:.1f} | "
            f"{row['end_to_end_thread_images_per_s']:.1f} "
            f"({100 * row['end_to_end_thread_share_of_model_only']:.0f} %) | "
            f"{row['end_to_end_process_images_per_s']:.1f} "
            f"({100 * row['end_to_end_process_share_of_model_only']:.0f} %) |"
        )

    peak_before, peak_after = results["matmul_peak_gflops"]
    text = [
        "# Scan throughput and memory"
        + (" (smoke run: meaningless numbers)" if args.smoke else ""),
        "",
        "Produced by `python pipelines/scan/bench.py`; every number comes from that run.",
        f"Machine: {machine()}; numpy float32 matmul peak {peak_before:.0f} GFLOP/s before, "
        f"{peak_after:.0f} GFLOP/s after. "
        f"Model input {results['input']} ({results['backbone'] or 'pixel model'}), batch "
        f"{args.batch_size}, {args.workers} decoding workers, heatmaps off (they are extra PNG "
        "writes).",
        "",
        "End to end = discovery, decoding and preprocessing on the worker pool, ONNX Runtime "
        "batches, per-file rows, Parquet/CSV, summary and HTML report. Model only = "
        "ONNX Runtime on the same tensors, already preprocessed in memory. Rates count "
        "scored files: a file the scan refuses (here the all-zero masks of defect-free "
        "tiles, which are blank) is decoded and becomes an error row, but is not counted.",
        "",
        "| folder | files (scored) | model only img/s | end to end, threads | "
        "end to end, processes |",
        "|---|---|---|---|---|",
        line(
            "synthetic test folder" if args.smoke else "MTD folder (JPEG tiles 103-632 px + masks)",
            results["mtd"],
        ),
        line("synthetic PNG 128 px", results["synthetic"]),
        line(
            f"large input {results['large']['input']} "
            f"({results['large']['backbone'] or 'pixel model'}, batch {large_batch}): "
            + ("synthetic" if args.smoke else "KolektorSDD 500 x 1250 folder (+ masks)"),
            results["large"],
        ),
        "",
        "ONNX Runtime's intra-op threads spinning between batches (its default) against not "
        "(the product's `session_options`), the MTD thread scan once more each: "
        f"{results['mtd']['end_to_end_thread_spinning_1_images_per_s']:.1f} against "
        f"{results['mtd']['end_to_end_thread_spinning_0_images_per_s']:.1f} files/s.",
        "",
        "Peak resident memory of a whole scan (fresh process each):",
        "",
        "| files (model input) | peak RSS MB |",
        "|---|---|",
        *[f"| {v['files']} | {v['peak_rss_mb']:.0f} |" for v in memory.values()],
        f"| {results['large']['peak_rss']['files']} at {results['large']['input']} | "
        f"{results['large']['peak_rss']['peak_rss_mb']:.0f} |",
        "",
    ]
    (args.out / "README.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
