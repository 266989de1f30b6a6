"""The leave-one-set-out choice every suite pipeline makes between a default and variants.

For each set, the candidate with the best mean gain over the default on the *other*
sets is chosen (ties keep the default) and scored on the set left out. A variant
qualifies as the new default only when it is chosen in a majority of the folds and the
fold choices' mean gain on the sets they left out is positive: the held-out mean is
the estimate for a set nobody tuned on.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

#: What a missing candidate counts as on a set (it cannot be chosen for what it lacks).
MISSING = -1.0


def choose_leave_one_out(gain: dict[str, dict[str, float]], default: str) -> dict:
    """``gain[set][candidate]``: the candidate's gain over ``default`` on that set
    (``gain[set][default]`` is 0). Returns the folds, the majority choice, the held-out
    mean gain and whether the majority qualifies (``adopt``)."""
    sets = list(gain)
    folds = {}
    for held in sets:
        others = [s for s in sets if s != held] or [held]
        names = [default, *(v for v in gain[held] if v != default)]  # ties keep the default
        chosen = max(names, key=lambda v: np.mean([gain[s].get(v, MISSING) for s in others]))
        folds[held] = {
            "chosen": chosen,
            "others_gain": float(np.mean([gain[s].get(chosen, MISSING) for s in others])),
            "held_gain": float(gain[held][chosen]),
        }
    choices = [f["chosen"] for f in folds.values()]
    # ties: the default, then the choice of the earliest fold (never the set order of
    # the names, which changes from run to run with Python's string hashing)
    top = max(dict.fromkeys(choices), key=lambda v: (choices.count(v), v == default))
    mean_gain = float(np.mean([f["held_gain"] for f in folds.values()])) if folds else 0.0
    adopt = top != default and choices.count(top) * 2 > len(choices) and mean_gain > 0
    return {"folds": folds, "majority": top, "held_mean_gain": mean_gain, "adopt": bool(adopt)}


def fold_table(
    decision: dict,
    digits: int = 3,
    held_score: Callable[[str, str], float] | None = None,
    score_label: str = "held-out AUROC",
) -> list[str]:
    """The markdown rows of a :func:`choose_leave_one_out` decision's folds: the set left
    out, the choice made on the others, their mean gain and the held-out gain (gains with
    ``digits`` decimals); ``held_score(set, chosen)`` adds a column before the last."""
    extra = held_score is not None
    rows = [
        "| left out | chosen on the others | their mean gain | "
        + (f"{score_label} | " if extra else "")
        + "held-out gain |",
        "|---|---|---|" + ("---|" if extra else "") + "---|",
    ]
    for held, fold in decision["folds"].items():
        score = f"{held_score(held, fold['chosen']):.3f} | " if held_score else ""
        rows.append(
            f"| {held} | {fold['chosen']} | {fold['others_gain']:+.{digits}f} | "
            f"{score}{fold['held_gain']:+.{digits}f} |"
        )
    return rows
