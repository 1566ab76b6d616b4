"""``lsrfx::condlora_linear``: a whole CondLoRA layer, ``x @ W0.T + bias + s * (x @ A.T) @ B.T`` with ``A = C_A @
W0.T`` (square ``W0``) or ``C_A @ W0`` and ``B = W0 @ C_B.T``, reading ``W0`` once per direction where it can.

CondLoRA's factors are products of the frozen ``W0`` with the shared pair: skinny matmuls, each a full pass over
``W0`` forward and again backward, beside the base matmul's own pass. Every product that contracts ``W0`` along the
base matmul's axis is stacked onto it instead: forward ``[x; C_A; C_B] @ W0.T`` gives the base output, ``A`` (square
layers) and ``B.T``; backward ``[dY; dA; dB.T] @ W0`` gives the input gradient and the pair's gradients. A square
layer then reads ``W0`` once each way, as a frozen linear layer does. A non-square layer's ``A = C_A @ W0``
contracts the other axis, so it is not formed at all in the forward: ``x @ A.T = (x @ W0.T) @ C_A.T`` is taken from
the base output (``tokens x d_out x r`` multiply-adds instead of a pass over ``W0``), and in the backward its input
gradient joins the output gradient before the stacked product (``(dY + dU @ C_A) @ W0``). What remains is ``C_A``'s
gradient ``dA @ W0.T``, a second product in the backward; where ``W0.T`` is the long way round it shares one pass over
``W0`` from memory with the stacked product, block by cached block (:func:`products_sharing_w`). The stack copies the
activations (``tokens x (d_in + d_out)`` values a step), which costs less than the products it replaces at every
token count measured (bench/README.md): those are skinny matmuls of ``2r`` or fewer rows, each a whole pass over
``W0`` that BLAS runs far below the speed of a copy, and the unstacked form has four of them a step.

Two entry points share the bodies (:func:`condlora_forward`, :func:`condlora_backward`): :class:`CondLoRALinear`, a
plain ``autograd.Function`` for eager training (``CondLoRAAdapter.eager_linear``), and the op with its backward op
``lsrfx::condlora_linear_backward``, opaque to Inductor, which the compile pass puts in place of
``lowrank_linear`` for CondLoRA's layers off CUDA (:func:`lsrfx.passes.fuse._stacked_condlora`). Every tensor has one
dtype (the callers check). ``transposed``: ``w0`` is stored ``(d_in, d_out)`` (GPT-2's ``Conv1D``).
"""

from __future__ import annotations

import torch
from torch import Tensor

CACHE_BLOCK_BYTES = 1 << 20  # a block of W0 this large stays in a core's L2 cache between the two products


