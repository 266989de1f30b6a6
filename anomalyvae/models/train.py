"""Training loop: seeded, early-stopped on validation ELBO, checkpointed atomically each epoch."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from numpy.typing import NDArray

from anomalyvae.errors import InvalidValueError
from anomalyvae.models.checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from anomalyvae.models.vae import ConvVAE, VAEConfig, vae_loss
from anomalyvae.progress import progress_bar


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings.

    Attributes
    ----------
    epochs : int
        Upper bound on passes over the training images.
    batch_size : int
    learning_rate : float
        Adam step size (Kingma & Ba 2015).
    patience : int
        Stop after this many epochs without a better validation ELBO.
    time_budget_s : float or None
        Stop when this wall time (seconds) is spent: checked after every batch (one
        process) or every epoch (DistributedDataParallel, where ranks stay in step).
    augment : bool
        Random horizontal and vertical flips; suits textures and symmetric parts.
    seed : int
    device : str
        "cpu", "cuda" or "auto".
    nproc : int
        Processes to train with DistributedDataParallel on this machine (gloo on the
        CPU, nccl on GPUs); ``batch_size`` is per process. Under ``torchrun`` the
        processes come from the launcher instead and this is ignored.
    """

    epochs: int = 200
    batch_size: int = 32
    learning_rate: float = 1e-3
    patience: int = 20
    time_budget_s: float | None = None
    augment: bool = False
    seed: int = 0
    device: str = "cpu"
    nproc: int = 1

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise InvalidValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise InvalidValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.learning_rate <= 0:
            raise InvalidValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.patience < 1:
            raise InvalidValueError(f"patience must be >= 1, got {self.patience}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise InvalidValueError(f"time_budget_s must be > 0, got {self.time_budget_s}")
        if self.nproc < 1:
            raise InvalidValueError(f"nproc must be >= 1, got {self.nproc}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> TrainConfig:
        """The settings among an estimator's parameters (same names), the rest ignored."""
        return cls(**{f.name: params[f.name] for f in fields(cls) if f.name in params})


def resolve_device(device: str) -> torch.device:
    """Turn "auto" into cuda when present, else cpu; reject unavailable CUDA clearly."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidValueError(
            "device 'cuda' was requested but torch sees no CUDA device; use 'cpu'"
        )
    return torch.device(device)


class TrainResult(NamedTuple):
    """What :func:`train_vae` returns: the best model (eval mode) and the history."""

    model: ConvVAE
    history: list[dict[str, float]]
    best_epoch: int
    stopped_reason: str
    elapsed_s: float
    world_size: int = 1
    #: ``train_config`` and ``resume`` (last weights, optimizer, RNG, counters) of the
    #: last epoch, for a checkpoint from which training can go on; None when no epoch ran
    resume_state: dict[str, Any] | None = None


def _evaluate(
    model: ConvVAE, images: torch.Tensor, batch_size: int, device: torch.device, beta: float
) -> tuple[float, float]:
    """Mean loss and mean negative ELBO (nats per image) over ``images`` in eval mode."""
    model.eval()
    losses, elbos = [], []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device)
            terms = vae_loss(x, model(x), beta)
            losses.append(terms.loss.sum().item())
            elbos.append(terms.elbo.sum().item())
    return sum(losses) / len(images), sum(elbos) / len(images)


# --------------------------------------------------------------------------- distributed


def _process_group() -> Any:
    """``torch.distributed`` when a process group is running, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def is_main_process() -> bool:
    """True outside distributed training and on rank 0 inside it (who writes files)."""
    dist = _process_group()
    return dist is None or dist.get_rank() == 0


def _backend(device: torch.device) -> str:
    """The collective backend for ``device``: nccl for GPUs, gloo for the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def _join_launcher_group(device: torch.device) -> bool:
    """Start the process group a ``torchrun`` launch describes; True when this did it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or _process_group() is not None:
        return False
    import torch.distributed as dist

    dist.init_process_group(_backend(device))
    return True


#: Tries of the distributed start when another process takes its port first.
PORT_ATTEMPTS = 3


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _spawned_worker(
    rank: int,
    world: int,
    port: int,
    arguments: dict[str, Any],
) -> None:
    """One process of ``nproc`` local training: join the group, train, leave."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    device = resolve_device(arguments["train_config"].device)
    dist.init_process_group(_backend(device), rank=rank, world_size=world)
    try:
        settings = dict(arguments)
        extra = settings.pop("extra")
        train_x, val_x = settings.pop("train_x"), settings.pop("val_x")
        train_vae(
            train_images=train_x.numpy(),
            val_images=val_x.numpy(),
            checkpoint_extra=(lambda: dict(extra)) if extra else None,
            **settings,
        )
        # leave together: a rank that tears its group down while another still talks
        # to it can abort in the communication library's threads at exit
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _train_spawned(
    model_config: VAEConfig,
    train_config: TrainConfig,
    train_images: NDArray[np.float32],
    val_images: NDArray[np.float32],
    checkpoint_path: str | os.PathLike[str] | None,
    resume: bool,
    checkpoint_extra: Callable[[], dict[str, Any]] | None,
    progress: bool,
) -> TrainResult:
    """Train with ``train_config.nproc`` local processes; return rank 0's result.

    The images travel as shared-memory tensors (not copied per process); the result is
    read back from the checkpoint rank 0 writes.
    """
    import tempfile

    import torch.multiprocessing as mp

    scratch = None
    if checkpoint_path is None:
        scratch = tempfile.TemporaryDirectory(prefix="anomalyvae-ddp-")
        checkpoint_path = Path(scratch.name) / "train.pt"
    arguments = {
        "model_config": model_config,
        "train_config": train_config,
        "train_x": torch.from_numpy(np.ascontiguousarray(train_images)).share_memory_(),
        "val_x": torch.from_numpy(np.ascontiguousarray(val_images)).share_memory_(),
        "checkpoint_path": checkpoint_path,
        "resume": resume,
        "extra": checkpoint_extra() if checkpoint_extra is not None else {},
        "progress": progress,
    }
    try:
        for attempt in range(PORT_ATTEMPTS):
            try:
                mp.spawn(
                    _spawned_worker,
                    args=(train_config.nproc, _free_port(), arguments),
                    nprocs=train_config.nproc,
                    join=True,
                )
                break
            except mp.ProcessRaisedException as error:
                # the free port was taken by another process before rank 0 bound it (a
                # race no port choice avoids): nothing was trained yet, so try a new one
                if "EADDRINUSE" not in str(error) or attempt == PORT_ATTEMPTS - 1:
                    last = str(error).strip().splitlines()[-1]
                    raise RuntimeError(
                        f"distributed training failed in a worker process: {last}"
                    ) from error
        saved = read_checkpoint(checkpoint_path)
    finally:
        if scratch is not None:
            scratch.cleanup()
    model = ConvVAE(model_config)
    model.load_state_dict(saved["model_state"])
    model.eval()
    training = saved["training"]
    history = list(training["history"])
    return TrainResult(
        model,
        history,
        int(training["best_epoch"]),
        str(training["stopped_reason"]),
        history[-1]["elapsed_s"] if history else 0.0,
        int(training.get("world_size", train_config.nproc)),
        {"train_config": saved["train_config"], "resume": saved["resume"]}
        if saved.get("resume")
        else None,
    )


def train_vae(
    model_config: VAEConfig,
    train_config: TrainConfig,
    train_images: NDArray[np.float32],
    val_images: NDArray[np.float32],
    checkpoint_path: str | os.PathLike[str] | None = None,
    resume: bool = False,
    checkpoint_extra: Callable[[], dict[str, Any]] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Fit a :class:`ConvVAE` on normal images; early-stop on the validation ELBO.

    Parameters
    ----------
    train_images, val_images : ndarray of shape (n, c, h, w), float32 in [0, 1]
    checkpoint_path : path, optional
        Written atomically after every epoch: the best weights so far, plus what a
        resume needs (last weights, optimiser, RNG, counters).
    resume : bool
        Continue from ``checkpoint_path`` at the epoch after the saved one.
    checkpoint_extra : callable, optional
        Returns entries (preprocessing, scoring, data summary) stored in each checkpoint.
    """
    if len(train_images) == 0:
        raise InvalidValueError("no training images: the training set is empty")
    if len(val_images) == 0:
        raise InvalidValueError("no validation images: hold out at least one normal image")
    device = resolve_device(train_config.device)
    if train_config.nproc > 1 and _process_group() is None and "WORLD_SIZE" not in os.environ:
        return _train_spawned(
            model_config,
            train_config,
            train_images,
            val_images,
            checkpoint_path,
            resume,
            checkpoint_extra,
            progress,
        )
    _join_launcher_group(device)
    dist = _process_group()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    if dist is not None and device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    torch.manual_seed(train_config.seed)
    generator = torch.Generator().manual_seed(train_config.seed)
    model = ConvVAE(model_config).to(device)
    # every rank starts from rank 0's weights (DDP also broadcasts them at wrap time)
    network = (
        torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
        if dist is not None
        else model
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=train_config.learning_rate)
    # Each rank takes its own shard of a seeded shuffle of the training images; the
    # shards have equal length, so every rank takes the same number of steps.
    sampler = torch.utils.data.DistributedSampler(
        range(len(train_images)),
        num_replicas=world,
        rank=rank,
        shuffle=True,
        seed=train_config.seed,
    )
    train_x = torch.from_numpy(np.ascontiguousarray(train_images))
    val_x = torch.from_numpy(np.ascontiguousarray(val_images))

    start_epoch, best_val, best_epoch, stale, elapsed_before = 1, float("inf"), 0, 0, 0.0
    resume_state: dict[str, Any] | None = None  # how the last epoch could go on
    history: list[dict[str, float]] = []
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if resume:
        if checkpoint_path is None or not Path(checkpoint_path).exists():
            raise CheckpointError(f"cannot resume: checkpoint '{checkpoint_path}' does not exist")
        saved = read_checkpoint(checkpoint_path)
        if saved["model_config"] != model_config.to_dict():
            raise CheckpointError(
                f"cannot resume from '{checkpoint_path}': it was trained with a different "
                "model configuration; use the same settings or start without --resume"
            )
        run = saved["resume"]
        model.load_state_dict(run["model_state"])
        optimizer.load_state_dict(run["optimizer_state"])
        generator.set_state(run["generator_state"])
        torch.set_rng_state(run["torch_rng_state"])
        start_epoch = int(run["epoch"]) + 1
        stale = int(run["epochs_without_improvement"])
        elapsed_before = float(run["elapsed_s"])
        history = list(saved["training"]["history"])
        best_val = float(saved["training"]["best_val_elbo"])
        best_epoch = int(saved["training"]["best_epoch"])
        best_state = saved["model_state"]

    started = time.monotonic()
    stopped_reason = "max_epochs"
    bar = progress_bar(
        range(start_epoch, train_config.epochs + 1),
        desc="training",
        unit="epoch",
        disable=not progress or rank != 0,
        file=sys.stderr,
        initial=start_epoch - 1,
        total=train_config.epochs,
    )
    if start_epoch > train_config.epochs:
        stopped_reason = "already_complete"
    for epoch in bar:
        network.train()
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), dtype=torch.long)
        total_loss, total_elbo, seen = 0.0, 0.0, 0
        for start in range(0, len(order), train_config.batch_size):
            index = order[start : start + train_config.batch_size]
            if len(index) < 2 and len(train_x) > 1:
                continue  # BatchNorm needs two samples; drop a last batch of one
            x = train_x[index]
            if train_config.augment:
                flips = torch.rand(2, generator=generator)
                if flips[0] < 0.5:
                    x = x.flip(-1)
                if flips[1] < 0.5:
                    x = x.flip(-2)
            x = x.to(device)
            terms = vae_loss(x, network(x), model_config.beta)
            loss = terms.loss.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 100.0)
            optimizer.step()
            total_loss += terms.loss.sum().item()
            total_elbo += terms.elbo.sum().item()
            seen += len(index)
            if (
                dist is None  # under DDP every rank must take the same steps: epoch ends
                and train_config.time_budget_s is not None
                and elapsed_before + time.monotonic() - started >= train_config.time_budget_s
            ):
                break  # the budget is checked between batches, not only between epochs
        val_loss, val_elbo = _evaluate(
            model, val_x, train_config.batch_size, device, model_config.beta
        )
        elapsed = elapsed_before + time.monotonic() - started
        if dist is not None:
            # the epoch's totals over all ranks; rank 0's validation and clock decide
            totals = torch.tensor([total_loss, total_elbo, float(seen)], dtype=torch.float64)
            dist.all_reduce(totals)
            total_loss, total_elbo, seen = totals[0].item(), totals[1].item(), int(totals[2])
            shared = torch.tensor([val_loss, val_elbo, elapsed], dtype=torch.float64)
            dist.broadcast(shared, src=0)
            val_loss, val_elbo, elapsed = (float(v) for v in shared)
        pixels = float(np.prod(train_images.shape[1:]))
        record = {
            "epoch": float(epoch),
            "train_loss": total_loss / max(seen, 1),
            "train_elbo": total_elbo / max(seen, 1),
            "val_loss": val_loss,
            "val_elbo": val_elbo,
            "val_bits_per_dim": float(val_elbo / (pixels * np.log(2.0))),
            "elapsed_s": elapsed,
        }
        history.append(record)
        if val_elbo < best_val:
            best_val, best_epoch, stale = val_elbo, epoch, 0
            best_state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
        bar.set_postfix(
            loss=f"{record['train_loss']:.1f}", val_elbo=f"{val_elbo:.1f}", best=best_epoch
        )
        out_of_time = (
            train_config.time_budget_s is not None and elapsed >= train_config.time_budget_s
        )
        if stale >= train_config.patience:
            stopped_reason = "early_stopping"
        elif out_of_time:
            stopped_reason = "time_budget"
        resume_state = {
            "train_config": train_config.to_dict(),
            "resume": {
                "model_state": {
                    k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()
                },
                "optimizer_state": optimizer.state_dict(),
                "generator_state": generator.get_state(),
                "torch_rng_state": torch.get_rng_state(),
                "epoch": epoch,
                "epochs_without_improvement": stale,
                "elapsed_s": elapsed,
            },
        }
        if checkpoint_path is not None and rank == 0:
            training = {
                "history": history,
                "best_epoch": best_epoch,
                "best_val_elbo": best_val,
                "epochs_run": epoch,
                "stopped_reason": stopped_reason
                if stopped_reason != "max_epochs" or epoch == train_config.epochs
                else "in_progress",
                "n_train": len(train_images),
                "n_val": len(val_images),
                "world_size": world,
            }
            extra = checkpoint_extra() if checkpoint_extra is not None else {}
            write_checkpoint(
                checkpoint_path,
                "pixel",
                model_config.to_dict(),
                best_state,
                training,
                **resume_state,
                calibration=None,
                **extra,
            )
        if stopped_reason in ("early_stopping", "time_budget"):
            break
    bar.close()

    model.zero_grad(set_to_none=True)  # a trained model carries no stale gradients
    model.load_state_dict(best_state)
    model.eval()
    total = history[-1]["elapsed_s"] if history else 0.0
    return TrainResult(model, history, best_epoch, stopped_reason, total, world, resume_state)
