"""Scan a folder with an exported model: a results table, heatmaps and a QA report.

Streaming and resumable: files are decoded on a worker pool while ONNX Runtime scores
batches; at most a few batches are in flight, so memory does not grow with the folder.
Results go to numbered Parquet part files, each written atomically, so a scan killed at
any moment and restarted skips what is done and loses nothing. Unreadable files become
rows with an ``error``; the scan goes on. No torch on this path.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from stat import S_ISFIFO, S_ISREG
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from PIL import Image
from tqdm.auto import tqdm

from anomalyvae.errors import AnomalyVAEError, InvalidValueError
from anomalyvae.imaging.io import (
    IMAGE_EXTENSIONS,
    MEDICAL_EXTENSIONS,
    ImageReadError,
    Preprocessing,
    atomic_path,
    atomic_write_bytes,
    display_path,
    intensities,
    preprocess,
    read_image,
    walk_images,
)
from anomalyvae.imaging.medical import is_nifti, normalize_intensity
from anomalyvae.imaging.tiles import map_to_size
from anomalyvae.imaging.volumes import (
    read_volume,
    slice_name,
    volume_slices,
    write_volume_map,
)
from anomalyvae.inference.contract import check_threshold
from anomalyvae.inference.drift import drift_report
from anomalyvae.inference.runtime import OnnxDetector

#: A scan engine: ``engine(model_path, scorer, todo, writer, bar) -> info`` scores every
#: job of ``todo`` with ``scorer`` and hands the rows to ``writer``; ``info`` (a dict)
#: lands in summary.json. The local engine is :func:`_scan_local`'s loop.
Engine = Callable[..., dict[str, Any]]

#: Exit codes of ``anomalyvae scan`` (documented in docs/cli.md).
EXIT_OK = 0
EXIT_ANOMALIES = 3
EXIT_UNREADABLE = 4
HEATMAP_MODES = ("anomalies", "all", "none")
COLUMNS = (
    "path",
    "relative_path",
    "source",
    "slice",
    "fingerprint",
    "file_size",
    "mtime",
    "width",
    "height",
    "channels",
    "bit_depth",
    "score",
    "normalized_score",
    "is_anomaly",
    "threshold",
    "peak_x",
    "peak_y",
    "anomalous_area",
    "mean_intensity",
    "heatmap",
    "error",
    "model_hash",
)
DTYPES = {
    "path": "string",
    "relative_path": "string",
    "source": "string",
    "slice": "Int64",
    "fingerprint": "string",
    "file_size": "int64",
    "mtime": "float64",
    "width": "Int64",
    "height": "Int64",
    "channels": "Int64",
    "bit_depth": "Int64",
    "score": "float64",
    "normalized_score": "float64",
    "is_anomaly": "bool",
    "threshold": "float64",
    "peak_x": "float64",
    "peak_y": "float64",
    "anomalous_area": "float64",
    "mean_intensity": "float64",
    "heatmap": "string",
    "error": "string",
    "model_hash": "string",
}
EXTRA_EXTENSIONS = (".gif", ".webp")


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    """The results schema with fixed dtypes, also for an empty table."""
    return frame.reindex(columns=list(COLUMNS)).astype(DTYPES)


@dataclass(frozen=True)
class ScanConfig:
    """How to scan.

    Attributes
    ----------
    include, exclude : tuple of str
        Glob patterns on the path relative to the folder (``fnmatch``; ``*`` spans
        folders). A file is scanned when it matches some include (or none are given)
        and no exclude.
    batch_size : int
        Images per ONNX Runtime call.
    workers : int
        Decoding workers.
    executor : {"thread", "process"}
        Worker kind for decoding (see reports/scan for the measured difference).
    heatmaps : str
        "anomalies" (default), "all", "none" or "top-N" (the N highest scores).
    save_maps : bool
        Also write each scored file's raw map as ``maps/<relative path>.npz``.
    threshold : float or None
        Override the model's calibrated threshold.
    chunk_rows : int
        Rows per Parquet part file: what a kill can lose at most (it is redone).
    device : {"auto", "cuda", "cpu"}
    report_top : int
        Gallery size of the HTML report.
    engine : {"local", "ray"}
        "local" (default) decodes on a pool in this process; "ray" runs decoding as
        Ray tasks and inference in a Ray actor pool (needs ``anomalyvae[ray]``).
    address : str or None
        Ray cluster to join ("auto", "HOST:PORT", "ray://HOST:PORT"); None starts a
        local Ray instance.
    ray_workers : int or None
        Inference actors for the Ray engine (default: one per GPU, else ``workers``).
    extend : bool
        Let an output folder that holds a scan of another input folder be used for this
        one (otherwise that is an error: one output folder, one input). The table and
        report then describe this folder's files; a file whose name, size, mtime and
        content fingerprint match an earlier row is not scored again, anything else is.
        The other folder's rows stay in ``parts/`` but leave the table.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    batch_size: int = 16
    workers: int = 2
    executor: str = "thread"
    heatmaps: str = "anomalies"
    save_maps: bool = False
    threshold: float | None = None
    chunk_rows: int = 512
    device: str = "auto"
    report_top: int = 24
    engine: str = "local"
    address: str | None = None
    ray_workers: int | None = None
    extend: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise InvalidValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.workers < 1:
            raise InvalidValueError(f"workers must be >= 1, got {self.workers}")
        if self.executor not in ("thread", "process"):
            raise InvalidValueError(
                f"executor must be 'thread' or 'process', got {self.executor!r}"
            )
        if self.chunk_rows < 1:
            raise InvalidValueError(f"chunk_rows must be >= 1, got {self.chunk_rows}")
        if self.engine not in ("local", "ray"):
            raise InvalidValueError(f"engine must be 'local' or 'ray', got {self.engine!r}")
        if self.ray_workers is not None and self.ray_workers < 1:
            raise InvalidValueError(f"ray_workers must be >= 1, got {self.ray_workers}")
        check_threshold(self.threshold)
        top_n(self.heatmaps)  # validates


