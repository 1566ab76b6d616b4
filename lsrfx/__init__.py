"""lsrfx: structured low-rank adapters as a ``torch.compile`` pass.

``adapt`` inserts adapters (LSR-Adapt, CondLoRA, GenLoRA, LoRA) into a model's linear layers, ``merge`` folds them
back in, ``summary`` shows what was adapted, ``explain`` shows what the compile pass rewrote, ``merge_and_export``
ships an ONNX file, ``save_adapters`` / ``load_adapters`` keep the small adapter files. Importing lsrfx installs its
FX pass into Inductor (``lsrfx.passes``); graphs without lsrfx ops pass through it unchanged.
"""

import lsrfx.passes  # noqa: F401  (installs the fusion pass into Inductor's pre-grad passes)
from lsrfx.adapters import METHODS, CondLoRAConfig, GenLoRAConfig, LoRAConfig, LSRConfig
from lsrfx.api import adapt, count_parameters, merge, summary
from lsrfx.errors import LsrfxError
from lsrfx.explain import explain
from lsrfx.export import load_adapters, merge_and_export, save_adapters

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "CondLoRAConfig",
    "GenLoRAConfig",
    "LSRConfig",
    "LoRAConfig",
    "LsrfxError",
    "adapt",
    "count_parameters",
    "explain",
    "load_adapters",
    "merge",
    "merge_and_export",
    "save_adapters",
    "summary",
]
