"""The sentences the model's metadata turns into (train's summary, the QA report)."""

import pytest

from anomalyvae.inference.contract import describe_fusion


def test_fusion_sentence_names_the_weights_and_the_local_excess():
    fusion = {
        "rule": "image-share",
        "combine": "weighted sum",
        "weights": {"global": 0.01, "image": 0.98, "knn": 0.01},
        "local_excess": {"views": ["local", "knn"], "weight": 0.3, "above_z": 3.0},
    }
    assert describe_fusion(fusion) == (
        "Image score: z-scores weighted global 0.01, image 0.98, knn 0.01, plus 0.3 x the "
        "excess over 3 of the local and knn z-scores (fusion image-share)."
    )
    # a model saved before the term has no entry; a hand-edited one is left out, not fatal
    older = {k: v for k, v in fusion.items() if k != "local_excess"}
    assert "excess" not in describe_fusion(older)


@pytest.mark.parametrize(
    "excess", [None, "0.3", {"views": "local", "weight": 0.3}, {"views": ["local"], "weight": "x"}]
)
def test_a_malformed_local_excess_entry_is_left_out_of_the_sentence(excess):
    fusion = {"rule": "image-share", "weights": {"image": 1.0}, "local_excess": excess}
    assert (
        describe_fusion(fusion) == "Image score: z-scores weighted image 1.00 (fusion image-share)."
    )
