from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from anomalyvae.cli import main
from anomalyvae.data import mvtec_samples
from anomalyvae.detector import VAEAnomalyDetector
from anomalyvae.export import ExportError, export_onnx
from anomalyvae.inference.runtime import OnnxDetector, OnnxInputError, OnnxModelError, read_metadata
from anomalyvae.precisions import export_all, variant_path


@pytest.fixture(scope="module")
def exported(trained, synthetic_root, tmp_path_factory):
    _, checkpoint = trained
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    results = export_all(checkpoint, out, synthetic_root, fp16=True, int8=True, max_images=32)
    return out, results


@pytest.fixture(scope="module")
def test_paths(synthetic_root):
    return [s.path for s in mvtec_samples(synthetic_root, "test")]


def test_export_is_valid_and_self_describing(exported):
    path, results = exported
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["image", "threshold"]
    assert [o.name for o in model.graph.output] == [
        "anomaly_map",
        "score",
        "normalized_score",
        "is_anomaly",
    ]
    assert model.opset_import[0].version == 17
    meta = read_metadata(path)
    for key in (
        "threshold",
        "pixel_threshold",
        "calibration",
        "map_kind",
        "anomaly_map",
        "score_kind",
        "preprocessing",
        "model_config",
        "training_data",
        "product_version",
        "content_hash",
        "outputs",
        "precision",
    ):
        assert key in meta, key
    assert meta["calibration"]["image"]["method"] == "normal_quantile"
    assert meta["preprocessing"]["height"] == 32
    # what the map output is, in words (the pixel model's: its map kind, "z-" when standardized)
    standardized = "z-" if meta["scoring"]["standardize"] else ""
    assert meta["anomaly_map"] == standardized + meta["map_kind"]
    assert meta["training_data"]["n_train"] == 85
    # the training files' shapes, which the scan compares every file with
    assert meta["training_data"]["source_shape"] == {
        "aspect": [1.0, 1.0],
        "short_side": [32, 32],
        "n_probed": 64,
    }
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar == meta
    assert results[0].parity.max_rel_score_diff < 1e-4 and results[0].parity.verdicts_agree


def test_onnx_reproduces_torch_scores_and_verdicts(trained, exported, test_paths, scores_close):
    detector, _ = trained
    path, _ = exported
    runtime = OnnxDetector(path, device="cpu")
    result = runtime.predict_files(test_paths)
    scores = detector.anomaly_score(test_paths)
    scores_close(result.score, scores, rel=1e-4, threshold=detector.threshold_)
    np.testing.assert_array_equal(result.is_anomaly, scores > detector.threshold_)
    scores_close(result.normalized_score, scores / detector.threshold_, rel=1e-4, threshold=1.0)
    reference = detector.anomaly_map(test_paths)
    # standardized maps are in standard deviations (values of several units), so float
    # rounding is judged relative to the map's range
    np.testing.assert_allclose(
        result.anomaly_map[:, 0], reference, rtol=1e-3, atol=1e-4 * np.abs(reference).max()
    )
    assert runtime.threshold == pytest.approx(detector.threshold_)


def test_threshold_is_an_overridable_input(exported, test_paths):
    runtime = OnnxDetector(exported[0], device="cpu")
    default = runtime.predict_files(test_paths)
    # a threshold must stay positive (it divides the normalized score): the lowest one
    low = runtime.predict_files(test_paths, threshold=1e-6)
    np.testing.assert_array_equal(low.is_anomaly, default.score > 1e-6)
    assert low.is_anomaly.sum() > default.is_anomaly.sum()
    np.testing.assert_allclose(low.score, default.score)


def test_precision_variants(exported, trained, test_paths, scores_close):
    detector, _ = trained
    path, results = exported
    assert [r.path.name for r in results] == ["model.onnx", "model.fp16.onnx", "model.int8.onnx"]
    fp16 = OnnxDetector(variant_path(path, "fp16"), device="cpu")
    assert fp16.metadata["precision"] == "fp16"
    # fp16 errors are relative to the score's scale, not to each score (fused z-scores
    # near zero differ by more than 2 % of themselves on some CPUs)
    scores_close(
        fp16.predict_files(test_paths).score,
        detector.anomaly_score(test_paths),
        rel=2e-2,
        threshold=detector.threshold_,
    )
    int8 = OnnxDetector(variant_path(path, "int8"), device="cpu")
    assert int8.metadata["precision"] == "int8"
    assert int8.metadata["threshold_adjustment"]["ratio"] > 0
    model = onnx.load(str(variant_path(path, "int8")))
    assert any(n.op_type == "DequantizeLinear" for n in model.graph.node)


