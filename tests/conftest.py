"""Shared fixtures: a tiny synthetic MVTec-style dataset and a detector trained on it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest


def _share_the_cores_between_workers() -> None:
    """Under pytest-xdist, give each worker its share of the cores, before torch starts.

    Every worker otherwise starts torch (and the pipelines' subprocesses, which inherit
    the environment) with one thread per core: N workers then run N x cores threads on
    the cores and spin against each other. A thread count the caller set is kept.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))


_share_the_cores_between_workers()

# after the thread setting: the package imports torch
from anomalyvae.data import make_synthetic_dataset, mvtec_samples  # noqa: E402
from anomalyvae.detector import VAEAnomalyDetector  # noqa: E402

# Small enough for seconds on 2 CPU cores, big enough to rank defects well.
TINY = dict(
    hidden_channels=(16, 32, 64),
    latent_dim=16,
    epochs=15,
    batch_size=16,
    patience=15,
    target_fpr=0.1,
    progress=False,
    seed=0,
)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("synthetic"),
        n_train=100,
        n_test_good=20,
        n_test_defect=30,
        size=32,
        seed=1,
    )


@pytest.fixture(scope="session")
def trained(synthetic_root, tmp_path_factory) -> tuple[VAEAnomalyDetector, Path]:
    """A detector fitted on the synthetic train set, and its saved checkpoint."""
    checkpoint = tmp_path_factory.mktemp("model") / "model.pt"
    paths = [s.path for s in mvtec_samples(synthetic_root, "train")]
    detector = VAEAnomalyDetector(checkpoint_path=checkpoint, **TINY).fit(paths)
    return detector, checkpoint


@pytest.fixture(scope="session")
def onnx_model(trained, tmp_path_factory) -> Path:
    """The trained detector exported to ONNX."""
    from anomalyvae.export import export_onnx

    detector, _ = trained
    return export_onnx(detector, tmp_path_factory.mktemp("exported") / "model.onnx").path


def assert_scores_close(actual, expected, rel: float, threshold: float | None = None) -> None:
    """Scores agree within ``rel`` of their own scale, on any machine.

    A relative tolerance alone is a coin toss for scores near zero (fused z-scores cross
    zero), so the absolute part is ``rel`` times the score's scale: the larger of the
    spread of the expected scores and the threshold's magnitude.
    """
    expected = np.asarray(expected, dtype=np.float64)
    scale = max(float(np.ptp(expected)) if expected.size else 0.0, abs(threshold or 0.0), 1e-12)
    np.testing.assert_allclose(actual, expected, rtol=rel, atol=rel * scale)


@pytest.fixture
def scores_close():
    """The scale-aware score comparison, as a fixture (test modules do not import conftest)."""
    return assert_scores_close
