"""A whole GenLoRA layer in eager training, ``x @ W0.T + bias + s * (x @ A.T) @ B.T`` with ``A`` and ``B`` synthesised
by RBF banks (:mod:`lsrfx.kernels.rbf_bank`), keeping only the parameters of the banks for the backward.

Through the generic low-rank path, autograd keeps the synthesised factors from forward to backward (``r x (d_in +
d_out)`` values per layer: at GenLoRA's default r = 32, four times what LoRA's saved activations add per token of
rank). The factors are cheap to synthesise again, so :class:`GenLoRALinear` saves ``x``, ``x @ A.T`` and the
banks' parameters and forms ``A`` and ``B`` anew in the backward, from the same RBF features as the banks'
gradients: each bank's features are computed once there, as the bank's own backward alone would. Used by
``GenLoRAAdapter.eager_linear`` when every tensor is a plain one of one dtype outside autocast; under
``torch.compile`` the layer is fused by the pass as before.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lsrfx.kernels.rbf_bank import rbf_bank_backward_values, rbf_bank_features, rbf_bank_forward, weigh_features


class GenLoRALinear(torch.autograd.Function):
    """``x @ W0.T + bias + scale * (x @ A.T) @ B.T`` with ``A = bank(*a_bank)`` (``r x d_in``) and ``B.T =
    bank(*b_bank)`` (``r x d_out``); ``w0`` is the logical ``d_out x d_in`` weight (frozen: no gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, w0: Tensor, bias: Tensor | None, scale: float, basis: str,
                z_a: Tensor, c_a: Tensor, lg_a: Tensor, w_a: Tensor,
                z_b: Tensor, c_b: Tensor, lg_b: Tensor, w_b: Tensor) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        a = rbf_bank_forward(z_a, c_a, lg_a, w_a, basis)  # (r, d_in)
        bt = rbf_bank_forward(z_b, c_b, lg_b, w_b, basis)  # (r, d_out)
        u = x2 @ a.t()  # (t, r)
        out = torch.addmm(bias, x2, w0.t()) if bias is not None else x2 @ w0.t()
        out.addmm_(u, bt, alpha=scale)
        ctx.save_for_backward(x2, w0, u, z_a, c_a, lg_a, w_a, z_b, c_b, lg_b, w_b)
        ctx.scale, ctx.basis, ctx.x_shape = scale, basis, x.shape
        # Shaped by resize_, not view: a custom Function's output that is a view of a tensor made inside may not be
        # edited in place downstream.
        return out.resize_(*x.shape[:-1], out.shape[1])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple:
        x2, w0, u, *banks = ctx.saved_tensors
        a_bank, b_bank = banks[:4], banks[4:]
        basis, need = ctx.basis, ctx.needs_input_grad
        # Formed again instead of kept; the features serve both the factor and the bank's gradients.
        features_a, features_b = rbf_bank_features(*a_bank[:3]), rbf_bank_features(*b_bank[:3])
        a = weigh_features(features_a.phi, a_bank[3], basis)
        bt = weigh_features(features_b.phi, b_bank[3], basis)
        g = grad.reshape(-1, grad.shape[-1])
        grad_bt = (u.t() @ g).mul_(ctx.scale)  # (r, d_out)
        grad_u = (g @ bt.t()).mul_(ctx.scale)  # (t, r)
        grad_x = (g @ w0).addmm_(grad_u, a).reshape(ctx.x_shape) if need[0] else None
        grad_bias = g.sum(0) if need[2] else None
        grads_a = rbf_bank_backward_values(grad_u.t() @ x2, *a_bank, basis, features_a)
        grads_b = rbf_bank_backward_values(grad_bt, *b_bank, basis, features_b)
        bank_grads = [gr if n else None for gr, n in zip((*grads_a, *grads_b), need[5:], strict=True)]
        return grad_x, None, grad_bias, None, None, *bank_grads
