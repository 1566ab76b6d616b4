"""Per-node choice between the fused factored form and materialising ``dW = s * B @ A``: a two-constant roofline.

Each choice is charged the time of the work it adds to the frozen-base layer, ``flops / PEAK + bytes / BANDWIDTH``
(``M`` tokens, ``K = d_in``, ``N = d_out``, rank ``r``, ``e`` bytes per element):

* **fused** (``dW`` never exists) adds skinny rank-``r`` products over all tokens, each a pass over an ``M x K`` or
  ``M x N`` operand: forward ``x @ A.T`` and ``v @ B.T`` (whose result is written, then added), backward
  ``grad @ B``, ``u.T @ x``, ``grad.T @ v`` (``v`` is saved by the forward), and ``u @ A`` into the input gradient
  when ``x`` needs one. Training: ``2Mr(2K + 3N)`` flops (``+ 2MrK`` with the input gradient), i.e. about
  ``6Mr(K + N)``, and ``e M (2K + 4N)`` bytes (``+ 2eMK``). At rank 8 that is 4 flops per byte: memory-bound.
* **materialised** adds the dense weight gradient ``grad.T @ x`` (``2MNK`` flops, ``e (M (N + K) + NK)`` bytes:
  as much compute as the layer's own forward), forming ``W0 + dW`` and the ``A``/``B`` gradients from the dense
  one (``6NKr`` flops, about ``6NK`` elements moved). Without a backward (inference) only forming ``W0 + dW``
  (``2NKr`` flops, ``4NK`` elements) against the forward products (``2Mr(K + N)`` flops, ``e M (K + 2N)`` bytes).
* the method's **factor cost** (forming ``A`` and ``B`` from the adapter's parameters, e.g. LSR's Kronecker sums
  or CondLoRA's ``C_A @ W0.T``, and chaining their gradients) is the same for both choices, so it never moves the
  decision; it is part of both times so that ``explain`` shows what the adapter costs in all.

Fuse iff fused time <= materialised time. Both times are affine in ``M`` with the fused one through the origin, so
the rule is monotone by construction: it fuses below one token count and materialises above it, and that
threshold grows with the layer's width (the dense gradient grows like ``NK``, the fused work like ``K + N``).

The two constants are per device type (:data:`MACHINES`): ``peak`` is the flop rate of large fp32 matmuls,
``bandwidth`` the bytes per second that skinny rank-``r`` products stream through their wide operand (on CPU far
below the memory's, so ~19 flops per byte separate the two regimes). The CPU defaults were measured on this
project's 2-core AMD EPYC (Zen 4) machine with ``python bench/cost_model.py --cpu-time`` (its docstring has the
method); the CUDA ones are nominal A100-class figures, not measured. With the CPU defaults, at 2,048 tokens every
method's default rank fuses at hidden 384 and 1,024 (GenLoRA's r = 32 at 384: its fused flops are half the dense
weight gradient's, its extra bytes make up the rest, ~4.6 vs ~4.8 ms; it materialises from about 3,500 tokens),
and a 64-wide layer fed 8,192 tokens materialises. ``LSRFX_FUSE=always|never`` overrides the rule (it
is part of the pass's uuid, so cached graphs follow it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from lsrfx.errors import LsrfxError

UNKNOWN_TOKENS = 4096  # assumed token count when a dynamic size has no hint


@dataclass(frozen=True)
class Machine:
    """The roofline's two constants: ``peak`` flop/s of large matmuls, ``bandwidth`` bytes/s of skinny ones."""

    peak: float
    bandwidth: float

    def seconds(self, flops: float, nbytes: float) -> float:
        return flops / self.peak + nbytes / self.bandwidth


# Per device type; anything else uses the CPU figures. See the module docstring for where they come from.
MACHINES = {"cpu": Machine(peak=1.7e11, bandwidth=9.0e9), "cuda": Machine(peak=1.5e14, bandwidth=1.5e12)}

