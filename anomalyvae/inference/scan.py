"""Scan a folder with an exported model: a results table, heatmaps and a QA report.

Streaming and resumable: files are decoded on a worker pool while ONNX Runtime scores
batches; at most a few batches are in flight, so memory does not grow with the folder.
Results go to numbered Parquet part files, each written atomically, so a scan killed at
any moment and restarted skips what is done and loses nothing. Unreadable files become
rows with an ``error``; the scan goes on. No torch on this path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from anomalyvae.errors import InvalidValueError
from anomalyvae.imaging.files import (
    atomic_write_bytes,
    display_path,
    walk_images,
)
from anomalyvae.inference.contract import check_threshold
from anomalyvae.inference.decoding import (
    SCAN_EXTENSIONS,
    Decoded,
    decode_stream,
    describe_others,
    not_scanned_note,
)
from anomalyvae.inference.records import (
    MANIFEST,
    Job,
    PartWriter,
    ScanOutputError,
    atomic_frame,
    claim_output,
    file_rows,
    output_lock,
    read_parts,
    todo_jobs,
)
from anomalyvae.inference.runtime import OnnxDetector
from anomalyvae.inference.scorer import BatchScorer, top_heatmaps
from anomalyvae.inference.summary import summarize
from anomalyvae.progress import progress_bar

#: A scan engine: ``engine(model_path, scorer, todo, writer, bar) -> info`` scores every
#: job of ``todo`` with ``scorer`` and hands the rows to ``writer``; ``info`` (a dict)
#: lands in summary.json. The local engine is :func:`_scan_local`'s loop.
Engine = Callable[..., dict[str, Any]]

#: Exit codes of ``anomalyvae scan`` (documented in docs/cli.md).
EXIT_OK = 0
EXIT_ANOMALIES = 3
EXIT_UNREADABLE = 4
HEATMAP_MODES = ("anomalies", "all", "none")


@dataclass(frozen=True)
class ScanConfig:
    """How to scan.

    Attributes
    ----------
    include, exclude : tuple of str
        Glob patterns on the path relative to the folder (``fnmatch``; ``*`` spans
        folders). A file is scanned when it matches some include (or none are given)
        and no exclude.
    batch_size : int or None
        Images per ONNX Runtime call; None (default) sizes it from the model input
        (:func:`anomalyvae.imaging.tiles.auto_batch_size`: two 256 x 256 images'
        worth of pixels), which keeps a scan near 1 GB whatever the input size.
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
    flush_s : float
        A part file is also written when this many seconds passed since the last one,
        so a kill loses at most that much time on a slow model.
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
    batch_size: int | None = None
    workers: int = 2
    executor: str = "thread"
    heatmaps: str = "anomalies"
    save_maps: bool = False
    threshold: float | None = None
    chunk_rows: int = 512
    flush_s: float = 30.0
    device: str = "auto"
    report_top: int = 24
    engine: str = "local"
    address: str | None = None
    ray_workers: int | None = None
    extend: bool = False

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
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
        if self.address and self.engine != "ray":
            raise InvalidValueError("an address needs the Ray engine (--engine ray)")
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

    def exit_code(self, strict: bool = False, fail_on_anomaly: bool = False) -> int:
        """The documented exit status: unreadable files (``strict``) first, then anomalies."""
        if strict and self.n_errors:
            return EXIT_UNREADABLE
        if fail_on_anomaly and self.n_anomalies:
            return EXIT_ANOMALIES
        return EXIT_OK

    def describe(self) -> tuple[list[str], list[str]]:
        """What ``anomalyvae scan`` prints: lines for stdout and warnings for stderr."""
        out = [
            f"{self.n_files} files: {self.n_anomalies} anomalies, {self.n_errors} unreadable "
            f"({self.n_scored_now} scored now, {self.n_skipped_done} already done) in "
            f"{self.seconds:.1f} s.",
            f"Report: {self.output / 'report.html'}",
            f"Table: {self.output / 'results.parquet'}",
        ]
        warnings = [f"Drift alarm: {w}" for w in self.summary.get("drift", {}).get("warnings", [])]
        warnings += [
            f"Skipped '{earlier}': an earlier scan's output, not input"
            for earlier in self.summary.get("skipped_scan_outputs", [])
        ]
        others = self.summary.get("other_files") or {}
        if others:
            warnings.append(not_scanned_note(others))
        return out, warnings


