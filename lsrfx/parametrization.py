"""The adapter enters a model as a ``torch.nn.utils.parametrize`` parametrization of each target weight, and this
module is the one place that reads an adapted layer's parts (its ``W0``, its adapter, the adapter tensors' names).

``module.weight`` then reads ``compose(W0, A, B, scale)`` = ``W0 + scale * B @ A``: eager mode is exact by
construction, adapter tensors are ordinary ``nn.Parameter``s under the module (optimizers, ``state_dict``, ``.to()``,
DDP/FSDP see them; a CondLoRA pair under the first layer of its group), every op that consumes the weight is
adapted, and Dynamo traces it into ``linear(x, compose(...))``, the pattern the compile pass fuses. What the layer
computes in eager mode (the low-rank path that never forms ``W0 + dW``) and how it is installed and removed is
:mod:`lsrfx.adapted_layer`; how it saves and loads (a merged ``weight`` for plain loaders) is
:mod:`lsrfx.state_dict_hooks`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lsrfx.adapters.base import Adapter
from lsrfx.errors import LsrfxError
from lsrfx.kernels.compose import compose
from lsrfx.quantized_base import is_quantized


class AdaptedWeight(nn.Module):
    """Parametrization ``W0 -> W0 + scale * B @ A`` (delta transposed for ``(in, out)``-stored weights)."""

    def __init__(self, adapter: Adapter, transposed: bool, quantized: bool = False) -> None:
        super().__init__()
        self.adapter = adapter
        self.transposed = transposed
        # W0 is a quantized (torchao) tensor: read it dequantised. A plain bool fixed by ``adapt`` (a constant for
        # Dynamo: inspecting the tensor's type while tracing would hide the ``compose`` pattern from the pass).
        self.quantized = quantized

    def forward(self, weight: Tensor) -> Tensor:
        # Under autocast the adapted weight is still computed at the master precision, like a plain parameter's
        # value; the op that consumes it (F.linear, addmm) casts it, exactly as for an unadapted layer. (Letting
        # autocast into the factor math would give bf16 factors whose fp32 backward then mixes dtypes.)
        device = weight.device.type
        if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                return self._compose(weight)
        return self._compose(weight)

    def _compose(self, weight: Tensor) -> Tensor:
        if self.quantized:
            weight = weight.dequantize()
        a, b = self.adapter.factors(weight.t() if self.transposed else weight)
        return compose(weight, a, b, self.adapter.scale, self.transposed)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> AdaptedWeight:
        """``Module._apply`` (``to``, ``to_empty``, ...), then re-initialise the adapter modules it moved off the
        ``meta`` device: ``to_empty`` leaves uninitialised memory, and an adapter must start from its method's init
        (LoRA's ``B = 0``, so ``dW = 0``), whereas base weights are then loaded from a checkpoint."""
        on_meta = [m for m in self.adapter.modules() if _owns_meta_parameters(m)]
        super()._apply(fn, recurse)
        for m in on_meta:
            if not _owns_meta_parameters(m):
                if not hasattr(m, "reset_parameters"):
                    raise LsrfxError(
                        f"{type(m).__name__} has no reset_parameters(), so its parameters hold uninitialised memory "
                        "after to_empty; adapt the materialised model instead (to_empty, load the base weights, then "
                        "lsrfx.adapt)."
                    )
                with torch.no_grad():
                    m.reset_parameters()
        return self


def _owns_meta_parameters(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters(recurse=False))


ORIGINAL_KEY = "parametrizations.weight.original"  # W0's name under an adapted layer (state_dict key suffix)
PARAMETRIZATIONS_KEY = "parametrizations.weight."  # what every tensor of an adapted layer's adaptation starts with


def weight_parametrizations(module: nn.Module) -> nn.ModuleList:
    """An adapted layer's ``parametrize`` list for ``weight`` (its ``original`` is ``W0``, item 0 the
    :class:`AdaptedWeight`)."""
    return module.parametrizations["weight"]


def layer_adaptation(module: nn.Module) -> AdaptedWeight:
    """The :class:`AdaptedWeight` of a layer known to be adapted (the forward's fast path; see
    :func:`adapted_weight` for any layer)."""
    return module.parametrizations["weight"][0]


def adapted_weight(module: nn.Module) -> AdaptedWeight | None:
    """The lsrfx parametrization on ``module.weight``, if any."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    return next((p for p in module.parametrizations["weight"] if isinstance(p, AdaptedWeight)), None)


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, AdaptedWeight]]:
    """``(name, module, parametrization)`` for every adapted layer, in module order."""
    for name, module in model.named_modules():
        param = adapted_weight(module)
        if param is not None:
            yield name, module, param


_layers_generation = 0


def layers_changed() -> None:
    """Record that some layer gained or lost its adapter (``install`` / ``remove``): lists of adapted layers kept
    by callers that run at every forward (:func:`layers_generation`) are then built again."""
    global _layers_generation
    _layers_generation += 1


def layers_generation() -> int:
    """A number that changes whenever any layer of any model gains or loses its adapter."""
    return _layers_generation


def refuse_script(self: nn.Module) -> nn.Module:
    """``__prepare_scriptable__`` of an adapted layer: TorchScript cannot compile parametrizations or lsrfx's ops,
    so ``torch.jit.script`` stops here with the fix instead of a raw error from deep inside the compiler."""
    raise LsrfxError(
        f"torch.jit.script cannot compile an adapted layer ({type(self).__name__} with an lsrfx adapter: a "
        "parametrization and custom ops). Fold the adapters in first (lsrfx.merge(model), or merge a copy), or use "
        "torch.compile / torch.export / lsrfx.merge_and_export instead of TorchScript."
    )


def give_private_class(module: nn.Module) -> None:
    """Give a parametrized module a private copy of its generated class (same name, bases and members).

    ``parametrize`` generates one class per parametrized module and ``copy.deepcopy`` shares it between original
    and copy, so removing the parametrization from one would delete ``weight`` from the other (see
    ``docs/architecture.md``, "Why the adapter goes in through the weight").
    """
    cls = type(module)
    members = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, members)


def base_weight(module: nn.Module) -> Tensor:
    """The frozen ``W0`` of an adapted layer, in the layer's own storage layout (quantized if the base is)."""
    return weight_parametrizations(module).original


def set_base_weight(module: nn.Module, weight: nn.Parameter) -> None:
    """Replace an adapted layer's ``W0`` (dequantising a quantized base for merge and export)."""
    weight_parametrizations(module).original = weight
    adapted_weight(module).quantized = is_quantized(weight)


def adapter_of(module: nn.Module) -> Adapter:
    """The adapter of an adapted layer."""
    return adapted_weight(module).adapter


def stored_weight(module: nn.Module) -> Tensor | None:
    """The tensor a layer stores as its weight: ``W0`` of an adapted layer (never the composed ``W0 + dW``)."""
    if adapted_weight(module) is not None:
        return base_weight(module)
    return module._parameters.get("weight")


ADAPTER_INFIX = ".parametrizations.weight.0.adapter."


def layer_of(tensor_name: str) -> str:
    """The adapted layer an adapter tensor's qualified name belongs to (``...query.parametrizations...`` ->
    ``...query``), or the name itself for other tensors."""
    return tensor_name.split(ADAPTER_INFIX, 1)[0]


def named_adapter_parameters(layers: Iterable[tuple[str, Adapter]]) -> dict[str, nn.Parameter]:
    """``{qualified name: parameter}`` of ``(layer name, adapter)`` pairs, shared parameters (CondLoRA) once, under
    the first layer that uses them (see :func:`adapter_parameters`)."""
    seen: set[int] = set()
    out: dict[str, nn.Parameter] = {}
    for name, adapter in layers:
        for pname, p in adapter.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out[name + ADAPTER_INFIX + pname] = p
    return out


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Adapter parameters by their first qualified name, shared ones (CondLoRA) once: the name they are registered
    under (a CondLoRA pair belongs to the first layer of its group), which is also their ``state_dict`` key."""
    return named_adapter_parameters((name, param.adapter) for name, _, param in adapted_layers(model))
