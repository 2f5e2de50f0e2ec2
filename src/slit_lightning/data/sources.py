"""Where audio-text data comes from: manifests, AudioCaps / Clotho / Clotho-AQA CSVs, labelled
sets (an ESC-50-style CSV or a folder per label) and WebDataset tar shards.

A source lists *units* (manifest rows or tar shards) and turns one unit into :class:`Clip` records
(audio not yet decoded). Problems with one record are yielded as :class:`Skip` so the pipeline can
count them; problems with the source as a whole (missing file, missing columns) raise
:class:`DataConfigError` at once, with the file and the fix in the message.

Manifest schema (JSONL, one object per line; CSV with the same column names):

- ``audio``: path of the audio file, relative to the manifest's folder (or ``audio_dir``);
- ``captions`` (list of strings) or ``caption`` (one string; in CSV also ``caption_1..caption_N``);
- optional ``id`` (the clip id; defaults to ``audio``), ``labels`` (list, or ``;``-separated in CSV),
  ``qa`` (list of ``{"question": ..., "answer": ...}``).

Instruction data is a manifest whose rows have ``instruction`` and ``answer`` instead of captions
(each row one QA pair; rows sharing an ``id`` are one clip). Rows may also carry only ``labels`` or
``qa``: a clip without captions is used by the stages that need none (instruction tuning,
evaluation) and skipped as ``empty caption`` by the others.

Clotho-AQA CSV: ``file_name, QuestionText, answer`` (one row per answer; a clip's rows become its
QA pairs). Labelled sets for zero-shot classification: a CSV with ``filename, category`` (ESC-50's
``meta/esc50.csv``; audio in ``audio_dir``, e.g. ESC-50's ``audio/``), or a folder whose
sub-folders are the labels (``dog/1.wav``, ``rain/7.flac``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import fsspec
import webdataset as wds

from slit_lightning.data.audio import AUDIO_SUFFIXES
from slit_lightning.errors import SLITError

log = logging.getLogger(__name__)

SourceFormat = Literal["auto", "manifest", "audiocaps", "clotho", "clotho_aqa", "labels", "shards"]
CAPTION_COLUMNS = {"caption", "captions", "caption_1"}
OTHER_TEXT_COLUMNS = {"labels", "qa", "instruction"}


class DataConfigError(SLITError, ValueError):
    """A data source that cannot be used at all: the message names the file and the fix."""


@dataclass(frozen=True)
class Clip:
    """One audio clip with its texts, before decoding. ``audio`` is a path/URL or the file's bytes."""

    clip_id: str
    audio: str | bytes
    name: str
    captions: tuple[str, ...]
    labels: tuple[str, ...] = ()
    qa: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> int:
        """Stable non-negative int64 hash of ``clip_id`` (tensors cannot carry strings across ranks)."""
        digest = hashlib.blake2b(self.clip_id.encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class Skip:
    """A record that was dropped: ``name`` identifies it, ``reason`` is a short category."""

    name: str
    reason: str
    detail: str = ""


@dataclass
class SourceSpec:
    """One data source as written in YAML.

    Args:
        path: a manifest (``.jsonl`` / ``.csv``), an AudioCaps or Clotho CSV, or tar shards
            (a path, a brace pattern like ``shards/train-{000..015}.tar``, or an fsspec URL).
        format: how to read ``path``; ``auto`` decides from the suffix and the CSV header.
        audio_dir: folder the audio paths are relative to (default: the manifest's folder).
        allow_outside_root: accept absolute paths and ``..`` that leave ``audio_dir``.
    """

    path: str
    format: SourceFormat = "auto"
    audio_dir: str | None = None
    allow_outside_root: bool = False


# what undecodable bytes become when a CSV is read with errors="surrogateescape"
_SURROGATE = re.compile("[\udc80-\udcff]")


def clean_captions(raw: Any, name: str) -> tuple[str, ...] | Skip:
    """Normalise caption(s) to a tuple of non-empty strings, or a :class:`Skip` saying why not."""
    items = raw if isinstance(raw, list | tuple) else [raw]
    out = []
    for item in items:
        if isinstance(item, bytes):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError:
                return Skip(name, "undecodable caption", "not valid UTF-8")
        if isinstance(item, str) and _SURROGATE.search(item):  # CSV bytes that are not UTF-8
            return Skip(name, "undecodable caption", "not valid UTF-8")
        if isinstance(item, str) and item.strip():
            out.append(" ".join(item.split()))
    if not out:
        return Skip(name, "empty caption")
    return tuple(out)


def _labels(raw: Any) -> tuple[str, ...]:
    if raw is None or raw == "":
        return ()
    if isinstance(raw, str):
        return tuple(x.strip() for x in raw.split(";") if x.strip())
    return tuple(str(x) for x in raw)


def _qa(raw: Any) -> tuple[tuple[str, str], ...]:
    if not raw:
        return ()
    if isinstance(raw, str):  # a CSV cell holds the list as JSON
        raw = json.loads(raw)
    return tuple((str(item["question"]), str(item["answer"])) for item in raw)


class Source:
    """Base class: ``num_units`` units, each expanded by ``iter_unit`` into clips and skips."""

    #: True when units are whole streams (shards); False when each unit is one record.
    streams = False

    def __init__(self, spec: SourceSpec) -> None:
        self.spec = spec

    @property
    def num_units(self) -> int:
        raise NotImplementedError

    def iter_unit(self, index: int) -> Iterator[Clip | Skip]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.path!r}, units={self.num_units})"


