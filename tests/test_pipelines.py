"""Every benchmark pipeline with a smoke mode runs end to end on tiny synthetic data.

So that no report can go stale silently: a code change that breaks a pipeline fails
here, not months later when someone regenerates its report.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


@pytest.mark.parametrize(
    ("script", "outputs"),
    [
        ("suite/run.py", ["README.md", "results.json", "experiments.md", "auroc.png", "loso.md"]),
        ("onnx/bench.py", ["README.md", "results.json", "throughput.png"]),
        ("suite/drift.py", ["drift.md", "drift.json"]),
        ("suite/bank.py", ["bank.md", "bank.json"]),
        ("suite/reductions.py", ["reductions.md", "reductions.json"]),
        ("scan/bench.py", []),
        ("generative/run.py", []),
        ("mtd/run.py", []),
        ("pneumonia/run.py", []),
        ("scale/bench.py", []),
        ("cuda/bench.py", ["README.md", "results.json"]),
    ],
)
def test_pipeline_smoke_mode(script, outputs, tmp_path):
    args = [sys.executable, str(PIPELINES / script), "--smoke"]
    if script.startswith(("suite", "cuda")):
        args += ["--out", str(tmp_path / "report")]
    if script in ("suite/drift.py", "suite/bank.py", "suite/reductions.py"):
        completed = subprocess.run(args, capture_output=True, text=True, timeout=900)
        assert completed.returncode == 0, completed.stderr[-3000:]
        for name in outputs:
            assert (tmp_path / "report" / name).is_file(), name
        return
    completed = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    if script == "cuda/bench.py":
        results = json.loads((tmp_path / "report" / "results.json").read_text())
        assert results["evaluation"]["image_auroc"] is not None
        assert all(r["images_per_s"] > 0 for r in results["throughput"].values())
    if script.startswith("suite"):
        for name in outputs:
            assert (tmp_path / "report" / name).is_file(), name
        results = json.loads((tmp_path / "report" / "results.json").read_text())
        families = {r["defaults"]["model_family"] for r in results["sets"].values()}
        assert families == {"pixel", "feature"}  # auto picks by size: both are exercised
        readme = (tmp_path / "report" / "README.md").read_text()
        assert "Smoke run" in readme and "min for all sets" in readme
    else:
        assert "smoke run" in completed.stdout


def test_suite_logs_a_variant(tmp_path):
    """`--variant` trains with extra options and appends one line to variants.jsonl."""
    out = tmp_path / "report"
    args = [sys.executable, str(PIPELINES / "suite/run.py"), "--smoke", "--out", str(out)]
    args += ["--variant", "pixel-64", "--train-args", "--model pixel --image-size 64"]
    completed = subprocess.run(
        [*args, "--sets", "synthetic96"], capture_output=True, text=True, timeout=900
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    (line,) = (out / "variants.jsonl").read_text().splitlines()
    entry = json.loads(line)
    assert entry["variant"] == "pixel-64"
    assert entry["train_args"] == ["--model", "pixel", "--image-size", "64"]
    defaults = entry["sets"]["synthetic96"]["defaults"]
    assert defaults["model_family"] == "pixel" and defaults["input_size"] == [64, 64]


def test_suite_header_says_when_a_table_mixes_runs():
    import importlib.util

    spec = importlib.util.spec_from_file_location("suite_run", PIPELINES / "suite/run.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    timed = {"a": {"seconds": 60.0}, "b": {"seconds": 120.0}}
    assert suite.run_time({"sets": timed}, 60.0).startswith("3 min for all sets")
    mixed = {"sets": {"a": {"code": "new"}, "b": {"code": "old"}}, "code": "new"}
    assert suite.run_time(mixed, 360.0).startswith("this run, of a only: 6 min")
    recorded = {"sets": {"a": {}, "b": {}}, "sets_run": ["b"]}
    assert suite.run_time(recorded, 120.0).startswith("this run, of b only: 2 min")
