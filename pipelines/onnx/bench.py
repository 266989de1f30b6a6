"""ONNX Runtime vs torch eager on the full scoring graph; fp32, fp16, int8; FLOPs and peak.

    python pipelines/onnx/bench.py [--checkpoint runs/suite/mtd/model.pt]
                                   [--data ../shared/datasets/mtd/split.json]
    python pipelines/onnx/bench.py --smoke      # a tiny synthetic model, one round (CI)

Exports the checkpoint (fp32; for the pixel model also fp16 and int8 calibrated on
training normals), then on the same
batches of test images, alternating configurations round by round (this machine is noisy),
measures images/s, single-image latency p50/p99, and image AUROC of each precision on the
test set. Also counts the model's FLOPs per image and measures this machine's dense float32
matmul peak (numpy) in the same run. Writes reports/onnx/{README.md,results.json,throughput.png}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "pipelines"))

import torch  # noqa: E402
from common import machine, map_label, matmul_peak, shown, smoke_model, timed  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from anomalyvae.data import discover  # noqa: E402
from anomalyvae.detector import VAEAnomalyDetector  # noqa: E402
from anomalyvae.export import export_all, torch_outputs, variant_path  # noqa: E402
from anomalyvae.imaging.batch import read_images  # noqa: E402
from anomalyvae.inference.runtime import OnnxDetector  # noqa: E402
from anomalyvae.models.maps import ScoringGraph  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "mtd" / "split.json"


def scoring_graph(detector: VAEAnomalyDetector) -> ScoringGraph:
    """The product's own scoring graph, with the normal statistics it was fitted with."""
    stats = getattr(detector, "map_stats_", None)
    return ScoringGraph(detector.model_.eval(), detector.scoring_, stats).eval()