def top_n(heatmaps: str) -> int | None:
    """N of a "top-N" heatmap mode, None for the other modes; rejects unknown modes."""
    if heatmaps in HEATMAP_MODES:
        return None
    if heatmaps.startswith("top-") and heatmaps[4:].isdigit() and int(heatmaps[4:]) > 0:
        return int(heatmaps[4:])
    raise InvalidValueError(
        f"heatmaps must be 'anomalies', 'all', 'none' or 'top-N' (e.g. top-50), got {heatmaps!r}"
    )


class ScanSummary(NamedTuple):
    """What a scan did; ``exit_code`` follows the documented convention."""

    output: Path
    n_files: int
    n_scored_now: int
    n_skipped_done: int
    n_errors: int
    n_anomalies: int
    seconds: float
    summary: dict[str, Any]


# --------------------------------------------------------------------------- discovery


def discover(
    root: str | os.PathLike[str],
    extensions: Sequence[str] = IMAGE_EXTENSIONS + EXTRA_EXTENSIONS + MEDICAL_EXTENSIONS,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    skip: Sequence[str | os.PathLike[str]] = (),
) -> list[Path]:
    """Image files under ``root`` for a scan: the product's one folder walker.

    See :func:`anomalyvae.imaging.io.walk_images` (symlinked folders entered once, hidden
    names skipped, ``include``/``exclude`` globs, ``skip`` folders never entered); this
    adds the extensions a scan also reads (GIF, WebP).
    """
    return walk_images(root, extensions, include, exclude, skip)


# --------------------------------------------------------------------------- decoding


class Decoded(NamedTuple):
    """A worker's result for one file: the model input or an error, and file facts."""

    index: int
    pixels: NDArray[np.float32] | None
    info: dict[str, Any]


def decode_file(index: int, path: Path, spec: Preprocessing) -> Decoded:
    """Decode and preprocess one file for row ``index``; a failure becomes an error row."""
    info: dict[str, Any] = {
        "width": None,
        "height": None,
        "channels": None,
        "bit_depth": None,
        "error": "",
    }
    try:
        stat = path.stat()
        if not S_ISREG(stat.st_mode):  # never open a FIFO, socket or device: it can block
            kind = "a FIFO" if S_ISFIFO(stat.st_mode) else "not a regular file"
            info["error"] = f"{kind}, so it was not read (scan regular image files only)"
            return Decoded(index, None, info)
        info["fingerprint"] = file_fingerprint(path, stat)  # the resume key's content part
        if is_nifti(path):
            return _decode_volume(index, path, spec, info)
        decoded = read_image(path, max(spec.height, spec.width))
        info.update(
            width=decoded.width,
            height=decoded.height,
            channels=decoded.channels,
            bit_depth=decoded.bit_depth,
        )
        return Decoded(index, preprocess(intensities(decoded, spec), spec), info)
    except ImageReadError as error:
        info["error"] = f"{error.reason} ({error.fix})"
    except Exception as error:  # a decoder bug must not stop a 100,000-file scan
        info["error"] = f"unexpected {type(error).__name__}: {error}"
    return Decoded(index, None, info)


