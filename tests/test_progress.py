"""Progress bars: redrawn in a terminal, sparse in a log."""

from __future__ import annotations

import io

import pytest

from anomalyvae.progress import LOG_INTERVAL_S, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("stream", "interval"), [(io.StringIO(), LOG_INTERVAL_S), (_Terminal(), 0.1)]
)
def test_a_bar_in_a_log_updates_every_30_s_and_in_a_terminal_as_tqdm_does(stream, interval):
    bar = progress_bar(range(1000), file=stream, desc="scanning")
    assert bar.mininterval == interval
    for _ in bar:
        pass
    bar.close()
    if interval == LOG_INTERVAL_S:  # the first draw and the last, not a thousand
        assert stream.getvalue().count("scanning") <= 3
    assert "1000/1000" in stream.getvalue()
