"""``lsrfx::rbf_bank``: GenLoRA's factor synthesis, a bank of radial basis functions weighted or mixed, as one op.

``rbf_bank(Z, centres, log_gamma, weights, basis)`` is, with ``Phi[i, j] = exp(-||Z[j] - centres[i]||^2 *
exp(log_gamma[i]))`` (``m x n``):

* ``basis="rbf"``: ``weights[i] * Phi[i, j]`` (``weights``: the ``r = m`` amplitudes);
* ``basis="centred"``: ``weights[i] * (Phi[i, j] - mean_k Phi[i, k])``;
* ``basis="mixed"``: ``(weights @ Phi) / sqrt(n)`` (``weights``: the ``r x m`` mixing matrix).

Every argument may carry the same leading batch dimensions: ``Z`` ``(..., n, g)``, ``centres`` ``(..., m, g)``,
``log_gamma`` ``(..., m)``, ``weights`` ``(..., r)`` or ``(..., r, m)``; the result is ``(..., r, n)``, each batch
element exactly what it would be alone (the same elementwise arithmetic).

Why an op (see ``docs/architecture.md``, "Compile time"): GenLoRA's factors depend on its parameters only, so
Inductor schedules every layer's synthesis, forward and backward, side by side and generates code for each; marked as
this op in a captured graph, the compile pass stacks the layers whose banks have the same shapes and calls the op
once on the stack (:func:`lsrfx.passes.fuse.batch_factor_ops`), one call per shape whatever the depth. The op and its
backward (``lsrfx::rbf_bank_backward``) are opaque ``custom_op``s: Inductor calls them as they are instead of
generating and compiling C++ for the synthesis, which was most of what GenLoRA added to a cold compile. Their
bodies (:func:`rbf_bank_forward`, :func:`rbf_bank_backward_values`) are written for eager execution, with as few
passes over the ``m x n`` values as the arithmetic allows (in-place updates of fresh temporaries; the latent and
centre gradients as two small matrix products). In eager mode GenLoRA runs the same two bodies without the op
(a ``custom_op`` call's Python dispatch costs more than the arithmetic of a small bank): in training inside its
whole-layer function (:mod:`lsrfx.kernels.genlora_linear`), elsewhere through :class:`RbfBank`, a plain
``autograd.Function``; either way the backward recomputes ``Phi``, so only the parameters stay alive for it.
``torch.export`` keeps the plain torch functions (:func:`rbf_bank_reference`, the same values), so exported graphs
hold standard ops.

:func:`rbf_bank_reference` and :func:`rbf_bank_grads` are the plain statement of the math the op is tested against.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

BASES = ("rbf", "centred", "mixed")
NEG_LOG2_E = -1 / math.log(2)
LN_2 = math.log(2)


def sq_distances(z: Tensor, centres: Tensor) -> Tensor:
    """``out[..., i, j] = ||z[..., j, :] - centres[..., i, :]||^2``: ``(..., m, n)``.

    Summed over the latent dimension ``g`` term by term rather than as one reduction over an ``(m, n, g)``
    broadcast: the centres' gradient is then a reduction over ``n`` per latent coordinate, not one ending in ``g``
    (see the module docstring)."""
    out = (centres[..., :, 0, None] - z[..., None, :, 0]).pow(2)
    for k in range(1, z.shape[-1]):
        out = out + (centres[..., :, k, None] - z[..., None, :, k]).pow(2)
    return out


def rbf_features(z: Tensor, centres: Tensor, log_gamma: Tensor) -> Tensor:
    """``Phi[..., i, j] = exp(-||z_j - centres_i||^2 * exp(log_gamma_i))``: ``(..., m, n)``."""
    return torch.exp(-sq_distances(z, centres) * log_gamma.exp().unsqueeze(-1))


def rbf_bank_reference(z: Tensor, centres: Tensor, log_gamma: Tensor, weights: Tensor, basis: str) -> Tensor:
    """The bank ``(..., r, n)`` of the module docstring, in plain torch."""
    phi = rbf_features(z, centres, log_gamma)
    if basis == "mixed":
        return (weights @ phi) * z.shape[-2] ** -0.5
    if basis == "centred":
        phi = phi - phi.mean(dim=-1, keepdim=True)
    return weights.unsqueeze(-1) * phi


def rbf_bank_grads(grad: Tensor, z: Tensor, centres: Tensor, log_gamma: Tensor, weights: Tensor,
                   basis: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(grad_Z, grad_centres, grad_log_gamma, grad_weights)`` of :func:`rbf_bank_reference` for the output
    gradient ``grad`` (``(..., r, n)``). ``Phi`` is recomputed (``m x n`` values, cheaper than keeping it)."""
    gamma = log_gamma.exp().unsqueeze(-1)  # (..., m, 1)
    sq = sq_distances(z, centres)  # (..., m, n)
    phi = torch.exp(-sq * gamma)
    if basis == "mixed":
        s = z.shape[-2] ** -0.5
        grad_w = (grad @ phi.mT) * s  # (..., r, m)
        grad_phi = (weights.mT @ grad) * s  # (..., m, n)
    else:
        w = weights.unsqueeze(-1)
        if basis == "centred":
            grad_w = (grad * (phi - phi.mean(dim=-1, keepdim=True))).sum(-1)
            grad_phi = w * grad
            grad_phi = grad_phi - grad_phi.mean(dim=-1, keepdim=True)  # the mean's gradient spreads over n
        else:
            grad_w = (grad * phi).sum(-1)
            grad_phi = w * grad
    grad_arg = grad_phi * phi  # gradient of the exponent -sq * gamma
    grad_log_gamma = -(grad_arg * sq).sum(-1) * gamma.squeeze(-1)
    grad_sq = -(grad_arg * gamma)  # (..., m, n)
    grad_c, grad_z = [], []
    for k in range(z.shape[-1]):  # sq = sum_k (c_k - z_k)^2, one latent coordinate at a time
        t = grad_sq * (2 * (centres[..., :, k, None] - z[..., None, :, k]))
        grad_c.append(t.sum(-1))  # (..., m): a reduction over the n positions
        grad_z.append(-t.sum(-2))  # (..., n)
    return torch.stack(grad_z, -1), torch.stack(grad_c, -1), grad_log_gamma, grad_w


