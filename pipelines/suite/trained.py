"""The suite's trained feature models, for the pipelines that re-score them without training.

bank.py and reductions.py take the same options (``--data``, ``--runs``, ``--out``,
``--sets``, ``--smoke``) and walk the same models: ``runs/suite/<set>/model.pt`` as
pipelines/suite/run.py leaves them, or, with ``--smoke``, a one-epoch feature model of a
tiny synthetic set laid out the same way.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "pipelines"))
sys.path.insert(0, str(ROOT / "pipelines" / "suite"))

from common import shown  # noqa: E402
from run import DEFAULT_DATA, discover_sets  # noqa: E402

from anomalyvae.data import discover  # noqa: E402
from anomalyvae.detector import VAEAnomalyDetector  # noqa: E402


def options(doc: str | None) -> argparse.Namespace:
    """The shared command line, parsed; ``out`` defaults to reports/suite (a temporary
    folder with ``--smoke``), ``runs`` to the smoke model's folder with ``--smoke``."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "suite")
    parser.add_argument("--out", type=Path, default=None, help="[default: reports/suite]")
    parser.add_argument("--smoke", action="store_true", help="tiny synthetic feature model")
    parser.add_argument("--sets", nargs="*", default=None, help="only these sets [all]")
    args = parser.parse_args()
    if args.smoke:
        args.sets_found, args.runs, tmp = smoke_model()
        args.out = args.out or tmp / "report"
    else:
        found = discover_sets(args.data)
        args.sets_found = {k: v for k, v in found.items() if not args.sets or k in args.sets}
    args.out = args.out or ROOT / "reports" / "suite"
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def smoke_model() -> tuple[dict[str, Path], Path, Path]:
    """A one-epoch feature model on a tiny synthetic set, laid out as the suite's runs."""
    from anomalyvae.data import make_synthetic_dataset

    tmp = Path(tempfile.mkdtemp())
    data = make_synthetic_dataset(tmp / "data", n_train=24, n_test_good=6, n_test_defect=6, size=96)
    model = tmp / "runs" / "synthetic" / "model.pt"
    model.parent.mkdir(parents=True)
    detector = VAEAnomalyDetector(model="feature", epochs=1, progress=False)
    detector.fit([s.path for s in discover(data, "train")]).save(model)
    return {"synthetic": data}, tmp / "runs", tmp


def trained_models(
    args: argparse.Namespace, usable: Callable[[object], bool], lacks: str
) -> Iterator[tuple[str, Path, Path, VAEAnomalyDetector]]:
    """(set, source, checkpoint, loaded detector) of every set whose model ``usable``
    accepts (it gets the model's config); the others are named as skipped."""
    for name, source in args.sets_found.items():
        checkpoint = args.runs / name / "model.pt"
        if not checkpoint.is_file():
            print(f"[{name}] no trained model at {shown(checkpoint)}; skipped", flush=True)
            continue
        detector = VAEAnomalyDetector.load(checkpoint, progress=False)
        if not usable(detector.model_.config):
            print(f"[{name}] the {detector.family_} model has no {lacks}; skipped", flush=True)
            continue
        print(f"[{name}] {shown(checkpoint)}", flush=True)
        yield name, source, checkpoint, detector
