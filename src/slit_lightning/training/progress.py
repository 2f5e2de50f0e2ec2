"""Progress bars for long jobs: the one place that builds them.

A job takes a ``progress(done, total)`` callback; :func:`bar` yields a :class:`Tick`, which is
that callback and which then gives the job's one-line summary its numbers (count, time, rate).
Bars go to stderr, so what a command prints on stdout (its summary) stays clean for scripts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

QUIET_HELP = "no progress bar or progress messages (warnings, errors and the summary remain)"
"""The help of every long command's ``--quiet``."""


class RateColumn(ProgressColumn):
    """Items per second with the job's unit, e.g. ``48.2 clips/s``."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "items")
        return Text("?" if speed is None else f"{speed:.1f} {unit}/s", style="progress.data.speed")


class Tick:
    """``tick(done, total)`` moves the bar (if there is one) and remembers the count."""

    def __init__(self, unit: str, progress: Progress | None = None, task: TaskID | None = None):
        self.unit, self.done, self.total = unit, 0, 0
        self._progress, self._task = progress, task
        self._started = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=done, total=total)

    @property
    def elapsed(self) -> float:
        """Seconds since the bar started."""
        return time.monotonic() - self._started

    def summary(self, count: int | None = None, unit: str | None = None) -> str:
        """``1000 clips in 20.1 s (49.8 clips/s)``; ``count`` and ``unit`` replace the bar's
        own (say, clips where the bar counted batches)."""
        done, unit = self.done if count is None else count, unit or self.unit
        seconds = self.elapsed
        rate = f" ({done / seconds:.1f} {unit}/s)" if done and seconds > 0 else ""
        return f"{done} {unit} in {duration(seconds)}{rate}"


def duration(seconds: float) -> str:
    """``42.0 s``, ``3 min 7 s`` or ``1 h 02 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


@contextmanager
def bar(description: str, quiet: bool = False, unit: str = "items") -> Iterator[Tick]:
    """Yield a :class:`Tick`; draws a bar with count, rate, elapsed time and ETA on stderr
    unless ``quiet``."""
    if quiet:
        yield Tick(unit)
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        yield Tick(unit, progress, progress.add_task(description, total=None, unit=unit))


def quieten(quiet: bool) -> None:
    """For ``--quiet``: keep warnings and errors, drop the progress messages (INFO logs) and
    transformers' own progress bars ("Loading weights", "Writing model shards")."""
    if quiet:
        from transformers.utils import logging as hf_logging

        logging.getLogger().setLevel(logging.WARNING)
        hf_logging.disable_progress_bar()
