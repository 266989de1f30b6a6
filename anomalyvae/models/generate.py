"""The VAE as a generative model: sampling, interpolation, denoising, inpainting, embeddings.

All functions take a trained :class:`~anomalyvae.models.vae.ConvVAE` and model-ready images
(n, c, h, w) float32 in [0, 1]; they never train or change the model.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from anomalyvae.errors import InvalidValueError
from anomalyvae.models.vae import ConvVAE, gaussian_nll
from anomalyvae.progress import progress_bar

MAX_SAMPLES = 10_000
INPAINT_METHODS = ("clamp", "optimize")


def _check_images(model: ConvVAE, images: NDArray[np.float32], name: str = "images") -> Tensor:
    config = model.config
    expected = (config.in_channels, config.height, config.width)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise InvalidValueError(
            f"{name} must have shape (n, {expected[0]}, {expected[1]}, {expected[2]}) for this "
            f"model, got {images.shape}; the checkpoint was trained at that size and channel "
            "count"
        )
    if not np.isfinite(images).all():
        raise InvalidValueError(f"{name} contain NaN or infinite values")
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))


def _device(model: ConvVAE) -> torch.device:
    return next(model.parameters()).device


def sample(
    model: ConvVAE, n: int, temperature: float = 1.0, seed: int = 0, batch_size: int = 64
) -> NDArray[np.float32]:
    """Draw ``n`` images from the prior: decoder means of z ~ N(0, temperature^2 I).

    Temperatures below 1 give more typical, smoother images (what the model believes
    "normal" looks like); above 1, more varied and less plausible ones.
    """
    if not 1 <= n <= MAX_SAMPLES:
        raise InvalidValueError(f"n must be between 1 and {MAX_SAMPLES}, got {n}")
    if not 0 < temperature <= 5:
        raise InvalidValueError(f"temperature must be in (0, 5], got {temperature}")
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(n, model.config.latent_dim, generator=generator) * temperature
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            mean, _ = model.decode(z[start : start + batch_size].to(_device(model)))
            out.append(mean.cpu().numpy())
    return np.concatenate(out)


class Embedding(NamedTuple):
    """Posterior q(z|x) per image: ``mu`` and ``logvar``, each (n, latent_dim)."""

    mu: NDArray[np.float32]
    logvar: NDArray[np.float32]


def embed(model: ConvVAE, images: NDArray[np.float32], batch_size: int = 64) -> Embedding:
    """Latent means and log-variances of images: a compact descriptor for search/drift."""
    x = _check_images(model, images)
    model.eval()
    mus, logvars = [], []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            mu, logvar = model.encode(x[start : start + batch_size].to(_device(model)))
            mus.append(mu.cpu().numpy())
            logvars.append(logvar.cpu().numpy())
    return Embedding(np.concatenate(mus), np.concatenate(logvars))


def interpolate(
    model: ConvVAE, first: NDArray[np.float32], second: NDArray[np.float32], steps: int = 8
) -> NDArray[np.float32]:
    """Decode ``steps`` points on the line between two images' latent means, (steps, c, h, w)."""
    if not 2 <= steps <= 256:
        raise InvalidValueError(f"steps must be between 2 and 256, got {steps}")
    codes = embed(model, np.stack([first, second])).mu
    weights = np.linspace(0.0, 1.0, steps, dtype=np.float32)[:, None]
    z = torch.from_numpy((1 - weights) * codes[0] + weights * codes[1])
    with torch.no_grad():
        mean, _ = model.decode(z.to(_device(model)))
    return mean.cpu().numpy()


