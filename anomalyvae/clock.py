"""When this process started using anomalyvae, and what a whole-command budget leaves.

A leaf module, imported by the package itself, so its clock starts with ``import
anomalyvae`` (for the CLI, a few tens of milliseconds after the interpreter): a
``--time-budget`` counts from here, imports included.
"""

from __future__ import annotations

import time

#: ``time.monotonic()`` when the package was first imported.
STARTED = time.monotonic()
#: Share of a budget kept for writing the final checkpoint and exiting (at most
#: ``FINAL_MARGIN_MAX_S``), so that the command, not only the fit, ends within it.
FINAL_MARGIN = 0.01
FINAL_MARGIN_MAX_S = 5.0


def command_budget(budget_s: float | None, now: float | None = None) -> float | None:
    """The fit's share of a time budget that the whole command must keep.

    Takes off what the process spent since :data:`STARTED` (imports, argument checks,
    discovery) and keeps 1 % (at most 5 s) for the final save and exit; never less
    than one second. None (no budget) stays None.
    """
    if budget_s is None:
        return None
    spent = (time.monotonic() if now is None else now) - STARTED
    margin = min(FINAL_MARGIN * budget_s, FINAL_MARGIN_MAX_S)
    return max(1.0, budget_s - spent - margin)
