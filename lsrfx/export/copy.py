"""An independent copy of an adapted model, safe to merge while the original keeps training.

``torch.nn.utils.parametrize`` gives each parametrized module a generated class that holds the ``weight`` property,
and ``copy.deepcopy`` shares that class between original and copy: ``remove_parametrizations`` on the copy would
then delete ``weight`` from the original's class too (DESIGN.md section 4). :func:`independent_copy` gives every
parametrized module of the copy its own class. Parameters and buffers that no adapter touches are shared with the
original instead of copied (merging never writes to them), so the copy costs memory only for the adapted layers.
"""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils import parametrize

from lsrfx.api import STATE_ATTR, remove_input_recorder, unwrap
from lsrfx.parametrization import adapted_layers, own_class


def independent_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (plain or compiled: the copy is the plain module) without lsrfx's bookkeeping.

    The copy's adapted layers (base weight, adapter parameters, parametrization classes) are its own; every other
    parameter and buffer is the original tensor. The copy has no ``AdaptState`` and no input-recording hook, so
    ``lsrfx.merge`` on it leaves the original adapted and trainable.
    """
    root = unwrap(model)
    state = getattr(root, STATE_ATTR, None)
    owned = {id(t) for _, module, _ in adapted_layers(root) for t in (*module.parameters(), *module.buffers())}
    memo: dict[int, object] = {id(t): t for t in (*root.parameters(), *root.buffers()) if id(t) not in owned}
    if state is not None:
        memo[id(state)] = None  # the copy gets no AdaptState (its last_inputs would be copied for nothing)
    clone = copy.deepcopy(root, memo)
    if STATE_ATTR in clone.__dict__:
        del clone.__dict__[STATE_ATTR]
    remove_input_recorder(clone)
    for module in clone.modules():
        if parametrize.is_parametrized(module):
            own_class(module)
    return clone

