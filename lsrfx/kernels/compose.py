"""``lsrfx::compose``: the adapted weight ``W0 + scale * B @ A``, the op every adapter puts in a captured graph.

``compose(W0, A, B, scale, transposed)`` returns ``W0 + scale * B @ A`` (the delta transposed when the layer stores
its weight as ``(in, out)``, like GPT-2's ``Conv1D``). It is what a target weight's parametrization returns, so
eager mode is exact by construction, and under ``torch.compile`` the FX pass finds ``linear(x, compose(...))`` and
replaces the pair with one fused op that never materialises ``dW``. This module holds the op, its torch reference,
its fake and autograd, and its ONNX translation (for exports that keep the adapters unmerged).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lsrfx.kernels.layout import tn_like
from lsrfx.kernels.torch_body_op import torch_body_op


def compose_reference(w0: Tensor, a: Tensor, b: Tensor, scale: float, transposed: bool) -> Tensor:
    """Dense ``W0 + s*B@A`` in W0's layout and dtype (the adapter may keep fp32 master factors)."""
    delta = (b @ a) * scale
    if transposed:
        delta = delta.t()
    return w0 + delta.to(w0.dtype)


def _compose(w0: Tensor, a: Tensor, b: Tensor, scale: float, transposed: bool) -> Tensor:
    """``W0 + scale * B @ A`` (``.T`` of the delta when ``transposed``); see the module docstring."""
    return compose_reference(w0, a, b, scale, transposed)


compose = torch_body_op("lsrfx::compose", _compose)  # Inductor compiles the body in the graph


@compose.register_fake
def _(w0: Tensor, a: Tensor, b: Tensor, scale: float, transposed: bool) -> Tensor:
    return torch.empty_like(w0)


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    _, a, b, scale, transposed = inputs
    ctx.save_for_backward(a, b)
    ctx.scale, ctx.transposed = scale, transposed


def _backward(ctx, grad: Tensor) -> tuple:
    a, b = ctx.saved_tensors
    g = grad.t() if ctx.transposed else grad  # (d_out, d_in)
    g_f = g.to(a.dtype) * ctx.scale
    grad_a = b.t() @ g_f if ctx.needs_input_grad[1] else None
    grad_b = None
    if ctx.needs_input_grad[2]:  # g_f @ A.T in B's layout (a B formed as B.T gets a column-major gradient)
        grad_b = tn_like(lambda lhs, rhs, _like: lhs.t() @ rhs, g_f.t(), a.t(), b)
    grad_w0 = grad if ctx.needs_input_grad[0] else None
    return grad_w0, grad_a, grad_b, None, None


compose.register_autograd(_backward, setup_context=_setup_context)


def compose_onnx(w0, a, b, scale: float, transposed: bool):
    """ONNX translation (traced onnxscript, standard ops only): ``W0 + scale * B @ A``, cast to W0's dtype.

    The scale is a constant of the factors' dtype and the cast is emitted only when adapters and base differ
    (fp32 adapters on a half-precision base), so onnxruntime sees plain MatMul/Mul/Add it can fold and fuse. The
    annotations matter: the exporter passes ``scale`` and ``transposed`` as attributes. onnxscript is imported
    here, not at module level, so ``import lsrfx`` does not need it."""
    import numpy as np
    from onnxscript import ir
    from onnxscript import opset18 as op

    scale_const = op.Constant(value=ir.tensor(np.asarray(scale, dtype=a.dtype.numpy())))
    delta = op.Mul(op.MatMul(b, a), scale_const)
    if transposed:
        delta = op.Transpose(delta, perm=[1, 0])
    if a.dtype != w0.dtype:
        delta = op.Cast(delta, to=w0.dtype)
    return op.Add(w0, delta)
