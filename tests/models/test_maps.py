from __future__ import annotations

import numpy as np
import pytest
import torch

from anomalyvae.models.maps import (
    MAP_KINDS,
    ScoringConfig,
    gaussian_blur,
    image_elbo,
    map_from_output,
    nll_floor,
    reduce_map,
    ssim_map,
)
from anomalyvae.models.scoring import ScoringGraph, score_batch
from anomalyvae.models.vae import LOG_2PI, ConvVAE, VAEConfig, VAEOutput

LOGVAR_MIN = -7.0


def _output(mean, logvar_value=0.0, mu=None):
    n = mean.shape[0]
    mu = torch.zeros(n, 4) if mu is None else mu
    return VAEOutput(mean, torch.full_like(mean, logvar_value), mu, torch.zeros(n, 4))


def test_recon_map_is_squared_error():
    x = torch.zeros(1, 1, 8, 8)
    mean = x.clone()
    mean[0, 0, 2, 3] = 0.5
    result = map_from_output(x, _output(mean), "recon", LOGVAR_MIN)
    assert result.shape == (1, 1, 8, 8)
    assert result[0, 0, 2, 3] == pytest.approx(0.25) and result.sum() == pytest.approx(0.25)


def test_ssim_map_zero_for_identical_and_positive_for_different():
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    same = map_from_output(x, _output(x.clone()), "ssim", LOGVAR_MIN)
    assert same.abs().max() < 1e-4
    assert (1 - ssim_map(x, 1 - x)).mean() > 0.5


def test_nll_map_matches_gaussian_formula_minus_floor():
    x = torch.zeros(1, 1, 4, 4)
    mean = torch.full_like(x, 0.1)
    result = map_from_output(x, _output(mean, logvar_value=-2.0), "nll", LOGVAR_MIN)
    expected = 0.5 * (LOG_2PI - 2.0 + 0.01 / torch.exp(torch.tensor(-2.0))) - nll_floor(LOGVAR_MIN)
    assert torch.allclose(result, expected.expand_as(result))
    perfect = map_from_output(x, _output(x, logvar_value=LOGVAR_MIN), "nll", LOGVAR_MIN)
    assert perfect.abs().max() < 1e-5  # the floor makes a perfect pixel score zero


def test_elbo_map_sums_to_image_elbo():
    x = torch.rand(2, 1, 8, 8)
    out = _output(torch.rand(2, 1, 8, 8), -1.0, mu=torch.randn(2, 4))
    elbo_map = map_from_output(x, out, "elbo", LOGVAR_MIN)
    assert torch.allclose(elbo_map.flatten(1).sum(1), image_elbo(x, out, LOGVAR_MIN), rtol=1e-5)


def test_unknown_kind():
    with pytest.raises(ValueError, match="map kind"):
        map_from_output(torch.zeros(1, 1, 4, 4), _output(torch.zeros(1, 1, 4, 4)), "psnr", 0.0)


def test_gaussian_blur_keeps_constants_and_mass():
    constant = torch.full((1, 1, 16, 16), 3.0)
    assert torch.allclose(gaussian_blur(constant, 2.0), constant)
    impulse = torch.zeros(1, 1, 21, 21)
    impulse[0, 0, 10, 10] = 1.0
    blurred = gaussian_blur(impulse, 1.5)
    assert blurred.sum() == pytest.approx(1.0, abs=1e-5) and blurred.max() < 0.2
    assert torch.equal(gaussian_blur(impulse, 0.0), impulse)
    with pytest.raises(ValueError, match="too large"):
        gaussian_blur(torch.zeros(1, 1, 4, 4), 5.0)


@pytest.mark.parametrize(("kind", "expected"), [("max", 9.0), ("topk_mean", 8.5), ("elbo", 42.0)])
def test_reduce_map(kind, expected):
    values = torch.arange(10, dtype=torch.float32).view(1, 1, 2, 5)
    config = ScoringConfig(
        map_kind="recon", score_kind=kind, topk_fraction=0.2, smoothing_sigma=0.0
    )
    assert reduce_map(values, torch.tensor([42.0]), config).item() == pytest.approx(expected)


