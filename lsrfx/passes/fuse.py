"""The FX rewrite: each adapted linear-like node becomes one lsrfx op (fused or merged), or stays materialised.

For every :class:`~lsrfx.passes.match.Match` the cost model decides. "fused" replaces the consumer by the fused op
of the match's factor structure (:mod:`lsrfx.kernels.factor_table`): ``lsrfx::lowrank_linear(x, W0, bias, A, B, s,
transposed)``, or on CUDA ``lsrfx::lsr_linear`` fed with LSR's Kronecker factors straight from the ``kron_sum``
nodes (elsewhere LSR's layer fuses as ``lowrank_linear`` on the ``kron_sum`` outputs, see
:func:`_kronecker_as_dense_off_cuda`); the consumer's uses take the fused op's output 0 (the other outputs are saved
for its backward). It erases ``compose`` and the feed ops once nothing else uses them, so ``dW`` is never formed.
"merged" replaces the consumer by ``lsrfx::merged_linear(x, W0, bias, A, B, s, transposed)`` on the dense factors
(``W0 + dW`` for the matmuls, no dense weight gradient). "materialised" leaves ``linear(x, compose(...))`` as it is.
The method's factor subgraph (LoRA's parameters, CondLoRA's ``C_A @ W0.T``, GenLoRA's RBF bank, LSR's factors) is
already in the captured graph, upstream of ``compose``; the rewrite rewires it into the new op, and writes a dense
factor that is a small matrix product as a reduction (see :func:`_products_as_reductions`). Last, factor ops of
equal shapes are batched across layers (:mod:`lsrfx.passes.batch`), so the generated code does not grow with the
depth. Graphs without ``compose`` are not touched.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx

from lsrfx.kernels.factor_table import CONDLORA_LINEAR, DENSE, KRON_SUM, MERGED_LINEAR, is_call, is_factor_op
from lsrfx.kernels.layout import formed_transposed
from lsrfx.passes import cost_model
from lsrfx.passes.batch import batch_factor_ops
from lsrfx.passes.logs import LOGGER
from lsrfx.passes.match import Match, Skip, call_kind, match

log = logging.getLogger(LOGGER)


@dataclass
class Decision:
    """What the pass did with one adapted node (shown by ``lsrfx.explain`` and the ``LSRFX_LOG`` log)."""

    node: str  # name of the linear-like node in the captured graph
    layer: str  # module path, from Dynamo's nn_module_stack
    kind: str  # linear | addmm | mm | ...
    fused_op: str  # the fused op of the node's factor structure, e.g. "lsrfx::lsr_linear"; "" when skipped
    action: str  # fused | merged | materialised | skipped
    reason: str
    fused_node: str = ""

    def __str__(self) -> str:
        target = f" -> {self.fused_node}" if self.fused_node else ""
        op = self.fused_op or "?"
        return f"{self.layer or self.node} [{self.kind}, {op}]: {self.action}{target} ({self.reason})"


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
    factors = [_val(f) for f in (*m.a_factors, *m.b_factors)]
    training = any(f is not None and f.requires_grad for f in factors)
    return cost_model.Shape(tokens=tokens, d_in=k, d_out=n, rank=r, training=training, input_grad=x.requires_grad,
                            elem_bytes=x.element_size(), factor_flops=_factor_flops(m), device=x.device.type,
                            same_dtype=w0.dtype == a.dtype)


def _factor_flops(m: Match) -> float:
    """Flops forming ``A`` and ``B`` from the adapter's parameters where the graph shows them: Kronecker sums (``2S``
    per element) and matrix products (CondLoRA's ``C_A @ W0.T``); elementwise factor code is not counted."""
    total = 0
    for node in (m.a, m.b):
        out = _val(node)
        inner = _val(node.args[0]) if isinstance(node, fx.Node) and node.args else None
        if out is None or inner is None:
            continue
        if is_call(node, KRON_SUM.op):
            total += 2 * _hint(inner.shape[0]) * _hint(out.numel())  # inner: (S, m1, n1)
        elif call_kind(node) == "mm":
            total += 2 * _hint(out.numel()) * _hint(inner.shape[-1])
    return total


def _factor_args(graph: fx.Graph, m: Match) -> list:
    """The factor arguments of the fused op, transposed (and A's exchanged with B's) where orientations disagree."""
    if not m.swap:
        return [*m.a_factors, *m.b_factors]
    s = m.structure
    return [graph.call_function(s.transpose, (f, *s.transpose_dims)) for f in (*m.b_factors, *m.a_factors)]


def _products_as_reductions(graph: fx.Graph, m: Match) -> int:
    """Rewrite each dense factor that is a small 2-D matrix product (CondLoRA's ``C_A @ W0.T``, ``W0 @ C_B.T``) as
    ``(P[:, :, None] * Q[None]).sum(1)`` (or the transpose of ``Q.T``'s with ``P.T``'s when the product has fewer
    columns than rows): Inductor generates it and its gradient as reductions that it fuses into
    kernels the step launches anyway, instead of one BLAS call each way (see ``cost_model.SMALL_PRODUCT_FLOPS``).
    Updates ``m``; returns how many factors were rewritten."""
    if m.structure.feed is not None:
        return 0
    done = 0
    for role in ("a", "b"):
        node = getattr(m, role)
        if call_kind(node) != "mm" or node.kwargs or len(node.args) != 2:
            continue
        p, q = node.args
        pv, qv, out = _val(p), _val(q), _val(node)
        if out is None or any(v is None or v.dim() != 2 for v in (pv, qv)):
            continue
        if not cost_model.product_as_reduction(2 * _hint(out.numel()) * _hint(pv.shape[1])):
            continue
        # A factor with fewer columns than rows (``W0 @ C_B.T``, ``N x r``) is formed as its transpose and used as a
        # transposed view: see :mod:`lsrfx.kernels.layout` for why the reduction must not end in ``r``.
        as_transpose = formed_transposed(_hint(out.shape[0]), _hint(out.shape[1]))
        with graph.inserting_before(node):
            if as_transpose:
                p, q = (graph.call_function(torch.t, (f,)) for f in (q, p))
            prod = graph.call_function(operator.mul, (graph.call_function(torch.unsqueeze, (p, 2)),
                                                      graph.call_function(torch.unsqueeze, (q, 0))))
            summed = graph.call_function(torch.sum, (prod, 1))
            if as_transpose:
                summed = graph.call_function(torch.t, (summed,))
        summed.meta.update(node.meta)
        node.replace_all_uses_with(summed)
        graph.erase_node(node)
        setattr(m, role, summed)
        setattr(m, f"{role}_factors", (summed,))
        done += 1
    return done


def _is_conversion(node: object) -> bool:
    """A ``detach`` / ``to`` / ``contiguous`` call: what CondLoRA's factors apply to ``W0`` (``to`` its own dtype,
    checked by the caller)."""
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in ("detach", "to", "contiguous")


def _source(node: object) -> object:
    """``node`` through the conversions of :func:`_is_conversion`."""
    while _is_conversion(node):
        node = node.args[0]
    return node


def _stacked_condlora(graph: fx.Graph, m: Match) -> Callable[[fx.Graph, Match], tuple[fx.Node, fx.Node]] | None:
    """The call of ``lsrfx::condlora_linear`` (:mod:`lsrfx.kernels.condlora_linear`) for a layer whose factors are
    CondLoRA's products of its own ``W0`` (``A = C_A @ W0.T`` or ``C_A @ W0``, ``B = W0 @ C_B.T``), when they are
    BLAS-sized (not ``cost_model.product_as_reduction``), whatever the token count; None otherwise. Off CUDA only
    (there the fused Triton kernel is the layer's op), one dtype throughout, outside autocast (the op has no
    autocast rule: its stacked matmul needs ``x``, ``W0`` and the pair in one dtype)."""
    x, w0, out = _val(m.x), _val(m.w0), _val(m.consumer)
    a, b = m.a, m.b
    if m.swap or m.structure.feed is not None or x is None or w0 is None or out is None or x.device.type == "cuda":
        return None
    if any(call_kind(n) != "mm" or n.kwargs or len(n.args) != 2 for n in (a, b)):
        return None
    (c_a, w_a), (w, c_b_t) = a.args, b.args
    if call_kind(c_b_t) != "t" or len(c_b_t.args) != 1:
        return None
    c_b = c_b_t.args[0]
    square = call_kind(w_a) == "t" and w_a.args[0] is w
    if not (square or w_a is w):
        return None
    logical = _source(w)  # W0 as d_out x d_in: the stored weight, or its transpose for a (K, N)-stored one
    if m.op_transposed:
        if call_kind(logical) != "t" or _source(logical.args[0]) is not m.w0:
            return None
    elif logical is not m.w0:
        return None
    pair = [_val(c_a), _val(c_b)]
    if any(v is None or v.dtype != x.dtype for v in (*pair, w0, out)) or torch.is_autocast_enabled(x.device.type) \
            or any(getattr(n.target, "__name__", "") == "_enter_autocast" for n in graph.nodes):
        return None
    d_in, d_out = _hint(x.shape[-1]), _hint(out.shape[-1])
    if cost_model.product_as_reduction(2 * _hint(pair[1].shape[0]) * d_in * d_out):  # reductions instead
        return None

    def call(graph: fx.Graph, m: Match) -> tuple[fx.Node, fx.Node]:
        op = graph.call_function(CONDLORA_LINEAR.default,
                                 (m.x, m.w0, m.bias, c_a, c_b, m.scale, square, m.op_transposed))
        return op, graph.call_function(operator.getitem, (op, 0))

    return call


def _erase_unused_products(graph: fx.Graph, nodes: tuple) -> None:
    """Erase CondLoRA's factor products and the views and conversions of ``W0`` feeding them once unused."""
    todo = list(nodes)
    while todo:
        node = todo.pop()
        pure = call_kind(node) in ("mm", "t", "transpose") or _is_conversion(node)
        if not pure or node.users:
            continue
        todo.extend(n for n in node.all_input_nodes)
        graph.erase_node(node)


def _kronecker_as_dense_off_cuda(m: Match) -> Match:
    """Off CUDA, LSR-Adapt's layer fuses as the dense structure: ``lowrank_linear`` fed by the ``kron_sum`` nodes'
    dense ``A`` and ``B``, which stay in the graph. ``lsr_linear`` would form them inside its body there too (only
    on CUDA does its Triton kernel expand the Kronecker sums itself), but as separate ops they can be batched across
    layers (:func:`lsrfx.passes.batch.batch_factor_ops`), so the generated code does not grow with the depth."""
    x = _val(m.x)
    if m.structure.feed is None or x is None or x.device.type == "cuda":
        return m
    return dataclasses.replace(m, structure=DENSE, a_factors=(m.a,), b_factors=(m.b,))


def _fused_call(graph: fx.Graph, m: Match) -> tuple[fx.Node, fx.Node]:
    """``(op node, result node)`` of the structure's fused op (output 0 is the layer's output; the others are saved
    for its backward)."""
    fused = graph.call_function(m.structure.fused_op.default,
                                (m.x, m.w0, m.bias, *_factor_args(graph, m), m.scale, m.op_transposed))
    return fused, graph.call_function(operator.getitem, (fused, 0))


def _merged_call(graph: fx.Graph, m: Match) -> tuple[fx.Node, fx.Node]:
    """``(op node, result node)`` of ``merged_linear`` on the dense ``A`` and ``B`` (swapped and transposed where
    orientations disagree), which stay in the graph: their feed ops' backward chains the factor gradients."""
    a, b = m.a, m.b
    if m.swap:
        a, b = (graph.call_function(torch.t, (f,)) for f in (m.b, m.a))
    merged = graph.call_function(MERGED_LINEAR.default, (m.x, m.w0, m.bias, a, b, m.scale, m.op_transposed))
    return merged, merged


def _rewrite(graph: fx.Graph, m: Match, call: Callable[[fx.Graph, Match], tuple[fx.Node, fx.Node]]) -> fx.Node:
    """Replace ``m.consumer`` by ``call``'s op; erase what no longer has users. Returns the op node."""
    consumer = m.consumer
    with graph.inserting_before(consumer):
        op_node, result = call(graph, m)
        if op_node is not result:
            op_node.meta.update({k: v for k, v in consumer.meta.items() if k not in ("example_value", "val")})
        result.meta.update(consumer.meta)
        if m.addend is not None:
            result = graph.call_function(torch.add, (result, m.addend))
            result.meta.update(consumer.meta)
    consumer.replace_all_uses_with(result)
    graph.erase_node(consumer)
    for dead in dict.fromkeys((m.weight, m.compose, m.a, m.b)):
        if isinstance(dead, fx.Node) and not dead.users and (call_kind(dead) in ("t", "transpose")
                                                             or is_factor_op(dead)):
            graph.erase_node(dead)
    return op_node


def fuse_adapted_linears(graph: fx.Graph, record: bool = True) -> list[Decision]:
    """Rewrite ``graph`` in place; return one :class:`Decision` per adapted linear-like node (empty: untouched).

    Then batches the factor ops of layers with equal shapes (:func:`lsrfx.passes.batch.batch_factor_ops`).
    ``record``: count the decisions in ``torch._dynamo.utils.counters["lsrfx"]`` (and the calls batched away in
    ``counters["lsrfx_batched"]``, by op) and log them (``LSRFX_LOG``)."""
    decisions: list[Decision] = []
    for node in list(graph.nodes):
        found = match(node)
        if found is None:
            continue
        layer = _layer_name(node)
        if isinstance(found, Skip):
            decisions.append(Decision(node.name, layer, str(call_kind(node)), "", "skipped", found.reason))
            continue
        shape = _shape_of(found)
        action, reason = cost_model.decide(shape)
        kronecker = found.structure.feed is not None
        found = _kronecker_as_dense_off_cuda(found)
        if kronecker and found.structure.feed is None:
            reason += "; A and B formed by kron_sum ops (off CUDA)"
        d = Decision(node.name, layer, found.kind, found.structure.fused_op_name, action, reason)
        stacked = _stacked_condlora(graph, found) if action == "fused" else None
        if stacked is not None:
            d.fused_op = CONDLORA_LINEAR.default.name()
            d.reason += "; CondLoRA's factor products stacked onto the base matmul"
            d.fused_node = _rewrite(graph, found, stacked).name
            _erase_unused_products(graph, (found.a, found.b))
        elif action in ("fused", "merged"):
            if _products_as_reductions(graph, found):
                d.reason += "; factor matmuls generated as reductions"
            d.fused_node = _rewrite(graph, found, _fused_call if action == "fused" else _merged_call).name
        decisions.append(d)
    batched = batch_factor_ops(graph)
    if decisions and record:
        _record(decisions, batched)
    return decisions


def _record(decisions: list[Decision], batched: dict[str, int]) -> None:
    from torch._dynamo.utils import counters

    for d in decisions:
        counters["lsrfx"][d.action] += 1
        log.info("lsrfx: %s", d)
    for op, saved in batched.items():
        counters["lsrfx_batched"][op] += saved
        log.info("lsrfx: %d calls of %s batched into calls on stacked inputs", saved, op)
    n = count_actions(decisions)
    log.info("lsrfx: %d of %d adapted nodes fused in this graph, %d merged", n["fused"], len(decisions), n["merged"])


def count_actions(decisions: list[Decision]) -> Counter[str]:
    """How many decisions took each action (``fused``, ``merged``, ...; a missing action counts 0)."""
    return Counter(d.action for d in decisions)
