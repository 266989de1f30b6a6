"""Would a retrained variant make a better default? Chosen leave-one-set-out.

    python pipelines/suite/retrained.py            # reports/suite: results.json + variants.jsonl
    python pipelines/suite/retrained.py --smoke    # a smoke suite, a smoke variant (CI)

The suite's defaults (results.json, from ``run.py``) and every variant trained with
other options (``run.py --variant NAME --train-args '...' --sets ...``, logged in
variants.jsonl; each set's latest run of a name counts) are compared on image AUROC of
each model's own score, the number a user gets. For each set, the candidate with the
best mean gain over the defaults on the *other* sets is chosen and scored on the one
left out (:func:`folds.choose_leave_one_out`, the rule reductions.py uses too): a
variant qualifies as the new default only when a majority of folds choose it and the
held-out mean gain is positive. A variant missing on a set cannot be chosen where that
set is among the others. Beside the choice: pixel AUROC, AUPRO, the test normals
flagged at the model's threshold, the sensitivity at 95 % specificity and the training
time, so that a gain in ranking that costs the map or the threshold is visible.

Writes retrained.md and retrained.json; changes nothing in the product.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "pipelines"))
sys.path.insert(0, str(ROOT / "pipelines" / "suite"))

from common import machine  # noqa: E402
from folds import choose_leave_one_out, fold_table  # noqa: E402

DEFAULTS = "defaults"
#: The columns shown per candidate and set (key in the run's ``defaults``, header).
COLUMNS = (
    ("image_auroc", "image AUROC"),
    ("pixel_auroc", "pixel AUROC"),
    ("aupro", "AUPRO"),
    ("normals_flagged", "test normals flagged"),
    ("sens_at_95_spec", "sens. at 95 % spec."),
    ("train_seconds", "train s"),
)
#: The smoke variant: a feature-model option, tried on the smoke suite's feature set.
SMOKE_VARIANT = ("neighbourhood1", "--neighbourhood 1", "synthetic96")


def candidates(out: Path) -> tuple[dict, dict[str, dict]]:
    """(results.json, name -> that variant's entries in variants.jsonl, merged).

    A variant trained on some sets in one run and on others in another (``run.py
    --variant NAME --sets ...`` twice) is one candidate: each set keeps its latest run.
    When its sets ran at different codes, ``code`` names each set's.
    """
    results = json.loads((out / "results.json").read_text())
    variants: dict[str, dict] = {}
    codes: dict[str, dict[str, str]] = {}
    log = out / "variants.jsonl"
    if log.is_file():
        for line in log.read_text().splitlines():
            if not line.strip():
                continue
            entry = json.loads(line)
            name = entry["variant"]
            if name in variants and variants[name]["train_args"] != entry["train_args"]:
                variants.pop(name)  # the name now means other options: start again
                codes.pop(name)
            merged = variants.setdefault(name, {**entry, "sets": {}})
            merged.update({k: v for k, v in entry.items() if k != "sets"})
            merged["sets"].update(entry["sets"])  # later lines replace earlier ones
            codes.setdefault(name, {}).update(dict.fromkeys(entry["sets"], entry["code"]))
    for name, per_set in codes.items():
        if len(set(per_set.values())) > 1:
            variants[name]["code"] = ", ".join(f"{s} {c}" for s, c in sorted(per_set.items()))
    return results, variants


def product_commits_between(first: str, second: str) -> int | None:
    """Commits that changed the product (anomalyvae/) between two codes, either way round.

    A variant trained at another code than the defaults differs from them by those
    commits too (a default changed since, a fix). None when git cannot tell (a shallow
    clone, a code it does not know).
    """
    if first == second:
        return 0
    try:
        counts = [
            subprocess.run(
                ["git", "rev-list", "--count", span, "--", "anomalyvae"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            ).stdout.strip()
            for span in (f"{first}..{second}", f"{second}..{first}")
        ]
        return sum(int(c) for c in counts)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def judge(results: dict, variants: dict[str, dict]) -> dict:
    """Per set, every candidate's numbers; the leave-one-set-out choice on image AUROC."""
    sets = list(results["sets"])
    numbers = {
        s: {
            DEFAULTS: results["sets"][s]["defaults"],
            **{v: e["sets"][s]["defaults"] for v, e in variants.items() if s in e["sets"]},
        }
        for s in sets
    }
    gain = {
        s: {v: row["image_auroc"] - numbers[s][DEFAULTS]["image_auroc"] for v, row in c.items()}
        for s, c in numbers.items()
    }
    code = results.get("code", "?")
    # a partial rerun (run.py --sets) leaves the other sets at the code they ran with
    per_set = {s: results["sets"][s].get("code", code) for s in sets}
    shown = (
        code
        if len(set(per_set.values())) == 1
        else ", ".join(f"{s} {c}" for s, c in per_set.items())
    )
    return {
        "defaults_code": shown,
        "variants": {
            v: {
                "code": e["code"],
                "train_args": e["train_args"],
                "date": e["date"],
                "product_commits_apart": product_commits_between(e["code"], code),
            }
            for v, e in variants.items()
        },
        "sets": numbers,
        "loso": choose_leave_one_out(gain, DEFAULTS),
    }


def write(judged: dict, out: Path, smoke: bool) -> None:
    (out / "retrained.json").write_text(
        json.dumps({"machine": machine(), **judged}, indent=2, default=float)
    )
    sets, decision = list(judged["sets"]), judged["loso"]
    names = [DEFAULTS, *judged["variants"]]
    lines = [
        "# Retrained variants, chosen leave-one-set-out" + (" (smoke run)" if smoke else ""),
        "",
        f"Produced by `python pipelines/suite/retrained.py` ({machine()}) from results.json "
        f"(the defaults, code {judged['defaults_code']}) and variants.jsonl (each variant "
        "trained through the CLI with the options shown, the same time budget and "
        "evaluation). Each model is scored with its own score and threshold. Training "
        "times come from separate runs, not one timed run: read them as indicative only.",
        "",
        "| candidate | code | options | product commits apart from the defaults |",
        "|---|---|---|---|",
        f"| {DEFAULTS} | {judged['defaults_code']} | – | – |",
    ]
    apart = []
    for name, meta in judged["variants"].items():
        count = meta.get("product_commits_apart")
        shown = "unknown" if count is None else str(count)
        lines.append(f"| {name} | {meta['code']} | `{' '.join(meta['train_args'])}` | {shown} |")
        if count != 0:
            apart.append(name)
    if apart:
        lines += [
            "",
            "Trained at another code than the defaults: "
            + ", ".join(apart)
            + ". Their numbers also carry every product change in between (`git log "
            "VARIANT..DEFAULTS -- anomalyvae`, e.g. a default changed since): retrain them "
            "before a verdict on them counts.",
        ]
    for key, title in COLUMNS:
        lines += ["", f"## {title}", "", "| candidate | " + " | ".join(sets) + " |"]
        lines.append("|---|" + "---|" * len(sets))
        for name in names:
            cells = []
            for s in sets:
                value = judged["sets"][s].get(name, {}).get(key)
                if value is None:
                    cells.append("–")
                elif key == "train_seconds":
                    cells.append(f"{value:.0f}")
                elif key == "normals_flagged":
                    cells.append(f"{value:.1%}")
                else:
                    cells.append(f"{value:.3f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Leave-one-set-out on image AUROC",
        "",
        *fold_table(decision),
    ]
    verdict = (
        f"**{decision['majority']} qualifies as the default**"
        if decision["adopt"]
        else "**the defaults stay**"
    )
    lines += [
        "",
        f"Majority choice: {decision['majority']}; held-out mean gain of the fold choices "
        f"{decision['held_mean_gain']:+.3f} image AUROC: {verdict}.",
    ]
    (out / "retrained.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def smoke_suite(out: Path) -> None:
    """The suite's smoke run and one smoke variant, into ``out``."""
    run = [sys.executable, str(ROOT / "pipelines" / "suite" / "run.py"), "--smoke"]
    name, options, smoke_set = SMOKE_VARIANT
    for extra in ([], ["--variant", name, "--train-args", options, "--sets", smoke_set]):
        subprocess.run([*run, "--out", str(out), *extra], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=None, help="[default: reports/suite]")
    parser.add_argument("--smoke", action="store_true", help="a smoke suite and variant first")
    args = parser.parse_args(argv)
    out = args.out or (
        Path(tempfile.mkdtemp()) / "report" if args.smoke else ROOT / "reports" / "suite"
    )
    if args.smoke:
        smoke_suite(out)
    if not (out / "results.json").is_file():
        parser.error(f"no results.json in {out}: run pipelines/suite/run.py first")
    results, variants = candidates(out)
    write(judge(results, variants), out, args.smoke)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
