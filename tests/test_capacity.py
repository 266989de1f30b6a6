"""How many normals one training run reads: the budgets, the choice and its record."""

from __future__ import annotations

import nibabel
import numpy as np
import pytest
from conftest import TINY
from PIL import Image

from anomalyvae import capacity
from anomalyvae.capacity import BASE_BYTES, image_capacity, memory_budget_bytes
from anomalyvae.detector import VAEAnomalyDetector
from anomalyvae.errors import InvalidValueError
from anomalyvae.imaging.batch import read_images
from anomalyvae.imaging.preprocessing import Preprocessing
from anomalyvae.models.families import get_family
from anomalyvae.models.families.pixel import PixelFamily
from anomalyvae.models.feature_config import FeatureVAEConfig
from anomalyvae.models.feature_training import extract_features
from anomalyvae.models.feature_vae import FeatureVAE


def test_the_tighter_budget_sets_the_cap():
    # 1 GB over the base at 10 MB an image: 100 images; 50 s of a 100 s budget at 1 s: 50
    by_time = image_capacity(1e7, 1.0, BASE_BYTES + 1_000_000_000, 100.0)
    assert (by_time.max_images, by_time.limit) == (50, "time")
    assert "time budget" in by_time.reason(500) and "--time-budget" in by_time.reason(500)
    by_memory = image_capacity(1e7, 1.0, BASE_BYTES + 1_000_000_000, 1000.0)
    assert (by_memory.max_images, by_memory.limit) == (100, "memory")
    assert "6.0 GB" in by_memory.reason(500) and "--memory-budget" in by_memory.reason(500)
    # no time budget, or a family whose epochs take the time: memory alone
    assert image_capacity(1e7, None, BASE_BYTES + 1_000_000_000, 100.0).max_images == 100
    assert image_capacity(1e7, 1.0, BASE_BYTES + 1_000_000_000, None).max_images == 100
    # never below two images, however tight
    assert image_capacity(1e12, 1e6, BASE_BYTES + 1, 1.0).max_images == 2


def test_memory_budget_default_and_errors(monkeypatch):
    monkeypatch.setattr(capacity, "machine_memory_bytes", lambda: 32_000_000_000)
    assert memory_budget_bytes(None) == 16_000_000_000
    monkeypatch.setattr(capacity, "machine_memory_bytes", lambda: 2_000_000_000)
    assert memory_budget_bytes(None) == 2 * BASE_BYTES  # a small machine still trains
    monkeypatch.setattr(capacity, "machine_memory_bytes", lambda: None)
    assert memory_budget_bytes(None) == capacity.FALLBACK_MEMORY_BYTES
    assert memory_budget_bytes(3.5) == 3_500_000_000
    for bad in (0.5, 1.0, float("nan")):
        with pytest.raises(InvalidValueError, match="--memory-budget"):
            memory_budget_bytes(bad)
    with pytest.raises(InvalidValueError, match="--memory-budget"):
        VAEAnomalyDetector(memory_budget_gb=0.5).fit(np.zeros((4, 16, 16), np.float32))


def test_machine_memory_is_read():
    memory = capacity.machine_memory_bytes()
    assert memory is None or memory > 100_000_000


def test_read_images_stops_at_the_cap(tmp_path):
    spec = Preprocessing(channels=1, height=8, width=8)
    volume = np.random.default_rng(0).random((6, 8, 8)).astype(np.float32) + 0.5
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), str(tmp_path / "a.nii.gz"))
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(tmp_path / "b.png")
    (tmp_path / "c.png").write_bytes(b"not an image")
    paths = [tmp_path / n for n in ("a.nii.gz", "b.png", "c.png")]
    n_slices = len(read_images(paths[:1], spec)[0])
    assert n_slices > 4
    # the volume's stack is cut to fit, and the files after the cap are not opened
    images, kept, errors = read_images(paths, spec, on_error="raise", max_images=4)
    assert images.shape == (4, 1, 8, 8) and kept == [paths[0]] * 4 and not errors
    images, kept, errors = read_images(paths, spec, on_error="ignore", max_images=n_slices + 1)
    assert len(images) == n_slices + 1 and kept[-1] == paths[1] and not errors
    images, kept, errors = read_images(paths, spec, on_error="ignore")
    assert len(images) == n_slices + 1 and len(errors) == 1  # uncapped, every file is opened
    with pytest.raises(InvalidValueError, match="max_images"):
        read_images(paths, spec, max_images=0)


