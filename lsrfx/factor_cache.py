"""The factors ``(A, B)`` of an adapted layer as its forward uses them, and the copy kept for calls without gradients.

With gradients the factors are formed at every call (they are functions of the trainable adapter tensors). Without
(evaluation, generation, serving) they are fixed between optimizer steps, so each layer keeps them as non-persistent
buffers of its parametrization (``lsrfx_A`` / ``lsrfx_B``) and forms them again only when an adapter tensor, or
``W0`` (which CondLoRA reads), changed: in-place updates (the optimizer's, ``load_adapters``') bump a tensor's
version, which is part of the key. New values are copied into the same buffers, so a compiled graph that reads them
needs no recompilation. A change that PyTorch does not count (assigning through ``.data``) needs
:func:`clear_factor_cache`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lsrfx.parametrization import AdaptedWeight, adapted_layers, base_weight


def factors(module: nn.Module, param: AdaptedWeight) -> tuple[Tensor, Tensor]:
    """``(A, B)`` of a layer, computed outside autocast (as ``compose`` computes them); without gradients, the ones
    kept for inference (:func:`inference_factors`)."""
    if torch.is_grad_enabled():
        return _factors(module, param)
    return inference_factors(module, param)


def inference_factors(module: nn.Module, param: AdaptedWeight) -> tuple[Tensor, Tensor]:
    """The layer's factors kept for calls without gradients (see the module docstring), brought up to date."""
    key = _cache_key(module, param)
    a = param._buffers.get("lsrfx_A")
    if a is not None and param.__dict__.get("_lsrfx_key") == key:
        return a, param._buffers["lsrfx_B"]
    with torch.inference_mode(False), torch.no_grad():
        new_a, new_b = _factors(module, param)
        for name, value in (("lsrfx_A", new_a), ("lsrfx_B", new_b)):
            old = param._buffers.get(name)
            if old is not None and old.shape == value.shape and old.dtype == value.dtype and \
                    old.device == value.device:
                old.copy_(value)
            else:
                param.register_buffer(name, value.detach().clone(), persistent=False)
    param.__dict__["_lsrfx_key"] = key
    return param._buffers["lsrfx_A"], param._buffers["lsrfx_B"]


def _cache_key(module: nn.Module, param: AdaptedWeight) -> tuple:
    key: list = []
    for t in param.adapter.parameters():
        key.append((id(t), t.data_ptr(), t._version, t.dtype, t.device))
    if param.adapter.reads_base_weight:
        w0 = base_weight(module)
        key.append((id(w0), w0._version))
    return tuple(key)


def _factors(module: nn.Module, param: AdaptedWeight) -> tuple[Tensor, Tensor]:
    w0 = base_weight(module)
    device = w0.device.type
    w0 = w0.t() if param.transposed else w0  # the adapter sees W0 as d_out x d_in
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        with torch.autocast(device, enabled=False):
            return param.adapter.factors(w0)
    return param.adapter.factors(w0)


def clear_factor_cache(model: nn.Module) -> None:
    """Forget the factors kept for inference. Needed only after changing adapter tensors without an in-place op
    that PyTorch counts (e.g. through ``.data``)."""
    for _, _, param in adapted_layers(model):
        param.__dict__.pop("_lsrfx_key", None)
