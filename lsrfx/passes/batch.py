"""Batch a factor op across layers: every call of the same shapes becomes one call on stacked inputs.

A method whose factors depend on its parameters only (GenLoRA's RBF banks, LSR-Adapt's Kronecker sums) has that work
scheduled by Inductor side by side for every layer, forward and backward, and fused into one C++ kernel per graph
whose source grows with the number of layers: code generation and C++ compilation then cost seconds per decoder
layer, and identical layers share nothing. Here the calls of a batchable op (:data:`BATCHABLE`, ops whose body takes
leading batch dimensions) that have the same argument shapes, dtypes and constants are replaced by one call on
stacked inputs, whose result is split into the layers' results: the generated code is then one set of kernels per
shape, whatever the depth (a decoder's seven projections have two or three factor shapes). Each layer's values come
from the same elementwise arithmetic as before. Stacking and splitting are :mod:`lsrfx.kernels.stacking`'s two ops,
which Inductor calls instead of generating a copy loop per layer (``torch.stack`` / ``torch.unbind`` would bring
that code back, and with ``select`` instead of ``unbind`` torch 2.13's Inductor also miscompiled the centred bank's
backward on CPU). Autograd comes through those ops and the batched op's own backward.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
from torch import fx

import lsrfx.kernels.rbf_bank  # noqa: F401  (registers torch.ops.lsrfx.rbf_bank)
import lsrfx.kernels.stacking  # noqa: F401  (registers torch.ops.lsrfx.stack_factors and unstack_factors)
from lsrfx.kernels.factor_table import is_call
from lsrfx.kernels.layout import formed_transposed

BATCHABLE = (torch.ops.lsrfx.rbf_bank, torch.ops.lsrfx.kron_sum)


def _val(node: object) -> torch.Tensor | None:
    v = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _call_args(node: fx.Node, op: torch._ops.OpOverloadPacket) -> list | None:
    """The arguments of ``node`` in ``op``'s schema order (defaults filled in); None when one is missing."""
    out = []
    for i, a in enumerate(op.default._schema.arguments):
        if i < len(node.args):
            out.append(node.args[i])
        elif a.name in node.kwargs:
            out.append(node.kwargs[a.name])
        elif a.has_default_value():
            out.append(a.default_value)
        else:
            return None
    return out


def _key(args: list) -> tuple | None:
    """What calls must share to be stacked: each tensor argument's shape, dtype, device and ``requires_grad``, and
    every other argument's value. None when a tensor argument has no recorded example value (or is symbolic)."""
    key = []
    for a in args:
        if isinstance(a, fx.Node):
            v = _val(a)
            if v is None or any(isinstance(s, torch.SymInt) for s in v.shape):
                return None
            key.append(("tensor", tuple(v.shape), v.dtype, v.device, v.requires_grad))
        elif isinstance(a, (bool, int, float, str, type(None))):
            key.append(("constant", a))
        else:
            return None
    return tuple(key)


def _stacked_transposed(op: torch._ops.OpOverloadPacket, key: tuple) -> bool:
    """Whether the batched call computes the transposes: a Kronecker sum with fewer columns than rows (LSR's
    ``B``), which the ``kron_sum`` op forms as ``sum_s P[s].T (x) Q[s].T`` and hands out transposed
    (:func:`lsrfx.kernels.kron_sum.kron_sum_transposed`). Stacking the factors already transposed keeps that
    layout for the stacked call and its gradients, which then end in the long dimension as unbatched (the reason:
    :mod:`lsrfx.kernels.layout`)."""
    if op is not torch.ops.lsrfx.kron_sum:
        return False
    (_, p_shape, *_), (_, q_shape, *_) = key
    return formed_transposed(p_shape[-2] * q_shape[-2], p_shape[-1] * q_shape[-1])


def batch_factor_ops(graph: fx.Graph) -> dict[str, int]:
    """Rewrite ``graph`` in place; returns ``{op name: calls batched away}`` (empty: nothing changed).

    A group of two or more calls is replaced before its first member, so every input must be defined by then
    (parameters are the graph's placeholders, so they are); a group whose inputs are not is left alone."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    groups: dict[tuple, list[tuple[fx.Node, list]]] = defaultdict(list)
    for node in graph.nodes:
        op = next((op for op in BATCHABLE if is_call(node, op)), None)
        if op is None:
            continue
        args = _call_args(node, op)
        key = None if args is None else _key(args)
        if key is not None:
            groups[(op, key)].append((node, args))
    done: dict[str, int] = {}
    for (op, key), members in groups.items():
        if len(members) < 2:
            continue
        anchor = members[0][0]
        inputs = [a for _, args in members for a in args if isinstance(a, fx.Node)]
        if any(order[a] >= order[anchor] for a in inputs):
            continue
        transposed = _stacked_transposed(op, key)
        with graph.inserting_before(anchor):
            stacked = []
            for i, kind in enumerate(key):
                if kind[0] != "tensor":
                    stacked.append(kind[1])
                    continue
                column = [args[i] for _, args in members]
                if transposed:
                    column = [graph.call_function(torch.transpose, (a, -2, -1)) for a in column]
                stacked.append(graph.call_function(torch.ops.lsrfx.stack_factors.default, (column,)))
            batched = graph.call_function(op.default, tuple(stacked))
            parts = graph.call_function(torch.ops.lsrfx.unstack_factors.default, (batched,))
            for j, (node, _) in enumerate(members):
                one = graph.call_function(operator.getitem, (parts, j))
                if transposed:
                    one = graph.call_function(torch.t, (one,))
                one.meta.update(node.meta)
                node.replace_all_uses_with(one)
        for node, _ in members:
            graph.erase_node(node)
        name = op.default.name()
        done[name] = done.get(name, 0) + len(members) - 1
    return done
