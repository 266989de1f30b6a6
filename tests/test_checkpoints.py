"""Old checkpoint formats load and score as they did (fixtures in tests/fixtures)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from anomalyvae.detector import VAEAnomalyDetector
from anomalyvae.models.checkpoint import read_checkpoint

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FORMATS = sorted(p.stem for p in FIXTURES.glob("*.pt"))


def test_every_format_has_a_fixture():
    assert "pixel-before-families" in FORMATS


@pytest.mark.parametrize("name", FORMATS)
def test_an_old_checkpoint_loads_and_scores_as_it_did(name, scores_close):
    expected = json.loads((FIXTURES / f"{name}.json").read_text())
    images = np.load(FIXTURES / f"{name}.images.npy")
    detector = VAEAnomalyDetector.load(FIXTURES / f"{name}.pt", progress=False)
    assert detector.threshold_ == pytest.approx(expected["threshold"], rel=1e-6)
    scores_close(
        detector.anomaly_score(images),
        expected["scores"],
        rel=1e-4,
        threshold=expected["threshold"],
    )


def test_the_reader_migrates_the_header_of_a_checkpoint_from_before_the_families():
    state = read_checkpoint(FIXTURES / "pixel-before-families.pt")
    assert state["model_family"] == "pixel"  # written before there was a second family
    detector = VAEAnomalyDetector.load(FIXTURES / "pixel-before-families.pt", progress=False)
    assert detector.family_ == "pixel" and detector.scoring_.ssim_sigma == 1.5
    assert detector.map_stats_.view_center is None  # no fused score: it was never fitted
