"""Distributed training: DistributedDataParallel over 2 CPU processes (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY

from anomalyvae.cli import main
from anomalyvae.data import mvtec_samples
from anomalyvae.detector import VAEAnomalyDetector
from anomalyvae.models.checkpoint import load_checkpoint
from anomalyvae.models.train import TrainConfig, train_vae
from anomalyvae.models.vae import VAEConfig

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="this torch has no torch.distributed"
)


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 1, 16, dtype=np.float32)[None, None, :] * np.ones((n, 1, 16, 16))
    return np.clip(base + 0.05 * rng.standard_normal((n, 1, 16, 16)), 0, 1).astype(np.float32)


SMALL = VAEConfig(height=16, width=16, in_channels=1, channels=(8, 16), latent_dim=4)


def test_two_processes_train_and_rank_zero_writes_the_checkpoint(tmp_path):
    checkpoint = tmp_path / "ddp.pt"
    config = TrainConfig(epochs=3, batch_size=8, patience=5, nproc=2)
    result = train_vae(
        SMALL, config, _images(40), _images(8, seed=1), checkpoint_path=checkpoint, progress=False
    )
    assert result.world_size == 2 and len(result.history) == 3
    # every epoch saw all 40 images once, split over the two ranks
    assert result.history[0]["train_loss"] > result.history[-1]["train_loss"]
    saved = load_checkpoint(checkpoint)
    assert saved["training"]["world_size"] == 2
    assert saved["training"]["epochs_run"] == 3
    assert list(tmp_path.iterdir()) == [checkpoint]  # no temp or per-rank files left
    # the returned model is rank 0's best weights
    for name, value in result.model.state_dict().items():
        assert torch.equal(value, saved["model_state"][name]), name


def test_detector_with_nproc_2_loads_and_scores(synthetic_root, tmp_path):
    paths = [s.path for s in mvtec_samples(synthetic_root, "train")]
    checkpoint = tmp_path / "model.pt"
    detector = VAEAnomalyDetector(
        checkpoint_path=checkpoint, **{**TINY, "epochs": 3, "nproc": 2}
    ).fit(paths)
    assert detector.training_summary_["world_size"] == 2
    loaded = VAEAnomalyDetector.load(checkpoint)
    assert loaded.nproc == 2
    test = mvtec_samples(synthetic_root, "test")[:6]
    scores = loaded.anomaly_score([s.path for s in test])
    assert np.isfinite(scores).all()
    np.testing.assert_allclose(scores, detector.anomaly_score([s.path for s in test]), rtol=1e-5)


def test_a_failing_worker_is_a_clear_error(tmp_path):
    config = TrainConfig(epochs=1, batch_size=8, nproc=2)
    bad = VAEConfig(height=16, width=16, in_channels=3, channels=(8, 16), latent_dim=4)
    with pytest.raises(RuntimeError, match="distributed training failed in a worker"):
        train_vae(bad, config, _images(16), _images(4), progress=False)  # 1 channel vs 3


def test_cli_nproc_2(synthetic_root, tmp_path):
    out = tmp_path / "cli.pt"
    result = CliRunner().invoke(
        main,
        ["train", str(synthetic_root), "-o", str(out), "--nproc", "2", "--epochs", "2"]
        + ["--image-size", "32", "--batch-size", "16", "--target-fpr", "0.1", "--silent"],
    )
    assert result.exit_code == 0, result.output
    assert "Saved" in result.output
    assert VAEAnomalyDetector.load(out).training_summary_["world_size"] == 2


def test_torchrun_launch_writes_one_checkpoint(synthetic_root, tmp_path):
    out = tmp_path / "torchrun.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        + ["-m", "anomalyvae", "train", str(synthetic_root), "-o", str(out)]
        + ["--epochs", "2", "--image-size", "32", "--batch-size", "16", "--target-fpr", "0.1"]
        + ["--silent"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=Path(__file__).parent,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("Saved") == 1  # rank 0 only
    detector = VAEAnomalyDetector.load(out)
    assert detector.training_summary_["world_size"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["torchrun.pt"]


def test_a_port_taken_before_rank_0_binds_it_is_tried_again(monkeypatch):
    """The free port is chosen, released, then bound by rank 0: another process can take
    it in between (Ray's workers start many listeners). The start is tried again on a new
    port instead of failing the training; a port taken every time still fails clearly."""
    import socket

    from anomalyvae.models import train

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    taken = busy.getsockname()[1]
    real = train._free_port
    ports = iter([taken, real()])
    monkeypatch.setattr(train, "_free_port", lambda: next(ports))
    config = VAEConfig(height=16, width=16, in_channels=1, channels=(8, 16), latent_dim=4)
    try:
        result = train_vae(
            config,
            TrainConfig(epochs=1, batch_size=8, nproc=2),
            _images(16),
            _images(4),
            progress=False,
        )
        assert result.world_size == 2
        monkeypatch.setattr(train, "_free_port", lambda: taken)
        with pytest.raises(RuntimeError, match="EADDRINUSE"):
            train_vae(
                config,
                TrainConfig(epochs=1, batch_size=8, nproc=2),
                _images(16),
                _images(4),
                progress=False,
            )
    finally:
        busy.close()
