"""``lsrfx::stack_factors`` / ``lsrfx::unstack_factors``: stack layers' factor inputs for one batched call, and split
its result, as ops Inductor calls instead of generating code for.

The compile pass batches a factor op over the layers whose calls have the same shapes
(:mod:`lsrfx.passes.batch`). Written with ``torch.stack`` and ``torch.unbind``, Inductor would generate the stacking
as one copy loop per layer's tensor, fused into a kernel with the rest of the graph's parameter-only work, and the
backward of ``unbind`` as a stack of the layers' gradients likewise: C++ source that grows with the number of
layers, which is what batching is meant to avoid. These two ops are plain ``torch.library.custom_op``s, so Inductor
calls them as extern kernels: ``torch.stack`` once and one copy per layer's slice of the result, a few microseconds
each per step.

* ``stack_factors(xs)`` is ``torch.stack(xs)``; its backward hands each input its slice of the gradient (views).
* ``unstack_factors(x)`` is ``[x[i].clone() for i]`` (fresh tensors: a custom op's outputs may not alias its input;
  the copies are ``r x n`` factors); its backward stacks the gradients with ``stack_factors`` (zeros for a layer
  whose result got none).
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("lsrfx::stack_factors", mutates_args=())
def stack_factors(xs: list[Tensor]) -> Tensor:
    """``torch.stack(xs)`` (see the module docstring)."""
    return torch.stack(xs)


@stack_factors.register_fake
def _(xs: list[Tensor]) -> Tensor:
    return xs[0].new_empty((len(xs), *xs[0].shape))


def _stack_setup(ctx, inputs: tuple, output: Tensor) -> None:
    pass


def _stack_backward(ctx, grad: Tensor) -> list[Tensor]:
    return list(grad.unbind(0))


stack_factors.register_autograd(_stack_backward, setup_context=_stack_setup)


@torch.library.custom_op("lsrfx::unstack_factors", mutates_args=())
def unstack_factors(x: Tensor) -> list[Tensor]:
    """``[x[i].clone() for i in range(len(x))]`` (see the module docstring)."""
    return [t.clone() for t in x.unbind(0)]


@unstack_factors.register_fake
def _(x: Tensor) -> list[Tensor]:
    return [x.new_empty(x.shape[1:]) for _ in range(x.shape[0])]


def _unstack_setup(ctx, inputs: tuple, output: list[Tensor]) -> None:
    ctx.shape, ctx.dtype, ctx.device = inputs[0].shape[1:], inputs[0].dtype, inputs[0].device


def _unstack_backward(ctx, grads: list[Tensor | None]) -> Tensor:
    filled = [g if g is not None else torch.zeros(ctx.shape, dtype=ctx.dtype, device=ctx.device) for g in grads]
    return torch.ops.lsrfx.stack_factors(filled)


unstack_factors.register_autograd(_unstack_backward, setup_context=_unstack_setup)
