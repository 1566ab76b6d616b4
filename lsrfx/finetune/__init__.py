"""``lsrfx finetune``: fine-tune a local Hugging Face encoder with lsrfx adapters on a labelled CSV, end to end.

The names below are imported on first access, so that the CLI can read :mod:`lsrfx.finetune.defaults` (for its
``--help`` text) without importing torch, transformers or matplotlib.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "FinetuneError": "lsrfx.finetune.errors",
    "FinetuneSettings": "lsrfx.finetune.run",
    "TextData": "lsrfx.finetune.data",
    "load_data": "lsrfx.finetune.data",
    "run_finetune": "lsrfx.finetune.run",
}

__all__ = ["FinetuneError", "FinetuneSettings", "TextData", "load_data", "run_finetune"]

if TYPE_CHECKING:
    from lsrfx.finetune.data import TextData, load_data
    from lsrfx.finetune.errors import FinetuneError
    from lsrfx.finetune.run import FinetuneSettings, run_finetune


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'lsrfx.finetune' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
