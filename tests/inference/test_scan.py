from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from anomalyvae.cli import main
from anomalyvae.imaging.files import walk_images
from anomalyvae.imaging.io import ImageReadError
from anomalyvae.inference.decoding import SCAN_EXTENSIONS
from anomalyvae.inference.records import COLUMNS, ScanOutputError
from anomalyvae.inference.report import report_from_results
from anomalyvae.inference.scan import ScanConfig, scan


def _png(path: Path, size=(32, 32), value=None, mode="L", seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    array = (
        rng.integers(0, 255, size[::-1], dtype=np.uint8)
        if value is None
        else np.full(size[::-1], value, np.uint8)
    )
    Image.fromarray(array).convert(mode).save(path)
    return path


def _copy_synthetic(root: Path, dest: Path, n: int = 20) -> Path:
    files = sorted((root / "test").rglob("*.png"))[:n]
    for f in files:
        target = dest / f.relative_to(root / "test")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, target)
    return dest


def test_scan_writes_table_heatmaps_summary_report(onnx_model, synthetic_root, tmp_path):
    folder = _copy_synthetic(synthetic_root, tmp_path / "in", n=50)
    result = scan(onnx_model, folder, tmp_path / "out", ScanConfig(batch_size=8), progress=False)
    table = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert list(table.columns) == list(COLUMNS)
    assert len(table) == result.n_files == 50 and result.n_errors == 0
    assert table["relative_path"].is_unique
    assert (table["error"] == "").all() and table["score"].notna().all()
    anomalies = table[table["is_anomaly"]]
    assert len(anomalies) == result.n_anomalies > 0
    for heatmap in anomalies["heatmap"]:
        path = tmp_path / "out" / heatmap
        assert path.is_file() and Image.open(path).size == (32, 32)
    assert (table.loc[~table["is_anomaly"], "heatmap"] == "").all()
    assert table["peak_x"].between(0, 32).all() and table["anomalous_area"].between(0, 1).all()
    csv = pd.read_csv(tmp_path / "out" / "results.csv")
    assert len(csv) == 50
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["n_files"] == 50 and summary["model"]["format"] == "anomalyvae-onnx"
    html = (tmp_path / "out" / "report.html").read_text()
    assert "data:image/png;base64" in html and "http://" not in html and "https://" not in html
    assert "Model card" in html and "anomaly_map" in html


def test_resume_skips_done_and_adds_new(onnx_model, synthetic_root, tmp_path):
    folder = _copy_synthetic(synthetic_root, tmp_path / "in", n=12)
    out = tmp_path / "out"
    first = scan(onnx_model, folder, out, ScanConfig(chunk_rows=4), progress=False)
    assert first.n_scored_now == 12
    _png(folder / "new" / "extra.png")
    second = scan(onnx_model, folder, out, ScanConfig(chunk_rows=4), progress=False)
    assert second.n_scored_now == 1 and second.n_skipped_done == 12 and second.n_files == 13
    time.sleep(0.01)
    _png(folder / "new" / "extra.png", seed=5)  # changed file: rescored, not duplicated
    os.utime(folder / "new" / "extra.png", (time.time() + 5, time.time() + 5))
    third = scan(onnx_model, folder, out, ScanConfig(chunk_rows=4), progress=False)
    assert third.n_scored_now == 1
    table = pd.read_parquet(out / "results.parquet")
    assert len(table) == 13 and table["relative_path"].is_unique


KILL_SCRIPT = """
import sys
from anomalyvae.inference.scan import ScanConfig, scan
scan(sys.argv[1], sys.argv[2], sys.argv[3], ScanConfig(batch_size=2, chunk_rows=2, workers=1,
     heatmaps="all"), progress=False)
"""


def test_kill_9_then_resume_loses_and_duplicates_nothing(onnx_model, tmp_path):
    folder = tmp_path / "in"
    for i in range(120):
        _png(folder / f"d{i % 3}" / f"{i:04d}.png", seed=i)
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(onnx_model), str(folder), str(out)]
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "parts").glob("part-*.parquet"))) < 5:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    parts_before = len(list((out / "parts").glob("part-*.parquet")))
    assert parts_before >= 5, "the scan finished or never started before the kill"
    assert not (out / "results.parquet").exists()
    for part in (out / "parts").glob("part-*.parquet"):
        pd.read_parquet(part)  # every part that exists is whole: parts are renamed into place
    result = scan(onnx_model, folder, out, ScanConfig(batch_size=8), progress=False)
    table = pd.read_parquet(out / "results.parquet")
    assert len(table) == 120 and table["relative_path"].is_unique
    assert result.n_skipped_done >= 2 * (parts_before - 1)
    assert (table["error"] == "").all()


