"""GPU benchmark of lsrfx's fused Triton kernels against cuBLAS and peft: one command on a CUDA machine.

    python bench/gpu.py                                   # both cases, bf16 and fp16 (several minutes)
    python bench/gpu.py --cases llama7b-layer --dtypes bf16 --no-step

Not yet run on hardware: this project has no GPU. The kernels are compiled for sm_80/sm_90 and checked
numerically in CI (``python -m lsrfx.kernels.aot``, ``tests/test_kernels*.py``); this script is what turns that
into measured throughput. On a machine without CUDA it exits with a message (``--smoke`` runs tiny shapes on the
CPU to check the script itself, under ``TRITON_INTERPRET=1`` for the kernel rows; its numbers mean nothing).

Cases (adapters LoRA r = 16, alpha 16, on the attention query and value projections):

* ``bert-base``: one 768 x 768 projection fed 32 x 128 tokens; the training step is the whole BERT-base encoder
  (12 layers, hidden 768, intermediate 3072).
* ``llama7b-layer``: one 4096 x 4096 projection fed 4 x 2048 tokens; the training step is one Llama-7B decoder
  layer (hidden 4096, intermediate 11008, 32 heads).

Kernel rows (``triton.testing.do_bench`` medians, L2 flushed; TFLOP/s count the base matmul's 2 M N K only, so
every row is comparable with cuBLAS's): the base matmul on cuBLAS; lsrfx's fused kernel with ``U = X @ A.T``
computed in its K-loop (one pass, the default) and by its own kernel first (``two_pass=True``); the unfused
reference (cuBLAS base plus the small adapter matmuls and an add, what peft runs); LSR's
fused forward. "x base" is the time over cuBLAS's base matmul: the adapter's overhead ratio. Then the input
gradient the same way, and the factor gradients (``A``/``B``) against the reference.

Training-step rows (forward, backward, AdamW on the adapters; median of ``--steps`` CUDA-synchronised steps
after warm-up, every variant ``torch.compile``d): the base floor (no adapter, the input gradient still flows),
peft LoRA, lsrfx LoRA with the compile pass's own fusion rule, lsrfx LoRA and LSR-Adapt with every adapted
layer fused (``LSRFX_FUSE=always``). lsrfx's measured Triton-vs-reference choices and the autotuned tiles are
printed at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import lsrfx
from lsrfx.kernels import dispatch
from lsrfx.kernels import triton_matmul as tk

from common import fuse_policy  # bench/ is on sys.path when run as a script

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
RANK = 16


@dataclass(frozen=True)
class Case:
    hidden: int
    intermediate: int
    heads: int
    layers: int
    batch: int
    seq: int
    model: str  # "bert" or "llama"

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def targets(self) -> list[str]:
        return ["query", "value"] if self.model == "bert" else ["q_proj", "v_proj"]


CASES = {
    "bert-base": Case(768, 3072, 12, 12, 32, 128, "bert"),
    "llama7b-layer": Case(4096, 11008, 32, 1, 4, 2048, "llama"),
}
SMOKE = {"bert-base": Case(64, 128, 2, 2, 2, 24, "bert"), "llama7b-layer": Case(64, 128, 2, 1, 2, 24, "llama")}


# ------------------------------------------------------------------------------------------------------ timing


def bench(fn: Callable[[], object], device: str) -> float:
    """Median seconds per call."""
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def kernel_rows(case: Case, dtype: torch.dtype, device: str, triton_ok: bool) -> None:
    """Forward, input gradient and factor gradients of one adapted projection: cuBLAS vs fused vs reference."""
    m, n, k = case.tokens, case.hidden, case.hidden
    flops = 2 * m * n * k
    x = torch.randn(m, k, device=device, dtype=dtype)
    g = torch.randn(m, n, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype) / k**0.5
    a = torch.randn(RANK, k, device=device) / k**0.5
    b = torch.randn(n, RANK, device=device) / RANK**0.5
    a1, a2 = _factors(RANK, k, device)
    b1, b2 = (f.transpose(1, 2) for f in _factors(RANK, n, device))
    s = 1.0

    def reference_forward() -> torch.Tensor:
        return F.linear(x, w) + ((x.float() @ a.t()) @ b.t() * s).to(dtype)

    def reference_grad_input() -> torch.Tensor:
        return g @ w + (((g.float() @ b) @ a) * s).to(dtype)

    def reference_grad_factors() -> tuple[torch.Tensor, torch.Tensor]:
        g32, x32 = g.float(), x.float()
        return (g32 @ b).t() @ x32 * s, g32.t() @ (x32 @ a.t()) * s

    rows: list[tuple[str, str, Callable[[], object] | None]] = [
        ("forward", "cuBLAS base x @ W.T", lambda: F.linear(x, w)),
        ("forward", "lsrfx fused, one pass", lambda: tk.lowrank_forward(x, w, None, a, b, s, False, two_pass=False)),
        ("forward", "lsrfx fused, two passes", lambda: tk.lowrank_forward(x, w, None, a, b, s, False, two_pass=True)),
        ("forward", "lsrfx LSR fused", lambda: tk.lsr_forward(x, w, None, a1, a2, b1, b2, s, False)),
        ("forward", "reference (unfused, as peft)", reference_forward),
        ("grad input", "cuBLAS base g @ W", lambda: g @ w),
        ("grad input", "lsrfx fused, one pass", lambda: tk.grad_input(g, w, a, b, s, False, two_pass=False)),
        ("grad input", "lsrfx fused, two passes", lambda: tk.grad_input(g, w, a, b, s, False, two_pass=True)),
        ("grad input", "reference (unfused)", reference_grad_input),
        ("grad A, B", "lsrfx reduction kernels", lambda: tk.grad_factors(g, x, a, b, None, s)),
        ("grad A, B", "reference (cuBLAS, fp32)", reference_grad_factors),
    ]
    print(f"\n{case.model} projection {n} x {k}, {m} tokens, r = {RANK}, {str(dtype).replace('torch.', '')}")
    print(f"{'op':<11} {'variant':<30} {'ms':>8} {'TFLOP/s':>8} {'x base':>7}")
    base = None
    for op, label, fn in rows:
        if "lsrfx" in label and not triton_ok:
            print(f"{op:<11} {label:<30} {'n/a (no Triton on this device)':>25}")
            continue
        seconds = bench(fn, device)
        if label.startswith("cuBLAS"):
            base = seconds
        ratio = f"{seconds / base:7.2f}" if base else ""
        print(f"{op:<11} {label:<30} {seconds * 1e3:8.3f} {flops / seconds / 1e12:8.1f} {ratio}")


def _factors(r: int, d: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """LSR's Kronecker factors of an ``r x d`` matrix (r = 4 x 4, d split in its most balanced pair), S = 16."""
    d1 = max(f for f in range(1, int(d**0.5) + 1) if d % f == 0)
    return torch.randn(16, 4, d1, device=device) / d**0.5, torch.randn(16, r // 4, d // d1, device=device)


# -------------------------------------------------------------------------------------------------- train step


def build_model(case: Case, dtype: torch.dtype, device: str) -> nn.Module:
    if case.model == "bert":
        from transformers import BertConfig, BertModel

        cfg = BertConfig(hidden_size=case.hidden, num_hidden_layers=case.layers, num_attention_heads=case.heads,
                         intermediate_size=case.intermediate, max_position_embeddings=max(512, case.seq))
        model = BertModel(cfg, add_pooling_layer=False)
    else:
        from transformers import LlamaConfig, LlamaModel

        cfg = LlamaConfig(hidden_size=case.hidden, intermediate_size=case.intermediate, num_hidden_layers=case.layers,
                          num_attention_heads=case.heads, num_key_value_heads=case.heads, vocab_size=256,
                          max_position_embeddings=case.seq)
        model = LlamaModel(cfg)
    return model.to(device=device, dtype=dtype).train()


def step_variants(case: Case, dtype: torch.dtype, device: str) -> dict[str, tuple[Callable[[], nn.Module], str | None]]:
    """label -> (model builder, LSRFX_FUSE while compiling)."""

    def floor() -> nn.Module:
        return build_model(case, dtype, device).requires_grad_(False)

    def peft() -> nn.Module:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=case.targets, lora_dropout=0.0)
        return get_peft_model(build_model(case, dtype, device), config)

    def lsrfx_model(method: str, **options: object) -> Callable[[], nn.Module]:
        return lambda: lsrfx.adapt(build_model(case, dtype, device), method=method, targets=case.targets, **options)

    return {
        "base floor (no adapter)": (floor, None),
        "peft LoRA": (peft, None),
        "lsrfx LoRA, pass's own rule": (lsrfx_model("lora", r=RANK, alpha=RANK), "auto"),
        "lsrfx LoRA, all fused": (lsrfx_model("lora", r=RANK, alpha=RANK), "always"),
        "lsrfx LSR-Adapt, all fused": (lsrfx_model("lsr"), "always"),
    }


