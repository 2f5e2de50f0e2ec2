"""A data pass: run the pipeline over the configured splits and report what it delivered.

This is what ``slit data check`` (and ``make demo`` until a stage runs) does: it decodes every clip
exactly as training would, measures clips per second, counts skips by reason and writes the figures
to TensorBoard, so a new data set can be vetted before a long run starts.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from slit_lightning.data.datamodule import AudioTextDataModule, Split


@dataclass
class SplitReport:
    """What one pass over a split delivered."""

    split: str
    clips: int = 0
    batches: int = 0
    seconds: float = 0.0
    audio_seconds: float = 0.0
    captions: int = 0
    distinct_labels: int = 0
    skipped: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def clips_per_second(self) -> float:
        return self.clips / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        """One-line summary for the terminal."""
        return (
            f"{self.split:>8}: {self.clips} clips in {self.batches} batches,"
            f" {self.audio_seconds / 60:.1f} min of audio, {self.captions} captions,"
            f" {self.distinct_labels} labels, {self.clips_per_second:.0f} clips/s,"
            f" skipped {self.skipped}" + (f" {self.skip_reasons}" if self.skipped else "")
        )


def data_pass(
    datamodule: AudioTextDataModule,
    splits: list[Split],
    log_dir: str | Path | None = None,
    max_batches: int | None = None,
) -> list[SplitReport]:
    """Iterate each split once through the real loaders; optionally log to TensorBoard."""
    reports = [_one_split(datamodule, split, max_batches) for split in splits]
    if log_dir is not None:
        with SummaryWriter(str(log_dir)) as writer:
            for report in reports:
                for key, value in asdict(report).items():
                    if isinstance(value, int | float):
                        writer.add_scalar(f"data/{report.split}/{key}", value, 0)
                writer.add_scalar(f"data/{report.split}/clips_per_second", report.clips_per_second)
                writer.add_text(f"data/{report.split}", report.line())
    return reports


def _one_split(dm: AudioTextDataModule, split: Split, max_batches: int | None) -> SplitReport:
    report = SplitReport(split)
    labels: set[str] = set()
    rate = dm.hparams.sample_rate
    start = time.perf_counter()
    for batch in dm.loader(split):
        report.batches += 1
        report.clips += len(batch["clip_id"])
        report.audio_seconds += batch["audio_mask"].sum().item() / rate
        report.captions += sum(len(c) for c in batch["captions"])
        labels.update(label for clip_labels in batch["labels"] for label in clip_labels)
        if max_batches is not None and report.batches >= max_batches:
            break
    report.seconds = time.perf_counter() - start
    ledger = dm.ledgers[split]
    report.skipped, report.skip_reasons = ledger.skipped, dict(ledger.reasons)
    report.distinct_labels = len(labels)
    return report