def rbf_bank_empty(z: Tensor, weights: Tensor, basis: str) -> Tensor:
    """An empty tensor of the bank's shape and dtype (the op's fake function)."""
    r = weights.shape[-2] if basis == "mixed" else weights.shape[-1]
    return weights.new_empty([*weights.shape[:-2 if basis == "mixed" else -1], r, z.shape[-2]])


def rows_with_ones(t: Tensor) -> Tensor:
    """``t`` (``(..., k, g)``: latents or centres) as contiguous rows with a row of ones below: ``(..., g + 1, k)``.
    Each coordinate is then a row of unit stride: a difference against a column of centres reads it several times
    faster than the strided column ``t[..., j]``, and a product with these rows contracts along unit stride (the
    ones row gives the same product's row sums). Formed by ``cat``, whose copy of the transpose is faster on CPU
    than ``contiguous()``'s at these shapes."""
    return torch.cat([t.mT, t.new_ones(*t.shape[:-2], 1, t.shape[-2])], -2)


def _scaled_sq_distances(z_rows: Tensor, centres: Tensor, scale: Tensor) -> Tensor:
    """``scale_i * ||z_j - centres_i||^2`` as a fresh ``(..., m, n)`` tensor from the latents' rows
    (:func:`rows_with_ones`), accumulated in place term by term (a difference and a fused multiply-add per latent
    coordinate)."""
    out = torch.sub(centres[..., :, 0, None], z_rows[..., 0:1, :]).square_()
    for k in range(1, centres.shape[-1]):
        diff = torch.sub(centres[..., :, k, None], z_rows[..., k:k + 1, :])
        out.addcmul_(diff, diff)
    return out.mul_(scale.unsqueeze(-1))


