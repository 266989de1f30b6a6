from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from anomalyvae import __version__
from anomalyvae.cli import main
from anomalyvae.detector import VAEAnomalyDetector

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture()
def runner():
    return CliRunner()


def test_version(runner):
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


@pytest.mark.parametrize("command", sorted(main.commands))
def test_every_command_has_help_with_an_example_and_docs(runner, command):
    result = runner.invoke(main, [command, "-h"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output and "unexpected error" not in result.output
    reference = (DOCS / "cli.md").read_text()
    assert re.search(rf"^## `anomalyvae {command}`", reference, re.M), command


def test_docs_list_no_missing_commands():
    documented = set(re.findall(r"^## `anomalyvae (\w+)`", (DOCS / "cli.md").read_text(), re.M))
    assert documented == set(main.commands)


def test_train_calibrate_evaluate(runner, synthetic_root, tmp_path):
    model = tmp_path / "model.pt"
    result = runner.invoke(
        main,
        [
            "train",
            str(synthetic_root),
            "-o",
            str(model),
            "--epochs",
            "2",
            "--latent-dim",
            "8",
            "--target-fpr",
            "0.2",
            "--silent",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Trained on 85 images" in result.output and model.exists()

    result = runner.invoke(
        main, ["calibrate", str(model), str(synthetic_root), "--method", "f1", "--silent"]
    )
    assert result.exit_code == 0, result.output
    assert "(f1; 20 normal, 30 anomalous" in result.output

    # 20 normals cannot promise 1 %: --tail chooses whether the largest one sets it
    for tail, chosen in (("conformal", "conformal"), ("auto", "robust")):
        recalibrated = tmp_path / f"{tail}.pt"
        args = ["calibrate", str(model), str(synthetic_root), "--target-fpr", "0.01"]
        with pytest.warns(UserWarning, match="cannot promise"):
            result = runner.invoke(
                main, [*args, "--tail", tail, "-o", str(recalibrated), "--silent"]
            )
        assert result.exit_code == 0, result.output
        loaded = VAEAnomalyDetector.load(recalibrated, progress=False)
        assert loaded.calibration_.tail == chosen
        second, largest = np.sort(loaded.calibration_scores_)[-2:]
        if chosen == "conformal":
            assert loaded.threshold_ == largest
        else:  # the second largest or a Gaussian tail past it, capped at the largest
            assert second <= loaded.threshold_ <= largest

    out = tmp_path / "eval"
    result = runner.invoke(
        main, ["evaluate", str(model), str(synthetic_root), "-o", str(out), "--silent"]
    )
    assert result.exit_code == 0, result.output
    assert "image_auroc" in result.output and "scratch" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["metrics"]) == {"overall", "blob", "scratch", "spot"}
    assert (out / "scores.csv").read_text().count("\n") == 51


def test_resume_from_cli(runner, synthetic_root, tmp_path):
    model = tmp_path / "model.pt"
    common = [
        "train",
        str(synthetic_root),
        "-o",
        str(model),
        "--latent-dim",
        "8",
        "--target-fpr",
        "0.2",
        "--silent",
    ]
    assert runner.invoke(main, common + ["--epochs", "1"]).exit_code == 0
    result = runner.invoke(main, common + ["--epochs", "2", "--resume"])
    assert result.exit_code == 0, result.output
    assert "for 2 epochs" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "{empty}", "-o", "{tmp}/m.pt"], "no images"),
        (["evaluate", "{bad}", "{empty}"], "not a readable anomalyvae checkpoint"),
        (["calibrate", "{bad}", "{empty}"], "not a readable anomalyvae checkpoint"),
        (["train", "{tmp}/missing"], "does not exist"),
        (["train", "{empty}", "--resume", "-o", "{tmp}/none.pt"], "no images"),
    ],
)
def test_errors_are_one_clean_line(runner, tmp_path, args, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    args = [a.format(empty=empty, bad=bad, tmp=tmp_path) for a in args]
    result = runner.invoke(main, args)
    assert result.exit_code in (1, 2)
    assert message in result.output
    assert "Traceback" not in result.output


def test_usage_error_exit_code(runner, tmp_path):
    assert runner.invoke(main, ["train"]).exit_code == 2
    assert runner.invoke(main, ["nope"]).exit_code == 2
    # an unknown family, and settings the library rejects, are command-line mistakes
    result = runner.invoke(main, ["train", str(tmp_path), "--model", "nope"])
    assert result.exit_code == 2 and "'nope' is not one of auto, pixel, feature" in result.output
    for option, value, message in (
        ("--bank-size", "many", "neither 'auto' nor a number of rows"),
        ("--bank-size", "8", "at least 16 rows"),
        ("--bank-dim", "wide", "neither 'auto' nor a number of directions"),
        ("--bank-dim", "-1", "bank_dim must be"),
    ):
        result = runner.invoke(main, ["train", str(tmp_path), option, value])
        assert result.exit_code == 2 and message in result.output
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    args = ["scan", str(model), str(tmp_path), "-o", str(tmp_path / "o"), "--address", "auto"]
    result = runner.invoke(main, args)
    assert result.exit_code == 2 and "Ray engine" in result.output


def test_a_bug_keeps_its_traceback_and_a_mistake_does_not(monkeypatch, tmp_path):
    import numpy as np

    import anomalyvae.evaluation as evaluation

    def buggy(*args, **kwargs):
        return np.zeros(3).reshape(2, 2)  # a ValueError raised inside numpy: our bug

    monkeypatch.setattr(evaluation, "train_on", buggy)
    (tmp_path / "d").mkdir()
    runner = CliRunner()
    result = runner.invoke(main, ["train", str(tmp_path / "d"), "-o", str(tmp_path / "m.pt")])
    assert isinstance(result.exception, ValueError) and "Error:" not in result.output
    assert "unexpected error" in result.output

    def mistake(*args, **kwargs):
        from anomalyvae.models.vae import VAEConfig

        return VAEConfig(latent_dim=0)  # a check of our own code raises

    monkeypatch.setattr(evaluation, "train_on", mistake)
    result = runner.invoke(main, ["train", str(tmp_path / "d"), "-o", str(tmp_path / "m.pt")])
    assert result.exit_code == 1 and "Error: latent_dim must be >= 1" in result.output


def test_an_unwritable_output_is_one_clean_error(monkeypatch, tmp_path):
    import anomalyvae.evaluation as evaluation

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "m.pt"))

    monkeypatch.setattr(evaluation, "train_on", full)
    (tmp_path / "d").mkdir()
    result = CliRunner().invoke(main, ["train", str(tmp_path / "d"), "-o", str(tmp_path / "m.pt")])
    assert result.exit_code == 1
    assert "Error: No space left on device" in result.output and "resumes" in result.output


