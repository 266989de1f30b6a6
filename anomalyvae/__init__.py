"""anomalyvae: variational-autoencoder anomaly detection for medical and industrial images."""

from __future__ import annotations

from anomalyvae import clock as _clock  # noqa: F401 - starts the command clock
from anomalyvae.version import __version__

__all__ = ["__version__", "VAEAnomalyDetector"]


def __getattr__(name: str):
    # Lazy so that `import anomalyvae.inference.runtime` (the ONNX path) never pulls in torch.
    if name == "VAEAnomalyDetector":
        from anomalyvae.detector import VAEAnomalyDetector

        return VAEAnomalyDetector
    raise AttributeError(f"module 'anomalyvae' has no attribute {name!r}")
