"""The `slit` command.

``slit fit|validate|test|predict`` is Lightning's own CLI (LightningCLI, omegaconf parser mode, so
YAML can interpolate and several ``--config`` files compose). The other sub-commands are ours:

- ``slit data synth``  writes the built-in audio-caption corpus;
- ``slit data check``  runs the data pipeline over the configured splits and reports clips/s, skips;
- ``slit data shards`` packs a manifest into WebDataset tar shards for fast streaming;
- ``slit bootstrap encoder|llm`` trains the built-in default's frozen audio encoder / LLM once;
- ``slit cache-features --config STAGE.yaml`` runs the frozen encoder once over the data and stores
  its features in ``data.feature_cache``, where the stages then read them;
- ``slit caption``, ``slit ask``, ``slit eval``: a trained checkpoint's captions, answers and
  evaluation (:mod:`slit_lightning.cli.generate`);
- ``slit classify``, ``slit export``, ``slit index build|search``: the Python API's commands
  (:mod:`slit_lightning.cli.api`).
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
from typing import Any

from slit_lightning.data.skips import TooManySkipsError
from slit_lightning.data.sources import DataConfigError
from slit_lightning.evaluation.index import SearchIndexError
from slit_lightning.metrics.captioning import JavaNotFoundError
from slit_lightning.model.encoders import EncoderConfigError
from slit_lightning.model.export import ExportError
from slit_lightning.model.llm import LLMConfigError
from slit_lightning.model.slit import CapabilityError
from slit_lightning.stages.base import CheckpointError
from slit_lightning.training.checkpointing import NonFiniteLossError
from slit_lightning.training.progress import QUIET_HELP

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
GENERATE_COMMANDS = ("caption", "ask", "eval")
API_COMMANDS = ("classify", "export", "index")


def lightning_cli(args: list[str] | None = None, run: bool = True) -> Any:
    """Lightning's CLI with :class:`AudioTextDataModule` as the data and any LightningModule."""
    from lightning.pytorch import LightningModule
    from lightning.pytorch.cli import LightningCLI

    import slit_lightning.stages  # noqa: F401  (lets `--model Stage1` name the stage classes)
    from slit_lightning.data.datamodule import AudioTextDataModule

    class SlitCLI(_DecodingFromConfig, _CrashSafeCheckpoints, LightningCLI):
        pass

    register_resolvers()
    return SlitCLI(
        LightningModule,
        AudioTextDataModule,
        subclass_mode_model=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


class _CrashSafeCheckpoints:
    """Mixin for LightningCLI: the trainer writes checkpoints crash-safely (temporary file, then
    rename) unless the configuration names a checkpoint IO of its own."""

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

        from slit_lightning.training.checkpointing import AtomicCheckpointIO

        trainer = super().instantiate_trainer(**kwargs)  # type: ignore[misc]
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


class _DecodingFromConfig:
    """Mixin for LightningCLI: ``model.generation`` comes from the configuration and command line,
    never from the checkpoint.

    Given ``--ckpt_path``, LightningCLI replaces the model's arguments with the hyper-parameters
    stored in the checkpoint, so ``slit test --ckpt_path X --model.generation.num_beams 5`` would
    silently decode as in training. The weights' shapes must come from the checkpoint, but how to
    decode is a choice made at evaluation time.
    """

    def _parse_ckpt_path(self) -> None:
        command = self.config.get("subcommand")  # type: ignore[attr-defined]
        model = self.config[command].get("model") if command else None  # type: ignore[attr-defined]
        args = model.get("init_args") if model is not None and "init_args" in model else None
        wanted = args.get("generation") if args is not None else None
        super()._parse_ckpt_path()  # type: ignore[misc]
        if wanted is not None:
            self.config[command]["model"]["init_args"]["generation"] = wanted  # type: ignore[attr-defined]


def register_resolvers() -> None:
    """YAML helpers: ``${builtin_bert:}`` is the folder of the packaged MiniLM BERT;
    ``${cpu_precision:}`` is ``bf16-mixed`` on a CPU with native bf16, else ``32-true``."""
    from omegaconf import OmegaConf

    from slit_lightning.builtin.bert import minilm_path
    from slit_lightning.training.precision import cpu_precision

    OmegaConf.register_resolver("builtin_bert", lambda: str(minilm_path()), replace=True)
    OmegaConf.register_resolver("cpu_precision", cpu_precision, replace=True)


def data_parser() -> Any:
    """Parser of ``slit data synth|check|shards|agreement``."""
    import argparse

    from jsonargparse import ActionConfigFile, ArgumentParser

    from slit_lightning.builtin.corpus import synthesize_corpus
    from slit_lightning.data.datamodule import AudioTextDataModule
    from slit_lightning.data.shards import write_shards

    register_resolvers()  # stage configs passed to `data check` may use them
    synth = ArgumentParser(description="Write the built-in audio-caption corpus.")
    synth.add_argument("--out", required=True, help="folder to write the corpus into")
    synth.add_function_arguments(synthesize_corpus, skip={"out_dir", "progress"})
    synth.add_argument("--quiet", action="store_true", help=QUIET_HELP)

    check = ArgumentParser(
        description="Run the data pipeline once over each split and report.",
        parser_mode="omegaconf",
    )
    check.add_argument("--config", action=ActionConfigFile, help="YAML with a data: section")
    check.add_class_arguments(AudioTextDataModule, "data")
    check.add_argument("--splits", type=list[str], default=["train", "val", "test", "zeroshot"])
    check.add_argument("--log_dir", type=str | None, default=None, help="TensorBoard folder")
    check.add_argument("--max_batches", type=int | None, default=None, help="per split")
    for other in ("model", "trainer", "optimizer", "lr_scheduler", "ckpt_path", "seed_everything"):
        # Stage configs carry these sections too; the data pass reads only `data:`.
        check.add_argument(f"--{other}", type=Any, default=None, help=argparse.SUPPRESS)

    shards = ArgumentParser(description="Pack a manifest/CSV source into WebDataset tar shards.")
    shards.add_argument("--source", required=True, help="manifest, AudioCaps or Clotho CSV")
    shards.add_argument("--out", required=True, help="folder for the .tar files")
    shards.add_function_arguments(write_shards, skip={"source", "out_dir", "progress"})
    shards.add_argument("--quiet", action="store_true", help=QUIET_HELP)

    agreement = ArgumentParser(
        description="Score a captions JSON (stage 2's val/test output) against the built-in"
        " corpus's events: types, number words and order (slit_lightning.builtin.events)."
    )
    agreement.add_argument("captions", help="a {split}_captions.json written by slit test/validate")
    agreement.add_argument("--corpus", required=True, help="the built-in corpus the clips are from")
    agreement.add_argument(
        "--details",
        action="store_true",
        help="add a breakdown: clips by fault, recall per type, number words said per true count",
    )

    parser = ArgumentParser(prog="slit data", description="Data tools.")
    commands = parser.add_subcommands(dest="command")
    commands.add_subcommand("synth", synth)
    commands.add_subcommand("check", check)
    commands.add_subcommand("shards", shards)
    commands.add_subcommand("agreement", agreement)
    return parser


def data_command(argv: list[str]) -> None:
    """Run ``slit data ...``."""
    from slit_lightning.training import progress

    cfg = data_parser().parse_args(argv)
    sub = cfg[cfg.command]
    progress.quieten(sub.get("quiet", False))
    if cfg.command == "synth":
        from slit_lightning.builtin.corpus import synthesize_corpus

        kwargs = {k: v for k, v in sub.items() if k not in ("out", "quiet", "__path__")}
        with progress.bar("synthesising corpus", quiet=sub.quiet, unit="clips") as tick:
            counts = synthesize_corpus(sub.out, progress=tick, **kwargs)
        splits = ", ".join(f"{k} {v}" for k, v in counts.items())
        print(f"corpus written to {sub.out}: {splits}; {tick.summary()}")
    elif cfg.command == "check":
        from slit_lightning.data.check import data_pass
        from slit_lightning.data.datamodule import AudioTextDataModule

        if not hasattr(sub.data, "keys"):  # e.g. `data: 5` in the YAML
            raise DataConfigError(
                f"the config's data section must map AudioTextDataModule's arguments (train:,"
                f" batch_size:, ...), got {sub.data!r}"
            )
        dm = AudioTextDataModule(**sub.data)
        dm.setup()
        splits = [s for s in sub.splits if dm.sources.get(s)]
        for report in data_pass(dm, splits, sub.log_dir, sub.max_batches):
            print(report.line())
        if sub.log_dir:
            print(f"TensorBoard logs: {sub.log_dir}  (tensorboard --logdir {sub.log_dir})")
    elif cfg.command == "agreement":
        from slit_lightning.builtin.events import breakdown_captions_file, score_captions_file

        scores: dict[str, Any] = {
            k: round(v, 4) for k, v in score_captions_file(sub.captions, sub.corpus).items()
        }
        if sub.details:
            scores["breakdown"] = breakdown_captions_file(sub.captions, sub.corpus)
        print(json.dumps(scores))
    else:
        from slit_lightning.data.shards import write_shards

        kwargs = {k: v for k, v in sub.items() if k not in ("source", "out", "quiet", "__path__")}
        with progress.bar("writing shards", quiet=sub.quiet, unit="parts") as tick:
            counts = write_shards(sub.source, sub.out, progress=tick, **kwargs)
        written = ", ".join(f"{k} {v}" for k, v in counts.items())
        print(f"shards in {sub.out}: {written}; {tick.summary()}")


def bootstrap_parser() -> Any:
    """Parser of ``slit bootstrap encoder|llm``."""
    from jsonargparse import ArgumentParser

    from slit_lightning.builtin.encoder_bootstrap import bootstrap_encoder
    from slit_lightning.builtin.llm import bootstrap_llm

    parser = ArgumentParser(prog="slit bootstrap", description="Build the built-in models.")
    commands = parser.add_subcommands(dest="command")
    jobs = {
        "encoder": (bootstrap_encoder, "Pre-train the built-in small audio encoder once."),
        "llm": (bootstrap_llm, "Train the built-in small causal LM and its tokenizer once."),
    }
    for name, (job, description) in jobs.items():
        sub = ArgumentParser(description=description + " Needs the built-in corpus.")
        sub.add_argument("--corpus", required=True, help="corpus folder (slit data synth --out)")
        sub.add_argument("--out", required=True, help="folder for the model (save_pretrained)")
        sub.add_function_arguments(job, skip={"corpus_dir", "out_dir", "progress", "config"})
        sub.add_argument("--quiet", action="store_true", help=QUIET_HELP)
        commands.add_subcommand(name, sub)
    return parser


def bootstrap_command(argv: list[str]) -> None:
    """Run ``slit bootstrap encoder|llm ...``."""
    from slit_lightning.builtin.encoder_bootstrap import bootstrap_encoder
    from slit_lightning.builtin.llm import bootstrap_llm
    from slit_lightning.training import progress

    cfg = bootstrap_parser().parse_args(argv)
    sub = cfg[cfg.command]
    progress.quieten(sub.quiet)
    job = bootstrap_encoder if cfg.command == "encoder" else bootstrap_llm
    kwargs = {k: v for k, v in sub.items() if k not in ("corpus", "out", "quiet", "__path__")}
    with progress.bar(f"bootstrapping the {cfg.command}", quiet=sub.quiet, unit="steps") as tick:
        metrics = job(sub.corpus, sub.out, progress=tick, **kwargs)
    shown = ("val_map", "val_f1", "count_event_accuracy", "val_loss", "val_perplexity")
    summary = ", ".join(f"{k} {metrics[k]}" for k in shown if k in metrics)
    what = {"encoder": "audio encoder", "llm": "LLM"}[cfg.command]
    print(f"{what} in {sub.out}: {summary}; {tick.summary()}")


def cache_parser() -> Any:
    """Parser of ``slit cache-features``."""
    import argparse

    from jsonargparse import ActionConfigFile, ArgumentParser
    from lightning.pytorch import LightningModule

    import slit_lightning.stages  # noqa: F401  (the stage classes a config names)
    from slit_lightning.data.datamodule import AudioTextDataModule

    register_resolvers()
    parser = ArgumentParser(
        prog="slit cache-features",
        description="Run the frozen audio encoder once over the data and store its features in"
        " data.feature_cache, where every stage with the same encoder then reads them.",
        parser_mode="omegaconf",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a stage's YAML (model + data)")
    parser.add_class_arguments(AudioTextDataModule, "data")
    parser.add_argument("--encoder", type=str | None, default=None, help="default: model.encoder")
    parser.add_argument("--encoder_layer", type=int | None, default=None,
                        help="default: model.encoder_layer, else -1")  # fmt: skip
    parser.add_argument("--splits", type=list[str], default=["train", "val", "test", "zeroshot"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    # the stage's own arguments, as `slit fit` reads them (only the encoder settings are used)
    parser.add_subclass_arguments(LightningModule, "model", required=False)
    for other in ("trainer", "optimizer", "lr_scheduler", "ckpt_path", "seed_everything"):
        parser.add_argument(f"--{other}", type=Any, default=None, help=argparse.SUPPRESS)
    return parser


def cache_command(argv: list[str]) -> None:
    """Run ``slit cache-features ...``."""
    from slit_lightning.data.cache_features import write_feature_cache
    from slit_lightning.data.datamodule import AudioTextDataModule
    from slit_lightning.data.features import cache_folder
    from slit_lightning.model.encoders import HFAudioEncoder
    from slit_lightning.training import progress

    cfg = cache_parser().parse_args(argv)
    progress.quieten(cfg.quiet)
    model = cfg.model.init_args.as_dict() if cfg.model else {}
    encoder_name = cfg.encoder or model.get("encoder")
    layer = cfg.encoder_layer if cfg.encoder_layer is not None else model.get("encoder_layer", -1)
    if not encoder_name:
        raise DataConfigError("slit cache-features: give --encoder or a config with model.encoder")
    if not cfg.data.feature_cache:
        raise DataConfigError("slit cache-features: set data.feature_cache (the folder to write)")
    dm = AudioTextDataModule(**cfg.data)
    dm.setup()
    splits = [s for s in cfg.splits if dm.sources.get(s)]
    encoder = HFAudioEncoder.from_pretrained(encoder_name, layer=layer).to(cfg.device)
    with progress.bar("caching features", quiet=cfg.quiet, unit="batches") as tick:
        counts = write_feature_cache(encoder, dm, splits, cfg.data.feature_cache, progress=tick)
    for split, c in counts.items():
        print(f"{split:>8}: {c['clips']} clips, {c['frames']} frames, {c['skipped']} skipped")
    folder = cache_folder(cfg.data.feature_cache, encoder.identity)
    clips = sum(c["clips"] for c in counts.values())
    print(f"features of {encoder.identity} in {folder}: {tick.summary(clips, 'clips')}")


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
    """Entry point of the `slit` console script."""
    given = argv
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    check_config_files(argv)
    try:
        if (argv and argv[0] in LIGHTNING_COMMANDS) or not argv or argv[0].startswith("-"):
            lightning_cli(given)  # None: LightningCLI reads sys.argv itself
        elif argv[0] == "data":
            data_command(argv[1:])
        elif argv[0] == "bootstrap":
            bootstrap_command(argv[1:])
        elif argv[0] == "cache-features":
            cache_command(argv[1:])
        elif argv[0] in GENERATE_COMMANDS:
            from slit_lightning.cli import generate as cli_generate

            getattr(cli_generate, f"{argv[0]}_command")(argv[1:])
        elif argv[0] in API_COMMANDS:
            from slit_lightning.cli import api as cli_api

            getattr(cli_api, f"{argv[0]}_command")(argv[1:])
        else:
            known = ", ".join(
                (
                    *LIGHTNING_COMMANDS,
                    "data",
                    "bootstrap",
                    "cache-features",
                    *GENERATE_COMMANDS,
                    *API_COMMANDS,
                )
            )
            raise SystemExit(f"slit: unknown command {argv[0]!r}; commands: {known}")
    except (
        DataConfigError,
        TooManySkipsError,
        LLMConfigError,
        EncoderConfigError,
        CheckpointError,
        JavaNotFoundError,
        CapabilityError,
        ExportError,
        SearchIndexError,
        NonFiniteLossError,
    ) as err:
        # A user's data problem: one line that names the files and the fix, no traceback.
        raise SystemExit(f"slit: {err}") from None


if __name__ == "__main__":
    main()
