"""Scale-out: the Ray scan engine with 1 vs 2 workers, DDP training with 1 vs 2 processes.

    python pipelines/scale/bench.py [--checkpoint runs/mtd/pixel.pt] [--n-files 4000]
    python pipelines/scale/bench.py --smoke    # tiny synthetic model and folder (CI)

The checkpoint must hold a pixel model (DDP training is the pixel model's); the default,
runs/mtd/pixel.pt, is trained first when missing (`anomalyvae train MTD --model pixel`).

1. Scan a synthetic folder of 128 px PNGs with the Ray engine on a local Ray instance,
   1 and then 2 inference actors, and with the local engine, in one run (heatmaps off).
2. Measure the two stages alone on one core: decoding + preprocessing (files/s) and
   one-thread ONNX Runtime inference (images/s), to say which stage bounds a node.
3. Train the same model with DistributedDataParallel on 1 and 2 CPU processes (gloo)
   for a fixed number of epochs (images/s).
4. Project the scan to N nodes from the measured per-core rates, with the assumptions
   written out (see docs/scale-out.md).
Writes reports/scale/{README.md,results.json,projection.png}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "pipelines"))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from common import (  # noqa: E402
    PIXEL_CHECKPOINT,
    machine,
    matmul_peak,
    pixel_checkpoint,
    shown,
    smoke_model,
    synthetic_folder,
)

from anomalyvae.data import synthetic_texture  # noqa: E402
from anomalyvae.detector import VAEAnomalyDetector  # noqa: E402
from anomalyvae.export import export_onnx  # noqa: E402
from anomalyvae.imaging.files import walk_images  # noqa: E402
from anomalyvae.inference.decoding import SCAN_EXTENSIONS, decode_file  # noqa: E402
from anomalyvae.inference.ray_engine import connect, scan_on_ray  # noqa: E402
from anomalyvae.inference.runtime import OnnxDetector  # noqa: E402
from anomalyvae.inference.scan import ScanConfig, scan  # noqa: E402
from anomalyvae.models.train import TrainConfig, train_vae  # noqa: E402
from anomalyvae.models.vae import VAEConfig  # noqa: E402


def timed_scan(model: Path, folder: Path, out: Path, config: ScanConfig) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    engine = scan_on_ray if config.engine == "ray" else None
    result = scan(model, folder, out, config, progress=False, engine=engine)
    seconds = time.perf_counter() - start
    return {
        "files": result.n_files,
        "seconds": seconds,
        "images_per_s": result.n_files / seconds,
        "engine": result.summary.get("engine", {}),
    }


def stage_rates(model: Path, folder: Path, batch_size: int) -> dict:
    """Per-core rates of the two stages: decoding alone, one-thread inference alone."""
    detector = OnnxDetector(model, device="cpu", batch_size=batch_size, intra_op_threads=1)
    paths = walk_images(folder, SCAN_EXTENSIONS)[:1000]
    start = time.perf_counter()
    tensors = np.stack(
        [decode_file(i, p, detector.preprocessing).pixels for i, p in enumerate(paths)]
    )
    decode = len(paths) / (time.perf_counter() - start)
    detector.predict_arrays(tensors[:batch_size])  # warm-up
    start = time.perf_counter()
    detector.predict_arrays(tensors[:512])
    infer = 512 / (time.perf_counter() - start)
    size = float(np.mean([p.stat().st_size for p in paths]))
    return {"decode_files_per_s": decode, "infer_images_per_s": infer, "mean_file_bytes": size}


def driver_rate(work: Path, n_rows: int = 100_000) -> float:
    """Result rows/s the driver can write as Parquet parts (the one serial step)."""
    from anomalyvae.inference.records import COLUMNS, PartWriter

    parts = work / "driver-parts"
    parts.mkdir(parents=True, exist_ok=True)
    row = {c: 0 for c in COLUMNS} | {
        "path": "/shared/archive/line3/2026-11-25/batch07/img_000123.png",
        "relative_path": "batch07/img_000123.png",
        "heatmap": "",
        "error": "",
        "model_hash": "0" * 64,
        "is_anomaly": False,
    }
    writer = PartWriter(parts, chunk_rows=512)
    start = time.perf_counter()
    for _ in range(n_rows // 512):
        writer.add([dict(row) for _ in range(512)])
    writer.flush()
    return (n_rows // 512) * 512 / (time.perf_counter() - start)


def ddp_rate(config: VAEConfig, nproc: int, images: np.ndarray, epochs: int) -> dict:
    train = TrainConfig(epochs=epochs, batch_size=32, patience=epochs, nproc=nproc)
    start = time.perf_counter()
    result = train_vae(config, train, images, images[:32], progress=False)
    seconds = time.perf_counter() - start
    return {
        "nproc": nproc,
        "epochs": epochs,
        "seconds_with_startup": seconds,
        "training_seconds": result.elapsed_s,
        "images_per_s": epochs * len(images) / result.elapsed_s,
        "final_train_loss": result.history[-1]["train_loss"],
    }


def project(rates: dict, cores_per_node: int, nodes: list[int], storage_mb_s: float) -> list:
    """Files/s of N nodes.

    Each node splits its cores between decoding and inference so both stages run at the
    same rate; the cluster is capped by the shared storage and by the driver, which
    writes every result row.
    """
    d, i = rates["decode_files_per_s"], rates["infer_images_per_s"]
    per_node = cores_per_node / (1 / d + 1 / i)  # cores split in proportion to cost
    caps = {
        "storage": storage_mb_s * 1e6 / rates["mean_file_bytes"],
        "driver": rates["driver_rows_per_s"],
    }
    out = []
    for n in nodes:
        limits = {"compute": n * per_node, **caps}
        bound = min(limits, key=limits.get)
        out.append(
            {
                "nodes": n,
                "compute_bound_files_per_s": n * per_node,
                "storage_cap_files_per_s": caps["storage"],
                "driver_cap_files_per_s": caps["driver"],
                "projected_files_per_s": limits[bound],
                "bound": bound,
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=PIXEL_CHECKPOINT,
        help="a pixel-model checkpoint; the default is trained on MTD when missing",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "scale")
    parser.add_argument("--n-files", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-images", type=int, default=512)
    parser.add_argument("--train-epochs", type=int, default=2)
    parser.add_argument("--cores-per-node", type=int, default=32)
    parser.add_argument("--storage-mb-s", type=float, default=1000.0)
    parser.add_argument(
        "--render-only", action="store_true", help="Rewrite README.md from results.json."
    )
    parser.add_argument("--smoke", action="store_true", help="tiny synthetic model and folder")
    args = parser.parse_args()
    if args.smoke:  # everything on tiny synthetic data, written to a temp folder
        smoke = Path(tempfile.mkdtemp(prefix="anomalyvae-scale-smoke-"))
        _, args.checkpoint = smoke_model(smoke)
        args.out, args.n_files, args.train_images, args.train_epochs = smoke / "report", 40, 16, 1
    args.out.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        render(json.loads((args.out / "results.json").read_text()), args.out)
        return
    work = Path(tempfile.mkdtemp(prefix="anomalyvae-scale-bench-"))
    detector = VAEAnomalyDetector.load(pixel_checkpoint(args.checkpoint), progress=False)
    model = export_onnx(detector, work / "model.onnx").path
    folder = synthetic_folder(work / "in", args.n_files)
    cpus = os.cpu_count() or 1

    results: dict = {
        "machine": machine(),
        "matmul_gflops": round(matmul_peak(), 1),
        "cpus": cpus,
        "checkpoint": shown(args.checkpoint),
        "n_files": args.n_files,
        "batch_size": args.batch_size,
        "train_images": args.train_images,
        "train_epochs": args.train_epochs,
    }
    ray = connect(None, num_cpus=cpus)
    results["ray_version"] = ray.__version__
    scans = {}
    base = ScanConfig(heatmaps="none", batch_size=args.batch_size, device="cpu")
    # alternate the order over two rounds so drift on a shared machine hits both alike
    # (a smoke run proves the pipeline runs: one round; Ray's worker starts dominate it)
    for round_ in range(1 if args.smoke else 2):
        order = ("ray_1", "ray_2", "local") if round_ == 0 else ("local", "ray_2", "ray_1")
        for name in order:
            config = (
                base
                if name == "local"
                else ScanConfig(**{**base.__dict__, "engine": "ray", "ray_workers": int(name[-1])})
            )
            run = timed_scan(model, folder, work / f"out-{name}", config)
            scans.setdefault(name, []).append(run)
    ray.shutdown()
    best = {k: max(v, key=lambda r: r["images_per_s"]) for k, v in scans.items()}
    results["scan"] = {"runs": scans, "best": best}
    results["scan_ratio_2_vs_1_ray_workers"] = (
        best["ray_2"]["images_per_s"] / best["ray_1"]["images_per_s"]
    )
    results["ray_2_vs_local"] = best["ray_2"]["images_per_s"] / best["local"]["images_per_s"]
    rates = stage_rates(model, folder, args.batch_size)
    rates["driver_rows_per_s"] = driver_rate(work)
    results["stage_rates_one_core"] = rates

    spec = detector.preprocessing_
    results["input"] = [spec.channels, spec.height, spec.width]
    config = VAEConfig.from_dict(
        {**detector.model_.config.to_dict(), "channels": tuple(detector.model_.config.channels)}
    )
    images = np.stack(
        [
            synthetic_texture(np.random.default_rng(i), spec.height)[None]
            for i in range(args.train_images)
        ]
    ).astype(np.float32)
    images = np.clip(images, 0, 1)
    ddp = [ddp_rate(config, n, images, args.train_epochs) for n in (1, 2)]
    results["ddp"] = ddp
    results["ddp_ratio_2_vs_1"] = ddp[1]["images_per_s"] / ddp[0]["images_per_s"]

    nodes = [1, 2, 4, 8, 16, 32, 64]
    results["projection"] = {
        "cores_per_node": args.cores_per_node,
        "storage_mb_s": args.storage_mb_s,
        "nodes": project(rates, args.cores_per_node, nodes, args.storage_mb_s),
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    render(results, args.out)
    shutil.rmtree(work, ignore_errors=True)
    if args.smoke:
        print(f"smoke run: wrote {args.out}")


def render(results: dict, out: Path) -> None:
    """README.md and projection.png from a run's results.json."""
    cpus, scans, best = results["cpus"], results["scan"]["runs"], results["scan"]["best"]
    rates, ddp = results["stage_rates_one_core"], results["ddp"]
    rows = results["projection"]["nodes"]
    nodes = [r["nodes"] for r in rows]
    cores_per_node = results["projection"]["cores_per_node"]
    storage_mb_s = results["projection"]["storage_mb_s"]
    channels, height, width = results["input"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(nodes, [r["compute_bound_files_per_s"] for r in rows], "o--", label="compute bound")
    ax.plot(
        nodes, [r["projected_files_per_s"] for r in rows], "o-", label="with storage/driver caps"
    )
    ax.axhline(rows[0]["storage_cap_files_per_s"], color="grey", lw=0.8, ls=":")
    ax.axhline(rows[0]["driver_cap_files_per_s"], color="grey", lw=0.8, ls="-.")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(f"nodes ({cores_per_node} cores each)")
    ax.set_ylabel("files / s")
    ax.set_title("Projected Ray scan throughput")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "projection.png", dpi=120)
    plt.close(fig)

    def scan_line(name: str, label: str) -> str:
        runs = scans[name]
        return (
            f"| {label} | {best[name]['images_per_s']:.1f} | "
            + ", ".join(f"{r['images_per_s']:.1f}" for r in runs)
            + " |"
        )

    per_day = rows[-1]["projected_files_per_s"] * 86400
    text = [
        "# Scale-out: Ray scan workers and DDP training processes",
        "",
        "Produced by `python pipelines/scale/bench.py`; every number comes from that run.",
        f"Machine: {results['machine']} ({cpus} CPUs, no GPU). Model "
        f"`{results['checkpoint']}` (input {channels}x{height}x{width}), "
        f"{results['n_files']} synthetic 128 px PNGs, batch {results['batch_size']}, heatmaps "
        f"off. Ray {results['ray_version']} on a "
        "local instance."
        + (
            " Dense float32 matmul peak measured in the same run (numpy, 2048²): "
            f"**{results['matmul_gflops']:.0f} GFLOP/s**."
            if "matmul_gflops" in results
            else ""
        ),
        "",
        "## Scan: 1 vs 2 Ray inference workers",
        "",
        "| engine | best img/s | both rounds |",
        "|---|---|---|",
        scan_line("ray_1", "Ray, 1 inference actor"),
        scan_line("ray_2", "Ray, 2 inference actors"),
        scan_line("local", "local engine (threads, for reference)"),
        "",
        f"**2 vs 1 worker: {results['scan_ratio_2_vs_1_ray_workers']:.2f}x.** "
        f"Ray with 2 workers vs the local engine: {results['ray_2_vs_local']:.2f}x. "
        f"On {cpus} cores the two actors share the cores with the decoding tasks, so this "
        "ratio is bounded by the machine, not by the engine; see the stage rates below.",
        "",
        "## Stage rates on one core",
        "",
        f"- decoding + preprocessing: {rates['decode_files_per_s']:.0f} files/s "
        f"(mean file {rates['mean_file_bytes'] / 1e3:.1f} kB)",
        f"- ONNX Runtime, one thread: {rates['infer_images_per_s']:.0f} images/s",
        f"- so a node spends {100 * (1 / rates['infer_images_per_s']) / (1 / rates['decode_files_per_s'] + 1 / rates['infer_images_per_s']):.0f} % "  # noqa: E501
        "of its core time on inference: the scan is compute-bound (inference) here.",
        "",
        "## Training: DistributedDataParallel, 1 vs 2 CPU processes (gloo)",
        "",
        "| processes | img/s | training s | final train loss |",
        "|---|---|---|---|",
        *[
            f"| {r['nproc']} | {r['images_per_s']:.1f} | {r['training_seconds']:.1f} | "
            f"{r['final_train_loss']:.1f} |"
            for r in ddp
        ],
        "",
        f"**2 vs 1 process: {results['ddp_ratio_2_vs_1']:.2f}x** ({results['train_images']} "
        f"images of {height} px, {results['train_epochs']} epochs, batch 32 per process). One "
        f"process already uses all {cpus} cores through torch's intra-op threads; two "
        "processes get half each, so on one machine the gain can only come from better "
        "core use, and each step adds a gradient all-reduce. DDP pays off across GPUs or "
        "nodes, where each process brings its own compute.",
        "",
        "## Projection to N nodes",
        "",
        f"Assumptions: {cores_per_node}-core CPU nodes with this machine's per-core rates; "
        "each node splits its cores between decoding and inference in proportion to their "
        "cost; workers are independent (no shared state but the object store), so compute "
        f"scales linearly until the shared storage delivers {storage_mb_s:.0f} MB/s "
        f"(files of {rates['mean_file_bytes'] / 1e3:.1f} kB); the driver, the one serial "
        f"step, writes result rows as Parquet parts at {rates['driver_rows_per_s']:.0f} rows/s "
        "(measured here). Large JPEGs shift the balance towards decoding; GPU nodes shift "
        "it further (inference becomes cheap; decoding, storage and the driver bound).",
        "",
        "| nodes | compute-bound files/s | storage cap | driver cap | projected files/s | bound |",
        "|---|---|---|---|---|---|",
        *[
            f"| {r['nodes']} | {r['compute_bound_files_per_s']:.0f} | "
            f"{r['storage_cap_files_per_s']:.0f} | {r['driver_cap_files_per_s']:.0f} | "
            f"{r['projected_files_per_s']:.0f} | {r['bound']} |"
            for r in rows
        ],
        "",
        f"At {nodes[-1]} nodes that is {per_day / 1e6:,.0f} million files a day; one node "
        f"({cores_per_node} cores) {rows[0]['projected_files_per_s'] * 86400 / 1e6:,.0f} "
        "million.",
        "",
        "![projection](projection.png)",
        "",
    ]
    (out / "README.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
