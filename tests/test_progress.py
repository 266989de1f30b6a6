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


def test_training_shows_a_bar_while_it_reads_files(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from anomalyvae.imaging.batch import read_images
    from anomalyvae.imaging.preprocessing import Preprocessing

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) + i).save(paths[-1])
    spec = Preprocessing(channels=1, height=8, width=8)
    read_images(paths, spec, progress=True)
    assert "reading" in capsys.readouterr().err
    read_images(paths, spec)  # off by default: evaluation and the scan have their own
    assert "reading" not in capsys.readouterr().err
