"""The leave-one-set-out runner of the suite (pipelines/suite/loso.py), on made-up views."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


def _loso():
    sys.path.insert(0, str(PIPELINES))
    spec = importlib.util.spec_from_file_location("suite_loso", PIPELINES / "suite/loso.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dump(rng, good: str, n: int = 40) -> dict:
    """Views of a feature model where only the view ``good`` sees the defects."""
    names = ("local", "elbo", "global", "image", "knn", "extent", "pca128_topk", "grey")
    label = np.r_[np.zeros(n), np.ones(n)]
    test = {name: rng.standard_normal(2 * n) for name in names}
    test[good] = test[good] + 3 * label
    synthetic = {name: rng.standard_normal(n) + (3.0 if name == good else 0.0) for name in names}
    val = {name: rng.standard_normal(n) for name in names}
    test["fused"] = np.mean([test[v] for v in ("knn", "global", "image")], axis=0)
    val["fused"] = np.mean([val[v] for v in ("knn", "global", "image")], axis=0)
    test["label"] = label
    return {"val": val, "synthetic": synthetic, "test": test}


def test_a_rule_is_scored_on_the_set_it_was_not_chosen_on():
    loso = _loso()
    rng = np.random.default_rng(0)
    dumps = {f"set{i}": _dump(rng, good) for i, good in enumerate(["knn", "image", "elbo"])}
    floors = {name: 0.5 for name in dumps}
    result = loso.loso(dumps, floors)
    # the synthetic defects point at the one working view on every set, so a rule that
    # follows them wins on the other sets and holds on the one left out
    for name, fold in result["folds"].items():
        assert fold["chosen"].startswith("synthetic-"), fold
        assert fold["image_auroc"] > 0.9, (name, fold)
    # a fixed fusion drowns the one working view (diluted by two that see nothing)
    fixed = result["in_sample"]["fixed (as trained)"]
    assert fixed["set2"] < 0.75  # elbo is not among the fixed views
    point = result["folds"]["set0"]["operating_point"]
    assert point["n_calibration_normals"] == 40 and point["n_test_normals"] == 40
    assert point["robust"]["recall"] >= point["conformal"]["recall"]  # never above the max


def test_the_fold_uses_only_the_other_sets(monkeypatch):
    loso = _loso()
    rng = np.random.default_rng(1)
    dumps = {f"set{i}": _dump(rng, "knn") for i in range(3)}
    # the left-out set's labels are flipped: its fold reports the rule chosen on the
    # other two, scored on set0 (low), while what the others saw stays high
    dumps["set0"]["test"]["label"] = 1 - dumps["set0"]["test"]["label"]
    result = loso.loso(dumps, {name: 0.5 for name in dumps})
    fold = result["folds"]["set0"]
    assert fold["image_auroc"] < 0.2 and fold["train_margin"] > 0.3


def test_the_local_excess_is_chosen_by_synthetic_defects_among_settings_that_cost_nothing():
    loso = _loso()
    rng = np.random.default_rng(2)
    dumps = {}
    for i in range(3):
        # the image view carries the real defects and, at this share, nearly all the
        # weight; only the local views see the synthetic (small) ones
        dump = _dump(rng, "image")
        dump["synthetic"]["image"] = dump["synthetic"]["image"] - 3.0
        for name in ("local", "knn"):
            dump["synthetic"][name] = dump["synthetic"][name] + 6.0
        dump["adaptation"] = {"image_unexplained": np.array([0.7])}
        dumps[f"set{i}"] = dump
    result = loso.excess_loso(dumps)
    for name, fold in result["folds"].items():
        assert fold["chosen"] != loso.NO_EXCESS, (name, fold)
        assert fold["synthetic"] > fold["synthetic_none"] + 0.2
        # admissible only where it costs the other sets at most the tolerance
        chosen = result["in_sample"][fold["chosen"]]["image_auroc"]
        none = result["in_sample"][loso.NO_EXCESS]["image_auroc"]
        others = [s for s in dumps if s != name]
        assert all(chosen[s] >= none[s] - result["tolerance"] for s in others)
    assert result["in_sample"][loso.NO_EXCESS]["synthetic"]["set0"] < 0.7
    assert loso.excess_name(("extent",), 1.0, 1.0) in result["in_sample"]
    # dumps written before the extent probe: its settings are left out, not a KeyError
    for dump in dumps.values():
        for group in ("val", "synthetic", "test"):
            dump[group].pop("extent")
    older = loso.excess_loso(dumps)
    assert not any(name.startswith("extent") for name in older["in_sample"])
    assert older["folds"].keys() == result["folds"].keys()


def test_every_rule_scores_a_defect_far_past_every_normal():
    """A test view hundreds of robust z above the held-out normals (a tiny smoke model's
    views can be) still gets a finite score from every rule; the soft maximum overflowed."""
    loso = _loso()
    rng = np.random.default_rng(2)
    dumps = {f"set{i}": _dump(rng, good) for i, good in enumerate(["knn", "image"])}
    for name in ("knn", "global", "image"):
        dumps["set0"]["test"][name][-1] = 1e4
    for rule, fn in loso.make_rules().items():
        scores = fn(dumps["set0"])
        assert np.isfinite(scores).all(), rule
        assert scores[-1] >= np.max(scores[:40]), rule  # the far defect ranks above normals
