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

import threading
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from lsrfx.parametrization import AdaptedWeight, adapted_layers, base_weight


def factors(module: nn.Module, param: AdaptedWeight) -> tuple[Tensor, Tensor]:
    """``(A, B)`` of a layer, computed outside autocast (as ``compose`` computes them); without gradients, the ones
    kept for inference (:func:`inference_factors`)."""
    if torch.is_grad_enabled():
        return _factors(module, param)
    return inference_factors(module, param)


class _CallMark(threading.local):
    """The mark of the call running in this thread whose layers were brought up to date before it started."""

    token: object | None = None


_mark = _CallMark()


def refresh_for_call(layers: Iterable[tuple[str, nn.Module, AdaptedWeight]]) -> object | None:
    """Bring ``layers``' kept factors up to date before a model's call without gradients (a compiled graph reads
    them, it cannot check them) and mark them, so that in this call each layer's forward skips its own check
    (:func:`inference_factors`). Returns the previous call's mark, for :func:`end_call`. Adapter tensors do not
    change during such a call: a hot-swap waits for running calls (:mod:`lsrfx.serving`)."""
    token = object()
    for _, module, param in layers:
        inference_factors(module, param)
        param.__dict__["_lsrfx_checked"] = token
    previous = _mark.token
    _mark.token = token
    return previous


def end_call(previous: object | None) -> None:
    """Restore the mark of the enclosing call (``None`` outside any)."""
    _mark.token = previous


def inference_factors(module: nn.Module, param: AdaptedWeight) -> tuple[Tensor, Tensor]:
    """The layer's factors kept for calls without gradients (see the module docstring), brought up to date."""
    token = _mark.token
    if token is not None and param.__dict__.get("_lsrfx_checked") is token:
        return param._buffers["lsrfx_A"], param._buffers["lsrfx_B"]
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
    for t in adapter_tensors(param.adapter):
        key.append((id(t), t.data_ptr(), t._version, t.dtype, t.device))
    if param.adapter.reads_base_weight:
        w0 = base_weight(module)
        key.append((id(w0), w0._version))
    return tuple(key)


def adapter_tensors(module: nn.Module) -> Iterator[Tensor]:
    """``module.parameters()`` without its generator machinery (this runs for every layer at every call without
    gradients); a module that lists its parameters its own way (CondLoRA's shared pair) is asked."""
    if type(module).named_parameters is not nn.Module.named_parameters:
        yield from module.parameters()
        return
    for t in module._parameters.values():
        if t is not None:
            yield t
    for child in module._modules.values():
        if child is not None:
            yield from adapter_tensors(child)


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