def _make_bad_inputs(folder: Path) -> dict[str, str | None]:
    """File name -> expected error fragment (None = must score fine)."""
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str | None] = {}
    (folder / "zero.png").write_bytes(b"")
    expected["zero.png"] = "not a recognised image format"
    (folder / "text.png").write_text("I am not an image")
    expected["text.png"] = "not a recognised image format"
    good_png = _png(folder / "tmp_full.png", size=(64, 64))
    data = good_png.read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    expected["truncated.png"] = "truncated"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        folder / "tmp_full.jpg", quality=95
    )
    data = (folder / "tmp_full.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    expected["truncated.jpg"] = "truncated"
    (folder / "tmp_full.png").unlink()
    (folder / "tmp_full.jpg").unlink()
    # decompression bomb: a tiny file claiming 13000 x 13000 pixels
    _bomb(folder / "bomb.png", 13000)
    expected["bomb.png"] = "too large"
    ramp = np.arange(30 * 40).reshape(30, 40) % 50  # every decodable test file has content
    rgb = np.stack([ramp, ramp[::-1], ramp[:, ::-1]], -1)
    Image.fromarray((rgb + 10).astype(np.uint8)).convert("CMYK").save(folder / "cmyk.jpg")
    expected["cmyk.jpg"] = None
    Image.fromarray((ramp[:, :30] % 5).astype(np.uint8), "L").convert("P").save(
        folder / "palette.png"
    )
    expected["palette.png"] = None
    Image.fromarray(np.dstack([rgb + 100, np.full((30, 40), 128)]).astype(np.uint8), "RGBA").save(
        folder / "alpha.png"
    )
    expected["alpha.png"] = None
    Image.fromarray((40000 + 10 * ramp).astype(np.uint16)).save(folder / "sixteen.png")
    expected["sixteen.png"] = None
    Image.fromarray((40000 + 10 * ramp).astype(np.uint16)).save(folder / "sixteen.tif")
    expected["sixteen.tif"] = None
    Image.fromarray(np.full((30, 30), 77, np.uint8)).save(folder / "blank.png")
    expected["blank.png"] = "blank"  # a dead camera's frame: no verdict, never a pass
    frames = [Image.fromarray((ramp[:, :30] + v).astype(np.uint8)) for v in (10, 200)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    expected["animated.gif"] = None  # and a row per frame (the file's: its worst frame)
    expected |= {f"animated.gif#slice={k:04d}": None for k in range(2)}
    _png(folder / "tiny.png", size=(2, 2))
    expected["tiny.png"] = None
    _png(folder / "ünïcødé 名前.png")
    expected["ünïcødé 名前.png"] = None
    raw = os.fsencode(folder) + b"/latin1-\xe9.png"
    with open(raw, "wb") as handle:
        handle.write(_png(folder / "tmp.png").read_bytes())
    (folder / "tmp.png").unlink()
    expected["latin1-\\xe9.png"] = None
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    return expected


def _bomb(path: Path, side: int) -> None:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")
        )

    ihdr = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])  # 1-bit greyscale
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    idat = zlib.compress(row * side, 9)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def test_bad_inputs_become_rows_and_the_scan_goes_on(onnx_model, tmp_path):
    folder = tmp_path / "bad"
    expected = _make_bad_inputs(folder)
    result = scan(onnx_model, folder, tmp_path / "out", ScanConfig(heatmaps="all"), progress=False)
    table = pd.read_parquet(tmp_path / "out" / "results.parquet").set_index("relative_path")
    assert sorted(table.index) == sorted(expected), "a symlink loop must not duplicate files"
    for name, fragment in expected.items():
        error = table.loc[name, "error"]
        if fragment is None:
            assert error == "" and np.isfinite(table.loc[name, "score"]), (name, error)
            assert table.loc[name, "is_anomaly"] in (True, False)
        else:
            assert fragment in error, (name, error)
            # no verdict: a filter on is_anomaly must not pass an unscored file as normal
            assert pd.isna(table.loc[name, "is_anomaly"]), name
    csv = pd.read_csv(tmp_path / "out" / "results.csv").set_index("relative_path")
    assert csv.loc[csv["error"].notna(), "is_anomaly"].isna().all()
    assert result.n_errors == sum(v is not None for v in expected.values())
    assert result.n_files == len(expected) - 2  # files, not frames
    assert table.loc["sixteen.png", "bit_depth"] == 16
    assert table.loc["cmyk.jpg", "channels"] == 3
    assert (tmp_path / "out" / "report.html").is_file()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files without read permission")
