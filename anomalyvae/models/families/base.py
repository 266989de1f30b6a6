"""What a model family is: the one interface the detector, export and scan ask of it.

A family owns everything that differs between kinds of model: how its input is sized,
how it resolves the "auto" scoring options and which it refuses, how it trains, how it
rebuilds a model from a checkpoint (with the migrations of its older formats), which
candidate views it scores and how it fuses them, and what export needs to know. The
detector orchestrates (load images, split, train, fit constants, calibrate, save) and
never branches on which family it holds. A new family is one module that subclasses
:class:`ModelFamily`, plus :func:`anomalyvae.models.families.register_family`.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import numpy as np
from numpy.typing import NDArray
from torch import Tensor, nn

from anomalyvae.imaging.preprocessing import Preprocessing
from anomalyvae.models.maps import MapStats, ScoreResult, ScoringConfig

if TYPE_CHECKING:
    from anomalyvae.detector import VAEAnomalyDetector
    from anomalyvae.models.train import TrainConfig


def input_bytes(spec: Preprocessing) -> int:
    """Bytes of one model-input image (float32)."""
    return 4 * spec.channels * spec.height * spec.width


class Trained(NamedTuple):
    """What :meth:`ModelFamily.train` returns: the model and how training went."""

    model: nn.Module
    history: list[dict[str, float]]
    best_epoch: int
    stopped_reason: str
    elapsed_s: float
    world_size: int
    #: views (n_train, k) of the training normals as if each were held out
    #: (cross-fitted), so that they too set the fusion constants and calibrate; None
    #: when the family cannot give them
    train_views: NDArray[np.float64] | None = None
    #: ``train_config`` and ``resume`` of the last epoch, for a checkpoint from which
    #: training can go on (the pixel VAE's ``--resume``); None when it cannot
    resume_state: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        """How training went, as the detector's ``training_summary_`` keeps it."""
        return {
            "best_epoch": self.best_epoch,
            "stopped_reason": self.stopped_reason,
            "elapsed_s": self.elapsed_s,
            "epochs_run": len(self.history),
            "world_size": self.world_size,
        }