def test_altered_foreign_and_broken_files(exported, tmp_path):
    path, _ = exported
    model = onnx.load(str(path))
    for prop in model.metadata_props:
        if prop.key == "anomalyvae.threshold":
            prop.value = "999"
    altered = tmp_path / "altered.onnx"
    onnx.save(model, str(altered))
    with pytest.raises(OnnxModelError, match="altered"):
        OnnxDetector(altered)
    assert OnnxDetector(altered, verify=False).threshold == 999

    del model.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save(model, str(foreign))
    with pytest.raises(OnnxModelError, match="without anomalyvae metadata"):
        OnnxDetector(foreign)
    junk = tmp_path / "junk.onnx"
    junk.write_text("not onnx")
    with pytest.raises(OnnxModelError, match="not an ONNX model"):
        OnnxDetector(junk)
    with pytest.raises(OnnxModelError, match="does not exist"):
        OnnxDetector(tmp_path / "missing.onnx")


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (np.zeros((2, 3, 32, 32), np.float32), "shape"),
        (np.zeros((2, 1, 16, 16), np.float32), "shape"),
        (np.zeros((2, 1, 32, 32), np.float64), "float32"),
        (np.full((1, 1, 32, 32), np.nan, np.float32), "NaN"),
        (np.full((1, 1, 32, 32), 255.0, np.float32), r"\[0, 1\]"),
        ([[0.0]], "numpy array"),
    ],
)
def test_bad_inputs(exported, batch, message):
    with pytest.raises(OnnxInputError, match=message):
        OnnxDetector(exported[0], device="cpu").predict_arrays(batch)


def test_gradient_maps_do_not_export(trained, tmp_path):
    detector, checkpoint = trained
    grad = VAEAnomalyDetector.load(checkpoint)
    grad.scoring_ = grad.scoring_.__class__(map_kind="elbo_grad")
    with pytest.raises(ExportError, match="input gradient"):
        export_onnx(grad, tmp_path / "x.onnx")


