"""Frozen audio encoders: every supported transformers family, the small encoder and its bootstrap.

Each family is built at random from a tiny config, saved with ``save_pretrained`` (model + feature
extractor) and loaded back by path through ``HFAudioEncoder.from_pretrained``: nothing downloads.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from slit_lightning.builtin import encoder_bootstrap
from slit_lightning.builtin.encoder_bootstrap import bootstrap_encoder
from slit_lightning.model.encoders import (
    AudioEncoder,
    EncoderConfigError,
    HFAudioEncoder,
    _unfold_clap,
)
from slit_lightning.model.small_encoder import SmallAudioConfig, SmallAudioModel

RATE = 16000
LONG, SHORT = RATE, 9000  # two clips of 1 s and 0.5625 s


def _whisper() -> tuple[Any, Any, int]:
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

    config = WhisperConfig(
        d_model=32,
        encoder_layers=2,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=100,  # 2 s window: 200 mel frames -> 100 frames
        max_target_positions=16,
        vocab_size=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    extractor = WhisperFeatureExtractor(feature_size=80, chunk_length=2)
    # a full generation checkpoint: the loader must keep the encoder only
    return WhisperForConditionalGeneration(config), extractor, 32


def _ast() -> tuple[Any, Any, int]:
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    config = ASTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_mel_bins=32,
        max_length=150,  # 1.5 s of 10 ms fbank frames -> 14 time patches
    )
    return ASTModel(config), ASTFeatureExtractor(num_mel_bins=32, max_length=150), 32


def _clap() -> tuple[Any, Any, int]:
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

    audio = {
        "spec_size": 64,
        "num_mel_bins": 16,  # freq_ratio 4, as in laion CLAP (256 / 64)
        "patch_embeds_hidden_size": 16,
        "hidden_size": 32,  # 16 * 2 ** (stages - 1)
        "depths": [1, 1],
        "num_attention_heads": [2, 2],
        "window_size": 4,
    }
    text = {
        "vocab_size": 64,
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
    }
    config = ClapConfig(audio_config=audio, text_config=text, projection_dim=16)
    extractor = ClapFeatureExtractor(
        feature_size=16,
        sampling_rate=RATE,
        hop_length=160,
        fft_window_size=400,
        max_length_s=2,
        frequency_max=8000,
    )
    # a full CLAP checkpoint: the loader must keep the audio tower only
    return ClapModel(config), extractor, 32


def _speech(kind: str, attention_mask: bool) -> Callable[[], tuple[Any, Any, int]]:
    def build() -> tuple[Any, Any, int]:
        import transformers

        config_class, model_class = {
            "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2Model"),
            "hubert": ("HubertConfig", "HubertModel"),
            "data2vec-audio": ("Data2VecAudioConfig", "Data2VecAudioModel"),
            "wavlm": ("WavLMConfig", "WavLMModel"),
        }[kind]
        config = getattr(transformers, config_class)(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            conv_dim=(16, 16, 16),
            conv_kernel=(10, 8, 4),
            conv_stride=(5, 4, 4),  # 80 samples per frame: 200 frames/s
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=2,
            feat_extract_norm="layer" if attention_mask else "group",
            do_stable_layer_norm=attention_mask,
        )
        extractor = transformers.Wav2Vec2FeatureExtractor(
            sampling_rate=RATE, do_normalize=True, return_attention_mask=attention_mask
        )
        return getattr(transformers, model_class)(config), extractor, 32

    return build


FAMILIES = {
    "whisper": _whisper,
    "ast": _ast,
    "clap": _clap,
    "wav2vec2": _speech("wav2vec2", attention_mask=True),
    "wav2vec2-group-norm": _speech("wav2vec2", attention_mask=False),
    "hubert": _speech("hubert", attention_mask=False),
    "data2vec-audio": _speech("data2vec-audio", attention_mask=True),
    "wavlm": _speech("wavlm", attention_mask=True),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, int]]:
    """``saved(family)`` -> (folder with model + feature extractor, expected width), built once."""
    cache: dict[str, tuple[Path, int]] = {}

    def get(family: str) -> tuple[Path, int]:
        if family not in cache:
            torch.manual_seed(0)
            model, extractor, width = FAMILIES[family]()
            folder = tmp_path_factory.mktemp(family)
            model.save_pretrained(folder)
            extractor.save_pretrained(folder)
            cache[family] = folder, width
        return cache[family]

    return get


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two clips, 1 s and 0.56 s (right-padded with junk that must not matter)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(LONG) / RATE
    wave = 0.3 * torch.sin(2 * torch.pi * 440 * t).repeat(2, 1) + 0.05 * torch.randn(
        2, LONG, generator=g
    )
    mask = torch.ones(2, LONG, dtype=torch.bool)
    mask[1, SHORT:] = False
    wave[1, SHORT:] = 0.7  # padding content: a correct encoder never looks at it
    return wave, mask


# WavLM's own attention code mixes mask types, which torch warns about; not ours to fix.
_WAVLM_WARNING = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")


@pytest.mark.parametrize("layer", [-1, -2])
@pytest.mark.parametrize(
    "family", [pytest.param(f, marks=_WAVLM_WARNING) if f == "wavlm" else f for f in FAMILIES]
)
def test_hf_family_shapes_mask_and_batch_independence(saved, family: str, layer: int) -> None:
    folder, width = saved(family)
    encoder = HFAudioEncoder.from_pretrained(str(folder), layer=layer)
    wave, mask = _batch()
    frames, frame_mask = encoder(wave, mask)
    B, T, D = frames.shape
    assert (B, D) == (2, width) == (2, encoder.width)
    assert frame_mask.shape == (B, T) and frame_mask.dtype == torch.bool
    assert encoder.sample_rate == RATE
    assert frame_mask[0].all() or family in ("whisper", "ast", "clap")  # fixed windows pad
    # the short clip has fewer real frames, and they form a prefix
    n_long, n_short = (int(n) for n in frame_mask.sum(1))
    assert 1 <= n_short < n_long
    assert not frame_mask[1, n_short:].any() and frame_mask[1, :n_short].all()
    assert abs(n_short / n_long - SHORT / LONG) < 0.1
    # the short clip alone gives the same real frames as inside the padded batch
    alone, alone_mask = encoder(wave[1:, :SHORT], mask[1:, :SHORT])
    assert int(alone_mask.sum()) == n_short
    torch.testing.assert_close(alone[0, :n_short], frames[1, :n_short], atol=1e-4, rtol=1e-4)


def test_whisper_checkpoint_loads_encoder_only(saved) -> None:
    folder, _ = saved("whisper")
    encoder = HFAudioEncoder.from_pretrained(str(folder))
    assert type(encoder.model).__name__ == "WhisperEncoder"
    assert not any("decoder" in name for name, _ in encoder.named_parameters())
    # 2 s window at 50 frames/s; a 1 s clip covers the first half
    wave, mask = _batch()
    _, frame_mask = encoder(wave, mask)
    assert frame_mask.shape[1] == 100 and int(frame_mask[0].sum()) == 50


@pytest.mark.parametrize("family", ["whisper", "ast", "clap", "wav2vec2"])
def test_features_are_extracted_outside_bf16_autocast(saved, family: str) -> None:
    """Under bf16-mixed the stage runs the encoder inside autocast; the extractors' spectrograms
    (Whisper's through torch, then numpy) must still be float32, and the frames close to
    float32's."""
    folder, _ = saved(family)
    encoder = HFAudioEncoder.from_pretrained(str(folder))
    wave, mask = _batch()
    full, full_mask = encoder(wave, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, mixed_mask = encoder(wave, mask)
    assert torch.equal(mixed_mask, full_mask)
    torch.testing.assert_close(mixed.float(), full, atol=0.1, rtol=0.1)


def test_from_model_unwraps_full_models_and_needs_the_extractor() -> None:
    torch.manual_seed(0)
    model, extractor, width = _whisper()
    encoder = HFAudioEncoder.from_model(model, extractor)
    assert type(encoder.model).__name__ == "WhisperEncoder" and encoder.width == width
    speech, _, _ = _speech("hubert", attention_mask=False)()
    with pytest.raises(EncoderConfigError, match="needs its feature extractor"):
        HFAudioEncoder.from_model(speech)


def test_low_precision_weights_give_float32_features(saved) -> None:
    folder, _ = saved("wav2vec2")
    encoder = HFAudioEncoder.from_pretrained(str(folder), dtype=torch.bfloat16)
    assert encoder.dtype == torch.bfloat16
    frames, frame_mask = encoder(*_batch())
    assert frames.dtype == torch.float32 and torch.isfinite(frames).all()
    assert frame_mask.sum(1).tolist() == [199, 112]  # conv lengths: (S - 10) // 5 + 1, ...


def test_clap_checkpoint_loads_audio_tower_only(saved) -> None:
    folder, _ = saved("clap")
    encoder = HFAudioEncoder.from_pretrained(str(folder))
    assert type(encoder.model).__name__ == "ClapAudioModel"
    assert not any("text" in name for name, _ in encoder.named_parameters())


def test_clap_unfolding_matches_the_models_own(saved) -> None:
    """Intermediate HTS-AT states are unfolded into time frames the way the model unfolds its last."""
    folder, _ = saved("clap")
    encoder = HFAudioEncoder.from_pretrained(str(folder))
    model, ratio = encoder.model, encoder.model.audio_encoder.freq_ratio
    wave = [0.1 * torch.randn(2 * RATE).numpy()]
    feats = encoder.feature_extractor(
        wave, sampling_rate=RATE, truncation="rand_trunc", return_tensors="pt"
    )
    with torch.no_grad():
        out = model(input_features=feats.input_features, output_hidden_states=True)
    image = out.hidden_states[-1]  # (B, C, ratio * F, W): the last stage before the final norm
    normed = model.audio_encoder.norm(image.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    ours = _unfold_clap(normed, ratio, folded=True)
    torch.testing.assert_close(ours, _unfold_clap(out.last_hidden_state, ratio, folded=False))
    torch.testing.assert_close(ours.mean(1), out.pooler_output)  # the model's own pooling


def test_clip_longer_than_window_is_cut_with_warning(saved) -> None:
    folder, _ = saved("whisper")  # 2 s window
    encoder = HFAudioEncoder.from_pretrained(str(folder))
    wave = 0.1 * torch.randn(1, 3 * RATE)
    with pytest.warns(UserWarning, match="at most 2 s"):
        frames, frame_mask = encoder(wave, torch.ones_like(wave, dtype=torch.bool))
    assert frame_mask.all() and frames.shape[1] == 100


def test_tiny_clip_still_gives_one_frame(saved) -> None:
    folder, _ = saved("wav2vec2")
    encoder = HFAudioEncoder.from_pretrained(str(folder))
    wave, mask = torch.randn(2, 200), torch.ones(2, 200, dtype=torch.bool)
    mask[1, 50:] = False  # shorter than the conv receptive field (10 + 7*5 + 3*20 = 105 samples)
    frames, frame_mask = encoder(wave, mask)
    assert frame_mask[:, 0].all() and torch.isfinite(frames).all()
    assert frame_mask.sum(1).tolist() == [2, 1]
    # what lies past the 50 real samples does not matter: it is replaced by zeros
    wave[1, 50:] = 0.0
    again, _ = encoder(wave, mask)
    torch.testing.assert_close(again[1, :1], frames[1, :1])


# -- frozen -------------------------------------------------------------------------------------


class _Parent(nn.Module):
    """A stand-in for a stage module: a frozen encoder plus something trainable."""

    def __init__(self, encoder: AudioEncoder) -> None:
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(encoder.width, 3)


def _dropout_heavy_wav2vec2(folder: Path) -> Path:
    import transformers

    model, extractor, _ = _speech("wav2vec2", attention_mask=True)()
    model.config.hidden_dropout = model.config.attention_dropout = 0.5
    model = transformers.Wav2Vec2Model(model.config)
    model.save_pretrained(folder)
    extractor.save_pretrained(folder)
    return folder


def test_frozen_encoder_stays_frozen_under_a_training_parent(tmp_path: Path) -> None:
    encoder = HFAudioEncoder.from_pretrained(str(_dropout_heavy_wav2vec2(tmp_path)))
    parent = _Parent(encoder)
    parent.train()
    assert parent.training and parent.head.training
    assert not any(m.training for m in encoder.modules())
    assert not any(p.requires_grad for p in encoder.parameters())
    trainable = sum(p.numel() for p in parent.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in parent.head.parameters())
    wave, mask = _batch()
    first, _ = encoder(wave, mask)
    second, _ = encoder(wave, mask)
    torch.testing.assert_close(first, second, atol=0, rtol=0)  # dropout 0.5 would differ
    assert first.grad_fn is None and not first.requires_grad
    # the head still trains on top of it
    parent.head(first).sum().backward()
    assert parent.head.weight.grad is not None


def test_unfrozen_encoder_trains(tmp_path: Path) -> None:
    encoder = HFAudioEncoder.from_pretrained(str(_dropout_heavy_wav2vec2(tmp_path)), frozen=False)
    encoder.train()
    assert encoder.training and all(p.requires_grad for p in encoder.parameters())
    frames, _ = encoder(*_batch())
    assert frames.grad_fn is not None


# -- errors -------------------------------------------------------------------------------------


def test_unsupported_model_type_is_named_with_the_supported_ones(tmp_path: Path) -> None:
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(
        EncoderConfigError, match="unsupported audio encoder model_type 'bert'"
    ) as err:
        HFAudioEncoder.from_pretrained(str(tmp_path))
    for model_type in ("whisper", "audio-spectrogram-transformer", "clap", "hubert", "wav2vec2"):
        assert model_type in str(err.value)


def test_missing_folder_and_bad_layer_are_clear(saved, tmp_path: Path) -> None:
    with pytest.raises(EncoderConfigError, match="cannot read the config"):
        HFAudioEncoder.from_pretrained(str(tmp_path / "nowhere"))
    folder, _ = saved("ast")
    with pytest.raises(EncoderConfigError, match="layer=7 is out of range"):
        HFAudioEncoder.from_pretrained(str(folder), layer=7)


def test_checkpoint_missing_weights_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model, extractor, _ = _speech("wav2vec2", attention_mask=True)()
    model.save_pretrained(tmp_path)
    extractor.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if "encoder.layers.1." not in k},
        tmp_path / "model.safetensors",
        metadata={"format": "pt"},
    )
    with pytest.raises(EncoderConfigError, match="lacks"):
        HFAudioEncoder.from_pretrained(str(tmp_path))


def test_bad_masks_are_refused(saved) -> None:
    folder, _ = saved("wav2vec2")
    encoder = HFAudioEncoder.from_pretrained(str(folder))
    wave, mask = _batch()
    holes = mask.clone()
    holes[0, 100:200] = False
    with pytest.raises(ValueError, match="prefix"):
        encoder(wave, holes)
    with pytest.raises(ValueError, match="bool"):
        encoder(wave, mask.float())
    with pytest.raises(ValueError, match="all-padding"):
        encoder(wave, torch.zeros_like(mask))


def test_identity_names_weights_layer_and_rate(saved, tmp_path: Path) -> None:
    folder, _ = saved("hubert")
    a = HFAudioEncoder.from_pretrained(str(folder))
    b = HFAudioEncoder.from_pretrained(str(folder))
    assert a.identity == b.identity and a.identity.startswith("hubert:")
    assert "16000Hz" in a.identity
    assert HFAudioEncoder.from_pretrained(str(folder), layer=-2).identity != a.identity
    other, extractor, _ = _speech("hubert", attention_mask=False)()  # new random weights
    other.save_pretrained(tmp_path)
    extractor.save_pretrained(tmp_path)
    assert HFAudioEncoder.from_pretrained(str(tmp_path)).identity != a.identity


# -- the small encoder and its bootstrap --------------------------------------------------------

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "n_mels": 16,
}


