"""The built-in small LLM: trained once on corpus-like text, saved as a plain transformers model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from slit_lightning.builtin.corpus import synthesize_corpus
from slit_lightning.builtin.llm import (
    bootstrap_llm,
    corpus_documents,
    generated_documents,
    is_complete,
    tiny_knobs,
)

# Words the corpus never uses, accents, digits, quotes, an emoji: byte-level BPE must keep them all.
UNSEEN = 'Zebras quietly hum «Über» at 3:45pm — naïve? Yes! "ok" 🙂\tend'


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight short clips of the built-in corpus (the LLM reads only their text)."""
    out = tmp_path_factory.mktemp("corpus")
    synthesize_corpus(out, seed=0, clips=8, sample_rate=8000, clip_seconds=1.0)
    return out


@pytest.fixture(scope="module")
def trained(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list]:
    """One tiny bootstrap: its folder, returned metrics and the progress calls it made."""
    out = tmp_path_factory.mktemp("llm") / "model"
    calls: list[tuple[int, int]] = []
    metrics = bootstrap_llm(
        corpus, out, seed=0, progress=lambda s, n: calls.append((s, n)), **tiny_knobs()
    )
    return out, metrics, calls


def test_saves_a_complete_model_with_metrics(trained: tuple[Path, dict, list]) -> None:
    out, metrics, calls = trained
    assert is_complete(out)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert {"val_loss", "val_perplexity", "val_loss_untrained", "seconds"} <= metrics.keys()
    assert metrics["val_loss"] < metrics["val_loss_untrained"] - 0.5
    assert all(0 <= metrics[f"context_{k}"] <= 1 for k in ("all_right", "recall", "precision"))
    steps = tiny_knobs()["steps"]
    assert calls[0] == (1, steps) and calls[-1] == (steps, steps) and len(calls) == steps
    assert not list(out.parent.glob(".model.tmp-*"))  # the temporary folder is gone


def test_loads_in_a_fresh_process_without_this_package(trained: tuple[Path, dict, list]) -> None:
    """Standard transformers classes only: a process that never imports slit_lightning loads it."""
    out = trained[0]
    script = f"""
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(out)!r})
model = AutoModelForCausalLM.from_pretrained({str(out)!r})
enc = tok("A low", return_tensors="pt")
gen = model.generate(**enc, max_new_tokens=6, do_sample=False)
print(json.dumps({{"model": type(model).__name__, "prompt": enc["input_ids"].shape[1],
    "generated": gen.shape[1], "ours": any(m.startswith("slit_lightning") for m in sys.modules)}}))
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # as fast for this size, robust to busy cores
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["model"] == "LlamaForCausalLM"
    assert report["generated"] > report["prompt"]
    assert not report["ours"]


def test_tokenizer_round_trips_any_text(trained: tuple[Path, dict, list]) -> None:
    tok = AutoTokenizer.from_pretrained(trained[0])
    ids = tok(UNSEEN)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == UNSEEN
    special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}
    assert None not in special and len(special) == 4
    assert len(tok) <= tiny_knobs()["vocab_size"]


def _caption_loss(model: torch.nn.Module, tok: object, captions: list[str]) -> float:
    """Mean next-token loss of ``<s> caption </s>`` over captions, each read alone."""
    losses = []
    for caption in captions:
        ids = tok(caption + tok.eos_token, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            losses.append(float(model(input_ids=ids, labels=ids).loss))
    return sum(losses) / len(losses)


def test_learned_the_corpus_language(corpus: Path, trained: tuple[Path, dict, list]) -> None:
    """On the corpus's val captions (never trained on) it beats the same config untrained."""
    out = trained[0]
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.manual_seed(0)
    untrained = AutoModelForCausalLM.from_config(model.config).eval()
    rows = [json.loads(line) for line in (corpus / "val.jsonl").read_text().splitlines()]
    captions = [c for row in rows for c in row["captions"]]
    assert _caption_loss(model, tok, captions) < _caption_loss(untrained, tok, captions) - 0.5


def test_second_call_returns_saved_metrics_without_training(
    corpus: Path, trained: tuple[Path, dict, list]
) -> None:
    out, metrics, _ = trained
    weights = out / "model.safetensors"
    before = weights.stat().st_mtime_ns
    calls: list[tuple[int, int]] = []
    again = bootstrap_llm(corpus, out, progress=lambda s, n: calls.append((s, n)), **tiny_knobs())
    assert again == metrics
    assert calls == []  # no optimizer step ran
    assert weights.stat().st_mtime_ns == before


def test_same_seed_same_weights(
    corpus: Path, trained: tuple[Path, dict, list], tmp_path: Path
) -> None:
    out = trained[0]
    bootstrap_llm(corpus, tmp_path / "again", seed=0, **tiny_knobs())
    first, second = (
        load_file(out / "model.safetensors"),
        load_file(tmp_path / "again" / "model.safetensors"),
    )
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "again/tokenizer.json").read_bytes()


