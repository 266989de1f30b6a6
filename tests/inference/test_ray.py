"""The Ray engine on a local Ray instance (num_cpus=2): same rows as the local engine."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("ray.data", reason="the Ray engine needs the 'ray' extra")

from anomalyvae.cli import main  # noqa: E402
from anomalyvae.inference.ray_engine import (  # noqa: E402
    RayEngineError,
    _Scorer,
    check_ray,
    connect,
    scan_on_ray,
)
from anomalyvae.inference.records import COLUMNS  # noqa: E402
from anomalyvae.inference.scan import ScanConfig, scan  # noqa: E402


@pytest.fixture(scope="module")
def ray_local():
    ray = connect(None, num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(synthetic_root, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("ray-in")
    for f in sorted((synthetic_root / "test").rglob("*.png"))[:60]:
        target = dest / f.relative_to(synthetic_root / "test")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, target)
    (dest / "broken.png").write_bytes(b"not a png")
    nibabel = pytest.importorskip("nibabel")
    volume = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), str(dest / "vol.nii.gz"))
    # pages 0 and 2 are images, page 1 a reduced-resolution copy: rows 0000 and 0002
    pages = [Image.open(f) for f in sorted((synthetic_root / "test").rglob("*.png"))[:2]]
    pages.insert(1, pages[0].resize((8, 8)))
    for page, kind in zip(pages, (0, 1, 0), strict=True):
        page.encoderinfo = {"tiffinfo": {254: kind}}
    pages[0].save(dest / "pages.tif", save_all=True, append_images=pages[1:], tiffinfo={254: 0})
    whole = (dest / "pages.tif").read_bytes()
    (dest / "cut.tif").write_bytes(whole[: len(whole) * 3 // 4])  # its last page cut short
    # pages of two sizes: each row carries its own page's size and peak
    first = Image.open(sorted((synthetic_root / "test").rglob("*.png"))[3])
    first.save(dest / "mixed.tif", save_all=True, append_images=[first.crop((0, 0, 48, 24))])
    return dest


@pytest.fixture(scope="module")
def local_table(onnx_model, folder, tmp_path_factory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("local-out")
    scan(onnx_model, folder, out, ScanConfig(batch_size=8, heatmaps="all"), progress=False)
    return pd.read_parquet(out / "results.parquet")


def _same_rows(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns) == list(COLUMNS)
    assert a["relative_path"].tolist() == b["relative_path"].tolist()
    for column in ("error", "is_anomaly", "heatmap", "width", "height", "file_size"):
        assert a[column].tolist() == b[column].tolist(), column
    ok = a["error"] == ""
    np.testing.assert_allclose(a.loc[ok, "score"], b.loc[ok, "score"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.loc[ok, "peak_x"], b.loc[ok, "peak_x"], atol=1e-6)


def test_ray_engine_matches_local_engine(ray_local, onnx_model, folder, local_table, tmp_path):
    config = ScanConfig(batch_size=8, heatmaps="all", engine="ray", ray_workers=2)
    result = scan(onnx_model, folder, tmp_path / "out", config, progress=False, engine=scan_on_ray)
    table = pd.read_parquet(tmp_path / "out" / "results.parquet")
    _same_rows(table, local_table)
    assert {"pages.tif#slice=0000", "pages.tif#slice=0002"} <= set(table["relative_path"])
    assert "pages.tif#slice=0001" not in set(table["relative_path"])
    sizes = table.set_index("relative_path").loc[["mixed.tif#slice=0001"], ["width", "height"]]
    assert sizes.to_numpy().tolist() == [[48, 24]]
    errors = table.loc[table["error"] != "", "relative_path"].tolist()
    assert result.n_errors == 2 and errors == ["broken.png", "cut.tif"]  # no half-read file
    for heatmap in table.loc[table["heatmap"] != "", "heatmap"]:
        assert Image.open(tmp_path / "out" / heatmap).size[0] > 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    engine = summary["engine"]
    assert engine["engine"] == "ray" and engine["inference_actors"] == 2
    assert engine["retried"] == {
        "actor_restarts": 0,
        "files_decoded_again": 0,
        "files_scored_again": 0,
    }
    assert (tmp_path / "out" / "report.html").is_file()
    # resume: only the unreadable files are tried again, and the table is unchanged
    again = scan(onnx_model, folder, tmp_path / "out", config, progress=False, engine=scan_on_ray)
    assert again.n_scored_now == 2
    _same_rows(pd.read_parquet(tmp_path / "out" / "results.parquet"), local_table)


class _DiesOnce(_Scorer):
    """An inference actor whose process dies on its second batch, once per test."""

    marker = ""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def __call__(self, block):
        self.calls += 1
        if self.calls == 2 and not os.path.exists(self.marker):
            Path(self.marker).write_text("killed")
            os._exit(1)  # the worker process dies mid-run, like an OOM kill
        return super().__call__(block)


def test_killed_inference_worker_loses_no_rows(
    ray_local, onnx_model, folder, local_table, tmp_path, monkeypatch
):
    import ray.cloudpickle

    import anomalyvae.inference.ray_engine as engine_module

    # Ray workers cannot import this test module: send its classes by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    marker = tmp_path / "killed.txt"
    dies = type("DiesOnce", (_DiesOnce,), {"marker": str(marker)})
    original = engine_module.scan_on_ray

    def with_faulty_actor(*args, **kwargs):
        return original(*args, **kwargs, scorer_class=dies)

    config = ScanConfig(batch_size=8, heatmaps="all", engine="ray", ray_workers=1)
    scan(onnx_model, folder, tmp_path / "out", config, progress=False, engine=with_faulty_actor)
    assert marker.read_text() == "killed"  # the actor really died
    table = pd.read_parquet(tmp_path / "out" / "results.parquet")
    _same_rows(table, local_table)  # exactly one row per file, none lost
    retried = json.loads((tmp_path / "out" / "summary.json").read_text())["engine"]["retried"]
    assert retried["actor_restarts"] >= 1


def test_unreachable_address_is_a_clear_error():
    with pytest.raises(RayEngineError, match="cannot reach a Ray cluster at 127.0.0.1:9"):
        check_ray("127.0.0.1:9")
    with pytest.raises(RayEngineError, match="HOST:PORT"):
        check_ray("not-an-address")


def test_cli_engine_ray_unreachable_address_fails_before_work(onnx_model, folder, tmp_path):
    result = CliRunner().invoke(
        main,
        ["scan", str(onnx_model), str(folder), "-o", str(tmp_path / "out")]
        + ["--engine", "ray", "--address", "127.0.0.1:9", "--silent"],
    )
    assert result.exit_code != 0
    assert "cannot reach a Ray cluster" in result.output
    assert not (tmp_path / "out" / "parts").exists()