def test_unreadable_permission(onnx_model, tmp_path):
    folder = tmp_path / "in"
    _png(folder / "locked.png").chmod(0)
    scan(onnx_model, folder, tmp_path / "out", progress=False)
    table = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert "permission" in table.loc[0, "error"]


def test_empty_folder(onnx_model, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScanOutputError, match="no image files"):
        scan(onnx_model, tmp_path / "empty", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # no report that says "Threshold nan"


def test_discover_include_exclude_and_order(tmp_path):
    def discover(root, **kwargs):
        return walk_images(root, SCAN_EXTENSIONS, **kwargs)

    for name in ["b/x.png", "a/y.png", "a/skip/z.png", "c.txt"]:
        _png(tmp_path / name) if name.endswith(".png") else (tmp_path / name).write_text("")
    names = [p.relative_to(tmp_path).as_posix() for p in discover(tmp_path)]
    assert names == ["a/y.png", "a/skip/z.png", "b/x.png"]  # walk order, sorted per folder
    assert [p.name for p in discover(tmp_path, exclude=["*/skip/*"])] == ["y.png", "x.png"]
    assert [p.name for p in discover(tmp_path, include=["b/*"])] == ["x.png"]
    with pytest.raises(FileNotFoundError):
        discover(tmp_path / "missing")


@pytest.mark.parametrize(("mode", "n_heatmaps"), [("none", 0), ("all", 6), ("top-2", 2)])
def test_heatmap_modes(onnx_model, tmp_path, mode, n_heatmaps):
    for i in range(6):
        _png(tmp_path / "in" / f"{i}.png", seed=i)
    scan(onnx_model, tmp_path / "in", tmp_path / "out", ScanConfig(heatmaps=mode), progress=False)
    table = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert (table["heatmap"] != "").sum() == n_heatmaps
    # a gallery tile without a heatmap says why instead of showing an empty frame
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.count("no heatmap drawn") == 6 - n_heatmaps
    with pytest.raises(ValueError, match="top-N"):
        ScanConfig(heatmaps="some")


@pytest.mark.parametrize("n", [1, 2, 4])
def test_top_n_heatmaps_count_files_and_draw_a_volumes_worst_slice(onnx_model, tmp_path, n):
    """top-N picks the N highest-scoring files: a volume or multi-page file is one of
    them (never its slices in its place) and gets its worst slice's or page's heatmap,
    the same picture the "all" mode draws for it."""
    import nibabel

    folder = tmp_path / "in"
    for i in range(2):
        _png(folder / f"{i}.png", size=(40, 40), seed=i)
    volume = np.random.default_rng(0).random((40, 40, 4)).astype(np.float32) * 1000
    volume[5:30, 5:30, 2] = 9000
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), str(folder / "ct.nii.gz"))
    _pages(folder / "stack.tif", [100, 255, 100])
    scan(onnx_model, folder, tmp_path / "out", ScanConfig(heatmaps=f"top-{n}"), progress=False)
    table = pd.read_parquet(tmp_path / "out" / "results.parquet").set_index("relative_path")
    files = table[table["slice"].isna()].sort_values("score", ascending=False)
    assert (files["heatmap"] != "").tolist() == [k < n for k in range(len(files))]
    for name in files.index[:n]:
        parts = table[(table["source"] == name) & table["slice"].notna()]
        if len(parts):  # the file's heatmap is its worst part's, shared with that row
            worst = parts["score"].idxmax()
            assert files.loc[name, "heatmap"] == parts.loc[worst, "heatmap"]
            assert files.loc[name, "heatmap"].endswith(
                f"#slice={int(parts.loc[worst, 'slice']):04d}.heatmap.png"
            )
        assert (tmp_path / "out" / files.loc[name, "heatmap"]).is_file()
    everything = tmp_path / "all"
    scan(onnx_model, folder, everything, ScanConfig(heatmaps="all"), progress=False)
    for heatmap in files["heatmap"][files["heatmap"] != ""]:
        drawn = np.asarray(Image.open(tmp_path / "out" / heatmap), np.float64)
        assert np.abs(drawn - np.asarray(Image.open(everything / heatmap))).mean() < 1.0


