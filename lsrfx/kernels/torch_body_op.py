"""Ops whose body is plain torch code that Inductor should compile with the rest of the graph.

``torch.library.custom_op`` would make the op opaque: Inductor calls it as an extern kernel, eagerly, and fuses
nothing around it. A ``triton_op`` is traced into by Inductor instead, whether or not its body launches Triton
kernels; ``compose`` and ``merged_linear`` are such ops with torch bodies only (the op boundary is what marks adapter
structure for the pass and the export). The factor ops ``kron_sum`` and ``rbf_bank`` are opaque ``custom_op``s
instead: code generated for them is what structured factors added to a cold compile. ``triton_op`` warns
when it finds no Triton kernel in a body, which is expected here, hence the quiet logger.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lsrfx.utils import quiet_logger


def torch_body_op(name: str, body: Callable) -> torch.library.CustomOpDef:
    """Define ``name`` (``"lsrfx::..."``, functional) with ``body`` as a ``triton_op`` Inductor compiles through."""
    with quiet_logger("torch._library.triton"):
        return torch.library.triton_op(name, body, mutates_args=())
