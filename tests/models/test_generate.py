from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from anomalyvae.cli import main
from anomalyvae.data import mvtec_samples
from anomalyvae.imaging.batch import read_images
from anomalyvae.models.generate import MAX_SAMPLES, denoise, embed, inpaint, interpolate, sample


@pytest.fixture(scope="module")
def normals(trained, synthetic_root):
    detector, _ = trained
    paths = [s.path for s in mvtec_samples(synthetic_root, "test") if s.label == 0][:12]
    return read_images(paths, detector.preprocessing_)[0]


def _psnr(a, b, where=None):
    error = (a - b) ** 2 if where is None else ((a - b) ** 2)[where]
    return 10 * np.log10(1.0 / error.mean())


def test_sample_is_seeded_shaped_and_capped(trained):
    model = trained[0].model_
    a, b = sample(model, 5, seed=1), sample(model, 5, seed=1)
    assert a.shape == (5, 1, 32, 32) and np.array_equal(a, b)
    assert not np.array_equal(a, sample(model, 5, seed=2))
    assert sample(model, 5, temperature=0.1).std(0).mean() < a.std(0).mean()
    for n in (0, MAX_SAMPLES + 1):
        with pytest.raises(ValueError, match="between 1 and"):
            sample(model, n)


def test_denoise_removes_noise(trained, normals):
    model = trained[0].model_
    rng = np.random.default_rng(0)
    noisy = np.clip(normals + rng.normal(0, 0.2, normals.shape), 0, 1).astype(np.float32)
    clean = denoise(model, noisy)
    assert _psnr(clean, normals) > _psnr(noisy, normals) + 3
    averaged = denoise(model, noisy, n_samples=4)
    assert averaged.shape == noisy.shape


@pytest.mark.parametrize("method", ["clamp", "optimize"])
def test_inpaint_keeps_known_pixels_and_beats_mean_fill(trained, normals, method):
    model = trained[0].model_
    missing = np.zeros((32, 32), bool)
    missing[8:20, 6:22] = True
    filled = inpaint(model, normals, missing, method=method, iterations=40)
    known = np.broadcast_to(~missing, (len(normals), 1, 32, 32))
    np.testing.assert_array_equal(filled[known], normals[known])
    hole = np.broadcast_to(missing, (len(normals), 1, 32, 32))
    mean_fill = normals.copy()
    for i in range(len(normals)):
        mean_fill[i, 0][missing] = normals[i, 0][~missing].mean()
    assert _psnr(filled, normals, hole) > _psnr(mean_fill, normals, hole)
    assert all(p.grad is None for p in model.parameters())


def test_inpaint_and_shape_errors(trained, normals):
    model = trained[0].model_
    with pytest.raises(ValueError, match="no missing pixels"):
        inpaint(model, normals, np.zeros((32, 32), bool))
    with pytest.raises(ValueError, match="mask must be"):
        inpaint(model, normals, np.ones((16, 16), bool))
    with pytest.raises(ValueError, match="every pixel"):
        inpaint(model, normals, np.ones((32, 32), bool))
    with pytest.raises(ValueError, match="trained at that size"):
        denoise(model, np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="method"):
        inpaint(model, normals, np.eye(32, dtype=bool), method="magic")


def test_embed_and_interpolate(trained, normals):
    model = trained[0].model_
    codes = embed(model, normals)
    assert codes.mu.shape == codes.logvar.shape == (len(normals), model.config.latent_dim)
    strip = interpolate(model, normals[0], normals[1], steps=5)
    assert strip.shape == (5, 1, 32, 32)


def test_valid_mask_ignores_a_defect_outside_the_field_of_view(trained, normals):
    detector = trained[0]
    damaged = normals[:4].copy()
    damaged[:, 0, 4:12, 4:12] = 1.0
    valid = np.ones((32, 32), bool)
    valid[2:14, 2:14] = False
    plain = detector.anomaly_score(damaged)
    masked = detector.anomaly_score(damaged, valid_mask=valid)
    assert (masked < plain).all()
    maps = detector.anomaly_map(damaged, valid_mask=valid)
    assert (maps[:, ~valid] == 0).all()
    with pytest.raises(ValueError, match="no valid pixels"):
        detector.anomaly_score(damaged, valid_mask=np.zeros((32, 32), bool))
    with pytest.raises(ValueError, match="valid_mask must be"):
        detector.anomaly_score(damaged, valid_mask=np.ones((8, 8), bool))