class _RowSource(Source):
    """A table held in memory: one unit per row."""

    def __init__(self, spec: SourceSpec, rows: list[Any]) -> None:
        super().__init__(spec)
        base = Path(spec.audio_dir) if spec.audio_dir else Path(spec.path).parent
        self.root = Path(os.path.abspath(base))
        self.rows = rows

    @property
    def num_units(self) -> int:
        return len(self.rows)

    def resolve(self, rel: str) -> str | Skip:
        """Audio path under the root; paths leaving it are refused unless explicitly allowed."""
        if not isinstance(rel, str) or not rel.strip():
            return Skip(str(rel), "missing audio path")
        path = Path(rel)
        # lexical check: `..` and absolute paths leave the root; symlinks inside it are the
        # data owner's choice and stay allowed
        full = Path(os.path.normpath(path if path.is_absolute() else self.root / path))
        if not self.spec.allow_outside_root and not full.is_relative_to(self.root):
            return Skip(rel, "path outside data root", f"set allow_outside_root to accept {rel}")
        return str(full)

    def iter_unit(self, index: int) -> Iterator[Clip | Skip]:
        try:
            yield self.to_clip(self.rows[index])
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            yield Skip(f"{self.spec.path} row {index + 1}", "malformed row", repr(err)[:200])

    def to_clip(self, row: Any) -> Clip | Skip:
        raise NotImplementedError


