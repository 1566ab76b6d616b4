"""Custom ops that mark adapter structure in captured graphs.

``compose(W0, A, B, scale, transposed)`` returns ``W0 + scale * B @ A`` (transposed when the layer stores its
weight as ``(in, out)``, like GPT-2's ``Conv1D``). It is what a target weight's parametrization returns, so eager
mode is exact by construction, and under ``torch.compile`` the FX pass finds ``linear(x, compose(...))`` and
replaces the pair with one fused op that never materialises ``dW``.

``kron_sum(P, Q)`` returns ``sum_k kron(P[k], Q[k])``: LSR-Adapt builds its ``A`` and ``B`` with it, which lets the
pass hand the small Kronecker factors straight to the LSR kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor


def compose_reference(w0: Tensor, a: Tensor, b: Tensor, scale: float, transposed: bool) -> Tensor:
    """Dense ``W0 + s*B@A`` in W0's layout and dtype (the adapter may keep fp32 master factors)."""
    delta = (b @ a) * scale
    if transposed:
        delta = delta.t()
    return w0 + delta.to(w0.dtype)


@torch.library.custom_op("lsrfx::compose", mutates_args=())
def compose(w0: Tensor, a: Tensor, b: Tensor, scale: float, transposed: bool) -> Tensor:
    """``W0 + scale * B @ A`` (``.T`` of the delta when ``transposed``); see the module docstring."""
    return compose_reference(w0, a, b, scale, transposed)


@compose.register_fake
def _(w0: Tensor, a: Tensor, b: Tensor, scale: float, transposed: bool) -> Tensor:
    return torch.empty_like(w0)


def _compose_setup(ctx, inputs, output) -> None:
    _, a, b, scale, transposed = inputs
    ctx.save_for_backward(a, b)
    ctx.scale, ctx.transposed = scale, transposed


def _compose_backward(ctx, grad: Tensor):
    a, b = ctx.saved_tensors
    g = grad.t() if ctx.transposed else grad  # (d_out, d_in)
    g_f = g.to(a.dtype) * ctx.scale
    grad_a = b.t() @ g_f if ctx.needs_input_grad[1] else None
    grad_b = g_f @ a.t() if ctx.needs_input_grad[2] else None
    grad_w0 = grad if ctx.needs_input_grad[0] else None
    return grad_w0, grad_a, grad_b, None, None


compose.register_autograd(_compose_backward, setup_context=_compose_setup)


def kron_sum_reference(p: Tensor, q: Tensor) -> Tensor:
    """``sum_k kron(P[k], Q[k])`` for ``P: (S, m1, n1)``, ``Q: (S, m2, n2)`` -> ``(m1*m2, n1*n2)``."""
    s, m1, n1 = p.shape
    _, m2, n2 = q.shape
    return torch.einsum("sik,sjl->ijkl", p, q).reshape(m1 * m2, n1 * n2)


@torch.library.custom_op("lsrfx::kron_sum", mutates_args=())
def kron_sum(p: Tensor, q: Tensor) -> Tensor:
    """Sum of Kronecker products; see :func:`kron_sum_reference`."""
    return kron_sum_reference(p, q)


@kron_sum.register_fake
def _(p: Tensor, q: Tensor) -> Tensor:
    return p.new_empty(p.shape[1] * q.shape[1], p.shape[2] * q.shape[2])


def _kron_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _kron_backward(ctx, grad: Tensor):
    p, q = ctx.saved_tensors
    _, m1, n1 = p.shape
    _, m2, n2 = q.shape
    g = grad.reshape(m1, m2, n1, n2)
    grad_p = torch.einsum("ijkl,sjl->sik", g, q) if ctx.needs_input_grad[0] else None
    grad_q = torch.einsum("ijkl,sik->sjl", g, p) if ctx.needs_input_grad[1] else None
    return grad_p, grad_q


kron_sum.register_autograd(_kron_backward, setup_context=_kron_setup)