def test_generative_cli(trained, synthetic_root, tmp_path):
    _, checkpoint = trained
    runner = CliRunner()
    good = sorted((synthetic_root / "test" / "good").glob("*.png"))
    result = runner.invoke(
        main,
        [
            "sample",
            str(checkpoint),
            "-n",
            "6",
            "-o",
            str(tmp_path / "s"),
            "--interpolate",
            str(good[0]),
            str(good[1]),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s" / "grid.png").is_file() and (
        tmp_path / "s" / "interpolation.png"
    ).is_file()
    assert len(list((tmp_path / "s").glob("sample_*.png"))) == 6
    assert runner.invoke(main, ["sample", str(checkpoint), "-n", "0"]).exit_code == 2

    result = runner.invoke(
        main, ["denoise", str(checkpoint), str(good[0]), "-o", str(tmp_path / "d")]
    )
    assert result.exit_code == 0 and (tmp_path / "d" / f"{good[0].stem}_denoised.png").is_file()

    mask = tmp_path / "mask.png"
    array = np.zeros((32, 32), np.uint8)
    array[10:20, 10:20] = 255
    Image.fromarray(array).save(mask)
    out = tmp_path / "filled.png"
    result = runner.invoke(
        main,
        [
            "inpaint",
            str(checkpoint),
            str(good[0]),
            "--mask",
            str(mask),
            "-o",
            str(out),
            "--iterations",
            "10",
        ],
    )
    assert result.exit_code == 0, result.output
    assert out.is_file()
    wrong = tmp_path / "wrong.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(wrong)
    result = runner.invoke(main, ["inpaint", str(checkpoint), str(good[0]), "--mask", str(wrong)])
    assert result.exit_code == 1 and "must match" in result.output

    emb = tmp_path / "emb.parquet"
    result = runner.invoke(
        main,
        [
            "embed",
            str(checkpoint),
            str(synthetic_root / "test"),
            "-o",
            str(emb),
            "--plot",
            str(tmp_path / "e.png"),
            "--neighbours-of",
            str(good[0]),
            "-k",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(emb)
    assert len(table) == 50 and table.loc[0, "distance"] == pytest.approx(0, abs=1e-5)
    assert set(table["group"]) == {"good", "blob", "scratch", "spot"}

    valid = tmp_path / "valid.png"
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(valid)
    result = runner.invoke(
        main, ["score", str(checkpoint), str(good[0]), "--valid-mask", str(valid)]
    )
    assert result.exit_code == 0 and result.output.count("\t") == 3


def test_denoising_two_files_of_one_name_writes_two_files(trained, synthetic_root, tmp_path):
    import shutil

    _, checkpoint = trained
    source = sorted((synthetic_root / "train" / "good").glob("*.png"))[0]
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(source, tmp_path / folder / "0003.png")
    args = ["denoise", str(checkpoint), str(tmp_path / "a" / "0003.png")]
    args += [str(tmp_path / "b" / "0003.png"), "-o", str(tmp_path / "d")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "d").glob("*.png"))) == 2


def test_inpaint_and_denoise_write_the_input_size_depth_and_known_pixels(trained, tmp_path):
    from anomalyvae.generative import denoise_files, inpaint_file
    from anomalyvae.imaging.io import read_image

    _, checkpoint = trained  # a 32 x 32 grey model
    rng = np.random.default_rng(0)
    sixteen = (20000 + rng.integers(0, 20000, (50, 70))).astype(np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "deep.png")
    colour = rng.integers(0, 255, (41, 29, 3)).astype(np.uint8)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    hole = np.zeros((50, 70), np.uint8)
    hole[10:20, 30:45] = 255
    Image.fromarray(hole).save(tmp_path / "hole.png")

    out = inpaint_file(checkpoint, tmp_path / "deep.png", tmp_path / "hole.png", tmp_path / "f.png")
    filled = read_image(out)
    assert filled.bit_depth == 16 and filled.pixels.shape == (50, 70, 1)
    known = hole == 0
    assert np.array_equal(filled.raw[:, :, 0][known], sixteen[known].astype(np.float32))
    assert not np.array_equal(filled.raw[:, :, 0][~known], sixteen[~known].astype(np.float32))

    written = denoise_files(checkpoint, [tmp_path / "deep.png", tmp_path / "colour.png"], tmp_path)
    deep, rgb = (read_image(path) for path in written)
    assert deep.bit_depth == 16 and deep.pixels.shape == (50, 70, 1)
    assert rgb.bit_depth == 8 and rgb.pixels.shape == (41, 29, 3)
    # a reconstruction, not a copy: smooth, but on the input's intensity scale
    assert abs(deep.pixels.mean() - sixteen.mean() / 65535) < 0.25


def test_to_file_undoes_the_intensity_window(tmp_path):
    from anomalyvae.generative import to_file
    from anomalyvae.imaging.io import read_image
    from anomalyvae.imaging.preprocessing import Preprocessing, intensities, preprocess

    raw = np.linspace(10000, 50000, 16 * 16).reshape(16, 16).astype(np.uint16)
    Image.fromarray(raw).save(tmp_path / "ct.png")
    source = read_image(tmp_path / "ct.png")
    spec = Preprocessing(1, 16, 16, normalization="window", window_center=30000, window_width=20000)
    model_space = preprocess(intensities(source, spec), spec)  # in [0, 1] over the window
    back = to_file(model_space, source, spec)
    expected = np.clip(raw, 20000, 40000) / 65535.0
    np.testing.assert_allclose(back[:, :, 0], expected, atol=2e-6)


@pytest.mark.parametrize("score_kind", ["fused", "global", "topk_mean", "max"])
def test_a_masked_image_is_scored_the_way_the_threshold_was_calibrated(
    trained, normals, score_kind
):
    """Every score kind reads the same views off the valid pixels: a fused score stays
    a fused z-score (not a top-k mean compared with a z-score threshold)."""
    import copy
    import dataclasses

    from anomalyvae.models.maps import topk_count

    detector = copy.copy(trained[0])
    detector.scoring_ = dataclasses.replace(detector.scoring_, score_kind=score_kind)
    stats = detector.map_stats_
    valid = np.ones((32, 32), bool)
    valid[:, :10] = False
    scores = detector.anomaly_score(normals[:4], valid_mask=valid)
    maps = detector.anomaly_map(normals[:4], valid_mask=valid)
    expected = []
    for image_map in maps:
        values = np.sort(image_map[valid])
        local = values[-topk_count(detector.scoring_, values.size) :].mean()
        views = np.array([local, values.mean()])
        center, scale = stats.view_center.numpy(), stats.view_scale.numpy()
        expected.append(
            {
                "fused": np.mean((views - center) / scale),
                "global": views[1],
                "topk_mean": local,
                "max": values[-1],
            }[score_kind]
        )
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5 * np.ptp(expected))


