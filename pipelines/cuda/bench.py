"""The CUDA path measured: train and score the default model on a GPU, against that machine's CPU.

    python pipelines/cuda/bench.py [--data ../shared/datasets/mvtec_screw] [--budget 300]
    python pipelines/cuda/bench.py --smoke   # tiny synthetic set, one epoch, CPU without GPU (CI)

On a machine with CUDA: ``anomalyvae train DATA --device cuda --time-budget BUDGET`` and
``anomalyvae evaluate`` (the CLI, as a user runs it), then the trained model's scoring
throughput in one run, rounds alternating: torch eager on the GPU (two batch sizes), torch
eager on the CPU, and the exported ONNX graph under ONNX Runtime with every provider it
offers. The GPU's float32 and bfloat16 matmul peaks and numpy's float32 peak on the CPU are
measured in the same run. Writes reports/cuda/{README.md,results.json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "pipelines"))

import torch  # noqa: E402
from common import cli, machine, matmul_peak, shown  # noqa: E402

from anomalyvae.data import discover, make_synthetic_dataset  # noqa: E402
from anomalyvae.detector import VAEAnomalyDetector  # noqa: E402
from anomalyvae.export import export_onnx  # noqa: E402
from anomalyvae.inference.runtime import OnnxDetector  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "mvtec_screw"
OUT = ROOT / "reports" / "cuda"
ROUNDS = 3


def gpu_matmul_peak(dtype: torch.dtype, n: int = 8192, repeats: int = 10) -> float:
    """Dense matmul TFLOP/s on the GPU (float32 without TF32, or bfloat16)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def timed_rate(fn, n_images: int) -> float:
    """Images per second of one call of ``fn`` (which scores ``n_images``)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return n_images / (time.perf_counter() - start)


def throughput(checkpoint: Path, images: np.ndarray, work: Path, device: str) -> dict:
    """Images/s of each configuration, rounds alternating; scores compared to the CPU's."""
    configs: dict[str, tuple] = {}
    gpu = device == "cuda"
    for batch in (32, 128) if gpu else (32,):
        detector = VAEAnomalyDetector.load(checkpoint, device=device, progress=False)
        detector.batch_size = batch
        configs[f"torch eager, {device}, batch {batch}"] = (detector.anomaly_score, detector)
    cpu = VAEAnomalyDetector.load(checkpoint, device="cpu", progress=False)
    configs["torch eager, cpu, batch 32"] = (cpu.anomaly_score, cpu)
    onnx_path = work / "model.onnx"
    export_onnx(cpu, onnx_path)
    session = OnnxDetector(onnx_path, device="auto")
    configs[f"onnxruntime {'+'.join(session.providers)}"] = (
        lambda batch: session.predict_arrays(batch).score,
        session,
    )
    reference = cpu.anomaly_score(images)
    spread = float(np.std(reference)) or 1.0
    rates: dict[str, list[float]] = {name: [] for name in configs}
    agreement = {}
    for name, (score, _) in configs.items():  # warm-up: kernels, allocator, ORT arenas
        scores = np.asarray(score(images[:64]))
        agreement[name] = float(np.max(np.abs(scores - reference[: len(scores)])) / spread)
    for _ in range(ROUNDS):
        for name, (score, _) in configs.items():
            rates[name].append(timed_rate(lambda s=score: s(images), len(images)))
    return {
        name: {"images_per_s": float(np.median(r)), "rounds": r, "max_diff_in_sd": agreement[name]}
        for name, r in rates.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--budget", type=float, default=300.0, help="training time budget, s")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = args.work or Path(tempfile.mkdtemp(prefix="cuda-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = args.data
    if args.smoke:
        data = make_synthetic_dataset(
            work / "data", n_train=40, n_test_good=8, n_test_defect=8, size=96
        )
    model = work / "model.pt"
    train_args = ["train", str(data), "-o", str(model), "--device", device, "--silent"]
    train_args += ["--epochs", "1"] if args.smoke else ["--time-budget", f"{args.budget:g}"]
    print(f"training on {device}", flush=True)
    train_s = cli(*train_args)
    print("evaluating", flush=True)
    cli("evaluate", str(model), str(data), "-o", str(work / "eval"), "--silent")
    overall = json.loads((work / "eval" / "metrics.json").read_text())["metrics"]["overall"]
    detector = VAEAnomalyDetector.load(model, progress=False)
    test = [s.path for s in discover(data, "test")]
    images = detector.preprocess(test)
    print(f"throughput on {len(images)} test images", flush=True)
    rates = throughput(model, images, work, device)
    peaks = {"numpy_fp32_gflops": matmul_peak()}
    if device == "cuda":
        peaks["gpu_fp32_tflops"] = gpu_matmul_peak(torch.float32)
        peaks["gpu_bf16_tflops"] = gpu_matmul_peak(torch.bfloat16)
    summary = detector.training_summary_
    results = {
        "machine": machine(),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (no CUDA device)",
        "data": shown(data),
        "smoke": args.smoke,
        "model": {
            "family": detector.family_,
            "input": [detector.preprocessing_.height, detector.preprocessing_.width],
            "score_kind": detector.scoring_.score_kind,
        },
        "training": {
            "budget_s": None if args.smoke else args.budget,
            "wall_s": round(train_s, 1),
            "fit_s": round(summary["elapsed_s"], 1),
            "epochs_run": summary["epochs_run"],
            "best_epoch": summary["best_epoch"],
            "stopped": summary["stopped_reason"],
        },
        "evaluation": {k: overall.get(k) for k in ("image_auroc", "pixel_auroc", "aupro")},
        "n_images": len(images),
        "throughput": rates,
        "peaks": peaks,
    }
    out = work / "report" if args.smoke and args.out == OUT else args.out
    write(results, out)
    if args.smoke:
        print(f"smoke run: wrote {out} (its numbers mean nothing)")


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    t, e = results["training"], results["evaluation"]
    cpu_rate = results["throughput"]["torch eager, cpu, batch 32"]["images_per_s"]
    rows = [
        f"| {name} | {r['images_per_s']:.1f} | {r['images_per_s'] / cpu_rate:.2f}x | "
        f"{r['max_diff_in_sd']:.1e} |"
        for name, r in results["throughput"].items()
    ]
    metrics = ", ".join(f"{k} {v:.3f}" for k, v in e.items() if v is not None)
    peaks = ", ".join(f"{k} {v:.1f}" for k, v in results["peaks"].items())
    lines = [
        "# The CUDA path: training and scoring on a GPU",
        "",
        "Regenerate on a machine with CUDA: `python pipelines/cuda/bench.py` "
        "(CI runs `--smoke`, which trains one epoch on a tiny synthetic set, on the CPU "
        "when there is no GPU: its numbers mean nothing).",
        "",
        f"Device: **{results['device']}**; host: {results['machine']}. Data: "
        f"`{results['data']}`{' (smoke)' if results['smoke'] else ''}.",
        "",
        "## Training (`anomalyvae train DATA --device cuda`, then `anomalyvae evaluate`)",
        "",
        f"- Model: {results['model']['family']} "
        f"{'x'.join(map(str, results['model']['input']))}, score {results['model']['score_kind']}.",
        f"- Wall clock {t['wall_s']} s (fit {t['fit_s']} s; budget {t['budget_s']} s): "
        f"{t['epochs_run']} epochs, best {t['best_epoch']}, stopped by {t['stopped']}.",
        f"- Test set: {metrics}.",
        "",
        f"## Scoring throughput ({results['n_images']} test images, preprocessed in memory; "
        f"median of {ROUNDS} alternating rounds)",
        "",
        "| configuration | images/s | vs torch CPU | largest score gap to torch CPU (SDs) |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Matmul peaks in the same run: {peaks} (GFLOP/s for numpy, TFLOP/s for the GPU).",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