def test_score_takes_a_nifti_volume_slice_by_slice(
    runner, trained, synthetic_root, tmp_path, scores_close
):
    import nibabel
    import numpy as np

    from anomalyvae.imaging.volumes import read_volume, volume_slices

    detector, checkpoint = trained
    rng = np.random.default_rng(0)
    volume = rng.random((40, 40, 5)).astype(np.float32) * 1000
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), str(tmp_path / "ct.nii.gz"))
    image = sorted((synthetic_root / "test" / "good").glob("*.png"))[0]
    args = ["score", str(checkpoint), str(image), str(tmp_path / "ct.nii.gz"), str(image)]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in result.output.strip().splitlines()]
    names = [row[0] for row in rows]
    slices = [f"{tmp_path / 'ct.nii.gz'}#slice={k:04d}" for k in range(5)]
    assert names == [str(image), *slices, str(tmp_path / "ct.nii.gz"), str(image)]
    expected = detector.anomaly_score(
        volume_slices(tmp_path / "ct.nii.gz", detector.preprocessing_),
    )
    scores = [float(r[1]) for r in rows[1:7]]
    scores_close(scores, [*expected, expected.max()], rel=1e-4, threshold=detector.threshold_)
    assert read_volume(tmp_path / "ct.nii.gz").data.shape[0] == 5
    # the library keeps one score per file: a volume is a clear error, never extra rows
    with pytest.raises(ValueError, match="3-D volume of 5 slices"):
        detector.anomaly_score([image, tmp_path / "ct.nii.gz"])


