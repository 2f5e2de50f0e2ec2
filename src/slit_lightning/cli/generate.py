"""The `slit` sub-commands that run a trained checkpoint's generation and evaluation.

- ``slit caption FILE... --ckpt PATH`` prints a caption for each audio file;
- ``slit ask FILE QUESTION --ckpt PATH`` answers a question (any instruction) about a file;
- ``slit eval --ckpt PATH...`` runs the evaluation suite (retrieval, zero-shot classification,
  captioning, QA, tagging) on a split or on labelled data, as one table plus JSON/TensorBoard.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from slit_lightning.training.progress import QUIET_HELP

if TYPE_CHECKING:
    from slit_lightning.data.audio import AudioError
    from slit_lightning.model.llm import Generation
    from slit_lightning.model.slit import SLIT


def caption_parser() -> Any:
    """Parser of ``slit caption``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="slit caption", description="Print one caption per audio file (any format or rate)."
    )
    parser.add_argument("files", nargs="+", help="audio files (wav, flac, ogg, mp3, ...)")
    parser.add_argument("--batch_size", type=int, default=8)
    _model_arguments(parser, "stage-2 (or instruction-tuned) checkpoint (.ckpt) or exported folder")
    return parser


def caption_command(argv: list[str]) -> None:
    """Run ``slit caption ...``: ``file<TAB>caption`` lines; unreadable files go to stderr."""
    cfg = caption_parser().parse_args(argv)
    model, settings = _generating_model(cfg, "caption")
    failed = 0
    for path, result in caption_files(model, cfg.files, cfg.batch_size, settings):
        if isinstance(result, Exception):
            failed += 1
            print(f"{path}\tskipped: {result}", file=sys.stderr)
        else:
            print(f"{path}\t{one_line(result)}", flush=True)
    if failed:
        raise SystemExit(f"slit caption: {failed} of {len(cfg.files)} files could not be read")


def caption_files(
    model: SLIT, paths: Sequence[str], batch_size: int = 8, settings: Generation | None = None
) -> Iterator[tuple[str, str | AudioError]]:
    """``(path, caption)`` per file in order; ``(path, AudioError)`` for a file that cannot be
    read. Clips are read as :class:`SLIT` reads them (mono, the encoder's rate, cut to its
    ``max_seconds``)."""
    from slit_lightning.data.audio import AudioError, load_audio

    for start in range(0, len(paths), batch_size):
        chunk = [str(p) for p in paths[start : start + batch_size]]
        waves, failed = {}, {}
        for path in chunk:
            try:
                waves[path] = load_audio(path, model.sample_rate)
            except AudioError as err:
                failed[path] = err
        captions = {}
        if waves:
            made = model.caption(list(waves.values()), model.sample_rate, settings)
            captions = dict(zip(waves, [made] if isinstance(made, str) else made, strict=True))
        for path in chunk:
            yield path, captions[path] if path in captions else failed[path]


def one_line(text: str) -> str:
    """A generated text on one line (an LLM may write line breaks or tabs)."""
    return " ".join(text.split())


def _generation_arguments(parser: Any) -> None:
    for name, kind in (("num_beams", int), ("max_new_tokens", int), ("repetition_penalty", float)):
        parser.add_argument(f"--{name}", type=kind | None, default=None, help="generation")


def _model_arguments(parser: Any, what: str) -> None:
    """The checkpoint, where to run it, how to crop, where its frozen parts are, decoding."""
    parser.add_argument("--ckpt", required=True, help=what)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--max_seconds", type=float | None, default=None, help="cut clips (default: as trained)"
    )
    parser.add_argument("--encoder", type=str | None, default=None, help="if it has moved")
    parser.add_argument("--llm", type=str | None, default=None, help="if it has moved")
    _generation_arguments(parser)


def _generating_model(cfg: Any, command: str) -> tuple[SLIT, Generation]:
    """The model of ``--ckpt`` (checkpoint or exported folder) that generates text, with the
    crop of ``--max_seconds`` (default: as trained) and its decoding settings."""
    from slit_lightning.model.slit import SLIT

    model = SLIT.from_pretrained(cfg.ckpt, cfg.device, encoder=cfg.encoder, llm=cfg.llm)
    generator = model.need_generator(f"slit {command}")
    if cfg.max_seconds:
        model.max_seconds = cfg.max_seconds
    return model, _generation_settings(generator, cfg)


def _generation_settings(model: Any, cfg: Any) -> Any:
    import dataclasses

    chosen = {k: cfg[k] for k in ("num_beams", "max_new_tokens", "repetition_penalty")}
    return dataclasses.replace(
        model.generation, **{k: v for k, v in chosen.items() if v is not None}
    )