def test_a_scan_resumed_with_heatmaps_draws_them_for_the_files_scored_before(
    onnx_model, synthetic_root, tmp_path
):
    _copy_synthetic(synthetic_root, tmp_path / "in", n=30)
    first = scan(onnx_model, tmp_path / "in", tmp_path / "out", progress=False)
    # the default draws heatmaps of anomalies only
    assert first.n_scored_now == 30 and 0 < first.n_anomalies < 30
    again = scan(
        onnx_model, tmp_path / "in", tmp_path / "out", ScanConfig(heatmaps="all"), progress=False
    )
    table = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert len(table) == 30 and (table["heatmap"] != "").all()
    assert all((tmp_path / "out" / name).is_file() for name in table["heatmap"])
    assert again.n_scored_now == first.n_files - first.n_anomalies
    # and with nothing more asked, nothing is redone
    last = scan(
        onnx_model, tmp_path / "in", tmp_path / "out", ScanConfig(heatmaps="all"), progress=False
    )
    assert last.n_scored_now == 0


def test_cli_scan_exit_codes_and_report(onnx_model, synthetic_root, tmp_path):
    folder = _copy_synthetic(synthetic_root, tmp_path / "in", n=30)
    (folder / "broken.png").write_text("nope")
    runner = CliRunner()
    args = [
        "scan",
        str(onnx_model),
        str(folder),
        "-o",
        str(tmp_path / "out"),
        "--silent",
        "--device",
        "cpu",
    ]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "31 files" in result.output and "1 unreadable" in result.output
    assert runner.invoke(main, args + ["--fail-on-anomaly"]).exit_code == 3
    assert runner.invoke(main, args + ["--strict"]).exit_code == 4
    (tmp_path / "out" / "report.html").unlink()
    result = runner.invoke(main, ["report", str(tmp_path / "out" / "results.parquet")])
    assert result.exit_code == 0 and (tmp_path / "out" / "report.html").is_file()
    # the scan's folder names its table; a damaged summary.json costs only its extras
    (tmp_path / "out" / "report.html").unlink()
    (tmp_path / "out" / "summary.json").write_text('{"n_files": 3')
    with pytest.warns(UserWarning, match="summary.json' is unreadable"):
        result = runner.invoke(main, ["report", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    page = " ".join((tmp_path / "out" / "report.html").read_text().split())
    assert "<b>31</b>files" in page and "1 file could not be scored" in page
    bad = tmp_path / "bad.parquet"
    bad.write_text("x")
    result = runner.invoke(main, ["report", str(bad)])
    assert result.exit_code == 1 and "Parquet" in result.output


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium")
def test_report_renders_in_headless_chromium(onnx_model, synthetic_root, tmp_path):
    folder = _copy_synthetic(synthetic_root, tmp_path / "in", n=20)
    scan(onnx_model, folder, tmp_path / "out", progress=False)
    report = report_from_results(tmp_path / "out" / "results.parquet")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1200,1600",
            f"--screenshot={shot}",
            report.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    image = np.asarray(Image.open(shot).convert("L"))
    assert image.shape == (1600, 1200)
    assert image.std() > 10  # rendered content, not a blank page


def test_nifti_volume_scored_per_slice_and_per_volume(onnx_model, tmp_path):
    import nibabel

    rng = np.random.default_rng(0)
    volume = rng.random((40, 40, 5)).astype(np.float32) * 1000
    volume[10:20, 10:20, 3] = 5000  # a bright block in slice 3
    folder = tmp_path / "in"
    folder.mkdir()
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), str(folder / "ct.nii.gz"))
    _png(folder / "plain.png")
    scan(onnx_model, folder, tmp_path / "out", ScanConfig(heatmaps="all"), progress=False)
    table = pd.read_parquet(tmp_path / "out" / "results.parquet").set_index("relative_path")
    slices = [f"ct.nii.gz#slice={k:04d}" for k in range(5)]
    assert set(table.index) == {"ct.nii.gz", "plain.png", *slices}
    assert table.loc["ct.nii.gz", "score"] == table.loc[slices, "score"].max()
    assert table.loc["ct.nii.gz", "heatmap"].endswith(".heatmap.png")
    again = scan(onnx_model, folder, tmp_path / "out", progress=False)
    assert again.n_scored_now == 0