def test_score_takes_a_multi_page_file_page_by_page(
    runner, trained, synthetic_root, tmp_path, scores_close
):
    """Every page of a TIFF gets a line with the score it gets as a file of its own; a
    later page's defect is not hidden behind the first page's score."""
    from PIL import Image

    detector, checkpoint = trained
    pages = sorted((synthetic_root / "test").rglob("*.png"))[:3]
    images = [Image.open(p) for p in pages]
    stack = tmp_path / "stack.tif"
    images[0].save(stack, save_all=True, append_images=images[1:])
    result = runner.invoke(main, ["score", str(checkpoint), str(stack)])
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in result.output.strip().splitlines()]
    assert [r[0] for r in rows] == [*(f"{stack}#slice={k:04d}" for k in range(3)), str(stack)]
    alone = detector.anomaly_score(pages)
    scores = [float(r[1]) for r in rows]
    scores_close(scores, [*alone, alone.max()], rel=1e-4, threshold=detector.threshold_)
    # one score per file in the library: a file of several images is a clear error
    with pytest.raises(ValueError, match="holds 3 images"):
        detector.anomaly_score([stack])


@pytest.mark.parametrize("command", ["sample", "denoise", "inpaint", "embed"])
def test_generative_commands_take_silent(runner, command):
    result = runner.invoke(main, [command, "-h"])
    assert "--silent" in result.output


def test_time_budget_counts_the_whole_command():
    from anomalyvae.clock import STARTED, command_budget

    # what the command spent before the fit comes off, and 1 % (at most 5 s) stays for
    # the final save: a 900 s budget 3 s into the command leaves the fit 892 s
    assert command_budget(900.0, now=STARTED + 3.0) == pytest.approx(892.0)
    assert command_budget(100.0, now=STARTED + 3.0) == pytest.approx(96.0)
    assert command_budget(2.0, now=STARTED + 3.0) == 1.0  # never below a second
    assert command_budget(None) is None


def test_calibrate_refuses_a_score_kind_the_model_cannot_give(runner, trained, synthetic_root):
    """One clean line naming what is needed, and the checkpoint is left as it was."""
    _, checkpoint = trained
    before = checkpoint.read_bytes()
    args = ["calibrate", str(checkpoint), str(synthetic_root), "--score-kind", "knn", "--silent"]
    result = runner.invoke(main, args)
    assert result.exit_code in (1, 2)
    assert "feature model" in result.output and "Traceback" not in result.output
    assert checkpoint.read_bytes() == before


