"""Reading checkpoint files safely and refusing weights that do not fit the model.

Lightning-free, so that loading an exported folder uses it too. Every refusal is a
:class:`CheckpointError` whose message names the checkpoint, what it was loaded into and up to a
few keys / shapes that differ, instead of torch's raw ``size mismatch`` or a half-loaded model.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from slit_lightning.errors import SLITError

#: at most this many keys are named per kind of problem
SHOWN = 4

FROZEN_REFERENCES = "slit_frozen_references"
LEGACY_ENCODER_REFERENCE = "slit_encoder_reference"  # checkpoints written before the LLM joined
STAGE_KEY = "slit_stage"


def frozen_references(checkpoint: dict[str, Any]) -> dict[str, str]:
    """The identities of the frozen parts a checkpoint was trained with (empty if none recorded)."""
    if FROZEN_REFERENCES in checkpoint:
        return dict(checkpoint[FROZEN_REFERENCES])
    if LEGACY_ENCODER_REFERENCE in checkpoint:
        return {"encoder": checkpoint[LEGACY_ENCODER_REFERENCE]}
    return {}


def stage_of(checkpoint: dict[str, Any]) -> str | None:
    """The stage class (``Stage1``, ``Stage2``, ``Instruct``) that wrote a checkpoint: as recorded,
    or read from its hyper-parameters (older checkpoints); None for anything else."""
    if isinstance(checkpoint.get(STAGE_KEY), str):
        return checkpoint[STAGE_KEY]
    hparams = checkpoint.get("hyper_parameters") or {}
    for key, stage in (("held_out_tasks", "Instruct"), ("llm", "Stage2"), ("embed_dim", "Stage1")):
        if key in hparams:
            return stage
    return None


class CheckpointError(SLITError, ValueError):
    """A checkpoint that does not fit the model being built; the message names the mismatch."""


def read_checkpoint(ckpt: str | Path) -> dict[str, Any]:
    """A checkpoint's contents, read with ``weights_only=True`` (no arbitrary pickled objects);
    a :class:`CheckpointError` for a missing, truncated, foreign or non-checkpoint file."""
    if not Path(ckpt).is_file():
        raise CheckpointError(f"no checkpoint at {ckpt}")
    try:
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if refused is None:
            raise CheckpointError(
                f"{ckpt} is not a readable checkpoint (not a torch file, or damaged)"
            ) from err
        raise CheckpointError(
            f"{ckpt} holds a pickled object ({refused.group(1)}), not only tensors and plain"
            " values; it is refused because loading it would run code from the file"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise CheckpointError(
            f"{ckpt} is not a readable checkpoint (truncated or not a torch file): {first}"
        ) from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise CheckpointError(
            f"{ckpt} is not a training checkpoint (no state_dict): give a .ckpt that"
            " `slit fit` wrote"
        )
    return checkpoint


def check_state(
    own: Mapping[str, Tensor],
    saved: Mapping[str, Tensor],
    what: str,
    fix: str,
    optional: Sequence[str] = (),
) -> None:
    """Raise :class:`CheckpointError` unless ``saved`` has exactly ``own``'s keys and shapes.

    ``what`` names the checkpoint and the model it is loaded into, ``fix`` says what to do;
    keys under an ``optional`` prefix may be missing (frozen parts stored by reference)."""
    missing = [k for k in own if k not in saved and not k.startswith(tuple(optional))]
    unexpected = [k for k in saved if k not in own]
    wrong = [
        f"{k} {tuple(saved[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in saved and tuple(saved[k].shape) != tuple(own[k].shape)
    ]
    problems = [
        f"{label}: {_some(keys)}"
        for label, keys in (
            ("shapes differ (checkpoint vs model)", wrong),
            ("missing from the checkpoint", missing),
            ("not in the model", unexpected),
        )
        if keys
    ]
    if problems:
        raise CheckpointError(f"{what} does not fit: {'; '.join(problems)}. {fix}")


def _some(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN])
    return shown + (f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else "")
