"""Which body a fused op runs: the Triton kernels on CUDA, the torch reference elsewhere.

A ``triton_op`` body is traced by ``torch.compile``, so this choice is made per device at trace time; a
``register_kernel("cpu")`` fallback would be ignored under ``torch.compile`` (DESIGN.md section 3). Tests force
the Triton branch on CPU tensors in eager mode under ``TRITON_INTERPRET=1`` with :func:`force_triton`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import Tensor

from lsrfx.kernels.triton_lowrank import HAS_TRITON

_forced = False


@contextlib.contextmanager
def force_triton() -> Iterator[None]:
    """Run the Triton kernels on CPU tensors (eager, ``TRITON_INTERPRET=1`` only): for testing the kernels."""
    global _forced
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("force_triton() needs TRITON_INTERPRET=1 set before triton is imported.")
    previous, _forced = _forced, True
    try:
        yield
    finally:
        _forced = previous


def use_triton(x: Tensor) -> bool:
    """True on CUDA with triton installed, or when forced in eager mode under the interpreter."""
    if not HAS_TRITON:
        return False
    if x.is_cuda:
        return True
    return _forced and not torch.compiler.is_compiling()
