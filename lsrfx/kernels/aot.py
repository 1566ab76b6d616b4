"""Compile every Triton kernel specialisation for real GPUs, without one: ``python -m lsrfx.kernels.aot --arch 80 90``.

Triton compiles for a CUDA target without a device (``triton.compile`` with a ``GPUTarget``; the wheel ships
``ptxas``), so a CPU machine can check what a GPU user would run: that every (kernel, dtype, variant, autotune
config) compiles to a cubin, that its shared memory fits the target (sm_80: 163 KB, sm_90: 227 KB per block),
and which tensor-core instruction its PTX uses (``wgmma`` on Hopper, ``mma`` otherwise, ``none`` for exact fp32
or element-wise kernels). One line per (kernel, dtype, variant, config, arch), then a summary; the exit status is
non-zero if anything fails to compile, does not fit, or misses the tensor cores it should use.

A specialisation is what the JIT would build at run time for the ``nn.Linear`` layout with sizes divisible by 16:
strides equal to 1 become constants, the other integers and the pointers carry the 16-divisibility hint. The
axes: dtype ``fp32`` (TF32 off, torch's default), ``tf32`` (fp32 inputs with
``torch.backends.cuda.matmul.allow_tf32``), ``fp16``, ``bf16``; the fused kernel's variants (forward with and
without storing ``U``, input gradient, and both with ``U`` read from memory: ``two_pass=True``); the reduction
kernel's four uses; LSR's Kronecker expansion; every config of :mod:`lsrfx.kernels.tile_configs`; the rank block
(``--rank-blocks``, default 16 and 64).

Expected tensor cores: half precision and TF32 run on ``mma.sync`` on sm_80; on sm_90 on ``wgmma`` when the
dot's row block is at least 64 with 4 or 8 warps (one or two warpgroups), else on ``mma.sync``; and every
``wgmma`` build must keep an MMA in flight across K-iterations (``wgmma.wait_group`` >= 1; converting an operand
in registers inside the loop, for instance, makes Triton wait for each one).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType

from lsrfx.kernels import tile_configs as tiles
from lsrfx.kernels.tile_configs import MatmulTile, ReductionTile

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes per block (opt-in maximum): A100, H100
DTYPES = ("fp32", "tf32", "fp16", "bf16")
KERNEL_DTYPES = {"fp32": "fp32", "tf32": "fp32", "fp16": "fp16", "bf16": "bf16"}
DEFAULT_RANK_BLOCKS = (16, 64)
MODULE_PATH = Path(__file__).with_name("triton_matmul.py")


@dataclass(frozen=True)
class Specialisation:
    """One kernel build: its signature (argument name -> Triton type), constants and launch options."""

    kernel: str
    dtype: str
    variant: str
    config: str
    rank_block: int
    signature: dict = field(hash=False, compare=False)
    constexprs: dict = field(hash=False, compare=False)
    num_warps: int = 4
    num_stages: int = 3
    dot_rows: int = 0  # row block of the kernel's main dot: decides whether wgmma applies
    unhinted: tuple[str, ...] = ()  # integer arguments without the 16-divisibility hint

    @property
    def id(self) -> str:
        """A stable name of the build, e.g. ``fused_lowrank/bf16/forward/r16/128x256x64-w8-s3``."""
        return f"{self.kernel}/{self.dtype}/{self.variant}/r{self.rank_block}/{self.config}"

    @property
    def label(self) -> str:
        return f"{self.kernel:<14} {self.dtype:<5} {self.variant:<16} r{self.rank_block:<3} {self.config:<17}"

    def expected_instruction(self, arch: int) -> str:
        """The tensor-core instruction this build should use on sm_``arch``."""
        if self.kernel == "kron_expand" or self.dtype == "fp32":
            return "none"
        if arch >= 90 and self.dot_rows >= 64 and self.num_warps % 4 == 0:
            return "wgmma"
        return "mma"

    def expects_overlap(self, arch: int) -> bool:
        """Whether the PTX should keep a ``wgmma`` in flight across K-iterations (``wait_group`` >= 1): every
        ``wgmma`` build should; an operand converted in registers inside the loop would prevent it."""
        return self.expected_instruction(arch) == "wgmma"


@dataclass(frozen=True)
class Outcome:
    """What compiling one specialisation for one architecture gave."""

    spec: Specialisation
    arch: int
    shared: int = 0
    instruction: str = "none"
    overlap: bool = False  # a wgmma left in flight across iterations (wgmma.wait_group >= 1)
    error: str = ""
    seconds: float = 0.0

    @property
    def fits(self) -> bool:
        return not self.error and self.shared <= SHARED_LIMIT[self.arch]

    @property
    def ok(self) -> bool:
        return (self.fits and self.instruction == self.spec.expected_instruction(self.arch)
                and self.overlap >= self.spec.expects_overlap(self.arch))

    def line(self) -> str:
        if self.ok:
            status = "ok"
        elif self.error:
            status = "FAILED: " + self.error
        else:
            wrong_instruction = self.instruction != self.spec.expected_instruction(self.arch)
            status = ("DOES NOT FIT" if not self.fits else
                      "WRONG TENSOR CORES" if wrong_instruction else "WGMMA NOT OVERLAPPED")
        expected = self.spec.expected_instruction(self.arch)
        note = "" if self.instruction == expected or self.error else f" (expected {expected})"
        if self.instruction == "wgmma":
            note += " overlapped" if self.overlap else " serial"
            if self.spec.expects_overlap(self.arch) and not self.overlap:
                note += " (expected overlapped)"
        fit = "" if self.fits or self.error else f" > {SHARED_LIMIT[self.arch]}"
        return (f"{self.spec.label} sm_{self.arch}  shared {self.shared:>7} B{fit}  "
                f"tensor cores {self.instruction}{note}  {self.seconds:5.2f} s  {status}")


def _pointer(dtype: str) -> str:
    return f"*{dtype}"


# (variant, HAS_BIAS, STORE_U, LOAD_U): the forward with or without writing U (the A/B gradients need it), the
# input gradient (always writes U), and both read-U forms of the two-pass path (``two_pass=True``).
FUSED_VARIANTS = {
    "forward": (True, False, False),
    "forward_storeU": (True, True, False),
    "grad_input": (False, True, False),
    "forward_readU": (True, False, True),
    "grad_input_readU": (False, False, True),
}


def _fused(dtype: str, variant: str, config: MatmulTile, rank_block: int) -> Specialisation:
    """``fused_lowrank_kernel`` as the forward (``x @ W.T``, ``W`` stored ``N x K``) or the input gradient,
    computing ``U`` in its K-loop (one pass, the default) or reading it (``_readU``: ``two_pass=True``)."""
    kdt = KERNEL_DTYPES[dtype]
    has_bias, store_u, read_u = FUSED_VARIANTS[variant]
    forward = variant.startswith("forward")
    # Strides that are 1 in the nn.Linear layout (Wg = W.T for the forward, W itself for the input gradient).
    unit = {"sxk", "son", "sur"} | ({"swk", "spk", "sqr"} if forward else {"swn", "spr", "sqn"})
    ints = ["M", "N", "K", "R", "M_KEY", "sxm", "sxk", "swk", "swn", "som", "son", "sum_", "sur",
            "spk", "spr", "sqr", "sqn"]
    signature = {"x_ptr": _pointer(kdt), "w_ptr": _pointer(kdt), "bias_ptr": _pointer(kdt), "out_ptr": _pointer(kdt),
                 "u_ptr": "*fp32", "p_ptr": _pointer(kdt), "q_ptr": _pointer(kdt)}
    signature |= {name: ("constexpr" if name in unit else "i32") for name in ints}
    signature["scale"] = "fp32"
    constexprs = {name: 1 for name in unit}
    constexprs |= {"HAS_BIAS": has_bias, "STORE_U": store_u, "LOAD_U": read_u,
                   "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32",
                   "BLOCK_R": rank_block, **config.constexprs()}
    signature |= {name: "constexpr" for name in constexprs}
    return Specialisation("fused_lowrank", dtype, variant, config.name, rank_block, signature, constexprs,
                          config.num_warps, config.num_stages, config.block_m)


# The reduction kernel's four uses: (which side is the rank, unit strides). The launcher casts the rank-sized
# fp32 operand (U, V, A or B) to the activations' dtype first, so both operands have the kernel's dtype.
_REDUCTIONS = {
    "grad_A": ("p", {"slp", "srq", "soq"}),  # U.T @ X: U (M x r), X (M x K)
    "grad_B": ("q", {"slp", "srq", "soq"}),  # G.T @ V: G (M x N), V (M x r)
    "X@A.T": ("q", {"slt", "srt", "soq"}),  # (X.T).T @ A.T: reduce over features
    "G@B": ("q", {"slt", "srq", "soq"}),  # (G.T).T @ B
}


def _reduction(dtype: str, variant: str, config: ReductionTile, rank_block: int) -> Specialisation:
    """``tn_matmul_kernel`` for one of its uses in the factor gradients (output in fp32 as the factors)."""
    kdt = KERNEL_DTYPES[dtype]
    narrow, unit = _REDUCTIONS[variant]
    wide = "q" if narrow == "p" else "p"
    ints = ["P", "Q", "T", "T_PER_SPLIT", "P_KEY", "Q_KEY", "T_KEY", "slt", "slp", "srt", "srq", "sos", "sop", "soq"]
    signature = {"l_ptr": _pointer(kdt), "r_ptr": _pointer(kdt), "out_ptr": "*fp32"}
    signature |= {name: ("constexpr" if name in unit else "i32") for name in ints}
    signature["scale"] = "fp32"
    constexprs = {name: 1 for name in unit}
    constexprs |= {"DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32", f"BLOCK_{narrow.upper()}": rank_block,
                   **config.constexprs(wide)}
    signature |= {name: "constexpr" for name in constexprs}
    rows = constexprs["BLOCK_P"]
    return Specialisation("tn_matmul", dtype, variant, config.name, rank_block, signature, constexprs,
                          config.num_warps, config.num_stages, rows)


def _kron(dtype: str) -> Specialisation:
    """``kron_expand_kernel`` for factors of ``dtype`` (contiguous ``S x m x n`` factors)."""
    kdt = KERNEL_DTYPES[dtype]
    unit = {"s1j", "s2j", "son"}
    ints = ["M", "N", "S", "M2", "N2", "s1s", "s1i", "s1j", "s2s", "s2i", "s2j", "som", "son"]
    signature = {"f1_ptr": _pointer(kdt), "f2_ptr": _pointer(kdt), "out_ptr": _pointer(kdt)}
    signature |= {name: ("constexpr" if name in unit else "i32") for name in ints}
    constexprs = {name: 1 for name in unit} | {"BLOCK_M": 32, "BLOCK_N": 32}
    signature |= {name: "constexpr" for name in constexprs}
    return Specialisation("kron_expand", dtype, "expand", "32x32", 0, signature, constexprs, 4, 1, 0,
                          unhinted=tuple(name for name in ints if name not in unit))


def specialisations(rank_blocks: Sequence[int] = DEFAULT_RANK_BLOCKS) -> list[Specialisation]:
    """Every build the launchers can ask for on a GPU (for the nn.Linear layout, sizes divisible by 16)."""
    specs: list[Specialisation] = []
    for dtype in DTYPES:
        torch_dtype = _torch_dtype(KERNEL_DTYPES[dtype])
        for rank_block in rank_blocks:
            for variant in FUSED_VARIANTS:
                specs += [_fused(dtype, variant, c, rank_block) for c in tiles.fused_configs(torch_dtype)]
            for variant in _REDUCTIONS:
                specs += [_reduction(dtype, variant, c, rank_block) for c in tiles.reduction_configs(torch_dtype)]
        if dtype != "tf32":
            specs.append(_kron(dtype))
    return specs


def representative(specs: Iterable[Specialisation]) -> list[Specialisation]:
    """The first (largest) config of every (kernel, dtype, variant, rank block): a quick slice of the matrix."""
    seen: dict[tuple, Specialisation] = {}
    for spec in specs:
        seen.setdefault((spec.kernel, spec.dtype, spec.variant, spec.rank_block), spec)
    return list(seen.values())


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


@contextlib.contextmanager
def _compiling() -> Iterator[ModuleType]:
    """Triton with the interpreter off for the duration (``TRITON_INTERPRET=1`` turns ``@triton.jit`` into
    interpreted functions, which cannot be compiled), and the FP-fusion default warning silenced."""
    import triton

    with triton.knobs.runtime.scope(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
        triton.knobs.runtime.interpret = False
        yield triton


@cache
def _jit_kernels() -> ModuleType:
    """A private copy of :mod:`lsrfx.kernels.triton_matmul` whose kernels are ``JITFunction``s."""
    with _compiling():
        spec = importlib.util.spec_from_file_location("lsrfx.kernels._triton_matmul_aot", MODULE_PATH)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def tensor_core_instruction(ptx: str) -> str:
    """``wgmma`` (Hopper warpgroup MMA), ``mma`` (``mma.sync``) or ``none``: the strongest one in the PTX."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync\b", ptx):
        return "mma"
    return "none"