def products_sharing_w(s: Tensor, w: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """``(s @ w.T, c @ w)``: a non-square layer's two products of ``W0`` in its backward (``w = W0.T``: the stacked
    input gradient and ``C_A``'s gradient). Their contractions run along different axes of ``w``, so they cannot
    share one matrix product; but when ``w`` has more rows than columns and does not fit in cache, they share one
    pass over it from memory: ``w`` is taken in blocks of rows of about :data:`CACHE_BLOCK_BYTES`, and each block
    serves both products while cached (the first writes its block of columns of ``s @ w.T``, the second
    accumulates). Otherwise (``w`` small, or wide: the blocks of the first product would then be narrow ones with a
    long contraction, which BLAS runs slower than the extra pass costs), or off the CPU, two plain products."""
    n, k = w.shape
    rows = max(64, CACHE_BLOCK_BYTES // (k * w.element_size()) // 16 * 16)
    if w.device.type != "cpu" or n <= k or rows >= n:
        return s @ w.t(), c @ w
    y = s.new_empty(s.shape[0], n)
    half = w.dtype in (torch.float16, torch.bfloat16)
    # A half-precision sum over blocks would round once per block; it is kept in float32 and rounded once, as one
    # product's would be.
    z = c.new_zeros(c.shape[0], k, dtype=torch.float32 if half else c.dtype)
    for i in range(0, n, rows):
        block = w[i:i + rows]
        torch.mm(s, block.t(), out=y[:, i:i + rows])
        if half:
            z.add_(c[:, i:i + rows] @ block)
        else:
            z.addmm_(c[:, i:i + rows], block)
    return y, z.to(w.dtype)


def condlora_forward(x: Tensor, w0: Tensor, bias: Tensor | None, c_a: Tensor, c_b: Tensor, scale: float,
                     square: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(out, A, B.T, u = x @ A.T)`` for the logical ``w0`` (``d_out x d_in``); ``out`` has ``x``'s leading
    dimensions. ``A`` is formed for a square layer only (its backward needs it); a non-square layer's ``A = C_A @
    W0`` is never formed, since ``x @ A.T = (x @ W0.T) @ C_A.T`` comes from the base output (an empty tensor stands
    in its place). ``out`` is shaped by ``resize_`` of the stacked result, not a view of it: a custom Function's
    output that is a view of a tensor made inside may not be edited in place downstream."""
    x2 = x.reshape(-1, x.shape[-1])
    t, r = x2.shape[0], c_b.shape[0]
    if square:
        y = torch.cat([x2, c_a, c_b]) @ w0.t()  # (t + 2r, d_out)
        a = y[t:t + r].clone()  # (r x d_in)
        u = x2 @ a.t()  # (t, r)
    else:
        y = torch.cat([x2, c_b]) @ w0.t()  # (t + r, d_out)
        a = c_a.new_empty(0)
        u = y[:t] @ c_a.t()  # (x @ W0.T) @ C_A.T, before the bias and the adapter's term join the base output
    bt = y[-r:].clone()  # B.T (r x d_out)
    d_out = y.shape[1]
    out = y.resize_(t, d_out)  # the base output: the first t rows, in y's storage
    out.addmm_(u, bt, alpha=scale)
    if bias is not None:
        out.add_(bias)
    return out.resize_(*x.shape[:-1], d_out), a, bt, u


def condlora_backward(grad: Tensor, x: Tensor, w0: Tensor, a: Tensor, bt: Tensor, u: Tensor, c_a: Tensor,
                      scale: float, square: bool, need_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(grad_x, grad_bias, grad_C_A, grad_C_B)`` of :func:`condlora_forward`; ``grad_bias`` is empty unless
    ``need_bias``."""
    x2 = x.reshape(-1, x.shape[-1])
    g = grad.reshape(-1, grad.shape[-1])
    t, r = g.shape[0], bt.shape[0]
    grad_bt = (u.t() @ g).mul_(scale)  # (r, d_out)
    grad_u = (g @ bt.t()).mul_(scale)  # (t, r)
    grad_a = grad_u.t() @ x2  # (r, d_in)
    if square:
        stacked = torch.cat([g, grad_a, grad_bt]) @ w0  # (t + 2r, d_in)
        grad_c_a = stacked[t:t + r].clone()
    else:
        # u = (x @ W0.T) @ C_A.T: its input gradient joins the output gradient before the product with W0
        s = torch.cat([g, grad_bt])
        s[:t].addmm_(grad_u, c_a)
        stacked, grad_c_a = products_sharing_w(s, w0.t(), grad_a)  # (t + r, d_in); (r, d_out) = dA @ W0.T
    grad_c_b = stacked[-r:].clone()
    grad_x = stacked.resize_(t, stacked.shape[1])
    if square:
        grad_x.addmm_(grad_u, a)
    return grad_x.resize_(x.shape), g.sum(0) if need_bias else g.new_empty(0), grad_c_a, grad_c_b


def _logical(w0: Tensor, transposed: bool) -> Tensor:
    return w0.t() if transposed else w0


def _save(ctx, x: Tensor, w0: Tensor, a: Tensor, bt: Tensor, u: Tensor, c_a: Tensor, scale: float, square: bool,
          transposed: bool) -> None:
    """What both entry points keep for the backward."""
    ctx.save_for_backward(x, w0, a, bt, u, c_a)
    ctx.scale, ctx.square, ctx.transposed = scale, square, transposed


def _input_grads(need: tuple, grad_x: Tensor, grad_bias: Tensor, grad_c_a: Tensor, grad_c_b: Tensor) -> tuple:
    """The gradients of ``(x, w0, bias, c_a, c_b, scale, square, transposed)``, ``None`` where none is needed."""
    return (grad_x if need[0] else None, None, grad_bias if need[2] else None, grad_c_a if need[3] else None,
            grad_c_b if need[4] else None, None, None, None)


class CondLoRALinear(torch.autograd.Function):
    """The layer in eager training (see the module docstring). Saved for the backward: ``x``, ``A`` (square layers),
    ``B.T`` and ``x @ A.T`` (what the generic low-rank path and peft keep), and ``W0`` and ``C_A`` themselves."""

    @staticmethod
    def forward(ctx, x: Tensor, w0: Tensor, bias: Tensor | None, c_a: Tensor, c_b: Tensor, scale: float,
                square: bool, transposed: bool) -> Tensor:
        out, a, bt, u = condlora_forward(x, _logical(w0, transposed), bias, c_a, c_b, scale, square)
        _save(ctx, x, w0, a, bt, u, c_a, scale, square, transposed)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple:
        x, w0, a, bt, u, c_a = ctx.saved_tensors
        need = ctx.needs_input_grad
        return _input_grads(need, *condlora_backward(grad, x, _logical(w0, ctx.transposed), a, bt, u, c_a,
                                                     ctx.scale, ctx.square, need[2]))


@torch.library.custom_op("lsrfx::condlora_linear", mutates_args=())
def condlora_linear(x: Tensor, w0: Tensor, bias: Tensor | None, c_a: Tensor, c_b: Tensor, scale: float,
                    square: bool, transposed: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(out, A, B.T, x @ A.T)`` (``A`` empty for a non-square layer); the compile pass uses output 0, the others
    are saved for the backward."""
    return condlora_forward(x, _logical(w0, transposed), bias, c_a, c_b, scale, square)


@condlora_linear.register_fake
def _(x: Tensor, w0: Tensor, bias: Tensor | None, c_a: Tensor, c_b: Tensor, scale: float, square: bool,
      transposed: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    d_out, d_in = _logical(w0, transposed).shape
    r = c_b.shape[0]
    return (x.new_empty([*x.shape[:-1], d_out]), x.new_empty([r, d_in] if square else [0]), x.new_empty([r, d_out]),
            x.new_empty([x.numel() // d_in, r]))


@torch.library.custom_op("lsrfx::condlora_linear_backward", mutates_args=())
def condlora_linear_backward(grad: Tensor, x: Tensor, w0: Tensor, a: Tensor, bt: Tensor, u: Tensor, c_a: Tensor,
                             scale: float, square: bool, transposed: bool,
                             need_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(grad_x, grad_bias, grad_C_A, grad_C_B)`` of the op (``grad_bias`` empty unless ``need_bias``)."""
    return condlora_backward(grad, x, _logical(w0, transposed), a, bt, u, c_a, scale, square, need_bias)


@condlora_linear_backward.register_fake
def _(grad: Tensor, x: Tensor, w0: Tensor, a: Tensor, bt: Tensor, u: Tensor, c_a: Tensor, scale: float,
      square: bool, transposed: bool, need_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    d_out, d_in = _logical(w0, transposed).shape
    r = bt.shape[0]  # C_A is r x d_in when square, r x d_out otherwise: r x d_out either way
    return (torch.empty_like(x, memory_format=torch.contiguous_format), grad.new_empty([d_out if need_bias else 0]),
            grad.new_empty([r, d_out]), grad.new_empty([r, d_in]))


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    x, w0, _bias, c_a, _c_b, scale, square, transposed = inputs
    _out, a, bt, u = output
    _save(ctx, x, w0, a, bt, u, c_a, scale, square, transposed)


def _backward(ctx, grad: Tensor, *_unused: Tensor) -> tuple:
    need = ctx.needs_input_grad
    return _input_grads(need, *torch.ops.lsrfx.condlora_linear_backward(
        grad, *ctx.saved_tensors, ctx.scale, ctx.square, ctx.transposed, need[2]))


condlora_linear.register_autograd(_backward, setup_context=_setup_context)
