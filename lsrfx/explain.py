"""``lsrfx.explain``: show what the compile pass does to a model, for debugging.

Captures the model's Dynamo graphs on the given inputs (without resetting Dynamo, so a model being trained keeps
its compiled code; the capture itself may add a cache entry), runs the lsrfx pass on a copy of each, and reports
per graph: the captured graph and the rewritten one with the adapted nodes marked, each adapted node's decision
(fused, merged or materialised, and why), the graph breaks with their reasons, and the number of fused and merged
ops.

By default the report is a short summary (decisions, graph breaks, counts: a few lines per adapted layer);
``graphs=True`` adds every captured graph before and after the pass (hundreds of lines for a transformer). The
heavy imports (torch, Dynamo, the pass) happen on the first call, so ``import lsrfx`` stays cheap.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from lsrfx.errors import LsrfxError
from lsrfx.settings import fuse_policy

if TYPE_CHECKING:
    from torch import fx, nn

    from lsrfx.passes.fuse import Decision


def _capture(model: nn.Module, args: tuple, kwargs: dict) -> tuple[list[fx.GraphModule], list[str]]:
    import torch
    from torch._dynamo.utils import counters

    from lsrfx.utils import first_line

    graphs: list[fx.GraphModule] = []

    def backend(gm: fx.GraphModule, example_inputs: list) -> Any:
        graphs.append(copy.deepcopy(gm))
        return gm.forward

    before = dict(counters["graph_break"])
    # Dynamo compiles a frame at most recompile_limit times per process; models compiled before in this process
    # (a notebook, a test session) may have used that up for the frames of a transformers model, and Dynamo would
    # then run this capture eagerly and show no graph. The capture's own entries are beyond that limit.
    limits = {name: getattr(torch._dynamo.config, name) + 64 for name in ("recompile_limit", "cache_size_limit")
              if hasattr(torch._dynamo.config, name)}
    try:
        with torch._dynamo.config.patch(limits):
            torch.compile(model, backend=backend)(*args, **kwargs)
    except Exception as exc:  # the model's own error on these inputs, not an lsrfx failure: say so in one line
        raise LsrfxError(
            f"lsrfx.explain: {type(model).__name__}.forward failed on the example inputs ({_describe(args, kwargs)}): "
            f"{first_line(exc)}. Pass the inputs the model's forward takes, e.g. explain(model, **batch)."
        ) from exc
    breaks = [f"{reason} (x{n - before.get(reason, 0)})" for reason, n in counters["graph_break"].items()
              if n > before.get(reason, 0)]
    return graphs, breaks


def _marked(graph: fx.Graph, marks: dict[str, str]) -> str:
    lines = []
    for node in graph.nodes:
        text = node.format_node() or node.name
        tag = marks.get(node.name)
        lines.append(f"{'>> ' if tag else '   '}{text}{f'    # {tag}' if tag else ''}")
    return "\n".join(lines)


def _describe(args: tuple, kwargs: dict) -> str:
    show = lambda v: f"Tensor{tuple(v.shape)}" if hasattr(v, "shape") else type(v).__name__  # noqa: E731
    return ", ".join([show(a) for a in args] + [f"{k}={show(v)}" for k, v in kwargs.items()]) or "no inputs"


def _before_marks(graph: fx.Graph, decisions: list[Decision]) -> dict[str, str]:
    from lsrfx.kernels.factor_table import is_factor_op

    marks = {d.node: f"adapted ({d.kind}): {d.action}" for d in decisions}
    for node in graph.nodes:
        if is_factor_op(node):
            marks.setdefault(node.name, "adapter factor op")
    return marks


def _after_marks(graph: fx.Graph) -> dict[str, str]:
    from lsrfx.kernels.factor_table import is_fused_op, is_merged_op

    marks = {n.name: "FUSED" for n in graph.nodes if is_fused_op(n)}
    return marks | {n.name: "MERGED" for n in graph.nodes if is_merged_op(n)}


def explain(model: nn.Module, *example_inputs: Any, graphs: bool = False, **kwargs: Any) -> str:
    """A report of the lsrfx rewrite for ``model(*example_inputs, **kwargs)`` (plain or compiled model): per
    captured graph, each adapted node's decision and why, then graph breaks and counts. ``graphs=True`` adds the
    captured graphs before and after the pass, adapted nodes marked. Raises :class:`LsrfxError` when the model's
    forward fails on the inputs."""
    from lsrfx.adapted_layer import quantized_layers
    from lsrfx.passes.cost_model import MEASURED_RULE
    from lsrfx.passes.fuse import count_actions, fuse_adapted_linears
    from lsrfx.utils import unwrap

    root = unwrap(model)
    captured, breaks = _capture(root, example_inputs, kwargs)
    out = [f"lsrfx.explain: {len(captured)} graph(s), {len(breaks)} graph break reason(s); fusion policy "
           f"{fuse_policy()!r}; rule: {MEASURED_RULE}"]
    total_fused = total_merged = total_adapted = 0
    for i, gm in enumerate(captured):
        original = copy.deepcopy(gm.graph) if graphs else None
        decisions = fuse_adapted_linears(gm.graph, record=False)
        n = count_actions(decisions)
        total_fused += n["fused"]
        total_merged += n["merged"]
        total_adapted += len(decisions)
        out.append(f"\n=== graph {i}: {len(decisions)} adapted node(s), {n['fused']} fused, {n['merged']} merged ===")
        out += [f"  {d}" for d in decisions] or ["  (no adapted layers: graph left unchanged)"]
        if graphs:
            out.append(f"--- captured graph (before) ---\n{_marked(original, _before_marks(original, decisions))}")
            if decisions:
                out.append(f"--- after the lsrfx pass ---\n{_marked(gm.graph, _after_marks(gm.graph))}")
    quantized = quantized_layers(root)
    if quantized:
        out.append(f"\n=== {len(quantized)} adapted layer(s) over a quantized base: not fused ===")
        out.append("  torchao's kernel computes x @ W0.T on the quantized weight and the low-rank term "
                   "scale * (x @ A.T) @ B.T is added beside it (lsrfx's fused kernels read a dense W0); "
                   "W0 + dW is never formed.")
        out += [f"  {name}: {scheme}" for name, scheme in quantized.items()]
    out.append("\n=== graph breaks ===")
    out += [f"  {b}" for b in breaks] or ["  none"]
    out.append(f"\nfused ops: {total_fused} of {total_adapted} adapted node(s); merged: {total_merged}")
    if not graphs and captured:
        out.append("(graphs before and after the pass: explain(..., graphs=True), or lsrfx inspect --graphs)")
    return "\n".join(out)
