"""``lsrfx::lowrank_linear``: the adapted linear ``x @ W.T + bias + scale * (x @ A.T) @ B.T`` as one op.

What the FX pass puts in place of ``linear(x, compose(W0, A, B, s))`` so ``dW`` is never materialised. It is a
``torch.library.triton_op``: on CUDA the body launches the fused Triton kernel through ``wrap_triton`` (Inductor
sees and schedules it), elsewhere the body is the torch reference below, which Inductor compiles like any torch
code and which is the spec the Triton kernels are tested against.

The op returns ``(out, v)`` with ``v = x @ A.T`` (``x``'s leading dims by ``r``): the forward computes ``v``
anyway, and saving it (a non-differentiable output, tiny next to ``x``) spares the backward a pass over ``x``. The
pass uses output 0. The backward (``register_autograd``) runs two more ops of the same kind, defined here too:
``lowrank_linear_grad_input`` (``grad @ W + s * (grad @ B) @ A``, adapter term fused) and
``lowrank_linear_grad_factors`` (the ``A``/``B`` gradients from ``u = grad @ B`` and the saved ``v``).

Conventions shared by every fused op: ``W`` is ``(N, K)``, or stored ``(K, N)`` when ``transposed`` (GPT-2
``Conv1D``); ``A``: ``(r, K)``; ``B``: ``(N, r)``; ``x`` may have any leading dims. The adapter term is computed in
the factors' dtype (fp32 master weights under a half-precision base) and cast to the output dtype once, which is
what ``compose`` does to ``dW``. The reference folds ``scale`` into BLAS calls (``addmm``'s ``alpha``) rather than
multiplying afterwards: under Inductor on CPU each separate multiply would be one more kernel launch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton

from lsrfx.kernels import triton_matmul as tk
from lsrfx.kernels.dispatch import choose

# Which inputs of the fused linear need a gradient: (x, W, bias, A, B).
GradsNeeded = tuple[bool, bool, bool, bool, bool]


def out_shape(x: Tensor, w: Tensor, transposed: bool) -> list:
    """Output shape of a fused linear: ``x``'s leading dims and ``N``."""
    return [*x.shape[:-1], w.shape[0 if not transposed else 1]]


def flat(t: Tensor) -> Tensor:
    """``t`` as a 2-D ``(tokens, features)`` matrix."""
    return t.reshape(-1, t.shape[-1])


def scaled_mm(m1: Tensor, m2: Tensor, scale: float, like: Tensor) -> Tensor:
    """``scale * m1 @ m2`` as one BLAS call, so no multiply kernel follows the product: ``addmm`` with ``beta = 0``
    ignores the values of its input, here ``like``, any existing tensor of the result's shape and dtype."""
    return torch.addmm(like, m1, m2, beta=0, alpha=scale)


# --- torch reference bodies -----------------------------------------------------------------------------------


def base_linear(x: Tensor, w: Tensor, bias: Tensor | None, transposed: bool) -> Tensor:
    """``x @ W.T + bias`` for ``W`` in ``(N, K)`` layout, or ``(K, N)`` when ``transposed``."""
    return torch.nn.functional.linear(x, w.t() if transposed else w, bias)


def lowrank_linear_reference(
    x: Tensor, w: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scale: float, transposed: bool
) -> tuple[Tensor, Tensor]:
    """``(x @ W.T + bias + scale * v @ B.T, v)`` with ``v = x @ A.T``, without ever forming ``B @ A``."""
    base = base_linear(x, w, bias, transposed)
    v = x.to(a.dtype) @ a.t()
    return base + (v @ b.t() * scale).to(base.dtype), v