def wgmma_overlap(ptx: str) -> bool:
    """True when some ``wgmma`` stays in flight while the next is issued (``wgmma.wait_group`` with N >= 1)."""
    return re.search(r"wgmma\.wait_group\.sync\.aligned\s+[1-9]", ptx) is not None


def compile_one(spec: Specialisation, arch: int) -> Outcome:
    """Compile ``spec`` for sm_``arch`` to PTX and a cubin; report shared memory and tensor-core instruction."""
    start = time.perf_counter()
    kernels = _jit_kernels()
    with _compiling() as triton:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        fn = getattr(kernels, f"{spec.kernel}_kernel")
        attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
                 for name, kind in spec.signature.items()
                 if kind not in ("constexpr", "fp32") and name not in spec.unhinted}
        source = ASTSource(fn=fn, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
            if not compiled.asm.get("cubin"):
                raise RuntimeError("no cubin produced")
        except Exception as exc:  # noqa: BLE001 - any compiler failure is reported, not raised
            message = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            return Outcome(spec, arch, error=message[:200], seconds=time.perf_counter() - start)
    ptx = compiled.asm["ptx"]
    return Outcome(spec, arch, compiled.metadata.shared, tensor_core_instruction(ptx), wgmma_overlap(ptx),
                   seconds=time.perf_counter() - start)


def _compile_pair(pair: tuple[Specialisation, int]) -> Outcome:
    return compile_one(*pair)


def compile_all(specs: Iterable[Specialisation], archs: Iterable[int], jobs: int = 1) -> Iterator[Outcome]:
    """Compile every (specialisation, arch), in ``jobs`` processes; yields outcomes in order."""
    pairs = [(spec, arch) for spec in specs for arch in archs]
    if jobs <= 1:
        yield from map(_compile_pair, pairs)
        return
    with ProcessPoolExecutor(jobs) as pool:
        yield from pool.map(_compile_pair, pairs)


def _interpreting() -> bool:
    import triton

    return bool(triton.knobs.runtime.interpret)


def _rerun_without_interpreter(argv: Sequence[str]) -> int:
    """Run this command again in a fresh process without ``TRITON_INTERPRET``: once triton was imported with the
    interpreter on, its own library functions are interpreted ones and nothing can be compiled in this process."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "lsrfx.kernels.aot", *argv], env=env, check=False).returncode


def _select(args: argparse.Namespace) -> list[Specialisation]:
    specs = specialisations(args.rank_blocks)
    if args.representative:
        specs = representative(specs)
    if args.only:
        by_id = {spec.id: spec for spec in specialisations(sorted({*args.rank_blocks, *_rank_blocks(args.only)}))}
        unknown = [name for name in args.only if name not in by_id]
        if unknown:
            raise SystemExit(f"unknown build(s) {unknown}; names look like {specs[0].id}")
        specs = [by_id[name] for name in args.only]
    return specs


def _rank_blocks(ids: Iterable[str]) -> set[int]:
    return {int(part[1:]) for name in ids for part in name.split("/")[3:4] if part[1:].isdigit() and part != "r0"}


def _as_json(outcome: Outcome) -> str:
    return json.dumps({"id": outcome.spec.id, "arch": outcome.arch, "shared": outcome.shared,
                       "instruction": outcome.instruction, "expected": outcome.spec.expected_instruction(outcome.arch),
                       "overlap": outcome.overlap, "expected_overlap": outcome.spec.expects_overlap(outcome.arch),
                       "fits": outcome.fits, "ok": outcome.ok, "error": outcome.error,
                       "seconds": round(outcome.seconds, 3)})


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m lsrfx.kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_LIMIT),
                        help="CUDA compute capabilities to build for (default: 80 90)")
    parser.add_argument("--rank-blocks", type=int, nargs="+", default=list(DEFAULT_RANK_BLOCKS),
                        help="rank blocks (the adapter rank's next power of two, >= 16) to build (default: 16 64)")
    parser.add_argument("--representative", action="store_true",
                        help="only the largest config of each kernel, dtype and variant (a quick check)")
    parser.add_argument("--only", nargs="+", metavar="BUILD", help="only these builds (names as in --json's id)")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes (default: 1)")
    parser.add_argument("--json", action="store_true", help="one JSON object per build, then a summary object")
    args = parser.parse_args(argv)
    try:
        import triton  # noqa: F401
    except ImportError:
        print("triton is not installed: pip install 'lsrfx[triton]'", file=sys.stderr)
        return 2
    if _interpreting():
        return _rerun_without_interpreter(argv)
    start = time.perf_counter()
    outcomes = []
    for outcome in compile_all(_select(args), args.arch, args.jobs):
        print(_as_json(outcome) if args.json else outcome.line(), flush=True)
        outcomes.append(outcome)
    failed = sum(bool(o.error) for o in outcomes)
    too_big = sum(not o.error and not o.fits for o in outcomes)
    wrong = sum(o.fits and not o.ok for o in outcomes)  # tensor cores missing, or wgmma not overlapped
    good = len(outcomes) - failed - too_big - wrong
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({"summary": {"builds": len(outcomes), "ok": good, "failed": failed, "too_big": too_big,
                                      "wrong_instruction": wrong, "seconds": round(seconds, 1)}}))
    else:
        print(f"{len(outcomes)} builds for sm_{', sm_'.join(map(str, args.arch))} in {seconds:.0f} s: {good} ok, "
              f"{failed} failed to compile, {too_big} over the shared-memory limit, "
              f"{wrong} without the expected tensor-core use")
    return 1 if failed or too_big or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
