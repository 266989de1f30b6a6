"""How many normal images one training run can hold, in memory and in time.

Training keeps every normal image as model input until it ends, and the feature family
keeps each image's backbone features besides (standardized in place: the location
vectors the VAE and the memory bank draw from). Each normal also
costs time before the first epoch and after the last (reading it, the backbone, the
calibration's scoring passes), which no number of epochs can give back. Without a bound,
a folder of a few thousand large normals runs the machine out of memory, or runs past
the time budget before the first epoch.

:func:`image_capacity` turns a family's per-image cost
(:meth:`~anomalyvae.models.families.base.ModelFamily.training_bytes_per_image`,
:meth:`~anomalyvae.models.families.base.ModelFamily.training_seconds_per_image`) and the
two budgets into the most normals a run reads. A larger set is read as a seeded random
choice of its files: the choice is named in a warning and kept with the model.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from anomalyvae.errors import InvalidValueError

#: What training holds whatever the number of images (torch, the backbone, the memory
#: bank, the VAE and their working copies), counted against the memory budget.
BASE_BYTES = 1_000_000_000
#: The share of the time budget that the per-image work outside the epochs may take;
#: the rest is left to the epochs.
TIME_SHARE = 0.5
#: The memory budget where the machine's memory cannot be read.
FALLBACK_MEMORY_BYTES = 8_000_000_000
#: Fewest images a budget is allowed to cut a set to (training needs two that differ).
MIN_IMAGES = 2


def machine_memory_bytes() -> int | None:
    """The memory of this machine, or its container's limit when lower; None if unknown."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # no sysconf (Windows) or no such name
        return None
    limits = [physical] if physical > 0 else []
    # cgroup v2, then v1: a container's limit (v1 writes a huge number for "none")
    for name in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(name).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) > 0:
            limits.append(int(text))
    return min(limits) if limits else None


def memory_budget_bytes(gb: float | None) -> int:
    """A memory budget in bytes: ``gb``, or (None) half of this machine's memory.

    The half is read by :func:`machine_memory_bytes` (8 GB where it cannot be read) and
    is never below 2 GB. A budget not above ``BASE_BYTES`` is a clear error.
    """
    if gb is None:
        memory = machine_memory_bytes()
        return max(memory // 2, 2 * BASE_BYTES) if memory else FALLBACK_MEMORY_BYTES
    if not math.isfinite(gb) or gb * 1e9 <= BASE_BYTES:
        raise InvalidValueError(
            f"the memory budget must be above the {BASE_BYTES / 1e9:.0f} GB that training "
            f"holds whatever the data, got {gb} GB (--memory-budget, in GB)"
        )
    return int(gb * 1e9)


@dataclass(frozen=True)
class Capacity:
    """The most images one training run reads, and what sets it.

    Attributes
    ----------
    max_images : int
        The cap (a set of fewer images is read whole).
    limit : {"memory", "time"}
        The budget that sets ``max_images``.
    memory_budget_bytes : int
    time_budget_s : float or None
    bytes_per_image : float
        The family's estimate of what training holds per image.
    seconds_per_image : float or None
        The family's estimate of the time each image costs outside the epochs, measured
        on this machine; None when the epochs alone take the time.
    """

    max_images: int
    limit: str
    memory_budget_bytes: int
    time_budget_s: float | None
    bytes_per_image: float
    seconds_per_image: float | None

    def to_dict(self) -> dict[str, Any]:
        """Plain values, as the model keeps them (``data_summary_["capacity"]``)."""
        return asdict(self)

    def reason(self, n_available: int) -> str:
        """Why only ``max_images`` of ``n_available`` images are read, in plain words."""
        gb = 1e9
        if self.limit == "time" and self.seconds_per_image is not None:
            needed = n_available * self.seconds_per_image
            return (
                f"all of them would take about {needed:.0f} s outside the epochs (reading, "
                f"the backbone, calibration), over {TIME_SHARE:.0%} of the "
                f"{self.time_budget_s:.0f} s time budget (raise it with --time-budget)"
            )
        needed = BASE_BYTES + n_available * self.bytes_per_image
        return (
            f"all of them would need about {needed / gb:.1f} GB of memory, over the "
            f"{self.memory_budget_bytes / gb:.1f} GB memory budget (set it with "
            "--memory-budget)"
        )


def image_capacity(
    bytes_per_image: float,
    seconds_per_image: float | None,
    memory_budget_bytes: int,
    time_budget_s: float | None,
) -> Capacity:
    """The most images training holds within both budgets (see the module's text).

    Memory: ``BASE_BYTES`` plus ``bytes_per_image`` per image within
    ``memory_budget_bytes``. Time: ``seconds_per_image`` per image within
    ``TIME_SHARE`` of ``time_budget_s``. Never fewer than ``MIN_IMAGES``.
    """
    if memory_budget_bytes <= BASE_BYTES:
        raise InvalidValueError(
            f"memory_budget_bytes must be above BASE_BYTES, got {memory_budget_bytes}"
        )
    if bytes_per_image <= 0:
        raise InvalidValueError(f"bytes_per_image must be positive, got {bytes_per_image}")
    caps: dict[str, int] = {
        "memory": int((memory_budget_bytes - BASE_BYTES) // bytes_per_image),
    }
    if time_budget_s is not None and seconds_per_image:
        caps["time"] = int(math.floor(TIME_SHARE * time_budget_s / seconds_per_image))
    limit = min(caps, key=caps.__getitem__)
    return Capacity(
        max(MIN_IMAGES, caps[limit]),
        limit,
        int(memory_budget_bytes),
        time_budget_s,
        float(bytes_per_image),
        seconds_per_image,
    )
