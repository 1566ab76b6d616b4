"""Autocast rules for the adapted-linear ops, so that a compiled model under ``torch.autocast`` computes what the
linear layer it replaces would.

The compile pass puts ``lowrank_linear`` / ``lsr_linear`` / ``merged_linear`` where the captured graph had
``linear(x, compose(...))``. Under autocast, ``linear`` casts its input, weight and bias to the autocast dtype; a
custom op gets no such rule by default, so the op would see a bf16 activation beside an fp32 ``W0`` and fail. The
rule here does for each op what autocast does for ``linear``: it casts ``x``, ``W0`` and the bias to the autocast
dtype of the device (read at call time, so bf16 and fp16 autocast both work), leaves the adapter factors in their
own dtype (the ops compute the adapter term in the factors' dtype and cast it once to the output's, as ``compose``
casts ``dW``), and calls the op with autocast off below it. ``merged_linear`` is the exception: it forms
``W0 + dW`` from the factors, so its ``W0`` stays in the factors' dtype and the merged weight is cast for the matmul.
"""

from __future__ import annotations

import torch
from torch import Tensor

# op name -> indices of the arguments cast to the autocast dtype: (x, W0, bias) for the fused ops, (x, bias) for
# merged_linear, whose W0 joins the factors in W0 + dW.
CAST_ARGUMENTS: dict[str, tuple[int, ...]] = {
    "lowrank_linear": (0, 1, 2),
    "lsr_linear": (0, 1, 2),
    "merged_linear": (0, 2),
}
AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}  # the dispatch key of each device's autocast

_library = torch.library.Library("lsrfx", "FRAGMENT")  # noqa: TOR901 - registrations live for the process


def _rule(op_name: str, device: str):
    positions = CAST_ARGUMENTS[op_name]

    def kernel(*args):
        dtype = torch.get_autocast_dtype(device)
        args = tuple(a.to(dtype) if i in positions and isinstance(a, Tensor) and a.is_floating_point() else a
                     for i, a in enumerate(args))
        with torch.autocast(device, enabled=False):  # the op below runs without autocast, as linear's kernel does
            return getattr(torch.ops.lsrfx, op_name).default(*args)

    return kernel


def register() -> None:
    """Register the rules (once per process; the ops must be defined first)."""
    if getattr(register, "done", False):
        return
    for op_name in CAST_ARGUMENTS:
        for device, key in AUTOCAST_KEYS.items():
            if torch.amp.is_autocast_available(device):
                _library.impl(op_name, _rule(op_name, device), key)
    register.done = True
