"""The one table of adapter factor structures, read by the compile pass, ``lsrfx.explain`` and the ONNX export.

Every adapted weight is ``compose(W0, A, B, scale, transposed)``. A *factor structure* says how ``A`` and ``B``
reach ``compose`` in a captured graph and what the pass fuses the layer into:

===========  ==========================================  =========================  ============================
structure    ``A`` and ``B`` are                         fused op                   its factors when A, B swap
===========  ==========================================  =========================  ============================
kronecker    outputs of ``kron_sum(F1, F2)``, both       ``lsrfx::lsr_linear``      ``B1, B2, A1, A2``, each
                                                                                    ``.transpose(1, 2)``
dense        any tensors (LoRA, CondLoRA, GenLoRA, ...)  ``lsrfx::lowrank_linear``  ``B.t(), A.t()``
===========  ==========================================  =========================  ============================

A layer of any structure may instead go through ``lsrfx::merged_linear(x, W0, bias, A, B, scale, transposed)``
(:data:`MERGED_LINEAR`: ``W0 + dW`` formed for the matmuls, factor gradients from rank-``r`` products; the cost
model's "merged" choice), fed with the dense ``A`` and ``B``.

A fused op is called as ``fused_op(x, W0, bias, *A's factors, *B's factors, scale, transposed)`` and its output 0
is the layer's output (the others are saved for its backward); a structure's factors are its feed op's arguments in
order (dense: ``A`` and ``B`` themselves). Each lsrfx op that adapters put
in graphs (:data:`FACTOR_OPS`) carries its ONNX translation, for exports that keep the adapters unmerged. lsrfx ops
are recognised one way only, by identity (:func:`is_call`). A new method with a new factor structure is one row of
:data:`FACTOR_STRUCTURES` (plus the file of its fused op, and of its feed op if it adds one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx
from torch._ops import OpOverloadPacket

import lsrfx.kernels.condlora_linear  # noqa: F401  (registers torch.ops.lsrfx.condlora_linear)
from lsrfx.kernels.compose import compose_onnx
from lsrfx.kernels.kron_sum import kron_sum_onnx

lsrfx_ops = torch.ops.lsrfx


@dataclass(frozen=True)
class FactorOp:
    """An lsrfx op that adapters put in captured graphs, and its ONNX translation (a traced onnxscript function
    that imports onnxscript only when called)."""

    op: OpOverloadPacket
    onnx_translation: Callable

    @property
    def arg_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.op.default._schema.arguments)


@dataclass(frozen=True)
class FactorStructure:
    """One row of the table: how ``A`` and ``B`` of ``compose`` are built and what the layer fuses into."""

    name: str
    feed: FactorOp | None  # the op whose outputs are both A and B; None: A and B are any tensors
    fused_op: OpOverloadPacket  # fused_op(x, W0, bias, *A's factors, *B's factors, scale, transposed)[0]
    transpose: Callable  # transposes one factor when A and B swap roles: transpose(factor, *transpose_dims)
    transpose_dims: tuple[int, ...] = ()

    @property
    def fused_op_name(self) -> str:
        """E.g. ``"lsrfx::lsr_linear"``."""
        return self.fused_op.default.name()


COMPOSE = FactorOp(lsrfx_ops.compose, compose_onnx)  # W0 + scale * B @ A: every adapted weight
KRON_SUM = FactorOp(lsrfx_ops.kron_sum, kron_sum_onnx)  # sum_k kron(F1[k], F2[k]): LSR-Adapt's A and B

KRONECKER = FactorStructure("kronecker", KRON_SUM, lsrfx_ops.lsr_linear, torch.transpose, (1, 2))
DENSE = FactorStructure("dense", None, lsrfx_ops.lowrank_linear, torch.t)

# Most specific first: a graph's A and B have the first structure whose feed op builds both (dense: the fallback).
FACTOR_STRUCTURES: tuple[FactorStructure, ...] = (KRONECKER, DENSE)
FACTOR_OPS: tuple[FactorOp, ...] = tuple(dict.fromkeys((COMPOSE, *(s.feed for s in FACTOR_STRUCTURES if s.feed))))
# CondLoRA's stacked layer (kernels/condlora_linear.py) replaces a dense structure's fused op off CUDA.
CONDLORA_LINEAR: OpOverloadPacket = lsrfx_ops.condlora_linear
FUSED_OPS: tuple[OpOverloadPacket, ...] = (*(s.fused_op for s in FACTOR_STRUCTURES), CONDLORA_LINEAR)
MERGED_LINEAR: OpOverloadPacket = lsrfx_ops.merged_linear


def is_call(node: object, op: OpOverloadPacket) -> bool:
    """True when ``node`` calls ``op``: ``symbolic_trace`` records the packet, Dynamo its ``.default``."""
    return isinstance(node, fx.Node) and node.op == "call_function" and (node.target is op or
                                                                         node.target is op.default)


def is_factor_op(node: object) -> bool:
    """True for a node of ``compose`` or of a structure's feed op (what the pass may erase and explain marks)."""
    return any(is_call(node, f.op) for f in FACTOR_OPS)


def is_fused_op(node: object) -> bool:
    """True for a node of one of the fused ops the pass inserts."""
    return any(is_call(node, op) for op in FUSED_OPS)


def is_merged_op(node: object) -> bool:
    """True for a node of ``merged_linear``, which the pass inserts for its "merged" choice."""
    return is_call(node, MERGED_LINEAR)


def onnx_translation_table() -> dict[Callable, Callable]:
    """``{op.default: translation}`` for every factor op: the exporter's ``custom_translation_table``."""
    return {f.op.default: f.onnx_translation for f in FACTOR_OPS}