# A factor formed by a small 2-D matrix product (CondLoRA's C_A @ W0.T) is rewritten by the pass as a broadcast
# product summed over the inner dimension, which Inductor generates as a reduction fused into kernels the step
# launches anyway, instead of one BLAS call forward and one backward. Measured (one thread, CPU time, r = 8, this
# CPU): forward + backward of the reduction form 254 us vs 232 us for BLAS at d = 384, 3.4 vs 1.7 ms at d = 1024,
# 46 vs 6 ms at d = 2048. Up to this many flops (2 r d^2 for d = 1024, r = 8) the few hundred microseconds are
# worth the launches saved; beyond, BLAS wins by far.
SMALL_PRODUCT_FLOPS = 2**24

RULE = "roofline: fuse iff the fused products' time <= the materialised dense gradient's (lsrfx/passes/cost_model.py)"
MEASURED_RULE = RULE  # the name lsrfx.explain reads


@dataclass(frozen=True)
class Shape:
    """One adapted node as the cost model sees it."""

    tokens: int
    d_in: int
    d_out: int
    rank: int
    training: bool  # adapter factors require grad (a backward will run)
    input_grad: bool = True  # x requires grad (the backward also forms grad_x)
    elem_bytes: int = 4  # bytes per element of x and W0
    factor_flops: float = 0.0  # forming A and B from the adapter's parameters, once (forward)
    device: str = "cpu"


def costs(shape: Shape) -> tuple[float, float, float]:
    """``(fused, materialised, factors)`` seconds of extra work per step (``factors`` included in both)."""
    m, k, n, r, e = shape.tokens, shape.d_in, shape.d_out, shape.rank, shape.elem_bytes
    machine = MACHINES.get(shape.device, MACHINES["cpu"])
    if shape.training:
        grad_x = 1 if shape.input_grad else 0
        fused = machine.seconds(2 * m * r * (2 * k + 3 * n + grad_x * k), e * m * (2 * k + 4 * n + grad_x * 2 * k))
        dense_grad = machine.seconds(2 * m * n * k, e * (m * (n + k) + n * k))
        materialised = dense_grad + machine.seconds(6 * n * k * r, e * 6 * n * k)
        factors = machine.seconds(3 * shape.factor_flops, 0)  # forward, and the two products of its backward
    else:
        fused = machine.seconds(2 * m * r * (k + n), e * m * (k + 2 * n))
        materialised = machine.seconds(2 * n * k * r, e * 4 * n * k)
        factors = machine.seconds(shape.factor_flops, 0)
    return fused + factors, materialised + factors, factors


def product_as_reduction(flops: int) -> bool:
    """True when a factor's small matrix product should be generated as a reduction (see SMALL_PRODUCT_FLOPS)."""
    return flops <= SMALL_PRODUCT_FLOPS


def policy() -> str:
    """``auto`` (the roofline rule), ``always`` (fuse every node) or ``never`` (materialise every node)."""
    value = os.environ.get("LSRFX_FUSE", "auto").strip().lower()
    if value not in ("auto", "always", "never"):
        raise LsrfxError(f"LSRFX_FUSE={value!r} is not a fusion policy: set it to auto (the roofline rule), always "
                         f"or never, or unset it.")
    return value


def decide(shape: Shape | None) -> tuple[str, str]:
    """``("fused" | "materialised", reason)`` for one node."""
    mode = policy()
    if mode == "always":
        return "fused", "LSRFX_FUSE=always"
    if mode == "never":
        return "materialised", "LSRFX_FUSE=never"
    if shape is None:
        return "fused", "shapes unknown; fused by default (never forms dW)"
    fused, materialised, factors = costs(shape)
    what = "training" if shape.training else "no grad"
    dims = f"{what}, {shape.tokens} tokens, {shape.d_out}x{shape.d_in}, r={shape.rank}"
    times = f"fused ~{fused * 1e6:.0f} us vs materialised ~{materialised * 1e6:.0f} us"
    if factors:
        times += f", both incl. factors ~{factors * 1e6:.0f} us"
    if fused <= materialised:
        why = "skips the dense weight gradient" if shape.training else "rank-r products cheaper than forming dW"
        return "fused", f"{dims}: {times}; {why}"
    why = "the dense weight gradient is cheaper here" if shape.training else "forming dW once is cheaper"
    return "materialised", f"{dims}: {times}; {why}"