class ManifestSource(_RowSource):
    """JSONL or CSV manifest in the project's schema (see the module docstring).

    Rows that share an ``id`` are one clip with all their captions (manifests with one caption
    per row), so retrieval evaluation sees each clip once with every reference."""

    def __init__(self, spec: SourceSpec) -> None:
        path = Path(spec.path)
        rows = _read_jsonl(path) if path.suffix == ".jsonl" else _read_csv(path, ["audio"])
        first = next((r for r in rows if isinstance(r, dict)), None)
        if first is None:
            raise DataConfigError(f"{path}: manifest has no rows")
        if "audio" not in first or not ((CAPTION_COLUMNS | OTHER_TEXT_COLUMNS) & first.keys()):
            raise DataConfigError(
                f"{path}: manifest lacks columns: needs 'audio' and 'captions' (or 'caption'),"
                f" or 'instruction' + 'answer', 'labels' or 'qa'; found {sorted(first)}"
            )
        super().__init__(spec, _group_by_id(rows))

    def to_clip(self, rows: list[Any]) -> Clip | Skip:
        row = rows[0]
        if not isinstance(row, dict):
            return Skip(f"{self.spec.path}", "malformed row", f"not an object: {str(row)[:80]}")
        audio = self.resolve(row.get("audio"))
        if isinstance(audio, Skip):
            return audio
        raw: list[Any] = []
        qa: list[tuple[str, str]] = []
        for part in rows:
            texts = part.get("captions", part.get("caption"))
            if texts is None:
                texts = [v for k, v in sorted(part.items()) if k.startswith("caption_")]
            raw.extend(texts if isinstance(texts, list | tuple) else [texts])
            qa.extend(_qa(part.get("qa")))
            if part.get("instruction") is not None:
                qa.append((str(part["instruction"]).strip(), str(part.get("answer", "")).strip()))
        labels = tuple(dict.fromkeys(lab for part in rows for lab in _labels(part.get("labels"))))
        captions = clean_captions(raw, audio)
        if isinstance(captions, Skip):
            given = any(isinstance(x, str | bytes) and str(x).strip() for x in raw)
            if given or not (labels or qa):
                return captions
            captions = ()  # a labelled or QA-only clip
        clip_id = str(row.get("id") or audio)  # the full path: unique across sources
        return Clip(clip_id, audio, audio, captions, labels, tuple(qa))


def _group_by_id(rows: list[Any]) -> list[list[Any]]:
    """Rows in first-seen order, those with the same non-empty ``id`` merged into one group."""
    groups: list[list[Any]] = []
    where: dict[str, int] = {}
    for row in rows:
        key = row.get("id") if isinstance(row, dict) else None
        if isinstance(key, str | int) and key != "" and str(key) in where:
            groups[where[str(key)]].append(row)
            continue
        if isinstance(key, str | int) and key != "":
            where[str(key)] = len(groups)
        groups.append([row])
    return groups


class ClothoSource(_RowSource):
    """Clotho CSV: ``file_name, caption_1 .. caption_5``; audio in ``audio_dir``."""

    def __init__(self, spec: SourceSpec) -> None:
        super().__init__(spec, _read_csv(Path(spec.path), ["file_name", "caption_1"]))

    def to_clip(self, row: dict[str, str]) -> Clip | Skip:
        audio = self.resolve(row["file_name"])
        if isinstance(audio, Skip):
            return audio
        raw = [v for k, v in sorted(row.items()) if k.startswith("caption_")]
        captions = clean_captions(raw, audio)
        if isinstance(captions, Skip):
            return captions
        return Clip(row["file_name"], audio, audio, captions)


class ClothoAQASource(_RowSource):
    """Clotho-AQA CSV: ``file_name, QuestionText, answer`` (one row per annotator's answer); a
    clip's questions become its QA pairs, each with its annotators' majority answer (the first
    given on a tie)."""

    def __init__(self, spec: SourceSpec) -> None:
        rows = _read_csv(Path(spec.path), ["file_name", "QuestionText", "answer"])
        by_file: dict[str, list[dict[str, str]]] = {}
        for row in rows:
            by_file.setdefault(row["file_name"], []).append(row)
        super().__init__(spec, list(by_file.values()))

    def to_clip(self, rows: list[dict[str, str]]) -> Clip | Skip:
        audio = self.resolve(rows[0]["file_name"])
        if isinstance(audio, Skip):
            return audio
        answers: dict[str, list[str]] = {}
        for r in rows:
            question, answer = r["QuestionText"].strip(), r["answer"].strip()
            if question and answer:
                answers.setdefault(question, []).append(answer)
        qa = tuple((q, Counter(a).most_common(1)[0][0]) for q, a in answers.items())
        if not qa:
            return Skip(audio, "empty caption", "no question with an answer")
        return Clip(rows[0]["file_name"], audio, audio, (), (), qa)


