"""Captioning metrics against pycocoevalcap's own COCOEvalCap flow; needs `java` on PATH."""

import math
import subprocess

import pytest
from pycocoevalcap.spice import get_stanford_models

from slit_lightning.metrics import captioning
from slit_lightning.metrics.captioning import METRICS, caption_metrics, spice_missing_reason

SET_A_PRED = [
    "A dog is barking while cars pass by.",
    "Rain falls steadily on a metal roof",
    "Birds are chirping in the distance.",
    "a man speaks and then a door closes",
    "Water flows from a tap into a sink!",
]
SET_A_REFS = [
    [
        "A dog barks repeatedly as traffic passes nearby.",
        "Cars drive past while a dog is barking.",
        "A dog barking with vehicles passing in the background",
        "Several cars pass by and a dog barks loudly.",
        "A DOG BARKS, AND CARS GO BY.",
    ],
    [
        "Heavy rain is falling on a tin roof.",
        "Rain drops hit a metal roof steadily.",
        "Rain pours down onto a roof made of metal",
        "Steady rainfall on a corrugated metal roof.",
        "It is raining hard on the roof.",
    ],
    [
        "Birds chirp and sing in a forest.",
        "Many birds are chirping far away.",
        "Distant birds tweet while the wind blows softly.",
        "Bird song in the distance with some wind.",
        "Small birds chirping outdoors.",
    ],
    [
        "A man talks, then a door is shut.",
        "A man is speaking before a door slams.",
        "Someone speaks and a door closes afterwards.",
        "A male voice talks followed by a door closing",
        "A person talks and then shuts a door.",
    ],
    [
        "Water runs from a faucet into a sink.",
        "A tap is running and water splashes in a basin.",
        "Water pours out of a faucet.",
        "Someone fills a sink with running water.",
        "Tap water flowing into a metal sink",
    ],
]
# empty, punctuation-only, newline, double spaces, apostrophes, hyphens, fewer references
SET_B_PRED = [
    "",
    "A high-pitched engine  revs;\nthen it idles.",
    "...",
    "The crowd's cheering grows LOUDER and louder",
]
SET_B_REFS = [
    [
        "A bell rings three times.",
        "Church bells ringing in the distance",
        "A large bell is struck repeatedly.",
    ],
    [
        "An engine revs up and then idles.",
        "A car's engine is revving loudly.",
        "A high-pitched motor revs before it slows down.",
        "Someone revs a motorcycle engine, then lets it idle.",
        "Engine noise rising and falling.",
    ],
    [
        "Footsteps on a wooden floor.",
        "Someone walks across a creaky floor.",
        "A person is walking slowly indoors.",
        "Steps echo in a hallway.",
    ],
    [
        "A crowd cheers and applauds loudly.",
        "People are cheering at a stadium.",
        "The audience claps and shouts louder and louder.",
        "A large crowd's cheers grow in volume.",
        "Crowd noise with cheering and clapping.",
    ],
]

# Produced once by a throwaway script that follows pycocoevalcap 1.2's COCOEvalCap.evaluate
# (PTBTokenizer().tokenize on references and on predictions, then Bleu(4), Meteor(), Rouge() and
# Cider() .compute_score(gts, res)), printed with 10 significant digits.
GOLDEN_A = {
    "bleu_1": 0.9459459459,
    "bleu_2": 0.8064352657,
    "bleu_3": 0.6007206889,
    "bleu_4": 0.3150639923,
    "meteor": 0.3812928687,
    "rouge_l": 0.6072060683,
    "cider_d": 1.800454103,
}
GOLDEN_B = {
    "bleu_1": 0.479189311,
    "bleu_2": 0.3076111403,
    "bleu_3": 0.1640692753,
    "bleu_4": 2.240409491e-05,
    "meteor": 0.1829646802,
    "rouge_l": 0.2678571429,
    "cider_d": 0.571657544,
}


