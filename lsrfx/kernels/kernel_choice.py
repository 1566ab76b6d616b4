"""The measured choice between a fused op's two bodies on CUDA: lsrfx's Triton kernels, or the reference (cuBLAS
base matmul plus the small adapter matmuls), like Inductor's max-autotune choosing between its candidates.

The first call of an op for a new (shape bucket, dtypes, device) times both bodies and keeps the faster; the
answer is cached for the process. ``LSRFX_KERNEL=triton|reference|auto`` overrides (default ``auto``).

When the timing happens (the design decision):

* **Eager**: on the first call, on the call's own arguments (the ops are pure functions, so running both bodies
  a few times has no effect but time; the Triton side's autotuning happens in the timer's warm-up).
* **Under** ``torch.compile`` the op bodies are traced with fake tensors, which cannot be timed. A choice already
  cached by an eager call is reused; otherwise both bodies are timed at trace time on real random tensors of
  the same sizes, strides, dtypes and device, outside the fake and tracing modes, as max-autotune does. The
  compiled graph keeps the branch it traced, so with dynamic shapes the choice made for the traced size serves
  every size the graph runs at.
* **Not timed** (Triton is used, nothing cached): while a CUDA graph is being captured, or when a symbolic size
  has no hint.

The token count is bucketed to its next power of two (as the kernels' autotune key is), so a new sequence
length does not re-time; weights' shapes, dtypes, flags and the device are exact parts of the key.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lsrfx.kernels.tile_configs import token_bucket
from lsrfx.settings import kernel_mode

log = logging.getLogger("lsrfx.kernels")

Timer = Callable[[Callable[[], object]], float]  # seconds per call of a zero-argument function
Body = Callable[..., object]


def cuda_timer(fn: Callable[[], object]) -> float:
    """Median seconds per call on the current CUDA device (``triton.testing.do_bench``: warm-up, L2 flush)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=40, return_mode="median") / 1e3


@dataclass(frozen=True)
class Choice:
    """One decision: which body won for a key, and the times it was decided on."""

    op: str
    winner: str  # "triton" or "reference"
    triton_seconds: float
    reference_seconds: float


def _hint(size: int | torch.SymInt) -> int | None:
    """A concrete size: the int itself, or a symbolic size's hint (``None`` when it has none)."""
    if isinstance(size, int):
        return size
    return getattr(size.node, "hint", None)


def _tokens(tensor: Tensor) -> int | None:
    sizes = [_hint(s) for s in tensor.shape[:-1]]
    return None if None in sizes else math.prod(sizes)


def choice_key(op: str, args: Sequence[object]) -> tuple | None:
    """The cache key of a call: op, device, token bucket of the first tensor, and each argument's dtype and shape
    (a tensor's leading token dims as ``"tokens"``); ``None`` when a size is symbolic without a hint."""
    first = next(a for a in args if isinstance(a, Tensor))
    tokens = _tokens(first)
    if tokens is None:
        return None
    parts: list[object] = [op, str(first.device), token_bucket(tokens)]
    for arg in args:
        if isinstance(arg, Tensor):
            shape = tuple(_hint(s) for s in arg.shape)
            if None in shape:
                return None
            if arg.dim() >= 2 and _tokens(arg) == tokens:
                shape = ("tokens", shape[-1])
            parts.append((str(arg.dtype), shape))
        elif arg is None or isinstance(arg, bool):
            parts.append(arg)
        else:
            parts.append(type(arg).__name__)  # scalars such as the scale do not change the cost
    return tuple(parts)


def _is_fake(tensor: Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(tensor)


def _real_like(tensor: Tensor) -> Tensor:
    """A real tensor with ``tensor``'s (hinted) sizes, strides, dtype and device, filled with small randoms."""
    size = [_hint(s) for s in tensor.shape]
    stride = [_hint(s) for s in tensor.stride()]
    real = torch.empty_strided(size, stride, dtype=tensor.dtype, device=tensor.device)
    return real.uniform_(-1, 1) if real.is_floating_point() else real.zero_()


class KernelChooser:
    """Times the two bodies of an op once per key and remembers the faster (per process)."""

    def __init__(self, timer: Timer | None = None) -> None:
        self.timer = timer or cuda_timer
        self.choices: dict[tuple, Choice] = {}

    def choose(self, op: str, args: Sequence[object], triton: Body, reference: Body) -> bool:
        """True to run ``triton(*args)``, False for ``reference(*args)``; see the module docstring."""
        mode = kernel_mode()
        if mode != "auto":
            return mode == "triton"
        key = choice_key(op, args)
        if key is None or _capturing(args):
            return True
        if key not in self.choices:
            self.choices[key] = self._measure(op, args, triton, reference)
        return self.choices[key].winner == "triton"

    def _measure(self, op: str, args: Sequence[object], triton: Body, reference: Body) -> Choice:
        from torch.utils._python_dispatch import _disable_current_modes

        tracing = any(isinstance(a, Tensor) and _is_fake(a) for a in args)
        # Outside fake/functional/proxy modes: the timed calls run on real tensors and are not traced.
        with _disable_current_modes(), torch.no_grad():
            real = [_real_like(a) if tracing and isinstance(a, Tensor) else a for a in args]
            triton_seconds = self.timer(lambda: triton(*real))
            reference_seconds = self.timer(lambda: reference(*real))
        winner = "triton" if triton_seconds <= reference_seconds else "reference"
        log.info("lsrfx %s: %s (Triton %.1f us, reference %.1f us%s)", op, winner, triton_seconds * 1e6,
                 reference_seconds * 1e6, ", timed at trace time" if tracing else "")
        return Choice(op, winner, triton_seconds, reference_seconds)


def _capturing(args: Sequence[object]) -> bool:
    """A CUDA graph is being captured on the current stream: timing (which synchronises) is not allowed."""
    cuda = any(isinstance(a, Tensor) and a.is_cuda for a in args)
    return cuda and torch.cuda.is_current_stream_capturing()