# --------------------------------------------------------------------------- scanning


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
        for item in decode_stream(pool, paths, scorer.detector.preprocessing, in_flight):
            batch.append((item, todo[item.index]))
            if len(batch) >= config.batch_size:
                run_batch()
        if batch:
            run_batch()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return {"engine": "local", "workers": config.workers, "executor": config.executor}


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
    config = dataclasses.replace(config, batch_size=detector.batch_size)  # auto resolved
    threshold = detector.threshold if config.threshold is None else float(config.threshold)
    if os.path.realpath(output) == os.path.realpath(folder):
        raise ScanOutputError(
            f"the output folder is the input folder '{folder}': the scan's table, report and "
            f"heatmaps would sit among the images; write them elsewhere with -o (e.g. "
            f"'{folder.name}-scan' beside it)"
        )
    # an earlier scan's output inside the input (marked by its manifest) is not input
    earlier_outputs: list[Path] = []
    others: Counter[str] = Counter()
    paths = walk_images(
        folder,
        SCAN_EXTENSIONS,
        include=config.include,
        exclude=config.exclude,
        skip=[output],
        skip_marked=MANIFEST,
        skipped=earlier_outputs,
        others=others,
    )
    if not paths:
        found = f"; it holds {describe_others(others)}" if others else ""
        raise ScanOutputError(
            f"no image files under '{folder}' (looked for {', '.join(SCAN_EXTENSIONS)}, "
            f"minus --exclude{found}); nothing was written"
        )
    parts_dir = output / "parts"
    claim_output(output, folder, config.extend)
    parts_dir.mkdir(parents=True, exist_ok=True)
    todo = todo_jobs(folder, paths, parts_dir, detector.model_hash, threshold, config.heatmaps)
    n_done = len(paths) - len(todo)
    writer = PartWriter(parts_dir, config.chunk_rows, config.flush_s)
    scorer = BatchScorer(detector, output, config, threshold)
    bar = progress_bar(
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
    finally:
        writer.flush()  # rows already scored are kept, on Ctrl-C too
        bar.close()
    scan_seconds = time.monotonic() - scan_started

    table = read_parts(parts_dir)
    present = {display_path(p.relative_to(folder)) for p in paths}
    table = table[table["source"].isin(present)]  # rows of files no longer there go
    table = table.sort_values("relative_path", kind="stable").reset_index(drop=True)
    n_top = top_n(config.heatmaps)
    if n_top:
        table = top_heatmaps(scorer, folder, table, paths, n_top)
    atomic_frame(table, output / "results.parquet", "parquet")
    atomic_frame(table, output / "results.csv", "csv")
    summary = summarize(table, detector.metadata, len(todo), scan_seconds, config)
    summary["skipped_scan_outputs"] = [display_path(p.relative_to(folder)) for p in earlier_outputs]
    summary["other_files"] = dict(sorted(others.items(), key=lambda item: (-item[1], item[0])))
    summary["engine"] = engine_info
    atomic_write_bytes(output / "summary.json", json.dumps(summary, indent=2).encode())

    from anomalyvae.inference.report import write_report

    write_report(
        table, summary, output / "report.html", output, folder=folder, top=config.report_top
    )
    files = file_rows(table)  # a volume or multi-frame file counts once
    return ScanSummary(
        output,
        len(files),
        len(todo),
        n_done,
        int((files["error"] != "").sum()),
        int(files["is_anomaly"].sum()),
        time.monotonic() - started,
        summary,
    )