class ModelFamily(abc.ABC):
    """One model family. Subclasses set the class attributes and the abstract methods.

    Attributes
    ----------
    name : str
        The family's name in checkpoints, ONNX metadata and ``--model``.
    view_names : tuple of str
        The candidate image scores of :meth:`view_scoring`, in column order.
    generative : bool
        Whether the model decodes pixels (sampling, denoising, inpainting, embeddings,
        and scoring with a ``valid_mask``, which inpaints the invalid pixels).
    export_precisions : tuple of str
        The ONNX precisions the graph exports in ("fp32", "fp16", "int8").
    map_kinds, score_kinds : tuple of str
        The ``ScoringConfig.map_kind`` and ``score_kind`` values it can be asked for.
    per_pixel_stats : bool
        Whether its maps can be standardized against per-pixel statistics of the
        training normals (``standardize``, :meth:`VAEAnomalyDetector.fit_map_stats`);
        False for a position-independent family.
    reads_stored_levels : bool
        Whether the model reads the stored grey levels as they are (so that dim files,
        which use a sliver of their range, reach it nearly black); False for a family
        that gives every image one mean and contrast first.
    """

    name: ClassVar[str]
    view_names: ClassVar[tuple[str, ...]]
    generative: ClassVar[bool] = False
    export_precisions: ClassVar[tuple[str, ...]] = ("fp32",)
    map_kinds: ClassVar[tuple[str, ...]] = ()
    score_kinds: ClassVar[tuple[str, ...]] = ()
    per_pixel_stats: ClassVar[bool] = False
    reads_stored_levels: ClassVar[bool] = True

    def describe_map(self, model: nn.Module, scoring: ScoringConfig) -> str:
        """The anomaly map in words, for report headers (e.g. "z-nll")."""
        return f"{'z-' if scoring.standardize else ''}{scoring.map_kind}"

    @abc.abstractmethod
    def score(
        self,
        model: nn.Module,
        x: Tensor,
        config: ScoringConfig,
        stats: MapStats | None,
        valid: Tensor | None,
    ) -> ScoreResult:
        """Maps, scores and views of a batch of model-ready images (n, c, h, w).

        :func:`anomalyvae.models.scoring.score_batch` calls it in no_grad, after
        :meth:`check_scoring`; :class:`~anomalyvae.models.scoring.ScoringGraph` traces it
        for ONNX. ``stats``: the per-pixel normal statistics when ``config.standardize``;
        ``valid`` (n, h, w) bool restricts the scores to the valid pixels (a family that
        cannot do so raises a clear error).
        """

    def input_sizing(self) -> dict[str, Any] | None:
        """How the model input is sized from training files (None: the generic way).

        Keyword arguments of :func:`anomalyvae.training_data.infer_preprocessing`.
        """
        return None

    def training_bytes_per_image(self, detector: VAEAnomalyDetector, spec: Preprocessing) -> float:
        """Memory that training holds per normal image of input ``spec``, in bytes.

        ``detector`` carries the options that size the model (the feature model's backbone).

        The default: the model input and one working copy of it. :mod:`anomalyvae.capacity`
        caps the number of normals read with it.
        """
        return 2.0 * input_bytes(spec)

    def training_seconds_per_image(
        self, detector: VAEAnomalyDetector, spec: Preprocessing
    ) -> float | None:
        """Seconds each normal costs outside the epochs on this machine, or None.

        None (the default): the epochs take the time, and they stop at the budget.
        """
        return None

    @abc.abstractmethod
    def resolve_scoring(self, detector: VAEAnomalyDetector, spec: Preprocessing) -> ScoringConfig:
        """The scoring the detector's (possibly "auto") options resolve to."""

    @abc.abstractmethod
    def check_scoring(self, config: ScoringConfig) -> None:
        """A clear ValueError when ``config`` asks for a score this family cannot give."""

    @abc.abstractmethod
    def train(
        self,
        detector: VAEAnomalyDetector,
        train_images: NDArray[np.float32],
        val_images: NDArray[np.float32],
        train_config: TrainConfig,
        resume: bool,
    ) -> Trained:
        """Train a model on normal model-ready images (n, c, h, w)."""

    @abc.abstractmethod
    def model_from_state(self, config: dict[str, Any], state: dict[str, Any]) -> nn.Module:
        """Rebuild a model from a checkpoint's config and state, migrating older formats."""

    def needs_fusion(self, scoring: ScoringConfig) -> bool:
        """Whether ``fit`` fits fusion constants (:meth:`fit_fusion`) for ``scoring``."""
        return True

    @abc.abstractmethod
    def fit_fusion(
        self,
        detector: VAEAnomalyDetector,
        images: NDArray[np.float32],
        extra_views: NDArray[np.float64] | None = None,
    ) -> None:
        """Fit how the views become z-scores, from normal model-ready images.

        ``extra_views`` (m, k): views of more normals (cross-fitted training normals;
        NaN where a view is missing) that the constants are fitted on too.
        """

    def view_scoring(self, scoring: ScoringConfig) -> ScoringConfig:
        """The scoring under which the views are read (they never need fusion constants)."""
        return scoring

    @abc.abstractmethod
    def fuse(
        self, detector: VAEAnomalyDetector, views: NDArray[np.float64]
    ) -> NDArray[np.float64] | None:
        """The fused score of (n, k) views, as the graph computes it (None: not fitted)."""

    def fusion(self, detector: VAEAnomalyDetector) -> dict[str, Any] | None:
        """How the fused image score weighs the views (train summary, ONNX metadata).

        None when the family has nothing to say (its score is not a weighted fusion).
        """
        return None

    def tiling(self, model: nn.Module) -> dict[str, Any]:
        """How the graph covers its input (ONNX metadata); one pass by default."""
        return {"n_tiles": 1, "inside_graph": True}
