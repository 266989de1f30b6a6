"""Detectors to and from checkpoint files: the state a fitted detector saves, and back.

Through the one checkpoint writer and reader (:mod:`anomalyvae.models.checkpoint`);
the model itself is rebuilt by its family, with that family's migrations.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from anomalyvae import calibration as cal
from anomalyvae.imaging.preprocessing import Preprocessing
from anomalyvae.models.checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from anomalyvae.models.families import get_family
from anomalyvae.models.maps import MapStats, ScoringConfig

if TYPE_CHECKING:
    from anomalyvae.detector import VAEAnomalyDetector


def write_detector(detector: VAEAnomalyDetector, path: Path) -> Path:
    """Write a fitted detector to ``path`` (atomically); see ``VAEAnomalyDetector.save``."""
    # Resume state (optimizer, last weights, RNG) stays only while training could go
    # on: unfinished, or cut by the epoch or time limit. A converged model drops it.
    summary = dict(getattr(detector, "training_summary_", {}))
    resume = getattr(detector, "resume_state_", None)
    if summary.get("stopped_reason") not in ("in_progress", "max_epochs", "time_budget"):
        resume = None
    history = list(getattr(detector, "history_", []))
    summary.setdefault("best_val_elbo", best_val(history))
    write_checkpoint(
        path,
        detector.family_,
        detector.model_.config.to_dict(),
        {k: v.detach().cpu() for k, v in detector.model_.state_dict().items()},
        {**summary, "history": history},
        **(resume or {}),
        calibration=detector.calibration_state(),
        calibration_scores=(
            torch.from_numpy(np.asarray(detector.calibration_scores_, dtype=np.float64))
            if getattr(detector, "calibration_scores_", None) is not None
            else None
        ),
        map_stats=detector.map_stats_.to_dict() if getattr(detector, "map_stats_", None) else None,
        params=plain(detector.get_params()),
        normal_intensity=getattr(detector, "normal_intensity_", None),
        self_check=getattr(detector, "self_check_", None),
        view_separation=getattr(detector, "view_separation_", None),
        image_unexplained=getattr(detector, "image_unexplained_", None),
        **detector.checkpoint_extra(),
    )
    return path


def read_detector(
    cls: type[VAEAnomalyDetector], path: Path, device: str, progress: bool
) -> VAEAnomalyDetector:
    """A detector of class ``cls`` from a checkpoint; see ``VAEAnomalyDetector.load``."""
    state = read_checkpoint(path)
    try:
        params = dict(state["params"])
        params.update(device=device, progress=progress, checkpoint_path=None)
        params["hidden_channels"] = tuple(params.get("hidden_channels", (32, 64, 128, 256)))
        detector = cls(**params)
        family = state["model_family"]
        model = get_family(family).model_from_state(
            state["model_config"], dict(state["model_state"])
        )
        detector.family_ = family
        detector.model_ = model.eval()
        detector.preprocessing_ = Preprocessing.from_dict(state["preprocessing"])
        detector.scoring_ = ScoringConfig.from_dict(state["scoring"])
        if state.get("map_stats"):
            detector.map_stats_ = MapStats.from_dict(state["map_stats"])
        detector.data_summary_ = state["data"]
        if state.get("resume"):  # training can go on from this file
            detector.resume_state_ = {
                "train_config": state.get("train_config"),
                "resume": state["resume"],
            }
        if state.get("self_check"):
            detector.self_check_ = dict(state["self_check"])
        if state.get("view_separation"):
            detector.view_separation_ = dict(state["view_separation"])
        if state.get("image_unexplained") is not None:
            detector.image_unexplained_ = float(state["image_unexplained"])
        if state.get("normal_intensity"):
            detector.normal_intensity_ = dict(state["normal_intensity"])
        training = dict(state.get("training") or {})
        detector.history_ = list(training.pop("history", []))
        detector.training_summary_ = training
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(
            f"checkpoint '{path}' is incomplete or does not match this anomalyvae "
            f"version ({type(error).__name__}: {error})"
        ) from error
    calibration = state.get("calibration")
    if calibration:
        detector.calibration_ = cal.Threshold.from_dict(calibration["image"])
        detector.pixel_calibration_ = cal.Threshold.from_dict(calibration["pixel"])
        detector.threshold_ = detector.calibration_.value
        detector.pixel_threshold_ = detector.pixel_calibration_.value
        detector.offset_ = -detector.threshold_
        scores = state.get("calibration_scores")
        detector.calibration_scores_ = None if scores is None else scores.numpy()
    elif state.get("training", {}).get("stopped_reason") == "in_progress":
        warnings.warn(
            f"checkpoint '{path}' is from an unfinished training run and has no "
            "threshold; call calibrate() or finish training with resume",
            UserWarning,
            stacklevel=2,
        )
    return detector


def plain(params: dict[str, Any]) -> dict[str, Any]:
    """Parameters as types ``torch.load(weights_only=True)`` accepts."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if isinstance(value, tuple):
            value = list(value)
        out[key] = value
    return out


def best_val(history: list[dict[str, float]]) -> float:
    """The lowest validation ELBO of a training history (NaN without one)."""
    return min((h["val_elbo"] for h in history), default=float("nan"))
