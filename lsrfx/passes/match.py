"""Find linear-like FX nodes whose weight is an lsrfx ``compose`` node, in Dynamo's captured (pre-grad) graphs.

A match records what the fused op needs: input, frozen weight, bias, the two factors (or LSR's four Kronecker
factors), scale, and the orientation. Orientation: ``linear(x, C)`` computes ``x @ C.T`` and ``mm``/``matmul``/
``addmm`` compute ``x @ C`` (GPT-2 ``Conv1D``), a transpose between ``compose`` and the matmul flips that, and
``compose(..., transposed=True)`` stores ``W0 + s*(B@A).T``. The fused op computes ``x @ W.T + s*(x@A.T)@B.T``,
so where the orientations disagree the factors swap roles (``A' = B.T``, ``B' = A.T``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

import lsrfx.kernels  # noqa: F401  (registers the lsrfx ops)

aten = torch.ops.aten
lsrfx_ops = torch.ops.lsrfx

LINEAR = (torch._C._nn.linear, torch.nn.functional.linear, aten.linear, aten.linear.default)
ADDMM = (torch.addmm, aten.addmm, aten.addmm.default)
MM = (torch.mm, torch.matmul, operator.matmul, aten.mm, aten.mm.default, aten.matmul, aten.matmul.default)
TRANSPOSE_2D = (torch.t, aten.t, aten.t.default)
TRANSPOSE = (torch.transpose, aten.transpose, aten.transpose.int)
COMPOSE = (lsrfx_ops.compose, lsrfx_ops.compose.default)
KRON_SUM = (lsrfx_ops.kron_sum, lsrfx_ops.kron_sum.default)
METHOD_KIND = {"mm": "mm", "matmul": "mm", "__matmul__": "mm", "addmm": "addmm", "t": "t", "transpose": "transpose"}
COMPOSE_ARGS = ("w0", "a", "b", "scale", "transposed")


def _in(target: object, group: tuple) -> bool:
    return any(target is t for t in group)


def call_kind(node: fx.Node) -> str | None:
    """``"linear"``, ``"addmm"``, ``"mm"``, ``"t"``, ``"transpose"``, ``"compose"``, ``"kron_sum"`` or ``None``."""
    if node.op == "call_method":
        return METHOD_KIND.get(node.target)
    if node.op != "call_function":
        return None
    for kind, group in (("linear", LINEAR), ("addmm", ADDMM), ("mm", MM), ("t", TRANSPOSE_2D),
                        ("transpose", TRANSPOSE), ("compose", COMPOSE), ("kron_sum", KRON_SUM)):
        if _in(node.target, group):
            return kind
    return None


def arg(node: fx.Node, index: int, name: str, default: object = None) -> object:
    """Positional-or-keyword argument of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


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
    kron: tuple[fx.Node, fx.Node, fx.Node, fx.Node] | None  # (A1, A2, B1, B2) when both A and B are kron_sum

    @property
    def method(self) -> str:
        return "lsr" if self.kron is not None else "lowrank"


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
    if call_kind(w) == "compose":
        return w, False
    if _is_swap_transpose(w):
        inner = w.args[0]
        if isinstance(inner, fx.Node) and call_kind(inner) == "compose":
            return inner, True
    return None, False


def _ndim(node: object) -> int | None:
    val = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None


def match(node: fx.Node) -> Match | str | None:
    """A :class:`Match`, or a string saying why an adapted weight cannot be fused here, or ``None``."""
    kind = call_kind(node)
    if kind not in ("linear", "addmm", "mm"):
        return None
    w_index, w_name = {"linear": (1, "weight"), "addmm": (2, "mat2"), "mm": (1, "mat2")}[kind]
    weight = arg(node, w_index, w_name, node.kwargs.get("other"))
    compose, through_t = _weight_source(weight)
    if compose is None:
        return None
    bias, addend = None, None
    if kind == "linear":
        x, bias = arg(node, 0, "input"), arg(node, 2, "bias")
    elif kind == "addmm":
        if arg(node, 3, "beta", 1) != 1 or arg(node, 4, "alpha", 1) != 1:
            return "addmm with beta/alpha != 1"
        x, inp = arg(node, 1, "mat1"), arg(node, 0, "input")
        if _ndim(inp) == 1:
            bias = inp
        else:
            addend = inp
    else:
        x = arg(node, 0, "input")
    if not isinstance(x, fx.Node) or (_ndim(x) or 2) < 1:
        return "input is not a tensor node"
    w0, a, b, scale, transposed = (arg(compose, i, n) for i, n in enumerate(COMPOSE_ARGS))
    if not isinstance(transposed, bool):
        return "compose's `transposed` is not a constant"
    c_as_right = (kind != "linear") != through_t
    kron = None
    if all(isinstance(f, fx.Node) and call_kind(f) == "kron_sum" for f in (a, b)):
        kron = (*a.args[:2], *b.args[:2])
    return Match(node, kind, compose, weight, x, w0, bias, addend, a, b, scale, c_as_right,
                 transposed != c_as_right, kron)
