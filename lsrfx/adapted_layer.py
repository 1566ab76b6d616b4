"""One adapted layer: how lsrfx installs, runs and removes the adapter of an ``nn.Linear`` or GPT-2 ``Conv1D``
(reading an adapted layer's parts is :mod:`lsrfx.parametrization`'s job).

The adapter enters through the weight (:class:`~lsrfx.parametrization.AdaptedWeight`): ``module.weight`` reads
``W0 + dW``, so every consumer of the weight (tied embeddings, custom modules calling ``F.linear(x,
module.weight)``, ``state_dict``, merge, export) sees the adapted layer exactly. What the layer itself computes is
this module's forward, put on the class ``parametrize`` generated for the layer (each adapted module has its own):

* **eager** (training loops, ``Trainer``, notebooks, ``generate``): ``x @ W0.T + b + scale * (x @ A.T) @ B.T``
  from the rank-``r`` factors, never forming ``W0 + dW`` (:func:`lowrank_forward`). Autograd then keeps ``x`` and
  the factors for the backward, as peft's LoRA does, instead of a full copy of every adapted weight, and computes no
  dense weight gradient. Without gradients (evaluation, generation) the factors are computed once and reused until
  an adapter tensor changes (:func:`factors`), so a decoding step costs two skinny matmuls per layer.
* **under torch.compile / torch.export**: the class's own forward, ``linear(x, module.weight)``, so the captured
  graph holds ``linear(x, compose(W0, A, B, s))``, which the FX pass fuses (:mod:`lsrfx.passes`) exactly as
  before; a quantized base keeps the low-rank form (the pass has no kernel over a torchao tensor).

A quantized (torchao) ``W0`` stays quantized: its matmul is torchao's, and the base's input gradient is formed
from the quantized weight in the backward (:class:`FrozenLinear`) instead of keeping a dequantised copy alive.
A layer whose class defines its own forward (a subclass of ``nn.Linear``) keeps it: it reads ``module.weight``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lsrfx.adapters.base import Adapter
from lsrfx.factor_cache import factors
from lsrfx.kernels.compose import compose
from lsrfx.parametrization import (
    AdaptedWeight,
    adapted_layers,
    adapted_weight,
    base_weight,
    give_private_class,
    layer_adaptation,
    layers_changed,
    refuse_script,
    set_base_weight,
    stored_weight,
)
from lsrfx.quantized_base import dense, is_quantized, scheme
from lsrfx.serving import active_rows, rows_delta

# --- install and remove -------------------------------------------------------------------------------------


def install(module: nn.Module, adapter: Adapter, transposed: bool) -> None:
    """Parametrize ``module.weight`` with ``adapter`` and give the layer lsrfx's forward (unless its class has a
    forward of its own) and a clear refusal of TorchScript."""
    quantized = is_quantized(module.weight)
    base_class = type(module)
    parametrize.register_parametrization(module, "weight", AdaptedWeight(adapter, transposed, quantized))
    cls = type(module)  # the class parametrize generated for this module alone
    if _has_standard_forward(base_class):
        cls.forward = adapted_forward
    cls.__prepare_scriptable__ = refuse_script
    layers_changed()


def _has_standard_forward(cls: type) -> bool:
    """``nn.Linear``'s or ``transformers``' ``Conv1D``'s own forward (a subclass with another forward keeps it)."""
    forward = cls.forward
    return forward is nn.Linear.forward or (cls.__name__ == "Conv1D" and forward is _conv1d_forward(cls))


def _conv1d_forward(cls: type) -> object:
    return next((c.__dict__["forward"] for c in cls.__mro__ if c.__name__ == "Conv1D" and "forward" in c.__dict__),
                None)


def remove(module: nn.Module, *, fold: bool) -> None:
    """Remove the adapter from one layer: ``fold`` keeps ``W0 + dW`` as its weight (in place, in ``W0``'s tensor),
    else ``W0`` comes back. The layer returns to its own class."""
    give_private_class(module)  # a deep copy shares the generated class with its original: never edit it
    parametrize.remove_parametrizations(module, "weight", leave_parametrized=fold)
    layers_changed()


def dequantize_base(module: nn.Module) -> None:
    """Replace a layer's quantized weight by its dequantised float weight, in place (merge and export). The new
    weight is frozen, as the quantized one was."""
    weight = stored_weight(module)
    if weight is None or not is_quantized(weight):
        return
    plain = nn.Parameter(weight.dequantize().detach().clone(), requires_grad=False)
    if adapted_weight(module) is not None:
        set_base_weight(module, plain)
    else:
        module.weight = plain


def dequantize_all(model: nn.Module) -> int:
    """:func:`dequantize_base` on every layer of ``model`` with a quantized weight; returns how many changed."""
    layers = [m for m in model.modules() if is_quantized(stored_weight(m))]
    for module in layers:
        dequantize_base(module)
    return len(layers)


def quantized_layers(model: nn.Module) -> dict[str, str]:
    """Adapted layers whose ``W0`` is quantized, by name, with their scheme (for ``explain`` and ``summary``)."""
    return {name: scheme(base_weight(m)) or "" for name, m, _ in adapted_layers(model) if is_quantized(base_weight(m))}


