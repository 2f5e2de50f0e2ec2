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

``slit fit --config conf/stage2.yaml --config conf/trainer/fsdp.yaml`` uses it.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from transformers import PreTrainedModel


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
