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
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lsrfx.adapters.base import Adapter, LayerSpec, RankConfig, plain_and_uniform
from lsrfx.errors import LsrfxError
from lsrfx.kernels import condlora_linear as stacked_form
from lsrfx.quantized_base import dense


@dataclass
class CondLoRAConfig(RankConfig):
    """CondLoRA's options (paper: r = alpha = 8)."""

    method = "condlora"

    def build(self, specs: list[LayerSpec]) -> list[Adapter]:
        groups: dict[tuple, ConversionPair] = {}
        adapters = []
        for spec in specs:
            key = (group_name(spec.name), spec.d_out, spec.d_in)
            first = key not in groups
            if first:
                groups[key] = ConversionPair(spec, self.r)
            adapters.append(CondLoRAAdapter(spec, self, groups[key], owns_pair=first))
        return adapters

    def build_one(self, spec: LayerSpec) -> Adapter:
        return self.build([spec])[0]

    def parameter_count(self, spec: LayerSpec) -> int:
        """The group's shared pair: ``C_A`` (``r x d_in``, or ``r x d_out`` when non-square) and ``C_B``."""
        return self.r * (spec.d_in + (spec.d_in if spec.d_in == spec.d_out else spec.d_out))


class FrozenProduct(torch.autograd.Function):
    """``C @ W0.T`` (``transpose=True``) or ``C @ W0`` for a frozen ``W0``, in ``C``'s dtype. ``W0`` is converted
    (cast from a half-precision base, dequantised from a quantized one) on the spot in the forward and again in the
    backward, so autograd keeps ``W0`` itself, never a converted full-size copy of it, from forward to backward."""

    @staticmethod
    def forward(ctx, c: Tensor, w0: Tensor, transpose: bool) -> Tensor:
        ctx.save_for_backward(w0)
        ctx.transpose = transpose
        w = dense(w0).to(c.dtype)
        return c @ (w.t() if transpose else w)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (w0,) = ctx.saved_tensors
        w = dense(w0).to(grad.dtype)
        return grad @ (w if ctx.transpose else w.t()), None, None


def group_name(layer_name: str) -> str:
    """The name that groups layers sharing one conversion pair: the module's last path component."""
    return layer_name.rsplit(".", 1)[-1]


class ConversionPair(nn.Module):
    """The shared trainable ``C_A``, ``C_B`` of one group. ``owner``: the name of the layer it is registered under."""

    def __init__(self, spec: LayerSpec, r: int) -> None:
        super().__init__()
        kw = dict(dtype=spec.adapter_dtype, device=spec.device)
        self.square = spec.d_in == spec.d_out
        self.owner = spec.name
        self.C_A = nn.Parameter(torch.empty(r, spec.d_in if self.square else spec.d_out, **kw))
        self.C_B = nn.Parameter(torch.empty(r, spec.d_in, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's init: ``C_A`` Kaiming-uniform, ``C_B = 0`` (so ``dW = 0``)."""
        nn.init.kaiming_uniform_(self.C_A, a=math.sqrt(5))
        nn.init.zeros_(self.C_B)


class CondLoRAAdapter(Adapter):
    """One layer's view of its group's :class:`ConversionPair`.

    The pair is registered (a submodule, so in ``state_dict``, ``model.parameters()``, FSDP's units) under the
    group's first layer only, its ``owner``; the other layers hold a plain reference. A tensor listed under several
    ``state_dict`` keys is refused by safetensors and Hugging Face's ``save_pretrained``. ``adapter.pair`` and
    ``adapter.named_parameters()`` still give every layer's adapter the pair it reads (``pair.C_A``, ``pair.C_B``).
    ``copy.deepcopy`` of the model keeps one pair per group (its memo maps the reference to the copied owner's).
    """

    reads_base_weight = True  # A = C_A W0 and B = W0 C_B.T

    def __init__(self, spec: LayerSpec, config: CondLoRAConfig, pair: ConversionPair, owns_pair: bool = True) -> None:
        super().__init__(spec)
        self.rank, self.scale = config.r, config.alpha / config.r
        if owns_pair:
            self.pair = pair
        else:
            object.__setattr__(self, "pair", pair)  # not a submodule: listed once, under its owner

    @property
    def owns_pair(self) -> bool:
        """Whether the pair is registered here (the group's first layer) rather than referenced."""
        return "pair" in self._modules

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        """This adapter's parameters, the shared pair included when another layer owns it (a model-level
        ``named_parameters`` walks the registered modules and lists the pair once, under its owner)."""
        yield from super().named_parameters(prefix, recurse, remove_duplicate)
        if recurse and not self.owns_pair:
            yield from self.pair.named_parameters(f"{prefix}.pair" if prefix else "pair", True, remove_duplicate)

    def factors(self, w0: Tensor) -> tuple[Tensor, Tensor]:
        pair, r = self.pair, self.rank
        if torch.compiler.is_compiling():  # the form the compile pass rewrites (W0 arrives dequantised here)
            w = w0.detach().to(pair.C_A.dtype)  # W0 is frozen: gradients flow to C_A, C_B only
            return pair.C_A @ (w.t() if pair.square else w), w @ pair.C_B.t()  # each product a node the pass reads
        if hasattr(pair.C_A, "device_mesh") != hasattr(w0, "device_mesh"):
            raise LsrfxError(
                f"condlora: the conversion pair registered under '{pair.owner}' is sharded differently from a "
                f"{self.d_out} x {self.d_in} weight of its group (one is a DTensor): under FSDP2 every layer of a "
                "group must be in the pair's fully_shard unit; call fully_shard on the root only, or use DDP."
            )
        # W0 is frozen: no gradient reaches it. Its products with the pair are memory-bound skinny matmuls (each
        # reads all of W0 for 2r or fewer rows), so a square layer forms both factors in one product.
        if pair.square:
            both = FrozenProduct.apply(torch.cat([pair.C_A, pair.C_B]), w0, True)
            return both[:r], both[r:].t()
        return FrozenProduct.apply(pair.C_A, w0, False), FrozenProduct.apply(pair.C_B, w0, True).t()

    def eager_linear(self, x: Tensor, w0: Tensor, bias: Tensor | None) -> Tensor | None:
        """The stacked form (:class:`~lsrfx.kernels.condlora_linear.CondLoRALinear`) when every tensor is a plain one
        of one dtype outside autocast; else ``None``: the generic path (quantized, mixed-precision or sharded
        layers)."""
        pair = self.pair
        if not plain_and_uniform(x, w0, pair.C_A, pair.C_B, bias):
            return None
        return stacked_form.CondLoRALinear.apply(x, w0, bias, pair.C_A, pair.C_B, self.scale, pair.square, False)

    def extra_repr(self) -> str:
        shared = "" if self.owns_pair else f", pair=shared with '{self.pair.owner}'"
        return super().extra_repr() + shared
