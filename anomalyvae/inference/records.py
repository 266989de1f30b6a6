"""A scan's record: result rows in atomic Parquet parts, and the rules around them.

The resume rule, the output folder's lock and its claim to one input folder, and
spreadsheet-safe tables.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from anomalyvae.errors import AnomalyVAEError
from anomalyvae.imaging.files import atomic_path, atomic_write_bytes, display_path
from anomalyvae.inference.decoding import file_fingerprint

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
    "contrast",
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
    # nullable: a file that could not be scored has no verdict (NA, an empty CSV cell),
    # never a "normal" that a filter on the column would pass
    "is_anomaly": "boolean",
    "threshold": "float64",
    "peak_x": "float64",
    "peak_y": "float64",
    "anomalous_area": "float64",
    "mean_intensity": "float64",
    "contrast": "float64",
    "heatmap": "string",
    "error": "string",
    "model_hash": "string",
}


def file_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Each file's own row: what counts as files.

    An image's row, and a volume's or multi-frame file's own row (its worst slice or
    frame), not the rows of its slices or frames.
    """
    return table[table["slice"].isna()] if "slice" in table.columns else table


def typed_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The results schema with fixed dtypes, also for an empty table."""
    return frame.reindex(columns=list(COLUMNS)).astype(DTYPES)


def atomic_frame(frame: pd.DataFrame, path: Path, kind: str) -> None:
    """Write ``frame`` to ``path`` atomically: "parquet", or spreadsheet-safe "csv"."""
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


def read_parts(parts_dir: Path) -> pd.DataFrame:
    """Every row the part files hold, the latest row of a file winning."""
    frames = []
    for part in sorted(parts_dir.glob("part-*.parquet")):
        try:
            frames.append(pd.read_parquet(part))
        except Exception:  # a part is renamed into place whole; anything else is foreign
            continue
    if not frames:
        return typed_frame(pd.DataFrame(columns=list(COLUMNS)))
    # Later parts win: a file rescored after a change replaces its earlier row.
    merged = typed_frame(pd.concat(frames, ignore_index=True))
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
    """Collects result rows and writes them as numbered Parquet parts, each atomically.

    A part is written every ``chunk_rows`` rows or every ``flush_s`` seconds, whichever
    comes first, so a kill loses at most that much work even on a slow model.
    """

    def __init__(self, parts_dir: Path, chunk_rows: int, flush_s: float = 30.0) -> None:
        self.parts_dir = parts_dir
        self.chunk_rows = chunk_rows
        self.flush_s = flush_s
        self.rows: list[dict[str, Any]] = []
        self.last_flush = time.monotonic()
        self.next_part = 1 + max(
            (int(p.stem.split("-")[1]) for p in parts_dir.glob("part-*.parquet")), default=-1
        )

    def add(self, rows: Sequence[dict[str, Any]]) -> None:
        self.rows.extend(rows)
        due = time.monotonic() - self.last_flush >= self.flush_s
        if len(self.rows) >= self.chunk_rows or (self.rows and due):
            self.flush()

    def flush(self) -> None:
        if self.rows:
            atomic_frame(
                typed_frame(pd.DataFrame(self.rows, columns=list(COLUMNS))),
                self.parts_dir / f"part-{self.next_part:06d}.parquet",
                "parquet",
            )
            self.next_part += 1
            self.rows = []
        self.last_flush = time.monotonic()


def todo_jobs(
    folder: Path,
    paths: Sequence[Path],
    parts_dir: Path,
    model_hash: str,
    threshold: float,
    heatmaps: str = "none",
) -> list[Job]:
    """The files not yet scored by this model at this threshold (the resume rule).

    A file scored without the heatmap that ``heatmaps`` ("all", or "anomalies" for an
    anomaly) now asks for is not done either: a scan resumed with heatmaps turned on
    draws them for the files scored before.
    """
    done = read_parts(parts_dir)
    done_keys: dict[tuple[str, int, float], str] = {}
    if len(done):
        ok = done[
            (done["error"] == "")
            & (done["model_hash"] == model_hash)
            & (done["threshold"] == threshold)
        ]
        # a file's own row (an image's, or a volume's: not its slices') holds its heatmap
        whole = ok["slice"].isna()
        wanted = whole & ((heatmaps == "all") | ((heatmaps == "anomalies") & ok["is_anomaly"]))
        lacking = set(ok.loc[wanted.fillna(False) & (ok["heatmap"] == ""), "source"])
        ok = ok[~ok["source"].isin(lacking)]
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


class ScanOutputError(AnomalyVAEError, ValueError):
    """The scan cannot run: no images, or an output folder of another input folder."""


class ScanLockedError(ScanOutputError):
    """Another scan is writing to the same output folder."""


LOCK = ".scan.lock"


@contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """One scan at a time per output folder: a lock the operating system holds.

    Two scans writing one folder would lose rows. On POSIX the lock is ``flock`` on
    ``.scan.lock``: the kernel releases it when its process ends, even by kill -9, so a
    resume is never blocked and no stale lock is ever judged (or deleted) by a reader;
    the file holds the owner's PID for the message only, and its owner removes it.
    Elsewhere, a lock file created exclusively with the PID already in it
    (:func:`_exclusive_lock`).
    """
    try:
        import fcntl
    except ImportError:  # Windows
        with _exclusive_lock(output):
            yield
        return
    path = output / LOCK
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ScanLockedError(
                f"another scan (process {owner}) is writing to '{output}'; wait for it "
                "to finish, or write to another output folder with -o"
            ) from None
        try:  # the file may have been replaced between open and flock: lock the current one
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        # removed while still locked, then released: a process that opened the old file
        # and locks it afterwards finds the path gone (or another file) and retries
        path.unlink(missing_ok=True)
        os.close(fd)


@contextmanager
def _exclusive_lock(output: Path) -> Iterator[None]:
    """The lock without ``flock``: a file created exclusively, holding the owner's PID.

    The PID is written to a private file first and linked into place, so the lock is
    never seen empty; a lock whose process no longer runs is taken over.
    """
    path = output / LOCK
    mine = output / f"{LOCK}.{os.getpid()}"
    mine.write_text(str(os.getpid()))
    try:
        for _ in range(3):
            try:
                os.link(mine, path)
                break
            except FileExistsError:
                try:
                    owner = int(path.read_text().strip())
                except (OSError, ValueError):
                    owner = 0
                if owner and pid_alive(owner):
                    raise ScanLockedError(
                        f"another scan (process {owner}) is writing to '{output}'; wait for "
                        "it to finish, or write to another output folder with -o"
                    ) from None
                path.unlink(missing_ok=True)  # stale: its process is gone
        else:
            raise ScanLockedError(f"could not take the lock of '{output}'; try again")
    finally:
        mine.unlink(missing_ok=True)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (the lock holder of an output folder)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


MANIFEST = "scan.json"


def _refuse_foreign_files(output: Path) -> None:
    """Refuse an output folder that holds files of the user's own, not a scan.

    The scan writes results.csv, report.html and heatmaps/ there; a folder of other files
    (a parent of the input, a folder of earlier reports) would have them overwritten.
    Hidden entries (the scan's lock, a desktop's index files) do not count.
    """
    if not output.is_dir():
        return
    foreign = sorted(entry.name for entry in output.iterdir() if not entry.name.startswith("."))
    if foreign:
        shown = ", ".join(f"'{display_path(name)}'" for name in foreign[:3])
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise ScanOutputError(
            f"'{output}' already holds files that are not a scan ({shown}{more}): the scan "
            "would write its table, report and heatmaps among them; write to a new or empty "
            "folder with -o"
        )


def claim_output(output: Path, folder: Path, extend: bool = False) -> None:
    """Record which input folder ``output`` holds, or refuse a second one.

    An output folder never mixes two inputs silently: files of the same names in
    another folder would otherwise pass as "already done". A folder that holds other
    files and no scan is refused: nothing of the user's is overwritten.
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
    else:
        _refuse_foreign_files(output)
    if roots and root not in roots:
        if not extend:
            raise ScanOutputError(
                f"'{output}' holds a scan of '{roots[0]}', not of '{root}'; write to another "
                "output folder with -o, or pass --extend to add this folder's files to it"
            )
    if root not in roots:
        output.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(manifest, json.dumps({"input_roots": [*roots, root]}).encode())