# --- the forward ----------------------------------------------------------------------------------------------

_local = threading.local()


@contextlib.contextmanager
def formed_weight_path() -> Iterator[None]:
    """Inside the block (this thread), adapted layers run eagerly through the formed weight ``linear(x, W0 + dW)``,
    as every lsrfx release before the low-rank path did: the reference the low-rank path is tested and benchmarked
    against. Not a user setting."""
    previous = getattr(_local, "formed", False)
    _local.formed = True
    try:
        yield
    finally:
        _local.formed = previous


def adapted_forward(self: nn.Module, x: Tensor) -> Tensor:
    """The forward of every adapted ``nn.Linear`` / ``Conv1D`` (see the module docstring)."""
    param = layer_adaptation(self)
    rows = active_rows()
    if rows is not None and rows.apply_to(param):  # one adapter set per batch row (lsrfx.serving)
        out = base_output(self, param, x)
        return out + rows_delta(param, x, rows).to(out.dtype)
    if torch.compiler.is_compiling():
        if param.quantized:
            return quantized_compiled_forward(self, param, x)
        if not torch.is_grad_enabled() and "lsrfx_A" in param._buffers:
            return formed_forward(self, param, x, param.lsrfx_A, param.lsrfx_B)
        return type(self).__mro__[1].forward(self, x)  # linear(x, compose(...)): the pattern the pass fuses
    if getattr(_local, "formed", False):
        return type(self).__mro__[1].forward(self, x)
    return lowrank_forward(self, param, x)


def formed_forward(module: nn.Module, param: AdaptedWeight, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """The layer's own computation on ``compose(W0, A, B)`` for given factors: under ``torch.compile`` without
    gradients, the factors kept for inference (refreshed before the call, outside the graph), so a decoding step
    does not form them again; the pass fuses the layer as usual."""
    w = compose(base_weight(module), a, b, param.adapter.scale, param.transposed)
    if param.transposed:  # GPT-2 Conv1D: addmm(bias, x, W) with W stored (in, out)
        out = torch.addmm(module.bias, x.reshape(-1, x.shape[-1]), w)
        return out.reshape(*x.shape[:-1], out.shape[-1])
    return F.linear(x, w, module.bias)


def base_output(module: nn.Module, param: AdaptedWeight, x: Tensor) -> Tensor:
    """``x @ W0.T + bias`` in the layer's layout (``Conv1D`` stores ``W0`` as ``(in, out)``)."""
    w0 = base_weight(module)
    if param.quantized and not torch.compiler.is_compiling():
        return FrozenLinear.apply(x, w0, module.bias)
    return F.linear(x, w0.t() if param.transposed else w0, module.bias)


def lowrank_forward(module: nn.Module, param: AdaptedWeight, x: Tensor) -> Tensor:
    """``x @ W0.T + bias + scale * (x @ A.T) @ B.T`` from the factors: nothing of ``W0``'s size is formed or saved
    for the backward, and ``W0`` gets no gradient (it is frozen). The adapter term is computed in the factors'
    dtype (fp32 master factors under a half-precision base) and added to the base output in its dtype; under
    autocast the matmuls take autocast's dtype like any linear layer's."""
    if torch.is_grad_enabled() and not param.quantized:
        w0 = base_weight(module)
        out = param.adapter.eager_linear(x, w0.t() if param.transposed else w0, module.bias)
        if out is not None:
            return out
    out = base_output(module, param, x)
    a, b = factors(module, param)
    delta = F.linear(F.linear(x.to(a.dtype), a), b)
    if param.quantized:  # torchao's output is a view autograd forbids editing in place
        return out + (delta * param.adapter.scale).to(out.dtype)
    return out.add_(delta, alpha=param.adapter.scale)  # in place: nothing saves the base output for the backward


def quantized_compiled_forward(module: nn.Module, param: AdaptedWeight, x: Tensor) -> Tensor:
    """Under ``torch.compile``: torchao's kernel for the quantized base and the low-rank term beside it (Inductor
    compiles both; the FX pass has no fused kernel over a torchao tensor)."""
    w0 = base_weight(module)
    a, b = param.adapter.factors(dense(w0) if param.adapter.reads_base_weight else w0)
    out = F.linear(x, w0, module.bias)
    delta = F.linear(F.linear(x.to(a.dtype), a), b)
    return out + (delta * param.adapter.scale).to(out.dtype)


class FrozenLinear(torch.autograd.Function):
    """``x @ W0.T + bias`` for a frozen quantized ``W0``: torchao's kernel in the forward, and in the backward the
    input gradient from ``W0`` dequantised on the spot. torchao's own ``F.linear`` keeps a dequantised copy of the
    weight alive from forward to backward, as large as a float base layer."""

    @staticmethod
    def forward(ctx, x: Tensor, w0: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(w0)
        ctx.has_bias = bias is not None
        return F.linear(x, w0, bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
        (w0,) = ctx.saved_tensors
        grad_x = grad @ w0.dequantize().to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias
