"""The feature family's config: checked on construction, older models' values on load."""

from __future__ import annotations

import pytest

from anomalyvae.errors import InvalidValueError
from anomalyvae.models.bank import MAP_BORDER
from anomalyvae.models.feature_config import MIN_STD, FeatureVAEConfig
from anomalyvae.models.fusion import VIEW_NAMES


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("in_channels", 2, "in_channels"),
        ("height", 16, "at least 32"),
        ("pool", 2, "odd"),
        ("latent_dim", 0, "latent_dim"),
        ("beta", -1.0, "beta"),
        ("knn_border", -1, "knn_border"),
        ("map_border", -1, "map_border"),
    ],
)
def test_feature_config_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        FeatureVAEConfig(**{field: value})


def test_older_configs_fuse_the_views_they_have_with_their_rule():
    new = FeatureVAEConfig()
    assert [VIEW_NAMES[i] for i in new.fused_index] == ["knn", "global", "image"]
    assert new.fusion == "mean"
    before_bank = FeatureVAEConfig.from_dict({"image_components": 50})
    assert [VIEW_NAMES[i] for i in before_bank.fused_index] == ["local", "global", "image"]
    assert before_bank.fusion == "max" and before_bank.bank_size == 0
    before_image = FeatureVAEConfig.from_dict({})
    assert [VIEW_NAMES[i] for i in before_image.fused_index] == ["local", "global"]
    # saved before the local excess term: it adds nothing; without a bank, nothing to read
    assert before_image.local_excess.weight == 0 and before_image.local_excess.index == ()
    assert [VIEW_NAMES[i] for i in new.local_excess.index] == ["knn"]
    # saved before the knn view left the map's edge out: it reads every location
    assert new.knn_border == 1 and before_image.knn_border == 0
    # saved before the map's edge rings: one set of map constants for every location
    assert new.map_border == MAP_BORDER and before_image.map_border == 0
    # saved before tight tiles: the full tile side, so its features stay as trained
    wide = {"height": 448, "width": 1088}
    old_tiles = FeatureVAEConfig.from_dict({**wide, "image_components": 50}).layout
    assert FeatureVAEConfig(**wide).tile_tight
    assert old_tiles.tile_width == 512 and FeatureVAEConfig(**wide).layout.tile_width == 448
    with pytest.raises(ValueError, match="excess_weight"):
        FeatureVAEConfig(excess_weight=-1.0)


def test_a_config_round_trips_and_unknown_fields_are_refused():
    config = FeatureVAEConfig(height=96, width=160, bank_dim=32, excess_weight=0.3)
    assert FeatureVAEConfig.from_dict(config.to_dict()) == config
    assert config.min_std == MIN_STD
    with pytest.raises(ValueError, match="unknown FeatureVAEConfig fields"):
        FeatureVAEConfig.from_dict({**config.to_dict(), "colour": "red"})


def test_the_bank_shrinks_above_512_squared_so_an_image_search_never_costs_more():
    from anomalyvae.models.bank import (
        BANK_FULL_PIXELS,
        BANK_MIN_ROWS,
        BANK_ROW_STEP,
        BANK_SIZE,
        auto_bank_size,
        resolve_bank_size,
    )

    assert auto_bank_size(256, 256) == auto_bank_size(512, 512) == BANK_SIZE
    assert auto_bank_size(448, 1088) == 4096 and auto_bank_size(1216, 480) == 3584
    for height, width in ((520, 512), (448, 1088), (1216, 480), (1024, 1024), (4096, 4096)):
        rows = auto_bank_size(height, width)
        assert rows % BANK_ROW_STEP == 0 and rows >= BANK_MIN_ROWS
        if rows > BANK_MIN_ROWS:  # locations x rows at most the 512 x 512 search
            assert height * width * rows <= BANK_FULL_PIXELS * BANK_SIZE
            assert height * width * (rows + BANK_ROW_STEP) > BANK_FULL_PIXELS * BANK_SIZE
    assert auto_bank_size(4096, 4096) == BANK_MIN_ROWS
    assert resolve_bank_size("auto", 1216, 480) == 3584
    assert resolve_bank_size(100, 1216, 480) == 100


def test_the_bank_is_searched_in_fewer_directions_above_512_squared_only():
    from anomalyvae.models.bank import (
        BANK_LARGE_DIM,
        auto_bank_dim,
        check_bank_dim,
        resolve_bank_dim,
    )

    lite2 = 168  # Lite2's stride-8 and stride-16 channels
    assert auto_bank_dim(256, 256, lite2) == auto_bank_dim(512, 512, lite2) == 0
    assert auto_bank_dim(448, 1088, lite2) == auto_bank_dim(1216, 480, lite2) == BANK_LARGE_DIM
    assert auto_bank_dim(1216, 480, BANK_LARGE_DIM) == 0  # no fewer directions to keep
    assert resolve_bank_dim("auto", 1216, 480, lite2) == BANK_LARGE_DIM
    assert resolve_bank_dim("auto", 256, 256, lite2) == 0
    assert resolve_bank_dim(32, 256, 256, lite2) == 32  # a request holds at any size
    assert resolve_bank_dim(lite2, 1216, 480, lite2) == 0  # every channel: no projection
    assert check_bank_dim("auto") == "auto" and check_bank_dim(0) == 0
    for bad in (-1, 1.5, True, "many"):
        with pytest.raises(InvalidValueError, match="bank_dim must be"):
            check_bank_dim(bad)


def test_a_bank_size_is_auto_or_a_whole_number_of_at_least_the_minimum_rows():
    from anomalyvae.errors import InvalidValueError
    from anomalyvae.models.bank import BANK_MIN_REQUEST, check_bank_size

    assert check_bank_size("auto") == "auto"
    assert check_bank_size(BANK_MIN_REQUEST) == BANK_MIN_REQUEST
    for bad in (BANK_MIN_REQUEST - 1, 100.0, True, "many", None):
        with pytest.raises(InvalidValueError, match=f"at least {BANK_MIN_REQUEST} rows, got"):
            check_bank_size(bad)


@pytest.mark.parametrize(
    ("height", "width", "bank_dim", "expected"),
    [(256, 256, "auto", 0), (448, 1088, "auto", 64), (448, 1088, 0, 0), (64, 64, 24, 24)],
)
def test_the_detectors_bank_dim_reaches_the_feature_config(height, width, bank_dim, expected):
    from anomalyvae.detector import VAEAnomalyDetector
    from anomalyvae.imaging.preprocessing import Preprocessing
    from anomalyvae.models.families.feature import feature_config

    detector = VAEAnomalyDetector(bank_dim=bank_dim, progress=False)
    spec = Preprocessing(height=height, width=width, channels=1)
    assert feature_config(detector, spec).bank_dim == expected
