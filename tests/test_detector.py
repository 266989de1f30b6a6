from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY
from PIL import Image

from anomalyvae.data import DatasetError, mvtec_samples
from anomalyvae.detector import NotFittedError, VAEAnomalyDetector
from anomalyvae.metrics import image_metrics
from anomalyvae.models.checkpoint import CheckpointError


def test_detector_ranks_synthetic_defects_above_normals(trained, synthetic_root):
    detector, _ = trained
    test = mvtec_samples(synthetic_root, "test")
    scores = detector.anomaly_score([s.path for s in test])
    metrics = image_metrics([s.label for s in test], scores, detector.threshold_)
    assert metrics["image_auroc"] >= 0.9
    assert metrics["recall"] >= 0.8


def test_sklearn_conventions(trained, synthetic_root):
    detector, _ = trained
    paths = [s.path for s in mvtec_samples(synthetic_root, "test")][:6]
    scores = detector.anomaly_score(paths)
    np.testing.assert_allclose(detector.score_samples(paths), -scores)
    np.testing.assert_allclose(detector.decision_function(paths), detector.threshold_ - scores)
    predicted = detector.predict(paths)
    assert set(predicted) <= {-1, 1}
    np.testing.assert_array_equal(predicted == -1, scores > detector.threshold_)
    np.testing.assert_allclose(detector.normalized_score(paths), scores / detector.threshold_)
    maps = detector.anomaly_map(paths)
    assert maps.shape == (6, 32, 32) and maps.dtype == np.float32
    assert detector.offset_ == -detector.threshold_
    assert detector.calibration_.method == "normal_quantile"
    assert detector.data_summary_["n_train"] + detector.data_summary_["n_val"] == 100


def test_save_load_round_trip(trained, synthetic_root, tmp_path):
    detector, checkpoint = trained
    paths = [s.path for s in mvtec_samples(synthetic_root, "test")][:5]
    loaded = VAEAnomalyDetector.load(checkpoint)
    np.testing.assert_allclose(
        loaded.anomaly_score(paths), detector.anomaly_score(paths), rtol=1e-5
    )
    assert loaded.threshold_ == detector.threshold_
    assert loaded.preprocessing_ == detector.preprocessing_
    assert loaded.get_params()["latent_dim"] == TINY["latent_dim"]
    raw = torch.load(checkpoint, weights_only=True)
    assert raw["calibration"]["image"]["value"] == detector.threshold_
    assert raw["versions"]["anomalyvae"]
    copy = detector.save(tmp_path / "copy.pt")
    assert VAEAnomalyDetector.load(copy).threshold_ == detector.threshold_


