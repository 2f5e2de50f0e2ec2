"""Writing a model folder so that a crash never leaves one that looks complete."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def save_folder_atomic(
    out: Path, write: Callable[[Path], None], is_complete: Callable[[Path], bool]
) -> None:
    """Call ``write(tmp)`` on a hidden sibling folder, then rename it to ``out`` in one step.

    ``write`` should put its completion marker (e.g. a metrics file) last. If another process
    (a second rank) renamed a complete folder into place first, its result is kept.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
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
