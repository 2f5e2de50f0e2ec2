"""``slit fit|validate|test|predict``: Lightning's own CLI (LightningCLI in its omegaconf parser
mode, so YAML can interpolate and several ``--config`` files compose), with three additions:
checkpoints are written crash-safely, decoding settings come from the command line rather than
the checkpoint, and a fit or test ends by printing its figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI

import slit_lightning.stages  # noqa: F401  (lets `--model Stage1` name the stage classes)
from slit_lightning.atomic import write_json_atomic
from slit_lightning.data.datamodule import AudioTextDataModule


def lightning_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Lightning's CLI with :class:`AudioTextDataModule` as the data and any LightningModule."""

    class SlitCLI(_RunSummary, _DecodingFromConfig, _CrashSafeCheckpoints, LightningCLI):
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


def register_resolvers() -> None:
    """YAML helpers: ``${builtin_bert:}`` is the folder of the packaged MiniLM BERT;
    ``${cpu_precision:}`` is ``bf16-mixed`` on a CPU with native bf16, else ``32-true``."""
    from omegaconf import OmegaConf

    from slit_lightning.builtin.bert import minilm_path
    from slit_lightning.training.precision import cpu_precision

    OmegaConf.register_resolver("builtin_bert", lambda: str(minilm_path()), replace=True)
    OmegaConf.register_resolver("cpu_precision", cpu_precision, replace=True)


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


class _RunSummary:
    """Mixin for LightningCLI: ``slit fit`` ends by printing its last validation figures and where
    its checkpoints and logs are; ``slit test`` / ``slit validate`` also write their figures to
    ``{split}_metrics.json`` in the run's log folder."""

    trainer: Trainer

    def after_fit(self) -> None:
        if self.trainer.is_global_zero:
            print(fit_summary(self.trainer), flush=True)

    def after_validate(self) -> None:
        _write_metrics(self.trainer, "val")

    def after_test(self) -> None:
        _write_metrics(self.trainer, "test")


def evaluation_metrics(trainer: Trainer, prefix: str) -> dict[str, float]:
    """The figures the last evaluation logged under ``prefix/``, as plain floats."""
    return {
        k: round(float(v), 4)
        for k, v in sorted(trainer.callback_metrics.items())
        if k.startswith(prefix + "/")
    }


def fit_summary(trainer: Trainer) -> str:
    """What a fit did: its length, its last validation figures, its checkpoints and logs."""
    lines = [f"fit ended at epoch {trainer.current_epoch}, step {trainer.global_step}"]
    val = evaluation_metrics(trainer, "val")
    if val:
        lines.append("last validation: " + ", ".join(f"{k} {v:g}" for k, v in val.items()))
    else:
        lines.append(
            "no validation figures: no val data, or trainer.limit_val_batches is 0"
            " (score a checkpoint with `slit test --ckpt_path ...`)"
        )
    callback = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "dirpath", None):
        best = getattr(callback, "best_model_path", "") or ""
        monitor = getattr(callback, "monitor", None)
        shown = f" (best {monitor}: {best})" if best and monitor not in (None, "step") else ""
        lines.append(f"checkpoints: {callback.dirpath}{shown}")
    if trainer.log_dir:
        lines.append(f"logs: {trainer.log_dir}")
    return "\n".join(lines)


def _write_metrics(trainer: Trainer, split: str) -> None:
    metrics = evaluation_metrics(trainer, split)
    if trainer.is_global_zero and metrics and trainer.log_dir:
        path = Path(trainer.log_dir) / f"{split}_metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, metrics)