def _pages(path: Path, values: list[int], thumbnail: bool = False) -> list[np.ndarray]:
    """A multi-page TIFF of 40 x 40 noise pages, page k with a bright block of values[k];
    with ``thumbnail`` a reduced-resolution copy follows the first page (not an image)."""
    rng = np.random.default_rng(3)
    pages = []
    for value in values:
        page = rng.integers(90, 110, (40, 40), dtype=np.uint8)
        page[10:22, 10:22] = value
        pages.append(page)
    images = [Image.fromarray(p) for p in pages]
    kinds = [0] * len(images)
    if thumbnail:
        images.insert(1, Image.fromarray(pages[0][::4, ::4]))
        kinds.insert(1, 1)  # NewSubfileType: a reduced-resolution copy
    for image, kind in zip(images, kinds, strict=True):
        image.encoderinfo = {"tiffinfo": {254: kind}}
    images[0].save(path, save_all=True, append_images=images[1:], tiffinfo={254: 0})
    return pages


def test_a_multi_page_file_is_scored_page_by_page(onnx_model, tmp_path):
    """Every page of a TIFF gets a row, the file's row is its worst page, and a defect on
    a later page is not missed (before, the first page alone was scored)."""
    from anomalyvae.inference.runtime import OnnxDetector

    folder = tmp_path / "in"
    folder.mkdir()
    pages = _pages(folder / "stack.tif", [100, 100, 255, 100])
    for k, page in enumerate(pages):
        Image.fromarray(page).save(folder / f"page{k}.png")
    config = ScanConfig(heatmaps="all", save_maps=True, batch_size=3)
    result = scan(onnx_model, folder, tmp_path / "out", config, progress=False)
    table = pd.read_parquet(tmp_path / "out" / "results.parquet").set_index("relative_path")
    rows = [f"stack.tif#slice={k:04d}" for k in range(4)]
    assert set(table.index) == {"stack.tif", *rows, *(f"page{k}.png" for k in range(4))}
    assert result.n_files == 5 and result.n_errors == 0  # files, not pages
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["n_files"] == 5 and summary["n_anomalies"] == result.n_anomalies
    detector = OnnxDetector(onnx_model, device="cpu")
    alone = detector.predict_files([folder / f"page{k}.png" for k in range(4)]).score
    scores = table.loc[rows, "score"].to_numpy()
    # each page scores as the same picture saved as a file of its own
    assert np.allclose(scores, alone, rtol=0, atol=1e-4 * max(1.0, np.ptp(alone)))
    assert table.loc["stack.tif", "score"] == scores.max()
    assert table.loc[rows, "slice"].tolist() == [0, 1, 2, 3]
    worst = rows[int(np.argmax(scores))]
    assert table.loc["stack.tif", "heatmap"] == table.loc[worst, "heatmap"] != ""
    html = (tmp_path / "out" / "report.html").read_text()
    assert f"worst: slice {int(np.argmax(scores))} of 4" in html  # the tile says which
    saved = np.load(tmp_path / "out" / "maps" / "stack.tif#slice=0002.npz")["anomaly_map"]
    assert saved.shape == (40, 40)
    # a file of several images is refused where one score must stand for one file
    with pytest.raises(ImageReadError, match="holds 4 images"):
        detector.predict_files([folder / "stack.tif"])


def test_pages_of_different_sizes_keep_their_own_size_peak_and_map(onnx_model, tmp_path):
    """A row, its peak and its saved map are in its own page's pixels, not the first's."""
    rng = np.random.default_rng(5)
    small = rng.integers(90, 110, (40, 40), dtype=np.uint8)
    wide = rng.integers(90, 110, (30, 120), dtype=np.uint8)  # h 30, w 120
    wide[5:20, 95:115] = 255  # a bright block near its right edge
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(small).save(
        folder / "mixed.tif", save_all=True, append_images=[Image.fromarray(wide)]
    )
    Image.fromarray(wide).save(folder / "wide.png")
    scan(onnx_model, folder, tmp_path / "out", ScanConfig(save_maps=True), progress=False)
    table = pd.read_parquet(tmp_path / "out" / "results.parquet").set_index("relative_path")
    first, second = table.loc["mixed.tif#slice=0000"], table.loc["mixed.tif#slice=0001"]
    assert (first["width"], first["height"]) == (40, 40)
    assert (second["width"], second["height"]) == (120, 30)
    # the wide page reads as the same picture saved alone: the same peak, in its pixels
    alone = table.loc["wide.png"]
    assert (second["peak_x"], second["peak_y"]) == (alone["peak_x"], alone["peak_y"])
    assert second["peak_x"] > 40  # beyond the first page's width: not squeezed into it
    saved = np.load(tmp_path / "out" / "maps" / "mixed.tif#slice=0001.npz")["anomaly_map"]
    assert saved.shape == (30, 120)
    worst = first if first["score"] > second["score"] else second
    row = table.loc["mixed.tif"]  # the file's row: its worst page, with that page's size
    assert (row["width"], row["peak_x"]) == (worst["width"], worst["peak_x"])


