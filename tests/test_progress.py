"""Progress bars and the one-line summaries of long jobs."""

from __future__ import annotations

import logging

import pytest

from slit_lightning import progress
from slit_lightning.cli import main


def test_duration_reads_naturally() -> None:
    assert progress.duration(4.26) == "4.3 s"
    assert progress.duration(187) == "3 min 7 s"
    assert progress.duration(3725) == "1 h 02 min"


def test_quiet_bar_still_counts_for_the_summary() -> None:
    with progress.bar("work", quiet=True, unit="clips") as tick:
        for done in range(1, 4):
            tick(done, 3)
    assert (tick.done, tick.total) == (3, 3)
    assert tick.summary().startswith("3 clips in ") and "clips/s)" in tick.summary()
    assert tick.summary(120, "frames").startswith("120 frames in ")


def test_bar_shows_count_rate_and_eta_on_stderr(capsys) -> None:
    with progress.bar("caching", unit="batches") as tick:
        tick(5, 10)
        tick(10, 10)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "caching" in captured.err and "10/10" in captured.err
    assert "batches/s" in captured.err and "eta" in captured.err


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    level = root.level
    yield
    root.setLevel(level)


def test_synth_summary_line_and_quiet(tmp_path, capsys, restore_logging) -> None:
    args = ["data", "synth", "--clips", "8", "--clip_seconds", "1.0"]
    main([*args, "--out", str(tmp_path / "a")])
    loud = capsys.readouterr()
    assert "synthesising corpus" in loud.err and "clips/s" in loud.err
    (line,) = loud.out.strip().splitlines()
    assert line.startswith(f"corpus written to {tmp_path / 'a'}: ") and " 8 clips in " in line
    main([*args, "--out", str(tmp_path / "b"), "--quiet"])
    quiet = capsys.readouterr()
    assert "synthesising corpus" not in quiet.err
    assert " 8 clips in " in quiet.out
    assert logging.getLogger().level == logging.WARNING
