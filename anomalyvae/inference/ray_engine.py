"""The Ray engine of ``anomalyvae scan``: the same scan, sharded over a Ray cluster.

A Ray Data streaming pipeline: the to-do list (made by the driver, with the same resume
rule as the local engine) is split into blocks; decoding and preprocessing run as CPU
tasks; ONNX Runtime inference runs in a pool of actors, one InferenceSession each (one
GPU each when the cluster has GPUs). The actors write heatmaps and maps under the output
folder and return result rows; the driver writes the rows as the same atomic Parquet
parts the local engine writes, so the results, the report and resuming are identical.

Fault tolerance is Ray's: a decoding task whose worker dies is retried (Ray's default of
three retries for system failures), an inference actor that dies is restarted and its
batch retried (Ray Data's actor defaults: unlimited restarts and task retries). The
summary counts the files that had to be decoded or scored again. Usage statistics are
switched off.

The files to scan, and the output folder, must be reachable under the same path from
every node (a shared filesystem). The model travels through Ray's object store, so the
workers need no access to the model file.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from anomalyvae.errors import AnomalyVAEError
from anomalyvae.imaging.frames import FrameInput
from anomalyvae.imaging.io import ImageReadError
from anomalyvae.imaging.preprocessing import Preprocessing
from anomalyvae.imaging.volumes import VolumeInput
from anomalyvae.inference.decoding import Decoded, decode_file
from anomalyvae.inference.records import COLUMNS, Job
from anomalyvae.inference.runtime import OnnxDetector
from anomalyvae.inference.scan import ScanConfig
from anomalyvae.inference.scorer import BatchScorer

#: Ray reports usage statistics to its developers unless told not to.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

#: Files per block of the to-do list (a decoding task's unit of work and of retry).
FILES_PER_BLOCK = 64
#: Memory reserved per decoding task (bytes; a scheduling hint, not a limit).
DECODE_TASK_MEMORY = 256 * 2**20


class RayEngineError(AnomalyVAEError, RuntimeError):
    """Ray is missing, the cluster cannot be reached, or the Ray pipeline failed."""


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401 - the pipeline needs Ray Data, not just Ray core
    except ImportError as error:
        raise RayEngineError(
            "the Ray engine needs Ray: pip install 'anomalyvae[ray]' (or run without --engine ray)"
        ) from error
    return ray


def check_ray(address: str | None) -> None:
    """Fail fast, with the fix, when Ray is missing or ``address`` cannot be reached."""
    _import_ray()
    if address in (None, "auto", "local"):
        return
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise RayEngineError(
            f"Ray address {address!r} is not HOST:PORT or ray://HOST:PORT "
            "(e.g. 10.0.0.5:6379); `ray start --head` prints the address to use"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except OSError as error:
        raise RayEngineError(
            f"cannot reach a Ray cluster at {address} ({error}); start one with "
            "`ray start --head` on that machine, check the address and firewall, or leave "
            "out --address to run on a local Ray instance"
        ) from error


def connect(address: str | None, num_cpus: int | None = None) -> Any:
    """Join the cluster at ``address`` or start a local Ray instance; return ``ray``."""
    ray = _import_ray()
    check_ray(address)
    if ray.is_initialized():
        return ray
    env = {"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}}
    try:
        if address in (None, "local"):
            ray.init(
                num_cpus=num_cpus,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
                runtime_env=env,
            )
        else:
            ray.init(address=address, log_to_driver=False, runtime_env=env)
    except (ConnectionError, RuntimeError) as error:
        raise RayEngineError(
            f"could not join the Ray cluster at {address or 'a new local instance'}: {error}"
        ) from error
    return ray


class _Tally:
    """Counts work done by the pipeline's workers, so retries can be reported."""

    def __init__(self) -> None:
        self.counts = {"decoded": 0, "scored": 0, "actor_starts": 0}

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def get(self) -> dict[str, int]:
        return dict(self.counts)


