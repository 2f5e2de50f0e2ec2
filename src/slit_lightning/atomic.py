"""Writing files and folders so that a crash never leaves one that looks complete.

Every writer puts its output under a hidden temporary sibling named ``.NAME.tmp-PID``, makes it
durable, then renames it over the target in one step: a reader sees the old content or the new,
never a partial file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TEMP_MARK = ".tmp-"


def temporary_sibling(path: Path) -> Path:
    """``.NAME.tmp-PID`` beside ``path``."""
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")


def write_file_atomic(path: str | Path, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp)`` on a temporary sibling, fsync it, rename it to ``path``, fsync the
    folder. On any failure the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_folder(path.parent)


def write_json_atomic(path: str | Path, value: Any) -> None:
    """``json.dump`` through :func:`write_file_atomic`."""
    write_file_atomic(path, lambda tmp: tmp.write_text(json.dumps(value), encoding="utf-8"))


def save_folder_atomic(
    out: Path, write: Callable[[Path], None], is_complete: Callable[[Path], bool]
) -> None:
    """Call ``write(tmp)`` on a hidden sibling folder, then rename it to ``out`` in one step.

    ``write`` should put its completion marker (e.g. a metrics file) last. If another process
    (a second rank) renamed a complete folder into place first, its result is kept.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        os.replace(tmp, out)  # also replaces an empty out_dir; fails on a non-empty one
    except OSError:
        if not is_complete(out):
            raise
        log.info("%s was written by another process meanwhile; keeping it", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder: Path) -> None:
    """Make a rename durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