@pytest.mark.parametrize("backbone", ["efficientnet-lite0", "efficientnet-lite2"])
def test_feature_family_estimates_what_training_holds(backbone):
    family = get_family("feature")
    spec = Preprocessing(channels=3, height=64, width=96)
    config = FeatureVAEConfig(height=64, width=96, in_channels=3, backbone=backbone)
    model = FeatureVAE(config, pretrained=False)
    features = extract_features(model, np.zeros((1, 3, 64, 96), np.float32))
    # the input and its features (standardized in place: one copy), whatever the backbone
    expected = 4 * 3 * 64 * 96 + 4 * features[0].numel()
    assert family.training_bytes_per_image(VAEAnomalyDetector(backbone=backbone), spec) == expected
    seconds = family.training_seconds_per_image(VAEAnomalyDetector(), spec)
    assert seconds is not None and 0 < seconds < 60
    assert get_family("pixel").training_seconds_per_image(VAEAnomalyDetector(), spec) is None


def _budget_for(n_images: int) -> float:
    """A memory budget (GB) that holds ``n_images`` at the patched 100 MB an image."""
    return (BASE_BYTES + n_images * 100_000_000 + 50_000_000) / 1e9


def test_a_set_over_the_memory_budget_is_read_as_a_seeded_choice(
    synthetic_root, tmp_path, monkeypatch
):
    monkeypatch.setattr(PixelFamily, "training_bytes_per_image", lambda self, detector, spec: 1e8)
    files = sorted((synthetic_root / "train" / "good").iterdir())[:30]
    settings = TINY | dict(epochs=2, model="pixel", target_fpr=0.5)
    settings["memory_budget_gb"] = _budget_for(12)
    with pytest.warns(UserWarning, match=r"reads 12 of the 30 normal files given \(a seeded"):
        first = VAEAnomalyDetector(**settings).fit(files)
    summary = first.data_summary_
    assert summary["n_train"] + summary["n_val"] == 12 and summary["n_given"] == 30
    assert summary["capacity"]["limit"] == "memory"
    assert summary["capacity"]["max_images"] == 12
    with pytest.warns(UserWarning, match="reads 12 of the 30"):
        again = VAEAnomalyDetector(**settings).fit(files)
    assert again.data_summary_["file_list_hash"] == summary["file_list_hash"]  # same choice
    # a set within the budget is read whole, in its own order, with no word
    whole = VAEAnomalyDetector(**(settings | dict(memory_budget_gb=_budget_for(40)))).fit(files)
    assert whole.data_summary_["n_train"] + whole.data_summary_["n_val"] == 30
    assert "capacity" not in whole.data_summary_
    # the record survives save and load, and reaches the ONNX file's metadata
    first.save(tmp_path / "m.pt")
    loaded = VAEAnomalyDetector.load(tmp_path / "m.pt", progress=False)
    assert loaded.data_summary_["n_given"] == 30
    from anomalyvae.export import export_onnx
    from anomalyvae.inference.runtime import read_metadata

    meta = read_metadata(export_onnx(loaded, tmp_path / "m.onnx").path)
    assert meta["training_data"]["n_given"] == 30
    assert meta["training_data"]["capacity"]["limit"] == "memory"


def test_an_array_over_the_memory_budget_keeps_a_seeded_choice_of_rows(monkeypatch):
    monkeypatch.setattr(PixelFamily, "training_bytes_per_image", lambda self, detector, spec: 1e8)
    images = np.random.default_rng(0).random((20, 16, 16)).astype(np.float32)
    settings = TINY | dict(epochs=2, model="pixel", target_fpr=0.5)
    settings["memory_budget_gb"] = _budget_for(8)
    with pytest.warns(UserWarning, match="reads 8 of the 20 normal images"):
        detector = VAEAnomalyDetector(**settings).fit(images)
    assert detector.data_summary_["n_train"] + detector.data_summary_["n_val"] == 8
    # an array of exactly the cap is read whole: no cut recorded
    exact = VAEAnomalyDetector(**settings).fit(images[:8])
    assert "n_given" not in exact.data_summary_ and "capacity" not in exact.data_summary_


def test_cli_takes_a_memory_budget_in_gb_and_says_what_it_read(
    synthetic_root, tmp_path, monkeypatch
):
    from click.testing import CliRunner

    from anomalyvae.cli import main

    result = CliRunner().invoke(main, ["train", "--help"])
    assert "--memory-budget" in result.output
    result = CliRunner().invoke(main, ["train", str(tmp_path), "--memory-budget", "0.5"])
    assert result.exit_code == 2 and "--memory-budget" in result.output
    monkeypatch.setattr(PixelFamily, "training_bytes_per_image", lambda self, detector, spec: 1e8)
    data = tmp_path / "normals"
    data.mkdir()
    for path in sorted((synthetic_root / "train" / "good").iterdir())[:30]:
        (data / path.name).write_bytes(path.read_bytes())
    args = ["train", str(data), "-o", str(tmp_path / "m.pt"), "--model", "pixel"]
    args += ["--epochs", "2", "--target-fpr", "0.5", "--memory-budget", str(_budget_for(12))]
    with pytest.warns(UserWarning, match="reads 12 of the 30 normal files"):
        result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "a seeded choice of the 30 given that fits the memory budget" in result.output
