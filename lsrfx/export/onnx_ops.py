"""ONNX translations of the lsrfx custom ops, for exporting a model whose adapters stay unmerged (``merge=False``).

``torch.export`` keeps ``lsrfx::compose`` and ``lsrfx::kron_sum`` as opaque nodes; the dynamo ONNX exporter needs a
``custom_translation_table`` entry for each. The translations live beside their ops (``lsrfx/kernels/compose.py``,
``lsrfx/kernels/kron_sum.py``) and are listed in the factor table (:mod:`lsrfx.kernels.factor_table`). They
are traced onnxscript functions built from standard ONNX ops only (MatMul, Einsum, Reshape, ...), so the exported
file runs in any onnxruntime without custom kernels, and the adapter tensors stay separate initializers.
"""

from __future__ import annotations

from collections.abc import Callable

from lsrfx.kernels.factor_table import onnx_translation_table


def translation_table() -> dict[Callable, Callable]:
    """The ``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``."""
    return onnx_translation_table()
