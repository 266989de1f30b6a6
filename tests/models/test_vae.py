from __future__ import annotations

import math

import pytest
import torch

from anomalyvae.models.vae import ConvVAE, VAEConfig, gaussian_nll, kl_divergence, vae_loss


@pytest.mark.parametrize(
    ("height", "width", "channels", "stages"),
    [(32, 32, 1, (8, 16)), (32, 64, 3, (8, 16, 32)), (64, 64, 1, (8, 16, 32, 64))],
)
def test_shapes(height, width, channels, stages):
    config = VAEConfig(
        height=height, width=width, in_channels=channels, channels=stages, latent_dim=5
    )
    model = ConvVAE(config).eval()
    out = model(torch.rand(3, channels, height, width))
    assert out.recon_mean.shape == out.recon_logvar.shape == (3, channels, height, width)
    assert out.mu.shape == out.logvar.shape == (3, 5)
    assert 0 <= out.recon_mean.min() and out.recon_mean.max() <= 1
    assert out.recon_logvar.min() >= config.logvar_min
    assert out.recon_logvar.max() <= config.logvar_max


def test_eval_is_deterministic_train_is_not():
    torch.manual_seed(0)
    model = ConvVAE(VAEConfig(height=32, width=32, channels=(8, 16), latent_dim=4))
    x = torch.rand(4, 1, 32, 32)
    model.eval()
    assert torch.equal(model(x).recon_mean, model(x).recon_mean)
    model.train()
    assert not torch.equal(model(x).recon_mean, model(x).recon_mean)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (dict(height=30), "divisible by"),
        (dict(in_channels=2), "in_channels"),
        (dict(channels=()), "channels"),
        (dict(latent_dim=0), "latent_dim"),
        (dict(beta=-1.0), "beta"),
        (dict(logvar_min=2.0), "logvar_min"),
    ],
)
def test_config_validation(bad, message):
    with pytest.raises(ValueError, match=message):
        VAEConfig(**bad)


def test_config_round_trip():
    config = VAEConfig(height=32, width=32, channels=(8, 16), latent_dim=4)
    assert VAEConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown"):
        VAEConfig.from_dict({"colour": 1})


def test_loss_terms_match_formulas():
    x = torch.tensor([[[[0.5]]]])
    nll = gaussian_nll(x, torch.tensor([[[[0.5]]]]), torch.tensor([[[[0.0]]]]))
    assert torch.isclose(nll, torch.tensor(0.5 * math.log(2 * math.pi))).all()
    assert torch.allclose(kl_divergence(torch.zeros(2, 3), torch.zeros(2, 3)), torch.zeros(2))
    assert kl_divergence(torch.ones(1, 3), torch.zeros(1, 3)).item() == pytest.approx(1.5)
    model = ConvVAE(VAEConfig(height=32, width=32, channels=(8, 16), latent_dim=4, beta=0.5))
    out = model.eval()(torch.rand(2, 1, 32, 32))
    terms = vae_loss(torch.rand(2, 1, 32, 32), out, 0.5)
    assert torch.allclose(terms.loss, terms.nll + 0.5 * terms.kl)
    assert torch.allclose(terms.elbo, terms.nll + terms.kl)


def test_a_saved_config_with_unknown_fields_is_refused_by_name():
    from anomalyvae.models.vae import VAEConfig

    data = {**VAEConfig(height=32, width=32).to_dict(), "colour": "red"}
    with pytest.raises(ValueError, match=r"unknown VAEConfig fields: \['colour'\]"):
        VAEConfig.from_dict(data)
