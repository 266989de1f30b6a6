"""Dataset layouts (MVTec-style, flat folder, split file) and a synthetic defect generator."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from anomalyvae.capacity import Capacity
from anomalyvae.errors import AnomalyVAEError, InvalidValueError
from anomalyvae.imaging.batch import read_images
from anomalyvae.imaging.files import IMAGE_EXTENSIONS, describe_others, find_images, walk_images
from anomalyvae.imaging.io import ImageReadError, read_image
from anomalyvae.imaging.medical import is_nifti
from anomalyvae.imaging.preprocessing import Preprocessing, is_grayscale, preprocess
from anomalyvae.imaging.volumes import read_volume

NORMAL_TYPE = "good"


class Sample(NamedTuple):
    """One image of a dataset: ``label`` 0 = normal, 1 = anomalous."""

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None = None


class DatasetError(AnomalyVAEError, ValueError):
    """A dataset folder or split file is missing, empty or malformed."""


def _mask_for(image: Path, ground_truth: Path | None, defect_type: str) -> Path | None:
    if ground_truth is None:
        return None
    folder = ground_truth / defect_type
    if is_nifti(image):  # a volume's mask is a volume: ct01.nii.gz -> ct01_mask.nii.gz
        base = image.name[: -len(".nii.gz")] if image.name.endswith(".nii.gz") else image.stem
        names = [f"{base}_mask{ext}" for ext in (".nii.gz", ".nii")] + [image.name]
    else:
        names = [f"{image.stem}_mask.png", f"{image.stem}.png"]
    for candidate in (folder / name for name in names):
        if candidate.exists():
            return candidate
    return None


def mvtec_samples(root: str | os.PathLike[str], subset: str) -> list[Sample]:
    """List an MVTec-style folder: ``train/good``, ``test/<type>``, ``ground_truth/<type>``.

    ``subset`` is "train" (normal images only) or "test" (every type; "good" is normal).
    Any other subfolder of ``root`` (such as ``val``) can be named as ``subset`` too.
    """
    root = Path(root)
    base = root / subset
    if not base.is_dir():
        raise DatasetError(f"'{root}' has no '{subset}' folder (expected MVTec layout)")
    ground_truth = root / "ground_truth" if (root / "ground_truth").is_dir() else None
    samples: list[Sample] = []
    for type_dir in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        label = 0 if type_dir.name == NORMAL_TYPE else 1
        if subset == "train" and label:
            continue
        for path in find_images(type_dir):
            mask = _mask_for(path, ground_truth, type_dir.name) if label else None
            samples.append(Sample(path, label, type_dir.name, mask))
    if not samples:
        raise DatasetError(f"no images found under '{base}'")
    return samples


def is_mask_file(path: Path, siblings: set[str]) -> bool:
    """Whether ``path`` looks like a pixel mask rather than an image to learn from.

    A mask is named ``*_mask.*`` (MVTec), or is a ``.png`` beside an image of the same
    stem in another format (MTD: ``X.jpg`` with its mask ``X.png``); ``siblings`` holds
    the file names of the folder.
    """
    name = path.name.lower()
    if path.stem.lower().endswith("_mask") or name.endswith("_mask.nii.gz"):
        return True
    if path.suffix.lower() != ".png":
        return False
    stem = path.stem
    return any(
        f"{stem}{ext}" in siblings for ext in (".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".JPG")
    )


def folder_samples(root: str | os.PathLike[str]) -> list[Sample]:
    """Every image under ``root`` (recursively), all taken as normal; masks left out.

    Mask files (see :func:`is_mask_file`) are not training images: they are left out
    with a warning that says how many. Files of a type not read (say ``.heic`` or a
    ``labels.csv``) are named in a warning, counted by suffix.
    """
    root = Path(root)
    others: Counter[str] = Counter()
    paths = find_images(root) if root.is_file() else sorted(walk_images(root, others=others))
    found = f" ({describe_others(others)})" if others else ""
    if not paths:
        raise DatasetError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}, DICOM or NIfTI) found under '{root}'"
            f"{found}; point to a folder of normal images"
        )
    if others:  # images of a type not read would be left out of training unseen
        warnings.warn(
            f"not read under '{root}': {describe_others(others)}; training reads "
            f"{', '.join(IMAGE_EXTENSIONS)}, DICOM and NIfTI (convert images of another type "
            "to one of these)",
            UserWarning,
            stacklevel=2,
        )
    names: dict[Path, set[str]] = {}
    for path in paths:
        names.setdefault(path.parent, set()).add(path.name)
    kept = [p for p in paths if not is_mask_file(p, names[p.parent])]
    if len(kept) < len(paths):
        warnings.warn(
            f"left out {len(paths) - len(kept)} mask files under '{root}' (names like "
            "X_mask.png, or X.png beside X.jpg); they are not images to learn from",
            UserWarning,
            stacklevel=2,
        )
    if not kept:
        raise DatasetError(f"only mask files found under '{root}'; point to the images")
    return [Sample(p, 0, NORMAL_TYPE) for p in kept]


def split_file_samples(split_file: str | os.PathLike[str], subset: str) -> list[Sample]:
    """Read a JSON split file listing ``train_good``, ``test_good`` and ``test_defect``.

    ``test_defect`` maps a defect type to its files; a defect image's mask is the
    same stem with ``.png`` beside it (when it exists). Paths are relative to the
    file's ``root`` entry, itself relative to the split file's folder.
    """
    split_file = Path(split_file)
    try:
        spec = json.loads(split_file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DatasetError(f"cannot read split file '{split_file}': {error}") from error
    base = (split_file.parent / spec.get("root", ".")).resolve()
    samples: list[Sample] = []
    if subset == "train":
        samples = [Sample(base / p, 0, NORMAL_TYPE) for p in spec.get("train_good", [])]
    elif subset == "test":
        samples = [Sample(base / p, 0, NORMAL_TYPE) for p in spec.get("test_good", [])]
        for defect_type, files in sorted(spec.get("test_defect", {}).items()):
            for p in files:
                image = base / p
                mask = image.with_suffix(".png")
                has_mask = mask.exists() and mask != image
                samples.append(Sample(image, 1, defect_type, mask if has_mask else None))
    else:
        raise DatasetError(f"subset must be 'train' or 'test', got {subset!r}")
    if not samples:
        raise DatasetError(f"split file '{split_file}' lists no '{subset}' images")
    return samples


def discover(source: str | os.PathLike[str], subset: str = "train") -> list[Sample]:
    """Samples from a split file, an MVTec-style root, or a flat folder (all normal).

    For ``subset="train"`` a flat folder is taken as normal images; for "test" it is
    taken as unlabelled-normal too, which suits calibration on normal images.
    """
    source = Path(source)
    if not source.exists():
        raise DatasetError(f"'{source}' does not exist")
    if source.is_file() and source.suffix.lower() == ".json":
        return split_file_samples(source, subset)
    is_mvtec = (source / "train").is_dir() or (source / "test").is_dir()
    if is_mvtec and not (source / subset).is_dir():
        present = sorted(p.name for p in source.iterdir() if p.is_dir())
        raise DatasetError(
            f"'{source}' is an MVTec-style root without a '{subset}' folder (it has "
            f"{present}); name one of those with --subset, or point to the folder itself"
        )
    if is_mvtec:
        return mvtec_samples(source, subset)
    return folder_samples(source)


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
    if not shapes:
        raise DatasetError(
            f"none of the {len(probe)} probed training files could be read; the first: "
            f"{first_error}"
        )
    seconds = (time.perf_counter() - started) / len(probe)
    return SourceProbe(shapes, aspects, colour, seconds, float(np.mean(frames)))


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


# --------------------------------------------------------------------------- synthetic


def synthetic_texture(rng: np.random.Generator, size: int) -> NDArray[np.float32]:
    """A brushed-metal-like texture: fixed grating family, random phase, fine noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    image = np.full((size, size), 0.5, dtype=np.float32)
    for freq, angle, amp in ((6.0, 0.3, 0.08), (11.0, 1.2, 0.05), (23.0, 2.2, 0.03)):
        phase = rng.uniform(0, 2 * np.pi)
        angle = angle + rng.normal(0, 0.05)
        image += amp * np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
    image += rng.normal(0, 0.015, size=(size, size)).astype(np.float32)
    image += rng.uniform(-0.04, 0.04)  # lighting varies between parts
    return image


