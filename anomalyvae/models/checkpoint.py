"""Checkpoints: the one writer and the one reader of the ``.pt`` format.

Every checkpoint is a dict of tensors and plain Python values, so it loads with
``torch.load(weights_only=True)``: no code runs from the file. :func:`write_checkpoint`
assembles it (header, model, training, and whatever the detector adds); training writes
one after every epoch, the detector when it is fitted. :func:`read_checkpoint` checks
the format and migrates older files in one place (:func:`migrate`); a model family
rebuilds its model from the result, with its own migrations
(:meth:`anomalyvae.models.families.ModelFamily.model_from_state`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomalyvae.errors import AnomalyVAEError
from anomalyvae.imaging.files import atomic_path
from anomalyvae.version import __version__

CHECKPOINT_FORMAT = "anomalyvae-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(AnomalyVAEError, ValueError):
    """A checkpoint is missing, corrupt, foreign or from an incompatible version."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write a checkpoint atomically: temp file in the same folder, fsync, rename."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint without executing code (``weights_only=True``) and check its format."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a bad file
        if path.suffix.lower() == ".onnx" or _looks_like_onnx(path):
            raise CheckpointError(
                f"'{path}' is an exported ONNX model; this command needs the training "
                "checkpoint (.pt) that `anomalyvae train` wrote. ONNX models are for "
                "`anomalyvae scan` and `anomalyvae predict`"
            ) from None
        # torch's own message suggests weights_only=False, which would run code from the
        # file: never pass that advice on
        raise CheckpointError(
            f"'{path}' is not a readable anomalyvae checkpoint ({type(error).__name__}); "
            "retrain, or point to the .pt file `anomalyvae train` wrote. Checkpoints are "
            "loaded without running code, so a file that needs more is refused"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"'{path}' is not an anomalyvae checkpoint (no '{CHECKPOINT_FORMAT}' marker)"
        )
    if int(state.get("format_version", -1)) > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"'{path}' has checkpoint format {state['format_version']}, newer than this "
            f"anomalyvae ({__version__}) reads; upgrade anomalyvae"
        )
    return state


def _looks_like_onnx(path: Path) -> bool:
    """An ONNX file is a protobuf that names its producer near the start."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(256)
    except OSError:
        return False
    return not head.startswith(b"PK") and (b"anomalyvae" in head or b"pytorch" in head)


def checkpoint_header(model_family: str = "pixel") -> dict[str, Any]:
    """The entries every checkpoint starts with, training's and the detector's alike.

    They are the format marker and version, the model family and the library versions.
    The rest of the schema: ``model_config``, ``model_state`` and ``training`` always;
    ``resume`` and ``train_config`` while training can go on; ``preprocessing``,
    ``scoring``, ``data``, ``calibration``, ``map_stats``, ``params``,
    ``normal_intensity`` and ``self_check`` once the detector is fitted. Every value is
    a tensor or a plain Python type, so it loads with ``weights_only=True``.
    """
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "model_family": model_family,
        "versions": versions(),
    }


def versions() -> dict[str, str]:
    """Versions recorded in every checkpoint."""
    return {
        "anomalyvae": __version__,
        "torch": str(torch.__version__),
        "numpy": str(np.__version__),
        "python": sys.version.split()[0],
    }


def write_checkpoint(
    path: str | os.PathLike[str],
    family: str,
    model_config: dict[str, Any],
    model_state: dict[str, Any],
    training: dict[str, Any],
    **entries: Any,
) -> None:
    """The one writer: the header, the model, its training and the detector's entries.

    ``entries`` are the rest of the schema (:func:`checkpoint_header` lists it), e.g.
    ``resume`` and ``train_config`` while training can go on, ``calibration``,
    ``preprocessing``, ``scoring``. Written atomically.
    """
    state = {
        **checkpoint_header(family),
        "model_config": model_config,
        "model_state": model_state,
        "training": training,
        **entries,
    }
    save_checkpoint(state, path)


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The one reader: load without running code, check the format, migrate old files."""
    return migrate(load_checkpoint(path))


def migrate(state: dict[str, Any]) -> dict[str, Any]:
    """Bring an older checkpoint's entries to the current schema (format version 1).

    - no ``model_family``: written before the feature model existed, so "pixel";
    - no ``params``, ``data``, ``training``: empty (older detectors and bare training
      checkpoints);
    - no ``calibration``: None (an unfinished training run).
    Model-specific migrations (an older feature model's views) belong to the family.
    """
    state = dict(state)
    state.setdefault("model_family", "pixel")
    state["params"] = dict(state.get("params") or {})
    state["data"] = dict(state.get("data") or {})
    state["training"] = dict(state.get("training") or {})
    state.setdefault("calibration", None)
    return state
