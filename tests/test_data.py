from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from anomalyvae.data import (
    DatasetError,
    discover,
    folder_samples,
    make_synthetic_dataset,
    mvtec_samples,
    split_file_samples,
)
from anomalyvae.imaging.files import IMAGE_EXTENSIONS
from anomalyvae.imaging.io import read_image
from anomalyvae.imaging.preprocessing import read_mask
from anomalyvae.training_data import file_list_hash, infer_preprocessing


def test_synthetic_dataset_layout_and_exact_masks(tmp_path):
    root = make_synthetic_dataset(tmp_path, n_train=4, n_test_good=2, n_test_defect=3, size=32)
    train = mvtec_samples(root, "train")
    test = mvtec_samples(root, "test")
    assert len(train) == 4 and all(s.label == 0 for s in train)
    defects = [s for s in test if s.label == 1]
    assert {s.defect_type for s in defects} == {"scratch", "blob", "spot"}
    for sample in defects:
        mask = read_mask(sample.mask_path)
        assert mask.any()
        image = read_image(sample.path).pixels[..., 0]
        clean = read_image(sample.path).pixels[..., 0]
        assert image.shape == mask.shape == clean.shape


def test_synthetic_defect_changes_only_masked_pixels(tmp_path):
    from anomalyvae.data import _defect, synthetic_texture

    rng = np.random.default_rng(0)
    texture = synthetic_texture(rng, 32)
    damaged, mask = _defect(rng, texture, "blob")
    assert mask.any()
    np.testing.assert_array_equal(damaged[~mask], texture[~mask])
    assert not np.allclose(damaged[mask], texture[mask])


def test_folder_and_discover(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    with pytest.raises(DatasetError, match="no images"):
        folder_samples(flat)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(flat / "a.png")
    assert [s.label for s in discover(flat)] == [0]
    with pytest.raises(DatasetError, match="does not exist"):
        discover(tmp_path / "missing")


def test_split_file(tmp_path):
    (tmp_path / "imgs").mkdir()
    for name in ["n1", "n2", "d1"]:
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "imgs" / f"{name}.jpg")
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "imgs" / "d1.png")
    split = tmp_path / "split.json"
    split.write_text(
        json.dumps(
            {
                "root": ".",
                "train_good": ["imgs/n1.jpg"],
                "test_good": ["imgs/n2.jpg"],
                "test_defect": {"crack": ["imgs/d1.jpg"]},
            }
        )
    )
    assert [s.path.name for s in split_file_samples(split, "train")] == ["n1.jpg"]
    test = discover(split, "test")
    assert [(s.label, s.defect_type) for s in test] == [(0, "good"), (1, "crack")]
    assert test[1].mask_path.name == "d1.png"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DatasetError, match="cannot read split file"):
        discover(bad, "train")


@pytest.mark.parametrize(("side", "expected"), [(28, 32), (64, 64), (100, 96), (400, 128)])
def test_infer_preprocessing_size_from_data(tmp_path, side, expected):
    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((side, side + 7), np.uint8)).save(path)
    spec = infer_preprocessing([path])
    assert (spec.height, spec.width, spec.channels) == (expected, expected, 1)


def test_infer_preprocessing_detects_colour(tmp_path):
    grey, colour = tmp_path / "g.png", tmp_path / "c.png"
    Image.new("RGB", (32, 32), (90, 90, 90)).save(grey)
    Image.new("RGB", (32, 32), (200, 10, 10)).save(colour)
    assert infer_preprocessing([grey]).channels == 1
    assert infer_preprocessing([grey, colour]).channels == 3