def ask_parser() -> Any:
    """Parser of ``slit ask``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="slit ask", description="Answer a question or follow an instruction about one file."
    )
    parser.add_argument("file", help="audio file (wav, flac, ogg, mp3, ...)")
    parser.add_argument("question", help='e.g. "How many beeps are there?"')
    _model_arguments(parser, "instruction-tuned (or stage-2) checkpoint or exported folder")
    return parser


def ask_command(argv: list[str]) -> None:
    """Run ``slit ask ...``: prints the answer on one line."""
    cfg = ask_parser().parse_args(argv)
    model, settings = _generating_model(cfg, "ask")
    answer = model.answer(cfg.file, cfg.question, settings=settings)
    print(one_line(str(answer)))


def eval_parser() -> Any:
    """Parser of ``slit eval``."""
    from jsonargparse import ArgumentParser

    from slit_lightning.evaluation.tasks import TASKS

    parser = ArgumentParser(
        prog="slit eval",
        description="Evaluate checkpoints of any stage on a split or on labelled data: one table,"
        " plus eval.json and TensorBoard scalars per checkpoint under --out.",
    )
    parser.add_argument("--ckpt", type=list[str], required=True, help="one or more checkpoints")
    parser.add_argument("--split", default="zeroshot", help="split of the checkpoint's data")
    parser.add_argument(
        "--data", type=str | None, default=None,
        help="evaluate on this instead: a manifest, Clotho/AudioCaps/Clotho-AQA CSV, an"
        " ESC-50-style CSV (filename, category) or a folder with one sub-folder per label",
    )  # fmt: skip
    parser.add_argument("--audio_dir", type=str | None, default=None, help="audio root for --data")
    parser.add_argument("--root", type=str | None, default=None, help="corpus root (for --split)")
    parser.add_argument("--tasks", type=list[str], default=list(TASKS))
    parser.add_argument("--wordings", default="held_out", choices=["held_out", "train"])
    parser.add_argument("--label_prompt", default="the sound of {label}")
    parser.add_argument("--out", default="runs/eval", help="folder for eval.json + TensorBoard")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    parser.add_argument("--batch_size", type=int, default=50)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument(
        "--max_seconds", type=float | None, default=None, help="default: as trained"
    )
    parser.add_argument("--encoder", type=str | None, default=None, help="if it has moved")
    parser.add_argument("--llm", type=str | None, default=None, help="if it has moved")
    _generation_arguments(parser)
    return parser


def _run_name(ckpt: str, index: int) -> str:
    """``stage2`` for ``runs/demo/stage2/checkpoints/last.ckpt``, else the file's stem; numbered."""
    from pathlib import Path

    path = Path(ckpt)
    name = path.parent.parent.name if path.parent.name == "checkpoints" else path.stem
    return f"{index}-{name}"


def eval_command(argv: list[str]) -> None:
    """Run ``slit eval ...``."""
    from pathlib import Path

    from slit_lightning.data.datamodule import AudioTextDataModule
    from slit_lightning.data.sources import SourceSpec
    from slit_lightning.evaluation.tasks import evaluate, table
    from slit_lightning.stages.load import load_stage, read_checkpoint
    from slit_lightning.training import progress

    cfg = eval_parser().parse_args(argv)
    progress.quieten(cfg.quiet)
    reports = []
    for ckpt in cfg.ckpt:
        model = load_stage(ckpt, cfg.device, cfg.encoder, cfg.llm)
        if hasattr(model, "generation"):
            model.generation = _generation_settings(model, cfg)
        trained = read_checkpoint(ckpt).get("datamodule_hyper_parameters", {})
        settings = {
            "sample_rate": model.encoder.sample_rate,
            "max_seconds": cfg.max_seconds or trained.get("max_seconds", 10.0),
            "batch_size": cfg.batch_size,
            "num_workers": cfg.num_workers,
            # the training data's cache, for its own splits only
            "feature_cache": None if cfg.data or cfg.root else trained.get("feature_cache"),
        }
        split = cfg.split
        if cfg.data:
            spec = SourceSpec(cfg.data, audio_dir=cfg.audio_dir)
            dm = AudioTextDataModule(zeroshot=[spec], **settings)
            split, name = "zeroshot", cfg.data
        else:
            root = cfg.root or trained.get("root")
            given = {s: trained.get(s) for s in ("train", "val", "test", "zeroshot")}
            dm = AudioTextDataModule(root=root, **(given if not cfg.root else {}), **settings)
            name = f"{split} split of {root or 'the training data'}"
        run = _run_name(ckpt, len(reports))
        with progress.bar(f"evaluating {run}", quiet=cfg.quiet, unit="batches") as tick:
            report = evaluate(model, dm, split, cfg.tasks, cfg.wordings, cfg.label_prompt, tick)
        print(f"evaluated {ckpt} on the {name}: {tick.summary()}", file=sys.stderr)
        report.checkpoint, report.data = str(ckpt), name
        report.save(Path(cfg.out) / run)
        reports.append(report)
    text = table(reports)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out) / "table.txt").write_text(text + "\n", encoding="utf-8")
    print(text)
    print(f"JSON and TensorBoard scalars under {cfg.out}/")