def _decode_volume(index: int, path: Path, spec: Preprocessing, info: dict[str, Any]) -> Decoded:
    """All slices of a NIfTI volume as a (slices, c, h, w) stack, normalized per volume."""
    volume = read_volume(path)
    stack = volume_slices(path, spec, volume=volume)
    shape = volume.data.shape
    info.update(
        width=int(shape[2]), height=int(shape[1]), channels=1, bit_depth=32, slices=int(len(stack))
    )
    return Decoded(index, stack, info)


def _stream(
    executor: Executor, paths: Sequence[Path], spec: Preprocessing, in_flight: int
) -> Iterator[Decoded]:
    """Decode in order with at most ``in_flight`` files pending (bounded memory)."""
    pending: deque[Future[Decoded]] = deque()
    for index, path in enumerate(paths):
        pending.append(executor.submit(decode_file, index, path, spec))
        if len(pending) >= in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# --------------------------------------------------------------------------- outputs


def _atomic_frame(frame: pd.DataFrame, path: Path, kind: str) -> None:
    with atomic_path(path) as tmp:
        if kind == "parquet":
            frame.to_parquet(tmp, index=False)
        else:
            spreadsheet_safe(frame).to_csv(tmp, index=False)


#: A cell starting with one of these is a formula to Excel, LibreOffice and Sheets.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """Text cells that a spreadsheet would run as a formula, prefixed with a quote.

    File names come from whoever wrote the folder: ``=HYPERLINK(...)`` must reach a
    QA engineer's spreadsheet as text (OWASP's CSV-injection rule). Parquet keeps the
    exact names.
    """
    out = frame.copy()
    for column in out.columns:
        if out[column].dtype in ("string", object):
            values = out[column].astype("string")
            risky = values.str.startswith(FORMULA_STARTS).fillna(False)
            out[column] = values.where(~risky, "'" + values)
    return out


def heatmap_overlay(
    pixels: NDArray[np.float32],
    anomaly_map: NDArray[np.float32],
    pixel_threshold: float,
    vmax: float,
) -> Image.Image:
    """Overlay the map in colour on the image, with the pixel-threshold contour.

    The result has the image's own resolution.
    """
    from matplotlib import colormaps
    from scipy import ndimage

    height, width = pixels.shape[:2]
    grey = pixels.mean(axis=2) if pixels.shape[2] > 1 else pixels[:, :, 0]
    big = map_to_size(anomaly_map, height, width)
    level = np.clip(big / max(vmax, 1e-12), 0, 1)
    colour = colormaps["inferno"](level)[:, :, :3]
    alpha = 0.55 * level[:, :, None]
    base = np.repeat(grey[:, :, None], 3, axis=2)
    out = (1 - alpha) * base + alpha * colour
    over = big > pixel_threshold
    edge = over & ~ndimage.binary_erosion(over, iterations=max(1, min(height, width) // 200))
    out[edge] = (0.0, 1.0, 1.0)
    return Image.fromarray((np.clip(out, 0, 1) * 255).astype(np.uint8))


def _save_heatmap(
    path: Path,
    out_path: Path,
    anomaly_map: NDArray[np.float32],
    pixel_threshold: float,
    vmax: float,
    pixels: NDArray[np.float32] | None = None,
) -> None:
    import io as _io

    if pixels is None:
        try:  # a heatmap needs no more than about 1,000 px: huge files are decoded reduced
            pixels = read_image(path, 512).pixels
        except ImageReadError:
            # the file changed or vanished after it was scored: the map is still drawn,
            # on a blank background, rather than the scan stopping for a picture
            pixels = np.zeros((*anomaly_map.shape, 1), np.float32)
    source = pixels
    image = heatmap_overlay(source, anomaly_map, pixel_threshold, vmax)
    buffer = _io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(out_path, buffer.getvalue())


#: Longest file-name component (bytes) the scan writes: file systems allow 255, and
#: the atomic writer adds a temporary prefix and suffix.
MAX_NAME_BYTES = 180


def _heatmap_name(relative: str) -> str:
    """The heatmap's path under heatmaps/: the file's own path plus ".heatmap.png".

    The full name is kept (a.png and a.jpg must not collide); a name too long for the
    file system keeps its start and gets a hash of the whole instead of the rest.
    """
    parts = (relative.replace("\\", "_") + ".heatmap.png").split("/")
    name = parts[-1]
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        digest = hashlib.sha256(relative.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        stem = name.encode("utf-8", "surrogateescape")[:120].decode("utf-8", "ignore")
        name = f"{stem}~{digest}.heatmap.png"
    return "/".join([*parts[:-1], name])


# --------------------------------------------------------------------------- scanning


def _read_parts(parts_dir: Path) -> pd.DataFrame:
    frames = []
    for part in sorted(parts_dir.glob("part-*.parquet")):
        try:
            frames.append(pd.read_parquet(part))
        except Exception:  # a part is renamed into place whole; anything else is foreign
            continue
    if not frames:
        return _typed(pd.DataFrame(columns=list(COLUMNS)))
    # Later parts win: a file rescored after a change replaces its earlier row.
    merged = _typed(pd.concat(frames, ignore_index=True))
    return merged.drop_duplicates(subset="relative_path", keep="last")


class Job(NamedTuple):
    """One file still to scan: its position in the to-do list, path and identity."""

    index: int
    path: Path
    relative: str
    size: int
    mtime: float
    fingerprint: str = ""


class PartWriter:
    """Collects result rows and writes them as numbered Parquet parts, each atomically."""

    def __init__(self, parts_dir: Path, chunk_rows: int) -> None:
        self.parts_dir = parts_dir
        self.chunk_rows = chunk_rows
        self.rows: list[dict[str, Any]] = []
        self.next_part = 1 + max(
            (int(p.stem.split("-")[1]) for p in parts_dir.glob("part-*.parquet")), default=-1
        )

    def add(self, rows: Sequence[dict[str, Any]]) -> None:
        self.rows.extend(rows)
        if len(self.rows) >= self.chunk_rows:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            _atomic_frame(
                _typed(pd.DataFrame(self.rows, columns=list(COLUMNS))),
                self.parts_dir / f"part-{self.next_part:06d}.parquet",
                "parquet",
            )
            self.next_part += 1
            self.rows = []


class BatchScorer:
    """Scores decoded files into result rows and writes their heatmaps and maps.

    Both engines use it: the local engine in its main thread, the Ray engine inside
    each inference actor. ``output`` must be reachable from wherever it runs.
    """

    def __init__(
        self, detector: OnnxDetector, output: Path, config: ScanConfig, threshold: float
    ) -> None:
        self.detector = detector
        self.output = output
        self.config = config
        self.threshold = threshold
        self.pixel_threshold = detector.pixel_threshold
        self.vmax = max(self.pixel_threshold * 2.0, 1e-6)

    def rows(self, batch: Sequence[tuple[Decoded, Job]]) -> list[dict[str, Any]]:
        """One row per file (a volume: one per slice plus one for the volume)."""
        good = [(d, job) for d, job in batch if d.pixels is not None]
        result = None
        if good:
            # a volume contributes one model input per slice
            stacked = np.concatenate(
                [d.pixels if "slices" in d.info else d.pixels[None] for d, _ in good]
            )
            result = self.detector.predict_arrays(stacked, self.threshold)
            # the drift alarm compares these with the calibration normals' (drift.py)
            result = result._replace(mean_intensity=stacked.reshape(len(stacked), -1).mean(axis=1))
        position, offset = {}, 0
        for d, _ in good:
            position[d.index] = offset
            offset += d.info.get("slices", 1)
        out: list[dict[str, Any]] = []
        for item, job in batch:
            if item.index not in position:
                out.append(self._base_row(item, job, job.relative))
            elif "slices" in item.info:
                out.extend(self._volume_rows(item, job, position[item.index], result))
            else:
                out.append(self._image_row(item, job, position[item.index], result))
        return out

    def _wants_heatmap(self, is_anomaly: bool) -> bool:
        mode = self.config.heatmaps
        return mode == "all" or (mode == "anomalies" and is_anomaly)

    def _base_row(self, item: Decoded, job: Job, relative: str) -> dict[str, Any]:
        """A row with the file's facts and no scores yet (what an unreadable file gets)."""
        return {
            "path": display_path(job.path),
            "relative_path": relative,
            # the row's file, never parsed out of a name ("a#slice=1.png" is a file too)
            "source": job.relative,
            "slice": pd.NA,
            "fingerprint": item.info.get("fingerprint") or job.fingerprint,
            "file_size": job.size,
            "mtime": job.mtime,
            **{k: item.info[k] for k in ("width", "height", "channels", "bit_depth")},
            "score": np.nan,
            "normalized_score": np.nan,
            "is_anomaly": False,
            "threshold": self.threshold,
            "peak_x": np.nan,
            "peak_y": np.nan,
            "anomalous_area": np.nan,
            "mean_intensity": np.nan,
            "heatmap": "",
            "error": item.info["error"],
            "model_hash": self.detector.model_hash,
        }

    def _image_row(self, item: Decoded, job: Job, k: int, result: Any) -> dict[str, Any]:
        row = self._base_row(item, job, job.relative)
        row.update(_score_fields(result, k, item.info, self.pixel_threshold))
        anomaly_map = result.anomaly_map[k, 0]
        if self._wants_heatmap(row["is_anomaly"]):
            name = Path("heatmaps") / _heatmap_name(job.relative)
            _save_heatmap(
                job.path, self.output / name, anomaly_map, self.pixel_threshold, self.vmax
            )
            row["heatmap"] = name.as_posix()
        if self.config.save_maps:  # at the file's own resolution
            _save_map(
                self.output / "maps" / (job.relative + ".npz"),
                map_to_size(anomaly_map, int(item.info["height"]), int(item.info["width"])),
            )
        return row

    def _volume_rows(
        self, item: Decoded, job: Job, start: int, result: Any
    ) -> list[dict[str, Any]]:
        """One row per slice (``path#slice=NNNN``) and one for the volume (its worst slice)."""
        n = int(item.info["slices"])
        worst = int(np.argmax(result.score[start : start + n]))
        out = []
        for k in [*range(n), worst]:
            row = self._base_row(item, job, slice_name(job.relative, k))
            row.update(
                channels=1,
                slice=k,
                **_score_fields(result, start + k, item.info, self.pixel_threshold),
            )
            out.append(row)
        volume = out[-1]
        volume["relative_path"] = job.relative  # the volume row: max over slices
        volume["slice"] = pd.NA
        if self.config.save_maps:
            write_volume_map(
                job.path,
                self.output / "maps" / (job.relative + ".map.nii.gz"),
                result.anomaly_map[start : start + n, 0],
            )
        if self._wants_heatmap(volume["is_anomaly"]):
            name = Path("heatmaps") / _heatmap_name(slice_name(job.relative, worst))
            plane = normalize_intensity(read_volume(job.path).data[worst][..., None], "minmax")
            _save_heatmap(
                job.path,
                self.output / name,
                result.anomaly_map[start + worst, 0],
                self.pixel_threshold,
                self.vmax,
                pixels=plane,
            )
            volume["heatmap"] = out[worst]["heatmap"] = name.as_posix()
        return out


