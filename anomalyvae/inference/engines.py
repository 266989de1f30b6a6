"""Scan with the engine a :class:`~anomalyvae.inference.scan.ScanConfig` names.

:func:`anomalyvae.inference.scan.scan` only knows the local engine (a decoding pool
feeding ONNX Runtime in this process); this module is where another engine is chosen,
so that the scan never imports Ray.
"""

from __future__ import annotations

import os

from anomalyvae.inference.scan import ScanConfig, ScanSummary, scan


def run_scan(
    model: str | os.PathLike[str],
    folder: str | os.PathLike[str],
    output: str | os.PathLike[str],
    config: ScanConfig = ScanConfig(),  # noqa: B008 - frozen, so sharing is safe
    progress: bool = True,
) -> ScanSummary:
    """:func:`~anomalyvae.inference.scan.scan` on ``config.engine``: "local" or "ray".

    For Ray, the cluster at ``config.address`` is checked before any work, so that a
    bad address is one clear error instead of a half-started scan.
    """
    runner = None
    if config.engine == "ray":
        from anomalyvae.inference.ray_engine import check_ray, scan_on_ray

        check_ray(config.address)
        runner = scan_on_ray
    return scan(model, folder, output, config, progress=progress, engine=runner)
