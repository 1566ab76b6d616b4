"""``lsrfx::lsr_linear``: the fused adapted linear for LSR-Adapt, taking the Kronecker factors themselves.

``A = sum_s A1[s] (x) A2[s]`` (``r x K``) and ``B = sum_s B1[s] (x) B2[s]`` (``N x r``, stored as ``B.T``) are
formed once per call (on CUDA by lsrfx's expansion kernel, elsewhere as the ``kron_sum`` op's body forms them),
then the low-rank forward runs on them. The op returns ``(out, v, A, B)``: ``v = x @ A.T`` and the small ``A`` and
``B`` (``r x (K + N)`` values, never ``dW``) are non-differentiable outputs saved for the backward, so the backward
neither re-forms them nor re-reads ``x`` for ``v``. The pass uses output 0. The backward runs the low-rank backward
ops and chains the ``A``/``B`` gradients to the factors with :func:`~lsrfx.kernels.kron_sum.kron_sum_grads_formed`.
"""

from __future__ import annotations

from torch import Tensor
from torch.library import triton_op, wrap_triton

from lsrfx.kernels import triton_matmul as tk
from lsrfx.kernels.dispatch import use_triton
from lsrfx.kernels.kron_sum import kron_sum_empty, kron_sum_formed, kron_sum_grads_formed, kron_sum_transposed
from lsrfx.kernels.lowrank_linear import fake_outputs, forward_body, linear_grads


def kron_factors(a1: Tensor, a2: Tensor, b1: Tensor, b2: Tensor) -> tuple[Tensor, Tensor]:
    """Dense ``(A, B)`` from LSR's factors: the Triton expansion kernel on CUDA, the torch reference elsewhere.

    Each in the layout :func:`~lsrfx.kernels.kron_sum.kron_sum_transposed` chooses, as the ``kron_sum`` op forms it:
    ``B`` (``N x r``) is formed as ``B.T = sum_s B1[s].T (x) B2[s].T`` and returned as its transpose view (the
    reduction then ends in ``B2``'s long dimension, not in ``r2``)."""
    if not use_triton(a1):
        return kron_sum_formed(a1, a2), kron_sum_formed(b1, b2)

    def expand(p: Tensor, q: Tensor) -> Tensor:
        if kron_sum_transposed(p, q):
            return tk.kron_expand(p.mT, q.mT, wrap_triton).t()
        return tk.kron_expand(p, q, wrap_triton)

    return expand(a1, a2), expand(b1, b2)


@triton_op("lsrfx::lsr_linear", mutates_args=())
def lsr_linear(
    x: Tensor, w: Tensor, bias: Tensor | None, a1: Tensor, a2: Tensor, b1: Tensor, b2: Tensor, scale: float,
    transposed: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x @ W.T + bias + scale * v @ B.T, v, A, B)`` with ``v = x @ A.T`` and ``A``, ``B`` given by their
    Kronecker factors."""
    a, b = kron_factors(a1, a2, b1, b2)
    out, v = forward_body(x, w, bias, a, b, scale, transposed)
    return out, v, a, b


@lsr_linear.register_fake
def _(x, w, bias, a1, a2, b1, b2, scale, transposed):
    a, b = kron_sum_empty(a1, a2), kron_sum_empty(b1, b2)  # each in kron_factors' layout
    return (*fake_outputs(x, w, a, transposed), a, b)


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    x, w, bias, a1, a2, b1, b2, scale, transposed = inputs
    _, v, a, b = output
    ctx.mark_non_differentiable(v, a, b)
    ctx.save_for_backward(x, w, a1, a2, b1, b2, v, a, b)
    ctx.scale, ctx.transposed = scale, transposed
    n = ctx.needs_input_grad
    ctx.needs = (n[0], n[1], n[2], n[3] or n[4], n[5] or n[6])  # (x, W, bias, A, B) of the low-rank backward
    ctx.factor_needs = tuple(n[3:7])  # (A1, A2, B1, B2)


def _backward(ctx, grad: Tensor, *_unused: Tensor | None) -> tuple:
    x, w, a1, a2, b1, b2, v, a, b = ctx.saved_tensors
    need_a1, need_a2, need_b1, need_b2 = ctx.factor_needs
    grad_x, grad_w, grad_bias, grad_a, grad_b = linear_grads(
        grad, x, w, a, b, v, needs=ctx.needs, scale=ctx.scale, transposed=ctx.transposed
    )
    ga1 = ga2 = gb1 = gb2 = None
    if grad_a is not None:  # each chained the way kron_factors formed it (grad_B in B's layout, through B.T)
        ga1, ga2 = kron_sum_grads_formed(grad_a, a1, a2, need_p=need_a1, need_q=need_a2)
    if grad_b is not None:
        gb1, gb2 = kron_sum_grads_formed(grad_b, b1, b2, need_p=need_b1, need_q=need_b2)
    return grad_x, grad_w, grad_bias, ga1, ga2, gb1, gb2, None, None


lsr_linear.register_autograd(_backward, setup_context=_setup_context)
