"""``lsrfx.explain``: show what the compile pass does to a model, for debugging.

Captures the model's Dynamo graphs on the given inputs (without resetting Dynamo, so a model being trained keeps
its compiled code; the capture itself may add a cache entry), runs the lsrfx pass on a copy of each, and reports
per graph: the captured graph and the rewritten one with the adapted nodes marked, each adapted node's decision
(fused or materialised, and why), the graph breaks with their reasons, and the number of fused ops.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import fx, nn
from torch._dynamo.utils import counters

from lsrfx.passes.cost_model import MEASURED_RULE, policy
from lsrfx.passes.fuse import Decision, fuse_adapted_linears
from lsrfx.passes.match import call_kind

FUSED_OPS = ("lsrfx.lowrank_linear", "lsrfx.lsr_linear")


def _capture(model: nn.Module, args: tuple, kwargs: dict) -> tuple[list[fx.GraphModule], list[str]]:
    graphs: list[fx.GraphModule] = []

    def backend(gm: fx.GraphModule, example_inputs: list) -> Any:
        graphs.append(copy.deepcopy(gm))
        return gm.forward

    before = dict(counters["graph_break"])
    torch.compile(model, backend=backend)(*args, **kwargs)
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


def _before_marks(graph: fx.Graph, decisions: list[Decision]) -> dict[str, str]:
    marks = {d.node: f"adapted ({d.kind}): {d.action}" for d in decisions}
    for node in graph.nodes:
        if call_kind(node) in ("compose", "kron_sum"):
            marks.setdefault(node.name, "adapter factor op")
    return marks


def _after_marks(graph: fx.Graph) -> dict[str, str]:
    return {n.name: "FUSED" for n in graph.nodes if any(op in str(n.target) for op in FUSED_OPS)}


def explain(model: nn.Module, *example_inputs: Any, **kwargs: Any) -> str:
    """A report of the lsrfx rewrite for ``model(*example_inputs, **kwargs)`` (plain or compiled model)."""
    root = getattr(model, "_orig_mod", model)
    graphs, breaks = _capture(root, example_inputs, kwargs)
    out = [f"lsrfx.explain: {len(graphs)} graph(s), {len(breaks)} graph break reason(s); fusion policy "
           f"{policy()!r}; rule: {MEASURED_RULE}"]
    total_fused = total_adapted = 0
    for i, gm in enumerate(graphs):
        original = copy.deepcopy(gm.graph)
        decisions = fuse_adapted_linears(gm.graph, record=False)
        before_text = _marked(original, _before_marks(original, decisions))
        n_fused = sum(d.action == "fused" for d in decisions)
        total_fused += n_fused
        total_adapted += len(decisions)
        out.append(f"\n=== graph {i}: {len(decisions)} adapted node(s), {n_fused} fused ===")
        out += [f"  {d}" for d in decisions] or ["  (no adapted layers: graph left unchanged)"]
        out.append(f"--- captured graph (before) ---\n{before_text}")
        if decisions:
            out.append(f"--- after the lsrfx pass ---\n{_marked(gm.graph, _after_marks(gm.graph))}")
    out.append("\n=== graph breaks ===")
    out += [f"  {b}" for b in breaks] or ["  none"]
    out.append(f"\nfused ops: {total_fused} of {total_adapted} adapted node(s)")
    return "\n".join(out)
