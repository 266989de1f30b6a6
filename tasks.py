#!/usr/bin/env python3
"""Set up a virtual environment and run the demo or the tests: the README's two commands.

    python3 tasks.py demo    # install, then train + evaluate on synthetic data
    python3 tasks.py test    # install with the dev extra, then run pytest

Needs only Python >= 3.10. The environment lives in .venv/ and is reused while
pyproject.toml is unchanged. Extra arguments go to the command (e.g. `test -k cli`).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
# The CPU build: an unpinned `pip install torch` pulls a multi-GB CUDA build on Linux.
TORCH = "torch==2.13.0"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def run(*args: str | Path) -> None:
    print("+", " ".join(str(a) for a in args), flush=True)
    subprocess.run([str(a) for a in args], check=True, cwd=ROOT)


def setup(extra: str) -> None:
    if sys.version_info < (3, 10):
        sys.exit(f"anomalyvae needs Python >= 3.10, this is {sys.version.split()[0]}")
    stamp = VENV / f".installed-{extra or 'base'}"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest and PYTHON.exists():
        return
    if not PYTHON.exists():
        print(f"+ creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = (PYTHON, "-m", "pip", "install", "--disable-pip-version-check", "-q")
    try:
        run(*pip, TORCH)
    except subprocess.CalledProcessError:
        print(f"{TORCH} is not available here; trying the CPU wheel index", flush=True)
        run(*pip, "torch", "--index-url", TORCH_CPU_INDEX)
    run(*pip, "-e", f".[{extra}]" if extra else ".")
    stamp.write_text(digest)


def test_workers(rest: list[str]) -> list[str]:
    """pytest-xdist's ``-n 2``, unless the caller chose or there is one core.

    Most of the suite's time is single-threaded (interpreter starts, imports, small
    tensors): two workers, each given half the cores by tests/conftest.py, take about 0.6
    of one worker's time on 2 cores.
    """
    chosen = any(a.startswith(("-n", "--numprocesses", "--dist")) for a in rest)
    if chosen or "no:xdist" in rest or (os.cpu_count() or 1) < 2:
        return []
    return ["-n", "2"]


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "setup"):
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    # the tests cover the optional Ray engine and backbones too
    setup("dev,ray,backbones" if command in ("test", "setup") else "")
    if command == "demo":
        run(BIN / "anomalyvae", "demo", *rest)
    elif command == "test":
        run(PYTHON, "-m", "pytest", *test_workers(rest), *rest)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except subprocess.CalledProcessError as error:
        sys.exit(error.returncode)
