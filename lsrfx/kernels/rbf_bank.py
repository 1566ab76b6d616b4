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
Inductor schedules every layer's synthesis, forward and backward, side by side and fuses them into one C++ kernel per
graph whose source grows with the number of layers: nothing to share between layers, and C++ compile and code
generation grew by seconds per decoder layer. Marked as this op in a captured graph, the compile pass stacks the
layers whose banks have the same shapes and calls the op once on the stack (:func:`lsrfx.passes.fuse.batch_factor_ops`),
so the generated code is one kernel per shape, whatever the depth. GenLoRA calls the op in eager mode too, where its
backward's recomputation keeps only the parameters alive for the backward; ``torch.export`` keeps the plain torch
functions (:func:`rbf_bank_reference`, the same values), so exported graphs hold standard ops.

The backward is written out (:func:`rbf_bank_grads`) so that it also follows the layout rule of
:mod:`lsrfx.kernels.layout`: the squared distances are summed over the latent dimension ``g``
term by term, so the centres' gradient is a reduction over the ``n`` positions per latent coordinate, never one
ending in ``g``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lsrfx.kernels.torch_body_op import torch_body_op

BASES = ("rbf", "centred", "mixed")


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


def _rbf_bank(z: Tensor, centres: Tensor, log_gamma: Tensor, weights: Tensor, basis: str) -> Tensor:
    """GenLoRA's bank; see the module docstring."""
    return rbf_bank_reference(z, centres, log_gamma, weights, basis)


rbf_bank = torch_body_op("lsrfx::rbf_bank", _rbf_bank)  # Inductor compiles the body in the graph


@rbf_bank.register_fake
def _(z: Tensor, centres: Tensor, log_gamma: Tensor, weights: Tensor, basis: str) -> Tensor:
    return rbf_bank_empty(z, weights, basis)


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    z, centres, log_gamma, weights, basis = inputs
    ctx.save_for_backward(z, centres, log_gamma, weights)
    ctx.basis = basis


def _backward(ctx, grad: Tensor) -> tuple:
    grads = rbf_bank_grads(grad, *ctx.saved_tensors, ctx.basis)
    return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:4], strict=True)), None)


rbf_bank.register_autograd(_backward, setup_context=_setup_context)
