"""lsrfx: structured low-rank adapters as a ``torch.compile`` pass.

``adapt`` inserts adapters (LSR-Adapt, CondLoRA, GenLoRA, LoRA) into a model's linear layers, ``merge`` folds them
back in, ``summary`` shows what was adapted, ``explain`` shows what the compile pass rewrote, ``merge_and_export``
ships an ONNX file, ``save_adapters`` / ``load_adapters`` keep the small adapter files.

Importing lsrfx changes no global configuration: ``adapt`` (and ``load_adapters``, which adapts) installs the FX
pass into Inductor's pre-grad passes (``lsrfx.passes.install()``, idempotent); graphs without lsrfx ops pass
through it unchanged. See ``docs/architecture.md`` for how the layers fit together.

Importing lsrfx is also cheap: most public names are imported on first access (PEP 562 module ``__getattr__``),
so ``import lsrfx`` and ``lsrfx --help`` load neither torch nor Inductor (which registering lsrfx's ``triton_op``
kernels imports), onnx, onnxruntime or transformers. The first access to ``lsrfx.adapt`` (or to another name that
needs them) pays for torch and the kernels. ``LsrfxError`` and ``explain`` are imported eagerly: both modules are
light, and importing ``explain`` here keeps ``lsrfx.explain`` the function (imported lazily, a later
``import lsrfx.explain`` would bind the submodule of the same name instead).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lsrfx.errors import LsrfxError
from lsrfx.explain import explain
from lsrfx.version import __version__

# Public name -> the module that defines it, imported on first access.
_LAZY: dict[str, str] = {
    "METHODS": "lsrfx.adapters",
    "CondLoRAConfig": "lsrfx.adapters",
    "GenLoRAConfig": "lsrfx.adapters",
    "LSRConfig": "lsrfx.adapters",
    "LoRAConfig": "lsrfx.adapters",
    "adapt": "lsrfx.api",
    "compile_blocks": "lsrfx.regional",
    "count_parameters": "lsrfx.api",
    "merge": "lsrfx.api",
    "summary": "lsrfx.api",
    "use_adapters": "lsrfx.serving",
    "delete_adapters": "lsrfx.serving",
    "load_adapters": "lsrfx.export",
    "loaded_adapters": "lsrfx.serving",
    "merge_and_export": "lsrfx.export",
    "save_adapters": "lsrfx.export",
}
# Subpackages reachable as attributes after a bare ``import lsrfx`` (e.g. ``lsrfx.passes.install()``).
_SUBMODULES = frozenset({"adapted_layer", "adapters", "api", "cli", "export", "finetune", "kernels",
                         "parametrization", "passes", "serving", "targets", "utils"})

__all__ = [
    "METHODS",
    "CondLoRAConfig",
    "GenLoRAConfig",
    "LSRConfig",
    "LoRAConfig",
    "LsrfxError",
    "adapt",
    "count_parameters",
    "delete_adapters",
    "explain",
    "load_adapters",
    "loaded_adapters",
    "merge",
    "merge_and_export",
    "save_adapters",
    "summary",
    "use_adapters",
    "__version__",
]

if TYPE_CHECKING:  # static analysers and IDEs see the real objects
    from lsrfx.adapters import METHODS, CondLoRAConfig, GenLoRAConfig, LoRAConfig, LSRConfig
    from lsrfx.api import adapt, count_parameters, merge, summary
    from lsrfx.export import load_adapters, merge_and_export, save_adapters
    from lsrfx.serving import delete_adapters, loaded_adapters, use_adapters


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access and cache the name in this module."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"lsrfx.{name}")
    else:
        raise AttributeError(f"module 'lsrfx' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES})
