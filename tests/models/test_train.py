from __future__ import annotations

import numpy as np
import pytest
import torch

from anomalyvae.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from anomalyvae.models.train import TrainConfig, train_vae
from anomalyvae.models.vae import VAEConfig

CONFIG = VAEConfig(height=16, width=16, channels=(8, 16), latent_dim=4)


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    base = np.linspace(0.2, 0.8, 16, dtype=np.float32)[None, None, None, :]
    return np.clip(base + rng.normal(0, 0.05, (n, 1, 16, 16)), 0, 1).astype(np.float32)


def test_training_lowers_the_loss():
    result = train_vae(
        CONFIG,
        TrainConfig(epochs=12, batch_size=8, patience=50),
        _images(48),
        _images(8, 1),
        progress=False,
    )
    history = result.history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert min(h["val_elbo"] for h in history) < history[0]["val_elbo"]
    assert not result.model.training


def test_checkpoint_loads_weights_only_and_resume_continues(tmp_path):
    path = tmp_path / "run.pt"
    train_vae(
        CONFIG,
        TrainConfig(epochs=3, batch_size=8),
        _images(32),
        _images(8, 1),
        checkpoint_path=path,
        progress=False,
    )
    raw = torch.load(path, weights_only=True)  # must not need arbitrary unpickling
    assert raw["resume"]["epoch"] == 3 and raw["training"]["stopped_reason"] == "max_epochs"
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temp file
    resumed = train_vae(
        CONFIG,
        TrainConfig(epochs=5, batch_size=8),
        _images(32),
        _images(8, 1),
        checkpoint_path=path,
        resume=True,
        progress=False,
    )
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4, 5]
    assert load_checkpoint(path)["resume"]["epoch"] == 5


def test_resume_is_equivalent_to_an_uninterrupted_run(tmp_path):
    straight = train_vae(
        CONFIG,
        TrainConfig(epochs=4, batch_size=8),
        _images(32),
        _images(8, 1),
        checkpoint_path=tmp_path / "a.pt",
        progress=False,
    )
    train_vae(
        CONFIG,
        TrainConfig(epochs=2, batch_size=8),
        _images(32),
        _images(8, 1),
        checkpoint_path=tmp_path / "b.pt",
        progress=False,
    )
    resumed = train_vae(
        CONFIG,
        TrainConfig(epochs=4, batch_size=8),
        _images(32),
        _images(8, 1),
        checkpoint_path=tmp_path / "b.pt",
        resume=True,
        progress=False,
    )
    for a, b in zip(straight.history, resumed.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


def test_resume_with_other_config_or_missing_file_fails(tmp_path):
    path = tmp_path / "run.pt"
    train_vae(
        CONFIG,
        TrainConfig(epochs=1, batch_size=8),
        _images(16),
        _images(4, 1),
        checkpoint_path=path,
        progress=False,
    )
    other = VAEConfig(height=16, width=16, channels=(8, 16), latent_dim=5)
    with pytest.raises(CheckpointError, match="different model configuration"):
        train_vae(
            other,
            TrainConfig(epochs=2),
            _images(16),
            _images(4, 1),
            checkpoint_path=path,
            resume=True,
            progress=False,
        )
    with pytest.raises(CheckpointError, match="does not exist"):
        train_vae(
            CONFIG,
            TrainConfig(epochs=2),
            _images(16),
            _images(4, 1),
            checkpoint_path=tmp_path / "none.pt",
            resume=True,
            progress=False,
        )


def test_early_stopping_and_time_budget():
    stopped = train_vae(
        CONFIG,
        TrainConfig(epochs=50, batch_size=8, patience=1, learning_rate=0.5),
        _images(16),
        _images(4, 1),
        progress=False,
    )
    assert stopped.stopped_reason == "early_stopping" and len(stopped.history) < 50
    budget = train_vae(
        CONFIG,
        TrainConfig(epochs=50, time_budget_s=1e-3),
        _images(16),
        _images(4, 1),
        progress=False,
    )
    assert budget.stopped_reason == "time_budget" and len(budget.history) == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"garbage", "not a readable"), (None, "not an anomalyvae checkpoint")],
)
def test_bad_checkpoints(tmp_path, content, message):
    path = tmp_path / "x.pt"
    if content is None:
        torch.save({"weights": torch.zeros(2)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_checkpoint_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "anomalyvae-checkpoint", "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(path)


class _Evil:
    pass


def test_save_checkpoint_replaces_atomically(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"format": "anomalyvae-checkpoint", "v": 1}, path)
    save_checkpoint({"format": "anomalyvae-checkpoint", "v": 2}, path)
    assert load_checkpoint(path)["v"] == 2


@pytest.mark.parametrize(
    "bad",
    [
        dict(epochs=0),
        dict(batch_size=0),
        dict(learning_rate=0),
        dict(patience=0),
        dict(time_budget_s=-1),
    ],
)
def test_train_config_validates(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


def test_empty_sets():
    with pytest.raises(ValueError, match="training set is empty"):
        train_vae(CONFIG, TrainConfig(), _images(0), _images(2), progress=False)


def test_an_onnx_file_given_as_checkpoint_names_the_right_file(onnx_model):
    with pytest.raises(CheckpointError, match="exported ONNX model.*checkpoint \\(.pt\\)") as info:
        load_checkpoint(onnx_model)
    assert "weights_only" not in str(info.value)


def test_a_foreign_pickle_never_suggests_weights_only_false(tmp_path):
    import pickle

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"format": "anomalyvae-checkpoint", "x": object()}))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "weights_only" not in str(info.value)


def test_time_budget_stops_within_an_epoch(monkeypatch):
    import anomalyvae.models.train as train_module

    clock = iter(range(0, 10**6))  # a fake clock: one second per reading
    monkeypatch.setattr(train_module.time, "monotonic", lambda: float(next(clock)))
    steps = []
    original = torch.optim.Adam.step
    monkeypatch.setattr(
        torch.optim.Adam, "step", lambda self, *a, **k: (steps.append(1), original(self, *a, **k))
    )
    result = train_vae(
        CONFIG,
        TrainConfig(epochs=3, batch_size=2, time_budget_s=5),
        _images(400),
        _images(4, 1),
        progress=False,
    )
    assert result.stopped_reason == "time_budget" and len(result.history) == 1
    assert len(steps) < 10  # not the 200 steps of a whole epoch
