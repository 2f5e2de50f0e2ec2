"""Audio-captioning metrics as the field reports them (Clotho, AudioCaps, DCASE task 6a).

BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE and SPIDEr against several references per clip, computed
by the COCO caption evaluation code (``pycocoevalcap``) that aac-metrics and the DCASE baselines
wrap: PTB tokenisation (lower case, punctuation removed), then ``Bleu(4)``, ``Meteor``, ``Rouge``,
``Cider`` (coco-caption's ``Cider`` is CIDEr-D) and ``Spice``; SPIDEr = (CIDEr-D + SPICE) / 2.
Nothing is reimplemented: for ordinary captions the numbers equal those of pycocoevalcap's
``COCOEvalCap``. All captions, predictions and references, go through one tokenizer run.

Requirements and what happens without them:

- ``java`` on PATH (the tokenizer and METEOR are Java programs). Without it nothing can be
  scored, so :func:`caption_metrics` raises a ``RuntimeError`` naming java and the fix.
- SPICE also needs the Stanford CoreNLP 3.6.0 jars, which pycocoevalcap downloads at first use.
  This module never triggers that download: when the jars are absent, ``spice`` and ``spider`` are
  reported in ``CaptionScores.unavailable`` with what is missing and how to get it.
- A Java scorer (METEOR, SPICE) that fails at run time is reported unavailable with the reason;
  the other numbers are still valid. No number is ever guessed or filled in.

Empty captions: a prediction that is empty or tokenises to nothing (``""``, ``"..."``) is scored
as it is, an empty hypothesis. pycocoevalcap handles that without error here: it gets 0 from
BLEU, METEOR, ROUGE-L and CIDEr-D for that clip (the corpus BLEU/METEOR scores also count its
missing words against the brevity penalty and recall). A reference that is empty or tokenises to
nothing is a data error and raises ``ValueError`` (pycocoevalcap's ROUGE-L would score an empty
prediction 1.0 against it).

Line breaks: the tokenizer reads one caption per line and METEOR talks over a line protocol, so
every run of whitespace (``\\n``, ``\\r``, ``\\u2028``, tabs, ...) becomes one space first; the
tokenizer would split on the same whitespace, so the tokens are unchanged.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice import get_stanford_models as _stanford
from pycocoevalcap.spice.spice import Spice
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from slit_lightning.errors import SLITError

METRICS = (
    "bleu_1",
    "bleu_2",
    "bleu_3",
    "bleu_4",
    "meteor",
    "rouge_l",
    "cider_d",
    "spice",
    "spider",
)
# pycocoevalcap's Spice() downloads these into spice/lib/ when the first is missing
SPICE_LIB = Path(_stanford.SPICEDIR).resolve() / _stanford.SPICELIB
SPICE_JARS = (f"{_stanford.JAR}.jar", f"{_stanford.JAR}-models.jar")
_CORENLP_URL = f"https://nlp.stanford.edu/software/{_stanford.CORENLP}.zip"

Tokenized = dict[int, list[str]]


@dataclass
class CaptionScores:
    """Corpus-level captioning scores.

    ``values`` maps a metric in :data:`METRICS` to its score; ``unavailable`` maps a metric that
    could not be computed to the reason. A requested metric is in exactly one of the two.
    """

    values: dict[str, float] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)

    def table(self) -> str:
        """A printable two-column table in :data:`METRICS` order."""
        rows = []
        for name in METRICS:
            if name in self.values:
                rows.append(f"{name:<8} {self.values[name]:.4f}")
            elif name in self.unavailable:
                rows.append(f"{name:<8} unavailable ({self.unavailable[name]})")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()


def caption_metrics(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    metrics: Sequence[str] | None = None,
) -> CaptionScores:
    """Score one predicted caption per clip against that clip's reference captions.

    Args:
        predictions: ``N`` generated captions, one per clip.
        references: ``N`` lists of reference captions (at least one each; Clotho has five).
        metrics: names from :data:`METRICS`; ``None`` means all of them.

    Returns:
        :class:`CaptionScores`; CIDEr-D's document frequencies come from these references, so it
        depends on the whole evaluated set (and is 0 for a single clip).

    Raises:
        ValueError: malformed input or an unknown metric name.
        RuntimeError: ``java`` is not on PATH, or the tokenizer's Java process failed.

    Example:
        >>> scores = caption_metrics(
        ...     ["A dog barks."],
        ...     [["A dog barks!", "A dog is barking loudly."]],
        ...     metrics=["bleu_1", "rouge_l"],
        ... )
        >>> print(scores.table())
        bleu_1   1.0000
        rouge_l  1.0000
    """
    wanted = _check_metrics(metrics)
    _check_inputs(predictions, references)
    require_java()
    gts, res = _tokenize(predictions, references)
    out = CaptionScores()
    if any(name.startswith("bleu_") for name in wanted):
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        out.values |= {f"bleu_{n + 1}": float(s) for n, s in enumerate(bleu)}
    if "meteor" in wanted:
        _run_meteor(gts, res, out)
    if "rouge_l" in wanted:
        out.values["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    if wanted & {"cider_d", "spider"}:
        out.values["cider_d"] = float(Cider().compute_score(gts, res)[0])
    if wanted & {"spice", "spider"}:
        _run_spice(gts, res, out)
    return CaptionScores(
        values={k: v for k, v in out.values.items() if k in wanted},
        unavailable={k: v for k, v in out.unavailable.items() if k in wanted},
    )


def spice_missing_reason() -> str | None:
    """Why SPICE cannot run here (missing CoreNLP jars), or ``None``; never downloads anything."""
    missing = [jar for jar in SPICE_JARS if not (SPICE_LIB / jar).is_file()]
    if not missing:
        return None
    return (
        f"SPICE needs Stanford CoreNLP 3.6.0, missing here: {', '.join(missing)} in {SPICE_LIB}; "
        "with internet, run once `python -c 'from pycocoevalcap.spice.get_stanford_models "
        "import get_stanford_models; get_stanford_models()'` (it fetches both from "
        f"{_CORENLP_URL}), or copy the two jars from that zip into {SPICE_LIB}"
    )


def _check_metrics(metrics: Sequence[str] | None) -> set[str]:
    if metrics is None:
        return set(METRICS)
    if isinstance(metrics, str):  # "bleu_4" would otherwise be read letter by letter
        metrics = [metrics]
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown caption metric(s) {unknown}; choose from {list(METRICS)}")
    return set(metrics)


def _check_inputs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if isinstance(predictions, str) or isinstance(references, str):
        raise ValueError("predictions and references must be sequences (one entry per clip)")
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(references)} reference lists; "
            "pass one prediction and one list of references per clip"
        )
    if not predictions:
        raise ValueError("no clips to score: predictions and references are empty")
    for i, pred in enumerate(predictions):
        if not isinstance(pred, str):
            raise ValueError(f"predictions[{i}] is {type(pred).__name__}, not a string")
    for i, refs in enumerate(references):
        if isinstance(refs, str):
            raise ValueError(
                f"references[{i}] is a string; pass a list of reference captions per clip, "
                f"e.g. [{refs!r}]"
            )
        if len(refs) == 0:
            raise ValueError(f"references[{i}] is empty; every clip needs at least one reference")
        for j, ref in enumerate(refs):
            if not isinstance(ref, str):
                raise ValueError(f"references[{i}][{j}] is {type(ref).__name__}, not a string")
            if not ref.strip():
                raise ValueError(f"references[{i}][{j}] is an empty caption; remove it or fix it")


class JavaNotFoundError(SLITError, RuntimeError):
    """No ``java`` on PATH: the COCO caption metrics cannot run."""


def require_java() -> None:
    """Raise :class:`JavaNotFoundError` (naming the fix) when ``java`` is not on PATH."""
    if shutil.which("java") is None:
        raise JavaNotFoundError(
            "`java` was not found on PATH: the COCO caption metrics (PTB tokenizer, METEOR, SPICE) "
            "are Java programs. Install a Java runtime (e.g. `apt-get install default-jre-headless`"
            "; SPICE needs Java 8 or 11) and make sure `java` is on PATH."
        )


def _one_line(text: str) -> str:
    # the tokenizer reads one caption per line and splits \r, \u2028, ... like \n (pycocoevalcap
    # only replaces \n), which would shift every later caption onto the wrong clip
    return " ".join(text.split())


def _tokenize(
    predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> tuple[Tokenized, Tokenized]:
    """PTB-tokenise everything in one Java run; returns ``(gts, res)`` keyed by clip index."""
    captions = {
        ("ref", i): [{"caption": _one_line(r)} for r in refs] for i, refs in enumerate(references)
    }
    captions |= {("pred", i): [{"caption": _one_line(p)}] for i, p in enumerate(predictions)}
    tokens = PTBTokenizer().tokenize(captions)
    # the wrapper zips Java's output lines with the captions and would silently drop a tail
    if any(len(tokens.get(key, [])) != len(caps) for key, caps in captions.items()):
        raise RuntimeError(
            "the PTB tokenizer (java, pycocoevalcap/tokenizer/stanford-corenlp-3.4.1.jar) returned "
            "fewer lines than captions; see its error output above"
        )
    gts = {i: tokens[("ref", i)] for i in range(len(references))}
    for i, refs in gts.items():
        for j, ref in enumerate(refs):
            if not ref:
                raise ValueError(
                    f"references[{i}][{j}] = {references[i][j]!r} has no words after PTB "
                    "tokenisation (punctuation is removed); remove it or fix it"
                )
    return gts, {i: tokens[("pred", i)] for i in range(len(predictions))}


def _run_meteor(gts: Tokenized, res: Tokenized, out: CaptionScores) -> None:
    meteor = Meteor()  # starts the JVM, which is slow: it loads the paraphrase table
    try:
        out.values["meteor"] = float(meteor.compute_score(gts, res)[0])
    except (ValueError, OSError) as err:
        # the wrapper raised while holding its lock; without a fresh one its __del__ (which stops
        # the JVM) would block forever
        meteor.lock = threading.Lock()
        out.unavailable["meteor"] = f"METEOR's Java process gave no score ({err})"


def _run_spice(gts: Tokenized, res: Tokenized, out: CaptionScores) -> None:
    reason = spice_missing_reason()
    if reason is None:
        reason = _spice_score(gts, res, out)
    if reason is not None:
        out.unavailable["spice"] = reason
        out.unavailable["spider"] = f"SPIDEr = (CIDEr-D + SPICE) / 2 needs SPICE: {reason}"
        return
    out.values["spider"] = (out.values["cider_d"] + out.values["spice"]) / 2


def _spice_score(gts: Tokenized, res: Tokenized, out: CaptionScores) -> str | None:
    """Run SPICE (jars present, so ``Spice()`` downloads nothing); returns a reason on failure."""
    try:
        score = float(Spice().compute_score(gts, res)[0])
    except subprocess.CalledProcessError as err:
        return (
            f"SPICE's Java process failed (exit code {err.returncode}, error output above); "
            "SPICE 1.0 is known to fail on Java newer than 11: put Java 8 or 11 first on PATH"
        )
    if math.isnan(score):
        return "SPICE returned no score for at least one clip (NaN)"
    out.values["spice"] = score
    return None