class LabelSource(_RowSource):
    """A labelled set: an ESC-50-style CSV (``filename, category``; audio in ``audio_dir``) or a
    folder whose sub-folders are the labels."""

    def __init__(self, spec: SourceSpec) -> None:
        path = Path(spec.path)
        if path.is_dir():
            rows = [
                {"filename": str(f.relative_to(path)), "category": f.parent.name}
                for f in sorted(path.rglob("*"))
                if f.suffix.lower() in AUDIO_SUFFIXES and f.parent != path
            ]
            if not rows:
                raise DataConfigError(f"{path}: no audio files in sub-folders (one per label)")
            spec = SourceSpec(spec.path, spec.format, spec.audio_dir or str(path),
                              spec.allow_outside_root)  # fmt: skip
        else:
            rows = _read_csv(path, ["filename", "category"])
        super().__init__(spec, rows)

    def to_clip(self, row: dict[str, str]) -> Clip | Skip:
        audio = self.resolve(row["filename"])
        if isinstance(audio, Skip):
            return audio
        label = " ".join(row["category"].replace("_", " ").split())
        if not label:
            return Skip(audio, "empty caption", "no category")
        return Clip(row["filename"], audio, audio, (), (label,))


class AudioCapsSource(_RowSource):
    """AudioCaps CSV: ``audiocap_id, youtube_id, start_time, caption`` (one row per caption).

    Rows of one ``youtube_id`` become one clip with all its captions. The audio file is looked up in
    ``audio_dir`` under the names the common download scripts use: ``{youtube_id}``,
    ``Y{youtube_id}``, ``{youtube_id}_{start_time}`` or ``{audiocap_id}``, with any audio suffix.
    """

    def __init__(self, spec: SourceSpec) -> None:
        rows = _read_csv(Path(spec.path), ["audiocap_id", "youtube_id", "start_time", "caption"])
        grouped: dict[str, list[dict[str, str]]] = {}
        for row in rows:
            grouped.setdefault(row["youtube_id"], []).append(row)
        super().__init__(spec, list(grouped.values()))
        self.files = {
            p.stem: p.name for p in self.root.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES
        }

    def to_clip(self, rows: list[dict[str, str]]) -> Clip | Skip:
        first = rows[0]
        yt, start = first["youtube_id"], first["start_time"]
        names = [yt, f"Y{yt}", f"{yt}_{start}", f"{yt}_{start.split('.')[0]}"]
        names += [r["audiocap_id"] for r in rows]
        found = next((self.files[n] for n in names if n in self.files), None)
        if found is None:
            return Skip(f"{self.root}/{yt}", "missing file", "no audio file for this youtube_id")
        audio = self.resolve(found)
        if isinstance(audio, Skip):
            return audio
        captions = clean_captions([r["caption"] for r in rows], audio)
        if isinstance(captions, Skip):
            return captions
        return Clip(yt, audio, audio, captions)


class ShardSource(Source):
    """WebDataset-style tar shards: ``key.<audio suffix>`` + ``key.json`` (manifest fields) or
    ``key.txt`` (one caption). Local paths, brace patterns and fsspec URLs are read as streams.
    A truncated or corrupt shard ends with a logged warning; the epoch goes on."""

    streams = True

    def __init__(self, spec: SourceSpec) -> None:
        super().__init__(spec)
        self.urls = list(wds.shardlists.expand_urls(spec.path))
        missing = [u for u in self.urls if "://" not in u and not Path(u).is_file()]
        if missing:
            raise DataConfigError(f"{spec.path}: shard file(s) not found: {', '.join(missing[:3])}")
        self.truncated: list[str] = []

    @property
    def num_units(self) -> int:
        return len(self.urls)

    def iter_unit(self, index: int) -> Iterator[Clip | Skip]:
        url = self.urls[index]
        try:
            with fsspec.open(url, "rb") as stream:
                for group in _group_members(wds.tariterators.tar_file_iterator(stream)):
                    yield _shard_clip(group, url)
        except (tarfile.TarError, EOFError, OSError, ValueError) as err:
            log.warning("shard %s is truncated or corrupt, ending it here: %s", url, err)
            yield Skip(url, "truncated shard", str(err)[:200])


