"""The exported model from Node.js (onnxruntime-node) gives the same scores as Python.

Runs when `node` is installed and tests/node has its packages
(`npm install --ignore-scripts` there; CI does it); skips otherwise.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalyvae.export import export_onnx
from anomalyvae.inference.runtime import OnnxDetector

NODE_DIR = Path(__file__).parent / "node"
pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not (NODE_DIR / "node_modules" / "onnxruntime-node").is_dir(),
    reason="needs node and `npm install --ignore-scripts` in tests/node",
)


def test_node_matches_python(trained, tmp_path, scores_close):
    detector, _ = trained
    model = export_onnx(detector, tmp_path / "model.onnx").path
    rng = np.random.default_rng(3)
    images = []
    for i, (shape, dtype, top) in enumerate(
        [
            ((32, 32), np.uint8, 255),  # model size: no resize
            ((48, 40), np.uint8, 255),  # resized down, antialiased
            ((24, 28), np.uint8, 255),  # resized up
            ((40, 40), np.uint16, 65535),  # 16-bit
        ]
    ):
        path = tmp_path / f"img{i}.png"
        Image.fromarray((rng.random(shape) * top).astype(dtype)).save(path)
        images.append(path)
    result = subprocess.run(
        ["node", str(NODE_DIR / "score.mjs"), str(model), *map(str, images)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    node = json.loads(result.stdout)
    python = OnnxDetector(model, device="cpu").predict_files(images)
    assert node["threshold"] == pytest.approx(detector.threshold_, rel=1e-6)
    scores_close(
        [r["score"] for r in node["results"]], python.score, rel=1e-4, threshold=detector.threshold_
    )
    assert [r["is_anomaly"] for r in node["results"]] == python.is_anomaly.tolist()
