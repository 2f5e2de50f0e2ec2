"""`slit index build|search` and `slit classify`, through the CLI on clips written here."""

import os
import re

import pytest
import torch

from slit_lightning import SLIT
from slit_lightning.cli.main import main
from slit_lightning.evaluation.index import DEFAULT_NAME, Index
from tests.conftest import write_tone


@pytest.fixture
def library(tmp_path):
    """Four clips (formats, rates, a sub-folder, an upper-case suffix), a broken one, a text file."""
    root = tmp_path / "library"
    (root / "sub").mkdir(parents=True)
    write_tone(root / "low.wav", 200, 0.8, 16000)
    write_tone(root / "sub" / "high.flac", 2000, 1.2, 22050, 2)
    write_tone(root / "mid.mp3", 700, 0.5, 44100)
    write_tone(root / "sub" / "loud.wav", 1200, 0.6, 8000).rename(root / "sub" / "LOUD.WAV")
    (root / "broken.ogg").write_bytes(b"not audio")
    (root / "notes.txt").write_text("not audio either")
    return root


def _summary(out: str) -> dict[str, int]:
    line = next(x for x in out.splitlines() if x.startswith("index "))
    return {
        k: int(n) for n, k in re.findall(r"(\d+) (files|embedded|unchanged|dropped|skipped)", line)
    }


def _search(index, query, capsys, *extra):
    main(["index", "search", str(index), query, *extra])
    rows = [line.split() for line in capsys.readouterr().out.strip().splitlines()]
    return [(int(r[0]), float(r[1]), r[2]) for r in rows]


def test_build_then_search_ranks_every_indexed_file(library, stage_checkpoints, capsys):
    ckpt = str(stage_checkpoints["stage1"])
    main(["index", "build", str(library), "--ckpt", ckpt, "--batch_size", "3", "--quiet"])
    captured = capsys.readouterr()
    assert _summary(captured.out) == {
        "files": 4, "embedded": 4, "unchanged": 0, "dropped": 0, "skipped": 1,
    }  # fmt: skip
    assert "1 undecodable" in captured.out and "broken.ogg: undecodable" in captured.err
    index_path = library / DEFAULT_NAME
    index = Index.load(index_path)
    assert [e.path for e in index.entries] == [
        "low.wav",
        "mid.mp3",
        "sub/LOUD.WAV",
        "sub/high.flac",
    ]
    hits = _search(index_path, "a high whistle", capsys, "--top", "10")
    assert [h[0] for h in hits] == [1, 2, 3, 4]
    assert sorted(h[2] for h in hits) == sorted(str(library / e.path) for e in index.entries)
    # the scores are the model's own similarities of those files to the query, best first
    model = SLIT.from_pretrained(ckpt, "cpu")
    direct = model.similarity([h[2] for h in hits], "a high whistle")[:, 0]
    torch.testing.assert_close(torch.tensor([h[1] for h in hits]), direct, atol=2e-3, rtol=0)
    assert [h[1] for h in hits] == sorted((h[1] for h in hits), reverse=True)
    assert len(_search(index_path, "a high whistle", capsys, "--top", "2")) == 2


def test_rebuilding_embeds_only_new_and_changed_files(library, stage_checkpoints, capsys):
    args = ["index", "build", str(library), "--ckpt", str(stage_checkpoints["stage1"]), "--quiet"]
    main(args)
    capsys.readouterr()
    main(args)
    assert _summary(capsys.readouterr().out)["embedded"] == 0
    first = Index.load(library / DEFAULT_NAME)
    low = library / "low.wav"
    write_tone(low, 3000, 0.8, 16000)  # new content, new mtime
    stat = low.stat()
    os.utime(low, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    (library / "mid.mp3").unlink()
    write_tone(library / "sub" / "new.flac", 400, 0.3, 16000)
    main(args)
    assert _summary(capsys.readouterr().out) == {
        "files": 4, "embedded": 2, "unchanged": 2, "dropped": 1, "skipped": 1,
    }  # fmt: skip
    second = Index.load(library / DEFAULT_NAME)
    assert [e.path for e in second.entries] == [
        "low.wav",
        "sub/LOUD.WAV",
        "sub/high.flac",
        "sub/new.flac",
    ]
    assert not torch.equal(second.embeddings[0], first.embeddings[0])  # low.wav re-embedded
    torch.testing.assert_close(second.embeddings[1:3], first.embeddings[2:4])  # kept as they were
    assert not list(library.glob(".*tmp*"))


def test_an_index_of_another_model_is_rebuilt_or_refused(library, stage_checkpoints, capsys):
    index = library / DEFAULT_NAME
    main(["index", "build", str(library), "--ckpt", str(stage_checkpoints["stage1"]), "--quiet"])
    capsys.readouterr()
    with pytest.raises(SystemExit, match="built with model .*stage1.ckpt.*rebuild the index"):
        main(
            [
                "index",
                "search",
                str(index),
                "tone",
                "--ckpt",
                str(stage_checkpoints["other_stage1"]),
            ]
        )
    other = [
        "index",
        "build",
        str(library),
        "--ckpt",
        str(stage_checkpoints["other_stage1"]),
        "--quiet",
    ]
    main(other)
    out = capsys.readouterr().out
    assert _summary(out)["embedded"] == 4 and "rebuilt: it was built with another model" in out
    assert len(_search(index, "tone", capsys)) == 4  # the index now records the other model
    with pytest.raises(SystemExit, match="needs stage 1's contrastive heads"):
        main(["index", "build", str(library), "--ckpt", str(stage_checkpoints["stage2"])])
    with pytest.raises(SystemExit, match="no index at"):
        main(["index", "search", str(library / "none.safetensors"), "tone"])
    (library / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(SystemExit, match="not a slit index"):
        main(["index", "search", str(library / "junk.safetensors"), "tone"])


def test_classify_command_prints_best_label_and_scores_per_file(library, stage_checkpoints, capsys):
    files = [library / "low.wav", library / "broken.ogg", library / "mid.mp3"]
    ckpt = str(stage_checkpoints["stage1"])
    with pytest.raises(SystemExit, match="1 of 3 files could not be read"):
        main(["classify", *map(str, files), "--labels", "dog, rain,siren", "--ckpt", ckpt])
    captured = capsys.readouterr()
    assert "broken.ogg\tskipped:" in captured.err
    rows = [line.split("\t") for line in captured.out.strip().splitlines()]
    assert [r[0] for r in rows] == [str(files[0]), str(files[2])]
    model = SLIT.from_pretrained(ckpt, "cpu")
    for (_, best, shown), expected in zip(
        rows, model.classify([files[0], files[2]], ["dog", "rain", "siren"]), strict=True
    ):
        pairs = shown.split("  ")
        assert best == expected.label == pairs[0].split()[0]
        scores = {p.split()[0]: float(p.split()[1]) for p in pairs}
        assert scores == pytest.approx(expected.scores, abs=1e-3)
    with pytest.raises(SystemExit, match="two or more distinct labels"):
        main(["classify", str(files[0]), "--labels", "dog", "--ckpt", ckpt])
    main(
        [
            "classify",
            str(files[0]),
            "--labels",
            "dog,rain",
            "--ckpt",
            str(stage_checkpoints["instruct"]),
        ]
    )
    _, best, _ = capsys.readouterr().out.strip().split("\t")  # generative: no heads
    assert best in ("dog", "rain")
