"""LSR-Adapt (Li & Sarwate, arXiv 2502.13568): each LoRA factor is a sum of ``S`` Kronecker products.

    A = sum_k A1[k] (x) A2[k]    A1: (S, r1, a1), A2: (S, r2, a2)    r = r1*r2, d_in  = a1*a2
    B = sum_k B1[k] (x) B2[k]    B1: (S, b1, r1), B2: (S, b2, r2)               d_out = b1*b2

Parameters per layer: ``S * (r1*a1 + r2*a2 + b1*r1 + b2*r2)``. By default the dimensions split into their most
balanced divisor pair (768 -> 32 x 24) and ``B1`` starts at zero so ``dW = 0``; ``init="paper"`` draws every
factor from N(0, 0.01^2) as the authors' code does (pair it with their very large ``alpha``, e.g. 16384 at r = 4,
which is scale 4096).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lsrfx.adapters.base import Adapter, AdapterConfig, LayerSpec, alpha_field, check_rank, option_field
from lsrfx.errors import LsrfxError
from lsrfx.kernels.kron_sum import KronSum, kron_sum


def balanced_split(d: int) -> tuple[int, int]:
    """The divisor pair ``(f1, f2)``, ``f1 >= f2``, ``f1 * f2 == d``, closest to ``sqrt(d)`` (768 -> (32, 24))."""
    f2 = max(f for f in range(1, math.isqrt(d) + 1) if d % f == 0)
    return d // f2, f2


@dataclass
class LSRConfig(AdapterConfig):
    """LSR-Adapt's options; rank ``r = r1 * r2``.

    Defaults r1 = 2, r2 = 4, S = 11: rank 8 at about the parameter count of the paper's r1 = r2 = 2, S = 16, chosen
    over it on the validation split of ``lsrfx finetune``'s task (docs/results.md, "Quality per parameter", has the
    measurements). ``LSRConfig(r2=2, separation_rank=16)`` is the paper's setting."""

    method = "lsr"
    r1: int = option_field(2, "rank of the first Kronecker factor (the update's rank is r1 * r2)", minimum=1)
    r2: int = option_field(4, "rank of the second Kronecker factor", minimum=1)
    separation_rank: int = option_field(11, "number S of Kronecker products summed in each factor", minimum=1)
    alpha: float = alpha_field(4.0)
    in_factors: tuple[int, int] | None = option_field(None, "split of d_in into a1 x a2 (default: most balanced)",
                                                      minimum=1)
    out_factors: tuple[int, int] | None = option_field(None, "split of d_out into b1 x b2 (default: most balanced)",
                                                       minimum=1)
    init: Literal["zero", "paper"] = option_field(
        "zero", "initialisation: zero (dW = 0 at start) or paper (factors from N(0, 0.01^2), as the authors' code)")

    @property
    def r(self) -> int:
        return self.r1 * self.r2

    def __post_init__(self) -> None:
        if self.init not in ("zero", "paper"):
            raise LsrfxError(f"lsr: init={self.init!r} is unknown; use 'zero' (dW = 0 at start) or 'paper'.")
        super().__post_init__()

    def splits(self, spec: LayerSpec) -> tuple[tuple[int, int], tuple[int, int]]:
        """``(a1, a2)`` splitting ``d_in`` and ``(b1, b2)`` splitting ``d_out``, checked."""
        result = []
        for what, d, given in (("d_in", spec.d_in, self.in_factors), ("d_out", spec.d_out, self.out_factors)):
            option = "in_factors" if what == "d_in" else "out_factors"
            if given is not None:
                if len(given) != 2 or given[0] * given[1] != d:
                    raise LsrfxError(
                        f"lsr: {option}={given} does not factor {what}={d} of layer '{spec.name}' "
                        f"(weight {spec.shape_text}); pass two integers whose product is {d}, e.g. {balanced_split(d)}."
                    )
                split = given
            else:
                split = balanced_split(d)
            if min(split) < 2:
                raise LsrfxError(
                    f"lsr: {what}={d} of layer '{spec.name}' (weight {spec.shape_text}) has no useful Kronecker split "
                    f"(best is {split[0]} x {split[1]}); leave this layer out of `targets`, pass {option}=(p, q) "
                    f"with p, q >= 2, or use method='lora'."
                )
            result.append(split)
        return result[0], result[1]

    def check(self, spec: LayerSpec) -> None:
        check_rank(spec, self.r, "lsr")
        (a1, a2), (b1, b2) = self.splits(spec)
        if self.r1 > min(a1, b1) or self.r2 > min(a2, b2):
            raise LsrfxError(
                f"lsr: ranks r1={self.r1}, r2={self.r2} exceed the Kronecker factors of layer '{spec.name}' "
                f"(weight {spec.shape_text}, d_in split {a1} x {a2}, d_out split {b1} x {b2}); need "
                f"r1 <= {min(a1, b1)} and r2 <= {min(a2, b2)}: lower r1/r2 or pass in_factors/out_factors."
            )

    def build_one(self, spec: LayerSpec) -> Adapter:
        return LSRAdapter(spec, self)

    def parameter_count(self, spec: LayerSpec) -> int:
        return lsr_parameter_count(self, spec)