def denoise(
    model: ConvVAE,
    images: NDArray[np.float32],
    n_samples: int = 0,
    seed: int = 0,
    batch_size: int = 32,
) -> NDArray[np.float32]:
    """Reconstruct images through the VAE: the decoder mean at the posterior mean.

    With ``n_samples > 0``, average the decoder means over that many posterior samples
    z ~ q(z|x) instead (Monte-Carlo), which smooths the result further.
    """
    if not 0 <= n_samples <= 1000:
        raise InvalidValueError(f"n_samples must be between 0 and 1000, got {n_samples}")
    x = _check_images(model, images)
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            batch = x[start : start + batch_size].to(_device(model))
            mu, logvar = model.encode(batch)
            if n_samples == 0:
                mean, _ = model.decode(mu)
            else:
                total = torch.zeros_like(batch)
                for _ in range(n_samples):
                    noise = torch.randn(mu.shape, generator=generator).to(mu)
                    total += model.decode(mu + noise * torch.exp(0.5 * logvar))[0]
                mean = total / n_samples
            out.append(mean.cpu().numpy())
    return np.concatenate(out)


def _check_mask(images: NDArray[np.float32], missing: NDArray[np.bool_]) -> Tensor:
    missing = np.asarray(missing, dtype=bool)
    if missing.ndim == 2:
        missing = np.broadcast_to(missing, (images.shape[0], *missing.shape))
    if missing.shape != (images.shape[0], images.shape[2], images.shape[3]):
        raise InvalidValueError(
            f"mask must be (h, w) or (n, h, w) matching the images' {images.shape[2]}x"
            f"{images.shape[3]}, got {missing.shape}"
        )
    if not missing.any():
        raise InvalidValueError("the mask marks no missing pixels; nothing to inpaint")
    if missing.reshape(len(missing), -1).all(axis=1).any():
        raise InvalidValueError("the mask marks every pixel of an image missing; nothing is known")
    return torch.from_numpy(np.array(missing, dtype=bool))[:, None].float()  # a writable copy


def inpaint(
    model: ConvVAE,
    images: NDArray[np.float32],
    missing: NDArray[np.bool_],
    method: str = "optimize",
    iterations: int = 100,
    learning_rate: float = 0.05,
    progress: bool = False,
) -> NDArray[np.float32]:
    """Fill the ``missing`` pixels (True = missing) so that known pixels are kept exactly.

    Methods
    -------
    "clamp"
        Iterate x <- known * x + missing * reconstruction(x), starting from the mean
        of the known pixels: the reconstruction pulls the unknown pixels toward what
        the model finds likely given the known ones.
    "optimize"
        Optimize the latent code z (from the encoder's guess) to maximize the
        decoder's likelihood of the known pixels plus the prior log N(z; 0, I), then
        decode (a MAP estimate of z given the known pixels).
    """
    if method not in INPAINT_METHODS:
        raise InvalidValueError(f"method must be one of {INPAINT_METHODS}, got {method!r}")
    if not 1 <= iterations <= 10_000:
        raise InvalidValueError(f"iterations must be between 1 and 10000, got {iterations}")
    x = _check_images(model, images)
    hole = _check_mask(images, missing).to(x)
    known = 1.0 - hole
    device = _device(model)
    x, hole, known = x.to(device), hole.to(device), known.to(device)
    fill = (x * known).sum((2, 3), keepdim=True) / known.sum((2, 3), keepdim=True).clamp(min=1)
    current = x * known + fill * hole
    model.eval()
    steps = progress_bar(range(iterations), desc="inpainting", unit="step", disable=not progress)
    if method == "clamp":
        with torch.no_grad():
            for _ in steps:
                mean, _ = model.decode(model.encode(current)[0])
                current = x * known + mean * hole
    else:
        with torch.no_grad():
            z0 = model.encode(current)[0]
        z = z0.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([z], lr=learning_rate)
        for _ in steps:
            mean, logvar = model.decode(z)
            nll = (gaussian_nll(x, mean, logvar) * known).flatten(1).sum(1)
            loss = (nll + 0.5 * (z**2).sum(1)).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.zero_grad(set_to_none=True)  # leave no gradients on the model's weights
        with torch.no_grad():
            mean, _ = model.decode(z)
            current = x * known + mean * hole
    return current.detach().cpu().numpy()
