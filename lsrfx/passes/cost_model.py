"""Per-node choice between the fused factored form, the merged weight and materialising ``dW``: a roofline.

Each choice is charged the time of the work it adds to the frozen-base layer, ``flops / PEAK + bytes / BANDWIDTH``
(``M`` tokens, ``K = d_in``, ``N = d_out``, rank ``r``, ``e`` bytes per element):

* **fused** (``dW`` never exists) adds skinny rank-``r`` products over all tokens, each a pass over an ``M x K`` or
  ``M x N`` operand: forward ``x @ A.T`` and ``v @ B.T`` (whose result is written, then added), backward
  ``grad @ B``, ``u.T @ x``, ``grad.T @ v`` (``v`` is saved by the forward), and ``u @ A`` into the input gradient
  when ``x`` needs one. Training: ``2Mr(2K + 3N)`` flops (``+ 2MrK`` with the input gradient), i.e. about
  ``6Mr(K + N)``, and ``e M (2K + 4N)`` bytes (``+ 2eMK``). At rank 8 that is 4 flops per byte: memory-bound.
* **merged** (``lsrfx::merged_linear``, training only) forms ``W0 + dW`` (``2NKr`` flops, ``2NK`` elements: read
  ``W0``, write the sum) for the forward matmul and again for the input gradient's, so neither pass carries a
  rank-``r`` product, and computes the factor gradients from four rank-``r`` products over the tokens
  (``grad @ B``, ``u.T @ x``, ``x @ A.T``, ``grad.T @ v``: ``4Mr(K + N)`` flops, ``2eM(K + N)`` bytes). Against
  fused it trades two passes over the tokens for two weight-sized ones, so it wins once the tokens outnumber the
  layer's width (``M > K`` for a square layer). Only where the fused op's forward runs separate BLAS calls (the
  CPU; :attr:`Machine.merges`) and where ``W0`` and the factors share a dtype.
* **materialised** adds the dense weight gradient ``grad.T @ x`` (``2MNK`` flops, ``e (M (N + K) + NK)`` bytes:
  as much compute as the layer's own forward), forming ``W0 + dW`` and the ``A``/``B`` gradients from the dense
  one (``6NKr`` flops, about ``6NK`` elements moved); it is the cheapest only for narrow layers of large rank
  (``r`` above about ``K / 4``). Without a backward (inference) only forming ``W0 + dW`` (``2NKr`` flops, ``4NK``
  elements) against the forward products (``2Mr(K + N)`` flops, ``e M (K + 2N)`` bytes).
* the method's **factor cost** (forming ``A`` and ``B`` from the adapter's parameters, e.g. LSR's Kronecker sums
  or CondLoRA's ``C_A @ W0.T``, and chaining their gradients) is the same for every choice, so it never moves the
  decision; it is part of each time so that ``explain`` shows what the adapter costs in all.

The cheapest wins (ties: fused, then merged). Every time is affine in ``M``, the fused one through the origin, so
the rule is monotone in the tokens by construction: it fuses below one token count and merges or materialises
above it, and that threshold grows with the layer's width (the other two grow like ``NK``, the fused work like
``K + N``).

The two constants are per device type (:data:`MACHINES`): ``peak`` is the flop rate of large fp32 matmuls,
``bandwidth`` the bytes per second that skinny rank-``r`` products stream through their wide operand (on CPU far
below the memory's, so ~19 flops per byte separate the two regimes). The CPU defaults were measured on this
project's 2-core CPU machine with ``python bench/fit_cost_model.py --cpu-time`` (its docstring has the method,
``bench/README.md`` the figures and the decisions they give); the CUDA ones are nominal A100-class figures, not
measured. On CUDA the fused kernel computes ``x @ A.T`` inside the base matmul's K-loop
and merged is not a candidate. ``LSRFX_FUSE=always|merged|never`` overrides the rule (it is part of the pass's
uuid, so cached graphs follow it).
"""

from __future__ import annotations

from dataclasses import dataclass

from lsrfx.settings import fuse_policy

UNKNOWN_TOKENS = 4096  # assumed token count when a dynamic size has no hint


@dataclass(frozen=True)
class Machine:
    """The roofline's two constants: ``peak`` flop/s of large matmuls, ``bandwidth`` bytes/s of skinny ones; and
    whether ``merged`` is a candidate there (not where the fused op's kernel computes ``x @ A.T`` inside the base
    matmul's K-loop, i.e. on CUDA, so that merging would save no pass over the tokens)."""

    peak: float
    bandwidth: float
    merges: bool = True

    def seconds(self, flops: float, nbytes: float) -> float:
        return flops / self.peak + nbytes / self.bandwidth


# Per device type; anything else uses the CPU figures. See the module docstring for where they come from.
MACHINES = {"cpu": Machine(peak=1.7e11, bandwidth=9.0e9),
            "cuda": Machine(peak=1.5e14, bandwidth=1.5e12, merges=False)}

