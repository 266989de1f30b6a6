"""Tile geometry: offsets, blend weights and maps back at a file's own size (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from anomalyvae.imaging.tiles import (
    TILE_ALIGN,
    map_to_size,
    ramp_weights,
    tight_tile,
    tile_layout,
    tile_offsets,
)


@pytest.mark.parametrize(
    ("size", "tile", "overlap"),
    [(512, 512, 128), (1216, 512, 128), (1536, 512, 128), (192, 64, 16), (480, 256, 64)],
)
def test_tiles_cover_the_input_evenly_and_overlap_enough(size, tile, overlap):
    offsets = tile_offsets(size, tile, overlap)
    assert offsets[0] == 0 and offsets[-1] + tile == max(size, tile)
    assert all(o % TILE_ALIGN == 0 for o in offsets)
    assert offsets == sorted(set(offsets))
    steps = np.diff(offsets)
    if len(offsets) > 1:
        # neighbours overlap by at least the asked overlap, less the alignment rounding
        assert (tile - steps >= overlap - TILE_ALIGN).all()
        assert steps.max() - steps.min() <= TILE_ALIGN  # evenly spread
    covered = np.zeros(size, bool)
    for o in offsets:
        covered[o : o + tile] = True
    assert covered.all()


@pytest.mark.parametrize("size", [528, 640, 1088, 1216, 1536, 2000])
@pytest.mark.parametrize(("tile", "overlap"), [(512, 128), (256, 64)])
def test_tight_tiles_cover_in_the_fewest_tiles_with_the_least_work(size, tile, overlap):
    """Tight tiles keep the fewest tiles of at most ``tile`` px and shrink them: never more
    backbone work than full tiles, every pixel covered, every overlap at least asked."""
    short = tight_tile(size, tile, overlap)
    assert short % TILE_ALIGN == 0 and short <= tile
    tight, full = tile_offsets(size, short, overlap), tile_offsets(size, tile, overlap)
    assert len(tight) <= len(full)
    assert len(tight) * short <= len(full) * tile
    assert tight[0] == 0 and tight[-1] + short == size
    assert (short - np.diff(tight) >= overlap).all()
    # one tile less would not do: the fewest tiles of at most ``tile`` px
    assert (len(tight) - 1) * tile - (len(tight) - 2) * overlap < size


def test_tight_tiles_cut_the_backbone_work_on_an_elongated_input():
    full, tight = tile_layout(448, 1088, 512, 128), tile_layout(448, 1088, 512, 128, True)
    assert (full.tile_width, full.n_tiles) == (512, 3)
    assert (tight.tile_width, tight.n_tiles) == (448, 3)
    assert tight.offsets_x == (0, 320, 640) and tight.tile_height == 448
    assert tile_layout(256, 384, 512, 128, True) == tile_layout(256, 384, 512, 128)
    assert tile_layout(64, 96, 512, 128, True).n_tiles == 1  # overlap wider than the input


def test_an_input_that_fits_is_one_tile():
    layout = tile_layout(256, 384, 512, 128)
    assert layout.n_tiles == 1 and not layout.tiled
    assert (layout.tile_height, layout.tile_width) == (256, 384)


@pytest.mark.parametrize(
    ("args", "message"),
    [((600, 512, 128), "multiple of 16"), ((600, 64, 64), "overlap < tile")],
)
def test_bad_tile_geometry_is_a_clear_error(args, message):
    with pytest.raises(ValueError, match=message):
        tile_offsets(*args)


def test_ramp_weights_are_positive_symmetric_and_fade_across_the_overlap():
    weights = ramp_weights(64, 16)
    assert (weights > 0).all()
    np.testing.assert_allclose(weights, weights[::-1])
    assert weights[0] < 0.01 and weights[32] == 1.0
    assert (np.diff(weights[:32]) >= 0).all()  # rises from the edge inwards
    np.testing.assert_array_equal(ramp_weights(8, 0), np.ones(8))


@pytest.mark.parametrize("tight", [False, True])
@pytest.mark.parametrize("shape", [(480, 1216), (1216, 480), (1024, 1024), (256, 1536)])
def test_blending_constant_tiles_gives_the_constant_everywhere(shape, tight):
    """No seam: tiles that agree blend to exactly their common value, at every cell."""
    layout = tile_layout(*shape, 512, 128, tight)
    weight, norm = layout.blend(8)
    canvas = np.zeros((shape[0] // 8, shape[1] // 8))
    th, tw = weight.shape
    for y, x in layout.corners():
        canvas[y // 8 : y // 8 + th, x // 8 : x // 8 + tw] += 3.5 * weight
    np.testing.assert_allclose(canvas * norm, 3.5, rtol=1e-5)


def test_blending_a_ramp_across_a_seam_stays_continuous():
    """Two tiles that disagree (an offset of 1) blend without a jump at any cell."""
    layout = tile_layout(64, 192, 64, 32)
    weight, norm = layout.blend(1)
    canvas = np.zeros((64, 192))
    for k, (y, x) in enumerate(layout.corners()):
        canvas[y : y + 64, x : x + 64] += (k % 2) * weight
    blended = (canvas * norm)[32]
    assert np.abs(np.diff(blended)).max() < 0.25  # a hard seam would jump by 1


def test_maps_come_back_at_the_files_own_size_with_their_values():
    anomaly_map = np.zeros((64, 160), np.float32)
    anomaly_map[30:34, 100:104] = 7.0
    anomaly_map -= 2.0  # maps are not in [0, 1]
    big = map_to_size(anomaly_map, 500, 1250)
    assert big.shape == (500, 1250) and big.dtype == np.float32
    assert big.min() >= -2.0 - 1e-5 and big.max() <= 5.0 + 1e-5
    ys, xs = np.nonzero(big > 2.5)  # the blob, centred where it was, in file pixels
    assert abs(ys.mean() + 0.5 - 32 * 500 / 64) < 2 and abs(xs.mean() + 0.5 - 102 * 1250 / 160) < 2
    np.testing.assert_array_equal(map_to_size(anomaly_map, 64, 160), anomaly_map)