def test_cli_export_and_predict(trained, synthetic_root, tmp_path, test_paths):
    _, checkpoint = trained
    runner = CliRunner()
    out = tmp_path / "m.onnx"
    result = runner.invoke(
        main,
        [
            "export",
            str(checkpoint),
            "-o",
            str(out),
            "--images",
            str(synthetic_root),
            "--max-images",
            "8",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "verdicts agree: True" in result.output and out.exists()
    result = runner.invoke(
        main, ["predict", str(out), *map(str, test_paths[:3]), "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].split("\t") == ["path", "score", "normalized_score", "verdict"]
    assert len(lines) == 4
    bad = tmp_path / "bad.png"
    bad.write_text("x")
    good = test_paths[0]
    result = runner.invoke(main, ["predict", str(out), str(bad), str(good), "--device", "cpu"])
    assert result.exit_code == 1 and "bad.png\t\t\tERROR" in result.output
    assert str(good) in result.output  # the readable file still gets its row
    folder = good.parent
    result = runner.invoke(main, ["predict", str(out), str(folder), "--json", "--device", "cpu"])
    rows = [json.loads(line) for line in result.output.strip().splitlines()]
    assert result.exit_code == 0 and len(rows) == len(list(folder.glob("*.png")))
    assert all(r["error"] == "" and isinstance(r["is_anomaly"], bool) for r in rows)
    result = runner.invoke(main, ["export", str(checkpoint), "-o", str(out), "--int8"])
    assert result.exit_code == 1 and "--int8 needs --images" in result.output


def test_feature_model_exports_one_graph_with_parity(tmp_path):
    from anomalyvae.data import make_synthetic_dataset

    root = make_synthetic_dataset(
        tmp_path / "d", n_train=24, n_test_good=4, n_test_defect=4, size=64
    )
    paths = [s.path for s in mvtec_samples(root, "train")]
    # a bank searched in its principal directions (the default above 512 x 512 pixels)
    detector = VAEAnomalyDetector(
        model="feature", bank_dim=16, epochs=2, target_fpr=0.25, progress=False
    )
    detector.fit(paths)
    assert detector.model_.config.bank_dim == 16
    test = [s.path for s in mvtec_samples(root, "test")]
    images = detector.preprocess(test)
    result = export_onnx(detector, tmp_path / "feature.onnx", images)
    assert result.parity.verdicts_agree and result.parity.max_rel_score_diff < 1e-4
    meta = read_metadata(result.path)
    assert meta["model_family"] == "feature" and meta["score_kind"] == "fused"
    ran = OnnxDetector(result.path, device="cpu").predict_files(test)
    np.testing.assert_allclose(ran.score, detector.anomaly_score(test), rtol=1e-4, atol=1e-4)
    # the map (z-scores per edge ring of the feature map) is the same in the graph
    assert detector.model_.config.map_border >= 1
    reference = detector.anomaly_map(test)
    np.testing.assert_allclose(
        ran.anomaly_map[:, 0], reference, rtol=1e-3, atol=1e-4 * np.abs(reference).max()
    )
    with pytest.raises(ExportError, match="not implemented for the feature model"):
        export_onnx(detector, tmp_path / "feature.fp16.onnx", precision="fp16")
    # the backbone's "SAME" pads fold into its convolutions once ONNX Runtime optimizes
    # the graph: a Pad left in front of a Conv runs on its own and breaks the blocked layout
    assert not [n.name for n in onnx.load(result.path).graph.node if n.input and not n.input[-1]]
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(result.path), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(tmp_path / "optimized.onnx").graph.node
    consumers = {i for n in optimized if n.op_type in ("Conv", "FusedConv") for i in n.input}
    zero_pads = [
        n.name
        for n in optimized
        if n.op_type == "Pad"
        and n.output[0] in consumers
        and all(a.s in (b"", b"constant") for a in n.attribute if a.name == "mode")
    ]
    assert not zero_pads  # reflect pads (the map's blur) cannot fold and are left alone


@pytest.mark.parametrize("bits", [8, 16])
def test_the_contracts_python_snippet_matches_the_runtime(onnx_model, tmp_path, monkeypatch, bits):
    import contextlib
    import io
    import re
    import shutil
    from pathlib import Path

    from PIL import Image

    doc = (Path(__file__).resolve().parents[1] / "docs" / "onnx-contract.md").read_text()
    snippet = re.search(r"## Python \(plain onnxruntime\)\n\n```python\n(.*?)```", doc, re.S)
    shutil.copy(onnx_model, tmp_path / "model.onnx")
    rng = np.random.default_rng(bits)
    if bits == 16:  # bright 16-bit values would saturate any path through uint8
        pixels = rng.integers(30000, 65535, (40, 52), dtype=np.uint16)
    else:
        pixels = rng.integers(0, 255, (40, 52), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "part.png")
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(snippet.group(1), "onnx-contract.md", "exec"), {})
    score = float(printed.getvalue().split()[0])
    expected = OnnxDetector(tmp_path / "model.onnx", device="cpu").predict_files(["part.png"])
    assert score == pytest.approx(float(expected.score[0]), rel=1e-5, abs=1e-6)


def test_signed_models_are_checked_when_a_key_is_configured(trained, tmp_path, monkeypatch):
    import onnx as onnx_lib

    from anomalyvae.inference.contract import KEY_ENV, SIGNATURE_KEY, content_hash, signature

    detector, _ = trained
    unsigned = export_onnx(detector, tmp_path / "unsigned.onnx").path
    monkeypatch.setenv(KEY_ENV, "a-long-enough-secret-key")
    signed = export_onnx(detector, tmp_path / "signed.onnx").path
    assert SIGNATURE_KEY[len("anomalyvae.") :] in read_metadata(signed)
    with pytest.raises(OnnxModelError, match="not signed with the configured key"):
        read_metadata(unsigned)
    # tampering: a new threshold with a recomputed content hash, as anyone could do
    proto = onnx_lib.load(str(signed))
    props = {p.key: p.value for p in proto.metadata_props}
    props["anomalyvae.threshold"] = "1e9"
    del proto.metadata_props[:]
    onnx_lib.helper.set_model_props(proto, props)
    props["anomalyvae.content_hash"] = content_hash(proto)
    onnx_lib.helper.set_model_props(proto, props)
    onnx_lib.save(proto, str(tmp_path / "tampered.onnx"))
    with pytest.raises(OnnxModelError, match="not signed with the configured key"):
        read_metadata(tmp_path / "tampered.onnx")
    monkeypatch.delenv(KEY_ENV)
    # without a key the hash passes, but the threshold disagrees with its calibration
    with pytest.raises(OnnxModelError, match="disagrees with its calibration block"):
        read_metadata(tmp_path / "tampered.onnx")
    assert read_metadata(tmp_path / "tampered.onnx", verify=False)["threshold"] == 1e9
    assert OnnxDetector(signed, verify=False).signed and not OnnxDetector(unsigned).signed
    assert props["anomalyvae.signature"] != signature(props["anomalyvae.content_hash"], b"x" * 20)


@pytest.mark.parametrize("threshold", [0.0, -1.0, float("nan"), float("inf")])
def test_the_runtime_refuses_a_threshold_that_flags_all_or_nothing(onnx_model, threshold):
    runtime = OnnxDetector(onnx_model, device="cpu")
    images = np.zeros((1, *runtime.input_shape), np.float32)
    with pytest.raises(ValueError, match="positive finite"):
        runtime.predict_arrays(images, threshold)


def test_a_failed_parity_check_leaves_no_model_behind(trained, tmp_path, monkeypatch):
    import anomalyvae.export as export

    detector, _ = trained
    images = np.random.default_rng(0).random((4, 1, 32, 32)).astype(np.float32)
    real = export.torch_outputs

    def drifted(*args, **kwargs):  # as if ONNX Runtime disagreed with torch
        out = real(*args, **kwargs)
        return {**out, "score": out["score"] + 0.5 * abs(detector.threshold_)}

    monkeypatch.setattr(export, "torch_outputs", drifted)
    with pytest.raises(ExportError, match="nothing was written"):
        export_onnx(detector, tmp_path / "model.onnx", images)
    assert list(tmp_path.iterdir()) == []  # no model, no sidecar, no staging file


def test_parity_is_judged_in_the_scores_own_scale(trained, tmp_path, monkeypatch):
    """A difference of 4e-4 of a threshold of 41 passes; it failed as an absolute 0.016."""
    import anomalyvae.export as export

    detector, _ = trained
    images = np.random.default_rng(0).random((4, 1, 32, 32)).astype(np.float32)
    real = export.torch_outputs

    def rounded(*args, **kwargs):
        out = real(*args, **kwargs)
        return {**out, "score": out["score"] + 4e-4 * abs(detector.threshold_)}

    monkeypatch.setattr(export, "torch_outputs", rounded)
    result = export_onnx(detector, tmp_path / "model.onnx", images)
    assert 3e-4 < result.parity.max_rel_score_diff < 1e-3 and result.path.is_file()


def test_the_runtime_sizes_its_batches_from_the_input(onnx_model):
    from anomalyvae.imaging.tiles import BATCH_PIXELS, MAX_AUTO_BATCH, auto_batch_size

    assert auto_batch_size(256, 256) == 2 and auto_batch_size(1216, 480) == 1
    assert auto_batch_size(28, 28) == MAX_AUTO_BATCH  # thumbnails: many per run
    assert auto_batch_size(4000, 4000) == 1  # never zero
    assert auto_batch_size(28, 28, 8) == 8 and auto_batch_size(256, 256, 8) == 2  # a cap
    runtime = OnnxDetector(onnx_model, device="cpu")
    h, w = runtime.input_shape[1:]
    assert runtime.batch_size == min(MAX_AUTO_BATCH, BATCH_PIXELS // (h * w))
    assert OnnxDetector(onnx_model, device="cpu", batch_size=3).batch_size == 3


def test_session_options_are_set_deliberately():
    """The settings docs/onnx-contract.md promises integrators, on every session."""
    import onnxruntime as ort

    from anomalyvae.inference import runtime

    options = runtime.session_options(intra_op_threads=2, inter_op_threads=1)
    assert options.intra_op_num_threads == 2 and options.inter_op_num_threads == 1
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.enable_cpu_mem_arena and options.enable_mem_pattern
    spinning = options.get_session_config_entry("session.intra_op.allow_spinning")
    assert spinning == runtime.SPINNING
    assert runtime.session_options().intra_op_num_threads == 0  # ONNX Runtime's default


def test_predict_names_undecodable_files_as_the_scan_does(onnx_model, test_paths, tmp_path):
    import os
    import shutil

    folder = tmp_path / "odd"
    folder.mkdir()
    name = os.fsdecode(b"part_\xff.png")
    shutil.copy(test_paths[0], folder / name)
    (folder / os.fsdecode(b"broken_\xfe.png")).write_bytes(b"not an image")
    for extra in ([], ["--json"]):
        result = CliRunner().invoke(
            main, ["predict", str(onnx_model), str(folder), "--device", "cpu", *extra]
        )
        assert result.exit_code == 1, result.output  # the broken file, after every row
        if not extra:
            assert "part_\\xff.png\t" in result.output
            assert "broken_\\xfe.png\t\t\tERROR" in result.output
        else:  # strict JSON: no NaN for the broken file's scores
            rows = [
                json.loads(line, parse_constant=pytest.fail) for line in result.output.splitlines()
            ]
            assert rows[0]["score"] is None and rows[0]["is_anomaly"] is None
            assert rows[0]["path"].endswith("broken_\\xfe.png") and "\\xfe" in rows[0]["error"]
            assert rows[1]["path"].endswith("part_\\xff.png") and rows[1]["error"] == ""


def test_predict_on_a_folder_without_images_is_an_error(onnx_model, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    result = CliRunner().invoke(main, ["predict", str(onnx_model), str(tmp_path / "empty")])
    assert result.exit_code == 1 and "no image files in" in result.output
    assert "Traceback" not in result.output