def _group_members(files: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Consecutive tar members sharing a key (``dir/key.ext``) form one sample."""
    current: dict[str, Any] = {}
    for item in files:
        folder, name = os.path.split(item["fname"])
        stem, _, ext = name.partition(".")  # `./0001.flac`, `v1.2/0001.flac` keep their folder
        key = os.path.join(folder, stem)
        if current and key != current["__key__"]:
            yield current
            current = {}
        current.setdefault("__key__", key)
        current[ext.lower()] = item["data"]
    if current:
        yield current


def _shard_clip(group: dict[str, Any], url: str) -> Clip | Skip:
    key = group["__key__"]
    name = f"{url}:{key}"
    audio = next((group[s[1:]] for s in AUDIO_SUFFIXES if s[1:] in group), None)
    if audio is None:
        return Skip(name, "no audio member", f"found {sorted(k for k in group if k != '__key__')}")
    meta: dict[str, Any] = {}
    if "json" in group:
        try:
            meta = json.loads(group["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return Skip(name, "malformed metadata", str(err)[:200])
        if not isinstance(meta, dict):
            return Skip(name, "malformed metadata", "json member is not an object")
    raw = meta.get("captions", meta.get("caption", group.get("txt")))
    captions = clean_captions(raw, name)
    if isinstance(captions, Skip):
        return captions
    try:
        clip_id = str(meta.get("id") or f"{url}:{key}")
        return Clip(
            clip_id, audio, name, captions, _labels(meta.get("labels")), _qa(meta.get("qa"))
        )
    except (KeyError, TypeError) as err:
        return Skip(name, "malformed metadata", repr(err)[:200])


def _read_jsonl(path: Path) -> list[Any]:
    """Rows of a JSONL file; undecodable lines are kept as strings so they count as skips later."""
    if not path.is_file():
        raise DataConfigError(f"{path}: manifest not found")
    rows: list[Any] = []
    with path.open("rb") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line.decode("utf-8")))
            except (UnicodeDecodeError, json.JSONDecodeError):
                rows.append(line[:80].decode("utf-8", "replace"))
    return rows


def _read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    if not path.is_file():
        raise DataConfigError(f"{path}: CSV file not found")
    # bytes that are not UTF-8 stay recognisable (surrogates), so their rows count as skips
    text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip() for c in reader.fieldnames or []]
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataConfigError(
            f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(columns) or 'none'}"
        )
    return [{k.strip(): (v or "") for k, v in row.items() if k} for row in reader]


def _csv_header(path: Path) -> list[str]:
    if not path.is_file():
        raise DataConfigError(f"{path}: CSV file not found")
    with path.open(encoding="utf-8-sig", errors="replace", newline="") as handle:
        return [c.strip() for c in next(csv.reader(handle), [])]


def detect_format(spec: SourceSpec) -> SourceFormat:
    """The format of ``spec.path`` from its suffix and, for CSV, its header."""
    if spec.format != "auto":
        return spec.format
    path = spec.path
    if ".tar" in Path(path.split("::")[0]).name or "{" in path:
        return "shards"
    if Path(path).is_dir():
        return "labels"
    if path.endswith(".csv"):
        header = _csv_header(Path(path))
        if {"audiocap_id", "youtube_id"} <= set(header):
            return "audiocaps"
        if "file_name" in header and "caption_1" in header:
            return "clotho"
        if {"file_name", "QuestionText", "answer"} <= set(header):
            return "clotho_aqa"
        if {"filename", "category"} <= set(header):
            return "labels"
    return "manifest"


def open_source(spec: SourceSpec | str) -> Source:
    """Build the reader for one source; raises :class:`DataConfigError` if it cannot be read."""
    if isinstance(spec, str):
        spec = SourceSpec(spec)
    match detect_format(spec):
        case "audiocaps":
            return AudioCapsSource(spec)
        case "clotho":
            return ClothoSource(spec)
        case "clotho_aqa":
            return ClothoAQASource(spec)
        case "labels":
            return LabelSource(spec)
        case "shards":
            return ShardSource(spec)
        case _:
            return ManifestSource(spec)