def _todo(
    folder: Path, paths: Sequence[Path], parts_dir: Path, model_hash: str, threshold: float
) -> list[Job]:
    """The files not yet scored by this model at this threshold (the resume rule)."""
    done = _read_parts(parts_dir)
    done_keys: dict[tuple[str, int, float], str] = {}
    if len(done):
        ok = done[
            (done["error"] == "")
            & (done["model_hash"] == model_hash)
            & (done["threshold"] == threshold)
        ]
        done_keys = {
            (source, size, mtime): fingerprint
            for source, size, mtime, fingerprint in zip(
                ok["source"], ok["file_size"], ok["mtime"], ok["fingerprint"], strict=True
            )
        }
    todo: list[Job] = []
    for path in paths:
        relative = display_path(path.relative_to(folder))
        try:
            stat = path.stat()
            size, mtime = int(stat.st_size), float(stat.st_mtime)
            stored = done_keys.get((relative, size, mtime))
            # Only a file that looks done is read here, to compare contents; a new file is
            # fingerprinted by the decoder, which reads it anyway (decode_file).
            fingerprint = file_fingerprint(path, stat) if stored is not None else ""
        except OSError:
            size, mtime, stored, fingerprint = -1, float("nan"), None, ""
        if stored is None or fingerprint != stored:
            todo.append(Job(len(todo), path, relative, size, mtime, fingerprint))
    return todo