def test_the_probe_of_the_training_files_keeps_their_shape_range(tmp_path):
    from anomalyvae.training_data import probe_sources, training_images

    sizes = [(40, 100), (50, 100), (60, 90), (32, 32)]  # (height, width)
    for i, (height, width) in enumerate(sizes):
        ramp = np.arange(height * width).reshape(height, width) % 200
        Image.fromarray(ramp.astype(np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    paths = sorted(tmp_path.glob("*.png"))
    probe = probe_sources(paths)
    assert probe.summary() == {"aspect": [1.0, 2.5], "short_side": [32, 60], "n_probed": 4}
    # the probe read once serves the input size and the model's record alike
    params = {"model": "pixel", "channels": None, "image_size": None}
    params |= {"normalization": "none", "window_center": None, "window_width": None}
    params |= {"percentile_low": 1.0, "percentile_high": 99.0}
    with pytest.warns(UserWarning, match="broken.png"):
        loaded = training_images(paths, params)
    assert loaded.source_shape == probe.summary() and loaded.n_skipped == 1
    assert infer_preprocessing(paths, probe=probe) == infer_preprocessing(paths)


def test_file_list_hash_is_order_free():
    assert file_list_hash(["b", "a"]) == file_list_hash(["a", "b"]) != file_list_hash(["a"])


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [
        (500, 1250, (256, 640)),
        (1250, 500, (640, 256)),
        (300, 320, (256, 256)),
        (100, 1000, (96, 288)),
    ],
)
def test_infer_preprocessing_keeps_the_aspect_ratio_when_asked(tmp_path, height, width, expected):
    for i in range(3):
        ramp = np.arange(height * width).reshape(height, width) % 200
        Image.fromarray(ramp.astype(np.uint8)).save(tmp_path / f"{i}.png")
    paths = sorted(tmp_path.glob("*.png"))
    spec = infer_preprocessing(paths, multiple=32, max_size=256, keep_aspect=True)
    assert (spec.height, spec.width) == expected
    square = infer_preprocessing(paths, multiple=32, max_size=256)
    assert square.height == square.width


def test_flat_folders_leave_out_mask_files(tmp_path):
    pixels = np.zeros((8, 8), np.uint8)
    for stem in ("a", "b"):
        Image.fromarray(pixels).save(tmp_path / f"{stem}.jpg")
        Image.fromarray(pixels).save(tmp_path / f"{stem}.png")  # MTD: the mask beside it
    Image.fromarray(pixels).save(tmp_path / "c.png")  # a plain image
    Image.fromarray(pixels).save(tmp_path / "c_mask.png")
    with pytest.warns(UserWarning, match="left out 3 mask files"):
        samples = discover(tmp_path, "train")
    assert sorted(s.path.name for s in samples) == ["a.jpg", "b.jpg", "c.png"]


def test_files_of_other_types_in_a_training_folder_are_named(tmp_path):
    pixels = np.zeros((8, 8), np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    for name in ("b.heic", "c.HEIC", "notes.txt", ".DS_Store"):
        (tmp_path / "sub" / name).write_bytes(b"not read")
    with pytest.warns(UserWarning, match=r"3 files of other types \(2 .heic, 1 .txt\)"):
        samples = discover(tmp_path, "train")
    assert [s.path.name for s in samples] == ["a.png"]
    (tmp_path / "a.png").unlink()
    with pytest.raises(DatasetError, match=r"no images .*\(3 files of other types"):
        discover(tmp_path, "train")
    # a single image named directly is still a training set of one
    Image.fromarray(pixels).save(tmp_path / "one.png")
    assert [s.path.name for s in folder_samples(tmp_path / "one.png")] == ["one.png"]


def test_training_reads_what_the_scan_reads(tmp_path):
    from anomalyvae.inference.decoding import SCAN_EXTENSIONS

    # a folder the scan scores whole trains whole: WebP and GIF normals are not left out
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8)
    for name in ("a.png", "b.webp", "c.gif"):
        Image.fromarray(pixels).save(tmp_path / name)
    samples = discover(tmp_path, "train")  # no word of files of other types
    assert sorted(s.path.name for s in samples) == ["a.png", "b.webp", "c.gif"]
    assert set(SCAN_EXTENSIONS) == {*IMAGE_EXTENSIONS, ".dcm", ".nii", ".nii.gz"}


def test_a_missing_subset_of_an_mvtec_root_is_an_error(tmp_path):
    (tmp_path / "train" / "good").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "train" / "good" / "a.png")
    with pytest.raises(DatasetError, match="without a 'val' folder.*'train'"):
        discover(tmp_path, "val")


def _silhouettes(folder, n: int, scale: int, bits: int = 8):
    """``n`` PNGs whose stored values are 0, 1 or 2 times ``scale`` (8- or 16-bit)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        values = rng.integers(0, 3, (32, 32)) * scale
        array = values.astype(np.uint8 if bits == 8 else np.uint16)
        paths.append(folder / f"{i}.png")
        Image.fromarray(array).save(paths[-1])
    return paths


def test_files_of_a_few_dark_levels_are_named_as_unscaled_floats(tmp_path):
    """Images in [0, 1] written to integer files without x 255 (or x 65535) keep values
    0-2: say so, name a file and give the fix."""
    from anomalyvae.training_data import few_levels_note, probe_sources

    for bits in (8, 16):
        note = few_levels_note(probe_sources(_silhouettes(tmp_path / f"float{bits}", 6, 1, bits)))
        assert note and "at most 3 grey levels" in note and "stored value is 2" in note
        assert str(tmp_path / f"float{bits}") in note and "full range" in note
    assert few_levels_note(probe_sources(_silhouettes(tmp_path / "scaled", 6, 100))) is None
    # dim data (12-bit values in 16-bit files) stores far more levels: no word
    assert few_levels_note(probe_sources(_silhouettes(tmp_path / "wide", 6, 2000, 16))) is None


def test_training_on_unscaled_float_files_warns_with_the_fix(tmp_path):
    from anomalyvae.detector import VAEAnomalyDetector

    paths = _silhouettes(tmp_path / "float", 12, 1)
    detector = VAEAnomalyDetector(
        model="pixel",
        hidden_channels=(8, 16),
        latent_dim=4,
        epochs=1,
        target_fpr=0.25,
        progress=False,
        normalization="percentile",
    )
    with pytest.warns(UserWarning, match="without scaling by 255"):
        detector.fit(paths)
