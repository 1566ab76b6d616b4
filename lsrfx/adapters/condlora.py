"""CondLoRA (Kim et al., arXiv 2403.14946): one pair of conversion matrices per group of layers, shared.

A group is every target layer with the same module name (last path component, e.g. ``query``) and the same weight
shape. Each layer's factors come from its own frozen weight ``W0`` (``d_out x d_in``):

    A_l = C_A @ W0_l.T    C_A: r x d_in     (the paper's form; square W0 only)
    B_l = W0_l @ C_B.T    C_B: r x d_in

For a non-square ``W0`` the paper's ``A`` is undefined; lsrfx then uses ``A_l = C_A' @ W0_l`` with ``C_A'`` of
shape ``r x d_out`` (our extension, not from the paper). Init: ``C_A`` Kaiming-uniform, ``C_B`` zero (``dW = 0``).
Trainable parameters: ``r * (d_in + d_in)`` per group (square), i.e. 1/L of LoRA's over L layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lsrfx.adapters.base import Adapter, AdapterConfig, LayerSpec, check_rank


@dataclass
class CondLoRAConfig(AdapterConfig):
    """``r``: rank; ``alpha``: scale ``alpha / r`` (paper: r = alpha = 8)."""

    method = "condlora"
    r: int = 8
    alpha: float = 8.0

    def check(self, spec: LayerSpec) -> None:
        check_rank(spec, self.r, "condlora")

    def build(self, specs: list[LayerSpec]) -> list[Adapter]:
        groups: dict[tuple, ConversionPair] = {}
        adapters = []
        for spec in specs:
            key = (group_name(spec.name), spec.d_out, spec.d_in)
            if key not in groups:
                groups[key] = ConversionPair(spec, self.r)
            adapters.append(CondLoRAAdapter(spec, self, groups[key]))
        return adapters

    def build_one(self, spec: LayerSpec) -> Adapter:
        return self.build([spec])[0]


def group_name(layer_name: str) -> str:
    """The name that groups layers sharing one conversion pair: the module's last path component."""
    return layer_name.rsplit(".", 1)[-1]


class ConversionPair(nn.Module):
    """The shared trainable ``C_A``, ``C_B`` of one group."""

    def __init__(self, spec: LayerSpec, r: int) -> None:
        super().__init__()
        kw = dict(dtype=spec.adapter_dtype, device=spec.device)
        self.square = spec.d_in == spec.d_out
        self.C_A = nn.Parameter(torch.empty(r, spec.d_in if self.square else spec.d_out, **kw))
        self.C_B = nn.Parameter(torch.zeros(r, spec.d_in, **kw))
        nn.init.kaiming_uniform_(self.C_A, a=math.sqrt(5))


class CondLoRAAdapter(Adapter):
    def __init__(self, spec: LayerSpec, config: CondLoRAConfig, pair: ConversionPair) -> None:
        super().__init__(spec)
        self.rank, self.scale = config.r, config.alpha / config.r
        self.pair = pair  # shared: the same module object sits under every layer of the group

    def factors(self, w0: Tensor) -> tuple[Tensor, Tensor]:
        w = w0.detach().to(self.pair.C_A.dtype)  # W0 is frozen: gradients flow to C_A, C_B only
        a = self.pair.C_A @ (w.t() if self.pair.square else w)
        b = w @ self.pair.C_B.t()
        return a, b
