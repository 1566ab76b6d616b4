"""Find linear-like FX nodes whose weight is an lsrfx ``compose`` node, in Dynamo's captured (pre-grad) graphs.

A :class:`Match` records what the fused op needs: input, frozen weight, bias, the factor structure with its
factors (:mod:`lsrfx.kernels.factor_table`), scale, and the orientation. Orientation: ``linear(x, C)``
computes ``x @ C.T`` and ``mm``/``matmul``/``addmm`` compute ``x @ C`` (GPT-2 ``Conv1D``), a transpose between
``compose`` and the matmul flips that, and ``compose(..., transposed=True)`` stores ``W0 + s*(B@A).T``. The fused
op computes ``x @ W.T + s*(x@A.T)@B.T``, so where the orientations disagree the factors swap roles
(``A' = B.T``, ``B' = A.T``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from lsrfx.kernels.factor_table import COMPOSE, FACTOR_STRUCTURES, FactorOp, FactorStructure, is_call

aten = torch.ops.aten

LINEAR = (torch._C._nn.linear, torch.nn.functional.linear, aten.linear, aten.linear.default)
ADDMM = (torch.addmm, aten.addmm, aten.addmm.default)
MM = (torch.mm, torch.matmul, operator.matmul, aten.mm, aten.mm.default, aten.matmul, aten.matmul.default)
TRANSPOSE_2D = (torch.t, aten.t, aten.t.default)
TRANSPOSE = (torch.transpose, aten.transpose, aten.transpose.int)
METHOD_KIND = {"mm": "mm", "matmul": "mm", "__matmul__": "mm", "addmm": "addmm", "t": "t", "transpose": "transpose"}
CONSUMER_KINDS = ("linear", "addmm", "mm")


def _in(target: object, group: tuple) -> bool:
    return any(target is t for t in group)


def call_kind(node: fx.Node) -> str | None:
    """``"linear"``, ``"addmm"``, ``"mm"``, ``"t"``, ``"transpose"`` or ``None`` (torch and aten forms alike)."""
    if node.op == "call_method":
        return METHOD_KIND.get(node.target)
    if node.op != "call_function":
        return None
    for kind, group in (("linear", LINEAR), ("addmm", ADDMM), ("mm", MM), ("t", TRANSPOSE_2D),
                        ("transpose", TRANSPOSE)):
        if _in(node.target, group):
            return kind
    return None


def arg(node: fx.Node, index: int, name: str, default: object = None) -> object:
    """Positional-or-keyword argument of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _op_args(node: fx.Node, op: FactorOp) -> tuple:
    """The arguments of a call of ``op``, in its schema's order."""
    return tuple(arg(node, i, name) for i, name in enumerate(op.arg_names))


@dataclass
class Match:
    """A linear-like ``consumer`` of ``compose(W0, A, B, scale, transposed)``, normalised for the fused op."""

    consumer: fx.Node
    kind: str  # linear | addmm | mm
    compose: fx.Node
    weight: fx.Node  # the consumer's weight argument: ``compose`` itself or a transpose of it
    x: fx.Node
    w0: fx.Node
    bias: object  # fx.Node or None
    addend: fx.Node | None  # addmm's input when it is not a plain bias (added after the fused op)
    a: fx.Node
    b: fx.Node
    scale: object  # float, or the node of a scale Dynamo left symbolic (``item()`` of a lifted float)
    op_transposed: bool  # the fused op reads W0 as (K, N)
    swap: bool  # factors swap roles: A' = B.T, B' = A.T
    structure: FactorStructure  # how A and B are built, hence the fused op
    a_factors: tuple  # A's factors for the fused op (dense: (A,); Kronecker: (A1, A2))
    b_factors: tuple  # B's factors likewise


@dataclass(frozen=True)
class Skip:
    """An adapted weight that cannot be fused at this node, and why."""

    reason: str


def _is_swap_transpose(node: fx.Node) -> bool:
    kind = call_kind(node)
    if kind == "t":
        return True
    if kind == "transpose":
        dims = {arg(node, 1, "dim0"), arg(node, 2, "dim1")}
        return dims in ({0, 1}, {-1, -2}, {0, -1}, {-2, 1})
    return False


def _weight_source(w: object) -> tuple[fx.Node | None, bool]:
    """The ``compose`` node behind a weight argument, and whether a transpose sits in between."""
    if not isinstance(w, fx.Node):
        return None, False
    if is_call(w, COMPOSE.op):
        return w, False
    if _is_swap_transpose(w):
        inner = w.args[0]
        if is_call(inner, COMPOSE.op):
            return inner, True
    return None, False


def _ndim(node: object) -> int | None:
    val = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None


def factor_structure(a: object, b: object) -> tuple[FactorStructure, tuple, tuple]:
    """The first row of the factor table whose feed op builds both ``A`` and ``B``, with their factors."""
    for structure in FACTOR_STRUCTURES:
        if structure.feed is None:
            return structure, (a,), (b,)
        if is_call(a, structure.feed.op) and is_call(b, structure.feed.op):
            return structure, _op_args(a, structure.feed), _op_args(b, structure.feed)
    raise AssertionError("the factor table has no fallback row (feed=None)")


def _weight_arg(node: fx.Node, kind: str) -> object:
    w_index, w_name = {"linear": (1, "weight"), "addmm": (2, "mat2"), "mm": (1, "mat2")}[kind]
    return arg(node, w_index, w_name, node.kwargs.get("other"))


def match(node: fx.Node) -> Match | Skip | None:
    """A :class:`Match`; a :class:`Skip` saying why an adapted weight cannot be fused here; ``None`` when ``node``
    is not a linear-like consumer of ``compose`` (not an adapted node)."""
    kind = call_kind(node)
    if kind not in CONSUMER_KINDS:
        return None
    weight = _weight_arg(node, kind)
    compose, through_t = _weight_source(weight)
    if compose is None:
        return None
    bias, addend = None, None
    if kind == "linear":
        x, bias = arg(node, 0, "input"), arg(node, 2, "bias")
    elif kind == "addmm":
        if arg(node, 3, "beta", 1) != 1 or arg(node, 4, "alpha", 1) != 1:
            return Skip("addmm with beta/alpha != 1")
        x, inp = arg(node, 1, "mat1"), arg(node, 0, "input")
        if _ndim(inp) == 1:
            bias = inp
        else:
            addend = inp
    else:
        x = arg(node, 0, "input")
    if not isinstance(x, fx.Node) or (_ndim(x) or 2) < 1:
        return Skip("input is not a tensor node")
    w0, a, b, scale, transposed = _op_args(compose, COMPOSE)
    if not isinstance(transposed, bool):
        return Skip("compose's `transposed` is not a constant")
    c_as_right = (kind != "linear") != through_t
    structure, a_factors, b_factors = factor_structure(a, b)
    return Match(node, kind, compose, weight, x, w0, bias, addend, a, b, scale, c_as_right,
                 transposed != c_as_right, structure, a_factors, b_factors)
