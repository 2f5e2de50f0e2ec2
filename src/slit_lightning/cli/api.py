"""The `slit` sub-commands built on the Python API (:class:`slit_lightning.model.slit.SLIT`).

- ``slit classify FILE... --labels "dog,rain,siren" --ckpt PATH`` prints each file's best label
  and every label's score;
- ``slit export --ckpt PATH --out DIR`` writes a folder that loads without Lightning;
- ``slit index build DIR --ckpt PATH`` embeds every audio file under DIR (only new or changed
  ones when built again); ``slit index search INDEX "query" --top 10`` ranks the files.

``--ckpt`` takes a training checkpoint of any stage or an exported folder everywhere.
"""

from __future__ import annotations

import sys
from typing import Any

MODEL_HELP = "training checkpoint (.ckpt) or folder written by `slit export`"


def _model_arguments(parser: Any, required: bool = True) -> None:
    parser.add_argument("--ckpt", type=str | None, default=None, required=required, help=MODEL_HELP)
    parser.add_argument(
        "--stage1", type=str | None, default=None,
        help="with a stage-2 / instruction-tuned checkpoint: the stage-1 checkpoint whose"
        " contrastive heads embed audio and text",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--encoder", type=str | None, default=None, help="if it has moved")
    parser.add_argument("--llm", type=str | None, default=None, help="if it has moved")


def _load(cfg: Any, path: str | None = None) -> Any:
    from slit_lightning.model.slit import SLIT

    return SLIT.from_pretrained(
        path or cfg.ckpt, cfg.device, stage1=cfg.stage1, encoder=cfg.encoder, llm=cfg.llm
    )


# ---------------------------------------------------------------------- slit classify


def classify_parser() -> Any:
    """Parser of ``slit classify``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="slit classify",
        description="Zero-shot classification: each file's best label among --labels, with"
        " every label's score (probabilities that sum to 1).",
    )
    parser.add_argument("files", nargs="+", help="audio files (wav, flac, ogg, mp3, ...)")
    parser.add_argument("--labels", required=True, help='comma-separated, e.g. "dog,rain,siren"')
    parser.add_argument(
        "--method", default="auto", choices=["auto", "contrastive", "generative"],
        help="auto: contrastive when the model has stage-1 heads, else generative",
    )  # fmt: skip
    parser.add_argument("--prompt", default="the sound of {label}", help="contrastive text prompt")
    parser.add_argument("--batch_size", type=int, default=8)
    _model_arguments(parser)
    return parser


def classify_command(argv: list[str]) -> None:
    """Run ``slit classify``: ``file<TAB>best<TAB>label score ...`` (best first) per file."""
    from slit_lightning.data.audio import AudioError
    from slit_lightning.model.slit import parse_labels

    cfg = classify_parser().parse_args(argv)
    try:
        labels = parse_labels(cfg.labels)
    except ValueError as err:
        raise SystemExit(f"slit classify: --labels: {err}") from None
    model = _load(cfg)
    failed = 0
    for start in range(0, len(cfg.files), cfg.batch_size):
        paths, waves = [], []
        for path in cfg.files[start : start + cfg.batch_size]:
            try:
                waves.append(model.load_clip(path))
                paths.append(path)
            except AudioError as err:
                failed += 1
                print(f"{path}\tskipped: {err}", file=sys.stderr)
        if not waves:
            continue
        results = model.classify(waves, labels, model.sample_rate, cfg.method, cfg.prompt)
        for path, result in zip(paths, results, strict=True):
            ranked = sorted(result.scores.items(), key=lambda kv: -kv[1])
            shown = "  ".join(f"{label} {score:.3f}" for label, score in ranked)
            print(f"{path}\t{result.label}\t{shown}", flush=True)
    if failed:
        raise SystemExit(f"slit classify: {failed} of {len(cfg.files)} files could not be read")


# ---------------------------------------------------------------------- slit export


def export_parser() -> Any:
    """Parser of ``slit export``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="slit export",
        description="Write a trained model as safetensors + JSON config + tokenizer (+ the"
        " frozen encoder and LLM) in a folder that SLIT.from_pretrained loads without Lightning.",
    )
    parser.add_argument("--out", required=True, help="folder to create")
    parser.add_argument(
        "--reference_frozen", action="store_true",
        help="record the frozen encoder / LLM by path or hub id instead of copying them in",
    )  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    _model_arguments(parser)
    return parser


def export_command(argv: list[str]) -> None:
    """Run ``slit export``."""
    from slit_lightning.training import progress

    cfg = export_parser().parse_args(argv)
    model = _load(cfg)
    with progress.bar("exporting", quiet=cfg.quiet) as tick:
        summary = model.save_pretrained(cfg.out, not cfg.reference_frozen, cfg.overwrite, tick)
    print(summary.line())


# ---------------------------------------------------------------------- slit index


def index_parser() -> Any:
    """Parser of ``slit index build|search``."""
    from jsonargparse import ArgumentParser

    build = ArgumentParser(
        description="Embed every audio file under DIR into an index (only new or changed"
        " files when it exists)."
    )
    build.add_argument("dir", help="folder to index (searched recursively)")
    build.add_argument("--out", type=str | None, default=None,
                       help="index file (default DIR/slit_index.safetensors)")  # fmt: skip
    build.add_argument("--batch_size", type=int, default=16)
    build.add_argument("--max_seconds", type=float | None, default=None,
                       help="cut clips (default: as trained)")  # fmt: skip
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    _model_arguments(build)

    search = ArgumentParser(description="Rank the indexed files for a text query.")
    search.add_argument("index", help="index file written by `slit index build`")
    search.add_argument("query", help='e.g. "a dog barks far away"')
    search.add_argument("--top", type=int, default=10)
    _model_arguments(search, required=False)

    parser = ArgumentParser(prog="slit index", description="Audio search.")
    commands = parser.add_subcommands(dest="command")
    commands.add_subcommand("build", build)
    commands.add_subcommand("search", search)
    return parser


def index_command(argv: list[str]) -> None:
    """Run ``slit index build|search``."""
    from slit_lightning.evaluation.index import Index, build_index, search
    from slit_lightning.training import progress

    cfg = index_parser().parse_args(argv)
    sub = cfg[cfg.command]
    if cfg.command == "build":
        model = _load(sub)
        model.batch_size = sub.batch_size
        if sub.max_seconds:
            model.max_seconds = sub.max_seconds
        with progress.bar("embedding audio", quiet=sub.quiet) as tick:
            report = build_index(model, sub.dir, sub.out, tick)
        for path, reason in report.skipped:
            print(f"skipped {path}: {reason}", file=sys.stderr)
        print(report.line())
        return
    index = Index.load(sub.index)
    load = index.model["load"]
    if not sub.ckpt:
        sub.stage1 = sub.stage1 or load.get("stage1")
        sub.encoder = sub.encoder or load.get("encoder")
        sub.llm = sub.llm or load.get("llm")
    model = _load(sub, sub.ckpt or load["path"])
    for hit in search(model, index, sub.query, sub.top):
        print(f"{hit.rank:>4}  {hit.score:6.3f}  {hit.path}")
