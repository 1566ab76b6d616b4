"""GenLoRA (Ouyang et al., arXiv 2602.05709), as reconstructed by lsrfx: factors synthesised by radial basis functions.

The paper's claim: keep one latent vector per low-rank matrix and synthesise its basis vectors with a bank of
lightweight RBFs, so rank costs a few parameters per RBF instead of a whole basis vector. The paper's equations
were not available to us; this is our reconstruction (documented as such):

    latent  Z_A: d_in x g,  Z_B: d_out x g          (g = group size, a small integer)
    RBF i   centre c_i (g), log-width l_i (gamma_i = exp(l_i)), amplitude w_i
    A[i, j] = w^A_i * exp(-||Z_A[j] - c^A_i||^2 * gamma^A_i)      i < r
    B[j, i] = w^B_i * exp(-||Z_B[j] - c^B_i||^2 * gamma^B_i)

Parameters per layer: ``g*(d_in + d_out) + 2*r*(g + 2)``. ``w^B = 0`` at start, so ``dW = 0``; ``w^A`` starts at
``1/sqrt(d_in)`` so the rows of ``A`` have roughly LoRA's norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lsrfx.adapters.base import Adapter, AdapterConfig, LayerSpec, alpha_field, check_rank, option_field, rank_field
from lsrfx.errors import LsrfxError


@dataclass
class GenLoRAConfig(AdapterConfig):
    """GenLoRA's options (our reconstruction's defaults: r = alpha = 32, g = 2)."""

    method = "genlora"
    r: int = rank_field(32)
    group_size: int = option_field(2, "dimension g of the latent vector of each row of A and of B")
    alpha: float = alpha_field(32.0)

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise LsrfxError(f"genlora: group_size={self.group_size} must be >= 1 (typical: 1 to 4).")

    def check(self, spec: LayerSpec) -> None:
        check_rank(spec, self.r, "genlora")

    def build_one(self, spec: LayerSpec) -> Adapter:
        return GenLoRAAdapter(spec, self)


def rbf_bank(z: Tensor, centres: Tensor, log_gamma: Tensor, amplitude: Tensor) -> Tensor:
    """``out[i, j] = amplitude_i * exp(-||z_j - centres_i||^2 * exp(log_gamma_i))``: ``(r, n)``."""
    sq_dist = (centres.unsqueeze(1) - z.unsqueeze(0)).pow(2).sum(-1)  # (r, n)
    return amplitude.unsqueeze(1) * torch.exp(-sq_dist * log_gamma.exp().unsqueeze(1))


class GenLoRAAdapter(Adapter):
    def __init__(self, spec: LayerSpec, config: GenLoRAConfig) -> None:
        super().__init__(spec)
        r, g = config.r, config.group_size
        self.rank, self.scale = r, config.alpha / r
        kw = dict(dtype=spec.adapter_dtype, device=spec.device)
        self.Z_A = nn.Parameter(torch.empty(spec.d_in, g, **kw))
        self.Z_B = nn.Parameter(torch.empty(spec.d_out, g, **kw))
        self.centres_A = nn.Parameter(torch.empty(r, g, **kw))
        self.centres_B = nn.Parameter(torch.empty(r, g, **kw))
        self.log_gamma_A = nn.Parameter(torch.empty(r, **kw))
        self.log_gamma_B = nn.Parameter(torch.empty(r, **kw))
        self.amplitude_A = nn.Parameter(torch.empty(r, **kw))
        self.amplitude_B = nn.Parameter(torch.empty(r, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Latents and centres N(0, 1), unit widths, ``w^A = 1/sqrt(d_in)``, ``w^B = 0`` (so ``dW = 0``); also
        after ``to_empty`` of a meta-device model."""
        with torch.no_grad():
            for p in (self.Z_A, self.Z_B, self.centres_A, self.centres_B):
                p.normal_()
            self.log_gamma_A.zero_()
            self.log_gamma_B.zero_()
            self.amplitude_A.fill_(self.d_in**-0.5)
            self.amplitude_B.zero_()

    def factors(self, w0: Tensor) -> tuple[Tensor, Tensor]:
        a = rbf_bank(self.Z_A, self.centres_A, self.log_gamma_A, self.amplitude_A)  # (r, d_in)
        b = rbf_bank(self.Z_B, self.centres_B, self.log_gamma_B, self.amplitude_B).t()  # (d_out, r)
        return a, b
