"""ONNX translations of the lsrfx custom ops, for exporting a model whose adapters stay unmerged (``merge=False``).

``torch.export`` keeps ``lsrfx::compose`` and ``lsrfx::kron_sum`` as opaque nodes; the dynamo ONNX exporter needs a
``custom_translation_table`` entry for each. These are traced onnxscript functions built from standard ONNX ops
only (MatMul, Einsum, Reshape, ...), so the exported file runs in any onnxruntime without custom kernels, and the
adapter tensors stay separate initializers in the graph.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from onnxscript import ir
from onnxscript import opset18 as op

import lsrfx.kernels.factor_ops  # noqa: F401  (registers torch.ops.lsrfx.*)


def compose_onnx(w0, a, b, scale: float, transposed: bool):
    """``W0 + scale * B @ A`` (delta transposed for ``(in, out)``-stored weights), cast to W0's dtype.

    The scale is a constant of the factors' dtype and the cast is emitted only when adapters and base differ
    (fp32 adapters on a half-precision base), so onnxruntime sees plain MatMul/Mul/Add it can fold and fuse."""
    scale_const = op.Constant(value=ir.tensor(np.asarray(scale, dtype=a.dtype.numpy())))
    delta = op.Mul(op.MatMul(b, a), scale_const)
    if transposed:
        delta = op.Transpose(delta, perm=[1, 0])
    if a.dtype != w0.dtype:
        delta = op.Cast(delta, to=w0.dtype)
    return op.Add(w0, delta)


def kron_sum_onnx(p, q):
    """``sum_k kron(P[k], Q[k])`` for ``P: (S, m1, n1)``, ``Q: (S, m2, n2)`` -> ``(m1*m2, n1*n2)``."""
    blocks = op.Einsum(p, q, equation="sik,sjl->ijkl")  # (m1, m2, n1, n2)
    dims = op.Shape(blocks)
    rows = op.ReduceProd(op.Slice(dims, [0], [2]), keepdims=1)
    cols = op.ReduceProd(op.Slice(dims, [2], [4]), keepdims=1)
    return op.Reshape(blocks, op.Concat(rows, cols, axis=0))


def translation_table() -> dict[Callable, Callable]:
    """The ``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``."""
    return {
        torch.ops.lsrfx.compose.default: compose_onnx,
        torch.ops.lsrfx.kron_sum.default: kron_sum_onnx,
    }
