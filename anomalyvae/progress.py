"""Progress bars on stderr that stay readable in a log file as well as in a terminal.

A leaf module (tqdm only), so both wings and the models use it. In a terminal a bar
redraws ten times a second; written to a file or a pipe (a CI log, a cron job, ``2>
scan.log``) every redraw is kept, so a long scan or training would fill the log with
tens of thousands of updates. There, the bar writes at most every
:data:`LOG_INTERVAL_S` seconds (and once at the end).
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

#: Seconds between a bar's updates when stderr is not a terminal.
LOG_INTERVAL_S = 30.0


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(iterable: Any = None, **kwargs: Any) -> Any:
    """A tqdm bar on stderr; in a log (not a terminal) it updates every 30 s at most.

    Keyword arguments are tqdm's; ``file`` defaults to ``sys.stderr`` and
    ``mininterval`` to tqdm's 0.1 s in a terminal, :data:`LOG_INTERVAL_S` elsewhere.
    """
    stream = kwargs.setdefault("file", sys.stderr)
    if not _is_terminal(stream):
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        kwargs.setdefault("maxinterval", max(LOG_INTERVAL_S, float(kwargs["mininterval"])))
    return tqdm(iterable, **kwargs)