def test_a_tiff_thumbnail_page_is_not_scored_and_a_bad_page_is_an_error_row(onnx_model, tmp_path):
    from anomalyvae.imaging.io import content_frames

    folder = tmp_path / "in"
    folder.mkdir()
    _pages(folder / "thumbed.tif", [100, 100], thumbnail=True)
    assert content_frames(folder / "thumbed.tif") == (0, 2)
    _pages(tmp_path / "whole.tif", [100, 100, 100])
    data = (tmp_path / "whole.tif").read_bytes()
    (folder / "cut.tif").write_bytes(data[: len(data) * 3 // 4])  # the last page cut short
    scan(onnx_model, folder, tmp_path / "out", ScanConfig(heatmaps="none"), progress=False)
    table = pd.read_parquet(tmp_path / "out" / "results.parquet").set_index("relative_path")
    assert table.loc["thumbed.tif#slice=0002", "error"] == ""
    assert "thumbed.tif#slice=0001" not in table.index
    # a page that cannot be read leaves the file without a verdict, not half scored
    assert table.loc["cut.tif", "error"] != "" and pd.isna(table.loc["cut.tif", "is_anomaly"])
    assert not table.index.str.startswith("cut.tif#").any()


def test_a_volume_is_scored_a_block_of_slices_at_a_time(onnx_model, tmp_path, monkeypatch):
    """The slices of a volume reach the model a batch at a time, with the scores the whole
    stack gets; the worst slice's heatmap and the volume's maps are still written."""
    import nibabel

    from anomalyvae.imaging.volumes import volume_slices
    from anomalyvae.inference.runtime import OnnxDetector

    rng = np.random.default_rng(1)
    volume = rng.random((40, 40, 23)).astype(np.float32) * 1000
    volume[10:20, 10:20, 17] = 5000
    folder = tmp_path / "in"
    folder.mkdir()
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), str(folder / "ct.nii.gz"))
    sizes: list[int] = []
    real = OnnxDetector.predict_arrays

    def recording(self, x, threshold=None):
        sizes.append(len(x))
        return real(self, x, threshold)

    monkeypatch.setattr(OnnxDetector, "predict_arrays", recording)
    config = ScanConfig(batch_size=4, heatmaps="all", save_maps=True)
    scan(onnx_model, folder, tmp_path / "out", config, progress=False)
    assert max(sizes) <= 4 and sum(sizes) == 23
    table = pd.read_parquet(tmp_path / "out" / "results.parquet").set_index("relative_path")
    slices = [f"ct.nii.gz#slice={k:04d}" for k in range(23)]
    detector = OnnxDetector(onnx_model, device="cpu")
    whole = real(detector, volume_slices(folder / "ct.nii.gz", detector.preprocessing))
    scores = table.loc[slices, "score"].to_numpy()
    assert np.allclose(scores, whole.score, rtol=0, atol=1e-4 * max(1.0, np.ptp(whole.score)))
    assert table.loc["ct.nii.gz", "score"] == scores.max()
    worst = int(np.argmax(scores))
    assert table.loc["ct.nii.gz", "heatmap"] == table.loc[slices[worst], "heatmap"] != ""
    saved = nibabel.load(str(tmp_path / "out" / "maps" / "ct.nii.gz.map.nii.gz"))
    assert saved.shape == (40, 40, 23)


