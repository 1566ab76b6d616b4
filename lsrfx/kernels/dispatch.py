"""Which body a fused op runs: the Triton kernels on CUDA (when measured faster), the torch reference elsewhere.

A ``triton_op`` body is traced by ``torch.compile``, so this choice is made per device at trace time; a
``register_kernel("cpu")`` fallback would be ignored under ``torch.compile`` (docs/architecture.md). On CUDA,
:func:`choose` times both bodies on the first call of each shape bucket and keeps the faster
(:mod:`lsrfx.kernels.kernel_choice`; ``LSRFX_KERNEL=triton|reference|auto`` overrides). Tests force the Triton
branch on CPU tensors in eager mode under ``TRITON_INTERPRET=1`` with :func:`force_triton`, optionally through
a chooser with a fake timer.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from lsrfx.kernels.kernel_choice import KernelChooser, kernel_mode
from lsrfx.kernels.triton_matmul import HAS_TRITON

_forced = False
_cpu_chooser: KernelChooser | None = None
CHOOSER = KernelChooser()  # the process-wide cache of measured choices on CUDA


@contextlib.contextmanager
def force_triton(chooser: KernelChooser | None = None) -> Iterator[None]:
    """Run the Triton kernels on CPU tensors (eager, ``TRITON_INTERPRET=1`` only): for testing the kernels.
    With ``chooser``, :func:`choose` asks it (e.g. one with a fake timer) as it would ask :data:`CHOOSER` on CUDA."""
    global _forced, _cpu_chooser
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("force_triton() needs TRITON_INTERPRET=1 set before triton is imported.")
    previous = _forced, _cpu_chooser
    _forced, _cpu_chooser = True, chooser
    try:
        yield
    finally:
        _forced, _cpu_chooser = previous


def use_triton(x: Tensor) -> bool:
    """True on CUDA with triton installed (unless ``LSRFX_KERNEL=reference``), or when forced in eager mode
    under the interpreter. No timing: :func:`choose` adds the measured choice."""
    if not HAS_TRITON:
        return False
    if x.is_cuda:
        return kernel_mode() != "reference"
    return _forced and not torch.compiler.is_compiling()


def choose(op: str, args: Sequence[object], triton: Callable[..., object], reference: Callable[..., object]) -> bool:
    """True when the body of op ``op`` should launch the Triton kernels for ``args``.

    ``triton(*args)`` and ``reference(*args)`` must compute the same result (the launcher called directly, and
    the reference function); on CUDA under ``LSRFX_KERNEL=auto`` both are timed once per shape bucket and the
    faster wins. Elsewhere this is :func:`use_triton` of the first tensor argument."""
    x = next(a for a in args if isinstance(a, Tensor))
    if not use_triton(x):
        return False
    if x.is_cuda:
        return CHOOSER.choose(op, args, triton, reference)
    return _cpu_chooser.choose(op, args, triton, reference) if _cpu_chooser is not None else True
