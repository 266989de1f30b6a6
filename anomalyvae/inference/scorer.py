"""A scan's scoring: decoded files into result rows, with their heatmaps and maps.

:class:`BatchScorer` is what every engine runs (the local engine in the scan's process,
the Ray engine in each inference actor), so a row is the same whichever engine made it;
:func:`top_heatmaps` draws the ``--heatmaps top-N`` pictures after the scan. No torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from anomalyvae.imaging.files import display_path
from anomalyvae.imaging.frames import FrameInput
from anomalyvae.imaging.io import ImageReadError, read_image
from anomalyvae.imaging.medical import is_nifti, normalize_intensity
from anomalyvae.imaging.preprocessing import load_frames, preprocess
from anomalyvae.imaging.tiles import map_to_size
from anomalyvae.imaging.volumes import VolumeInput, read_slice, slice_name, write_volume_map
from anomalyvae.inference.decoding import Decoded
from anomalyvae.inference.heatmaps import heatmap_name, output_name, save_heatmap, save_map
from anomalyvae.inference.records import Job, file_rows
from anomalyvae.inference.runtime import OnnxDetector

if TYPE_CHECKING:
    from anomalyvae.inference.scan import ScanConfig


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
        images = [(d, job) for d, job in batch if d.pixels is not None and "slices" not in d.info]
        result, position = None, {d.index: k for k, (d, _) in enumerate(images)}
        if images:
            result = self._predict(np.stack([d.pixels for d, _ in images]))
        out: list[dict[str, Any]] = []
        for item, job in batch:
            if item.pixels is None:
                out.append(self._base_row(item, job, job.relative))
            elif "slices" in item.info:  # scored a block of slices at a time
                try:
                    out.extend(self._volume_rows(item, job))
                except ImageReadError as error:  # a later slice or frame is unreadable:
                    # the file gets no verdict, as a file unreadable from the start
                    info = {**item.info, "error": f"{error.reason} ({error.fix})"}
                    out.append(self._base_row(item._replace(info=info), job, job.relative))
            else:
                out.append(self._image_row(item, job, position[item.index], result))
        return out

    def _predict(self, inputs: NDArray[np.float32]) -> Any:
        result = self.detector.predict_arrays(inputs, self.threshold)
        # the drift alarm compares these with the calibration normals' (drift.py)
        flat = inputs.reshape(len(inputs), -1)
        return result._replace(mean_intensity=flat.mean(axis=1), contrast=flat.std(axis=1))

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
            "is_anomaly": pd.NA,  # no verdict without a score
            "threshold": self.threshold,
            "peak_x": np.nan,
            "peak_y": np.nan,
            "anomalous_area": np.nan,
            "mean_intensity": np.nan,
            "contrast": np.nan,
            "heatmap": "",
            "error": item.info["error"],
            "model_hash": self.detector.model_hash,
        }

    def _image_row(self, item: Decoded, job: Job, k: int, result: Any) -> dict[str, Any]:
        row = self._base_row(item, job, job.relative)
        row.update(_score_fields(result, k, item.info, self.pixel_threshold))
        anomaly_map = result.anomaly_map[k, 0]
        if self._wants_heatmap(row["is_anomaly"]):
            name = Path("heatmaps") / heatmap_name(job.relative)
            save_heatmap(job.path, self.output / name, anomaly_map, self.pixel_threshold, self.vmax)
            row["heatmap"] = name.as_posix()
        if self.config.save_maps:  # at the file's own resolution
            save_map(
                self.output / "maps" / output_name(job.relative, ".npz"),
                map_to_size(anomaly_map, int(item.info["height"]), int(item.info["width"])),
            )
        return row

    def _volume_rows(self, item: Decoded, job: Job) -> list[dict[str, Any]]:
        """One row per slice (``path#slice=NNNN``) and one for the volume (its worst slice).

        A multi-frame file (pages, animation frames) is scored the same way, a row per
        frame. The slices are read and scored a block at a time: memory holds one block
        (and, with ``save_maps``, the file's maps at model resolution).
        """
        source = item.pixels
        if isinstance(source, (VolumeInput, FrameInput)):
            blocks = source.blocks(self.detector.batch_size)
        else:  # a stack already decoded (the Ray engine sends volumes so)
            step = self.detector.batch_size
            numbers = np.asarray(item.info.get("frames", range(len(source))), dtype=np.int64)
            blocks = (
                (numbers[s : s + step], source[s : s + step]) for s in range(0, len(source), step)
            )
        out: list[dict[str, Any]] = []
        worst, worst_map, maps = -1, None, []
        for index, block in blocks:
            result = self._predict(block)
            facts = _frame_facts(source, item.info)  # the frames of this block are read
            for j, k in enumerate(index):
                row = self._base_row(item, job, slice_name(job.relative, int(k)))
                row.update(facts.get(int(k), {}))  # a page's own size (pages may differ)
                fields = _score_fields(result, j, row, self.pixel_threshold)
                row.update(slice=int(k), **fields)
                out.append(row)
                if worst < 0 or row["score"] > out[worst]["score"]:
                    worst, worst_map = len(out) - 1, result.anomaly_map[j, 0].copy()
            if self.config.save_maps:
                maps.append(result.anomaly_map[:, 0].copy())
        volume = dict(out[worst])
        volume["relative_path"] = job.relative  # the volume row: max over slices
        volume["slice"] = pd.NA
        out.append(volume)
        nifti = is_nifti(job.path)
        if self.config.save_maps and nifti:
            write_volume_map(
                job.path,
                self.output / "maps" / output_name(job.relative, ".map.nii.gz"),
                np.concatenate(maps),
            )
        elif self.config.save_maps:  # a frame's map at its own size, as an image's
            for row, anomaly_map in zip(out[:-1], np.concatenate(maps), strict=True):
                name = output_name(slice_name(job.relative, int(row["slice"])), ".npz")
                size = (int(row["height"]), int(row["width"]))
                save_map(self.output / "maps" / name, map_to_size(anomaly_map, *size))
        if self._wants_heatmap(volume["is_anomaly"]):
            k = int(out[worst]["slice"])
            name = Path("heatmaps") / heatmap_name(slice_name(job.relative, k))
            save_heatmap(
                job.path,
                self.output / name,
                worst_map,
                self.pixel_threshold,
                self.vmax,
                _part_picture(job.path, k),
            )
            volume["heatmap"] = out[worst]["heatmap"] = name.as_posix()
        return out


def _frame_facts(source: Any, info: dict[str, Any]) -> dict[int, dict[str, int]]:
    """Each frame's own width, height, channels and bit depth, by frame number.

    A multi-frame file read here records them as it reads (:class:`FrameInput`); one
    the Ray engine decoded carries them in ``info["frame_facts"]``. Volumes: none (every
    slice has the volume's size).
    """
    if isinstance(source, FrameInput):
        return source.facts
    return {int(k): v for k, v in (info.get("frame_facts") or {}).items()}


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
        "contrast": float(result.contrast[k]) if result.contrast is not None else np.nan,
    }


def _worst_part_input(
    path: Path, k: int, spec: Any
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Slice or frame ``k`` of a volume or multi-frame file, as the scan scored it.

    Returns the model input (1, c, h, w) and the picture its heatmap is drawn on.
    """
    if is_nifti(path):
        volume = VolumeInput(path, spec)  # the slice normalized with the volume's range
        inputs = preprocess(volume.plane(read_slice(path, k)), spec)[None]
    else:
        inputs = next(load_frames(path, spec, [k]))[1][None]
    return inputs, _part_picture(path, k)


def _part_picture(path: Path, k: int) -> NDArray[np.float32]:
    """Slice or frame ``k`` of a volume or multi-frame file as a heatmap's background."""
    if is_nifti(path):
        return normalize_intensity(read_slice(path, k)[..., None], "minmax")
    return read_image(path, 512, frame=k).pixels


def top_heatmaps(
    scorer: BatchScorer, folder: Path, table: pd.DataFrame, paths: list[Path], n: int
) -> pd.DataFrame:
    """Heatmaps of the ``n`` highest-scoring files, drawn after the scan.

    A volume or multi-frame file gets its worst slice or frame's. A file that changed or
    went since it was scored keeps its row without one.
    """
    real = {display_path(p.relative_to(folder)): p for p in paths}
    files = file_rows(table)
    for index, row in files[files["error"] == ""].nlargest(n, "score").iterrows():
        path = real.get(row["relative_path"])
        if row["heatmap"] or path is None:
            continue
        parts = table[(table["source"] == row["source"]) & table["slice"].notna()]
        try:
            if len(parts):
                worst = parts["score"].idxmax()
                k = int(parts.loc[worst, "slice"])
                inputs, pixels = _worst_part_input(path, k, scorer.detector.preprocessing)
                name = Path("heatmaps") / heatmap_name(slice_name(row["relative_path"], k))
                rows = [index, worst]
            else:
                inputs, pixels = scorer.detector.load_files([path]), None
                name = Path("heatmaps") / heatmap_name(row["relative_path"])
                rows = [index]
            result = scorer.detector.predict_arrays(inputs, scorer.threshold)
        except ImageReadError:
            continue
        save_heatmap(
            path,
            scorer.output / name,
            result.anomaly_map[0, 0],
            scorer.pixel_threshold,
            scorer.vmax,
            pixels,
        )
        table.loc[rows, "heatmap"] = name.as_posix()
    return table
