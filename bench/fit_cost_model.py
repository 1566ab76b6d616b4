"""Measure the two machine constants of the fusion cost model, and show the decisions they give.

``lsrfx/passes/cost_model.py`` charges each choice (fused rank-``r`` products, the merged weight ``W0 + dW`` with
rank-``r`` factor gradients, or materialising ``W0 + dW`` with its dense weight gradient)
``flops / PEAK + bytes / BANDWIDTH``. This script estimates both constants with plain
matmuls:

* ``PEAK``: a 1024 x 1024 x 1024 fp32 matmul (compute-bound), ``2 * 1024**3`` flops per call;
* ``BANDWIDTH``: the skinny product ``x @ A.T`` with ``x``: 8192 x 1024 fp32 (32 MB, more than the last-level
  cache) and ``A``: 8 x 1024, charged the bytes of ``x`` (the pass over the wide operand every rank-``r``
  product makes).

Each is the median over ``--reps`` calls after a warm-up, wall time at torch's thread count: run it on a quiet
machine. On a shared one, ``--cpu-time`` times one thread by its process CPU time (insensitive to being
descheduled) and multiplies by the core count, an estimate that assumes both rates scale with cores.

Then it prints the decision and the three times for the benchmark's layers and a few narrow ones (``--tokens``,
``--widths``, ``--ranks``). ``--validate`` also times one compiled layer's forward + backward each way
(Inductor, ``dynamic=False``) for the same shapes, to compare the model's ratios with the measured ones.

Figures behind the CPU defaults in ``lsrfx/passes/cost_model.py`` (2-core AMD EPYC Zen 4 VM, torch 2.13,
``--cpu-time`` while other jobs ran, so an estimate; two runs): one core 8.6-8.7e10 flop/s on the large matmul
and 4.4-4.6e9 B/s on the skinny product, i.e. ``peak = 1.7e11``, ``bandwidth = 9.0e9`` for the two cores. The
decisions depend on the ratio of the two (~19 flops per byte) more than on either.

    python bench/fit_cost_model.py                       # constants (wall time) and the decision table
    python bench/fit_cost_model.py --cpu-time            # constants on a shared machine (estimate)
    python bench/fit_cost_model.py --validate --widths 64 384 --tokens 2048 8192
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

import lsrfx.kernels  # noqa: F401  (registers torch.ops.lsrfx.*)
from lsrfx.passes import cost_model


def median_seconds(fn: Callable[[], object], reps: int, clock: Callable[[], float]) -> float:
    fn()
    fn()
    times = []
    for _ in range(reps):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


def measure_constants(reps: int, cpu_time: bool) -> cost_model.Machine:
    """``Machine(peak, bandwidth)`` from a large square matmul and a skinny rank-8 product."""
    clock, scale = time.perf_counter, 1
    if cpu_time:
        torch.set_num_threads(1)
        clock, scale = time.process_time, os.cpu_count() or 1
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    x, f = torch.randn(8192, 1024), torch.randn(8, 1024)
    peak = 2 * 1024**3 / median_seconds(lambda: a @ b, reps, clock)
    bandwidth = x.numel() * x.element_size() / median_seconds(lambda: x @ f.t(), reps, clock)
    return cost_model.Machine(peak=peak * scale, bandwidth=bandwidth * scale)


def layer_step(choice: str, d: int, m: int, rank: int) -> Callable[[], None]:
    """One compiled forward + backward (input gradient included) of a ``d x d`` adapted layer on ``m`` tokens,
    ``choice`` being ``fused``, ``merged`` or ``materialised``."""
    x = torch.randn(m, d, requires_grad=True)
    w, bias, g = torch.randn(d, d), torch.randn(d), torch.randn(m, d)
    a, b = torch.randn(rank, d, requires_grad=True), torch.randn(d, rank, requires_grad=True)

    def f(x, w, bias, a, b):
        if choice == "fused":
            return torch.ops.lsrfx.lowrank_linear(x, w, bias, a, b, 0.5, False)[0]
        if choice == "merged":
            return torch.ops.lsrfx.merged_linear(x, w, bias, a, b, 0.5, False)
        return torch.nn.functional.linear(x, torch.ops.lsrfx.compose(w, a, b, 0.5, False), bias)

    cf = torch.compile(f, dynamic=False)
    return lambda: cf(x, w, bias, a, b).backward(g)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--cpu-time", action="store_true", help="one thread, process CPU time, times the core count")
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 128, 384, 1024])
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 32])
    ap.add_argument("--validate", action="store_true", help="also time one compiled layer both ways (slow)")
    args = ap.parse_args()
    torch._dynamo.config.recompile_limit = 10_000  # every shape is a new static compile of the same function
    torch._dynamo.config.accumulated_recompile_limit = 10_000

    machine = measure_constants(args.reps, args.cpu_time)
    print(f"measured: Machine(peak={machine.peak:.2e}, bandwidth={machine.bandwidth:.2e})  "
          f"[defaults: {cost_model.MACHINES['cpu']}]\n")
    cost_model.MACHINES["cpu"] = machine
    print("| d x d | tokens | r | decision | fused us | merged us | materialised us |"
          + (" measured fused / merged / materialised ms |" if args.validate else ""))
    print("|---:|---:|---:|---|---:|---:|---:|" + ("---:|" if args.validate else ""))
    for d in args.widths:
        for m in args.tokens:
            for r in args.ranks:
                shape = cost_model.Shape(tokens=m, d_in=d, d_out=d, rank=r, training=True)
                c = cost_model.costs(shape)
                action = cost_model.decide(shape)[0]
                merged = "-" if c.merged is None else f"{c.merged * 1e6:.0f}"
                row = f"| {d} | {m} | {r} | {action} | {c.fused * 1e6:.0f} | {merged} | {c.materialised * 1e6:.0f} |"
                if args.validate:
                    t = [median_seconds(layer_step(choice, d, m, r), args.reps, time.perf_counter)
                         for choice in ("fused", "merged", "materialised")]
                    row += " " + " / ".join(f"{s * 1e3:.2f}" for s in t) + " |"
                print(row, flush=True)


if __name__ == "__main__":
    main()
