"""How an adapted layer appears in a ``state_dict``, so that checkpoints work with tools that know nothing of lsrfx.

An adapted layer's own entries are ``parametrizations.weight.original`` (``W0``) and the adapter tensors
(``parametrizations.weight.0.adapter.*``); a plain model of the same architecture expects ``weight``. Two hooks,
registered on each adapted layer by ``adapt`` and removed by ``merge``:

* saving (:func:`add_merged_weight`): the ``state_dict`` also carries ``weight`` = ``W0 + dW`` (detached), the
  weight the adapted forward reads. A plain model (``from_pretrained`` of a Hugging Face checkpoint,
  ``load_state_dict(..., strict=False)``) then loads the trained weights instead of re-initialising the layer; a
  strict load into a plain model fails loudly on the adapter keys. The cost: each adapted weight is stored twice.
  Skipped for sharded ``DTensor`` weights (FSDP2): gathering them would be a collective inside ``state_dict``.
* loading (:func:`route_weight_key`): next to ``parametrizations.weight.original``, the merged ``weight`` is
  derived data and is dropped, so an adapted checkpoint loads strictly into an adapted model (Trainer's resume,
  ``torch.save(model.state_dict())``). A lone ``weight`` is a base checkpoint's: it is loaded as ``W0`` and the
  adapter keeps its values, so a base ``state_dict`` loads strictly into an adapted model (e.g. after ``to_empty``).

Both hooks are module-level functions found by identity (:func:`remove_hooks`), so they survive ``copy.deepcopy``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lsrfx.errors import LsrfxError
from lsrfx.parametrization import ORIGINAL_KEY, PARAMETRIZATIONS_KEY, AdaptedWeight, weight_parametrizations

ORIGINAL, ADAPTER_PREFIX = ORIGINAL_KEY, PARAMETRIZATIONS_KEY


def _is_sharded(t: Tensor) -> bool:
    return hasattr(t, "device_mesh")  # a DTensor (FSDP2), without importing torch.distributed


def add_merged_weight(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """``state_dict`` post-hook: store the adapted weight ``W0 + dW`` under ``prefix + "weight"``."""
    if any(_is_sharded(p) for p in weight_parametrizations(module).parameters()):
        return
    with torch.no_grad():
        state_dict[prefix + "weight"] = module.weight.detach()


def route_weight_key(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                     missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """``load_state_dict`` pre-hook: drop a merged ``weight`` saved next to ``W0``, or load a lone (base) ``weight``
    as ``W0`` and keep the adapter's current values for the keys a base checkpoint lacks."""
    weight, original = prefix + "weight", prefix + ORIGINAL
    if weight not in state_dict:
        return
    if original in state_dict:
        del state_dict[weight]
        return
    own = {prefix + ADAPTER_PREFIX + n: p for n, p in weight_parametrizations(module).named_parameters()
           if n != "original"}
    present = sorted(k for k in own if k in state_dict)
    if present:
        raise LsrfxError(
            f"the state_dict for layer '{prefix[:-1]}' holds '{weight}' and adapter tensors (e.g. '{present[0]}') "
            f"but no '{original}', so it cannot tell whether 'weight' is the base W0 or the merged W0 + dW; "
            "load a complete adapted state_dict or a plain base one."
        )
    base = state_dict[original] = state_dict.pop(weight)
    if not base.is_meta and any(p.is_meta for p in own.values()):
        # load_state_dict(base, assign=True) into a meta-device model: the adapters get the base weight's device
        # and their method's init (AdaptedWeight re-initialises what it moves off meta).
        for parametrization in weight_parametrizations(module):
            if isinstance(parametrization, AdaptedWeight):
                parametrization.to_empty(device=base.device)
        own = {k: module.get_parameter(k[len(prefix):]) for k in own}
    for key, p in own.items():
        state_dict[key] = p.detach()


HOOKS = (add_merged_weight, route_weight_key)


def install_hooks(module: nn.Module) -> None:
    """Register both hooks on one adapted layer."""
    module.register_state_dict_post_hook(add_merged_weight)
    module.register_load_state_dict_pre_hook(route_weight_key)


def remove_hooks(module: nn.Module) -> None:
    """Remove lsrfx's hooks from a layer (also from a deep copy, whose hook tables hold the same functions)."""
    for table in (module._state_dict_hooks, module._load_state_dict_pre_hooks):
        for key, hook in list(table.items()):
            if getattr(hook, "hook", hook) in HOOKS:  # load pre-hooks are wrapped in torch's _WrappedHook
                del table[key]