def test_small_encoder_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SmallAudioModel(SmallAudioConfig(**TINY)).eval()
    model.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    wave, mask = _batch()
    with torch.no_grad():
        expected, expected_mask = model(wave, mask)
    encoder = HFAudioEncoder.from_pretrained(str(tmp_path))
    frames, frame_mask = encoder(wave, mask)
    torch.testing.assert_close(frames, expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(frame_mask, expected_mask)
    assert frames.shape[1] == 25 and encoder.width == 32  # 25 frames per second
    assert int(frame_mask[1].sum()) == 14


@pytest.mark.parametrize("delta_scale", [0.0, 4.0])
def test_small_encoder_frames_of_a_clip_do_not_depend_on_its_batch(delta_scale: float) -> None:
    torch.manual_seed(0)
    model = SmallAudioModel(SmallAudioConfig(**TINY, delta_scale=delta_scale)).eval()
    assert model.convs[0].in_channels == (32 if delta_scale else 16)  # deltas: 16 more inputs
    wave, mask = _batch()
    with torch.no_grad():
        frames, frame_mask = model(wave, mask)
        alone, _ = model(wave[1:, :SHORT], mask[1:, :SHORT])
    n = int(frame_mask[1].sum())
    torch.testing.assert_close(alone[0], frames[1, :n], atol=1e-5, rtol=1e-5)


def test_small_encoder_deltas_answer_amplitude_modulation() -> None:
    """With deltas the first layer's input moves with a tremolo; a steady tone leaves them ~0."""
    model = SmallAudioModel(SmallAudioConfig(**TINY, delta_scale=4.0)).eval()
    t = torch.arange(LONG) / RATE
    steady = 0.3 * torch.sin(2 * torch.pi * 440 * t)
    tremolo = steady * (1 - 0.45 * (1 + torch.sin(2 * torch.pi * 8 * t)))
    mel = {name: model.mel(w[None]) for name, w in (("steady", steady), ("tremolo", tremolo))}
    frames = torch.full((1,), mel["steady"].shape[-1])
    from slit_lightning.model.small_encoder import _deltas

    band = int(mel["steady"][0].mean(-1).argmax())  # the tone's own mel band
    swing = {k: float(_deltas(m, frames)[0, band].abs().mean()) for k, m in mel.items()}
    assert swing["tremolo"] > 10 * swing["steady"]


def test_small_encoder_refuses_a_negative_delta_scale() -> None:
    with pytest.raises(ValueError, match="delta_scale"):
        SmallAudioConfig(delta_scale=-1.0)


def test_small_encoder_from_model_in_memory() -> None:
    encoder = HFAudioEncoder.from_model(SmallAudioModel(SmallAudioConfig(**TINY)), layer=-2)
    frames, frame_mask = encoder(*_batch())
    assert frames.shape == (2, 25, 32) and frame_mask.sum(1).tolist() == [25, 14]
    assert sum(p.requires_grad for p in encoder.parameters()) == 0


def test_bootstrap_writes_a_loadable_encoder_once(
    tiny_corpus: Path, tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "encoder"
    ticks: list[tuple[int, int]] = []
    metrics = bootstrap_encoder(
        tiny_corpus,
        out,
        epochs=1,
        seed=3,
        progress=lambda d, t: ticks.append((d, t)),
        extra_scenes=2,
        count_scenes=4,
        count_steps=3,
    )
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "bootstrap.json"}
    assert not list(tmp_path.glob(".encoder*"))  # no temp folder left behind
    saved = json.loads((out / "bootstrap.json").read_text())
    assert saved == metrics and metrics["seed"] == 3 and metrics["epochs"] == 1
    assert 0.0 <= metrics["val_map"] <= 1.0 and 0.0 <= metrics["val_f1"] <= 1.0
    assert len(metrics["labels"]) > 1 and ticks and ticks[-1][0] == ticks[-1][1]

    # a second call finds the saved encoder and trains nothing
    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("trained again")

    monkeypatch.setattr(encoder_bootstrap, "_train_tagger", no_training)
    assert bootstrap_encoder(tiny_corpus, out, epochs=1, seed=3) == metrics
    encoder = HFAudioEncoder.from_pretrained(str(out))
    assert encoder.width == 256 and encoder.sample_rate == RATE and encoder.frozen
    frames, frame_mask = encoder(*_batch())
    assert frames.shape[:2] == frame_mask.shape and torch.isfinite(frames).all()


def test_bootstrap_is_seeded(tiny_corpus: Path, tmp_path: Path) -> None:
    config = SmallAudioConfig(**TINY)
    a = bootstrap_encoder(tiny_corpus, tmp_path / "a", epochs=1, seed=1, config=config)
    b = bootstrap_encoder(tiny_corpus, tmp_path / "b", epochs=1, seed=1, config=config)
    assert a["train_loss"] == b["train_loss"] and a["val_map"] == b["val_map"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()


def test_bootstrap_adds_generated_scenes_only_for_a_builtin_corpus(
    tiny_corpus: Path, tmp_path: Path
) -> None:
    config = SmallAudioConfig(**TINY)
    corpus_train = len((tiny_corpus / "train.jsonl").read_text().splitlines())
    metrics = bootstrap_encoder(tiny_corpus, tmp_path / "a", epochs=1, config=config, bf16=False)
    assert metrics["extra_scenes"] == 3 * corpus_train  # the default for a built-in corpus
    assert metrics["train_clips"] == 4 * corpus_train and metrics["bf16"] is False
    other = tmp_path / "other"  # the same clips without corpus.json: not the built-in generator's
    shutil.copytree(tiny_corpus, other, ignore=shutil.ignore_patterns("corpus.json"))
    with pytest.raises(ValueError, match="needs a built-in corpus"):
        bootstrap_encoder(other, tmp_path / "b", epochs=1, config=config, extra_scenes=5)
    metrics = bootstrap_encoder(other, tmp_path / "c", epochs=1, config=config)
    assert metrics["extra_scenes"] == 0 and metrics["train_clips"] == corpus_train


def test_bootstrap_refuses_a_half_folder(tiny_corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "encoder"
    out.mkdir()
    (out / "config.json").write_text("{}")  # looks started, holds no weights
    with pytest.raises(FileExistsError, match="no complete saved encoder"):
        bootstrap_encoder(tiny_corpus, out, epochs=1)


def test_bootstrap_needs_a_corpus(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        bootstrap_encoder(tmp_path, tmp_path / "encoder", epochs=1)


@pytest.mark.slow
def test_bootstrap_on_the_default_corpus_tags_well_above_chance(tmp_path: Path) -> None:
    from slit_lightning.builtin.corpus import synthesize_corpus

    synthesize_corpus(tmp_path / "corpus", seed=0)  # 1000 clips x 5 s
    metrics = bootstrap_encoder(tmp_path / "corpus", tmp_path / "encoder", seed=0)
    print(json.dumps({k: v for k, v in metrics.items() if k != "labels"}))
    # 0.98 measured with the built-in sizes (deltas), 2100 generated scenes and 2.5-s windows
    # (0.92 on whole clips without deltas, 0.78 before the scenes); the count readout then
    # counted 0.93 of the 44 counted val events right (chance about 0.2)
    assert metrics["val_map"] > 0.9 and metrics["extra_scenes"] == 2100
    assert metrics["crop_seconds"] == 2.5
    assert metrics["count_train_clips"] == 4200 and metrics["count_event_accuracy"] > 0.6


# -- Whisper on the clip's own length ---------------------------------------------------------


def _whisper_pair(saved, layer: int = -1) -> tuple[HFAudioEncoder, HFAudioEncoder]:
    """The tiny Whisper (2 s window) padded (default) and on each clip's own length."""
    folder, _ = saved("whisper")
    padded = HFAudioEncoder.from_pretrained(str(folder), layer=layer)
    own = HFAudioEncoder.from_pretrained(str(folder), layer=layer, window="clip")
    return padded, own


def test_whisper_default_window_is_transformers_own_forward(saved) -> None:
    """The default still pads to the window and runs the model's own forward, frames unchanged."""
    padded, _ = _whisper_pair(saved)
    assert padded.window == "full" and ":window" not in padded.identity
    wave, mask = _batch()
    frames, frame_mask = padded(wave, mask)
    arrays = [wave[0].numpy(), wave[1, :SHORT].numpy()]
    feats = padded.feature_extractor(
        arrays, sampling_rate=RATE, padding="max_length", return_tensors="pt"
    )
    with torch.no_grad():
        expected = padded.model(input_features=feats.input_features).last_hidden_state
    assert torch.equal(frames, expected)
    assert frame_mask.shape == (2, 100) and frame_mask.sum(1).tolist() == [50, 29]


@pytest.mark.parametrize("layer", [-1, -2, -3])
def test_whisper_clip_window_on_a_window_long_clip_is_the_padded_run(saved, layer: int) -> None:
    """A clip filling the window needs no padding: the own-length path (the encoder's submodules
    called in turn) gives what transformers' forward gives, at every hidden state."""
    padded, own = _whisper_pair(saved, layer)
    torch.manual_seed(1)
    wave = 0.1 * torch.randn(1, 2 * RATE)
    mask = torch.ones_like(wave, dtype=torch.bool)
    full, full_mask = padded(wave, mask)
    ours, ours_mask = own(wave, mask)
    assert ours.shape == full.shape == (1, 100, 32) and ours_mask.all() and full_mask.all()
    torch.testing.assert_close(ours, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer", [-1, -2])
def test_whisper_clip_window_frames_cover_the_clip_and_ignore_batch_mates(
    saved, layer: int
) -> None:
    padded, own = _whisper_pair(saved, layer)
    wave, mask = _batch()
    frames, frame_mask = own(wave, mask)
    # one frame per 20 ms of the longest clip, no more; the short clip's frames a prefix
    assert frames.shape == (2, 50, 32) and frame_mask.sum(1).tolist() == [50, 29]
    assert not frames[1, 29:].any()
    # the short clip alone, and beside another clip of its own length, gives the same frames
    alone, alone_mask = own(wave[1:, :SHORT], mask[1:, :SHORT])
    assert alone.shape == (1, 29, 32) and alone_mask.all()
    torch.testing.assert_close(alone[0], frames[1, :29], atol=1e-5, rtol=1e-5)
    twins, _ = own(torch.cat([wave[1:, :SHORT], -wave[1:, :SHORT]]), mask[:, :SHORT])
    torch.testing.assert_close(twins[0], alone[0], atol=1e-5, rtol=1e-5)
    # close to the padded run's first frames, not equal (no silence after the clip to attend to)
    reference, _ = padded(wave, mask)
    similarity = nn.functional.cosine_similarity(frames[1, :29], reference[1, :29], dim=-1)
    assert float(similarity.mean()) > 0.9 and not torch.allclose(frames[1], reference[1, :50])


def test_whisper_window_is_part_of_the_identity_and_checked(saved) -> None:
    padded, own = _whisper_pair(saved)
    assert own.identity == padded.identity + ":window-clip"
    folder, _ = saved("whisper")
    with pytest.raises(EncoderConfigError, match="not one of 'full', 'clip'"):
        HFAudioEncoder.from_pretrained(str(folder), window="own")
    hubert, _ = saved("hubert")
    with pytest.raises(EncoderConfigError, match="window='clip' is for Whisper"):
        HFAudioEncoder.from_pretrained(str(hubert), window="clip")
    model, extractor, _ = _whisper()
    assert HFAudioEncoder.from_model(model, extractor, window="clip").window == "clip"


def test_stage_encoder_window_reaches_the_encoder_and_its_checkpoint(
    saved, tiny_bert: Path, tmp_path: Path
) -> None:
    """``encoder_window`` goes from the stage to the encoder, and a checkpoint loads with the
    window it was trained with; checkpoints from before the setting load with the full window."""
    from slit_lightning.model.export import export_model, load_exported
    from slit_lightning.model.load import read_training_checkpoint
    from slit_lightning.stages import Stage1
    from tests.conftest import _save_stage

    folder, _ = saved("whisper")
    common = {"bert": str(tiny_bert), "num_queries": 2, "embed_dim": 8}
    clip = Stage1(str(folder), encoder_window="clip", **common)
    assert clip.encoder.identity.endswith(":window-clip")
    loaded = read_training_checkpoint(_save_stage(clip, tmp_path / "clip.ckpt"))
    assert loaded.encoder.identity == clip.encoder.identity
    assert loaded.origin["encoder_window"] == "clip"
    export_model(loaded, tmp_path / "export", copy_frozen=False)
    assert load_exported(tmp_path / "export").encoder.identity == clip.encoder.identity
    full = Stage1(str(folder), **common)
    old = torch.load(_save_stage(full, tmp_path / "full.ckpt"), weights_only=False)
    del old["hyper_parameters"]["encoder_window"]
    torch.save(old, tmp_path / "old.ckpt")
    assert read_training_checkpoint(tmp_path / "old.ckpt").encoder.identity == full.encoder.identity


def test_cache_features_takes_the_window_from_the_stage_config(
    saved, tiny_corpus: Path, tmp_path: Path, capsys
) -> None:
    """``slit cache-features`` reads model.encoder_window as the stage would (or --encoder_window)
    and caches under the matching identity, apart from the full window's features."""
    from slit_lightning.cli.main import main

    folder, _ = saved("whisper")
    config = tmp_path / "stage.yaml"
    config.write_text(
        "model:\n  class_path: slit_lightning.stages.Stage1\n  init_args:\n"
        f"    encoder: {folder}\n    bert: unused\n    encoder_window: clip\n"
    )
    data = ["--data.root", str(tiny_corpus), "--data.num_workers", "0", "--data.max_seconds", "1"]
    cache = ["--data.feature_cache", str(tmp_path / "features"), "--splits", "[val]", "--quiet"]
    main(["cache-features", "--config", str(config), *data, *cache])
    assert ":window-clip in " in capsys.readouterr().out
    main(["cache-features", "--config", str(config), *data, *cache, "--encoder_window", "full"])
    assert ":window-clip" not in capsys.readouterr().out
    assert len(list((tmp_path / "features").glob("*/val.*.f16"))) == 2
