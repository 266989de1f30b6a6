"""What ``fit`` trains on: training files probed, sized and read within the cap.

A sample of the files is probed (shape, channels, decode time), the model input is sized
from it, and the normals are read as that input, up to the capacity's cap; an array of
images is checked and converted instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from anomalyvae.capacity import Capacity
from anomalyvae.data import DatasetError
from anomalyvae.errors import InvalidValueError
from anomalyvae.imaging.batch import read_images
from anomalyvae.imaging.io import DecodedImage, ImageReadError, read_image
from anomalyvae.imaging.medical import is_nifti
from anomalyvae.imaging.preprocessing import Preprocessing, is_grayscale, preprocess
from anomalyvae.imaging.volumes import read_volume


def file_list_hash(paths: Sequence[str | os.PathLike[str]]) -> str:
    """A short SHA-256 of the sorted file names: which data a model was trained on."""
    digest = hashlib.sha256()
    for name in sorted(Path(p).as_posix() for p in paths):
        digest.update(name.encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()[:16]


class SourceProbe(NamedTuple):
    """What a sample of the training files looks like before preprocessing."""

    #: each readable probed file's shorter side, in pixels (a volume's slices')
    short_sides: list[int]
    #: each one's width / height
    aspects: list[float]
    #: whether any of them carries real colour
    colour: bool
    #: seconds each probed file took to decode, on average
    seconds_per_file: float = 0.0
    #: images each probed file holds, on average (a volume's slices, background too)
    images_per_file: float = 1.0
    #: the brightest stored value of the probed 8- and 16-bit files, in the files' own
    #: units (None: no such file)
    brightest_stored: float | None = None
    #: one of those files, to name in a message about them
    example_file: str = ""

    def summary(self) -> dict[str, Any]:
        """The shapes' ranges, as the model keeps them (``training_data.source_shape``).

        The scan compares each file with them: an image shaped or sized unlike every
        training image is stretched or blown up to the model input, which alone moves its
        score (:func:`anomalyvae.inference.summary.shape_warnings`).
        """
        return {
            "aspect": [round(min(self.aspects), 4), round(max(self.aspects), 4)],
            "short_side": [int(min(self.short_sides)), int(max(self.short_sides))],
            "n_probed": len(self.aspects),
        }


def probe_sources(paths: Sequence[str | os.PathLike[str]], n_probe: int = 64) -> SourceProbe:
    """Shapes and colour of up to ``n_probe`` training files (a seeded sample).

    Unreadable files are passed over (they are reported when the images are loaded);
    none readable is an error.
    """
    if not paths:
        raise DatasetError("no training images given")
    rng = np.random.default_rng(0)
    probe = [paths[i] for i in sorted(rng.permutation(len(paths))[:n_probe])]
    shapes, aspects, colour = [], [], False
    first_error: ImageReadError | None = None
    started, frames = time.perf_counter(), []
    brightest, example = None, ""  # of the 8- and 16-bit files (few_levels_note)
    for path in probe:
        try:
            if is_nifti(path):  # a volume: judge its slices
                data = read_volume(path).data
                shapes.append(min(data.shape[1], data.shape[2]))
                aspects.append(data.shape[2] / data.shape[1])
                frames.append(data.shape[0])
                continue
            decoded = read_image(path)
        except ImageReadError as error:
            first_error = first_error or error
            continue  # reported when the training images are loaded
        shapes.append(min(decoded.height, decoded.width))
        aspects.append(decoded.width / decoded.height)
        colour = colour or not is_grayscale(decoded.pixels)
        frames.append(1)
        top = _brightest_stored(decoded)
        if top is not None:
            brightest = top if brightest is None else max(brightest, top)
            example = example or str(path)
    if not shapes:
        raise DatasetError(
            f"none of the {len(probe)} probed training files could be read; the first: "
            f"{first_error}"
        )
    seconds = (time.perf_counter() - started) / len(probe)
    mean_frames = float(np.mean(frames))
    return SourceProbe(shapes, aspects, colour, seconds, mean_frames, brightest, example)


def _brightest_stored(decoded: DecodedImage) -> float | None:
    """The brightest value an 8- or 16-bit file stores, else None.

    None also for a file shown dark-for-high: its stored values are turned round.
    """
    if decoded.inverted:
        return None
    if decoded.bit_depth == 8:
        return float(decoded.pixels.max()) * 255.0
    if decoded.bit_depth == 16 and decoded.raw is not None:
        return float(decoded.raw.max())
    return None


#: Files whose brightest stored value is at most this hold a silhouette of a few levels.
FEW_LEVELS_MAX = 3


def few_levels_note(probe: SourceProbe) -> str | None:
    """Plain words when the probed training files store only their darkest levels.

    Stored values of at most :data:`FEW_LEVELS_MAX` in every file are the mark of images in
    [0, 1] written to integer files without scaling (by 255, or 65535): what is left is a
    silhouette of two or three grey levels, whatever the model or normalization. Dim data
    (12-bit values in 16-bit files) stores far more levels and gets no word. None
    without 8- or 16-bit files.
    """
    if probe.brightest_stored is None:
        return None
    top = round(probe.brightest_stored)
    if top > FEW_LEVELS_MAX:
        return None
    return (
        f"every probed training file holds at most {top + 1} grey levels (the brightest "
        f"stored value is {top}; e.g. '{probe.example_file}'): images in [0, 1] written to "
        "8- or 16-bit files without scaling by 255 or 65535 keep only a silhouette of "
        "themselves. Write them scaled to the file's full range and train again; the "
        "model learns only what the files hold"
    )


def infer_preprocessing(
    paths: Sequence[str | os.PathLike[str]],
    channels: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    multiple: int = 16,
    max_size: int = 128,
    n_probe: int = 64,
    keep_aspect: bool = False,
    max_aspect: float = 3.0,
    probe: SourceProbe | None = None,
) -> Preprocessing:
    """Choose channels and model input size from the training files themselves.

    Channels: 3 only if some probed image carries real colour. Size: the median short
    side, rounded down to a multiple of ``multiple`` (the network's stride), within
    [32, ``max_size``]; small images are not blown up beyond the next multiple. With
    ``keep_aspect`` the long side follows the images' median aspect ratio (up to
    ``max_aspect`` : 1), so elongated images are not squashed: a 500 x 1250 crack
    image becomes 256 x 640, not 256 x 256. ``probe``: the files' :func:`probe_sources`,
    when already taken (else ``n_probe`` of them are read).
    """
    if probe is None:
        probe = probe_sources(paths, n_probe)
    shapes, aspects, colour = probe.short_sides, probe.aspects, probe.colour
    if channels is None:
        channels = 3 if colour else 1
    if image_size is None:
        side = int(np.median(shapes))
        size = max(32, min(max_size, (side // multiple) * multiple or multiple))
        if side < size:  # small images: the smallest multiple that holds them
            size = max(32, -(-side // multiple) * multiple)
        height = width = size
        aspect = float(np.median(aspects))
        if keep_aspect and max(aspect, 1 / aspect) >= 1.25:  # near-square stays square
            ratio = min(max(aspect, 1 / aspect), max_aspect)
            long = max(size, int(round(size * ratio / multiple)) * multiple)
            height, width = (size, long) if aspect > 1 else (long, size)
    elif isinstance(image_size, int):
        height = width = image_size
    else:
        height, width = image_size
    return Preprocessing(channels=channels, height=height, width=width)


def infer_model_input(
    paths: Sequence[str | os.PathLike[str]],
    model: str,
    channels: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    probe: SourceProbe | None = None,
) -> Preprocessing:
    """The model input for training files and a model family name (or "auto").

    A family may size its input its own way (the feature model: up to 512 px, aspect
    kept, :meth:`~anomalyvae.models.families.base.ModelFamily.input_sizing`); it does
    when the input so sized resolves to it. Otherwise :func:`infer_preprocessing`'s
    defaults hold. ``probe``: the files' :func:`probe_sources`, when already taken.
    """
    from anomalyvae.models.families import family_names, get_family, resolve_family

    if probe is None:  # read once for every candidate sizing
        probe = probe_sources(paths)
    inferred = infer_preprocessing(paths, channels, image_size, probe=probe)
    candidates = family_names()[1:] if model == "auto" else (model,)
    for name in candidates:
        sizing = get_family(name).input_sizing()
        if sizing is None:
            continue
        sized = infer_preprocessing(paths, channels, image_size, probe=probe, **sizing)
        if resolve_family(model, sized.height, sized.width) == name:
            return sized
    return inferred


#: The detector's intensity-normalization parameters, as Preprocessing fields.
INTENSITY_PARAMS = (
    "normalization",
    "window_center",
    "window_width",
    "percentile_low",
    "percentile_high",
)


#: What decides how many normals one training run reads: the model input and the seconds
#: a file takes to decode (0 for arrays) -> the cap (``VAEAnomalyDetector.training_capacity``).
CapacityRule = Callable[[Preprocessing, float], Capacity]


class TrainingImages(NamedTuple):
    """What :func:`training_images` returns."""

    preprocessing: Preprocessing
    #: (n, c, h, w) model input
    images: NDArray[np.float32]
    #: the file of each image
    names: list[str]
    n_skipped: int
    #: the probed files' shapes (:meth:`SourceProbe.summary`); None for arrays
    source_shape: dict[str, Any] | None
    #: the files (or array rows) given, and the cap on images read when it cut the set
    n_given: int = 0
    capacity: Capacity | None = None

    def data_summary(self, n_train: int, n_val: int) -> dict[str, Any]:
        """What a model records of its training data (``data_summary_``)."""
        summary: dict[str, Any] = {
            "n_train": int(n_train),
            "n_val": int(n_val),
            "n_skipped": int(self.n_skipped),
            "file_list_hash": file_list_hash(self.names) if self.names else "",
        }
        if self.source_shape is not None:  # the scan warns of files shaped unlike these
            summary["source_shape"] = self.source_shape
        if self.capacity is not None:  # a budget cut the set: what was given, and why (capacity.py)
            summary["n_given"] = int(self.n_given)
            summary["capacity"] = self.capacity.to_dict()
        return summary


#: How a set cut by a budget was chosen, as :func:`capacity_note` says it.
RANDOM_CHOICE = "a seeded random choice, the same on every run"


def capacity_note(
    n_read: int, n_given: int, unit: str, capacity: Capacity, n_images: int, choice: str
) -> str:
    """The warning of a set cut by a budget: how much of it is read, how chosen, why."""
    return (
        f"training reads {n_read} of the {n_given} normal {unit} given ({choice}): "
        f"{capacity.reason(n_images)}"
    )


def training_images(
    paths: Sequence[str | os.PathLike[str]],
    params: Mapping[str, Any],
    capacity: CapacityRule | None = None,
) -> TrainingImages:
    """Training files read as model input: the input chosen, images, names kept, skipped.

    ``params`` are the detector's (``model``, ``channels``, ``image_size``, ``seed`` and
    the intensity normalization's). Unreadable files are skipped with a warning naming
    them. ``capacity``: when the files would give more images than it allows, a seeded
    random choice of them is read, with a warning that says so.
    """
    paths = [Path(p) for p in paths]
    probe = probe_sources(paths)
    few_levels = few_levels_note(probe)
    if few_levels:
        warnings.warn(few_levels, UserWarning, stacklevel=2)
    inferred = infer_model_input(
        paths, params["model"], params["channels"], params["image_size"], probe=probe
    )
    spec = dataclasses.replace(inferred, **{k: params[k] for k in INTENSITY_PARAMS})
    cap = capacity(spec, probe.seconds_per_file) if capacity is not None else None
    order, max_images = paths, None
    expected = len(paths) * probe.images_per_file
    if cap is not None:
        max_images = cap.max_images  # a hard stop, also where the probe saw too few frames
        if expected > cap.max_images:  # read in a seeded random order, up to the cap
            rng = np.random.default_rng(params.get("seed", 0))
            order = [paths[i] for i in rng.permutation(len(paths))]
    images, kept, errors = read_images(
        order, spec, on_error="warn", max_images=max_images, progress=params.get("progress", False)
    )
    if not kept:
        raise DatasetError(f"none of the {len(paths)} training files could be read")
    cut = None  # the cap, when it cut the set (a set of exactly the cap is read whole)
    if cap is not None and len(images) >= cap.max_images:
        n_read = len(set(kept)) + len(errors)
        if n_read < len(paths) or expected > cap.max_images:
            cut = cap
            unit = "files" if probe.images_per_file == 1 else "files (their slices)"
            # the probe can miss a file's frames: then the stop came in the given order
            choice = RANDOM_CHOICE if order is not paths else "the first, in the given order"
            warnings.warn(
                capacity_note(n_read, len(paths), unit, cap, round(expected), choice),
                UserWarning,
                stacklevel=2,
            )
    return TrainingImages(
        spec,
        images,
        [p.as_posix() for p in kept],
        len(errors),
        probe.summary(),
        len(paths),
        cut,
    )


def training_input(
    X: NDArray[np.floating] | Sequence[str | os.PathLike[str]],
    params: Mapping[str, Any],
    capacity: CapacityRule | None = None,
) -> TrainingImages:
    """What ``fit`` trains on, checked to hold at least two normals that differ.

    ``X``: an array (shaped by the ``channels`` and ``image_size`` of ``params``) or files
    (:func:`training_images`). ``capacity``: the cap on the images read (for an array, a
    seeded random choice of its rows is kept).
    """
    if isinstance(X, np.ndarray):
        spec, images = array_input(X, params["channels"], params["image_size"])
        cap = capacity(spec, 0.0) if capacity is not None else None
        if cap is not None and len(images) <= cap.max_images:
            cap = None  # read whole: no cut to record
        if cap is not None:
            rng = np.random.default_rng(params.get("seed", 0))
            rows = np.sort(rng.permutation(len(images))[: cap.max_images])
            warnings.warn(
                capacity_note(
                    cap.max_images, len(images), "images", cap, len(images), RANDOM_CHOICE
                ),
                UserWarning,
                stacklevel=2,
            )
            images = images[rows]
        # arrays carry no file shape
        loaded = TrainingImages(spec, images, [], 0, None, len(X), cap)
    else:
        loaded = training_images(X, params, capacity)
    images = loaded.images
    if len(images) < 2:
        raise DatasetError(f"need at least 2 readable normal images to train, got {len(images)}")
    # identical normals carry no variation to learn or calibrate on: every spread is
    # zero, so the map statistics and z-scores would divide by nothing (the first
    # differing image ends the check, so a real set costs one comparison)
    if all(np.array_equal(image, images[0]) for image in images[1:]):
        raise DatasetError(
            f"all {len(images)} readable training images are identical after "
            "preprocessing: a model of normal variation needs normal images that vary "
            "(other parts, positions, lighting); check that the folder holds the real "
            "images and not copies of one"
        )
    return loaded


#: Below this 99.5th-percentile grey level (of full scale) training images count as dim.
DIM_INPUT_LEVEL = 0.1


def dim_input_note(images: NDArray[np.floating], sample: int = 64) -> str | None:
    """Plain words when training images use a sliver of their range, else None.

    The feature model stretches every image to one contrast and is not affected; the
    pixel model reads the stored levels, so files in a few grey levels (or 12-bit data in
    16-bit files) reach it nearly black. Read from a sample of at most ``sample`` images.
    """
    if not len(images):
        return None
    picked = np.linspace(0, len(images) - 1, min(sample, len(images))).astype(int)
    level = float(np.percentile(np.asarray(images[picked], dtype=np.float32), 99.5))
    if level >= DIM_INPUT_LEVEL:
        return None
    return (
        f"the training images are dim: 99.5 % of their pixels are below {level:.4f} of full "
        "scale (files that use a sliver of their range, such as 12-bit data in 16-bit "
        "files). The pixel model reads these levels as they are; pass --normalization "
        "percentile (each image stretched to its own 1-99 % levels) so that it sees the "
        "images' contrast"
    )


def size_pair(size: int | tuple[int, int]) -> tuple[int, int]:
    """``image_size`` as (height, width): an int is a square."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def as_nchw(X: NDArray[np.floating]) -> NDArray[np.float32]:
    """An array of images as float32 (n, c, h, w) in [0, 1], or a clear error."""
    if X.ndim == 3:
        X = X[:, None]
    if X.ndim != 4:
        raise InvalidValueError(f"images must have shape (n, c, h, w) or (n, h, w), got {X.shape}")
    if not np.issubdtype(X.dtype, np.floating):
        raise InvalidValueError(
            f"image arrays must be float in [0, 1], got dtype {X.dtype}; divide integer "
            "images by their maximum (255 or 65535) first"
        )
    X = X.astype(np.float32, copy=False)
    if not np.isfinite(X).all():
        raise InvalidValueError("images contain NaN or infinite values")
    if X.size and (X.min() < -1e-6 or X.max() > 1 + 1e-6):
        raise InvalidValueError(
            f"image values must be in [0, 1], got [{X.min():.3g}, {X.max():.3g}]"
        )
    return np.ascontiguousarray(X)


def to_model_input(images: NDArray[np.float32], spec: Preprocessing) -> NDArray[np.float32]:
    """Images (n, c, h, w) in [0, 1] resized and converted to ``spec``'s model input."""
    if images.shape[1:] == (spec.channels, spec.height, spec.width):
        return images
    if images.shape[1] not in (1, 3):
        raise InvalidValueError(f"images must have 1 or 3 channels, got {images.shape[1]}")
    return np.stack([preprocess(image.transpose(1, 2, 0), spec) for image in images])


def array_input(
    X: NDArray[np.floating], channels: int | None, image_size: int | tuple[int, int] | None
) -> tuple[Preprocessing, NDArray[np.float32]]:
    """The model input an array of training images defines, and the images as that input.

    The array's own size, or ``image_size`` when given; ``channels`` must match it.
    """
    images = as_nchw(X)
    spec = Preprocessing(images.shape[1], images.shape[2], images.shape[3])
    if channels is not None and channels != spec.channels:
        raise InvalidValueError(f"channels={channels} but X has {spec.channels} channels")
    if image_size is not None:
        spec = Preprocessing(spec.channels, *size_pair(image_size))
        images = to_model_input(images, spec)
    return spec, images