class BankFeatures(NamedTuple):
    """What both a bank and its gradients are made from: the widths ``gamma = exp(log_gamma)`` (``(..., m)``),
    ``log2_phi = -gamma * ||z - c||^2 / ln 2`` and ``phi = exp2(log2_phi)``, the features (two ``(..., m, n)``
    maps), and the latents as :func:`rows_with_ones`."""

    gamma: Tensor
    log2_phi: Tensor
    phi: Tensor
    z_rows: Tensor


def rbf_bank_features(z: Tensor, centres: Tensor, log_gamma: Tensor) -> BankFeatures:
    """The bank's :class:`BankFeatures`. The exponent is kept in base 2 (the sign and ``1 / ln 2`` folded into
    the widths) so the features are one ``exp2`` of it: on CPU torch's ``exp2`` kernel runs several times faster
    than its ``exp``, and the values agree to a few ulp."""
    gamma, z_rows = log_gamma.exp(), rows_with_ones(z)
    log2_phi = _scaled_sq_distances(z_rows, centres, gamma * NEG_LOG2_E)
    return BankFeatures(gamma, log2_phi, torch.exp2(log2_phi), z_rows)


def weigh_features(phi: Tensor, weights: Tensor, basis: str, *, in_place: bool = False) -> Tensor:
    """The bank from its features ``Phi`` (``(..., m, n)``): weighted, centred and weighted, or mixed. ``in_place``
    reuses ``phi``'s storage (when nothing else needs the features)."""
    if basis == "mixed":
        return (weights @ phi).mul_(phi.shape[-1] ** -0.5)
    if basis == "centred":
        mean = phi.mean(-1, keepdim=True)
        phi = phi.sub_(mean) if in_place else phi - mean
        return phi.mul_(weights.unsqueeze(-1))
    return phi.mul_(weights.unsqueeze(-1)) if in_place else phi * weights.unsqueeze(-1)


def rbf_bank_forward(z: Tensor, centres: Tensor, log_gamma: Tensor, weights: Tensor, basis: str) -> Tensor:
    """:func:`rbf_bank_reference`'s values with in-place updates of one fresh ``(..., m, n)`` tensor (the exponent
    in base 2, as in :func:`rbf_bank_features`)."""
    phi = _scaled_sq_distances(rows_with_ones(z), centres, log_gamma.exp() * NEG_LOG2_E).exp2_()
    return weigh_features(phi, weights, basis, in_place=True)