def make_step(model: nn.Module, embeds: torch.Tensor, compiled: bool) -> Callable[[], None]:
    """One training step: forward, a scalar loss, backward, AdamW on what requires grad (the floor: its input)."""
    params = [p for p in model.parameters() if p.requires_grad] + ([embeds] if embeds.requires_grad else [])
    opt = torch.optim.AdamW(params, lr=1e-4)
    run = torch.compile(model) if compiled else model

    def step() -> None:
        out = run(inputs_embeds=embeds).last_hidden_state
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def median_step(step: Callable[[], None], steps: int, device: str, fuse: str | None) -> float:
    with fuse_policy(fuse):
        step()  # compiles, with the pass reading LSRFX_FUSE
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_rows(case: Case, dtype: torch.dtype, device: str, steps: int, compiled: bool) -> None:
    embeds = torch.randn(case.batch, case.seq, case.hidden, device=device, dtype=dtype)
    print(f"\n{case.model} training step ({case.layers} layer(s), hidden {case.hidden}, {case.tokens} tokens), "
          f"{str(dtype).replace('torch.', '')}, {'compiled' if compiled else 'eager (smoke)'}")
    print(f"{'variant':<30} {'ms':>9} {'x floor':>8} {'x peft':>7}")
    medians: dict[str, float] = {}
    for label, (build, fuse) in step_variants(case, dtype, device).items():
        leaf = embeds.clone().requires_grad_() if label.startswith("base") else embeds
        medians[label] = median_step(make_step(build(), leaf, compiled), steps, device, fuse)
        floor, peft = medians.get("base floor (no adapter)"), medians.get("peft LoRA")
        ratios = [f"{medians[label] / ref:8.2f}" if ref else f"{'':>8}" for ref in (floor, peft)]
        print(f"{label:<30} {medians[label] * 1e3:9.2f} {ratios[0]} {ratios[1]}")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------------- main


