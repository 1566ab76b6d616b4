"""``lsrfx::kron_sum``: ``sum_k kron(P[k], Q[k])``, how LSR-Adapt builds its ``A`` and ``B``.

Marking the Kronecker sum as an op lets the compile pass hand the small factors straight to ``lsrfx::lsr_linear``
instead of the dense ``A`` and ``B``, and batch the sums of equal-shaped layers into one call. This is the one place
the Kronecker-sum math and its gradient live: the op's body and autograd, ``lsr_linear``'s reference and backward,
and the ONNX translation all use it.

The op and its backward (``lsrfx::kron_sum_backward``) are opaque ``custom_op``s: Inductor calls them instead of
generating code for them (what a structured factor added to a cold compile; ``docs/architecture.md``, "Compile
time"), so their bodies are the matrix-product forms eager code should run (:func:`kron_sum_product`,
:func:`kron_sum_product_grads`). Eager callers run those bodies through :class:`KronSum`, a plain
``autograd.Function`` that dispatches faster than the op. :func:`kron_sum_reference` and :func:`kron_sum_grads`,
the broadcast-product reductions, are the statement of the math, and what ``lsr_linear``'s body and backward trace
into compiled code.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lsrfx.kernels.layout import formed_transposed


def kron_sum_reference(p: Tensor, q: Tensor) -> Tensor:
    """``sum_k kron(P[k], Q[k])`` for ``P: (S, m1, n1)``, ``Q: (S, m2, n2)`` -> ``(m1*m2, n1*n2)``; any leading
    batch dimensions (the same on ``P`` and ``Q``) are kept, one Kronecker sum per batch element (the compile pass
    stacks equal-shaped layers: :mod:`lsrfx.passes.batch`).

    Written as a broadcast product summed over ``S`` so that Inductor makes it one reduction kernel writing the
    Kronecker layout directly (an ``einsum`` lowers to a batched matmul plus permute copies)."""
    *lead, _, m1, n1 = p.shape
    m2, n2 = q.shape[-2:]
    return (p[..., :, :, None, :, None] * q[..., :, None, :, None, :]).sum(-5).reshape(*lead, m1 * m2, n1 * n2)


def kron_sum_grads(grad: Tensor, p: Tensor, q: Tensor, need_p: bool = True,
                   need_q: bool = True) -> tuple[Tensor | None, Tensor | None]:
    """Chain ``grad`` of ``M = sum_k kron(P[k], Q[k])`` to ``(grad_P, grad_Q)`` (``None`` where not needed): one
    broadcast-product reduction each, for the same reason as :func:`kron_sum_reference` (leading batch dimensions
    likewise)."""
    *lead, _, m1, n1 = p.shape
    m2, n2 = q.shape[-2:]
    g = grad.reshape(*lead, 1, m1, m2, n1, n2)
    grad_p = (g * q[..., :, None, :, None, :]).sum((-3, -1)) if need_p else None
    grad_q = (g * p[..., :, :, None, :, None]).sum((-4, -2)) if need_q else None
    return grad_p, grad_q


def kron_sum_transposed(p: Tensor, q: Tensor) -> bool:
    """Whether ``M = sum_k kron(P[k], Q[k])`` is formed as ``M.T`` and handed out as its transpose view: when it
    has fewer columns than rows (LSR-Adapt's ``B``, ``N x r``), by :func:`lsrfx.kernels.layout.formed_transposed`.
    The reduction then ends in ``N2``, not ``r2``, and so do the factor gradients (:mod:`lsrfx.kernels.layout`
    says why that matters)."""
    return formed_transposed(p.shape[-2] * q.shape[-2], p.shape[-1] * q.shape[-1])


def kron_sum_formed(p: Tensor, q: Tensor) -> Tensor:
    """:func:`kron_sum_reference` in the layout :func:`kron_sum_transposed` chooses (same values)."""
    if kron_sum_transposed(p, q):
        return kron_sum_reference(p.mT, q.mT).mT
    return kron_sum_reference(p, q)


def kron_sum_empty(p: Tensor, q: Tensor) -> Tensor:
    """An empty tensor of :func:`kron_sum_formed`'s shape, dtype and layout (what the ops' fake functions return)."""
    lead = p.shape[:-3]
    rows, cols = p.shape[-2] * q.shape[-2], p.shape[-1] * q.shape[-1]
    return p.new_empty(*lead, cols, rows).mT if kron_sum_transposed(p, q) else p.new_empty(*lead, rows, cols)


def kron_sum_grads_formed(grad: Tensor, p: Tensor, q: Tensor, need_p: bool = True,
                          need_q: bool = True) -> tuple[Tensor | None, Tensor | None]:
    """:func:`kron_sum_grads` chained the way :func:`kron_sum_formed` formed ``M``: through ``M.T`` when it was
    formed transposed, the factor gradients then handed back as transposed views."""
    if not kron_sum_transposed(p, q):
        return kron_sum_grads(grad, p, q, need_p, need_q)
    grad_pt, grad_qt = kron_sum_grads(grad.mT, p.mT, q.mT, need_p, need_q)
    return (None if grad_pt is None else grad_pt.mT), (None if grad_qt is None else grad_qt.mT)


def kron_sum_product(p: Tensor, q: Tensor) -> Tensor:
    """:func:`kron_sum_reference`'s values as one (batched) matrix product over the ``S`` terms and a permuted copy,
    leading batch dimensions kept: what eager code (and autograd through it) should run. The broadcast form
    materialises ``S`` times the result before summing, which Inductor fuses away but eager execution pays for."""
    *lead, s, m1, n1 = p.shape
    m2, n2 = q.shape[-2:]
    out = p.reshape(*lead, s, m1 * n1).mT @ q.reshape(*lead, s, m2 * n2)  # [..., (a, b), (c, d)]
    k = len(lead)
    return out.reshape(*lead, m1, n1, m2, n2).permute(*range(k), k, k + 2, k + 1, k + 3).reshape(
        *lead, m1 * m2, n1 * n2)


def kron_sum_product_grads(grad: Tensor, p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`kron_sum_grads` as two (batched) matrix products: ``grad`` regrouped by Kronecker block, then
    contracted with ``Q`` for ``grad_P`` and with ``P`` for ``grad_Q``."""
    *lead, s, m1, n1 = p.shape
    m2, n2 = q.shape[-2:]
    k = len(lead)
    g = grad.reshape(*lead, m1, m2, n1, n2).permute(*range(k), k, k + 2, k + 1, k + 3).reshape(
        *lead, m1 * n1, m2 * n2)
    grad_p = (g @ q.reshape(*lead, s, m2 * n2).mT).mT.reshape(*lead, s, m1, n1)
    grad_q = (p.reshape(*lead, s, m1 * n1) @ g).reshape(*lead, s, m2, n2)
    return grad_p, grad_q


