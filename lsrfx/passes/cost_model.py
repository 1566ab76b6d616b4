"""Per-node choice between the fused factored form and materialising ``dW = s * B @ A``.

Extra work each form adds to the plain frozen-base layer (``M`` tokens, ``K = d_in``, ``N = d_out``, rank ``r``):

* materialised: forming ``dW`` costs ``~2NKr`` regardless of ``M``; in training its backward also needs the dense
  weight gradient ``grad.T @ x`` (``2MNK``, as much as the layer's forward) and keeps ``W0 + dW`` alive;
* fused: rank-``r`` products over all tokens: ``2Mr(K+N)`` forward, about ``5Mr(K+N)`` more in training. Such
  skinny products are memory-bound, each one a full pass over ``x`` or ``grad``.

Measured on the development machine (2 shared, noisy CPU cores; Inductor; fp32; r = 8; one layer, forward +
backward with the input gradient; median of interleaved rounds; ``python -m lsrfx.passes.cost_model`` re-runs it):

    d x d layer, M tokens     fused / materialised time
                 M=256   M=2048  M=8192
    d=32          0.95    1.56    4.91
    d=64          0.79    5.79    4.28
    d=128         0.15    2.03    2.12
    d=256         0.12    1.19    1.75
    d=384         0.45    0.38    1.15
    d=768         1.38    1.08    0.96

On these CPUs the rank-r products are memory-bound and cost about as much per token as a narrow dense matmul, so
materialising wins for narrow layers fed many tokens. Rule (MEASURED_RULE), training: fuse iff
``tokens * r <= 64 * min(d_in, d_out)``. Without grad (inference) the rule is the flop count, not a measurement:
materialise iff ``tokens * (d_in + d_out) > d_in * d_out``. On CUDA the fused Triton kernel reads ``x`` once for
both products, which moves the break-even towards fusing; re-measure there. ``LSRFX_FUSE=always|never`` overrides
the rule (it is part of the pass's uuid, so cached graphs follow it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

UNKNOWN_TOKENS = 4096  # assumed token count when a dynamic size has no hint

# Training: fuse iff tokens * r <= TRAIN_TOKENS_PER_WIDTH * min(d_in, d_out) (measured, see above).
TRAIN_TOKENS_PER_WIDTH = 64
# No grad: materialise iff tokens * (d_in + d_out) > INFER_TOKEN_FACTOR * d_in * d_out (flop count).
INFER_TOKEN_FACTOR = 1.0

MEASURED_RULE = (
    f"training: fuse iff tokens * r <= {TRAIN_TOKENS_PER_WIDTH} * min(d_in, d_out); "
    f"no grad: materialise iff tokens * (d_in + d_out) > {INFER_TOKEN_FACTOR:g} * d_in * d_out"
)


@dataclass(frozen=True)
class Shape:
    """One adapted node as the cost model sees it."""

    tokens: int
    d_in: int
    d_out: int
    rank: int
    training: bool  # adapter factors require grad (a backward will run)


def policy() -> str:
    """``auto`` (the measured rule), ``always`` (fuse every node) or ``never`` (materialise every node)."""
    value = os.environ.get("LSRFX_FUSE", "auto").strip().lower()
    if value not in ("auto", "always", "never"):
        raise ValueError(f"LSRFX_FUSE={value!r}: use auto, always or never.")
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
    m, k, n, r = shape.tokens, shape.d_in, shape.d_out, shape.rank
    dims = f"{m} tokens, {n}x{k}, r={r}"
    if shape.training:
        if m * r <= TRAIN_TOKENS_PER_WIDTH * min(k, n):
            return "fused", f"training, {dims}: tokens*r <= {TRAIN_TOKENS_PER_WIDTH}*width, skips the dense weight grad"
        return "materialised", f"training, {dims}: tokens*r > {TRAIN_TOKENS_PER_WIDTH}*width, dense dW is cheaper here"
    if m * (k + n) > INFER_TOKEN_FACTOR * n * k:
        return "materialised", f"no grad, {dims}: many tokens, forming dW once is cheaper"
    return "fused", f"no grad, {dims}: few tokens, rank-r products are cheaper than forming dW"


def measure(widths: tuple[int, ...] = (32, 64, 128, 256, 384, 768), tokens: tuple[int, ...] = (256, 2048, 8192),
            rank: int = 8, rounds: int = 9) -> list[tuple[int, int, float, float]]:
    """Time one compiled layer's forward + backward, fused vs materialised, interleaved over ``rounds``:
    ``[(d, tokens, fused_ms, materialised_ms)]`` (medians). This is how the rule above was obtained."""
    import statistics
    import time

    import torch

    import lsrfx.kernels  # noqa: F401

    torch._dynamo.config.recompile_limit = 10_000
    torch._dynamo.config.accumulated_recompile_limit = 10_000

    def step_fn(fused: bool, d: int, m: int):
        x = torch.randn(m, d, requires_grad=True)
        w, bias, g = torch.randn(d, d), torch.randn(d), torch.randn(m, d)
        a, b = torch.randn(rank, d, requires_grad=True), torch.randn(d, rank, requires_grad=True)

        def f(x, w, bias, a, b):
            if fused:
                return torch.ops.lsrfx.lowrank_linear(x, w, bias, a, b, 0.5, False)
            return torch.nn.functional.linear(x, torch.ops.lsrfx.compose(w, a, b, 0.5, False), bias)

        cf = torch.compile(f, dynamic=False)
        return lambda: cf(x, w, bias, a, b).backward(g)

    rows = []
    for d in widths:
        for m in tokens:
            steps = {"fused": step_fn(True, d, m), "materialised": step_fn(False, d, m)}
            times: dict[str, list[float]] = {k: [] for k in steps}
            for s in steps.values():
                s()
                s()
            for _ in range(rounds):
                for k, s in steps.items():
                    t0 = time.perf_counter()
                    s()
                    times[k].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            rows.append((d, m, med["fused"], med["materialised"]))
            print(f"d={d} tokens={m}: fused {med['fused']:.3f} ms, materialised {med['materialised']:.3f} ms, "
                  f"ratio {med['fused'] / med['materialised']:.2f}", flush=True)
    return rows


if __name__ == "__main__":
    measure()