def test_text_never_uses_the_zeroshot_split(corpus: Path) -> None:
    zeroshot = [json.loads(line) for line in (corpus / "zeroshot.jsonl").read_text().splitlines()]
    meta = json.loads((corpus / "corpus.json").read_text())
    pairs = [tuple(p) for p in meta["heldout_pairs"]]
    docs = set(corpus_documents(corpus) + generated_documents(200, 0, 0, pairs, 1.0))
    assert not docs & {c for row in zeroshot for c in row["captions"]}
    # held-out synonyms are known words, as they would be to a real LLM
    assert any("chime" in d or "hiss" in d or "drone" in d for d in docs)
    assert any(d.startswith("Question: ") and " Answer: " in d for d in docs)


def test_text_follows_training_instructions_only(corpus: Path) -> None:
    """The LLM sees instructions the way an instruction-tuned LLM has (training wordings of the
    trained tasks, with answers) but never a held-out wording or the held-out task."""
    from slit_lightning.instructions import TASKS

    docs = corpus_documents(corpus) + generated_documents(200, 0, 0, [], 1.0)
    lowered = [d.lower() for d in docs]

    def starts(wording: str) -> int:
        head = wording.split("{")[0].strip().lower()
        return sum(d.startswith(head) for d in lowered) if head else 0

    for task in ("detailed", "classify", "tag"):
        assert sum(starts(w) for w in TASKS[task][0]) > 0, task
    assert starts("Answer the question about the audio:") > 0
    for task, (_, held_out) in TASKS.items():
        assert all(starts(w) == 0 for w in held_out), task
    assert all(starts(w) == 0 for w in TASKS["choose"][0])
    tags = [d for d in docs if d.startswith("List all the sounds you hear. ")]
    assert tags and all("," in t or len(t.split()) <= 9 for t in tags)


def test_missing_corpus_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere.*slit data synth --out DIR"):
        bootstrap_llm(tmp_path / "nowhere", tmp_path / "out", **tiny_knobs())
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"train\.jsonl"):
        bootstrap_llm(tmp_path / "empty", tmp_path / "out", **tiny_knobs())
    assert not (tmp_path / "out").exists()


def test_interrupted_run_leaves_nothing_that_looks_complete(corpus: Path, tmp_path: Path) -> None:
    def stop(step: int, total: int) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        bootstrap_llm(corpus, tmp_path / "out", progress=stop, **tiny_knobs())
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="remove it"):
        bootstrap_llm(corpus, tmp_path / "half", **tiny_knobs())


def test_fact_sheets_precede_captions_of_their_own_scene() -> None:
    """Some captions follow their clip's fact sheet, so the LM learns to write what its context
    says (the skill stage 2's soft prompt needs); the caption names exactly the listed events."""
    from slit_lightning.builtin.corpus_text import fact_sheet
    from slit_lightning.builtin.events import named_event_types, named_events

    events = [
        {"type": "rumble", "onset": 0.0, "count": None, "role": "background"},
        {"type": "knocks", "onset": 0.4, "count": 2, "role": "foreground"},
        {"type": "hum", "onset": 1.5, "count": None, "role": "foreground"},
    ]
    assert fact_sheet(events) == "Sounds: two knocks, hum. Background: rumble."
    docs = generated_documents(200, 0, 0, [], 1.0)
    faced = [d for d in docs if d.startswith("Sounds: ")]
    assert 0.2 < len(faced) / len(docs) < 0.6
    for doc in faced:
        sheet = re.match(r"Sounds: [^.]*\.( Background: [^.]*\.)? ", doc)
        assert sheet is not None, doc
        caption = doc[sheet.end() :]
        assert set(named_events(caption)) <= set(named_events(sheet.group())), doc
        assert named_event_types(caption) and set(named_event_types(caption)) == {
            t for t, _ in named_events(sheet.group())
        }, doc


def test_context_reading_scores_what_follows_the_fact_sheet() -> None:
    """A stand-in LM that writes its context again scores 1.0: the scoring reads only the new,
    left-padded tokens."""
    from slit_lightning.builtin.corpus_text import fact_sheet
    from slit_lightning.builtin.llm import context_reading

    class Echo:
        def eval(self) -> None:
            pass

        def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: object):
            assert (attention_mask[:, -1] == 1).all()  # left padding: every prompt ends last
            return torch.cat([input_ids, input_ids], dim=1)

    class Tokenizer:
        padding_side, eos_token_id, pad_token_id = "right", 1, 0

        def __call__(self, texts, padding, return_tensors):
            assert self.padding_side == "left"
            width = max(len(t) for t in texts)
            ids = [[0] * (width - len(t)) + [ord(c) for c in t] for t in texts]
            mask = [[0] * (width - len(t)) + [1] * len(t) for t in texts]
            return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}

        def batch_decode(self, rows, skip_special_tokens):
            return ["".join(chr(i) for i in row.tolist() if i) for row in rows]

    clips = [
        [{"type": "bell", "onset": 0.1, "count": None, "role": "foreground"}],
        [
            {"type": "beeps", "onset": 0.2, "count": 3, "role": "foreground"},
            {"type": "white noise", "onset": 2.0, "count": None, "role": "foreground"},
        ],
    ]
    tokenizer = Tokenizer()
    scores = context_reading(Echo(), tokenizer, clips)
    assert scores["all_right"] == 1.0 and tokenizer.padding_side == "right"
    assert fact_sheet(clips[1]) == "Sounds: three beeps, white noise."
