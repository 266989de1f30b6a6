"""The convolutional VAE with a Gaussian decoder that predicts a per-pixel variance."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from anomalyvae.errors import InvalidValueError


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of :class:`ConvVAE`.

    Attributes
    ----------
    height, width : int
        Input size; both must be divisible by ``2 ** len(channels)``.
    in_channels : int
        1 (grayscale) or 3 (RGB).
    channels : tuple of int
        Feature channels per encoder stage; each stage halves the resolution.
    latent_dim : int
        Size of the latent code z.
    beta : float
        Weight of the KL term (beta-VAE, Higgins et al. 2017); 1.0 is the plain ELBO.
    logvar_min, logvar_max : float
        Bounds of the decoder's per-pixel log-variance. The lower bound keeps the
        likelihood finite on pixels the decoder reproduces exactly.
    """

    height: int = 64
    width: int = 64
    in_channels: int = 1
    channels: tuple[int, ...] = (32, 64, 128, 256)
    latent_dim: int = 64
    beta: float = 1.0
    logvar_min: float = -7.0
    logvar_max: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.in_channels not in (1, 3):
            raise InvalidValueError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if not self.channels or min(self.channels) < 1:
            raise InvalidValueError(
                f"channels must be a non-empty sequence of positive ints, got {self.channels}"
            )
        stride = 2 ** len(self.channels)
        if self.height % stride or self.width % stride:
            raise InvalidValueError(
                f"image size {self.height}x{self.width} must be divisible by {stride} "
                f"(2 ** number of stages, {len(self.channels)}); resize the input or "
                "use fewer stages"
            )
        if self.latent_dim < 1:
            raise InvalidValueError(f"latent_dim must be >= 1, got {self.latent_dim}")
        if self.beta < 0:
            raise InvalidValueError(f"beta must be >= 0, got {self.beta}")
        if not self.logvar_min < self.logvar_max:
            raise InvalidValueError("logvar_min must be smaller than logvar_max")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["channels"] = list(self.channels)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VAEConfig:
        check_config_fields(cls, data)
        return cls(**data)


class VAEOutput(NamedTuple):
    """What one forward pass returns; all tensors are float32.

    recon_mean : (n, c, h, w) decoder mean in [0, 1]
    recon_logvar : (n, c, h, w) decoder per-pixel log-variance
    mu, logvar : (n, latent_dim) posterior q(z|x) parameters
    """

    recon_mean: Tensor
    recon_logvar: Tensor
    mu: Tensor
    logvar: Tensor


def _stage(cin: int, cout: int, transpose: bool) -> nn.Sequential:
    conv: nn.Module
    if transpose:
        conv = nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False)
    else:
        conv = nn.Conv2d(cin, cout, 4, stride=2, padding=1, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, inplace=True))


class ConvVAE(nn.Module):
    """Convolutional VAE (Kingma & Welling 2014) with a Gaussian per-pixel decoder.

    The encoder halves the resolution at each stage of ``config.channels``; a linear
    layer maps the last feature map to the posterior mean and log-variance. The
    decoder mirrors it and predicts, per pixel, a mean (sigmoid) and a log-variance
    bounded to [logvar_min, logvar_max], so the ELBO is a proper likelihood
    (the "calibrated decoder" of Rybkin et al. 2021). In eval mode z is the posterior
    mean, so the output is deterministic.
    """

    #: The model family's registered name (:mod:`anomalyvae.models.families`).
    family = "pixel"

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        stages = len(config.channels)
        self.bottom = (config.height // 2**stages, config.width // 2**stages)
        flat = config.channels[-1] * self.bottom[0] * self.bottom[1]

        encoder, cin = [], config.in_channels
        for cout in config.channels:
            encoder.append(_stage(cin, cout, transpose=False))
            cin = cout
        self.encoder = nn.Sequential(*encoder)
        self.to_posterior = nn.Linear(flat, 2 * config.latent_dim)

        self.from_latent = nn.Linear(config.latent_dim, flat)
        rev = list(reversed(config.channels))
        decoder = [
            _stage(a, b, transpose=True) for a, b in zip(rev, rev[1:] + [rev[-1]], strict=True)
        ]
        self.decoder = nn.Sequential(*decoder)
        self.head = nn.Conv2d(rev[-1], 2 * config.in_channels, 3, padding=1)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior parameters ``(mu, logvar)``, each (n, latent_dim)."""
        h = self.encoder(x).flatten(1)
        mu, logvar = self.to_posterior(h).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def decode(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Decoder ``(mean, logvar)``, each (n, c, h, w)."""
        h = self.from_latent(z).view(-1, self.config.channels[-1], *self.bottom)
        mean_logits, logvar_raw = self.head(self.decoder(h)).chunk(2, dim=1)
        low, high = self.config.logvar_min, self.config.logvar_max
        return torch.sigmoid(mean_logits), low + (high - low) * torch.sigmoid(logvar_raw)

    def forward(self, x: Tensor) -> VAEOutput:
        mu, logvar = self.encode(x)
        if self.training:
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        else:
            z = mu
        recon_mean, recon_logvar = self.decode(z)
        return VAEOutput(recon_mean, recon_logvar, mu, logvar)


LOG_2PI = math.log(2.0 * math.pi)


def gaussian_nll(x: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """Per-pixel negative log-likelihood of x under N(mean, exp(logvar)), same shape as x."""
    return 0.5 * (LOG_2PI + logvar + (x - mean) ** 2 * torch.exp(-logvar))


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(q(z|x) || N(0, I)) per image, shape (n,) (Kingma & Welling 2014, appendix B)."""
    return -0.5 * torch.sum(1.0 + logvar - mu**2 - torch.exp(logvar), dim=1)


class LossTerms(NamedTuple):
    """Per-image loss terms, each (n,); ``elbo`` is the negative ELBO in nats (beta = 1)."""

    loss: Tensor
    nll: Tensor
    kl: Tensor
    elbo: Tensor


def vae_loss(x: Tensor, output: VAEOutput, beta: float) -> LossTerms:
    """Negative beta-ELBO per image: sum of pixel NLLs + beta * KL."""
    nll = gaussian_nll(x, output.recon_mean, output.recon_logvar).flatten(1).sum(1)
    kl = kl_divergence(output.mu, output.logvar)
    return LossTerms(nll + beta * kl, nll, kl, nll + kl)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_config_fields(cls: type, data: dict[str, Any]) -> None:
    """A clear error when a saved config ``data`` names fields the dataclass ``cls`` lacks.

    Both families' configs read checkpoints through it, so a file from a newer version
    (or a damaged one) is refused by name instead of failing deep in the constructor.
    """
    unknown = set(data) - {f.name for f in fields(cls)}
    if unknown:
        raise InvalidValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