def test_scanning_a_large_volume_holds_one_slice_not_the_volume(onnx_model, tmp_path):
    """A 600 MB volume (as float32) and a 2,000 x 5,000 image are scanned in a fraction
    of that: memory does not grow with the input (peak RSS of a fresh process, /proc)."""
    import nibabel

    folder = tmp_path / "in"
    folder.mkdir()
    wide = np.broadcast_to(np.arange(5000, dtype=np.uint16)[None] % 251, (2000, 5000))
    Image.fromarray(wide.astype(np.uint8)).save(folder / "wide.png")
    ramp = np.linspace(0, 1000, 1024, dtype=np.float32)
    volume = np.broadcast_to(ramp[:, None, None], (1024, 1024, 150)).astype(np.int16)
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), str(folder / "big.nii.gz"))
    code = (
        "import sys; from anomalyvae.inference.scan import scan, ScanConfig; "
        "scan(sys.argv[1], sys.argv[2], sys.argv[3], ScanConfig(heatmaps='none'), "
        "progress=False); "
        "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(onnx_model), str(folder), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    peak_mb = int(done.stdout.split()[-1]) / 1024
    # the volume alone is 600 MB as float32 (and was held twice); a scan holds one slice
    print(f"peak RSS {peak_mb:.0f} MB")
    assert peak_mb < 450, f"peak RSS {peak_mb:.0f} MB"
    table = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert len(table) == 152 and (table["error"] == "").all()


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited (only its parent has yet to reap it)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_process_workers_end_when_the_scan_is_killed(onnx_model, tmp_path):
    folder = tmp_path / "in"
    for i in range(400):
        _png(folder / f"{i:04d}.png", seed=i)
    out = tmp_path / "out"
    script = KILL_SCRIPT.replace("workers=1,", "workers=2, executor='process',")
    process = subprocess.Popen(
        [sys.executable, "-c", script, str(onnx_model), str(folder), str(out)]
    )
    deadline = time.time() + 120
    workers: list[int] = []
    while time.time() < deadline and (len(workers) < 2 or not (out / "parts").exists()):
        workers = _children(process.pid)
        time.sleep(0.05)
    assert len(workers) >= 2, "the scan never started its decoding workers"
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.time() + 15
    while time.time() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers), "decoding workers outlived the scan"


def test_saved_maps_come_back_at_each_files_own_size(onnx_model, tmp_path):
    """--save-maps writes each map at its file's resolution, whatever the model's size."""
    sizes = {"wide.png": (120, 40), "tall.png": (30, 90), "model_size.png": (32, 32)}
    for name, size in sizes.items():
        _png(tmp_path / "in" / name, size=size, seed=len(name))
    scan(onnx_model, tmp_path / "in", tmp_path / "out", ScanConfig(save_maps=True), progress=False)
    table = pd.read_parquet(tmp_path / "out" / "results.parquet").set_index("relative_path")
    for name, (width, height) in sizes.items():
        anomaly_map = np.load(tmp_path / "out" / "maps" / f"{name}.npz")["anomaly_map"]
        assert anomaly_map.shape == (height, width) and anomaly_map.dtype == np.float32
        # the peak the table reports is where the saved map peaks (within a model pixel)
        py, px = np.unravel_index(anomaly_map.argmax(), anomaly_map.shape)
        row = table.loc[name]
        assert abs(px + 0.5 - row["peak_x"]) <= width / 32 + 1
        assert abs(py + 0.5 - row["peak_y"]) <= height / 32 + 1


def test_the_report_says_how_the_image_score_weighs_the_views():
    from anomalyvae.inference.report import calibration_note

    calibration = {"image": {"method": "normal_quantile", "n_normal": 200, "target_fpr": 0.01}}
    fusion = {
        "rule": "image-share",
        "combine": "weighted sum",
        "weights": {"global": 0.1, "image": 0.8, "knn": 0.1},
        "image_unexplained": 0.3,
    }
    note = calibration_note({"calibration": calibration, "fusion": fusion})
    assert "z-scores weighted global 0.10, image 0.80, knn 0.10" in note
    assert "30% of the normals' pixel variance" in note
    maximum = {"rule": "max", "combine": "max", "weights": {"global": 0.5, "knn": 0.5}}
    assert "the largest of the z-scores of global, knn" in calibration_note(
        {"calibration": calibration, "fusion": maximum}
    )
    for broken in (None, "text", {"weights": {"knn": "lots"}}, {"weights": [1, 2]}):
        assert "Image score" not in calibration_note({"calibration": calibration, "fusion": broken})


@pytest.mark.parametrize(
    ("n_normal", "tail", "says"),
    [
        (200, "conformal", None),
        (61, "conformal", "no less than 1.6% (1/(n+1))"),
        (61, "robust", "no less than 3.2% (2/(n+1): no single outlying normal"),
    ],
)
def test_the_report_says_what_few_normals_can_promise(n_normal, tail, says):
    from anomalyvae.inference.report import calibration_note
    from anomalyvae.inference.summary import target_fpr_of

    image = {"method": "normal_quantile", "n_normal": n_normal, "target_fpr": 0.01, "tail": tail}
    note = calibration_note({"calibration": {"image": image}})
    if says is None:
        assert "can promise" not in note
    else:
        assert says in note
    # the drift alarm expects the rate the threshold promises, not the target
    expected = {200: 0.01, 61: 1 / 62 if tail == "conformal" else 2 / 62}[n_normal]
    assert target_fpr_of({"calibration": {"image": image}}) == pytest.approx(expected)


