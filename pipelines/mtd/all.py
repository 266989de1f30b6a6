"""Regenerate all of reports/mtd/ with one command: benchmark, experiment log, data curve.

    python pipelines/mtd/all.py [--data ../shared/datasets/mtd/split.json]

Runs, in order: run.py (trains the default detector in its 15-minute budget, evaluates
every scoring variant and the PCA floor, writes README.md, metrics.json and figures),
experiments.py (the pixel model's post-hoc variants -> experiments.md) and
data_curve.py (10/25/50/100 % of train_good at equal optimizer steps -> data_curve.md).
About 50 minutes on 2 CPU cores. Extra arguments are not passed on; run a script alone
to change its settings.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "mtd" / "split.json"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()
    for script in ("run.py", "experiments.py", "data_curve.py"):
        print(f"== {script}", flush=True)
        subprocess.run([sys.executable, str(HERE / script), "--data", str(args.data)], check=True)


if __name__ == "__main__":
    main()
