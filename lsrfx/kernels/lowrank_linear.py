"""``lsrfx::lowrank_linear``: the adapted linear ``x @ W.T + bias + scale * (x @ A.T) @ B.T`` as one op.

What the FX pass puts in place of ``linear(x, compose(W0, A, B, s))`` so ``dW`` is never materialised. It is a
``torch.library.triton_op``: on CUDA the body launches the fused Triton kernel through ``wrap_triton`` (Inductor
sees and schedules it), elsewhere the body is the torch reference, which Inductor compiles like any torch code and
which is the spec the Triton kernels are tested against.

The op returns ``(out, v)`` with ``v = x @ A.T`` (``x``'s leading dims by ``r``): the forward computes ``v``
anyway, and saving it (a non-differentiable output, tiny next to ``x``) spares the backward a pass over ``x``. The
pass uses output 0. The backward (``register_autograd``) runs two more ops of the same kind, defined here too:
``lowrank_linear_grad_input`` (``grad @ W + s * (grad @ B) @ A``, adapter term fused) and
``lowrank_linear_grad_factors`` (the ``A``/``B`` gradients from ``u = grad @ B`` and the saved ``v``).

The torch reference bodies live in :mod:`lsrfx.kernels.reference`, with the conventions every fused op shares;
the factor layouts in :mod:`lsrfx.kernels.layout`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton

from lsrfx.kernels import triton_matmul as tk
from lsrfx.kernels.dispatch import choose
from lsrfx.kernels.layout import flat, out_shape, tn_like
from lsrfx.kernels.reference import (
    GradsNeeded,
    base_grads,
    grad_factors_reference,
    grad_input_reference,
    lowrank_linear_reference,
)

# --- bodies shared with lsr_linear ----------------------------------------------------------------------------


def triton_forward(
    x: Tensor, w: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scale: float, transposed: bool,
    launch: Callable = tk.identity_launch,
) -> tuple[Tensor, Tensor]:
    """``(out, v)`` from the fused Triton kernel, which computes ``v = x @ A.T`` in its K-loop anyway and stores it
    (fp32) on request."""
    out, v = tk.lowrank_forward(x, w, bias, a, b, scale, transposed, launch, return_u=True)
    return out, v.to(a.dtype)


def forward_body(
    x: Tensor, w: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scale: float, transposed: bool
) -> tuple[Tensor, Tensor]:
    """``(out, v)`` of the fused linear: the Triton kernels where :func:`~lsrfx.kernels.dispatch.choose` picks them
    (CUDA: measured against the reference once per shape bucket), the torch reference elsewhere."""
    args = (x, w, bias, a, b, scale, transposed)
    if choose("lowrank_linear", args, triton_forward, lowrank_linear_reference):
        return triton_forward(*args, launch=wrap_triton)
    return lowrank_linear_reference(*args)


def fake_outputs(x: Tensor, w: Tensor, a: Tensor, transposed: bool) -> tuple[Tensor, Tensor]:
    """Empty ``(out, v)`` of the right shapes and dtypes (the ops' fake implementations)."""
    return x.new_empty(out_shape(x, w, transposed)), a.new_empty([*x.shape[:-1], a.shape[0]])


# --- the ops ------------------------------------------------------------------------------------------------


@triton_op("lsrfx::lowrank_linear", mutates_args=())
def lowrank_linear(
    x: Tensor, w: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scale: float, transposed: bool
) -> tuple[Tensor, Tensor]:
    """Fused adapted linear, returning ``(out, x @ A.T)``; see the module docstring."""
    return forward_body(x, w, bias, a, b, scale, transposed)


@lowrank_linear.register_fake
def _(x, w, bias, a, b, scale, transposed):
    return fake_outputs(x, w, a, transposed)


@triton_op("lsrfx::lowrank_linear_grad_input", mutates_args=())
def lowrank_linear_grad_input(
    grad: Tensor, w: Tensor, a: Tensor, b: Tensor, scale: float, transposed: bool
) -> tuple[Tensor, Tensor]:
    """``(grad @ W + scale * u @ A, u)`` with ``u = grad @ B`` flattened to ``(tokens, r)``, fused on CUDA."""
    args = (grad, w, a, b, scale, transposed)
    if choose("lowrank_linear_grad_input", args, tk.grad_input, grad_input_reference):
        gx, u = tk.grad_input(*args, wrap_triton)
        return gx, flat(u)
    return grad_input_reference(*args)


@lowrank_linear_grad_input.register_fake
def _(grad, w, a, b, scale, transposed):
    k = w.shape[1 if not transposed else 0]
    tokens = grad.numel() // grad.shape[-1]
    return grad.new_empty([*grad.shape[:-1], k]), b.new_empty([tokens, b.shape[1]])


@triton_op("lsrfx::lowrank_linear_grad_factors", mutates_args=())
def lowrank_linear_grad_factors(
    grad: Tensor, x: Tensor, v: Tensor, a: Tensor, b: Tensor, u: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    """``(grad_A, grad_B)`` = ``(scale * u.T @ x, scale * grad.T @ v)`` summed over all tokens, with ``v = x @ A.T``
    saved by the forward and ``u = grad @ B`` reused from the input gradient (computed here when ``None``)."""
    args = (grad, x, v, a, b, u, scale)
    if choose("lowrank_linear_grad_factors", args, triton_grad_factors, grad_factors_reference):
        return triton_grad_factors(*args, launch=wrap_triton)
    return grad_factors_reference(*args)


def triton_grad_factors(
    grad: Tensor, x: Tensor, v: Tensor, a: Tensor, b: Tensor, u: Tensor | None, scale: float,
    launch: Callable = tk.identity_launch,
) -> tuple[Tensor, Tensor]:
    """:func:`grad_factors_reference` with lsrfx's reduction kernels (``v`` saved by the forward)."""
    g2, x2 = flat(grad), flat(x)
    u2 = tk.tn_matmul(g2.t(), b, 1.0, torch.float32, launch) if u is None else flat(u)

    def tn(lhs: Tensor, rhs: Tensor, like: Tensor) -> Tensor:
        return tk.tn_matmul(lhs, rhs, scale, like.dtype, launch)

    return tn_like(tn, u2, x2, a), tn_like(tn, g2, flat(v), b)


@lowrank_linear_grad_factors.register_fake
def _(grad, x, v, a, b, u, scale):
    return torch.empty_like(a), torch.empty_like(b)


# --- autograd -----------------------------------------------------------------------------------------------


def linear_grads(
    grad: Tensor, x: Tensor, w: Tensor, a: Tensor, b: Tensor, v: Tensor, *, needs: GradsNeeded, scale: float,
    transposed: bool,
) -> tuple[Tensor | None, ...]:
    """``(grad_x, grad_w, grad_bias, grad_a, grad_b)`` of the fused linear, each ``None`` where ``needs`` is false.

    Shared by every fused linear's backward (``lsr_linear`` passes its dense ``A`` and ``B``); ``v = x @ A.T`` is
    the one the forward saved."""
    need_x, need_w, need_bias, need_a, need_b = needs
    grad_x = u = grad_a = grad_b = None
    if need_x:
        grad_x, u = torch.ops.lsrfx.lowrank_linear_grad_input(grad, w, a, b, scale, transposed)
    if need_a or need_b:
        grad_a, grad_b = torch.ops.lsrfx.lowrank_linear_grad_factors(grad, x, v, a, b, u, scale)
    grad_w, grad_bias = base_grads(grad, x, w, need_w=need_w, need_bias=need_bias, transposed=transposed)
    return grad_x, grad_w, grad_bias, (grad_a if need_a else None), (grad_b if need_b else None)


def _setup_context(ctx, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    x, w, bias, a, b, scale, transposed = inputs
    v = output[1]
    ctx.mark_non_differentiable(v)
    ctx.save_for_backward(x, w, a, b, v)
    ctx.scale, ctx.transposed = scale, transposed
    ctx.needs = tuple(ctx.needs_input_grad[:5])


def _backward(ctx, grad: Tensor, _grad_v: Tensor | None) -> tuple:
    x, w, a, b, v = ctx.saved_tensors
    grads = linear_grads(grad, x, w, a, b, v, needs=ctx.needs, scale=ctx.scale, transposed=ctx.transposed)
    return (*grads, None, None)


lowrank_linear.register_autograd(_backward, setup_context=_setup_context)
