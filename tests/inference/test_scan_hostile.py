"""Hostile input for the scan: names, special files, mixed inputs, bad thresholds."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from anomalyvae.cli import main
from anomalyvae.inference.heatmaps import heatmap_name
from anomalyvae.inference.records import ScanOutputError
from anomalyvae.inference.scan import ScanConfig, scan


def _defects_and_goods(root: Path, dest: Path, n: int = 6) -> tuple[list[Path], list[Path]]:
    defects = sorted((root / "test").glob("*/*.png"))
    defects = [p for p in defects if p.parent.name != "good"][:n]
    goods = sorted((root / "test" / "good").glob("*.png"))[:n]
    dest.mkdir(parents=True, exist_ok=True)
    return defects, goods


@pytest.fixture()
def alarm():
    """Fail instead of hanging forever (a FIFO opened for reading blocks)."""
    signal.signal(signal.SIGALRM, lambda *a: pytest.fail("the scan hung"))
    signal.alarm(120)
    yield
    signal.alarm(0)


def test_a_name_with_slice_marker_keeps_its_row_and_verdict(onnx_model, synthetic_root, tmp_path):
    defects, _ = _defects_and_goods(synthetic_root, tmp_path / "in")
    for i, path in enumerate(defects):
        shutil.copy(path, tmp_path / "in" / f"part{i}#slice=0001.png")
    result = scan(onnx_model, tmp_path / "in", tmp_path / "out", progress=False)
    table = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert len(table) == len(defects) == result.n_files
    assert table["relative_path"].str.contains("#slice=").all()
    assert result.n_anomalies > 0
    runner = CliRunner()
    args = ["scan", str(onnx_model), str(tmp_path / "in"), "-o", str(tmp_path / "out2")]
    assert runner.invoke(main, [*args, "--fail-on-anomaly", "--silent"]).exit_code == 3


def test_another_folder_with_the_same_names_is_refused_then_extended(
    onnx_model, synthetic_root, tmp_path
):
    defects, goods = _defects_and_goods(synthetic_root, tmp_path / "x")
    (tmp_path / "y").mkdir()
    for i, (good, bad) in enumerate(zip(goods, defects, strict=False)):
        shutil.copy(good, tmp_path / "x" / f"{i}.png")
        shutil.copy(bad, tmp_path / "y" / f"{i}.png")
        os.utime(tmp_path / "y" / f"{i}.png", ns=(10**18, 10**18))
        os.utime(tmp_path / "x" / f"{i}.png", ns=(10**18, 10**18))
    scan(onnx_model, tmp_path / "x", tmp_path / "out", progress=False)
    with pytest.raises(ScanOutputError, match="--extend"):
        scan(onnx_model, tmp_path / "y", tmp_path / "out", progress=False)
    extended = scan(
        onnx_model, tmp_path / "y", tmp_path / "out", ScanConfig(extend=True), progress=False
    )
    assert extended.n_skipped_done == 0  # same names, sizes and mtimes: content differs
    fresh = scan(onnx_model, tmp_path / "y", tmp_path / "fresh", progress=False)
    assert extended.n_anomalies == fresh.n_anomalies


def test_the_input_folder_as_output_is_refused_with_the_fix(onnx_model, synthetic_root, tmp_path):
    _, goods = _defects_and_goods(synthetic_root, tmp_path / "in", n=2)
    for good in goods:
        shutil.copy(good, tmp_path / "in" / good.name)
    before = sorted(os.listdir(tmp_path / "in"))
    with pytest.raises(ScanOutputError, match="output folder is the input folder.*-o"):
        scan(onnx_model, tmp_path / "in", tmp_path / "in", progress=False)
    assert sorted(os.listdir(tmp_path / "in")) == before  # nothing written there


def test_a_folder_of_other_files_is_not_overwritten(onnx_model, synthetic_root, tmp_path):
    _, goods = _defects_and_goods(synthetic_root, tmp_path / "data" / "line3", n=2)
    for good in goods:
        shutil.copy(good, tmp_path / "data" / "line3" / good.name)
    (tmp_path / "data" / "results.csv").write_text("the user's own table\n")
    with pytest.raises(ScanOutputError, match="not a scan.*'line3', 'results.csv'.*new or empty"):
        scan(onnx_model, tmp_path / "data" / "line3", tmp_path / "data", progress=False)
    assert (tmp_path / "data" / "results.csv").read_text() == "the user's own table\n"
    assert sorted(os.listdir(tmp_path / "data")) == ["line3", "results.csv"]
    # hidden entries (a desktop's index file) do not count; a scan's own folder resumes
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".DS_Store").write_bytes(b"")
    first = scan(onnx_model, tmp_path / "data" / "line3", tmp_path / "out", progress=False)
    again = scan(onnx_model, tmp_path / "data" / "line3", tmp_path / "out", progress=False)
    assert again.n_skipped_done == first.n_files == 2


def test_files_of_other_types_are_named_not_passed_over_silently(
    onnx_model, synthetic_root, tmp_path
):
    _, goods = _defects_and_goods(synthetic_root, tmp_path / "in", n=1)
    shutil.copy(goods[0], tmp_path / "in" / "a.png")
    (tmp_path / "in" / "sub").mkdir()
    for name in ("b.heic", "c.HEIC", "d.jp2", "labels.csv", ".DS_Store"):
        (tmp_path / "in" / "sub" / name).write_bytes(b"not read")
    result = scan(onnx_model, tmp_path / "in", tmp_path / "out", progress=False)
    assert result.summary["other_files"] == {".heic": 2, ".csv": 1, ".jp2": 1}
    note = result.describe()[1][-1]
    assert note.startswith("Not scanned: 4 files of other types (2 .heic, 1 .csv, 1 .jp2)")
    assert note in (tmp_path / "out" / "report.html").read_text().replace("&#39;", "'")
    excluded = scan(
        onnx_model,
        tmp_path / "in",
        tmp_path / "out2",
        ScanConfig(exclude=("*.csv", "*.heic", "*.HEIC", "*.jp2")),
        progress=False,
    )
    assert excluded.summary["other_files"] == {}
    assert not any(line.startswith("Not scanned") for line in excluded.describe()[1])
    (tmp_path / "in" / "a.png").unlink()
    with pytest.raises(ScanOutputError, match=r"holds 4 files of other types \(2 .heic"):
        scan(onnx_model, tmp_path / "in", tmp_path / "out3", progress=False)


def test_a_file_replaced_in_place_is_scored_again(onnx_model, synthetic_root, tmp_path):
    defects, goods = _defects_and_goods(synthetic_root, tmp_path / "in", n=1)
    target = tmp_path / "in" / "a.bmp"  # uncompressed: both versions have the same size
    Image.open(goods[0]).save(target)
    os.utime(target, ns=(10**18, 10**18))
    first = scan(onnx_model, tmp_path / "in", tmp_path / "out", progress=False)
    size = target.stat().st_size
    Image.open(defects[0]).save(target)
    os.utime(target, ns=(10**18, 10**18))
    assert target.stat().st_size == size
    again = scan(onnx_model, tmp_path / "in", tmp_path / "out", progress=False)
    assert first.n_scored_now == again.n_scored_now == 1


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifos_become_error_rows_without_hanging(onnx_model, synthetic_root, tmp_path, alarm):
    _, goods = _defects_and_goods(synthetic_root, tmp_path / "in", n=2)
    shutil.copy(goods[0], tmp_path / "in" / "ok.png")
    os.mkfifo(tmp_path / "in" / "x.png")
    os.mkfifo(tmp_path / "in" / "noextension")
    result = scan(onnx_model, tmp_path / "in", tmp_path / "out", progress=False)
    table = pd.read_parquet(tmp_path / "out" / "results.parquet").set_index("relative_path")
    assert result.n_errors == 1 and "FIFO" in table.loc["x.png", "error"]
    assert "noextension" not in table.index  # not an image by name, never opened


def test_very_long_names_are_scanned_with_a_shortened_heatmap(onnx_model, synthetic_root, tmp_path):
    defects, _ = _defects_and_goods(synthetic_root, tmp_path / "in", n=1)
    name = "d" * 236 + ".png"
    shutil.copy(defects[0], tmp_path / "in" / name)
    result = scan(
        onnx_model, tmp_path / "in", tmp_path / "out", ScanConfig(heatmaps="all"), progress=False
    )
    table = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert result.n_errors == 0 and table.loc[0, "relative_path"] == name
    assert (tmp_path / "out" / table.loc[0, "heatmap"]).is_file()
    assert len(heatmap_name(name).encode()) < 255
    assert not list((tmp_path / "out").rglob(".*tmp*"))


def test_an_output_inside_the_folder_is_not_scanned_again(onnx_model, synthetic_root, tmp_path):
    _, goods = _defects_and_goods(synthetic_root, tmp_path / "in", n=4)
    for path in goods:
        shutil.copy(path, tmp_path / "in" / path.name)
    config = ScanConfig(heatmaps="all")
    counts = [
        scan(onnx_model, tmp_path / "in", tmp_path / "in" / "out", config, progress=False).n_files
        for _ in range(3)
    ]
    assert counts == [len(goods)] * 3


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_meaningless_thresholds_are_refused(onnx_model, tmp_path, value):
    runner = CliRunner()
    result = runner.invoke(
        main,
        ["scan", str(onnx_model), str(tmp_path), "-o", str(tmp_path / "o"), "--threshold", value],
    )
    assert result.exit_code == 2 and "positive finite" in result.output
    with pytest.raises(ValueError, match="positive finite"):
        ScanConfig(threshold=float(value))


def test_csv_cells_never_run_as_formulas(onnx_model, synthetic_root, tmp_path):
    _, goods = _defects_and_goods(synthetic_root, tmp_path / "in", n=1)
    shutil.copy(goods[0], tmp_path / "in" / "=HYPERLINK(x).png")
    scan(onnx_model, tmp_path / "in", tmp_path / "out", progress=False)
    csv = pd.read_csv(tmp_path / "out" / "results.csv")
    assert csv.loc[0, "relative_path"] == "'=HYPERLINK(x).png"
    parquet = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert parquet.loc[0, "relative_path"] == "=HYPERLINK(x).png"


def test_an_empty_folder_is_an_error_and_writes_nothing(onnx_model, tmp_path):
    (tmp_path / "empty").mkdir()
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(main, ["scan", str(onnx_model), str(tmp_path / "empty"), "-o", str(out)])
    assert result.exit_code == 1 and "no image files" in result.output
    assert not out.exists()
    missing = runner.invoke(main, ["scan", str(onnx_model), str(tmp_path / "nope"), "-o", str(out)])
    assert missing.exit_code == 2  # as docs/cli.md says: a missing path is a usage error


def test_a_second_scan_into_a_locked_output_is_refused(onnx_model, synthetic_root, tmp_path):
    from anomalyvae.inference.records import LOCK, ScanLockedError, output_lock

    _, goods = _defects_and_goods(synthetic_root, tmp_path / "in", n=2)
    for path in goods:
        shutil.copy(path, tmp_path / "in" / path.name)
    out = tmp_path / "out"
    out.mkdir()
    with output_lock(out):  # as if another scan were running
        assert (out / LOCK).read_text() == str(os.getpid())
        with pytest.raises(ScanLockedError, match=f"process {os.getpid()}"):
            scan(onnx_model, tmp_path / "in", out, progress=False)
    (out / LOCK).write_text("999999999")  # the file a killed scan left: no lock is held
    assert scan(onnx_model, tmp_path / "in", out, progress=False).n_files == len(goods)
    assert not (out / LOCK).exists()  # the scan let go of it


def test_predict_refuses_a_fifo_instead_of_hanging(onnx_model, synthetic_root, tmp_path, alarm):
    from anomalyvae.inference.runtime import OnnxDetector

    good = sorted((synthetic_root / "test" / "good").glob("*.png"))[0]
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    rows = OnnxDetector(onnx_model, device="cpu").predict_rows([fifo, good])
    assert "a FIFO" in rows[0]["error"] and rows[1]["error"] == ""
    result = CliRunner().invoke(main, ["predict", str(onnx_model), str(fifo)])
    assert "a FIFO" in result.output


def test_a_broken_link_is_called_a_broken_link(onnx_model, synthetic_root, tmp_path):
    from anomalyvae.imaging.io import ImageReadError, read_image

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(sorted((synthetic_root / "test" / "good").glob("*.png"))[0], folder / "ok.png")
    (folder / "dangling.png").symlink_to(tmp_path / "gone.png")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    with pytest.raises(ImageReadError, match="broken link"):
        read_image(folder / "dangling.png")
    scan(onnx_model, folder, tmp_path / "out", progress=False)
    table = pd.read_parquet(tmp_path / "out" / "results.parquet").set_index("relative_path")
    assert "broken link" in table.loc["dangling.png", "error"]
    assert "unexpected" not in table.loc["loop.png", "error"]
    assert table.loc["ok.png", "error"] == ""


def test_a_malformed_heatmap_mode_is_a_usage_error(onnx_model, synthetic_root, tmp_path):
    args = ["scan", str(onnx_model), str(synthetic_root / "test"), "-o", str(tmp_path / "o")]
    result = CliRunner().invoke(main, [*args, "--heatmaps", "top-0"])
    assert result.exit_code == 2 and "top-N" in result.output


def test_a_name_too_long_for_its_map_file_still_gets_scored(onnx_model, synthetic_root, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    long_name = "x" * 237 + ".png"  # 241 bytes: a map file name with ".npz" would not fit
    shutil.copy(sorted((synthetic_root / "test" / "good").glob("*.png"))[0], folder / long_name)
    result = scan(
        onnx_model, folder, tmp_path / "out", ScanConfig(save_maps=True, heatmaps="all"), False
    )
    assert result.n_errors == 0 and result.n_scored_now == 1
    maps = list((tmp_path / "out" / "maps").glob("*.npz"))
    assert len(maps) == 1 and len(maps[0].name.encode()) < 255


def test_the_report_survives_a_heatmap_over_the_pixel_limit(
    onnx_model, synthetic_root, tmp_path, monkeypatch
):
    import PIL.Image

    import anomalyvae.imaging.io as io

    scan(onnx_model, synthetic_root / "test", tmp_path / "out", ScanConfig(heatmaps="all"), False)
    heatmap = sorted((tmp_path / "out" / "heatmaps").rglob("*.png"))[0]
    Image.new("RGB", (200, 200)).save(heatmap)
    # a limit of 10,000 px makes the 40,000 px heatmap a decompression bomb to Pillow
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 10_000)
    monkeypatch.setattr(io, "MAX_PIXELS", 10_000)
    result = CliRunner().invoke(main, ["report", str(tmp_path / "out" / "results.parquet")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "report.html").stat().st_size > 0


def _contend(start, out: str, log: str, attempts: int = 150) -> None:
    """Take and release one output's lock as fast as possible, logging each hold."""
    import time

    from anomalyvae.inference.records import ScanLockedError, output_lock

    spans = []
    start.wait()
    for _ in range(attempts):
        try:
            with output_lock(Path(out)):
                begin = time.monotonic()  # CLOCK_MONOTONIC: one clock for all processes
                time.sleep(0.002)
                spans.append(f"{begin} {time.monotonic()}\n")
        except ScanLockedError:
            time.sleep(0.0005)
    with open(log, "a") as handle:
        handle.writelines(spans)


