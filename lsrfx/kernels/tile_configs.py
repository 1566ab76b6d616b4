"""Tile configurations of the Triton kernels: the autotune sets, the shape key they are tuned on, and the
deterministic pick used where autotuning is meaningless (the CPU interpreter, or a caller that names no config).

The sets follow the shapes the fastest Triton matmuls use on A100/H100 (Triton's matmul tutorial, Inductor's
mm configs): 64-128 rows x 64-256 columns per program, K-steps of 32-64, 4-8 warps, 3-5 pipeline stages, and
grouped program ordering (``GROUP_M`` row blocks share each column block while it is hot in L2). Every config
with ``BLOCK_M >= 64`` and 4 or 8 warps can use Hopper's warpgroup MMA (``wgmma``). Four-byte inputs (fp32,
TF32) get their own, smaller set: the same tiles in fp32 would not fit in shared memory with 3+ stages.
``python -m lsrfx.kernels.aot`` compiles every config for sm_80 and sm_90 and checks that it fits.

The adapter's rank is not tuned: it sets ``BLOCK_R`` (the next power of two >= 16, ``tl.dot``'s minimum).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lsrfx.errors import LsrfxError

MIN_DOT = 16  # tl.dot needs every dimension >= 16
MAX_TOKEN_BUCKET = 1 << 16


@dataclass(frozen=True)
class MatmulTile:
    """One configuration of the fused kernel: an output tile ``block_m x block_n``, K-steps of ``block_k``."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8

    @property
    def name(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.block_k}-w{self.num_warps}-s{self.num_stages}"

    def constexprs(self) -> dict[str, int]:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k, "GROUP_M": self.group_m}


@dataclass(frozen=True)
class ReductionTile:
    """One configuration of the reduction kernel ``L.T @ R`` over tokens: the wide output side in blocks of
    ``block_wide`` (the rank side is ``BLOCK_R``), the token dimension in steps of ``block_t``."""

    block_wide: int
    block_t: int
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        return f"{self.block_wide}x{self.block_t}-w{self.num_warps}-s{self.num_stages}"

    def constexprs(self, wide_side: str) -> dict[str, int]:
        """``BLOCK_P`` or ``BLOCK_Q`` (whichever is the wide side, ``"p"`` or ``"q"``) and ``BLOCK_T``."""
        return {f"BLOCK_{wide_side.upper()}": self.block_wide, "BLOCK_T": self.block_t}


# Largest first: the deterministic pick walks the list and takes the first tile the problem fills.
FUSED_HALF: tuple[MatmulTile, ...] = (
    MatmulTile(128, 256, 64, 8, 3),
    MatmulTile(128, 128, 64, 8, 4),
    MatmulTile(128, 128, 32, 4, 4),
    MatmulTile(64, 256, 32, 4, 4),
    MatmulTile(128, 64, 32, 4, 4),
    MatmulTile(64, 128, 32, 4, 4),
    MatmulTile(64, 64, 64, 4, 5),
)
FUSED_FP32: tuple[MatmulTile, ...] = (
    MatmulTile(128, 128, 32, 8, 3),
    MatmulTile(64, 128, 32, 4, 4),
    MatmulTile(128, 64, 32, 4, 4),
    MatmulTile(64, 64, 32, 4, 5),
)
REDUCTION_HALF: tuple[ReductionTile, ...] = (
    ReductionTile(128, 64, 4, 4),
    ReductionTile(256, 32, 8, 3),
    ReductionTile(64, 64, 4, 5),
)
REDUCTION_FP32: tuple[ReductionTile, ...] = (
    ReductionTile(128, 32, 4, 4),
    ReductionTile(64, 32, 4, 5),
)


def dtype_class(dtype: torch.dtype) -> str:
    """``"half"`` for 2-byte inputs (fp16, bf16), ``"fp32"`` for fp32: the two config sets."""
    if dtype in (torch.float16, torch.bfloat16):
        return "half"
    if dtype == torch.float32:
        return "fp32"
    raise LsrfxError(f"the Triton kernels take fp32, fp16 or bf16 inputs, got {dtype}; cast the input first.")


def fused_configs(dtype: torch.dtype) -> tuple[MatmulTile, ...]:
    """The autotune set of the fused kernel for inputs of ``dtype``."""
    return FUSED_HALF if dtype_class(dtype) == "half" else FUSED_FP32


def reduction_configs(dtype: torch.dtype) -> tuple[ReductionTile, ...]:
    """The autotune set of the reduction kernel for inputs of ``dtype`` (the narrower of its two operands)."""
    return REDUCTION_HALF if dtype_class(dtype) == "half" else REDUCTION_FP32


def block_r(r: int) -> int:
    """The rank's block: the next power of two, at least ``tl.dot``'s 16."""
    return max(MIN_DOT, 1 << max(r - 1, 0).bit_length())


def token_bucket(tokens: int) -> int:
    """The autotune key of a token count: its next power of two (capped), so a new sequence length re-uses the
    tuned config of its bucket instead of re-benchmarking every config."""
    return min(MAX_TOKEN_BUCKET, 1 << max(tokens - 1, 0).bit_length())


def pick_fused(configs: Sequence[MatmulTile], m: int, n: int) -> MatmulTile:
    """Deterministic choice without benchmarking: the first (largest) tile that ``m x n`` fills, else the
    smallest. Used under the CPU interpreter and as the documented default."""
    for config in configs:
        if config.block_m <= m and config.block_n <= n:
            return config
    return configs[-1]


def pick_reduction(configs: Sequence[ReductionTile], wide: int) -> ReductionTile:
    """Deterministic choice for the reduction kernel: the first tile whose wide block ``wide`` fills."""
    for config in configs:
        if config.block_wide <= wide:
            return config
    return configs[-1]


def reduction_splits(tiles: int, tokens: int, processors: int, min_tokens_per_split: int = 256) -> int:
    """How many programs share the token reduction of one output tile (``split-K``).

    The factor gradients have a rank-sized side, so a handful of output tiles would leave most streaming
    multiprocessors idle while each program walks all tokens. Split the tokens until there are about two
    programs per processor, keeping at least ``min_tokens_per_split`` tokens per program; the partial sums are
    added afterwards (deterministic, no atomics)."""
    if tiles <= 0 or tokens <= 0 or tiles >= processors:
        return 1
    wanted = -(-2 * processors // tiles)
    return max(1, min(wanted, tokens // min_tokens_per_split, 64))
