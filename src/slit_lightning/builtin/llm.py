"""The project's own small frozen LLM, and ``bootstrap_llm`` that trains it once.

The built-in default must run offline, where no pretrained LLM can be downloaded, so the project
trains a small one itself: :func:`bootstrap_llm` fits a byte-level BPE tokenizer and a 4-layer
LLaMA-style causal LM on sentences of the built-in corpus's kind, and saves both with
``save_pretrained``. From then on it is a plain transformers checkpoint, loaded and frozen like any
pretrained LLM, with nothing from this package imported::

    tokenizer = AutoTokenizer.from_pretrained(out_dir)      # PreTrainedTokenizerFast
    model = AutoModelForCausalLM.from_pretrained(out_dir)   # LlamaForCausalLM

Its text: the corpus's train-split captions and question/answer pairs, instructions in the
training wordings of the instruction tasks followed by their answers (what an instruction-tuned LLM
such as Vicuna or Flan-T5 has seen; the held-out wordings and tasks never appear), plus many more sentences
from scenes planned (never rendered) with the corpus generator's own rules, some of them worded
with the held-out synonyms (a real LLM knows every English word), some behind instruction-like
prefixes ("Describe the sound.", "Question: ... Answer: ...") that later stages prompt with, and
most of them behind a terse fact sheet of their scene ("Sounds: two knocks, hum."). Those teach the
LM to write what its context says, the skill a pretrained LLM brings and stage 2 relies on (the
soft prompt sits where the fact sheet would); ``metrics.json`` records it as ``context_*``, the
event agreement of captions the LM writes after val scenes' fact sheets. The
zeroshot split's text and its held-out event pairs are never used. Case is kept (no lower-casing):
the tokenizer is byte-level, so any text round-trips exactly, and a tenth of the documents are
lower-cased so lower-case prompts are familiar too.

Tokenizer conventions (as LLaMA's): ``tokenizer(text)`` gives ``<s>`` + tokens, no ``</s>``;
every training document is ``<s> text </s>``; padding uses ``<pad>``; ``<unk>`` exists but a
byte-level vocabulary never needs it.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from slit_lightning.atomic import save_folder_atomic
from slit_lightning.builtin import corpus as synth
from slit_lightning.builtin import corpus_text as synth_text
from slit_lightning.instructions import ClipText, InstructionMix
from slit_lightning.training.precision import cpu_autocast, native_bf16
from slit_lightning.training.schedule import warmup_cosine_lr

log = logging.getLogger(__name__)

__all__ = [
    "INSTRUCTIONS",
    "bootstrap_llm",
    "context_reading",
    "corpus_documents",
    "evaluate",
    "generated_documents",
    "is_complete",
    "tiny_knobs",
    "train_tokenizer",
]

SPECIAL_TOKENS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
}
METRICS_FILE = "metrics.json"
# Prefixes later stages may put before a caption; the LM sees them in front of true captions.
INSTRUCTIONS = (
    "Describe the sound.",
    "Describe the audio.",
    "Describe what you hear.",
    "A short caption:",
    "Caption:",
    "Write a caption for the audio clip.",
    "What can be heard in this recording?",
    "Summarize the audio in one sentence.",
)
_PREFIXED, _LOWERED, _HELDOUT = 0.3, 0.1, 0.25  # shares of captions / documents / scenes
# share of captions behind their clip's fact sheet ("Sounds: two knocks, hum. <caption>"): text
# whose start says what follows teaches the LM to write what its context says, as a pretrained
# LLM does and stage 2's soft prompt needs; a smaller share, or too few steps, left the LM
# writing plausible captions whatever its fact sheet said (docs/results.md has the runs)
_FACTED = 0.6
_INSTRUCTED = 1  # instruction + answer documents per clip (2 cost stage-2 captions more)
_LLM_MIX = InstructionMix(dict.fromkeys(("caption", "detailed", "qa", "classify", "tag"), 1.0))
_SEED_TAG = 0x11A  # separates the text streams from the corpus's own clip streams


# ---------------------------------------------------------------------------------------------
# text: documents of the built-in corpus's kind


def _style(text: str, rng: np.random.Generator) -> str:
    """A few documents lower-cased, so prompts typed in lower case are familiar too."""
    return text.lower() if rng.random() < _LOWERED else text


def _documents(
    caps: list[str],
    qa: list[dict[str, str]],
    rng: np.random.Generator,
    labels: Sequence[str] = (),
    facts: str | None = None,
) -> list[str]:
    """One clip's documents: its captions (some behind an instruction), its QA pairs, and
    instructions followed by their answers, in the training wordings of the instruction tasks
    (as an instruction-tuned LLM has seen; held-out wordings and tasks never appear)."""
    docs = []
    for caption in caps:
        draw = rng.random()
        if draw < _PREFIXED:
            caption = f"{INSTRUCTIONS[int(rng.integers(len(INSTRUCTIONS)))]} {caption}"
        elif facts is not None and draw < _PREFIXED + _FACTED:
            caption = f"{facts} {caption}"
        docs.append(_style(caption, rng))
    docs += [_style(f"Question: {p['question']} Answer: {p['answer']}", rng) for p in qa]
    clip = ClipText(caps, list(labels), [(p["question"], p["answer"]) for p in qa])
    draws = random.Random(int(rng.integers(2**62)))
    for _ in range(_INSTRUCTED):
        example = _LLM_MIX.draw(clip, draws)
        docs.append(_style(f"{example.instruction} {example.answer}", rng))
    return docs


def corpus_documents(corpus: str | Path, seed: int = 0) -> list[str]:
    """Documents from the corpus's ``train.jsonl``: captions and ``Question: ... Answer: ...``.

    Raises:
        FileNotFoundError: ``corpus`` or its ``train.jsonl`` is missing.
    """
    corpus = Path(corpus)
    path = corpus / "train.jsonl"
    if not path.is_file():
        what = "does not exist" if not corpus.is_dir() else "has no train.jsonl"
        raise FileNotFoundError(
            f"corpus folder {corpus} {what}: bootstrap_llm needs the built-in corpus"
            " (make one with `slit data synth --out DIR`)"
        )
    rng = np.random.default_rng([seed, _SEED_TAG, 0])
    docs: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            docs += _documents(
                list(row.get("captions") or []),
                list(row.get("qa") or []),
                rng,
                list(row.get("labels") or []),
                synth_text.fact_sheet(row["events"]) if row.get("events") else None,
            )
    if not docs:
        raise ValueError(f"{path} holds no captions: nothing to train the LLM on")
    return docs


def generated_documents(
    scenes: int, seed: int, stream: int, pairs: list[tuple[str, str]], seconds: float = 5.0
) -> list[str]:
    """Documents of ``scenes`` new scenes, planned by the corpus generator but not rendered.

    Args:
        scenes: how many scenes.
        seed: with ``stream`` (0 train, 1 validation) it fixes every scene and sentence.
        pairs: event pairs never put together (the corpus's held-out pairs).
        seconds: clip length the scenes are planned for.
    """
    docs: list[str] = []
    for events, background, text_rng in _planned_scenes(scenes, seed, stream, pairs, seconds):
        # zeroshot=True mixes held-out synonyms into the wordings; the scene itself stays a
        # train-kind scene (no held-out pair), so no zeroshot clip's description is ever seen
        heldout = bool(text_rng.random() < _HELDOUT)
        caps = synth_text.captions(events, background["level"], text_rng, zeroshot=heldout)
        labels = sorted({e["type"] for e in events})
        qa = synth_text.questions(events, text_rng)
        docs += _documents(caps, qa, text_rng, labels, synth_text.fact_sheet(events))
    return docs


def _planned_scenes(
    scenes: int, seed: int, stream: int, pairs: list[tuple[str, str]], seconds: float
) -> Iterator[tuple[list[dict[str, Any]], dict[str, Any], np.random.Generator]]:
    """``scenes`` scenes of the corpus generator's planner: events, background, a text RNG."""
    for index in range(scenes):
        plan_rng, text_rng = (
            np.random.default_rng(s)
            for s in np.random.SeedSequence([seed, _SEED_TAG, 1 + stream, index]).spawn(2)
        )
        # the generator's own planner (private, but the one source of what a scene can be)
        events, background = synth._plan_scene(plan_rng, "train", pairs, seconds)
        yield events, background, text_rng


def _corpus_settings(corpus: Path) -> tuple[list[tuple[str, str]], float]:
    """Held-out pairs and clip length from ``corpus.json`` (none and 5 s for other corpora)."""
    path = corpus / "corpus.json"
    if not path.is_file():
        return [], 5.0
    meta = json.loads(path.read_text(encoding="utf-8"))
    pairs = [(str(a), str(b)) for a, b in meta.get("heldout_pairs") or []]
    return pairs, float(meta.get("clip_seconds") or 5.0)


# ---------------------------------------------------------------------------------------------
# tokenizer and model


def train_tokenizer(texts: list[str], vocab_size: int, max_length: int) -> Any:
    """Byte-level BPE on ``texts`` as a ``PreTrainedTokenizerFast`` that adds ``<s>`` in front."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    core = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: no unknown text
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, core.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, model_max_length=max_length, **SPECIAL_TOKENS
    )


def _model_config(tokenizer: Any, hidden_size: int, num_layers: int, num_heads: int) -> Any:
    """A LLaMA config; MLP width ~8/3 of the hidden size (rounded up to 64), as LLaMA's."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=64 * math.ceil(8 * hidden_size / 3 / 64),
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=tokenizer.model_max_length,
        tie_word_embeddings=True,  # the vocabulary is small; tying halves the embedding weights
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _token_stream(tokenizer: Any, docs: list[str]) -> Tensor:
    """All documents as one ``(N,)`` stream ``<s> doc </s> <s> doc </s> ...``."""
    # verbose=False: documents longer than a window are fine here, windows cut the stream
    ids = tokenizer(docs, add_special_tokens=True, verbose=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return torch.tensor([t for doc in ids for t in (*doc, eos)], dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# training and evaluation


def _fit(
    model: Any,
    stream: Tensor,
    knobs: dict[str, Any],
    progress: Callable[[int, int], None] | None,
) -> float:
    """AdamW, linear warm-up and cosine decay on random windows of the packed stream.

    Packing documents (rather than padding each) wastes no compute on padding. RoPE positions are
    relative, so a document that starts mid-window is placed as if at position 0; the documents
    before it end in ``</s>`` and tell nothing about it, which the model learns to ignore.
    Returns the mean loss of the last tenth of the steps.
    """
    steps, batch_size, block_size = knobs["steps"], knobs["batch_size"], knobs["block_size"]
    lr = knobs["lr"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    schedule = warmup_cosine_lr(optimizer, steps)
    starts = torch.randint(0, max(1, len(stream) - block_size), (steps, batch_size))
    window = torch.arange(block_size)
    model.train()
    losses = []
    for step in range(steps):
        batch = stream[(starts[step].unsqueeze(1) + window).clamp_max(len(stream) - 1)]
        with cpu_autocast(knobs["bf16"]):
            loss = model(input_ids=batch, labels=batch).loss  # the loss itself in float32
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, steps)
    model.eval()
    tail = losses[-max(1, steps // 10) :]
    return sum(tail) / len(tail)


@torch.no_grad()
def evaluate(model: Any, tokenizer: Any, docs: list[str], batch_size: int = 64) -> float:
    """Mean next-token loss (nats per token) over ``docs``, each read alone as ``<s> doc </s>``."""
    model.eval()
    total, count = 0.0, 0
    docs = sorted(docs, key=len)  # batches of similar length waste little on padding
    for i in range(0, len(docs), batch_size):
        chunk = [doc + tokenizer.eos_token for doc in docs[i : i + batch_size]]
        enc = tokenizer(chunk, padding=True, truncation=True, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        logits = model(**enc).logits[:, :-1].float()
        targets = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += int((targets != -100).sum())
    return total / max(1, count)


@torch.no_grad()
def context_reading(
    model: Any,
    tokenizer: Any,
    clips: Sequence[list[dict[str, Any]]],
    max_new_tokens: int = 48,
    batch_size: int = 64,
) -> dict[str, float]:
    """How well the LM writes what its context says: greedy captions after each clip's fact
    sheet (:func:`~slit_lightning.builtin.corpus_text.fact_sheet`), scored with
    :func:`~slit_lightning.builtin.events.event_agreement` against the clip's events.

    Stage 2 relies on this skill: its soft prompt only helps if the LLM writes what comes before
    the caption. A pretrained LLM has it; a small LM trained on too few steps names plausible
    events whatever its context says.
    """
    from slit_lightning.builtin.events import event_agreement

    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        captions = []
        for i in range(0, len(clips), batch_size):
            sheets = [synth_text.fact_sheet(events) for events in clips[i : i + batch_size]]
            enc = tokenizer(sheets, padding=True, return_tensors="pt")
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = out[:, enc["input_ids"].shape[1] :]
            captions += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return event_agreement(captions, clips)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed python, numpy and torch for a block, then give the caller its RNG states back."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


# ---------------------------------------------------------------------------------------------
# bootstrap: train once, save atomically


def is_complete(folder: str | Path) -> bool:
    """True when ``folder`` holds a saved LLM: config, weights, tokenizer and metrics (written last)."""
    folder = Path(folder)
    names = ("config.json", "model.safetensors", "tokenizer.json", METRICS_FILE)
    return all((folder / name).is_file() for name in names)


def tiny_knobs() -> dict[str, Any]:
    """Keyword arguments that make :func:`bootstrap_llm` run in a few seconds (for tests)."""
    return {
        "scenes": 60,
        "val_scenes": 10,
        "vocab_size": 400,
        "hidden_size": 32,
        "num_layers": 2,
        "num_heads": 2,
        "block_size": 64,
        "steps": 40,
        "batch_size": 8,
        "lr": 3e-3,
    }


def bootstrap_llm(
    corpus_dir: str | Path,
    out_dir: str | Path,
    *,
    seed: int = 0,
    scenes: int = 4000,
    val_scenes: int = 100,
    vocab_size: int = 1024,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    block_size: int = 128,
    steps: int = 600,
    batch_size: int = 16,
    lr: float = 2e-3,
    bf16: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Train the built-in small causal LM and its tokenizer once; save both into ``out_dir``.

    Runs once: when ``out_dir`` already holds a complete model, its metrics are returned and
    nothing trains. Everything is written to a temporary sibling folder and renamed into place, so
    an interrupted run never leaves a folder that looks complete. Same seed, same weights (on the
    same machine and thread count). What it takes and reaches with the defaults on the default
    corpus is in docs/results.md; it is far slower on cores other processes keep busy.

    Args:
        corpus_dir: the built-in corpus (``slit data synth --out DIR``): its ``train.jsonl`` gives
            text, its ``corpus.json`` the held-out event pairs that generated scenes avoid.
        out_dir: where the model goes (``config.json``, ``model.safetensors``, tokenizer files,
            ``metrics.json``); load it with ``AutoModelForCausalLM.from_pretrained(out_dir)``.
        seed: fixes the generated text, the initialisation and the data order.
        scenes: extra scenes whose captions and questions are generated for training.
        val_scenes: other scenes whose documents measure the validation loss.
        vocab_size: BPE vocabulary size, special tokens and the 256 bytes included.
        hidden_size: model width (the MLP is ~8/3 as wide, as in LLaMA).
        num_layers: decoder layers.
        num_heads: attention heads (each ``hidden_size / num_heads`` wide).
        block_size: training window in tokens, also the model's maximum positions.
        steps: AdamW steps (linear warm-up over the first 5 %, then cosine decay). Writing what
            the context says appears only late in training on the default corpus, and the
            default leaves room for it (docs/builtin.md).
        batch_size: windows of ``block_size`` tokens per step.
        lr: peak learning rate.
        bf16: train under bf16 autocast (float32 weights and loss); None: where the CPU
            multiplies bf16 natively (:func:`slit_lightning.training.precision.native_bf16`).
        progress: called as ``progress(step, total_steps)`` after every optimizer step.

    Returns:
        The metrics also written to ``metrics.json``: ``val_loss`` (nats per token),
        ``val_perplexity``, ``val_loss_untrained``, ``train_loss``, ``seconds``, sizes, ...
    """
    out = Path(out_dir)
    if is_complete(out):
        log.info("LLM already bootstrapped in %s; not training again", out)
        return json.loads((out / METRICS_FILE).read_text(encoding="utf-8"))
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(
            f"{out} exists but holds no complete saved LLM (config.json, model.safetensors,"
            f" tokenizer.json, {METRICS_FILE}): remove it or choose another out_dir"
        )
    start = time.monotonic()
    knobs = {
        "seed": seed, "scenes": scenes, "val_scenes": val_scenes, "vocab_size": vocab_size,
        "hidden_size": hidden_size, "num_layers": num_layers, "num_heads": num_heads,
        "block_size": block_size, "steps": steps, "batch_size": batch_size, "lr": lr,
        "bf16": native_bf16() if bf16 is None else bool(bf16),
    }  # fmt: skip
    _check_knobs(knobs)
    model, tokenizer, metrics = _train(Path(corpus_dir), knobs, progress)
    metrics["seconds"] = round(time.monotonic() - start, 1)
    _save_atomic(model, tokenizer, metrics, out)
    return metrics


def _check_knobs(knobs: dict[str, Any]) -> None:
    """Reject sizes that would fail deep inside torch with an unhelpful message."""
    if int(knobs["seed"]) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {knobs['seed']}")
    for name in ("scenes", "val_scenes", "hidden_size", "num_layers", "num_heads", "steps"):
        if int(knobs[name]) < 1:
            raise ValueError(f"{name} must be at least 1, got {knobs[name]}")
    if knobs["hidden_size"] % knobs["num_heads"]:
        raise ValueError(
            f"hidden_size ({knobs['hidden_size']}) must be divisible by num_heads"
            f" ({knobs['num_heads']})"
        )
    if knobs["vocab_size"] < 260 + len(SPECIAL_TOKENS):
        raise ValueError("vocab_size must be at least 264 (256 bytes + specials + merges)")
    if knobs["block_size"] < 8 or knobs["batch_size"] < 1:
        raise ValueError("block_size must be at least 8 and batch_size at least 1")


def _train(
    corpus: Path, knobs: dict[str, Any], progress: Callable[[int, int], None] | None
) -> tuple[Any, Any, dict[str, Any]]:
    """Texts -> tokenizer -> LLaMA trained on the packed stream; with its metrics."""
    from transformers import LlamaForCausalLM

    seed = knobs["seed"]
    pairs, seconds = _corpus_settings(corpus)
    from_corpus = corpus_documents(corpus, seed)
    train_docs = from_corpus + generated_documents(knobs["scenes"], seed, 0, pairs, seconds)
    val_docs = generated_documents(knobs["val_scenes"], seed, 1, pairs, seconds)
    tokenizer = train_tokenizer(train_docs, knobs["vocab_size"], knobs["block_size"])
    stream = _token_stream(tokenizer, train_docs)
    with _seeded(seed):
        config = _model_config(
            tokenizer, knobs["hidden_size"], knobs["num_layers"], knobs["num_heads"]
        )
        model = LlamaForCausalLM(config)
        untrained = evaluate(model, tokenizer, val_docs)
        train_loss = _fit(model, stream, knobs, progress)
    val_loss = evaluate(model, tokenizer, val_docs)
    val_clips = [e for e, _, _ in _planned_scenes(knobs["val_scenes"], seed, 1, pairs, seconds)]
    reading = context_reading(model, tokenizer, val_clips)
    log.info(
        "LLM bootstrap: val loss %.4f (perplexity %.3f); captions after a fact sheet: all right"
        " %.2f, recall %.2f",
        val_loss,
        math.exp(val_loss),
        reading["all_right"],
        reading["recall"],
    )
    metrics = {
        **knobs,
        "val_loss": round(val_loss, 4),
        "val_perplexity": round(math.exp(val_loss), 3),
        "val_loss_untrained": round(untrained, 4),
        # captions written after val scenes' fact sheets: does the LM write what its context says?
        "context_all_right": round(reading["all_right"], 4),
        "context_recall": round(reading["recall"], 4),
        "context_precision": round(reading["precision"], 4),
        "train_loss": round(train_loss, 4),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocabulary": len(tokenizer),  # BPE stops early once every word is one token
        "train_documents": len(train_docs),
        "corpus_documents": len(from_corpus),
        "train_tokens": len(stream),
        "val_documents": len(val_docs),
        "corpus": str(corpus),
    }
    return model, tokenizer, metrics


def _save_atomic(model: Any, tokenizer: Any, metrics: dict[str, Any], out: Path) -> None:
    """Model, tokenizer, then ``metrics.json`` (the completion marker), written atomically."""

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        text = json.dumps(metrics, indent=2) + "\n"
        (folder / METRICS_FILE).write_text(text, encoding="utf-8")

    save_folder_atomic(out, write, is_complete)