def test_scans_started_at_the_same_moment_never_share_an_output(tmp_path):
    """Real processes race for one output's lock (an empty lock file once read as PID 0,
    stale, and deleted under its owner: 7 double holds in 100 trials)."""
    import multiprocessing

    out, log = tmp_path / "out", tmp_path / "held.log"
    out.mkdir()
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    workers = [context.Process(target=_contend, args=(start, str(out), str(log))) for _ in range(3)]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(120)
    spans = sorted(tuple(map(float, line.split())) for line in log.read_text().splitlines())
    assert len(spans) > 50  # the lock changed hands many times
    for (_, end), (begin, _) in zip(spans, spans[1:], strict=False):
        assert begin >= end, "two processes held one output's lock at once"


def test_an_earlier_scans_output_inside_the_input_is_not_scanned(
    onnx_model, synthetic_root, tmp_path
):
    import json

    folder = tmp_path / "in"
    folder.mkdir()
    goods = sorted((synthetic_root / "test" / "good").glob("*.png"))[:3]
    for path in goods:
        shutil.copy(path, folder / path.name)
    scan(onnx_model, folder, folder / "out", ScanConfig(heatmaps="all"), progress=False)
    second = scan(onnx_model, folder, folder / "deep" / "out2", ScanConfig(), progress=False)
    assert second.n_files == len(goods)  # not the first scan's heatmaps too
    summary = json.loads((folder / "deep" / "out2" / "summary.json").read_text())
    assert summary["skipped_scan_outputs"] == ["out"]


