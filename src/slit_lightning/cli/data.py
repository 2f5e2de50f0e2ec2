"""``slit data``, ``slit bootstrap`` and ``slit cache-features``: the commands that make, check
and pack data, train the built-in default's frozen models, and cache frozen features."""

from __future__ import annotations

import json
from typing import Any

from slit_lightning.data.sources import DataConfigError
from slit_lightning.training.progress import QUIET_HELP

DATA_COMMANDS = {
    "synth": "write the built-in audio-caption corpus",
    "check": "run the data pipeline once over each split and report clips/s and skips",
    "shards": "pack a manifest/CSV source into WebDataset tar shards",
    "agreement": "score a captions JSON against the built-in corpus's events",
}


def data_parser(command: str | None = None) -> Any:
    """Parser of ``slit data synth|check|shards|agreement``; with ``command``, of that one alone
    (so ``slit data synth`` does not import what ``check`` needs, Lightning included)."""
    from jsonargparse import ArgumentParser

    builders = {"synth": _synth_parser, "check": _check_parser, "shards": _shards_parser,
                "agreement": _agreement_parser}  # fmt: skip
    parser = ArgumentParser(prog="slit data", description="Data tools.")
    commands = parser.add_subcommands(dest="command")
    for name, build in builders.items():
        if command in (None, name):
            commands.add_subcommand(name, build(), help=DATA_COMMANDS[name])
    return parser


def _synth_parser() -> Any:
    from jsonargparse import ArgumentParser

    from slit_lightning.builtin.corpus import synthesize_corpus

    synth = ArgumentParser(description="Write the built-in audio-caption corpus.")
    synth.add_argument("--out", required=True, help="folder to write the corpus into")
    synth.add_function_arguments(synthesize_corpus, skip={"out_dir", "progress", "speech"})
    synth.add_argument(  # a plain flag (``--speech``), not jsonargparse's ``--speech true``
        "--speech",
        action="store_true",
        help="add a spoken phrase (eSpeak NG: English, French, German or Spanish) to about half"
        " of the clips, as one more foreground event of type 'speech'",
    )
    synth.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    return synth


def _check_parser() -> Any:
    import argparse

    from jsonargparse import ActionConfigFile, ArgumentParser

    from slit_lightning.cli.train import register_resolvers
    from slit_lightning.data.datamodule import AudioTextDataModule

    register_resolvers()  # stage configs passed to `data check` may use them
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
    return check


def _shards_parser() -> Any:
    from jsonargparse import ArgumentParser

    from slit_lightning.data.shards import write_shards

    shards = ArgumentParser(description="Pack a manifest/CSV source into WebDataset tar shards.")
    shards.add_argument("--source", required=True, help="manifest, AudioCaps or Clotho CSV")
    shards.add_argument("--out", required=True, help="folder for the .tar files")
    shards.add_function_arguments(write_shards, skip={"source", "out_dir", "progress"})
    shards.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    return shards


def _agreement_parser() -> Any:
    from jsonargparse import ArgumentParser

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
    return agreement


def data_command(argv: list[str]) -> None:
    """Run ``slit data ...``."""
    from slit_lightning.training import progress

    command = argv[0] if argv and argv[0] in DATA_COMMANDS else None
    cfg = data_parser(command).parse_args(argv)
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
    from slit_lightning.cli.train import register_resolvers
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
    parser.add_argument("--encoder_window", type=str | None, default=None,
                        help="full or clip (Whisper); default: model.encoder_window, else full")  # fmt: skip
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
    window = cfg.encoder_window or model.get("encoder_window", "full")
    if not encoder_name:
        raise DataConfigError("slit cache-features: give --encoder or a config with model.encoder")
    if not cfg.data.feature_cache:
        raise DataConfigError("slit cache-features: set data.feature_cache (the folder to write)")
    dm = AudioTextDataModule(**cfg.data)
    dm.setup()
    splits = [s for s in cfg.splits if dm.sources.get(s)]
    encoder = HFAudioEncoder.from_pretrained(encoder_name, layer=layer, window=window)
    encoder = encoder.to(cfg.device)
    with progress.bar("caching features", quiet=cfg.quiet, unit="batches") as tick:
        counts = write_feature_cache(encoder, dm, splits, cfg.data.feature_cache, progress=tick)
    for split, c in counts.items():
        print(f"{split:>8}: {c['clips']} clips, {c['frames']} frames, {c['skipped']} skipped")
    folder = cache_folder(cfg.data.feature_cache, encoder.identity)
    clips = sum(c["clips"] for c in counts.values())
    print(f"features of {encoder.identity} in {folder}: {tick.summary(clips, 'clips')}")