def rbf_bank_backward_values(grad: Tensor, z: Tensor, centres: Tensor, log_gamma: Tensor, weights: Tensor,
                             basis: str, features: BankFeatures | None = None,
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`rbf_bank_grads`'s values with fewer passes over the ``m x n`` maps. The features are recomputed, or
    taken from ``features`` (what :func:`rbf_bank_features` returned for these arguments) when the caller has them
    already. The exponent's gradient is ``k_i * q_ij``, with ``q`` the one map formed here and ``k_i`` a factor per
    RBF (the amplitude, or the mixed basis's ``1/sqrt(n)``), which is applied to the small results instead of the
    map: ``dL/dlog_gamma_i = -k_i sum_j q_ij e_ij`` with ``e = -ln 2 * log2_phi``, and with ``h = -2 gamma_i k_i
    q_ij``, ``dL/dc_i = c_i sum_j h_ij - sum_j h_ij z_j`` and ``dL/dz_j = z_j sum_i h_ij - sum_i h_ij c_i``, each
    pair of sums one matrix product with ``q`` (a row of ones appended to the other factor)."""
    gamma, log2_phi, phi, z_rows = features if features is not None else rbf_bank_features(z, centres, log_gamma)
    if basis == "mixed":
        s = z.shape[-2] ** -0.5
        grad_w = (grad @ phi.mT).mul_(s)
        q = (weights.mT @ grad).mul_(phi)
        k = torch.full_like(gamma, s)
    else:
        grad_w = torch.linalg.vecdot(grad, phi)
        if basis == "centred":
            grad_sum = grad.sum(-1, keepdim=True)
            grad_w = grad_w - phi.mean(-1) * grad_sum.squeeze(-1)
            q = torch.sub(grad, grad_sum, alpha=1 / grad.shape[-1]).mul_(phi)  # the mean's gradient spreads over n
        else:
            q = torch.mul(grad, phi)
        k = weights
    # d(-gamma sq) / d log_gamma = -gamma sq = -e = ln 2 * log2_phi
    grad_log_gamma = torch.linalg.vecdot(q, log2_phi).mul_(k * LN_2)
    h_scale = (gamma * k).mul_(-2).unsqueeze(-1)  # (..., m, 1)
    by_centre = (q @ z_rows.mT).mul_(h_scale)  # (..., m, g + 1): h @ z and h's row sums
    # (..., n, g + 1), formed as its transpose: a product with n rows and g + 1 columns is several times slower
    by_position = ((rows_with_ones(centres) * h_scale.mT) @ q).mT
    grad_c = centres * by_centre[..., -1:] - by_centre[..., :-1]
    grad_z = z * by_position[..., -1:] - by_position[..., :-1]
    return grad_z, grad_c, grad_log_gamma, grad_w


@torch.library.custom_op("lsrfx::rbf_bank", mutates_args=())
def rbf_bank(z: Tensor, centres: Tensor, log_gamma: Tensor, weights: Tensor, basis: str) -> Tensor:
    """GenLoRA's bank; see the module docstring."""
    return rbf_bank_forward(z, centres, log_gamma, weights, basis)


@rbf_bank.register_fake
def _(z: Tensor, centres: Tensor, log_gamma: Tensor, weights: Tensor, basis: str) -> Tensor:
    return rbf_bank_empty(z, weights, basis)


@torch.library.custom_op("lsrfx::rbf_bank_backward", mutates_args=())
def rbf_bank_backward(grad: Tensor, z: Tensor, centres: Tensor, log_gamma: Tensor, weights: Tensor,
                      basis: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The bank's gradients (:func:`rbf_bank_grads`) as one op, opaque to Inductor like the forward."""
    return rbf_bank_backward_values(grad, z, centres, log_gamma, weights, basis)


@rbf_bank_backward.register_fake
def _(grad: Tensor, z: Tensor, centres: Tensor, log_gamma: Tensor, weights: Tensor,
      basis: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return torch.empty_like(z), torch.empty_like(centres), torch.empty_like(log_gamma), torch.empty_like(weights)


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    z, centres, log_gamma, weights, basis = inputs
    ctx.save_for_backward(z, centres, log_gamma, weights)
    ctx.basis = basis


def _backward(ctx, grad: Tensor) -> tuple:
    grads = torch.ops.lsrfx.rbf_bank_backward(grad, *ctx.saved_tensors, ctx.basis)
    return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:4], strict=True)), None)


rbf_bank.register_autograd(_backward, setup_context=_setup_context)


class RbfBank(torch.autograd.Function):
    """The bank in eager mode: the op's own bodies (:func:`rbf_bank_forward`, :func:`rbf_bank_backward_values`)
    behind an ``autograd.Function``, which dispatches with far less Python than a ``custom_op`` call. Under
    ``torch.compile`` callers use the op, which the compile pass reads and batches."""

    @staticmethod
    def forward(ctx, z: Tensor, centres: Tensor, log_gamma: Tensor, weights: Tensor, basis: str) -> Tensor:
        ctx.save_for_backward(z, centres, log_gamma, weights)
        ctx.basis = basis
        return rbf_bank_forward(z, centres, log_gamma, weights, basis)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple:
        grads = rbf_bank_backward_values(grad, *ctx.saved_tensors, ctx.basis)
        return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:4], strict=True)), None)
