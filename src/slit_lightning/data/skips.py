"""Counting records dropped for bad input, and stopping a run when too many are."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from slit_lightning.data.sources import Skip
from slit_lightning.errors import SLITError


class TooManySkipsError(SLITError, RuntimeError):
    """More than the allowed fraction of records was unusable."""


@dataclass
class SkipLedger:
    """Tally of used and skipped records for one split.

    Args:
        max_fraction: skipped / (used + skipped) above this stops the run.
        min_records: the fraction is only judged once this many records were seen, so that one
            bad file among the first few does not stop a large run (the end of an epoch is always
            judged).
    """

    max_fraction: float = 0.05
    min_records: int = 200
    used: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())

    @property
    def fraction(self) -> float:
        seen = self.used + self.skipped
        return self.skipped / seen if seen else 0.0

    def add(self, used: int, skipped: list[Skip]) -> None:
        """Record one batch: ``used`` good records and the skips that came with it."""
        self.used += used
        for skip in skipped:
            self.reasons[skip.reason] += 1
            names = self.examples.setdefault(skip.reason, [])
            if len(names) < 3:
                names.append(skip.name)

    def check(self, split: str, final: bool = False) -> None:
        """Raise :class:`TooManySkipsError` if the ceiling is passed (judged once enough is seen)."""
        seen = self.used + self.skipped
        if (final or seen >= self.min_records) and self.fraction > self.max_fraction:
            raise TooManySkipsError(
                f"{split}: {self.skipped} of {seen} records ({self.fraction:.1%}) were unusable,"
                f" above the ceiling of {self.max_fraction:.1%} (data.max_skip_fraction)."
                f" Reasons: {self.summary()}. Fix or remove these files, or raise the ceiling."
            )

    def summary(self) -> str:
        """One line: each reason with its count and up to three example names."""
        if not self.reasons:
            return "none"
        parts = [
            f"{reason} x{count} (e.g. {', '.join(self.examples[reason])})"
            for reason, count in self.reasons.most_common()
        ]
        return "; ".join(parts)

    def state_dict(self) -> dict[str, Any]:
        return {"used": self.used, "reasons": dict(self.reasons),
                "examples": {k: list(v) for k, v in self.examples.items()}}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.used = state["used"]
        self.reasons = Counter(state["reasons"])
        self.examples = {k: list(v) for k, v in state["examples"].items()}

    def reset(self) -> None:
        self.used = 0
        self.reasons.clear()
        self.examples.clear()