@pytest.fixture(autouse=True)
def no_download(monkeypatch):
    """Any attempt by pycocoevalcap to fetch the CoreNLP jars fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("pycocoevalcap tried to download Stanford CoreNLP")

    monkeypatch.setattr(get_stanford_models, "urlretrieve", refuse)


@pytest.fixture
def no_spice_jars(monkeypatch, tmp_path):
    monkeypatch.setattr(captioning, "SPICE_LIB", tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("preds", "refs", "golden"),
    [(SET_A_PRED, SET_A_REFS, GOLDEN_A), (SET_B_PRED, SET_B_REFS, GOLDEN_B)],
    ids=["plain", "empty-punctuation-newline"],
)
def test_matches_cocoevalcap(preds, refs, golden, no_spice_jars):
    scores = caption_metrics(preds, refs)
    assert {k: scores.values[k] for k in golden} == pytest.approx(golden, rel=1e-8, abs=1e-12)
    # set B holds an empty and a punctuation-only prediction: finite numbers, no hang
    assert all(math.isfinite(v) for v in scores.values.values())
    assert set(scores.values) | set(scores.unavailable) == set(METRICS)


def test_identical_caption_scores_one():
    refs = [["A dog barks."], ["Rain on a roof."], ["A car horn honks twice."]]
    scores = caption_metrics([r[0] for r in refs], refs, metrics=["bleu_1", "rouge_l"])
    assert scores.values["bleu_1"] == pytest.approx(1.0, abs=1e-6)
    assert scores.values["rouge_l"] == 1.0


def test_unrelated_caption_scores_zero():
    refs = [["A dog barks at a cat."], ["Rain falls on a roof."], ["A car horn honks twice."]]
    preds = ["violin music plays softly", "keyboard typing noises", "wind howls outside"]
    scores = caption_metrics(preds, refs, metrics=["bleu_4", "cider_d"])
    assert scores.values["bleu_4"] == pytest.approx(0.0, abs=1e-6)
    assert scores.values["cider_d"] == 0.0


def test_empty_predictions_score_zero():
    refs = [["A dog barks."], ["Rain on a roof."]]
    scores = caption_metrics(["", "?!"], refs, metrics=["bleu_1", "rouge_l", "cider_d"])
    assert scores.values == pytest.approx({"bleu_1": 0.0, "rouge_l": 0.0, "cider_d": 0.0}, abs=1e-9)


def test_line_breaks_inside_captions_keep_clips_aligned():
    refs = [["A dog barks loudly."], ["Rain falls on a metal roof."], ["A bell rings."]]
    # without METEOR to stay fast; set B of test_matches_cocoevalcap sends a "\n" through it
    names = ["bleu_1", "bleu_2", "rouge_l", "cider_d"]
    spaced = caption_metrics(["a dog barks", "rain on a roof", "a bell"], refs, names)
    broken = caption_metrics(["a dog\r\nbarks", "rain\u2028on a\rroof", "a\nbell"], refs, names)
    assert broken.values == pytest.approx(spaced.values)


def test_spice_and_spider_unavailable_without_corenlp(no_spice_jars):
    refs = [["A dog barks."], ["Rain on a roof."]]
    scores = caption_metrics(["a dog", "rain"], refs, metrics=["cider_d", "spice", "spider"])
    assert set(scores.values) == {"cider_d"}
    assert "stanford-corenlp-3.6.0-models.jar" in scores.unavailable["spice"]
    assert "get_stanford_models()" in scores.unavailable["spice"]
    assert "needs SPICE" in scores.unavailable["spider"]
    assert "spice    unavailable (SPICE needs Stanford CoreNLP" in scores.table()
    assert list(no_spice_jars.iterdir()) == []


def test_spice_missing_reason_reflects_installed_jars():
    present = all((captioning.SPICE_LIB / jar).is_file() for jar in captioning.SPICE_JARS)
    assert (spice_missing_reason() is None) == present
    assert captioning.SPICE_LIB.parts[-2:] == ("spice", "lib")


class FakeSpice:
    def compute_score(self, gts, res):
        return 0.25, []


class FailingSpice:
    def compute_score(self, gts, res):
        raise subprocess.CalledProcessError(1, ["java", "-jar", "spice-1.0.jar"])


@pytest.fixture
def spice_jars(no_spice_jars):
    for jar in captioning.SPICE_JARS:
        (no_spice_jars / jar).touch()


def test_spider_averages_cider_and_spice_when_jars_present(spice_jars, monkeypatch):
    monkeypatch.setattr(captioning, "Spice", FakeSpice)
    refs = [["A dog barks."], ["Rain on a roof."], ["A bell rings."]]
    scores = caption_metrics(["a dog barks", "rain", "a bell"], refs, metrics=["spider"])
    cider = caption_metrics(["a dog barks", "rain", "a bell"], refs, metrics=["cider_d"])
    assert scores.unavailable == {}
    assert scores.values == {"spider": pytest.approx((cider.values["cider_d"] + 0.25) / 2)}


def test_failing_spice_is_reported_not_raised(spice_jars, monkeypatch):
    monkeypatch.setattr(captioning, "Spice", FailingSpice)
    scores = caption_metrics(["a dog"], [["A dog barks."]], metrics=["spice", "spider"])
    assert scores.values == {}
    assert "Java 8 or 11" in scores.unavailable["spice"]
    assert "Java 8 or 11" in scores.unavailable["spider"]


class DeadMeteor:
    """What pycocoevalcap's Meteor raises when its JVM exits: float('') on an empty line."""

    def compute_score(self, gts, res):
        return float("")


def test_failing_meteor_is_reported_not_raised(monkeypatch):
    monkeypatch.setattr(captioning, "Meteor", DeadMeteor)
    scores = caption_metrics(["a dog"], [["A dog barks."]], metrics=["meteor", "rouge_l"])
    assert set(scores.values) == {"rouge_l"}
    assert "METEOR's Java process gave no score" in scores.unavailable["meteor"]


def test_missing_java_names_java(monkeypatch):
    monkeypatch.setattr(captioning.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="`java` was not found on PATH"):
        caption_metrics(["a dog"], [["A dog barks."]])


@pytest.mark.parametrize(
    ("preds", "refs", "match"),
    [
        (["a", "b"], [["a"]], "2 predictions but 1 reference lists"),
        ([], [], "no clips"),
        (["a"], [[]], r"references\[0\] is empty"),
        (["a"], ["a dog"], r"references\[0\] is a string"),
        ([3], [["a"]], r"predictions\[0\] is int"),
        (["a"], [["a", None]], r"references\[0\]\[1\] is NoneType"),
        (["a"], [["a", "  \n"]], r"references\[0\]\[1\] is an empty caption"),
        (["a"], [["a", "..."]], r"references\[0\]\[1\] = '...' has no words"),
        ("a dog", [["a"]], "must be sequences"),
    ],
)
def test_bad_input_raises_value_error(preds, refs, match):
    with pytest.raises(ValueError, match=match):
        caption_metrics(preds, refs, metrics=["bleu_1"])


def test_unknown_metric_raises_value_error():
    with pytest.raises(ValueError, match=r"unknown caption metric\(s\) \['cider'\]"):
        caption_metrics(["a"], [["a"]], metrics=["cider"])
