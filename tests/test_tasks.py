"""tasks.py, the README's two commands: how the test command runs the suite."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_tasks():
    spec = importlib.util.spec_from_file_location("tasks", ROOT / "tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("rest", "cores", "expected"),
    [
        ([], 2, ["-n", "2"]),
        (["-q", "-k", "cli"], 16, ["-n", "2"]),
        (["-n", "4"], 16, []),  # the caller's choice stands
        (["--numprocesses=0"], 2, []),
        (["-p", "no:xdist"], 2, []),
        ([], 1, []),  # one core: one process
    ],
)
def test_the_test_command_runs_two_workers_unless_told_otherwise(
    rest, cores, expected, monkeypatch
):
    tasks = load_tasks()
    monkeypatch.setattr(tasks.os, "cpu_count", lambda: cores)
    assert tasks.test_workers(rest) == expected


def test_each_worker_starts_torch_with_its_share_of_the_cores():
    """Under pytest-xdist, conftest.py sets the threads before torch starts: N workers never
    run N x cores threads (the pipelines' subprocesses inherit the same setting)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2:
        pytest.skip("runs under pytest-xdist (python3 tasks.py test)")
    import torch

    threads = int(os.environ["OMP_NUM_THREADS"])  # the share, or what the caller set
    assert torch.get_num_threads() == threads
