"""An independent copy of an adapted model, safe to merge while the original keeps training.

``torch.nn.utils.parametrize`` gives each parametrized module a generated class that holds the ``weight`` property,
and ``copy.deepcopy`` shares that class between original and copy: ``remove_parametrizations`` on the copy would
then delete ``weight`` from the original's class too (see ``docs/architecture.md``). :func:`independent_copy` gives
every parametrized module of the copy its own class. Parameters and buffers that no adapter touches are shared with
the original instead of copied (merging never writes to them), so the copy costs memory only for the adapted layers.
"""

from __future__ import annotations

import copy
import dataclasses

from torch import nn
from torch.nn.utils import parametrize

from lsrfx.api import adapt_state
from lsrfx.parametrization import adapted_layers, give_private_class
from lsrfx.recorder import stop_recording
from lsrfx.utils import unwrap


def independent_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (plain or compiled: the copy is the plain module) that records no inputs.

    The copy's adapted layers (base weight, adapter parameters, parametrization classes) are its own; every other
    parameter and buffer is the original tensor. ``lsrfx.merge`` on the copy leaves the original adapted and
    trainable: the copy's ``AdaptState`` lists no frozen parameters, since the ones ``adapt`` froze are shared with
    the original and must stay frozen there.
    """
    root = unwrap(model)
    owned = {id(t) for _, module, _ in adapted_layers(root) for t in (*module.parameters(), *module.buffers())}
    memo: dict[int, object] = {id(t): t for t in (*root.parameters(), *root.buffers()) if id(t) not in owned}
    state = adapt_state(root)
    if state is not None:
        memo[id(state)] = dataclasses.replace(state, frozen=[])
    clone = copy.deepcopy(root, memo)
    stop_recording(clone)
    for module in clone.modules():
        if parametrize.is_parametrized(module):
            give_private_class(module)
    return clone
