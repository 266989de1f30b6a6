"""Scan a folder with an exported model: a results table, heatmaps and a QA report.

Streaming and resumable: files are decoded on a worker pool while ONNX Runtime scores
batches; at most a few batches are in flight, so memory does not grow with the folder.
Results go to numbered Parquet part files, each written atomically, so a scan killed at
any moment and restarted skips what is done and loses nothing. Unreadable files become
rows with an ``error``; the scan goes on. No torch on this path.
"""

from __future__ import annotations

import fnmatch
import json
import os
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from PIL import Image
from tqdm.auto import tqdm

from anomalyvae.io import (
    IMAGE_EXTENSIONS,
    MEDICAL_EXTENSIONS,
    ImageReadError,
    Preprocessing,
    atomic_path,
    atomic_write_bytes,
    has_image_name,
    intensities,
    preprocess,
    read_image,
    read_volume,
    volume_slices,
)
from anomalyvae.medical import is_nifti, normalize_intensity
from anomalyvae.runtime import OnnxDetector

#: Exit codes of ``anomalyvae scan`` (documented in docs/cli.md).
EXIT_OK = 0
EXIT_ANOMALIES = 3
EXIT_UNREADABLE = 4
HEATMAP_MODES = ("anomalies", "all", "none")
COLUMNS = (
    "path",
    "relative_path",
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
    "heatmap",
    "error",
    "model_hash",
)
DTYPES = {
    "path": "string",
    "relative_path": "string",
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

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.executor not in ("thread", "process"):
            raise ValueError(f"executor must be 'thread' or 'process', got {self.executor!r}")
        if self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {self.chunk_rows}")
        top_n(self.heatmaps)  # validates


def top_n(heatmaps: str) -> int | None:
    """N of a "top-N" heatmap mode, None for the other modes; rejects unknown modes."""
    if heatmaps in HEATMAP_MODES:
        return None
    if heatmaps.startswith("top-") and heatmaps[4:].isdigit() and int(heatmaps[4:]) > 0:
        return int(heatmaps[4:])
    raise ValueError(
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


def display_path(path: Path) -> str:
    """A path as text that survives any file name (undecodable bytes become \\xNN)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def discover(
    root: str | os.PathLike[str],
    extensions: Sequence[str] = IMAGE_EXTENSIONS + EXTRA_EXTENSIONS + MEDICAL_EXTENSIONS,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> list[Path]:
    """Image files under ``root`` in a stable order; symlinked folders are entered once.

    A symlink loop, or two links to the same folder, cannot make a file appear twice:
    each real folder is walked only the first time it is reached.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"'{root}' is not a folder")
    wanted = {e.lower() for e in extensions}
    seen: set[str] = set()
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or not has_image_name(path, wanted):
                continue
            relative = display_path(path.relative_to(root))
            if include and not any(fnmatch.fnmatch(relative, p) for p in include):
                continue
            if any(fnmatch.fnmatch(relative, p) for p in exclude):
                continue
            found.append(path)
    return found


# --------------------------------------------------------------------------- decoding


class Decoded(NamedTuple):
    """A worker's result for one file: the model input or an error, and file facts."""

    index: int
    pixels: NDArray[np.float32] | None
    info: dict[str, Any]


def _decode(index: int, path: Path, spec: Preprocessing) -> Decoded:
    info: dict[str, Any] = {
        "width": None,
        "height": None,
        "channels": None,
        "bit_depth": None,
        "error": "",
    }
    try:
        if is_nifti(path):
            return _decode_volume(index, path, spec, info)
        decoded = read_image(path)
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
        pending.append(executor.submit(_decode, index, path, spec))
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
            frame.to_csv(tmp, index=False)


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
    big = np.asarray(
        Image.fromarray(anomaly_map.astype(np.float32), mode="F").resize(
            (width, height), Image.Resampling.BILINEAR
        )
    )
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

    source = read_image(path).pixels if pixels is None else pixels
    image = heatmap_overlay(source, anomaly_map, pixel_threshold, vmax)
    buffer = _io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(out_path, buffer.getvalue())


def _heatmap_name(relative: str) -> str:
    # Keep the full name (a.png and a.jpg must not collide) and say what the file is.
    return relative.replace("\\", "_") + ".heatmap.png"


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


def scan(
    model: str | os.PathLike[str],
    folder: str | os.PathLike[str],
    output: str | os.PathLike[str],
    config: ScanConfig = ScanConfig(),  # noqa: B008 - frozen, so sharing is safe
    progress: bool = True,
) -> ScanSummary:
    """Scan ``folder`` with ``model`` into ``output`` (resuming what is already there).

    Writes ``results.parquet``, ``results.csv``, ``summary.json``, ``report.html``,
    ``heatmaps/`` and ``parts/`` (the resumable record) under ``output``.
    """
    started = time.monotonic()
    folder, output = Path(folder), Path(output)
    detector = OnnxDetector(model, device=config.device, batch_size=config.batch_size)
    threshold = detector.threshold if config.threshold is None else float(config.threshold)
    pixel_threshold = detector.pixel_threshold
    vmax = max(pixel_threshold * 2.0, 1e-6)
    heatmap_mode, n_top = config.heatmaps, top_n(config.heatmaps)

    paths = discover(folder, include=config.include, exclude=config.exclude)
    parts_dir = output / "parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    done = _read_parts(parts_dir)
    done_keys = set()
    if len(done):
        ok = done[
            (done["error"] == "")
            & (done["model_hash"] == detector.model_hash)
            & (done["threshold"] == threshold)
        ]
        done_keys = set(zip(ok["relative_path"], ok["file_size"], ok["mtime"], strict=True))

    todo: list[tuple[Path, str, int, float]] = []
    for path in paths:
        relative = display_path(path.relative_to(folder))
        try:
            stat = path.stat()
            size, mtime = int(stat.st_size), float(stat.st_mtime)
        except OSError:
            size, mtime = -1, float("nan")
        if (relative, size, mtime) not in done_keys:
            todo.append((path, relative, size, mtime))
    n_done = len(paths) - len(todo)
    next_part = 1 + max(
        (int(p.stem.split("-")[1]) for p in parts_dir.glob("part-*.parquet")), default=-1
    )

    rows: list[dict[str, Any]] = []

    def flush() -> None:
        nonlocal next_part, rows
        if rows:
            _atomic_frame(
                _typed(pd.DataFrame(rows, columns=list(COLUMNS))),
                parts_dir / f"part-{next_part:06d}.parquet",
                "parquet",
            )
            next_part += 1
            rows = []

    pool: Executor = (
        ThreadPoolExecutor(config.workers)
        if config.executor == "thread"
        else ProcessPoolExecutor(config.workers)
    )
    bar = tqdm(
        total=len(todo),
        desc="scanning",
        unit="img",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    batch: list[Decoded] = []

    def run_batch() -> None:
        good = [d for d in batch if d.pixels is not None]
        result = None
        if good:
            # a volume contributes one model input per slice
            stacked = np.concatenate(
                [d.pixels if "slices" in d.info else d.pixels[None] for d in good]
            )
            result = detector.predict_arrays(stacked, threshold)
        position, offset = {}, 0
        for d in good:
            position[d.index] = offset
            offset += d.info.get("slices", 1)
        for item in batch:
            if "slices" in item.info and item.index in position:
                rows.extend(_volume_rows(item, position[item.index], result))
                continue
            path, relative, _, _ = todo[item.index]
            row = _base_row(item, relative)
            if result is not None and item.index in position:
                k = position[item.index]
                row.update(_score_fields(result, k, item.info, pixel_threshold))
                anomaly_map = result.anomaly_map[k, 0]
                if heatmap_mode == "all" or (heatmap_mode == "anomalies" and row["is_anomaly"]):
                    name = Path("heatmaps") / _heatmap_name(relative)
                    _save_heatmap(path, output / name, anomaly_map, pixel_threshold, vmax)
                    row["heatmap"] = name.as_posix()
                if config.save_maps:
                    _save_map(output / "maps" / (relative + ".npz"), anomaly_map)
            rows.append(row)
        bar.update(len(batch))
        batch.clear()
        if len(rows) >= config.chunk_rows:
            flush()

    def _base_row(item: Decoded, relative: str) -> dict[str, Any]:
        """A row with the file's facts and no scores yet (what an unreadable file gets)."""
        path, _, size, mtime = todo[item.index]
        return {
            "path": display_path(path),
            "relative_path": relative,
            "file_size": size,
            "mtime": mtime,
            **{k: item.info[k] for k in ("width", "height", "channels", "bit_depth")},
            "score": np.nan,
            "normalized_score": np.nan,
            "is_anomaly": False,
            "threshold": threshold,
            "peak_x": np.nan,
            "peak_y": np.nan,
            "anomalous_area": np.nan,
            "heatmap": "",
            "error": item.info["error"],
            "model_hash": detector.model_hash,
        }

    def _volume_rows(item: Decoded, start: int, result: Any) -> list[dict[str, Any]]:
        """One row per slice (``path#slice=NNNN``) and one for the volume (its worst slice)."""
        path, relative, _, _ = todo[item.index]
        n = int(item.info["slices"])
        worst = int(np.argmax(result.score[start : start + n]))
        out = []
        for k in [*range(n), worst]:
            row = _base_row(item, f"{relative}#slice={k:04d}")
            row.update(channels=1, **_score_fields(result, start + k, item.info, pixel_threshold))
            out.append(row)
        volume = out[-1]
        volume["relative_path"] = relative  # the volume row: max over slices
        if config.save_maps:
            _save_volume_map(
                path,
                output / "maps" / (relative + ".map.nii.gz"),
                result.anomaly_map[start : start + n, 0],
            )
        if heatmap_mode == "all" or (heatmap_mode == "anomalies" and volume["is_anomaly"]):
            name = Path("heatmaps") / _heatmap_name(f"{relative}#slice={worst:04d}")
            plane = normalize_intensity(read_volume(path).data[worst][..., None], "minmax")
            _save_heatmap(
                path,
                output / name,
                result.anomaly_map[start + worst, 0],
                pixel_threshold,
                vmax,
                pixels=plane,
            )
            volume["heatmap"] = out[worst]["heatmap"] = name.as_posix()
        return out

    scan_started = time.monotonic()
    try:
        in_flight = max(2 * config.batch_size, 4 * config.workers)
        for item in _stream(pool, [t[0] for t in todo], detector.preprocessing, in_flight):
            batch.append(item)
            if len(batch) >= config.batch_size:
                run_batch()
        if batch:
            run_batch()
        flush()
    finally:
        bar.close()
        pool.shutdown(wait=True, cancel_futures=True)
    scan_seconds = time.monotonic() - scan_started

    table = _read_parts(parts_dir)
    present = {display_path(p.relative_to(folder)) for p in paths}
    # a volume's slice rows ("name#slice=NNNN") belong to the file "name"
    table = table[table["relative_path"].str.split("#slice=").str[0].isin(present)]
    table = table.sort_values("relative_path", kind="stable").reset_index(drop=True)
    if n_top:
        table = _top_heatmaps(detector, folder, output, table, paths, n_top, pixel_threshold, vmax)
    _atomic_frame(table, output / "results.parquet", "parquet")
    _atomic_frame(table, output / "results.csv", "csv")
    summary = summarize(table, detector.metadata, len(todo), scan_seconds, config)
    atomic_write_bytes(output / "summary.json", json.dumps(summary, indent=2).encode())

    from anomalyvae.report import write_report

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


def _save_map(path: Path, anomaly_map: NDArray[np.float32]) -> None:
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
    }


def _save_volume_map(source: Path, out_path: Path, maps: NDArray[np.float32]) -> None:
    """Write a volume's slice maps, resized to the slices, as NIfTI with the source affine."""
    import nibabel

    volume = read_volume(source)
    _, height, width = volume.data.shape
    planes = [
        np.asarray(
            Image.fromarray(m.astype(np.float32), mode="F").resize(
                (width, height), Image.Resampling.BILINEAR
            )
        )
        for m in maps
    ]
    data = np.moveaxis(np.stack(planes), 0, 2)  # back to the source's (x, y, slice) order
    with atomic_path(out_path, keep_suffix=True) as tmp:  # nibabel reads .nii.gz from the name
        nibabel.save(nibabel.Nifti1Image(data.astype(np.float32), volume.affine), str(tmp))


def _top_heatmaps(
    detector: OnnxDetector,
    folder: Path,
    output: Path,
    table: pd.DataFrame,
    paths: list[Path],
    n: int,
    pixel_threshold: float,
    vmax: float,
) -> pd.DataFrame:
    real = {display_path(p.relative_to(folder)): p for p in paths}
    scored = table[table["error"] == ""].nlargest(n, "score")
    for index, row in scored.iterrows():
        if row["heatmap"]:
            continue
        path = real[row["relative_path"]]
        result = detector.predict_files([path])
        name = Path("heatmaps") / _heatmap_name(row["relative_path"])
        _save_heatmap(path, output / name, result.anomaly_map[0, 0], pixel_threshold, vmax)
        table.loc[index, "heatmap"] = name.as_posix()
    return table


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
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "model": metadata,
    }