# A factor formed by a small 2-D matrix product (CondLoRA's C_A @ W0.T) is rewritten by the pass as a broadcast
# product summed over the inner dimension, which Inductor generates as a reduction fused into kernels the step
# launches anyway, instead of one BLAS call forward and one backward. The reduction form is slower per flop than
# BLAS, close at small sizes and far behind at large ones (bench/README.md, "The cost model"), and it is code
# generated and compiled for every layer, so a cold compile grows with depth. Up to this many flops (2 r d^2 for
# d ~ 440 at r = 8: BERT-size layers) the launches saved are worth it; at d = 1024 the product is twice as slow as
# BLAS and a compiled step gains nothing from it.
SMALL_PRODUCT_FLOPS = 3 * 2**20

RULE = "roofline: the cheapest of fused, merged and materialised (lsrfx/passes/cost_model.py)"
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
    same_dtype: bool = True  # W0 and the factors share a dtype (else merging would round dW to W0's precision)


@dataclass(frozen=True)
class Costs:
    """Seconds of extra work per step for each choice (``factors`` is included in each); ``merged`` is None where
    it is not a candidate (no backward, a device whose fused kernel needs no extra pass, mixed dtypes)."""

    fused: float
    merged: float | None
    materialised: float
    factors: float


def costs(shape: Shape) -> Costs:
    """What each choice adds to the frozen layer; see the module docstring for the formulas."""
    m, k, n, r, e = shape.tokens, shape.d_in, shape.d_out, shape.rank, shape.elem_bytes
    machine = MACHINES.get(shape.device, MACHINES["cpu"])
    merged = None
    if shape.training:
        grad_x = 1 if shape.input_grad else 0
        fused = machine.seconds(2 * m * r * (2 * k + 3 * n + grad_x * k), e * m * (2 * k + 4 * n + grad_x * 2 * k))
        dense_grad = machine.seconds(2 * m * n * k, e * (m * (n + k) + n * k))
        materialised = dense_grad + machine.seconds(6 * n * k * r, e * 6 * n * k)
        factors = machine.seconds(3 * shape.factor_flops, 0)  # forward, and the two products of its backward
        if machine.merges and shape.same_dtype:
            forms = 1 + grad_x  # W0 + dW in the forward, again for the input gradient
            merged = machine.seconds(forms * 2 * n * k * r + 4 * m * r * (k + n),
                                     e * (forms * 2 * n * k + 2 * m * (k + n)))
    else:
        fused = machine.seconds(2 * m * r * (k + n), e * m * (k + 2 * n))
        materialised = machine.seconds(2 * n * k * r, e * 4 * n * k)
        factors = machine.seconds(shape.factor_flops, 0)
    return Costs(fused + factors, None if merged is None else merged + factors, materialised + factors, factors)


def product_as_reduction(flops: int) -> bool:
    """True when a factor's small matrix product should be generated as a reduction (see SMALL_PRODUCT_FLOPS)."""
    return flops <= SMALL_PRODUCT_FLOPS


def decide(shape: Shape | None) -> tuple[str, str]:
    """``("fused" | "merged" | "materialised", reason)`` for one node."""
    mode = fuse_policy()
    if mode == "always":
        return "fused", "LSRFX_FUSE=always"
    if mode == "never":
        return "materialised", "LSRFX_FUSE=never"
    if mode == "merged":
        if shape is not None and not shape.same_dtype:
            return "fused", "LSRFX_FUSE=merged, but W0 and the factors differ in dtype (merging would round dW)"
        return "merged", "LSRFX_FUSE=merged"
    if shape is None:
        return "fused", "shapes unknown; fused by default (never forms dW)"
    c = costs(shape)
    what = "training" if shape.training else "no grad"
    dims = f"{what}, {shape.tokens} tokens, {shape.d_out}x{shape.d_in}, r={shape.rank}"
    times = f"fused ~{c.fused * 1e6:.0f} us"
    if c.merged is not None:
        times += f" vs merged ~{c.merged * 1e6:.0f} us"
    times += f" vs materialised ~{c.materialised * 1e6:.0f} us"
    if c.factors:
        times += f", each incl. factors ~{c.factors * 1e6:.0f} us"
    candidates = {"fused": c.fused, "merged": c.merged, "materialised": c.materialised}
    action = min((name for name, t in candidates.items() if t is not None), key=candidates.__getitem__)  # ties: fused
    if action == "fused":
        why = "skips the dense weight gradient" if shape.training else "rank-r products cheaper than forming dW"
        if c.merged is not None:
            why += " and forming W0 + dW"
    elif action == "merged":
        why = "one matmul through W0 + dW, factor gradients from rank-r products"
    else:
        why = "the dense weight gradient is cheaper here" if shape.training else "forming dW once is cheaper"
    return action, f"{dims}: {times}; {why}"
