"""The scan's drift alarm: flagged rate and intensity against the calibration normals."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.stats import binomtest

from anomalyvae.inference.drift import (
    ALARM_P,
    drift_report,
    flagged_p_value,
    intensity_summary,
    outside_p_value,
)
from anomalyvae.inference.scan import scan

NORMALS = intensity_summary(np.random.default_rng(0).normal(0.6, 0.02, 200))


@pytest.mark.parametrize(
    ("flag_share", "shift", "expected"),
    [
        (0.01, 0.0, []),
        (0.30, 0.0, ["flagged"]),
        (0.01, -0.08, ["darker"]),
        (0.01, +0.08, ["brighter"]),
        (0.30, -0.08, ["flagged", "darker"]),
    ],
)
def test_drift_alarm_names_what_changed(flag_share, shift, expected):
    rng = np.random.default_rng(1)
    n = 400
    flags = np.zeros(n, bool)
    flags[: int(flag_share * n)] = True
    means = rng.normal(0.6 + shift, 0.02, n)
    report = drift_report(flags, means, 0.01, NORMALS)
    text = " ".join(report["warnings"])
    assert len(report["warnings"]) == len(expected)
    for word in expected:
        assert word in text


def test_a_mixed_batch_is_named_by_its_larger_tail():
    rng = np.random.default_rng(2)
    # a quarter much darker (the drifted normals), the rest a little brighter
    means = np.concatenate([rng.normal(0.52, 0.01, 100), rng.normal(0.61, 0.01, 300)])
    report = drift_report(np.zeros(400, bool), means, 0.01, NORMALS)
    assert report["intensity"]["shift_in_normal_sd"] > 0  # the median moved up...
    assert "darker" in report["warnings"][0]  # ... but the images out of range are darker
    assert report["intensity"]["share_darker"] == pytest.approx(0.25, abs=0.02)


def test_healthy_batches_rarely_raise_the_range_alarm_although_the_band_is_estimated():
    # calibration normals and a batch from one distribution, many times over: the band
    # drawn from 182 normals holds back 1 % of new images only on average, and a binomial
    # test at that rate raised the alarm on healthy batches (PneumoniaMNIST's test normals)
    rng = np.random.default_rng(4)
    binomial_alarms = beta_alarms = 0
    trials = 400
    for _ in range(trials):
        normals = intensity_summary(rng.normal(0.6, 0.02, 182))
        batch = rng.normal(0.6, 0.02, 234)
        outside = int(((batch < normals["p005"]) | (batch > normals["p995"])).sum())
        p, expected = outside_p_value(outside, batch.size, normals["n_images"])
        beta_alarms += p < ALARM_P and outside / batch.size >= 0.05
        binomial = binomtest(outside, batch.size, 2 / 183, alternative="greater").pvalue
        binomial_alarms += binomial < ALARM_P and outside / batch.size >= 0.05
    assert binomial_alarms >= 8, (
        binomial_alarms,
        beta_alarms,
    )  # the old test: false alarms in a few percent of batches
    assert beta_alarms <= 2, (binomial_alarms, beta_alarms)
    # the mean share outside is that of the order statistics the band spans (2 of 182 ...)
    assert expected == pytest.approx(4 / 183)
    # ... and a real shift still fires
    assert outside_p_value(60, 234, 182)[0] < 1e-6
    # an older model's summary without the count of normals: the binomial test at 1 %
    assert outside_p_value(0, 234, 0) == (1.0, 0.01)


def test_a_healthy_line_of_many_images_is_not_called_drifted_for_its_thresholds_spread():
    # a conformal threshold at 1 % read off 300 normals flags new normals at a rate that
    # varies with the normals it was read off; a batch of 20,000 sees that rate exactly
    rng = np.random.default_rng(5)
    n, batch, trials = 300, 20_000, 200
    rank = int(np.ceil((n + 1) * 0.99))  # the order statistic of the conformal threshold
    binomial_alarms = beta_alarms = 0
    for _ in range(trials):
        threshold = np.sort(rng.standard_normal(n))[rank - 1]
        flagged = int((rng.standard_normal(batch) > threshold).sum())
        rate = 1 - rank / (n + 1)
        binomial_alarms += binomtest(flagged, batch, rate, alternative="greater").pvalue < ALARM_P
        beta_alarms += flagged_p_value(flagged, batch, rate, n) < ALARM_P
    assert binomial_alarms >= 20, (binomial_alarms, beta_alarms)  # 1 in 10, not 1 in 1,000
    assert beta_alarms <= 2, (binomial_alarms, beta_alarms)
    # a batch of defects still fires, and without the count the binomial test stays
    assert flagged_p_value(2_000, batch, 0.01, n) < 1e-6
    assert flagged_p_value(30, 1000, 0.01, None) < ALARM_P < flagged_p_value(30, 1000, 0.01, 300)


def test_small_batches_are_not_judged():
    report = drift_report(np.ones(5, bool), np.full(5, 0.1), 0.01, NORMALS)
    assert report["warnings"] == [] and "fewer than" in report["note"]


def test_a_darker_line_raises_the_alarm_in_a_scan(onnx_model, synthetic_root, tmp_path):
    good = sorted((synthetic_root / "train" / "good").glob("*.png"))[:30]
    same, darker = tmp_path / "same", tmp_path / "darker"
    for folder, factor in ((same, 1.0), (darker, 0.6)):
        folder.mkdir()
        for path in good:
            pixels = np.asarray(Image.open(path), dtype=np.float32) * factor
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / path.name)
    calm = scan(onnx_model, same, tmp_path / "out_same", progress=False).summary["drift"]
    alarm = scan(onnx_model, darker, tmp_path / "out_darker", progress=False).summary["drift"]
    assert not any("darker" in w for w in calm["warnings"])
    assert any("darker" in w for w in alarm["warnings"])
    assert alarm["intensity"]["shift_in_normal_sd"] < -1
    report = (tmp_path / "out_darker" / "report.html").read_text()
    assert "Drift alarm" in report and "darker" in report
    written = json.loads((tmp_path / "out_darker" / "summary.json").read_text())
    assert written["drift"]["warnings"] == alarm["warnings"]


@pytest.mark.parametrize(("scale", "word"), [(1.0, None), (0.6, "less"), (1.5, "more")])
def test_contrast_drift_is_named_when_the_mean_stays(scale, word):
    rng = np.random.default_rng(3)
    normals = intensity_summary(rng.normal(0.6, 0.02, 200), rng.normal(0.10, 0.005, 200))
    means = rng.normal(0.6, 0.02, 300)  # the mean intensity does not move
    contrasts = rng.normal(0.10 * scale, 0.005, 300)
    report = drift_report(np.zeros(300, bool), means, 0.01, normals, contrast=contrasts)
    assert "intensity" in report and "contrast" in report
    if word is None:
        assert report["warnings"] == []
    else:
        assert len(report["warnings"]) == 1 and f"{word} contrast" in report["warnings"][0]
    # a model saved before the contrast range: the check is skipped, not guessed
    older = {k: v for k, v in normals.items() if k != "contrast"}
    report = drift_report(np.zeros(300, bool), means, 0.01, older, contrast=contrasts)
    assert "contrast" not in report and report["warnings"] == []


def test_a_flatter_line_raises_the_contrast_alarm_in_a_scan(onnx_model, synthetic_root, tmp_path):
    good = sorted((synthetic_root / "train" / "good").glob("*.png"))[:30]
    (tmp_path / "flat").mkdir()
    for path in good:  # a fogged lens: the same mean grey, half the contrast
        pixels = np.asarray(Image.open(path), dtype=np.float32)
        flat = pixels.mean() + 0.5 * (pixels - pixels.mean())
        Image.fromarray(flat.round().clip(0, 255).astype(np.uint8)).save(
            tmp_path / "flat" / path.name
        )
    result = scan(onnx_model, tmp_path / "flat", tmp_path / "out", progress=False)
    drift = result.summary["drift"]
    assert any("less contrast" in w for w in drift["warnings"])
    assert not any("darker" in w or "brighter" in w for w in drift["warnings"])
    table = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert table["contrast"].notna().all() and (table["contrast"] > 0).all()


def test_colour_files_into_a_grey_model_are_named(onnx_model, synthetic_root, tmp_path):
    good = sorted((synthetic_root / "train" / "good").glob("*.png"))[:3]
    (tmp_path / "in").mkdir()
    for path in good:
        grey = np.asarray(Image.open(path))
        rgb = np.stack([grey, np.roll(grey, 1), grey], axis=2)  # real colour
        Image.fromarray(rgb.astype(np.uint8)).save(tmp_path / "in" / path.name)
    drift = scan(onnx_model, tmp_path / "in", tmp_path / "out", progress=False).summary["drift"]
    assert any("3 colour images were turned into grey" in w for w in drift["warnings"])