def test_files_shaped_unlike_the_training_images_are_named(onnx_model, tmp_path):
    # the model trained on 32 x 32 files: a 3:1 strip is stretched and an 8 x 8 thumbnail
    # blown up to its input, which alone moves their scores, so the summary says so
    folder = tmp_path / "in"
    for i in range(4):
        _png(folder / f"normal-{i}.png", seed=i)
    _png(folder / "strip.png", size=(96, 32))
    _png(folder / "thumb.png", size=(8, 8))
    scan(onnx_model, folder, tmp_path / "out", progress=False)
    warnings = json.loads((tmp_path / "out" / "summary.json").read_text())["drift"]["warnings"]
    assert any("1 image has a width:height" in w and "strip.png at 3.00" in w for w in warnings)
    assert any("1 image is less than half" in w and "thumb.png at 8 px" in w for w in warnings)
    assert "strip.png" in (tmp_path / "out" / "report.html").read_text()
    # files shaped like the training ones: nothing said
    config = ScanConfig(exclude=("strip*", "thumb*"))
    scan(onnx_model, folder, tmp_path / "plain", config, progress=False)
    plain = json.loads((tmp_path / "plain" / "summary.json").read_text())["drift"]["warnings"]
    assert not any("width:height" in w or "less than half" in w for w in plain)


@pytest.mark.parametrize(
    "source_shape",
    [
        None,
        "text",
        {"aspect": [1.0]},
        {"aspect": [2.0, 1.0], "short_side": [32, 32]},
        {"aspect": ["a", 1], "short_side": [32]},
        {"aspect": [1.0, 1.0], "short_side": []},
    ],
)
def test_shape_warnings_say_nothing_for_older_or_malformed_models(source_shape):
    from anomalyvae.inference.summary import shape_warnings

    ok = pd.DataFrame({"relative_path": ["a.png"], "width": [500], "height": [5]})
    metadata = {"training_data": {"source_shape": source_shape}}
    assert shape_warnings(ok, metadata) == []
    assert shape_warnings(ok, {}) == []


def test_a_dim_file_is_drawn_stretched_and_a_normal_one_as_stored():
    from anomalyvae.inference.heatmaps import display_grey, heatmap_overlay

    rng = np.random.default_rng(0)
    normal = rng.uniform(0, 1, (40, 40))
    assert np.array_equal(display_grey(normal), normal)
    dim = np.zeros((40, 40))
    dim[10:30, 10:30] = rng.integers(1, 3, (20, 20)) / 255.0  # three grey levels
    shown = display_grey(dim)
    assert shown.max() == 1.0 and shown.min() == 0.0
    flat = np.full((40, 40), 0.3)
    assert np.array_equal(display_grey(flat), flat)
    # the overlay (and so the report's gallery) shows the dim part, not a black square
    image = heatmap_overlay(dim[:, :, None].astype(np.float32), np.zeros((10, 10)), 1.0, 1.0)
    assert np.asarray(image)[10:30, 10:30].mean() > 100


def test_a_scan_resumed_over_parts_without_the_contrast_column_goes_on(
    onnx_model, synthetic_root, tmp_path
):
    """Parts written before the contrast column (an older anomalyvae) still merge."""
    folder = _copy_synthetic(synthetic_root, tmp_path / "in", n=30)
    scan(onnx_model, folder, tmp_path / "out", progress=False)
    for part in (tmp_path / "out" / "parts").glob("part-*.parquet"):
        pd.read_parquet(part).drop(columns=["contrast"]).to_parquet(part, index=False)
    extra = sorted((synthetic_root / "train" / "good").glob("*.png"))[:25]
    for path in extra:
        shutil.copy(path, folder / "good" / f"new_{path.name}")
    result = scan(onnx_model, folder, tmp_path / "out", progress=False)
    assert result.n_skipped_done == 30 and result.n_scored_now == 25
    table = pd.read_parquet(tmp_path / "out" / "results.parquet")
    fresh = table["relative_path"].str.contains("new_")
    assert table.loc[~fresh, "contrast"].isna().all() and table.loc[fresh, "contrast"].notna().all()
    assert "contrast" in result.summary["drift"]  # the 25 new rows are enough to check
