"""The summary ``make demo`` ends with: what each stage scored on the built-in corpus's test
split, one instruction-tuned answer, and where the logs and checkpoints are.

    python -m slit_lightning.builtin.summary --runs runs/demo

It reads what the demo's commands wrote (``slit test`` writes ``test_metrics.json`` beside its
logs, stage 2 ``test_captions.json``) and scores the captions' event agreement with the corpus;
a step that has not run is named as missing, never shown as zero.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

QUESTION = "List all the sounds you hear."


def latest(logs: Path, stage: str, name: str) -> Path | None:
    """The newest ``{logs}/{stage}/version_*/{name}``."""
    found = sorted(logs.glob(f"{stage}/version_*/{name}"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def stage1_line(logs: Path) -> str:
    path = latest(logs, "stage1", "test_metrics.json")
    if path is None:
        return "stage 1 (test retrieval): not run (slit test on the stage-1 checkpoint)"
    m = json.loads(path.read_text(encoding="utf-8"))
    return (
        f"stage 1, test retrieval: text-to-audio R@1 {m['test/t2a_R@1']:.3f},"
        f" audio-to-text R@1 {m['test/a2t_R@1']:.3f} (chance {m['test/chance_R@1']:.3f})"
    )


def stage2_line(logs: Path, corpus: Path) -> str:
    from slit_lightning.builtin.events import score_captions_file

    path = latest(logs, "stage2", "test_captions.json")
    if path is None:
        return "stage 2 (test captions): not run (slit test on the stage-2 checkpoint)"
    scores = json.loads(path.read_text(encoding="utf-8"))["metrics"]
    agreement = score_captions_file(path, corpus)
    return (
        f"stage 2, test captions: CIDEr-D {scores['cider_d']:.3f}, BLEU-4 {scores['bleu_4']:.3f};"
        f" event agreement: types {agreement['exact_types']:.2f}, counts"
        f" {agreement['counts']:.2f}, order {agreement['in_order']:.2f}, all right"
        f" {agreement['all_right']:.2f}"
    )


def answer_lines(checkpoint: Path, corpus: Path) -> list[str]:
    """The instruction-tuned model's answer about the first test clip, beside its caption."""
    from slit_lightning.model.slit import SLIT

    if not checkpoint.is_file():
        return [f"instruction-tuned answer: no checkpoint at {checkpoint}"]
    row: dict[str, Any] = json.loads((corpus / "test.jsonl").read_text().splitlines()[0])
    clip = corpus / row["audio"]
    answer = SLIT.from_pretrained(checkpoint, "cpu").answer(clip, QUESTION)
    return [
        f"instruction-tuned, asked {QUESTION!r} about {clip}:",
        f"  answer:    {' '.join(str(answer).split())}",
        f"  reference: {row['captions'][0]}",
    ]


def summary(runs: Path) -> str:
    logs, corpus = runs / "logs", runs / "corpus"
    lines = ["", "== slit-lightning demo: the built-in corpus, test split =="]
    lines += [stage1_line(logs), stage2_line(logs, corpus)]
    lines += answer_lines(runs / "instruct" / "checkpoints" / "last.ckpt", corpus)
    checkpoints = ", ".join(str(runs / s / "checkpoints") for s in ("stage1", "stage2", "instruct"))
    lines += [
        f"checkpoints: {checkpoints}",
        f"logs: {logs} (make tensorboard); captions and scores: {logs}/stage2/version_*/",
        "next: make eval-zeroshot (every task on the zero-shot split, all three checkpoints)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs/demo", help="the demo's run folder")
    print(summary(Path(parser.parse_args(argv).runs)))


if __name__ == "__main__":
    main()
