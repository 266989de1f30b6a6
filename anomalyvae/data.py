"""Dataset layouts (MVTec-style, flat folder, split file) and a synthetic defect generator."""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from anomalyvae.errors import AnomalyVAEError, InvalidValueError
from anomalyvae.imaging.files import IMAGE_EXTENSIONS, describe_others, find_images, walk_images
from anomalyvae.imaging.medical import is_nifti

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