def test_embed_table_keeps_any_file_name(trained, synthetic_root, tmp_path):
    import os
    import shutil

    _, checkpoint = trained
    folder = tmp_path / "in"
    group = folder / os.fsdecode(b"lot_\xe9")  # a folder name that is not UTF-8 either
    group.mkdir(parents=True)
    good = sorted((synthetic_root / "test" / "good").glob("*.png"))
    shutil.copy(good[0], group / os.fsdecode(b"part_\xff.png"))
    shutil.copy(good[1], folder / "plain.png")
    out = tmp_path / "emb.parquet"
    result = CliRunner().invoke(main, ["embed", str(checkpoint), str(folder), "-o", str(out)])
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(out)
    assert sorted(table["group"]) == [".", "lot_\\xe9"]
    assert any(p.endswith("lot_\\xe9/part_\\xff.png") for p in table["path"])


def test_denoise_skips_an_unreadable_file_and_writes_the_others(trained, synthetic_root, tmp_path):
    _, checkpoint = trained
    good = sorted((synthetic_root / "test" / "good").glob("*.png"))[:2]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    out = tmp_path / "out"
    args = ["denoise", str(checkpoint), str(good[0]), str(broken), str(good[1]), "-o", str(out)]
    with pytest.warns(UserWarning, match="broken.png"):
        result = CliRunner().invoke(main, [*args, "--silent"])
    assert result.exit_code == 1 and "1 of 3 files could not be read" in result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{p.stem}_denoised.png" for p in good)