def test_evaluate_leaves_unreadable_files_out_and_lists_them(
    runner, trained, synthetic_root, tmp_path
):
    import os
    import shutil

    _, checkpoint = trained
    root = tmp_path / "data"
    shutil.copytree(synthetic_root / "test", root / "test")
    (root / "test" / "good" / "broken.png").write_bytes(b"not an image")
    good = sorted((root / "test" / "good").glob("*.png"))[0]
    odd = os.fsencode(root / "test" / "good") + b"/latin1-\xe9.png"  # not UTF-8
    with open(odd, "wb") as handle:
        handle.write(good.read_bytes())
    out = tmp_path / "eval"
    with pytest.warns(UserWarning, match="broken.png"):
        result = runner.invoke(main, ["evaluate", str(checkpoint), str(root), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "1 file is left out of these metrics (unreadable" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert [Path(e["path"]).name for e in metrics["left_out"]] == ["broken.png"]
    assert metrics["metrics"]["overall"]["n_images"] == 51  # 50 + the odd name, scored
    assert "latin1-\\xe9.png" in (out / "scores.csv").read_text()


def test_evaluate_reads_a_chunk_at_a_time_with_the_same_results(
    trained, synthetic_root, tmp_path, monkeypatch, scores_close
):
    """Chunks bound evaluate's memory (one chunk of images, not the set); the scores,
    maps and metrics are those of one pass, and an unreadable file in a middle chunk is
    left out without shifting any other file's row."""
    import shutil

    import anomalyvae.evaluation as evaluation
    import anomalyvae.set_scoring as set_scoring

    detector, _ = trained
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    (root / "test" / "good" / "0007_broken.png").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="0007_broken.png"):
        whole = evaluation.evaluate_on(detector, root, tmp_path / "whole", progress=False)
    monkeypatch.setattr(set_scoring, "CHUNK_BYTES", 1)  # chunks of 8 files
    with pytest.warns(UserWarning, match="0007_broken.png"):
        chunked = evaluation.evaluate_on(detector, root, tmp_path / "chunked", progress=False)
    # the same rows in the same order; scores equal up to float rounding (batches differ)
    columns = ["path", "defect_type", "label", "is_anomaly"]
    pd.testing.assert_frame_equal(chunked.per_image[columns], whole.per_image[columns])
    scores_close(chunked.per_image["score"], whole.per_image["score"], rel=1e-4)
    assert np.allclose(chunked.maps, whole.maps, rtol=0, atol=1e-4 * np.ptp(whole.maps))
    for metric in ("image_auroc", "pixel_auroc", "aupro"):
        assert chunked.table[metric].to_numpy() == pytest.approx(
            whole.table[metric].to_numpy(), abs=1e-3
        )
    assert [e["path"] for e in chunked.left_out] == [e["path"] for e in whole.left_out]


def test_evaluate_reads_the_next_chunk_while_it_scores_one(trained, synthetic_root, monkeypatch):
    """The next chunk's files are read in a thread while a chunk is scored: the first
    chunk's scoring waits for the second chunk's read to begin, which only a read ahead
    can start (read in turn, the wait runs out and the test fails)."""
    import threading

    import anomalyvae.evaluation as evaluation
    import anomalyvae.set_scoring as set_scoring

    detector, _ = trained
    monkeypatch.setattr(set_scoring, "CHUNK_BYTES", 1)  # chunks of 8 files
    readers: list[str] = []
    second_read = threading.Event()
    real_read, real_score = set_scoring.read_images, detector.score_map_views

    def read_images(paths, *args, **kwargs):
        readers.append(threading.current_thread().name)
        if len(readers) == 2:
            second_read.set()
        return real_read(paths, *args, **kwargs)

    overlapped: list[bool] = []

    def score_map_views(images):
        if not overlapped:
            overlapped.append(second_read.wait(timeout=30))
        return real_score(images)

    monkeypatch.setattr(set_scoring, "read_images", read_images)
    monkeypatch.setattr(detector, "score_map_views", score_map_views)
    found = evaluation.evaluate_on(detector, synthetic_root, progress=False)
    assert overlapped == [True]
    assert len(readers) == -(-len(found.per_image) // 8) > 2
    assert threading.current_thread().name not in readers


def test_evaluate_leaves_out_an_image_whose_mask_is_broken_and_names_both(
    runner, trained, synthetic_root, tmp_path
):
    """A mask that is a FIFO, one that cannot be decoded and one of another size: each
    image is left out of the metrics with a warning naming both files (as a volume with
    a bad mask is), never read from a FIFO, and the evaluation of the rest goes on."""
    import os
    import shutil

    import anomalyvae.evaluation as evaluation

    detector, checkpoint = trained
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    masks = sorted((root / "ground_truth").rglob("*_mask.png"))[:3]
    masks[0].unlink()
    os.mkfifo(masks[0])
    masks[1].write_bytes(b"not a png")
    Image.new("L", (7, 5)).save(masks[2])
    whole = evaluation.evaluate_on(detector, synthetic_root, progress=False)
    with pytest.warns(UserWarning, match="left out of the evaluation") as caught:
        found = evaluation.evaluate_on(detector, root, tmp_path / "e", progress=False)
    messages = " ".join(str(w.message) for w in caught)
    assert "a FIFO" in messages and "5x7 but its image is 32x32" in messages
    assert all(m.name in messages for m in masks) and "fix or remove the mask" in messages
    assert len(found.left_out) == 3 and len(found.per_image) == len(whole.per_image) - 3
    images = {str(m).replace("ground_truth", "test").replace("_mask", "") for m in masks}
    assert {e["path"] for e in found.left_out} == images
    assert not images & set(found.per_image["path"])
    assert found.masks.shape[0] == found.maps.shape[0] == len(found.per_image)
    # the other rows keep their scores
    moved = whole.per_image["path"].str.replace(str(synthetic_root), str(root), regex=False)
    kept = whole.per_image.set_index(moved).loc[found.per_image["path"], "score"]
    np.testing.assert_allclose(found.per_image["score"], kept.to_numpy(), rtol=1e-4)
    assert "pixel_auroc" in found.table
    # the command says so, and ends well
    args = ["evaluate", str(checkpoint), str(root), "-o", str(tmp_path / "c")]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "3 files are left out of these metrics" in result.output


def test_evaluate_keeps_no_map_for_a_set_without_masks(trained, synthetic_root, tmp_path):
    """The maps serve the pixel metrics only: without masks evaluate holds none of them
    (its memory then does not grow with the set), and the image metrics are unchanged."""
    import shutil

    import anomalyvae.evaluation as evaluation

    detector, _ = trained
    root = tmp_path / "data"
    shutil.copytree(synthetic_root / "test", root / "test")  # no ground_truth folder
    with_masks = evaluation.evaluate_on(detector, synthetic_root, progress=False)
    without = evaluation.evaluate_on(detector, root, tmp_path / "e", progress=False)
    assert without.maps is None and without.masks is None
    assert with_masks.maps is not None and with_masks.maps.shape[0] == len(with_masks.per_image)
    assert "pixel_auroc" not in without.table and "pixel_auroc" in with_masks.table
    for metric in ("image_auroc", "recall", "fpr"):
        assert without.table[metric].to_numpy() == pytest.approx(
            with_masks.table[metric].to_numpy(), abs=1e-9
        )


@pytest.mark.parametrize("method", ["normal_quantile", "f1"])
def test_calibrate_reads_a_chunk_at_a_time_with_the_thresholds_of_one_pass(
    trained, synthetic_root, tmp_path, monkeypatch, method
):
    """calibrate scores its set a chunk at a time, as evaluate does, keeping a sample of
    each normal map's pixels: on a set whose maps fit the sample whole, both thresholds
    are those the detector reads from the whole set in memory."""
    import anomalyvae.evaluation as evaluation
    import anomalyvae.set_scoring as set_scoring
    from anomalyvae.data import discover

    detector, checkpoint = trained
    samples = discover(synthetic_root, "test")
    if method == "normal_quantile":
        samples = [s for s in samples if s.label == 0]
        labels, masks = None, None
    else:  # the synthetic set has a mask for every defect
        labels = np.array([s.label for s in samples])
        masks = set_scoring.masks_for(samples, detector, 0.0)
    reference = VAEAnomalyDetector.load(checkpoint, progress=False)
    reference.calibrate([s.path for s in samples], labels, masks, method=method)
    monkeypatch.setattr(set_scoring, "CHUNK_BYTES", 1)  # chunks of 8 files
    out = tmp_path / "chunked.pt"
    chunked = evaluation.calibrate_on(checkpoint, synthetic_root, out, method, progress=False)
    scale = np.ptp(reference.calibration_scores_) if labels is None else 1.0
    assert chunked.threshold_ == pytest.approx(reference.threshold_, rel=1e-4, abs=1e-4 * scale)
    assert chunked.pixel_threshold_ == pytest.approx(reference.pixel_threshold_, rel=1e-4)
    if labels is None:
        assert len(chunked.calibration_scores_) == len(samples)


def test_calibrate_reads_normal_volumes_slice_by_slice_between_images(
    trained, synthetic_root, tmp_path, monkeypatch
):
    """A folder of normals that mixes images and NIfTI volumes calibrates on every image
    and every non-background slice, each volume scored on its own between the chunks."""
    import shutil

    import nibabel

    import anomalyvae.evaluation as evaluation
    import anomalyvae.set_scoring as set_scoring

    _, checkpoint = trained
    good = tmp_path / "data" / "test" / "good"
    pngs = sorted((synthetic_root / "test" / "good").glob("*.png"))[:10]
    good.mkdir(parents=True)
    for png in pngs:
        shutil.copy(png, good / png.name)
    rng = np.random.default_rng(0)
    for name in ("0003_a.nii.gz", "0006_b.nii.gz"):  # sorted between the images
        volume = (rng.random((32, 32, 4)) * 1000 + 10).astype(np.float32)
        nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), str(good / name))
    monkeypatch.setattr(set_scoring, "CHUNK_BYTES", 1)  # chunks of 8 files
    out = tmp_path / "recalibrated.pt"
    chunked = evaluation.calibrate_on(checkpoint, tmp_path / "data", out, progress=False)
    reference = VAEAnomalyDetector.load(checkpoint, progress=False)
    reference.calibrate(sorted(good.iterdir()))
    assert len(chunked.calibration_scores_) == 10 + 2 * 4
    np.testing.assert_allclose(
        chunked.calibration_scores_, reference.calibration_scores_, rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("kept", ["good", "defects"])
def test_evaluate_says_why_ranking_metrics_are_nan_with_one_class(
    runner, trained, synthetic_root, tmp_path, kept
):
    import shutil

    _, checkpoint = trained
    root = tmp_path / "data"
    for folder in (synthetic_root / "test").iterdir():
        if (folder.name == "good") == (kept == "good") and folder.name != "ground_truth":
            shutil.copytree(folder, root / "test" / folder.name)
    result = runner.invoke(
        main, ["evaluate", str(checkpoint), str(root), "-o", str(tmp_path / "e")]
    )
    assert result.exit_code == 0, result.output
    expected = "No anomalous images" if kept == "good" else "No normal images"
    assert expected in result.output and "need both classes" in result.output


@pytest.mark.parametrize("method", ["normal_quantile", "f1"])
def test_calibrate_skips_an_unreadable_file_and_names_it(
    runner, trained, synthetic_root, tmp_path, method
):
    import shutil

    _, checkpoint = trained
    root = tmp_path / "data"
    shutil.copytree(synthetic_root / "test", root / "test")
    (root / "test" / "good" / "broken.png").write_bytes(b"not an image")
    if method == "f1":
        (root / "test" / "spot" / "broken_defect.png").write_bytes(b"")
    out = tmp_path / "recalibrated.pt"
    args = ["calibrate", str(checkpoint), str(root), "--method", method, "-o", str(out)]
    with pytest.warns(UserWarning, match="broken") as caught:
        result = runner.invoke(main, [*args, "--target-fpr", "0.25", "--silent"])
    assert result.exit_code == 0, result.output
    assert any("broken.png" in str(w.message) for w in caught)
    loaded = VAEAnomalyDetector.load(out, progress=False)
    normals = len(list((synthetic_root / "test" / "good").glob("*.png")))
    if method == "normal_quantile":  # every readable normal, and only those
        assert len(loaded.calibration_scores_) == normals
    else:
        assert f"{normals} normal" in result.output
    # nothing readable: a clear error, the checkpoint untouched
    empty = tmp_path / "none"
    (empty / "test" / "good").mkdir(parents=True)
    (empty / "test" / "good" / "x.png").write_bytes(b"")
    with pytest.warns(UserWarning):
        result = runner.invoke(main, ["calibrate", str(checkpoint), str(empty), "-o", str(out)])
    assert result.exit_code == 1 and "no readable" in result.output


def test_score_reads_a_chunk_at_a_time_with_the_rows_of_one_pass(
    trained, synthetic_root, tmp_path, monkeypatch
):
    """score holds one chunk of images, not every file it is given: the rows (names,
    order, verdicts, an unreadable file's error row in the middle of a chunk) and the
    scores are those of one pass."""
    import anomalyvae.file_scores as file_scores
    import anomalyvae.set_scoring as set_scoring
    from anomalyvae.file_scores import score_files

    _, checkpoint = trained
    reads: list[int] = []
    reader = file_scores.read_images

    def counted(paths, *args, **kwargs):
        reads.append(len(paths))
        return reader(paths, *args, **kwargs)

    paths = sorted((synthetic_root / "test").rglob("*.png"))[:20]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    paths.insert(11, broken)
    whole = score_files(checkpoint, paths)
    monkeypatch.setattr(set_scoring, "CHUNK_BYTES", 1)  # chunks of 8 files
    monkeypatch.setattr(file_scores, "read_images", counted)
    chunked = score_files(checkpoint, paths)
    assert reads == [8, 8, 5]
    assert [(r.name, r.is_anomaly, r.error) for r in chunked] == [
        (r.name, r.is_anomaly, r.error) for r in whole
    ]
    assert chunked[11].error.startswith("cannot read image") and len(chunked) == 21
    np.testing.assert_allclose(
        [r.score for r in chunked], [r.score for r in whole], rtol=1e-4, equal_nan=True
    )


def test_score_gives_every_file_a_row_and_names_any_file(runner, trained, synthetic_root, tmp_path):
    import os
    import shutil

    _, checkpoint = trained
    good = sorted((synthetic_root / "test" / "good").glob("*.png"))[0]
    odd = tmp_path / os.fsdecode(b"part_\xff.png")
    shutil.copy(good, odd)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    result = runner.invoke(main, ["score", str(checkpoint), str(good), str(broken), str(odd)])
    assert result.exit_code == 1, result.output  # the broken file, after every row
    rows = [line.split("\t") for line in result.output.strip().splitlines()]
    assert [r[0] for r in rows] == [str(good), str(broken), str(tmp_path / "part_\\xff.png")]
    assert rows[1][3].startswith("ERROR: cannot read image") and rows[2][3] in ("ok", "ANOMALY")
    assert float(rows[0][1]) == pytest.approx(float(rows[2][1]), rel=1e-5)  # same pixels