def test_parts_are_written_by_time_too(onnx_model, synthetic_root, tmp_path):
    from anomalyvae.inference.decoding import decode_file
    from anomalyvae.inference.records import read_parts

    on_disk = []

    def slow(model, scorer, todo, writer, bar):
        batch = [(decode_file(j.index, j.path, scorer.detector.preprocessing), j) for j in todo[:3]]
        writer.add(scorer.rows(batch))
        on_disk.append(len(read_parts(tmp_path / "out" / "parts")))  # before the scan ends
        return {"engine": "test"}

    config = ScanConfig(chunk_rows=10_000, flush_s=0.0)
    scan(onnx_model, synthetic_root / "test", tmp_path / "out", config, False, engine=slow)
    assert on_disk == [3]  # 3 rows < chunk_rows, written because they were due


def test_ctrl_c_keeps_the_rows_already_scored(onnx_model, synthetic_root, tmp_path):
    from anomalyvae.inference.decoding import decode_file
    from anomalyvae.inference.records import read_parts

    def interrupted(model, scorer, todo, writer, bar):
        batch = [(decode_file(j.index, j.path, scorer.detector.preprocessing), j) for j in todo[:3]]
        writer.add(scorer.rows(batch))  # 3 rows scored, below chunk_rows ...
        raise KeyboardInterrupt  # ... then Ctrl-C

    with pytest.raises(KeyboardInterrupt):
        scan(
            onnx_model,
            synthetic_root / "test",
            tmp_path / "out",
            progress=False,
            engine=interrupted,
        )
    assert len(read_parts(tmp_path / "out" / "parts")) == 3


