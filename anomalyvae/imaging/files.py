"""The file-system side of images: finding them under a folder, writing files atomically.

One walker (:func:`walk_images`) finds the images that training, evaluation and scans
read, by one rule (hidden names skipped, symlinked folders entered once, special files
never opened); :func:`atomic_path` and its two writers make every file the product
writes appear whole or not at all. torch-free: the ONNX path imports it.
"""

from __future__ import annotations

import fnmatch
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from anomalyvae.imaging.medical import is_dicom

#: The image files training, evaluation and scans read (GIF's and WebP's first frame
#: too, or every frame where training takes a file of several images as slices).
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".tif",
    ".tiff",
    ".gif",
    ".webp",
)
MEDICAL_EXTENSIONS: tuple[str, ...] = (".dcm", ".nii", ".nii.gz")


@contextmanager
def atomic_path(path: str | os.PathLike[str], keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    The file is fsynced and renamed in one step when the block succeeds, and deleted
    when it fails. Readers never see a half-written file, and a killed writer leaves only a hidden
    ``.<name>.<pid>.tmp`` behind. ``keep_suffix`` ends the temporary name with the
    target's suffixes, for writers that pick the format from the name (``.nii.gz``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(
        f".{path.name}.{os.getpid()}.tmp" + ("".join(path.suffixes) if keep_suffix else "")
    )
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def display_path(path: str | os.PathLike[str]) -> str:
    """A path as text that survives any file name (undecodable bytes become \\xNN)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def walk_images(
    root: str | os.PathLike[str],
    extensions: Iterable[str] = IMAGE_EXTENSIONS + MEDICAL_EXTENSIONS,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    skip: Sequence[str | os.PathLike[str]] = (),
    skip_marked: str | None = None,
    skipped: list[Path] | None = None,
    others: Counter[str] | None = None,
) -> list[Path]:
    """Image files under ``root`` in walk order (sorted within each folder): the one walker.

    Training, evaluation and scans all find files here, by one rule: hidden files and
    folders (names starting with ".") are skipped; symlinked folders are entered once,
    so a symlink loop or two links to one folder cannot repeat a file; folders in
    ``skip`` are never entered. ``include``/``exclude`` are ``fnmatch`` globs on the
    path relative to ``root``. With ".dcm" among the extensions, extensionless regular
    files with the DICOM preamble are found too. A folder below ``root`` that holds a
    file named ``skip_marked`` (a scan's own output, marked by its manifest) is not
    entered either; each such folder is appended to ``skipped`` when given. ``others``,
    when given, counts the other files in scope (not hidden, through ``include`` and
    ``exclude``) by suffix ("" for none): images of a type not read would otherwise go
    unscored without a word.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"'{root}' is not a folder")
    wanted = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    seen: set[str] = {os.path.realpath(p) for p in skip}
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        if skip_marked and real != os.path.realpath(root) and skip_marked in filenames:
            dirnames[:] = []
            if skipped is not None:
                skipped.append(Path(dirpath))
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith("."):
                continue
            is_image = has_image_name(path, wanted)
            if not is_image and others is None:
                continue
            relative = display_path(path.relative_to(root))
            if include and not any(fnmatch.fnmatch(relative, p) for p in include):
                continue
            if any(fnmatch.fnmatch(relative, p) for p in exclude):
                continue
            if is_image:
                found.append(path)
            elif others is not None:
                others[display_path(path.suffix.lower())] += 1
    return found


def describe_others(others: Mapping[str, int]) -> str:
    """``{".txt": 2, "": 1}`` as "3 files of other types (2 .txt, 1 without a suffix)"."""
    total = sum(others.values())
    kinds = sorted(others.items(), key=lambda item: (-item[1], item[0]))
    shown = [f"{n} {suffix or 'without a suffix'}" for suffix, n in kinds[:5]]
    if len(kinds) > 5:
        shown.append(f"{sum(n for _, n in kinds[5:])} of {len(kinds) - 5} more types")
    return f"{total} {'file' if total == 1 else 'files'} of other types ({', '.join(shown)})"


def find_images(
    root: str | os.PathLike[str],
    extensions: Iterable[str] = IMAGE_EXTENSIONS + MEDICAL_EXTENSIONS,
) -> list[Path]:
    """Image files under ``root`` (or ``root`` itself), sorted: :func:`walk_images`."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"folder '{root}' does not exist")
    if root.is_file():
        return [root] if root.suffix.lower() in set(extensions) else []
    return sorted(walk_images(root, extensions))


def has_image_name(path: Path, wanted: set[str]) -> bool:
    """Whether ``path`` looks like a supported image by name (or DICOM preamble)."""
    name = path.name.lower()
    if any(name.endswith(e) for e in wanted):
        return True
    # sniff the DICOM preamble of regular files only: opening a FIFO or a device
    # would block the scan forever; a file that cannot even be looked at (no permission)
    # is not taken for DICOM, so the walk goes on
    if ".dcm" not in wanted or path.suffix:
        return False
    try:
        return path.is_file() and is_dicom(path)
    except OSError:
        return False