def test_accepts_arrays_and_resizes(trained):
    detector, _ = trained
    rng = np.random.default_rng(0)
    assert detector.anomaly_score(rng.random((2, 32, 32), dtype=np.float32)).shape == (2,)
    assert detector.anomaly_score(rng.random((2, 1, 50, 40), dtype=np.float32)).shape == (2,)
    assert detector.anomaly_score(rng.random((2, 3, 32, 32), dtype=np.float32)).shape == (2,)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        detector.anomaly_score(np.full((1, 32, 32), 2.0, np.float32))
    with pytest.raises(ValueError, match="dtype"):
        detector.anomaly_score(np.zeros((1, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        detector.anomaly_score(np.full((1, 32, 32), np.nan, np.float32))


def test_fit_on_arrays_with_mixed_sized_files(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(12):
        size = (40 + 4 * (i % 3), 36)
        array = (rng.random(size) * 255).astype(np.uint8)
        mode_image = Image.fromarray(array).convert("RGB" if i % 4 == 0 else "L")
        paths.append(tmp_path / f"{i}.png")
        mode_image.save(paths[-1])
    (tmp_path / "broken.png").write_text("not an image")
    paths.append(tmp_path / "broken.png")
    detector = VAEAnomalyDetector(**(TINY | dict(epochs=2, target_fpr=0.5)))
    with pytest.warns(UserWarning, match="broken.png"):
        detector.fit(paths)
    assert detector.preprocessing_.channels == 1  # RGB files hold grey content
    assert detector.data_summary_["n_skipped"] == 1
    array_detector = VAEAnomalyDetector(
        **(TINY | dict(epochs=1, target_fpr=0.5, val_fraction=0.25))
    )
    array_detector.fit(rng.random((8, 1, 16, 16), dtype=np.float32))
    assert array_detector.preprocessing_.height == 16


def test_errors(tmp_path):
    with pytest.raises(NotFittedError, match="fit"):
        VAEAnomalyDetector().anomaly_score(np.zeros((1, 32, 32), np.float32))
    with pytest.raises(DatasetError, match="no training images"):
        VAEAnomalyDetector(progress=False).fit([])
    bad = tmp_path / "bad.png"
    bad.write_text("x")
    with pytest.raises(DatasetError, match="could be read; the first: .*bad.png"):
        VAEAnomalyDetector(progress=False).fit([bad])
    # copies of one image: nothing varies, so nothing could be learnt or calibrated
    same = np.tile(np.random.default_rng(0).random((1, 16, 16), np.float32), (6, 1, 1))
    with pytest.raises(DatasetError, match="all 6 readable training images are identical"):
        VAEAnomalyDetector(progress=False).fit(same)
    same[3, 5, 5] += 0.1  # one differing pixel is data: the check lets it train
    tiny = {**TINY, "epochs": 1, "target_fpr": 0.5, "val_fraction": 0.5}
    assert np.isfinite(VAEAnomalyDetector(**tiny).fit(same).threshold_)
    with pytest.raises(ValueError, match="val_fraction"):
        VAEAnomalyDetector(val_fraction=1.5).fit(np.zeros((4, 16, 16), np.float32))
    with pytest.raises(CheckpointError):
        VAEAnomalyDetector.load(bad)


def test_labelled_recalibration(trained, synthetic_root):
    detector, checkpoint = trained
    fresh = VAEAnomalyDetector.load(checkpoint)
    test = mvtec_samples(synthetic_root, "test")
    fresh.calibrate([s.path for s in test], np.array([s.label for s in test]), method="youden")
    assert fresh.calibration_.method == "youden"
    assert fresh.calibration_.expected_tpr >= 0.8
    with pytest.raises(ValueError, match="method"):
        fresh.calibrate([test[0].path], method="median")


def test_standardized_scoring_survives_save_and_load(trained, synthetic_root, tmp_path):
    import dataclasses

    detector, checkpoint = trained
    assert detector.scoring_.standardize and detector.scoring_.map_kind == "ssim"  # 32 px: auto
    assert detector.map_stats_.map_kind == "ssim" and detector.map_stats_.n_images == 85
    loaded = VAEAnomalyDetector.load(checkpoint)
    test = [s.path for s in mvtec_samples(synthetic_root, "test")][:8]
    np.testing.assert_allclose(loaded.anomaly_score(test), detector.anomaly_score(test))
    # another map kind needs its own statistics, and says so
    loaded.scoring_ = dataclasses.replace(loaded.scoring_, map_kind="nll")
    with pytest.raises(ValueError, match="fit_map_stats"):
        loaded.anomaly_score(test)
    train = [s.path for s in mvtec_samples(synthetic_root, "train")]
    loaded.fit_map_stats(train)
    # the fused score's constants read the old map: refitting them is asked for
    with pytest.raises(ValueError, match="fit_fusion"):
        loaded.anomaly_score(test)
    assert np.isfinite(loaded.fit_fusion(train[:20]).anomaly_score(test)).all()


def test_pixel_default_fuses_local_and_global_views(trained, synthetic_root):
    detector, _ = trained
    assert detector.scoring_.score_kind == "fused" and detector.scoring_.ssim_sigma == 2.0
    stats = detector.map_stats_
    test = [s.path for s in mvtec_samples(synthetic_root, "test")]
    views = detector.view_scores(test)
    assert set(views) == {"local", "global", "fused"}
    maps = detector.anomaly_map(test)
    np.testing.assert_allclose(views["global"], maps.reshape(len(maps), -1).mean(1), rtol=1e-5)
    z = [
        (views[name] - float(stats.view_center[i])) / float(stats.view_scale[i])
        for i, name in enumerate(("local", "global"))
    ]
    scores = detector.anomaly_score(test)
    np.testing.assert_allclose(scores, np.mean(z, axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(views["fused"], scores, rtol=1e-4, atol=1e-5)
    # the constants are the held-out normals' medians (and scaled MADs)
    held = detector.view_scores(detector.validation_files_)
    np.testing.assert_allclose(
        stats.view_center.numpy(), [np.median(held["local"]), np.median(held["global"])], rtol=1e-5
    )


def test_a_pixel_checkpoint_saved_before_fusion_scores_as_it_did(trained, synthetic_root, tmp_path):
    import dataclasses

    from anomalyvae.models.maps import gaussian_blur, ssim_map, standardize_map, topk_count

    _, checkpoint = trained
    state = torch.load(checkpoint, weights_only=True)
    state["scoring"] = {k: v for k, v in state["scoring"].items() if k != "ssim_sigma"}
    state["scoring"]["score_kind"] = "topk_mean"
    new_keys = ("ssim_sigma", "view_center", "view_scale")
    state["map_stats"] = {k: v for k, v in state["map_stats"].items() if k not in new_keys}
    torch.save(state, tmp_path / "old.pt")
    loaded = VAEAnomalyDetector.load(tmp_path / "old.pt")
    assert loaded.scoring_.ssim_sigma == 1.5 and loaded.map_stats_.view_center is None
    test = [s.path for s in mvtec_samples(synthetic_root, "test")][:8]
    x = torch.from_numpy(loaded.preprocess(test))

    def topk_mean(window: float) -> np.ndarray:
        with torch.no_grad():
            recon = loaded.model_.eval()(x).recon_mean
            z = standardize_map(
                gaussian_blur(1 - ssim_map(x, recon, window), 2.0), loaded.map_stats_
            )
        k = topk_count(loaded.scoring_, 32 * 32)
        return z.flatten(1).topk(k, dim=1).values.mean(1).numpy()

    scores = loaded.anomaly_score(test)
    np.testing.assert_allclose(scores, topk_mean(1.5), rtol=1e-5)
    assert not np.allclose(scores, topk_mean(2.0), rtol=1e-3)  # the window is honoured
    loaded.scoring_ = dataclasses.replace(loaded.scoring_, score_kind="fused")
    with pytest.raises(ValueError, match="fit_fusion"):  # no constants: no fused score
        loaded.anomaly_score(test)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("auto", True, "ssim", 32), "fused"),  # thumbnails: the whole scene
        (("auto", True, "nll", 32), "topk_mean"),
        (("auto", True, "ssim", 64), "topk_mean"),  # larger: defects are local
        (("auto", False, "ssim", 32), "topk_mean"),  # global view needs z-maps
        (("max", True, "ssim", 32), "max"),
    ],
)
def test_auto_score_kind(args, expected):
    from anomalyvae.models.families.pixel import pixel_score_kind

    assert pixel_score_kind(*args) == expected


def test_feature_family_resolves_auto_to_the_fused_score():
    from anomalyvae.imaging.preprocessing import Preprocessing
    from anomalyvae.models.families import get_family

    scoring = get_family("feature").resolve_scoring(VAEAnomalyDetector(), Preprocessing(3, 96, 96))
    assert (scoring.score_kind, scoring.map_kind, scoring.standardize) == ("fused", "elbo", False)


def test_pixel_fusion_constants_do_not_depend_on_the_score_kind(trained):
    import dataclasses

    detector, checkpoint = trained
    loaded = VAEAnomalyDetector.load(checkpoint)
    loaded.scoring_ = dataclasses.replace(loaded.scoring_, score_kind="max")
    loaded.fit_fusion(detector.validation_files_)  # fitted while scoring with "max"
    for name in ("view_center", "view_scale"):
        np.testing.assert_allclose(
            getattr(loaded.map_stats_, name), getattr(detector.map_stats_, name), rtol=1e-5
        )
    # the max score is still the largest map value
    paths = detector.validation_files_[:4]
    maps = loaded.anomaly_map(paths)
    np.testing.assert_allclose(loaded.anomaly_score(paths), maps.reshape(4, -1).max(1), rtol=1e-6)


def test_dim_training_images_get_a_word_for_the_pixel_model():
    """12-bit data in 16-bit files reaches the pixel model nearly black: say so, and how."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0.2, 0.8, (24, 1, 32, 32)).astype(np.float32)
    settings = {**TINY, "epochs": 1, "target_fpr": 0.25}  # 4 held-out normals can promise it
    with pytest.warns(UserWarning, match="training images are dim.*--normalization percentile"):
        VAEAnomalyDetector(model="pixel", **settings).fit(images * 0.06)
    VAEAnomalyDetector(model="pixel", **settings).fit(images)  # no word: warnings are errors