def test_topk_never_averages_less_than_one_smoothing_footprint():
    from anomalyvae.models.maps import topk_count
    from anomalyvae.models.smoothing import smoothing_footprint

    assert smoothing_footprint(0.0) == 1 and smoothing_footprint(2.0) == 114  # ceil(36 pi)
    config = ScoringConfig(topk_fraction=0.01, smoothing_sigma=2.0)
    assert topk_count(config, 128 * 128) == 164  # 1 % is already above the footprint
    assert topk_count(config, 32 * 32) == 114  # 1 % would be 10 pixels of one blob
    assert topk_count(config, 100) == 100  # never more than the map has
    assert topk_count(ScoringConfig(topk_fraction=0.01, smoothing_sigma=0.0), 1024) == 10


class _ConstantVAE(torch.nn.Module):
    """Reconstructs every image as flat grey with unit variance: errors are known."""

    config = VAEConfig(height=32, width=32, channels=(8, 16), latent_dim=4)

    def forward(self, x):
        mu = x.flatten(1)[:, :4] * 0.0  # keeps x in the graph for elbo_grad
        return VAEOutput(torch.full_like(x, 0.5), torch.zeros_like(x), mu, torch.zeros_like(mu))


@pytest.mark.parametrize("kind", MAP_KINDS)
def test_every_kind_peaks_on_a_planted_defect(kind):
    x = torch.full((2, 1, 32, 32), 0.5)
    x[0, 0, 10:14, 20:24] = 1.0
    result = score_batch(_ConstantVAE(), x, ScoringConfig(map_kind=kind, smoothing_sigma=1.0))
    assert result.anomaly_map.shape == (2, 1, 32, 32)
    peak = divmod(int(result.anomaly_map[0].flatten().argmax()), 32)
    assert 9 <= peak[0] <= 14 and 19 <= peak[1] <= 24
    assert result.score[0] > result.score[1]
    assert torch.isfinite(result.elbo).all() and result.anomaly_map.min() >= -1e-6


def test_scoring_graph_matches_score_batch_and_rejects_gradient_maps():
    model = ConvVAE(VAEConfig(height=32, width=32, channels=(8, 16), latent_dim=4)).eval()
    x = torch.rand(3, 1, 32, 32)
    config = ScoringConfig(map_kind="elbo")
    anomaly_map, score = ScoringGraph(model, config)(x)
    reference = score_batch(model, x, config)
    assert torch.allclose(anomaly_map, reference.anomaly_map)
    assert torch.allclose(score, reference.score)
    with pytest.raises(ValueError, match="input gradient"):
        ScoringGraph(model, ScoringConfig(map_kind="elbo_grad"))


@pytest.mark.parametrize(
    "bad",
    [dict(map_kind="x"), dict(score_kind="x"), dict(smoothing_sigma=-1), dict(topk_fraction=0)],
)
def test_scoring_config_validates(bad):
    with pytest.raises(ValueError):
        ScoringConfig(**bad)


def test_standardized_maps_subtract_the_normal_pixel_statistics():
    from anomalyvae.models.maps import MapStats, check_stats, fit_map_stats, standardize_map

    config = ScoringConfig("nll", standardize=True)
    rng = np.random.default_rng(0)
    base = torch.zeros(1, 1, 8, 8)
    base[..., :, 0] = 5.0  # a bright border every normal image has
    normals = base + torch.from_numpy(rng.normal(0, 0.1, (50, 1, 8, 8)).astype(np.float32))
    stats = fit_map_stats(normals, config)
    assert stats.mean.shape == stats.std.shape == (1, 1, 8, 8) and stats.n_images == 50
    assert (stats.std > 0).all()
    z = standardize_map(normals, stats)
    assert z.min() == 0.0 and float(z[..., 0].mean()) < 1.0  # the border is normal here
    odd = base.clone()
    odd[..., 4, 4] += 1.0  # 10 standard deviations at one pixel
    zz = standardize_map(odd, stats)[0, 0]
    assert zz[4, 4] > 5 and zz.flatten().topk(2).values[1] < 3
    with pytest.raises(ValueError, match="no normal-map statistics"):
        check_stats(None, config)
    with pytest.raises(ValueError, match="describe 'nll' maps"):
        check_stats(stats, ScoringConfig("ssim", standardize=True))
    assert MapStats.from_dict(stats.to_dict()).map_kind == "nll"


def test_auto_map_kind_follows_the_input_size():
    from anomalyvae.models.maps import default_map_kind

    assert default_map_kind(28, 28) == default_map_kind(32, 32) == "ssim"
    assert default_map_kind(64, 64) == default_map_kind(128, 256) == "nll"