def test_a_heatmap_of_a_huge_image_is_drawn_at_a_bounded_size():
    import numpy as np

    from anomalyvae.inference.heatmaps import MAX_HEATMAP_SIDE, heatmap_overlay

    pixels = np.zeros((3 * MAX_HEATMAP_SIDE, 5, 1), np.float32)  # a tall, thin slice
    image = heatmap_overlay(pixels, np.ones((8, 8), np.float32), 0.5, 1.0)
    assert max(image.size) <= MAX_HEATMAP_SIDE


def test_predict_reads_files_a_block_at_a_time(onnx_model, synthetic_root, tmp_path, monkeypatch):
    """predict keeps a block of images in memory, not the whole list; rows stay in order."""
    import anomalyvae.inference.runtime as runtime
    from anomalyvae.imaging.preprocessing import load_image
    from anomalyvae.inference.decoding import expand_inputs

    monkeypatch.setattr(runtime, "PREDICT_BLOCK", 3)
    detector = runtime.OnnxDetector(onnx_model, device="cpu")
    batches = []
    real = detector.predict_arrays
    monkeypatch.setattr(
        detector, "predict_arrays", lambda x, t=None: batches.append(len(x)) or real(x, t)
    )
    goods = sorted((synthetic_root / "test" / "good").glob("*.png"))[:5]
    folder = tmp_path / "in"
    folder.mkdir()
    for path in goods[2:]:
        shutil.copy(path, folder / path.name)
    (folder / "broken.png").write_bytes(b"nope")
    paths = expand_inputs([goods[0], goods[1], folder])  # files and a folder
    assert len(paths) == 6
    rows = detector.predict_rows(paths)
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    assert max(batches) <= 3 and sum(batches) == 5
    assert sum(bool(r["error"]) for r in rows) == 1
    import numpy as np

    whole = runtime.OnnxDetector(onnx_model, device="cpu").predict_arrays(
        np.stack([load_image(p, detector.preprocessing) for p in paths if p.name != "broken.png"])
    )
    scored = [r["score"] for r in rows if not r["error"]]
    assert np.allclose(scored, whole.score, rtol=0, atol=1e-4 * max(1.0, np.ptp(whole.score)))
    assert runtime.format_prediction(rows[0]).startswith(f"{paths[0]}\t")


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux /proc")
def test_links_to_devices_and_unreadable_files_become_error_rows(
    onnx_model, synthetic_root, tmp_path, alarm
):
    """/dev/zero would never end, /proc/self/mem looks like a regular file whose bytes
    cannot be read: each gets a row that says what to do, and the scan goes on."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(sorted((synthetic_root / "test" / "good").glob("*.png"))[0], folder / "ok.png")
    (folder / "zero.png").symlink_to("/dev/zero")
    (folder / "mem.tif").symlink_to("/proc/self/mem")
    scan(onnx_model, folder, tmp_path / "out", progress=False)
    table = pd.read_parquet(tmp_path / "out" / "results.parquet").set_index("relative_path")
    assert "not a regular file" in table.loc["zero.png", "error"]
    assert "cannot be read" in table.loc["mem.tif", "error"]
    assert "rescan" in table.loc["mem.tif", "error"]
    assert table.loc[["zero.png", "mem.tif"], "is_anomaly"].isna().all()
    assert table.loc["ok.png", "error"] == ""