#: Bytes read from each end of a file for its fingerprint.
FINGERPRINT_BYTES = 65536


def file_fingerprint(path: Path, stat: os.stat_result | None = None) -> str:
    """A short SHA-256 of a regular file's size, first and last 64 KiB ("" otherwise).

    Part of the resume key with the name, size and mtime: a file replaced by another of
    the same name, size and mtime (``touch -r``) is scored again. Special files (FIFO,
    socket, device) are never opened: reading one could block forever.
    """
    stat = stat or path.stat()
    if not S_ISREG(stat.st_mode):
        return ""
    digest = hashlib.sha256(str(stat.st_size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(FINGERPRINT_BYTES))
        if stat.st_size > 2 * FINGERPRINT_BYTES:
            handle.seek(-FINGERPRINT_BYTES, os.SEEK_END)
            digest.update(handle.read(FINGERPRINT_BYTES))
    return digest.hexdigest()[:16]


def exit_with_parent(poll_s: float = 0.5) -> None:
    """Make this (decoding worker) process end soon after the process that started it.

    A pool's workers are not told when the scan is killed with SIGKILL: they would
    linger, orphaned. A daemon thread polls the parent id instead (a process is
    re-parented when its parent dies), portable where ``PR_SET_PDEATHSIG`` is not.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _scan_local(
    scorer: BatchScorer, todo: Sequence[Job], writer: PartWriter, bar: Any
) -> dict[str, Any]:
    """The local engine: a decoding pool feeding ONNX Runtime batches in this process."""
    config = scorer.config
    pool: Executor = (
        ThreadPoolExecutor(config.workers)
        if config.executor == "thread"
        else ProcessPoolExecutor(config.workers, initializer=exit_with_parent)
    )
    batch: list[tuple[Decoded, Job]] = []

    def run_batch() -> None:
        writer.add(scorer.rows(batch))
        bar.update(len(batch))
        batch.clear()

    try:
        in_flight = max(2 * config.batch_size, 4 * config.workers)
        paths = [job.path for job in todo]
        for item in _stream(pool, paths, scorer.detector.preprocessing, in_flight):
            batch.append((item, todo[item.index]))
            if len(batch) >= config.batch_size:
                run_batch()
        if batch:
            run_batch()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return {"engine": "local", "workers": config.workers, "executor": config.executor}


class ScanOutputError(AnomalyVAEError, ValueError):
    """The scan cannot run: no images, or an output folder of another input folder."""


def scan(
    model: str | os.PathLike[str],
    folder: str | os.PathLike[str],
    output: str | os.PathLike[str],
    config: ScanConfig = ScanConfig(),  # noqa: B008 - frozen, so sharing is safe
    progress: bool = True,
    engine: Engine | None = None,
) -> ScanSummary:
    """Scan ``folder`` with ``model`` into ``output`` (resuming what is already there).

    Writes ``results.parquet``, ``results.csv``, ``summary.json``, ``report.html``,
    ``heatmaps/`` and ``parts/`` (the resumable record) under ``output``.

    ``engine`` runs the to-do list: by default this process (a decoding pool feeding
    ONNX Runtime); the caller hands in another one, such as
    :func:`anomalyvae.inference.ray_engine.scan_on_ray` for ``config.engine == "ray"``.
    Everything else (rows, resume, report) is the same whichever engine runs.
    """
    output = Path(output)
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    try:
        with output_lock(output):
            return _scan_unlocked(model, folder, output, config, progress, engine)
    except Exception:
        if created and not any(output.iterdir()):
            output.rmdir()  # a scan that could not start leaves no empty folder behind
        raise


class ScanLockedError(ScanOutputError):
    """Another scan is writing to the same output folder."""


LOCK = ".scan.lock"


@contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """One scan at a time per output folder: a lock file holding the owner's PID.

    Two scans writing one folder would lose rows. A lock left by a process that no
    longer runs (killed with -9) is taken over, so a resume is never blocked.
    """
    path = output / LOCK
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = int(path.read_text().strip() or "0")
            except (OSError, ValueError):
                owner = 0
            if owner and _alive(owner):
                raise ScanLockedError(
                    f"another scan (process {owner}) is writing to '{output}'; wait for it "
                    "to finish, or write to another output folder with -o"
                ) from None
            path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(str(os.getpid()))
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _scan_unlocked(
    model: str | os.PathLike[str],
    folder: str | os.PathLike[str],
    output: Path,
    config: ScanConfig,
    progress: bool,
    engine: Engine | None,
) -> ScanSummary:
    started = time.monotonic()
    folder, output = Path(folder), Path(output)
    if config.engine != "local" and engine is None:
        raise InvalidValueError(
            f"config.engine is {config.engine!r}: pass that engine's runner as engine= "
            "(e.g. anomalyvae.inference.ray_engine.scan_on_ray)"
        )
    detector = OnnxDetector(model, device=config.device, batch_size=config.batch_size)
    threshold = detector.threshold if config.threshold is None else float(config.threshold)
    paths = discover(folder, include=config.include, exclude=config.exclude, skip=[output])
    if not paths:
        raise ScanOutputError(
            f"no image files under '{folder}' (looked for {', '.join(IMAGE_EXTENSIONS)}, "
            "DICOM and NIfTI, minus --exclude); nothing was written"
        )
    parts_dir = output / "parts"
    claim_output(output, folder, config.extend)
    parts_dir.mkdir(parents=True, exist_ok=True)
    todo = _todo(folder, paths, parts_dir, detector.model_hash, threshold)
    n_done = len(paths) - len(todo)
    writer = PartWriter(parts_dir, config.chunk_rows)
    scorer = BatchScorer(detector, output, config, threshold)
    bar = tqdm(
        total=len(todo),
        desc="scanning",
        unit="img",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    scan_started = time.monotonic()
    try:
        if engine is not None and todo:
            engine_info = engine(model, scorer, todo, writer, bar)
        else:
            engine_info = _scan_local(scorer, todo, writer, bar)
        writer.flush()
    finally:
        bar.close()
    scan_seconds = time.monotonic() - scan_started

    table = _read_parts(parts_dir)
    present = {display_path(p.relative_to(folder)) for p in paths}
    table = table[table["source"].isin(present)]  # rows of files no longer there go
    table = table.sort_values("relative_path", kind="stable").reset_index(drop=True)
    n_top = top_n(config.heatmaps)
    if n_top:
        table = _top_heatmaps(scorer, folder, table, paths, n_top)
    _atomic_frame(table, output / "results.parquet", "parquet")
    _atomic_frame(table, output / "results.csv", "csv")
    summary = summarize(table, detector.metadata, len(todo), scan_seconds, config)
    summary["engine"] = engine_info
    atomic_write_bytes(output / "summary.json", json.dumps(summary, indent=2).encode())

    from anomalyvae.inference.report import write_report

    write_report(
        table, summary, output / "report.html", output, folder=folder, top=config.report_top
    )
    n_errors = int((table["error"] != "").sum())
    return ScanSummary(
        output,
        len(table),
        len(todo),
        n_done,
        n_errors,
        int(table["is_anomaly"].sum()),
        time.monotonic() - started,
        summary,
    )


MANIFEST = "scan.json"


def claim_output(output: Path, folder: Path, extend: bool = False) -> None:
    """Record which input folder ``output`` holds, or refuse a second one.

    An output folder never mixes two inputs silently: files of the same names in
    another folder would otherwise pass as "already done".
    """
    root = os.path.realpath(folder)
    manifest = output / MANIFEST
    roots: list[str] = []
    if manifest.is_file():
        try:
            roots = list(json.loads(manifest.read_text()).get("input_roots", []))
        except (OSError, ValueError, AttributeError):
            roots = []
    elif (output / "parts").is_dir() and any((output / "parts").glob("part-*.parquet")):
        roots = []  # a scan from before the manifest: adopt it
    if roots and root not in roots:
        if not extend:
            raise ScanOutputError(
                f"'{output}' holds a scan of '{roots[0]}', not of '{root}'; write to another "
                "output folder with -o, or pass --extend to add this folder's files to it"
            )
    if root not in roots:
        output.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(manifest, json.dumps({"input_roots": [*roots, root]}).encode())


def _save_map(path: Path, anomaly_map: NDArray[np.float32]) -> None:
    """Write one map as ``anomaly_map`` in a compressed .npz, atomically."""
    import io as _io

    buffer = _io.BytesIO()
    np.savez_compressed(buffer, anomaly_map=anomaly_map)
    atomic_write_bytes(path, buffer.getvalue())


def _score_fields(
    result: Any, k: int, info: dict[str, Any], pixel_threshold: float
) -> dict[str, Any]:
    """Scores of model input ``k``, with the map's peak in the file's own pixels."""
    anomaly_map = result.anomaly_map[k, 0]
    h, w = anomaly_map.shape
    py, px = divmod(int(anomaly_map.argmax()), w)
    return {
        "score": float(result.score[k]),
        "normalized_score": float(result.normalized_score[k]),
        "is_anomaly": bool(result.is_anomaly[k]),
        "peak_x": (px + 0.5) * info["width"] / w,
        "peak_y": (py + 0.5) * info["height"] / h,
        "anomalous_area": float((anomaly_map > pixel_threshold).mean()),
        "mean_intensity": float(result.mean_intensity[k])
        if result.mean_intensity is not None
        else np.nan,
    }


def _top_heatmaps(
    scorer: BatchScorer, folder: Path, table: pd.DataFrame, paths: list[Path], n: int
) -> pd.DataFrame:
    real = {display_path(p.relative_to(folder)): p for p in paths}
    scored = table[table["error"] == ""].nlargest(n, "score")
    for index, row in scored.iterrows():
        if row["heatmap"]:
            continue
        path = real.get(row["relative_path"])
        if path is None or is_nifti(path):
            continue  # volume rows keep the worst-slice heatmap rule of their scan
        result = scorer.detector.predict_files([path])
        name = Path("heatmaps") / _heatmap_name(row["relative_path"])
        _save_heatmap(
            path,
            scorer.output / name,
            result.anomaly_map[0, 0],
            scorer.pixel_threshold,
            scorer.vmax,
        )
        table.loc[index, "heatmap"] = name.as_posix()
    return table


def channel_warnings(ok: pd.DataFrame, metadata: dict[str, Any]) -> list[str]:
    """Plain words when files carry other channels than the model was trained on."""
    model_channels = int((metadata.get("preprocessing") or {}).get("channels", 0) or 0)
    channels = ok["channels"].astype("float64")
    out = []
    colour_into_grey = int((channels == 3).sum()) if model_channels == 1 else 0
    grey_into_colour = int((channels == 1).sum()) if model_channels == 3 else 0
    if colour_into_grey:
        out.append(
            f"{colour_into_grey} colour images were turned into grey (luma) for this grey "
            "model: a defect that changes only the colour, not the brightness, is invisible "
            "to it. Train on colour images if colour matters."
        )
    if grey_into_colour:
        out.append(
            f"{grey_into_colour} grey images were scored by a colour model (the grey value "
            "copied to R, G and B); the model never saw grey parts in training."
        )
    return out


def _target_fpr(metadata: dict[str, Any]) -> float | None:
    """The false-positive rate the model's threshold was set for (normal-only calibration)."""
    image = (metadata.get("calibration") or {}).get("image") or {}
    if image.get("method") != "normal_quantile":
        return None  # a labelled threshold promises no normal flag rate
    value = image.get("target_fpr")
    if not value:
        return None
    # with few normals the threshold cannot promise less than 1/(n+1)
    return max(float(value), float(image.get("min_achievable_fpr") or 0.0))


def summarize(
    table: pd.DataFrame,
    metadata: dict[str, Any],
    n_scored_now: int,
    seconds: float,
    config: ScanConfig,
) -> dict[str, Any]:
    """Counts, anomaly rate, score quantiles, errors, throughput and the model card."""
    ok = table[table["error"] == ""]
    scores = ok["score"].to_numpy(dtype=float)
    quantiles = (
        {
            f"q{int(q * 100):02d}": float(np.quantile(scores, q))
            for q in (0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
        }
        if len(scores)
        else {}
    )
    return {
        "n_files": int(len(table)),
        "n_scored": int(len(ok)),
        "n_errors": int(len(table) - len(ok)),
        "n_anomalies": int(ok["is_anomaly"].sum()),
        "anomaly_rate": float(ok["is_anomaly"].mean()) if len(ok) else 0.0,
        "score_quantiles": quantiles,
        "errors": table.loc[table["error"] != "", ["relative_path", "error"]]
        .head(1000)
        .to_dict(orient="records"),
        "throughput": {
            "files_this_run": n_scored_now,
            "seconds_this_run": seconds,
            "images_per_second": n_scored_now / seconds if seconds > 0 else 0.0,
        },
        "drift": drift_report(
            ok["is_anomaly"].to_numpy(dtype=bool),
            ok["mean_intensity"].to_numpy(dtype=float),
            _target_fpr(metadata),
            metadata.get("normal_intensity"),
            channel_warnings(ok, metadata),
        ),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "model": metadata,
    }
