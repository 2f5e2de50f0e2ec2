"""Proof that an imported Whisper folder works: the model, with its own decoder, transcribes a
sentence spoken by espeak-ng (word error rate under a bound), and our encoder wrapper loads it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

CHECK_SENTENCE = "Please call Stella and ask her to bring these things with her from the store."


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word edit distance over the reference's word count (case and punctuation ignored)."""
    ref, hyp = _words(reference), _words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / max(len(ref), 1)


def _resample(wave: Any, rate: int, target: int) -> torch.Tensor:
    import torchaudio

    return torchaudio.functional.resample(torch.as_tensor(wave, dtype=torch.float32), rate, target)


def transcribe(folder: Path, wave: Any, rate: int) -> tuple[str, list[str]]:
    """Transcribe a mono waveform with the folder's own model, tokenizer and generation config;
    returns the text and the prompt the decoder started from (its control tokens)."""
    from transformers import AutoFeatureExtractor, AutoTokenizer, WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    extractor = AutoFeatureExtractor.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    wave = _resample(wave, rate, extractor.sampling_rate)
    features = extractor(wave.numpy(), sampling_rate=extractor.sampling_rate, return_tensors="pt")
    prompts: list[torch.Tensor] = []

    def first_input(module: Any, args: tuple, kwargs: dict) -> None:
        if not prompts:  # generate returns only new tokens: see what the decoder was fed first
            prompts.append(kwargs.get("input_ids", args[0] if args else None))

    hook = model.model.decoder.register_forward_pre_hook(first_input, with_kwargs=True)
    try:
        with torch.inference_mode():
            tokens = model.generate(features.input_features)
    finally:
        hook.remove()
    text = tokenizer.decode(tokens[0].tolist(), skip_special_tokens=True).strip()
    return text, tokenizer.convert_ids_to_tokens(prompts[0][0].tolist())


def check_whisper(
    folder: Path, sentence: str = CHECK_SENTENCE, max_wer: float = 0.2
) -> dict[str, Any]:
    """Prove an imported folder works, end to end.

    The model, with its own decoder and default generation settings, transcribes ``sentence``
    spoken by eSpeak NG; and :class:`~slit_lightning.model.encoders.HFAudioEncoder` loads the
    folder and encodes the same clip to one frame per encoder position.

    Returns:
        ``sentence``, ``transcript``, ``wer``, ``prompt`` (the control tokens the output starts
        with), ``frames`` (the encoder output's shape), ``expected_frames`` and ``passed``
        (WER within ``max_wer`` and the frame shape as the config says).
    """
    from transformers import WhisperConfig

    from slit_lightning.model.encoders import HFAudioEncoder
    from slit_lightning.weights.espeak import speak

    folder = Path(folder)
    wave, rate = speak(sentence)
    transcript, prompt = transcribe(folder, wave, rate)
    wer = word_error_rate(sentence, transcript)
    encoder = HFAudioEncoder.from_pretrained(str(folder))
    clip = _resample(wave, rate, encoder.sample_rate)[None]
    frames, _ = encoder(clip, torch.ones_like(clip, dtype=torch.bool))
    config = WhisperConfig.from_pretrained(folder)
    expected = (1, config.max_source_positions, config.d_model)
    return {
        "sentence": sentence,
        "transcript": transcript,
        "wer": wer,
        "prompt": prompt,
        "frames": tuple(frames.shape),
        "expected_frames": expected,
        "passed": wer <= max_wer and tuple(frames.shape) == expected,
    }