def lsr_parameter_count(config: LSRConfig, spec: LayerSpec) -> int:
    """``S * (r1*a1 + r2*a2 + b1*r1 + b2*r2)``: the paper's count, used by tests and docs."""
    (a1, a2), (b1, b2) = config.splits(spec)
    r1, r2 = config.r1, config.r2
    return config.separation_rank * (r1 * a1 + r2 * a2 + b1 * r1 + b2 * r2)


class LSRAdapter(Adapter):
    def __init__(self, spec: LayerSpec, config: LSRConfig) -> None:
        super().__init__(spec)
        (a1, a2), (b1, b2) = config.splits(spec)
        s, r1, r2 = config.separation_rank, config.r1, config.r2
        self.rank, self.scale = r1 * r2, config.alpha / (r1 * r2)
        self.in_factors, self.out_factors = (a1, a2), (b1, b2)
        kw = dict(dtype=spec.adapter_dtype, device=spec.device)
        self.A1 = nn.Parameter(torch.empty(s, r1, a1, **kw))
        self.A2 = nn.Parameter(torch.empty(s, r2, a2, **kw))
        self.B1 = nn.Parameter(torch.empty(s, b1, r1, **kw))
        self.B2 = nn.Parameter(torch.empty(s, b2, r2, **kw))
        self.init = config.init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The configured init (also after ``to_empty`` of a meta-device model)."""
        s = self.A1.shape[0]
        with torch.no_grad():
            if self.init == "paper":
                for p in (self.A1, self.A2, self.B1, self.B2):
                    p.normal_(0.0, 0.01)
            else:
                # A gets LoRA's entry variance 1/(3 d_in) (S terms of products of two N(0, sigma^2));
                # B1 = 0 gives dW = 0, and B2 ~ N(0, 1/S) keeps B's first steps LoRA-sized under Adam.
                sigma_a = (3.0 * self.d_in * s) ** -0.25
                self.A1.normal_(0.0, sigma_a)
                self.A2.normal_(0.0, sigma_a)
                self.B1.zero_()
                self.B2.normal_(0.0, s**-0.5)

    def factors(self, w0: Tensor) -> tuple[Tensor, Tensor]:
        # The op marks the structure for the compile pass and the export; eagerly its bodies run behind an
        # autograd.Function (a custom op's dispatch costs more than the arithmetic of these small sums).
        traced = torch.compiler.is_compiling() or torch.compiler.is_exporting()
        kron = kron_sum if traced else KronSum.apply
        return kron(self.A1, self.A2), kron(self.B1, self.B2)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, S={self.A1.shape[0]}, in_factors={self.in_factors}, "
            f"out_factors={self.out_factors}"
        )
