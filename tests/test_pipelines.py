"""Every benchmark pipeline with a smoke mode runs end to end on tiny synthetic data.

So that no report can go stale silently: a code change that breaks a pipeline fails
here, not months later when someone regenerates its report.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


@pytest.mark.parametrize(
    ("script", "outputs"),
    [
        ("onnx/bench.py", ["README.md", "results.json", "throughput.png"]),
        ("suite/drift.py", ["drift.md", "drift.json"]),
        ("suite/bank.py", ["bank.md", "bank.json"]),
        ("suite/reductions.py", ["reductions.md", "reductions.json"]),
        ("suite/extent.py", ["extent.md", "extent.json"]),
        ("suite/components.py", ["components.md", "components.json"]),
        ("suite/edges.py", ["edges.md", "edges.json"]),
        ("scan/bench.py", []),
        ("generative/run.py", []),
        ("mtd/run.py", []),
        ("pneumonia/run.py", []),
        ("scale/bench.py", []),
        ("cuda/bench.py", ["README.md", "results.json"]),
        ("budget/run.py", ["README.md", "results.json", "seconds.png"]),
        ("scoring/bench.py", ["README.md", "results.json"]),
    ],
)
def test_pipeline_smoke_mode(script, outputs, tmp_path):
    args = [sys.executable, str(PIPELINES / script), "--smoke"]
    if script.startswith(("suite", "cuda", "budget", "scoring")):
        args += ["--out", str(tmp_path / "report")]
    if script in (
        "suite/drift.py",
        "suite/bank.py",
        "suite/reductions.py",
        "suite/extent.py",
        "suite/components.py",
        "suite/edges.py",
    ):
        completed = subprocess.run(args, capture_output=True, text=True, timeout=900)
        assert completed.returncode == 0, completed.stderr[-3000:]
        for name in outputs:
            assert (tmp_path / "report" / name).is_file(), name
        if script == "suite/drift.py":  # a whole batch made darker: the alarm must fire
            drift = json.loads((tmp_path / "report" / "drift.json").read_text())
            darker = drift["sets"]["synthetic32"]["lighting"]["darker (x0.7)"]
            assert darker["n_images"] == 24 and darker["warnings"]
            # what the change achieved in the stored levels (8-bit synthetic images)
            assert 0.65 < darker["stored_mean_ratio"] < 0.75
            flatter = drift["sets"]["synthetic32"]["lighting"]["flatter (contrast x0.7)"]
            assert "contrast" in flatter  # the smoke model has the contrast range
        if script == "suite/extent.py":  # every candidate scored, the product's among them
            extent = json.loads((tmp_path / "report" / "extent.json").read_text())
            rows = extent["sets"]["synthetic"]
            assert "no excess" in rows and len(rows) > 100
            assert all(0 <= v <= 1 for v in rows.values())
            assert extent["loso"]["majority"] in rows
        if script == "suite/edges.py":  # every border measured, one chosen by the folds
            edges = json.loads((tmp_path / "report" / "edges.json").read_text())
            borders = edges["sets"]["synthetic"]["borders"]
            assert list(borders)[:2] == ["border 0", "border 1"] and len(borders) == 7
            assert all(0 <= b["normals_peaking_on_edge"] <= 1 for b in borders.values())
            assert 0.5 < borders["border 0"]["pixel_auroc"] <= 1.0
            assert edges["loso"]["majority"] in borders
        return
    completed = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    for name in outputs if script in ("budget/run.py", "scoring/bench.py") else []:
        assert (tmp_path / "report" / name).is_file(), name
    if script == "budget/run.py":  # the four commands ran, timed, with their peak memory
        results = json.loads((tmp_path / "report" / "results.json").read_text())
        assert all(
            results[c]["seconds"] > 0 and results[c]["peak_mb"] > 0
            for c in ("train", "evaluate", "tight", "calibrate")
        )
        assert 0.0 <= results["metrics"]["image_auroc"] <= 1.0
        tight = results["tight"]  # the tight memory budget cut the set to a choice
        assert 2 <= tight["n_read"] < tight["n_given"] and tight["limit"] == "memory"
        assert results["train_args"] == []
    if script == "scoring/bench.py":  # every backbone timed both ways, the same features
        results = json.loads((tmp_path / "report" / "results.json").read_text())
        assert "efficientnet-lite0" in results["backbones"]
        for r in results["backbones"].values():
            assert r["fused_s"] > 0 and r["unfused_s"] > 0 and r["gflop_per_image"] > 0
            assert r["max_abs_diff"] <= 1e-4 * r["feature_scale"]
        search = results["search"]  # the bank search both ways, in both engines
        assert len(search["seconds"]) == 4 and all(v > 0 for v in search["seconds"].values())
        assert search["max_abs_diff"] <= 1e-4 * search["distance_scale"]
    if script == "cuda/bench.py":
        results = json.loads((tmp_path / "report" / "results.json").read_text())
        assert results["evaluation"]["image_auroc"] is not None
        assert all(r["images_per_s"] > 0 for r in results["throughput"].values())
    if script != "cuda/bench.py":
        assert "smoke run" in completed.stdout


def test_budget_with_train_options_never_writes_over_the_defaults_report():
    args = [sys.executable, str(PIPELINES / "budget/run.py"), "--train-args", "--neighbourhood 1"]
    completed = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert "--train-args needs --out" in completed.stderr


def test_suite_smoke_logs_a_variant_and_judges_it_leave_one_set_out(tmp_path):
    """retrained.py --smoke: the suite's smoke run, a variant trained with an extra
    option (one line in variants.jsonl) and the leave-one-set-out verdict on both."""
    out = tmp_path / "report"
    args = [sys.executable, str(PIPELINES / "suite/retrained.py"), "--smoke", "--out", str(out)]
    completed = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    for name in ("README.md", "results.json", "experiments.md", "auroc.png", "loso.md"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    families = {r["defaults"]["model_family"] for r in results["sets"].values()}
    assert families == {"pixel", "feature"}  # auto picks by size: both are exercised
    readme = (out / "README.md").read_text()
    assert "Smoke run" in readme and "min for all sets" in readme
    (line,) = (out / "variants.jsonl").read_text().splitlines()
    entry = json.loads(line)
    assert entry["variant"] == "neighbourhood1"
    assert entry["train_args"] == ["--neighbourhood", "1"]
    assert entry["sets"]["synthetic96"]["defaults"]["model_family"] == "feature"
    judged = json.loads((out / "retrained.json").read_text())
    # the variant ran one set of two: it cannot be chosen where the other set decides
    assert set(judged["sets"]["synthetic96"]) == {"defaults", "neighbourhood1"}
    assert set(judged["sets"]["synthetic32"]) == {"defaults"}
    assert judged["loso"]["folds"]["synthetic96"]["chosen"] == "defaults"
    assert "leave-one-set-out" in (out / "retrained.md").read_text()


def _suite_module(name: str):
    import importlib.util

    sys.path.insert(0, str(PIPELINES / "suite"))
    spec = importlib.util.spec_from_file_location(f"suite_{name}", PIPELINES / f"suite/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("wins", "adopt"),
    [
        ({"a": 0.02, "b": 0.03, "c": 0.01, "d": -0.01}, True),  # chosen 4 of 4, held out +
        ({"a": 0.02, "b": 0.03, "c": -0.04, "d": -0.04}, False),  # chosen 2 of 4, held out -
        ({"a": 0.0, "b": 0.0, "c": 0.0, "d": 0.0}, False),  # ties keep the default
    ],
)
def test_a_variant_qualifies_only_by_a_majority_of_folds_and_a_held_out_gain(wins, adopt):
    folds = _suite_module("folds")
    gain = {s: {"default": 0.0, "variant": g} for s, g in wins.items()}
    decision = folds.choose_leave_one_out(gain, "default")
    assert decision["adopt"] is adopt
    for held, fold in decision["folds"].items():  # each fold judged without its own set
        others = np.mean([g for s, g in wins.items() if s != held])
        assert fold["chosen"] == ("variant" if others > 0 else "default")
        assert fold["held_gain"] == (wins[held] if others > 0 else 0.0)


def test_a_tied_fold_choice_names_the_earliest_folds_choice_whatever_the_hashing():
    folds = _suite_module("folds")
    sets = ["zeta", "alpha", "mu", "beta"]
    gain = {s: {"default": 0.0} for s in sets}
    for i, held in enumerate(sets):  # each fold's other sets prefer another variant
        for j, name in enumerate(sets):
            gain[held][f"v_{name}"] = -1.0 if i == j else 0.1 * ((j - i) % 4)
    decision = folds.choose_leave_one_out(gain, "default")
    choices = [f["chosen"] for f in decision["folds"].values()]
    assert choices == ["v_zeta", "v_alpha", "v_mu", "v_beta"]  # one fold each: a tie
    assert decision["majority"] == "v_zeta" and not decision["adopt"]
    rows = folds.fold_table(decision, held_score=lambda held, chosen: 0.5)
    assert rows[0].count("|") == 6 and len(rows) == 2 + len(sets)
    assert rows[2] == "| zeta | v_zeta | +0.200 | 0.500 | -1.000 |"


def test_every_knn_share_of_reductions_gets_its_own_row():
    reductions = _suite_module("reductions")
    distances = np.arange(2 * 1000, dtype=float).reshape(2, 1000)
    views = reductions.knn_views({"val": distances, "test": distances[::-1]})
    shares = [reductions.knn_key(f) for f in reductions.KNN_FRACTIONS]
    assert len(set(shares)) == len(shares) and set(shares) <= set(views)
    assert views["top 0.2%"]["val"].tolist() == [998.5, 1998.5]  # the 2 largest of 1000


def test_knn_border_variants_of_reductions_leave_the_edge_out_as_the_product_does():
    reductions = _suite_module("reductions")
    distances = np.zeros((2, 12, 12))
    distances[:, :, 0] = 9.0  # a lifted edge in every image
    distances[1, 6, 6] = 4.0  # one inside the second
    views = reductions.border_views({"val": distances[:1], "test": distances})
    assert list(views) == [reductions.border_key(b) for b in reductions.KNN_BORDERS]
    assert views[reductions.border_key(0)]["test"].tolist() == [9.0, 9.0]
    assert views[reductions.border_key(1)]["test"].tolist() == [0.0, 4.0]
    # the knn shares read the model's own border
    shares = reductions.knn_views({"val": distances[:1], "test": distances}, border=1)
    assert shares["top 1%"]["test"].tolist() == [0.0, 4.0]


def test_knn_extent_variants_tell_a_thin_crack_from_scattered_specks_the_top_share_ties():
    reductions, lines = _suite_module("reductions"), _suite_module("lines")
    kernels = lines.line_kernels(5)
    # every direction is a line of 5 locations through the centre, weights summing to 1
    assert kernels.shape == (lines.LINE_ORIENTATIONS, 1, 5, 5)
    assert ((kernels > 0).sum(dim=(1, 2, 3)) == 5).all()
    assert np.allclose(kernels.sum(dim=(1, 2, 3)).numpy(), 1.0)
    distances = np.zeros((3, 20, 30))  # 18 x 28 inside the border: the top 1 % is 5
    distances[1, 9:14, 12] = 2.0  # a faint crack, five locations down a column
    for row, col in ((3, 3), (3, 20), (10, 25), (16, 5), (16, 16)):
        distances[2, row, col] = 2.0  # five specks, no two within a kernel's reach
    distances[:, 0, :] = 50.0  # a lifted edge the model's border leaves out
    views = reductions.extent_views({"val": distances[:1], "test": distances}, border=1)
    top = views[reductions.knn_key(reductions.KNN_TOP_FRACTION)]["test"]
    assert top.tolist() == [0.0, 2.0, 2.0]  # the top share ranks them alike
    along = views[reductions.extent_key("lines", 5)]["test"]
    assert np.allclose(along, [0.0, 2.0, 0.4])  # the line keeps the whole crack
    squares = views[reductions.extent_key("squares", 3)]["test"]
    assert np.allclose(squares, [0.0, 6 / 9, 2 / 9])
    # a map smaller than the kernel is averaged whole
    small = lines.extent_view(np.ones((2, 3, 3)), lines.line_kernels(17))
    assert small.tolist() == [1.0, 1.0]
    assert [lines.share_length(0.2, side) for side in (10, 30, 150)] == [3, 7, 31]


def test_extent_candidates_keep_the_products_score_and_fall_into_one_family_each():
    extent = _suite_module("extent")
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(20), np.ones(10)]
    values = {"labels": labels, "unexplained": np.array(0.5)}
    for group, n in (("val", 15), ("test", 30)):
        for name in ("knn", "global", "image"):
            values[f"{group}/{name}"] = rng.normal(size=n)
        lifted = rng.normal(size=n) + (3 * labels if group == "test" else 0)
        values[f"{group}/knn extent/top 1%"] = values[f"{group}/knn"]
        values[f"{group}/knn extent/largest mean over lines of 5"] = lifted
    rows = extent.candidates(values)
    grid = len(extent.WEIGHTS) * len(extent.LEVELS)
    assert len(rows) == 1 + 2 * 2 * grid  # no excess, and two modes of two variants
    # the excess reads the knn view itself: "replace" is the same score
    top = extent.setting("excess", "top 1%", 1.0, 1.0)
    assert rows[top] == rows[extent.setting("replace", "top 1%", 1.0, 1.0)]
    # a variant that sees the defects lifts the fused score
    assert rows[extent.setting("excess", "largest mean over lines of 5", 1.0, 1.0)] > rows[top]
    assert extent.kind_of(top) == "excess, top share"
    kinds = {extent.kind_of(k) for k in rows if k != "no excess"}
    assert kinds == {
        "excess, top share",
        "replace, top share",
        "excess, lines of fixed length",
        "replace, lines of fixed length",
    }


def test_image_likelihood_variants_see_a_move_along_a_normal_direction_the_residual_misses():
    reductions = _suite_module("reductions")
    rng = np.random.default_rng(0)
    direction = np.zeros(64)
    direction[:32] = 1 / np.sqrt(32)  # the normals vary along one direction, little else
    train = rng.normal(size=(40, 1)) * direction + 0.01 * rng.normal(size=(40, 64))
    val = rng.normal(size=(20, 1)) * direction + 0.01 * rng.normal(size=(20, 64))
    far = 10 * direction  # inside the subspace, ten standard deviations out
    off = 0.5 * np.eye(64)[40]  # off the subspace, a small step
    test = np.stack([val[0], far, off])
    pca = reductions.subspace(train)
    groups = {"val": val.reshape(20, 1, 8, 8), "test": test.reshape(3, 1, 8, 8)}
    maps = reductions.residual_maps(pca, 1, groups)
    residual = {g: m.reshape(len(m), -1).mean(1) for g, m in maps.items()}
    views = reductions.likelihood_views(pca, 1, groups, residual)
    assert list(views) == list(reductions.LIKELIHOODS)
    assert views[reductions.LIKELIHOODS[0]] is residual  # the product's view, unchanged
    inside = views["Mahalanobis inside it alone"]["test"]
    assert inside[1] > 50 and inside[0] < 9 and inside[2] < 9  # only the far image
    assert residual["test"][1] < residual["test"][2]  # the residual misses it
    whole = views["probabilistic PCA negative log-likelihood"]["test"]
    assert whole[1] > whole[0] and whole[2] > whole[0]  # the likelihood sees both
    both = views["+ Mahalanobis inside it, mean z"]["test"]
    assert both[1] > both[0] and both[2] > both[0]


def test_suite_header_says_when_a_table_mixes_runs():
    suite = _suite_module("run")
    timed = {"a": {"seconds": 60.0}, "b": {"seconds": 120.0}}
    assert suite.run_time({"sets": timed}, 60.0).startswith("3 min for all sets")
    mixed = {"sets": {"a": {"code": "new"}, "b": {"code": "old"}}, "code": "new"}
    assert suite.run_time(mixed, 360.0).startswith("this run, of a only: 6 min")
    recorded = {"sets": {"a": {}, "b": {}}, "sets_run": ["b"]}
    assert suite.run_time(recorded, 120.0).startswith("this run, of b only: 2 min")


def test_edges_without_trained_models_says_so_and_writes_nothing(tmp_path):
    out = tmp_path / "report"
    completed = subprocess.run(
        [
            sys.executable,
            str(PIPELINES / "suite" / "edges.py"),
            "--data",
            str(tmp_path),
            "--runs",
            str(tmp_path / "runs"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 1
    assert "run pipelines/suite/run.py first" in completed.stderr
    assert not list(out.glob("edges.*"))


def test_retrained_names_each_sets_code_when_a_partial_rerun_left_them_apart():
    retrained = _suite_module("retrained")

    def results(codes: dict[str, str]) -> dict:
        sets = {s: {"code": c, "defaults": {"image_auroc": 0.8}} for s, c in codes.items()}
        return {"code": "new", "sets": sets}

    apart = retrained.judge(results({"a": "old", "b": "new"}), {})
    assert apart["defaults_code"] == "a old, b new"
    together = retrained.judge(results({"a": "new", "b": "new"}), {})
    assert together["defaults_code"] == "new"


def test_retrained_merges_a_variants_runs_on_different_sets(tmp_path):
    retrained = _suite_module("retrained")
    (tmp_path / "results.json").write_text(json.dumps({"code": "c0", "sets": {}}))

    def entry(code, args, **sets):
        rows = {s: {"defaults": {"image_auroc": v}} for s, v in sets.items()}
        return {"variant": "v", "code": code, "train_args": args, "sets": rows}

    lines = [
        entry("c1", ["--x"], a=0.5, b=0.6),
        entry("c1", ["--x"], c=0.7),
        entry("c2", ["--x"], b=0.9),
    ]
    log = tmp_path / "variants.jsonl"
    log.write_text("".join(json.dumps(e) + "\n" for e in lines))
    merged = retrained.candidates(tmp_path)[1]["v"]
    auroc = {s: r["defaults"]["image_auroc"] for s, r in merged["sets"].items()}
    assert auroc == {"a": 0.5, "b": 0.9, "c": 0.7}  # each set's latest run
    assert merged["code"] == "a c1, b c2, c c1"
    # the same name with other options starts again
    log.write_text(log.read_text() + json.dumps(entry("c3", ["--y"], a=0.1)) + "\n")
    merged = retrained.candidates(tmp_path)[1]["v"]
    assert list(merged["sets"]) == ["a"] and merged["code"] == "c3"


def test_a_finer_image_side_is_also_read_smoothed_over_the_products_extent():
    reductions = _suite_module("reductions")
    sigma = reductions.IMAGE_SIGMA
    # the model pools 10 px boxes; a 5 px box sees twice as finely: twice the smoothing
    finer = reductions.side_sigmas(256, 5, 10)
    assert finer == {"256 px": sigma, f"256 px, smoothed {2 * sigma:g} px": 2 * sigma}
    assert reductions.side_sigmas(128, 10, 10) == {"128 px": sigma}
    assert reductions.side_sigmas(64, 19, 10) == {"64 px": sigma}


def test_the_suite_report_carries_trains_data_warnings_without_machine_paths(tmp_path):
    """A set of [0, 1] images written to 8-bit unscaled is named in the suite's report,
    its example file shown relative to the repository as every path in a report."""
    from PIL import Image

    suite = _suite_module("run")
    rng = np.random.default_rng(0)
    sets = {}
    for name, scale in (("unscaled", 1), ("scaled", 100)):
        good = tmp_path / name / "train" / "good"
        good.mkdir(parents=True)
        for i in range(4):
            values = (rng.integers(0, 3, (32, 32)) * scale).astype(np.uint8)
            Image.fromarray(values).save(good / f"{i}.png")
        sets[name] = tmp_path / name
    notes = suite.data_notes(["unscaled", "scaled"], tmp_path / "absent", sets)
    assert list(notes) == ["unscaled"] and "stored value is 2" in notes["unscaled"]
    # a set this run did not train is found under the data root, its note kept
    assert suite.data_notes(["unscaled"], tmp_path) == notes
    assert "e.g. '/" not in notes["unscaled"]  # relative to the repository, not absolute
    assert "/unscaled/train/good/" in notes["unscaled"]