def grad_input_reference(
    grad: Tensor, w: Tensor, a: Tensor, b: Tensor, scale: float, transposed: bool
) -> tuple[Tensor, Tensor]:
    """``(grad_x, u)``: ``grad_x = grad @ W + scale * u @ A`` and ``u = grad @ B`` (``tokens x r``, reused for
    ``grad_A``)."""
    w_nk = w.t() if transposed else w
    u = flat(grad).to(b.dtype) @ b
    base = flat(grad) @ w_nk
    if base.dtype == a.dtype:
        grad_x = torch.addmm(base, u, a, alpha=scale)
    else:  # fp32 factors on a half-precision base: one pointwise kernel scales, casts and adds
        grad_x = base + (u @ a * scale).to(base.dtype)
    return grad_x.reshape(*grad.shape[:-1], grad_x.shape[-1]), u


def column_major(t: Tensor) -> bool:
    """Whether the 2-D ``t`` (of more than one row) is stored as the transpose of a contiguous matrix.

    LSR's, CondLoRA's and GenLoRA's compiled ``B`` (``N x r``) is: each is formed as ``B.T``, because Inductor's C++
    backend vectorises a reduction along its output's last dimension and, when that dimension is shorter than one
    vector (``r``), torch 2.13 opens an OpenMP parallel region inside every output iteration (hundreds per call;
    each costs a scheduler time slice when another process holds a core). ``grad_B`` then takes ``B``'s layout, so
    the factor gradients read it along ``N`` too."""
    return t.dim() == 2 and t.shape[0] > 1 and t.stride(0) == 1 and t.stride(1) == t.shape[0]


def formed_transposed(rows: int, cols: int) -> bool:
    """Whether a factor of shape ``rows x cols`` that lsrfx forms itself is formed as its transpose and used as a
    transposed view (so that it is :func:`column_major`): when it has fewer columns than rows, i.e. ends in its
    rank. The ``kron_sum`` op, ``lsr_linear`` and the pass's product rewrite all follow this rule."""
    return cols < rows


def tn_like(tn: Callable[[Tensor, Tensor, Tensor], Tensor], lhs: Tensor, rhs: Tensor, like: Tensor) -> Tensor:
    """``lhs.T @ rhs`` computed by ``tn(lhs, rhs, like)`` in the layout of ``like``, its shape (a factor): row-major,
    or the transpose of ``tn(rhs, lhs, like.T)`` when ``like`` is :func:`column_major`."""
    if column_major(like):
        return tn(rhs, lhs, like.t()).t()
    return tn(lhs, rhs, like)


def grad_factors_reference(
    grad: Tensor, x: Tensor, v: Tensor, a: Tensor, b: Tensor, u: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    """``(grad_A, grad_B)`` = ``(scale * u.T @ x, scale * grad.T @ v)`` over all leading dims (``u = grad @ B``
    when not given), each in its factor's layout."""
    g2 = flat(grad).to(a.dtype)
    u2 = g2 @ b if u is None else flat(u)

    def tn(lhs: Tensor, rhs: Tensor, like: Tensor) -> Tensor:  # one BLAS call, scale included
        return scaled_mm(lhs.t(), rhs, scale, like)

    return tn_like(tn, u2, flat(x).to(a.dtype), a), tn_like(tn, g2, flat(v), b)


def grad_weight_reference(grad: Tensor, x: Tensor, transposed: bool) -> Tensor:
    """Gradient of the base weight in its storage layout (only when ``W`` is trainable, which is unusual)."""
    gw = flat(grad).t() @ flat(x)  # (N, K)
    return gw.t() if transposed else gw


def base_grads(grad: Tensor, x: Tensor, w: Tensor, *, need_w: bool, need_bias: bool,
               transposed: bool) -> tuple[Tensor | None, Tensor | None]:
    """``(grad_w, grad_bias)`` of an adapted linear, ``None`` where not needed: the base's part of every adapted
    linear's backward (fused or merged), the same whatever the adapter."""
    grad_w = grad_weight_reference(grad, x, transposed).to(w.dtype) if need_w else None
    grad_bias = flat(grad).sum(0) if need_bias else None
    return grad_w, grad_bias


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