def kron_sum_values(p: Tensor, q: Tensor) -> Tensor:
    """Sum of Kronecker products (:func:`kron_sum_reference`'s values) in the layout :func:`kron_sum_transposed`
    chooses, as the matrix products above: the body of the op and of :class:`KronSum`."""
    if kron_sum_transposed(p, q):
        return kron_sum_product(p.mT, q.mT).mT
    return kron_sum_product(p, q)


def kron_sum_grad_values(grad: Tensor, p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """``(grad_P, grad_Q)`` of :func:`kron_sum_values`, contiguous like ``P`` and ``Q``."""
    if kron_sum_transposed(p, q):
        grad_pt, grad_qt = kron_sum_product_grads(grad.mT, p.mT, q.mT)
        return grad_pt.mT.contiguous(), grad_qt.mT.contiguous()
    grad_p, grad_q = kron_sum_product_grads(grad, p, q)
    return grad_p.contiguous(), grad_q.contiguous()


@torch.library.custom_op("lsrfx::kron_sum", mutates_args=())
def kron_sum(p: Tensor, q: Tensor) -> Tensor:
    """Sum of Kronecker products (:func:`kron_sum_values`). Opaque to Inductor (see the module docstring)."""
    return kron_sum_values(p, q)


@kron_sum.register_fake
def _(p: Tensor, q: Tensor) -> Tensor:
    return kron_sum_empty(p, q)


@torch.library.custom_op("lsrfx::kron_sum_backward", mutates_args=())
def kron_sum_backward(grad: Tensor, p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """``(grad_P, grad_Q)`` of :func:`kron_sum` (:func:`kron_sum_grad_values`)."""
    return kron_sum_grad_values(grad, p, q)


@kron_sum_backward.register_fake
def _(grad: Tensor, p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(p, memory_format=torch.contiguous_format), torch.empty_like(
        q, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
    p, q = ctx.saved_tensors
    grad_p, grad_q = torch.ops.lsrfx.kron_sum_backward(grad, p, q)
    return (grad_p if ctx.needs_input_grad[0] else None), (grad_q if ctx.needs_input_grad[1] else None)


kron_sum.register_autograd(_backward, setup_context=_setup_context)


class KronSum(torch.autograd.Function):
    """The Kronecker sum in eager mode: the op's own bodies behind an ``autograd.Function``, which dispatches with
    far less Python than a ``custom_op`` call (paid twice per layer and step). Under ``torch.compile`` and
    ``torch.export`` callers use the op, which the compile pass and the ONNX translation read."""

    @staticmethod
    def forward(ctx, p: Tensor, q: Tensor) -> Tensor:
        ctx.save_for_backward(p, q)
        return kron_sum_values(p, q)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        grad_p, grad_q = kron_sum_grad_values(grad, *ctx.saved_tensors)
        return (grad_p if ctx.needs_input_grad[0] else None), (grad_q if ctx.needs_input_grad[1] else None)


def kron_sum_onnx(p, q):
    """ONNX translation (traced onnxscript, standard ops only) of :func:`kron_sum_reference`. onnxscript is
    imported here, not at module level, so ``import lsrfx`` does not need it."""
    from onnxscript import opset18 as op

    blocks = op.Einsum(p, q, equation="sik,sjl->ijkl")  # (m1, m2, n1, n2)
    dims = op.Shape(blocks)
    rows = op.ReduceProd(op.Slice(dims, [0], [2]), keepdims=1)
    cols = op.ReduceProd(op.Slice(dims, [2], [4]), keepdims=1)
    return op.Reshape(blocks, op.Concat(rows, cols, axis=0))