def _decode_block(block: pd.DataFrame, spec: dict[str, Any], tally: Any) -> pd.DataFrame:
    """A Ray task: decode and preprocess a block of files (errors become error rows)."""
    preprocessing = Preprocessing.from_dict(spec)
    pixels, n_inputs, infos = [], [], []
    for index, path in zip(block["index"], block["path"], strict=True):
        decoded = decode_file(int(index), Path(os.fsdecode(path)), preprocessing)
        data, info = decoded.pixels, decoded.info
        stack = None
        if isinstance(data, (VolumeInput, FrameInput)):
            try:  # a volume or multi-frame file travels as its slices' model input
                stack = data.stack()
                if isinstance(data, FrameInput):  # each frame's own size, for its row
                    info = {**info, "frame_facts": {str(k): v for k, v in data.facts.items()}}
            except ImageReadError as error:  # a later slice or frame: the file errs whole
                info = {**info, "error": f"{error.reason} ({error.fix})"}
        elif data is not None:
            stack = data[None]
        if stack is None:
            pixels.append(b"")
            n_inputs.append(0)
        else:  # Ray's blocks are bytes
            pixels.append(np.ascontiguousarray(stack, dtype=np.float32).tobytes())
            n_inputs.append(len(stack))
        infos.append(json.dumps(info))
    tally.add.remote("decoded", len(block))
    out = block.copy()
    out["pixels"], out["n_inputs"], out["info"] = pixels, n_inputs, infos
    return out


class _Scorer:
    """A Ray actor: one ONNX Runtime session that turns decoded blocks into result rows."""

    def __init__(
        self,
        model_bytes: Any,
        model_hash: str,
        output: str,
        config: dict[str, Any],
        threshold: float,
        tally: Any,
        threads: int = 0,
    ) -> None:
        import ray

        if isinstance(model_bytes, list):  # [ObjectRef]: fetched here, held by the driver
            model_bytes = model_bytes[0]
        if isinstance(model_bytes, ray.ObjectRef):
            model_bytes = ray.get(model_bytes)
        folder = Path(tempfile.mkdtemp(prefix="anomalyvae-model-"))
        local = folder / "model.onnx"
        local.write_bytes(model_bytes)
        settings = ScanConfig(**{**config, "engine": "local"})
        detector = OnnxDetector(
            local,
            device=settings.device,
            batch_size=settings.batch_size,
            intra_op_threads=threads or None,
        )
        if detector.model_hash != model_hash:
            raise RayEngineError("the model a worker received differs from the driver's")
        self.scorer = BatchScorer(detector, Path(output), settings, threshold)
        self.tally = tally
        tally.add.remote("actor_starts")

    def __call__(self, block: pd.DataFrame) -> pd.DataFrame:
        c, h, w = self.scorer.detector.input_shape
        batch = []
        for row in block.itertuples(index=False):
            info = json.loads(row.info)
            pixels = None
            if row.n_inputs:
                stack = np.frombuffer(row.pixels, dtype=np.float32).reshape(row.n_inputs, c, h, w)
                pixels = stack if "slices" in info else stack[0]
            job = Job(
                int(row.index),
                Path(os.fsdecode(row.path)),
                str(row.relative),
                int(row.size),
                float(row.mtime),
                str(row.fingerprint),
            )
            batch.append((Decoded(int(row.index), pixels, info), job))
        rows = self.scorer.rows(batch)
        self.tally.add.remote("scored", len(block))
        return pd.DataFrame(rows, columns=list(COLUMNS))


