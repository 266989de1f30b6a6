"""The family interface: a toy family registered from outside runs fit -> export -> scan."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from torch import Tensor, nn

from anomalyvae.data import mvtec_samples
from anomalyvae.detector import VAEAnomalyDetector
from anomalyvae.models.families import (
    ModelFamily,
    Trained,
    family_names,
    get_family,
    register_family,
    unregister_family,
)
from anomalyvae.models.maps import (
    MapStats,
    ScoreResult,
    ScoringConfig,
    gaussian_blur,
    reduce_map,
)


@dataclass(frozen=True)
class MeanImageConfig:
    channels: int
    height: int
    width: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MeanImageModel(nn.Module):
    """The simplest model of normality: the training images' mean image."""

    family = "toy-mean"

    def __init__(self, config: MeanImageConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("mean", torch.zeros(config.channels, config.height, config.width))


class MeanImageFamily(ModelFamily):
    name = "toy-mean"
    view_names = ()

    def resolve_scoring(self, detector, spec) -> ScoringConfig:
        kind = "topk_mean" if detector.score_kind == "auto" else detector.score_kind
        return ScoringConfig("recon", kind, detector.smoothing_sigma, detector.topk_fraction)

    def check_scoring(self, config: ScoringConfig) -> None:
        if config.score_kind not in ("topk_mean", "max"):
            raise ValueError(f"the toy family scores topk_mean or max, not {config.score_kind}")

    def train(self, detector, train_images, val_images, train_config, resume) -> Trained:
        spec = detector.preprocessing_
        model = MeanImageModel(MeanImageConfig(spec.channels, spec.height, spec.width))
        model.mean.copy_(torch.from_numpy(train_images.mean(axis=0)))
        return Trained(model, [], 0, "converged", 0.0, 1)

    def model_from_state(self, config: dict[str, Any], state: dict[str, Any]) -> nn.Module:
        model = MeanImageModel(MeanImageConfig(**config))
        model.load_state_dict(state)
        return model

    def needs_fusion(self, scoring: ScoringConfig) -> bool:
        return False

    def fit_fusion(self, detector, images, extra_views=None) -> None:
        raise ValueError("the toy family has one view: nothing to fuse")

    def fuse(self, detector, views):
        return None

    def score(
        self,
        model: nn.Module,
        x: Tensor,
        config: ScoringConfig,
        stats: MapStats | None,
        valid: Tensor | None,
    ) -> ScoreResult:
        error = ((x - model.mean) ** 2).mean(dim=1, keepdim=True)
        smoothed = gaussian_blur(error, config.smoothing_sigma)
        mean = smoothed.flatten(1).mean(1)
        return ScoreResult(smoothed, reduce_map(smoothed, mean, config), mean, None)


@pytest.fixture
def toy_family():
    family = register_family(MeanImageFamily())
    yield family
    unregister_family(family.name)
    assert "toy-mean" not in family_names()


def test_a_registered_family_runs_fit_export_and_scan(toy_family, synthetic_root, tmp_path):
    from anomalyvae.export import export_onnx
    from anomalyvae.inference.runtime import read_metadata
    from anomalyvae.inference.scan import ScanConfig, scan

    train = [s.path for s in mvtec_samples(synthetic_root, "train")]
    checkpoint = tmp_path / "toy.pt"
    detector = VAEAnomalyDetector(
        model="toy-mean", target_fpr=0.1, progress=False, checkpoint_path=checkpoint
    ).fit(train)
    assert detector.family() is toy_family and detector.view_scores(train[:2]) == {}
    test = mvtec_samples(synthetic_root, "test")
    labels = np.array([s.label for s in test])
    scores = VAEAnomalyDetector.load(checkpoint).anomaly_score([s.path for s in test])
    np.testing.assert_allclose(scores, detector.anomaly_score([s.path for s in test]), rtol=1e-6)
    assert scores[labels == 1].mean() > scores[labels == 0].mean()

    images = detector.preprocess([s.path for s in test])
    exported = export_onnx(detector, tmp_path / "toy.onnx", parity_images=images)
    assert exported.parity.verdicts_agree
    assert read_metadata(exported.path)["model_family"] == "toy-mean"

    summary = scan(
        exported.path, synthetic_root / "test", tmp_path / "scan", ScanConfig(), progress=False
    )
    table = pd.read_parquet(tmp_path / "scan" / "results.parquet")
    assert summary.n_scored_now == len(test) == len(table) and summary.n_errors == 0

    def key(path) -> str:  # good/000.png and defect/000.png share a file name
        return "/".join(Path(path).parts[-2:])

    by_path = {key(s.path): score for s, score in zip(test, scores, strict=True)}
    table["expected"] = [by_path[key(p)] for p in table["path"]]
    scale = max(np.ptp(scores), abs(detector.threshold_))
    np.testing.assert_allclose(table["score"], table["expected"], rtol=1e-4, atol=1e-4 * scale)


def test_an_unknown_family_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model family 'nope'"):
        get_family("nope")
    with pytest.raises(ValueError, match="model must be one of"):
        VAEAnomalyDetector(model="nope", progress=False).fit(np.zeros((4, 1, 32, 32), "float32"))
