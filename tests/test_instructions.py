"""Instruction templates, the task mix and the scoring of answers."""

import random
from collections import Counter

import pytest

from slit_lightning.instructions import (
    TASKS,
    ClipText,
    InstructionMix,
    answer_matches,
    closest_label,
    evaluation_examples,
    make_example,
    named_labels,
)
from slit_lightning.metrics.answers import score_answers

CLIP = ClipText(
    captions=[
        "Two knocks, then a bell.",
        "A bell.",
        "Two loud knocks are followed by a bell strike.",
    ],
    labels=["bell", "knocks"],
    qa=[["How many knocks are there?", "two"], ["Does the clip contain a siren?", "no"]],
)
VOCAB = ["bell", "knocks", "siren", "hum", "white noise", "rising sweep"]


def test_training_and_held_out_wordings_never_overlap():
    for task, (train, held_out) in TASKS.items():
        assert train and held_out, task
        assert not set(train) & set(held_out), task


def test_each_task_builds_its_example_from_the_clip():
    rng = random.Random(0)
    short = make_example("caption", CLIP, "Describe the sound.", rng)
    assert short.answer == "A bell." and short.references == tuple(CLIP.captions)
    assert make_example("detailed", CLIP, "x", rng).answer == CLIP.captions[2]
    qa = make_example("qa", CLIP, "Question: {question} Answer:", rng, pair=CLIP.qa[0])
    assert qa.instruction == "Question: How many knocks are there? Answer:" and qa.answer == "two"
    assert make_example("classify", CLIP, "x", rng).answer in CLIP.labels
    assert make_example("tag", CLIP, "x", rng).answer == "bell, knocks"
    for _ in range(20):
        choose = make_example("choose", CLIP, TASKS["choose"][0][0], rng, VOCAB)
        assert choose.answer in CLIP.labels and choose.options.count(choose.answer) == 1
        others = set(choose.options) - {choose.answer}
        assert len(others) == 3 and not others & set(CLIP.labels)
        assert ", ".join(choose.options) in choose.instruction


def test_the_mix_follows_its_weights_and_never_draws_held_out_tasks():
    mix = InstructionMix({"caption": 1.0, "qa": 3.0}, held_out_tasks=("choose",))
    rng = random.Random(1)
    counts = Counter(mix.draw(CLIP, rng, VOCAB).task for _ in range(4000))
    assert set(counts) == {"caption", "qa"}
    assert counts["qa"] / 4000 == pytest.approx(0.75, abs=0.03)
    wordings = {mix.draw(CLIP, rng, VOCAB).instruction for _ in range(300)}
    held_out = {w.replace("{question}", q) for w in TASKS["qa"][1] for q, _ in CLIP.qa}
    assert not wordings & (held_out | set(TASKS["caption"][1]))


def test_a_clip_only_gets_tasks_it_has_data_for():
    qa_only = ClipText(captions=[], labels=[], qa=[["Describe the scene.", "a bell rings"]])
    mix = InstructionMix()
    rng = random.Random(0)
    assert {mix.draw(qa_only, rng).task for _ in range(50)} == {"qa"}
    with pytest.raises(ValueError, match="nothing"):
        mix.draw(ClipText([], [], []), rng)


@pytest.mark.parametrize(
    ("mix", "held_out", "message"),
    [({"qa": 1.0, "choose": 1.0}, ("choose",), "held out"), ({"sing": 1.0}, (), "unknown"),
     ({"qa": 0.0}, (), "one > 0")],
)  # fmt: skip
def test_bad_mixes_are_refused(mix, held_out, message):
    with pytest.raises(ValueError, match=message):
        InstructionMix(mix, held_out)


def test_evaluation_uses_held_out_wordings_and_every_qa_pair():
    rng = random.Random(0)
    examples = evaluation_examples("qa", CLIP, "held_out", rng)
    assert [e.answer for e in examples] == ["two", "no"]
    assert all(e.instruction.startswith(TASKS["qa"][1][0].split("{")[0]) for e in examples)
    assert evaluation_examples("tag", ClipText(["a"], [], []), "train", rng) == []


def test_answers_map_to_labels_and_match_as_words():
    assert closest_label("I hear a rising sweep, then a bell.", VOCAB) == "rising sweep"
    assert closest_label("a siren wails", VOCAB) == "siren"
    assert closest_label("sirens", VOCAB) == "siren"  # no exact mention: most similar
    assert named_labels("Bell, knocks and white noise.", VOCAB) == {"bell", "knocks", "white noise"}
    assert answer_matches("Three.", "three") and answer_matches("yes, it does", "yes")
    assert not answer_matches("threes", "three") and not answer_matches("no", "yes")


def test_scores_of_each_task():
    rng = random.Random(0)
    qa = evaluation_examples("qa", CLIP, "train", rng)
    assert score_answers("qa", qa, ["Two.", "yes"], VOCAB).values == {"accuracy": 0.5}
    tag = evaluation_examples("tag", CLIP, "train", rng)
    scores = score_answers("tag", tag, ["a bell and a siren"], VOCAB).values
    assert scores == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5})
    classify = evaluation_examples("classify", CLIP, "train", rng)
    assert score_answers("classify", classify, ["knocks"], VOCAB).values["accuracy"] == 1.0
    assert score_answers("classify", classify, ["a hum"], VOCAB).values["accuracy"] == 0.0
    choose = evaluation_examples("choose", CLIP, "train", rng, VOCAB)
    right = score_answers("choose", choose, [f"the {choose[0].answer}"], VOCAB)
    assert right.values["accuracy"] == 1.0
    with pytest.raises(ValueError, match="3 predictions"):
        score_answers("qa", qa, ["a", "b", "c"], VOCAB)