def header(device: str) -> None:
    import triton

    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        print(f"{props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs; ", end="")
    print(f"torch {torch.__version__}, triton {triton.__version__}, "
          f"TF32 {'allowed' if torch.backends.cuda.matmul.allow_tf32 else 'off'}, "
          f"LSRFX_KERNEL={os.environ.get('LSRFX_KERNEL', 'auto')}")


def footer() -> None:
    for key, tuner in tk._autotuned.items():
        for shape, config in getattr(tuner, "cache", {}).items():
            print(f"autotuned {key[0]} {key[1]}{(' ' + key[2]) if key[2] else ''} {shape}: {config}")
    for key, choice in dispatch.CHOOSER.choices.items():
        print(f"lsrfx chose {choice.winner} for {key[0]} {key[2:]}: Triton {choice.triton_seconds * 1e6:.0f} us, "
              f"reference {choice.reference_seconds * 1e6:.0f} us")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp16"])
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per variant (median)")
    parser.add_argument("--no-step", action="store_true", help="kernel rows only, no training step")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script only")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False on this machine). The kernels are "
              "checked without one by `python -m lsrfx.kernels.aot --arch 80 90` and the test suite; "
              "`--smoke` runs this script on tiny CPU shapes.", file=sys.stderr)
        return 2
    if not tk.HAS_TRITON:
        print("bench/gpu.py needs triton: pip install 'lsrfx[triton]'", file=sys.stderr)
        return 2
    device = "cpu" if args.smoke else "cuda"
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    header(device)
    for name in args.cases:
        case = SMOKE[name] if args.smoke else CASES[name]
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            # the CPU interpreter gets bf16 tl.dot wrong: no Triton rows for bf16 in a smoke run
            triton_ok = device == "cuda" or (interpreting and dtype != torch.bfloat16)
            kernel_rows(case, dtype, device, triton_ok)
            if not args.no_step:
                step_rows(case, dtype, device, 2 if args.smoke else args.steps, compiled=not args.smoke)
    footer()
    return 0


if __name__ == "__main__":
    sys.exit(main())
