"""One entry per adapter method for the tests: its small options, and an independent reference of its factors
``A`` (``r x d_in``) and ``B`` (``d_out x r``) written from the method's definition in float64, without lsrfx's code
(no ``kron_sum`` op, no RBF helpers).

Adding a method to lsrfx adds one entry to :data:`REFERENCES` (a test fails naming the method until it exists):
every method-parametrized test then runs it with its ``tiny_options`` (``conftest.TINY_OPTIONS``), and every test
comparing factors or updates with a reference reads its formula here.

Constraints the tiny options meet:

* they fit every layer the tests adapt with them: the sides are even and >= 8 (smallest: tiny_mlp's 8 x 10, T5's
  8 x 16 in test_architectures), so ranks <= 6 fit, and LSR's r1 = r2 = 2 fit both factors of the balanced
  Kronecker split of an even side (e.g. 8 = 4 x 2, 10 = 5 x 2);
* the rank stays below the smaller side of those layers, so "rank(dW) <= r" checks have teeth;
* LoRA and CondLoRA scale by alpha / r = 2, not 1, so a dropped scale shows;
* on ToyNet's 32 x 32 layers every structured method has fewer adapter parameters than LoRA (LoRA 256 per layer,
  LSR 144, CondLoRA 256 per group of layers, GenLoRA 176): tests/test_distributed.py asserts it communicates less.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Reference:
    """``tiny_options``: small options for every test that runs "each method"; ``factors(params, w0, adapter)``:
    ``(A, B)`` from the adapter's parameters (float64, by their names under the adapter) and the frozen ``w0``
    (``d_out x d_in``, float64); ``linear_in_dw``: a parameter ``dW`` is linear in (tests rescale it to give ``dW`` a
    chosen size)."""

    tiny_options: dict[str, Any]
    factors: Callable[[dict[str, Tensor], Tensor, nn.Module], tuple[Tensor, Tensor]]
    linear_in_dw: str


def _lora(p: dict[str, Tensor], w0: Tensor, adapter: nn.Module) -> tuple[Tensor, Tensor]:
    return p["lora_A"], p["lora_B"]


def _lsr(p: dict[str, Tensor], w0: Tensor, adapter: nn.Module) -> tuple[Tensor, Tensor]:
    """Li & Sarwate: each factor a sum of Kronecker products."""
    a = sum(torch.kron(p["A1"][k], p["A2"][k]) for k in range(p["A1"].shape[0]))
    b = sum(torch.kron(p["B1"][k], p["B2"][k]) for k in range(p["B1"].shape[0]))
    return a, b


def _condlora(p: dict[str, Tensor], w0: Tensor, adapter: nn.Module) -> tuple[Tensor, Tensor]:
    """Kim et al.: A = C_A W0^T (square W0; lsrfx's extension C_A W0 otherwise), B = W0 C_B^T."""
    c_a, c_b = p["pair.C_A"], p["pair.C_B"]
    a = c_a @ w0.t() if w0.shape[0] == w0.shape[1] else c_a @ w0
    return a, w0 @ c_b.t()


def _genlora(p: dict[str, Tensor], w0: Tensor, adapter: nn.Module) -> tuple[Tensor, Tensor]:
    """lsrfx's reconstruction: RBF features of per-position latents, centred per row for basis "centred", scaled
    by amplitudes (or mixed by a matrix for basis "mixed")."""
    def features(z: Tensor, centres: Tensor, log_gamma: Tensor) -> Tensor:
        phi = torch.exp(-torch.cdist(centres, z) ** 2 * log_gamma.exp()[:, None])
        return phi - phi.mean(1, keepdim=True) if adapter.basis == "centred" else phi

    phi_a = features(p["Z_A"], p["centres_A"], p["log_gamma_A"])
    phi_b = features(p["Z_B"], p["centres_B"], p["log_gamma_B"])
    if adapter.basis == "mixed":
        return p["mix_A"] @ phi_a / w0.shape[1] ** 0.5, (p["mix_B"] @ phi_b / w0.shape[0] ** 0.5).t()
    return p["amplitude_A"][:, None] * phi_a, (p["amplitude_B"][:, None] * phi_b).t()


REFERENCES: dict[str, Reference] = {
    "lora": Reference(dict(r=4, alpha=8.0), _lora, "lora_B"),
    "lsr": Reference(dict(r1=2, r2=2, separation_rank=3, alpha=4.0), _lsr, "B1"),
    "condlora": Reference(dict(r=4, alpha=8.0), _condlora, "pair.C_B"),
    "genlora": Reference(dict(r=6, group_size=2, alpha=6.0), _genlora, "amplitude_B"),
}


def reference_for(method: str) -> Reference:
    if method not in REFERENCES:
        raise AssertionError(f"no reference for method {method!r}: add its independent formula to tests/references.py")
    return REFERENCES[method]


def reference_factors(method: str, adapter: nn.Module, w0: Tensor) -> tuple[Tensor, Tensor]:
    """``(A, B)`` in float64 for ``adapter`` (a layer's adapter of ``method``) and its frozen ``w0``. ``W0`` enters
    at the adapter's (master) precision, as the methods' factors are functions of the frozen weight."""
    params = {n: t.detach().double() for n, t in adapter.named_parameters()}
    master = next(iter(adapter.parameters())).dtype
    a, b = reference_for(method).factors(params, w0.detach().to(master).double(), adapter)
    assert a.shape == (adapter.rank, w0.shape[1]) and b.shape == (w0.shape[0], adapter.rank)
    return a, b


def reference_delta(method: str, adapter: nn.Module, w0: Tensor) -> Tensor:
    """``scale * B @ A`` in float64."""
    a, b = reference_factors(method, adapter, w0)
    return adapter.scale * (b @ a)
