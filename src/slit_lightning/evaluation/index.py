"""Audio search: embed every audio file under a folder once, then rank the files for a text query.

``slit index build DIR --ckpt PATH`` writes one safetensors file (default
``DIR/slit_index.safetensors``): the tensor ``embeddings (M, N, E)`` (float16, each file's
normalised query embeddings) and, in its metadata, a JSON record of the files (path relative to
``DIR``, size, modification time), the model that embedded them (its identity, crop, and how to
load it again). Building again embeds only files that are new or whose size or modification
time changed, drops deleted ones, and starts over when the model is another one. Unreadable
files are counted by reason and left out (tried again next time). The file is replaced
atomically (temporary file + rename), so a crash never leaves half an index.

``slit index search INDEX "a dog barks far away" --top 10`` ranks the files by their best
query's cosine similarity to the text, with the model the index records (or ``--ckpt``).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from slit_lightning.atomic import write_file_atomic
from slit_lightning.data.audio import AUDIO_SUFFIXES, AudioError
from slit_lightning.errors import SLITError
from slit_lightning.model.slit import SLIT, scores

log = logging.getLogger(__name__)

FORMAT = "slit-lightning-index"
VERSION = 1
DEFAULT_NAME = "slit_index.safetensors"


class SearchIndexError(SLITError, ValueError):
    """An index that cannot be read or does not fit the model; the message says what to do."""


@dataclass
class Entry:
    """One indexed file: ``path`` relative to the indexed folder, as ``os.stat`` saw it."""

    path: str
    size: int
    mtime_ns: int


@dataclass
class Index:
    """An index in memory: files and their embeddings ``(M, N, E)``, plus the model record."""

    root: Path
    model: dict[str, Any]
    entries: list[Entry]
    embeddings: torch.Tensor

    def save(self, path: Path) -> None:
        """Write atomically: a temporary sibling, then one rename."""
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "root": str(self.root),
            "model": self.model,
            "files": [[e.path, e.size, e.mtime_ns] for e in self.entries],
        }
        write_file_atomic(
            path,
            lambda tmp: save_file(
                {"embeddings": self.embeddings.to(torch.float16).contiguous()},
                str(tmp),
                metadata={"slit_index": json.dumps(meta)},
            ),
        )

    @classmethod
    def load(cls, path: str | Path) -> Index:
        """Read an index file (clear errors for a missing, foreign or newer one)."""
        path = Path(path)
        if not path.is_file():
            raise SearchIndexError(f"no index at {path}; build one with `slit index build DIR`")
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = json.loads((handle.metadata() or {})["slit_index"])
                embeddings = handle.get_tensor("embeddings")
        except (SafetensorError, KeyError, OSError, json.JSONDecodeError) as err:
            raise SearchIndexError(f"{path} is not a slit index ({err})") from err
        if meta.get("format") != FORMAT or meta.get("version", 0) > VERSION:
            raise SearchIndexError(f"{path}: index version {meta.get('version')} is too new")
        entries = [Entry(p, s, m) for p, s, m in meta["files"]]
        return cls(Path(meta["root"]), meta["model"], entries, embeddings)


@dataclass
class BuildReport:
    """What :func:`build_index` did."""

    out: Path
    files: int = 0
    embedded: int = 0
    reused: int = 0
    dropped: int = 0
    rebuilt: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def line(self) -> str:
        reasons = Counter(reason for _, reason in self.skipped)
        skips = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items()))
        return (
            f"index {self.out}: {self.files} files ({self.embedded} embedded, {self.reused}"
            f" unchanged, {self.dropped} dropped, {len(self.skipped)} skipped"
            + (f": {skips}" if skips else "")
            + ")"
            + (f"; rebuilt: {self.rebuilt}" if self.rebuilt else "")
        )


def model_record(model: SLIT) -> dict[str, Any]:
    """What an index keeps of its model: identity and crop (they decide the embeddings) and
    how to load it again."""
    origin = model.origin

    def where(name: Any) -> Any:
        return str(Path(name).resolve()) if name and Path(name).exists() else name

    return {
        "identity": model.identity,
        "max_seconds": model.max_seconds,
        "load": {
            "path": where(origin.get("source")),
            "stage1": where(origin.get("stage1")),
            "encoder": where(origin.get("encoder")),
            "llm": where(origin.get("llm")),
        },
    }


def audio_files(root: Path, exclude: Sequence[Path] = ()) -> list[Path]:
    """Every file under ``root`` with an audio suffix (any case), sorted; hidden temporaries
    and ``exclude`` left out."""
    skip = {p.resolve() for p in exclude}
    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in AUDIO_SUFFIXES
        and p.is_file()
        and not p.name.startswith(".")
        and p.resolve() not in skip
    )


def build_index(
    model: SLIT,
    root: str | Path,
    out: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> BuildReport:
    """Index every audio file under ``root`` into ``out`` (default ``root/slit_index.safetensors``),
    embedding only what changed since the last build (see the module's docstring)."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise SearchIndexError(f"{root} is not a folder to index")
    out = Path(out) if out else root / DEFAULT_NAME
    record = model_record(model)
    report = BuildReport(out)
    old = _previous(out, record, report)
    files = audio_files(root, exclude=[out])
    known = {e.path: i for i, e in enumerate(old.entries)} if old else {}
    entries: dict[str, Entry] = {}
    vectors: dict[str, torch.Tensor] = {}
    todo: list[tuple[Path, Entry]] = []
    for path in files:
        stat = path.stat()
        entry = Entry(path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns)
        i = known.get(entry.path)
        if old is not None and i is not None and old.entries[i] == entry:
            entries[entry.path], vectors[entry.path] = entry, old.embeddings[i]
            report.reused += 1
        else:
            todo.append((path, entry))
    present = {p.relative_to(root).as_posix() for p in files}
    report.dropped = len(set(known) - present)
    _embed(model, todo, entries, vectors, report, progress)
    order = sorted(entries)
    heads = model.heads
    assert heads is not None  # model.identity above needs them
    empty = torch.zeros(0, heads.qformer.num_queries, heads.audio_proj.out_features)
    embeddings = torch.stack([vectors[p] for p in order]) if order else empty
    Index(root, record, [entries[p] for p in order], embeddings).save(out)
    report.files = len(order)
    return report


def _previous(out: Path, record: dict[str, Any], report: BuildReport) -> Index | None:
    """The index already at ``out`` when it was built by this model; None otherwise (the
    reason goes to ``report.rebuilt``)."""
    if not out.exists():
        return None
    try:
        old = Index.load(out)
    except SearchIndexError as err:
        report.rebuilt = f"the old index could not be read ({err})"
        return None
    if (old.model["identity"], old.model["max_seconds"]) != (
        record["identity"],
        record["max_seconds"],
    ):
        report.rebuilt = f"it was built with another model ({old.model['load'].get('path')})"
        return None
    return old


def _embed(
    model: SLIT,
    todo: list[tuple[Path, Entry]],
    entries: dict[str, Entry],
    vectors: dict[str, torch.Tensor],
    report: BuildReport,
    progress: Callable[[int, int], None] | None,
) -> None:
    """Embed ``todo`` in batches; unreadable files go to ``report.skipped``."""
    heads = model.heads
    assert heads is not None
    if progress is not None:
        progress(0, len(todo))
    for start in range(0, len(todo), model.batch_size):
        waves, kept = [], []
        for path, entry in todo[start : start + model.batch_size]:
            try:
                waves.append(model.load_clip(path))
                kept.append(entry)
            except AudioError as err:
                report.skipped.append((entry.path, err.reason))
                log.info("skipped %s", err)
        if waves:
            with torch.no_grad():
                embedded = heads.audio(*model.encode_waves(waves)).float().cpu()
            for entry, vector in zip(kept, embedded, strict=True):
                entries[entry.path], vectors[entry.path] = entry, vector
                report.embedded += 1
        if progress is not None:
            progress(min(start + model.batch_size, len(todo)), len(todo))


@dataclass
class Hit:
    """One search result."""

    rank: int
    score: float
    path: Path


def search(model: SLIT, index: Index, query: str, top: int = 10) -> list[Hit]:
    """The ``top`` files of ``index`` whose audio is closest to ``query`` (best first)."""
    if model.identity != index.model["identity"]:
        raise SearchIndexError(
            f"the index of {index.root} was built with model {index.model['load'].get('path')}"
            f" ({index.model['identity']}), not this one ({model.identity}): search with"
            " that model, or rebuild the index with this one (slit index build)"
        )
    if not index.entries:
        return []
    sim = scores(index.embeddings.float(), model.embed_text(query))[:, 0]
    best = sim.topk(min(top, len(index.entries)))
    return [
        Hit(rank + 1, float(value), index.root / index.entries[int(i)].path)
        for rank, (value, i) in enumerate(zip(best.values, best.indices, strict=True))
    ]