def flops_per_image(detector: VAEAnomalyDetector) -> float:
    spec = detector.preprocessing_
    graph = scoring_graph(detector)
    x = torch.rand(1, spec.channels, spec.height, spec.width)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        graph(x)
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", type=Path, default=ROOT / "runs" / "suite" / "mtd" / "model.pt"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny synthetic model, one round")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "onnx")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--latency-runs", type=int, default=60)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    if args.smoke:  # everything below on a tiny synthetic set, written to a temp folder
        args.data, args.checkpoint = smoke_model(tmp)
        args.out, args.rounds, args.latency_runs, args.batch_size = tmp / "report", 1, 2, 8
    args.out.mkdir(parents=True, exist_ok=True)

    detector = VAEAnomalyDetector.load(args.checkpoint, progress=False)
    spec = detector.preprocessing_
    test = discover(args.data, "test")
    images, _, _ = read_images([s.path for s in test], spec, on_error="raise")
    labels = np.array([s.label for s in test])
    train = discover(args.data, "train")
    precisions = detector.family().export_precisions  # fp16/int8 where the family has them
    fp16, int8 = "fp16" in precisions, "int8" in precisions
    export_all(args.checkpoint, tmp / "model.onnx", args.data, fp16=fp16, int8=int8, max_images=64)
    paths = {"fp32": tmp / "model.onnx"}
    paths.update({p: variant_path(tmp / "model.onnx", p) for p in precisions if p != "fp32"})
    sessions = {
        k: OnnxDetector(p, device="cpu", batch_size=args.batch_size) for k, p in paths.items()
    }
    graph = scoring_graph(detector)

    def torch_run(batch: np.ndarray) -> None:
        with torch.no_grad():
            graph(torch.from_numpy(batch))

    runners = {
        "torch eager fp32": torch_run,
        **{f"onnxruntime {k}": (lambda b, s=s: s.predict_arrays(b)) for k, s in sessions.items()},
    }
    batch = images[: args.batch_size]
    for run in runners.values():  # warm-up
        run(batch)
    throughput: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(args.rounds):
        for name, run in runners.items():  # alternate within each round
            throughput[name].append(len(batch) / timed(lambda r=run: r(batch)))
    latency: dict[str, list[float]] = {k: [] for k in runners}
    for i in range(args.latency_runs):
        one = images[i % len(images)][None]
        for name, run in runners.items():
            latency[name].append(1000 * timed(lambda r=run, x=one: r(x)))
    flops = flops_per_image(detector)
    peak = matmul_peak()

    aurocs = {"torch eager fp32": roc_auc_score(labels, torch_outputs(detector, images)["score"])}
    for key, session in sessions.items():
        aurocs[f"onnxruntime {key}"] = roc_auc_score(labels, session.predict_arrays(images).score)

    base = float(np.median(throughput["torch eager fp32"]))
    rows = {}
    for name in runners:
        ips = float(np.median(throughput[name]))
        rows[name] = {
            "images_per_s_median": ips,
            "images_per_s_runs": throughput[name],
            "ratio_vs_torch": ips / base,
            "latency_ms_p50": float(np.percentile(latency[name], 50)),
            "latency_ms_p99": float(np.percentile(latency[name], 99)),
            "gflops_per_s": ips * flops / 1e9,
            "share_of_matmul_peak": ips * flops / 1e9 / peak,
            "image_auroc": float(aurocs[name]),
            "auroc_change_vs_fp32": float(aurocs[name] - aurocs["torch eager fp32"]),
        }
    results = {
        "machine": machine(),
        "checkpoint": shown(args.checkpoint),
        "input": [spec.channels, spec.height, spec.width],
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "model_family": detector.family_,
        "map_kind": detector.scoring_.map_kind,
        "map": map_label(detector),
        "score_kind": detector.scoring_.score_kind,
        "mflops_per_image": flops / 1e6,
        "matmul_peak_gflops": peak,
        "n_test_images": len(images),
        "n_train_listed": len(train),
        "configs": rows,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    names = list(rows)
    ax.barh(names, [rows[n]["images_per_s_median"] for n in names], color="#4a7bb7")
    ax.set(xlabel=f"images/s (batch {args.batch_size}, median of {args.rounds})")
    fig.tight_layout()
    fig.savefig(args.out / "throughput.png", dpi=120)
    plt.close(fig)

    lines = [
        "# ONNX Runtime vs torch eager: full scoring graph"
        + (" (smoke run: meaningless numbers)" if args.smoke else ""),
        "",
        "Produced by `python pipelines/onnx/bench.py`; every number comes from that run.",
        f"Machine: {machine()}.",
        f"Model: {shown(args.checkpoint)} ({detector.family_} family), input "
        f"{spec.channels}x{spec.height}x{spec.width}, "
        f"map `{map_label(detector)}`, score `{detector.scoring_.score_kind}`; "
        f"{flops / 1e6:.0f} MFLOP per image (torch FLOP counter, the whole scoring graph).",
        f"Dense float32 matmul peak measured in the same run (numpy, 2048^2): "
        f"**{peak:.0f} GFLOP/s**.",
        f"Throughput: batch {args.batch_size} of test images, configurations alternated "
        f"in each of {args.rounds} rounds, median reported. Latency: one image, "
        f"{args.latency_runs} runs. AUROC: all {len(images)} test images.",
        "",
        "| configuration | images/s | × torch | latency p50 ms | p99 ms | GFLOP/s "
        "| % of matmul peak | image AUROC | Δ AUROC |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['images_per_s_median']:.1f} | {r['ratio_vs_torch']:.2f} | "
            f"{r['latency_ms_p50']:.2f} | {r['latency_ms_p99']:.2f} | {r['gflops_per_s']:.0f} | "
            f"{100 * r['share_of_matmul_peak']:.0f} % | {r['image_auroc']:.3f} | "
            f"{r['auroc_change_vs_fp32']:+.3f} |"
        )
    lines += ["", "![throughput](throughput.png)", ""]
    (args.out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
