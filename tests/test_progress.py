"""Progress bars and the one-line summaries of long jobs."""

from __future__ import annotations

import logging

import pytest

from slit_lightning.cli.main import main
from slit_lightning.training import progress


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
    from transformers.utils import logging as hf_logging

    root = logging.getLogger()
    level, bars = root.level, hf_logging.is_progress_bar_enabled()
    yield
    root.setLevel(level)
    (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()


def test_quiet_also_silences_the_transformers_progress_bars(restore_logging) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    progress.quieten(False)
    assert hf_logging.is_progress_bar_enabled()
    progress.quieten(True)  # save_pretrained's "Writing model shards" bar printed under --quiet
    assert not hf_logging.is_progress_bar_enabled()


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
