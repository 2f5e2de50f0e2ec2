"""FSDP set up for a frozen encoder, a frozen LLM and a trainable Q-Former between them.

Lightning's ``FSDPStrategy`` needs to be told which modules become FSDP units. Naming block
classes in YAML ties a config to one LLM family; :class:`BlockFSDPStrategy` instead reads them
from the model it wraps: every transformers model lists its transformer blocks in
``_no_split_modules`` (the same list ``device_map="auto"`` and accelerate's FSDP plugin use).

Units, from the inside out:

- each transformer block of the encoder and the LLM (frozen: FSDP keeps no gradients for them
  and the optimiser never sees them);
- the rest of each frozen model (embeddings, final norm, LM head), as one unit per model, so
  that a bf16 LLM never shares a flat parameter with the fp32 Q-Former;
- the root: exactly the trainable parameters (Q-Former, projection), sharded like any model.

Checkpoints leave the frozen models out (they are saved by reference, see
``SLITStage.on_save_checkpoint``), sharded ones too. Lightning's sharded loader asks the files for
every key of the model and so could not resume from them; :meth:`BlockFSDPStrategy.load_checkpoint`
reads the stored keys and keeps the frozen weights the model was built with.

``slit fit --config conf/stage2.yaml --config conf/trainer/fsdp.yaml`` uses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.strategies.fsdp import (
    _METADATA_FILENAME,
    _get_sharded_state_dict_context,
    _is_sharded_checkpoint,
)
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from transformers import PreTrainedModel

from slit_lightning.model.state import CheckpointError


def frozen_models(model: nn.Module) -> list[PreTrainedModel]:
    """The outermost transformers models inside ``model`` whose parameters are all frozen."""
    found: list[PreTrainedModel] = []
    for module in model.modules():
        if not isinstance(module, PreTrainedModel) or any(module in m.modules() for m in found):
            continue
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            found.append(module)
    return found


def block_classes(model: nn.Module) -> set[type[nn.Module]]:
    """Classes of the transformer blocks of the frozen models in ``model`` (by their
    ``_no_split_modules`` names)."""
    classes: set[type[nn.Module]] = set()
    for frozen in frozen_models(model):
        names = set(getattr(frozen, "_no_split_modules", None) or [])
        classes |= {type(m) for m in frozen.modules() if type(m).__name__ in names}
    return classes


def llm_block_classes(model: nn.Module) -> set[type[nn.Module]]:
    """Block classes of the LLM alone (``model.llm``), for activation checkpointing."""
    llm = getattr(model, "llm", None)
    return block_classes(llm) if isinstance(llm, nn.Module) else set()


def wrap_classes(model: nn.Module) -> set[type[nn.Module]]:
    """FSDP unit classes: the frozen models' blocks and the frozen models themselves."""
    return block_classes(model) | {type(m) for m in frozen_models(model)}


class BlockFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP with its wrap policy taken from the model (see the module docstring).

    Args:
        checkpoint_llm_blocks: recompute the LLM blocks' activations in the backward pass
            (activation checkpointing): less memory for a little more compute. The soft prompt's
            gradient flows through the frozen LLM, so its activations are kept otherwise.
        **kwargs: Lightning's ``FSDPStrategy`` arguments (``sharding_strategy``,
            ``state_dict_type``, ``cpu_offload``, ...); ``auto_wrap_policy`` and
            ``activation_checkpointing_policy`` are set here and must not be given.
    """

    def __init__(self, checkpoint_llm_blocks: bool = False, **kwargs: Any) -> None:
        for taken in ("auto_wrap_policy", "activation_checkpointing_policy"):
            if kwargs.get(taken) is not None:
                raise ValueError(
                    f"BlockFSDPStrategy sets {taken} from the model; use FSDPStrategy to set it"
                )
        super().__init__(**kwargs)
        self.checkpoint_llm_blocks = checkpoint_llm_blocks

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(wrap_classes(model))
        if self.checkpoint_llm_blocks:
            blocks = llm_block_classes(model)
            if not blocks:
                raise ValueError("checkpoint_llm_blocks: the model has no LLM blocks (stage 1?)")
            self._activation_checkpointing_kwargs = {"auto_wrap_policy": ModuleWrapPolicy(blocks)}
        return super()._setup_model(model)

    def load_checkpoint(
        self, checkpoint_path: Any, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Lightning's loader, except that a sharded checkpoint may lack the frozen models."""
        path = Path(self.broadcast(checkpoint_path))
        if not _is_sharded_checkpoint(path):
            return super().load_checkpoint(path, weights_only=weights_only)
        assert self.model is not None
        with _get_sharded_state_dict_context(self.model):
            model_state = load_sharded_model_state(self.model, path)
            if self.lightning_module.trainer.state.fn == TrainerFn.FITTING and self.optimizers:
                _load_sharded_optimizers(self.model, self.optimizers, model_state, path)
        return torch.load(path / _METADATA_FILENAME, weights_only=weights_only)


def stored_model_keys(path: Path) -> set[str]:
    """The module state keys a sharded (distributed) checkpoint folder holds."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(path)).read_metadata()
    return {
        key.removeprefix("model.")
        for key in metadata.state_dict_metadata
        if key.startswith("model.")
    }


def load_sharded_model_state(model: nn.Module, path: Path) -> dict[str, Any]:
    """Load the module state stored in the sharded checkpoint ``path`` into ``model``; returns
    the loaded state. An FSDP-wrapped ``model`` needs the sharded state-dict context around it.

    Keys the checkpoint lacks keep the model's values; they must all be frozen parameters or
    buffers of frozen modules: a missing trainable weight is a :class:`CheckpointError`."""
    from torch.distributed.checkpoint import load

    state = model.state_dict()
    stored = stored_model_keys(path)
    trainable = {_unwrapped(name) for name, p in model.named_parameters() if p.requires_grad}
    missing = [key for key in state if key not in stored and _unwrapped(key) in trainable]
    if missing:
        raise CheckpointError(
            f"the sharded checkpoint {path} lacks trainable weights: {', '.join(missing[:5])}"
        )
    present = {"model": {key: value for key, value in state.items() if key in stored}}
    load(present, checkpoint_id=path)
    model.load_state_dict(present["model"], strict=False)
    return present["model"]


def _unwrapped(key: str) -> str:
    """A state key as the unwrapped module names it (FSDP's wrapper prefixes removed)."""
    return key.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def _load_sharded_optimizers(
    model: nn.Module, optimizers: list[Any], model_state: dict[str, Any], path: Path
) -> None:
    """The optimiser states of a sharded checkpoint, as Lightning's own loader reads them."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.optimizer import load_sharded_optimizer_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    reader = FileSystemReader(path=path)
    for index, optimizer in enumerate(optimizers):
        key = f"optimizer_{index}"
        state = load_sharded_optimizer_state_dict(
            model_state_dict=model_state, optimizer_key=key, storage_reader=reader
        )
        optimizer.load_state_dict(
            FSDP.optim_state_dict_to_load(optim_state_dict=state[key], model=model, optim=optimizer)
        )