def _defect(
    rng: np.random.Generator, image: NDArray[np.float32], kind: str
) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    size = image.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = rng.uniform(0.2 * size, 0.8 * size, size=2)
    if kind == "scratch":
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(0.3, 0.5) * size
        along = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        across = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
        mask = (np.abs(along) <= length / 2) & (np.abs(across) <= max(1.0, size / 64))
        value = rng.choice([0.1, 0.9])
    elif kind == "blob":
        ry, rx = rng.uniform(0.05, 0.12, size=2) * size
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        value = rng.uniform(0.05, 0.2)
    elif kind == "spot":
        radius = rng.uniform(0.03, 0.06) * size
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        value = rng.uniform(0.85, 1.0)
    else:
        raise InvalidValueError(f"defect kind must be scratch, blob or spot, got {kind!r}")
    out = image.copy()
    out[mask] = 0.3 * out[mask] + 0.7 * value
    return out, mask


SYNTHETIC_DEFECTS: tuple[str, ...] = ("scratch", "blob", "spot")


def make_synthetic_dataset(
    root: str | os.PathLike[str],
    n_train: int = 200,
    n_test_good: int = 40,
    n_test_defect: int = 60,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """Write an MVTec-style folder of textured images with injected defects and exact masks.

    Layout: ``train/good``, ``test/good``, ``test/<kind>``, ``ground_truth/<kind>/<stem>_mask.png``
    with kinds scratch, blob and spot. Returns ``root``.
    """
    if min(n_train, n_test_good, n_test_defect) < 0 or size < 16:
        raise InvalidValueError("counts must be >= 0 and size >= 16")
    root = Path(root)
    rng = np.random.default_rng(seed)

    def save(array: NDArray[np.float32], path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8)).save(path)

    for i in range(n_train):
        save(synthetic_texture(rng, size), root / "train" / NORMAL_TYPE / f"{i:04d}.png")
    for i in range(n_test_good):
        save(synthetic_texture(rng, size), root / "test" / NORMAL_TYPE / f"{i:04d}.png")
    for i in range(n_test_defect):
        kind = SYNTHETIC_DEFECTS[i % len(SYNTHETIC_DEFECTS)]
        image, mask = _defect(rng, synthetic_texture(rng, size), kind)
        save(image, root / "test" / kind / f"{i:04d}.png")
        save(mask.astype(np.float32), root / "ground_truth" / kind / f"{i:04d}_mask.png")
    return root


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
