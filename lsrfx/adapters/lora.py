"""LoRA (Hu et al., 2021): ``A`` and ``B`` are parameters. The reference every other method is measured against.

Initialisation matches ``peft``: ``A`` Kaiming-uniform (a = sqrt(5)), ``B`` zero, scale ``alpha / r``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lsrfx.adapters.base import Adapter, LayerSpec, RankConfig


@dataclass
class LoRAConfig(RankConfig):
    """LoRA's options (LoRA paper, RoBERTa GLUE: r = alpha = 8)."""

    method = "lora"

    def build_one(self, spec: LayerSpec) -> Adapter:
        return LoRAAdapter(spec, self)


class LoRAAdapter(Adapter):
    def __init__(self, spec: LayerSpec, config: LoRAConfig) -> None:
        super().__init__(spec)
        self.rank, self.scale = config.r, config.alpha / config.r
        kw = dict(dtype=spec.adapter_dtype, device=spec.device)
        self.lora_A = nn.Parameter(torch.empty(config.r, spec.d_in, **kw))
        self.lora_B = nn.Parameter(torch.empty(spec.d_out, config.r, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """peft's init: ``A`` Kaiming-uniform, ``B = 0`` (also after ``to_empty`` of a meta-device model)."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def factors(self, w0: Tensor) -> tuple[Tensor, Tensor]:
        return self.lora_A, self.lora_B
