"""The FX rewrite: each adapted linear-like node becomes one fused lsrfx op, or stays materialised.

For every :class:`~lsrfx.passes.match.Match` the cost model decides. "fused" replaces the consumer by
``lsrfx::lowrank_linear(x, W0, bias, A, B, s, transposed)``, or ``lsrfx::lsr_linear`` fed with LSR's Kronecker
factors straight from the ``kron_sum`` nodes, and erases ``compose``/``kron_sum`` once nothing else uses them, so
``dW`` is never formed. "materialised" leaves ``linear(x, compose(...))`` as it is. The method's factor subgraph
(LoRA's parameters, CondLoRA's ``C_A @ W0.T``, GenLoRA's RBF bank, LSR's factors) is already in the captured
graph, upstream of ``compose``; the rewrite rewires it into the fused op. Graphs without ``compose`` are not touched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import fx

from lsrfx.passes import cost_model
from lsrfx.passes.match import Match, call_kind, match

log = logging.getLogger("lsrfx.compile")


@dataclass
class Decision:
    """What the pass did with one adapted node (shown by ``lsrfx.explain`` and the ``LSRFX_LOG`` log)."""

    node: str  # name of the linear-like node in the captured graph
    layer: str  # module path, from Dynamo's nn_module_stack
    kind: str  # linear | addmm | mm | ...
    method: str  # lowrank | lsr
    action: str  # fused | materialised | skipped
    reason: str
    fused_node: str = ""

    def __str__(self) -> str:
        target = f" -> {self.fused_node}" if self.fused_node else ""
        return f"{self.layer or self.node} [{self.kind}, {self.method}]: {self.action}{target} ({self.reason})"


def _val(node: object) -> torch.Tensor | None:
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("example_value", node.meta.get("val"))
    return v if isinstance(v, torch.Tensor) else None


def _hint(size: object) -> int:
    """A concrete size without adding guards (symbolic sizes give their hint)."""
    if isinstance(size, torch.SymInt):
        hint = size.node.hint
        return int(hint) if hint is not None else cost_model.UNKNOWN_TOKENS
    return int(size)


def _layer_name(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1][0]
        return str(path).replace("L['self'].", "").replace("L['self']", "model")
    return ""


def _shape_of(m: Match) -> cost_model.Shape | None:
    x, w0, a = _val(m.x), _val(m.w0), _val(m.a)
    if x is None or w0 is None or a is None:
        return None
    k = _hint(x.shape[-1])
    tokens = 1
    for s in x.shape[:-1]:
        tokens *= _hint(s)
    n = _hint(w0.numel()) // max(k, 1)
    r = _hint(a.shape[0])  # A is (r, d_in) whatever the orientation
    factors = [_val(f) for f in ((m.a, m.b) if m.kron is None else m.kron)]
    training = any(f is not None and f.requires_grad for f in factors)
    return cost_model.Shape(tokens=tokens, d_in=k, d_out=n, rank=r, training=training)


def _factor_args(graph: fx.Graph, m: Match) -> list:
    """The factor arguments of the fused op, transposed where the orientations disagree."""
    if m.kron is None:
        a, b = (m.a, m.b)
        return [graph.call_function(torch.t, (b,)), graph.call_function(torch.t, (a,))] if m.swap else [a, b]
    a1, a2, b1, b2 = m.kron
    if not m.swap:
        return [a1, a2, b1, b2]
    return [graph.call_function(torch.transpose, (f, 1, 2)) for f in (b1, b2, a1, a2)]


def _rewrite(graph: fx.Graph, m: Match) -> fx.Node:
    consumer = m.consumer
    with graph.inserting_before(consumer):
        factors = _factor_args(graph, m)
        if m.kron is None:
            op = torch.ops.lsrfx.lowrank_linear.default
        else:
            op = torch.ops.lsrfx.lsr_linear.default
        fused = graph.call_function(op, (m.x, m.w0, m.bias, *factors, m.scale, m.op_transposed))
        fused.meta.update(consumer.meta)
        result = fused
        if m.addend is not None:
            result = graph.call_function(torch.add, (fused, m.addend))
            result.meta.update(consumer.meta)
    consumer.replace_all_uses_with(result)
    graph.erase_node(consumer)
    for dead in dict.fromkeys((m.weight, m.compose, m.a, m.b)):
        if isinstance(dead, fx.Node) and not dead.users and call_kind(dead) in ("t", "transpose", "compose",
                                                                                 "kron_sum"):
            graph.erase_node(dead)
    return fused


def fuse_adapted_linears(graph: fx.Graph, record: bool = True) -> list[Decision]:
    """Rewrite ``graph`` in place; return one :class:`Decision` per adapted linear-like node (empty: untouched).

    ``record``: count the decisions in ``torch._dynamo.utils.counters["lsrfx"]`` and log them (``LSRFX_LOG``)."""
    decisions: list[Decision] = []
    for node in list(graph.nodes):
        found = match(node)
        if found is None:
            continue
        layer = _layer_name(node)
        if isinstance(found, str):
            decisions.append(Decision(node.name, layer, str(call_kind(node)), "?", "skipped", found))
            continue
        shape = _shape_of(found)
        action, reason = cost_model.decide(shape)
        d = Decision(node.name, layer, found.kind, found.method, action, reason)
        if action == "fused":
            d.fused_node = _rewrite(graph, found).name
        decisions.append(d)
    if decisions and record:
        _record(decisions)
    return decisions


def _record(decisions: list[Decision]) -> None:
    from torch._dynamo.utils import counters

    for d in decisions:
        counters["lsrfx"][d.action] += 1
        log.info("lsrfx: %s", d)
    n_fused = sum(d.action == "fused" for d in decisions)
    log.info("lsrfx: %d of %d adapted nodes fused in this graph", n_fused, len(decisions))