def scan_on_ray(
    model: str | os.PathLike[str],
    scorer: Any,
    todo: Sequence[Any],
    writer: Any,
    bar: Any,
    scorer_class: type = _Scorer,
) -> dict[str, Any]:
    """Run the to-do list through Ray; rows go to ``writer`` as blocks finish.

    ``scorer`` is the driver's :class:`anomalyvae.inference.scorer.BatchScorer` (its detector,
    configuration and threshold are what the actors reproduce).
    """
    from dataclasses import asdict

    config = scorer.config
    ray = connect(config.address)
    gpus = float(ray.cluster_resources().get("GPU", 0))
    cpus = float(ray.cluster_resources().get("CPU", 1))
    n_actors = config.ray_workers or (int(gpus) if gpus >= 1 else max(1, int(cpus) // 2))
    # CPU clusters: each actor runs a one-thread session and the CPUs left over decode.
    # Actors never take every CPU, or the decoding tasks could not be scheduled.
    actor_cpus = 1.0 if gpus >= 1 else min(1.0, max(cpus - 1, cpus / 2) / n_actors)
    decode_cpus = 1.0 if cpus >= 2 else 0.5
    tally = ray.remote(num_cpus=0)(_Tally).remote()
    model_ref = ray.put(Path(model).read_bytes())
    items = [
        {
            "index": job.index,
            "path": os.fsencode(job.path),
            "relative": job.relative,
            "size": job.size,
            "mtime": job.mtime,
            "fingerprint": job.fingerprint,
        }
        for job in todo
    ]
    # enough blocks to keep every actor busy, at most FILES_PER_BLOCK files in each
    n_blocks = min(len(items), max(2 * n_actors, -(-len(items) // FILES_PER_BLOCK)))
    # Ray Data logs its plan and progress at INFO; the scan has its own progress bar,
    # and failures surface as exceptions
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the scan shows its own progress bar
    context.enable_auto_log_stats = False
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()}
    dataset = (
        ray.data.from_items(items, override_num_blocks=n_blocks)
        .map_batches(
            _decode_block,
            batch_size=None,
            batch_format="pandas",
            fn_kwargs={"spec": scorer.detector.preprocessing.to_dict(), "tally": tally},
            num_cpus=decode_cpus,
            # a decoding task holds one image at full size at a time plus its block of
            # model inputs; the reservation also keeps Ray Data from fusing decoding
            # into the inference actors (fused, each actor would decode serially)
            memory=DECODE_TASK_MEMORY,
        )
        .map_batches(
            scorer_class,
            batch_size=config.batch_size,
            batch_format="pandas",
            fn_constructor_kwargs={
                # nested in a list: a restarted actor fetches it again from the store
                "model_bytes": [model_ref],
                "model_hash": scorer.detector.model_hash,
                "output": str(scorer.output),
                "config": settings,
                "threshold": scorer.threshold,
                "tally": tally,
                "threads": 0 if gpus >= 1 else 1,
            },
            compute=ray.data.ActorPoolStrategy(size=n_actors),
            num_cpus=actor_cpus,
            num_gpus=1 if gpus >= 1 else 0,
        )
    )
    try:
        for frame in dataset.iter_batches(batch_size=None, batch_format="pandas"):
            rows = frame.to_dict(orient="records")
            writer.add(rows)
            bar.update(int(frame["slice"].isna().sum()))  # files, not volume slices
    except Exception as error:
        writer.flush()  # keep every row that did arrive; a rerun resumes from there
        raise RayEngineError(
            f"the Ray scan failed ({type(error).__name__}: {str(error).splitlines()[0]}); "
            "rows already written are kept, rerun the same command to resume"
        ) from error
    counts = ray.get(tally.get.remote())
    ray.kill(tally)
    return {
        "engine": "ray",
        "address": config.address or "local",
        "inference_actors": n_actors,
        "gpus_per_actor": 1 if gpus >= 1 else 0,
        "cpus_per_actor": actor_cpus,
        "cluster_cpus": cpus,
        "cluster_gpus": gpus,
        "retried": {
            "actor_restarts": max(0, counts["actor_starts"] - n_actors),
            "files_decoded_again": max(0, counts["decoded"] - len(todo)),
            "files_scored_again": max(0, counts["scored"] - len(todo)),
        },
    }
