"""Kernels and extern matmul calls per compiled training step, for the frozen-base floor and every lsrfx method.

Why: on a 2-core CPU each kernel Inductor generates and each extern matmul opens an OpenMP parallel region, and
those regions stall when another process takes a core, so the number of launches per step is what an adapter
costs on a busy machine. Counts are deterministic, so this script (unlike ``bench/train_step.py``'s timings) can
run while the machine is shared.

Setup, as in ``bench/train_step.py``: a random-weight BERT encoder (sdpa attention, train mode), random
``inputs_embeds`` of ``--batch x --seq``, ``query`` and ``value`` adapted with each method's defaults (same options
as that script), one compiled step = forward + ``out.pow(2).mean().backward()`` + AdamW. The floor is the frozen
base with the embeddings' output requiring grad (the least any adapter can cost); ``peft`` is peft LoRA r = 8
compiled. Each variant compiles (Inductor's caches off, so the lsrfx pass really runs), runs two warm-up steps,
and one profiled step is counted:

* **generated**: Inductor's C++ kernels, which appear as profiler events named ``cpp_fused_*`` because
  ``torch._inductor.config.cpp.enable_kernel_profile`` is set before compiling (Triton launches are not counted:
  this is the CPU path);
* **mm / addmm / bmm**: the profiler's ``aten::mm`` / ``aten::addmm`` / ``aten::bmm`` events, Inductor's extern
  matmul calls (including those inside the eager AdamW step: none);
* **lsrfx ops**: calls of lsrfx custom ops that Inductor could not see into (``compose``, ``kron_sum`` on a
  materialised path), each run eagerly as several aten ops that the columns before do not count (except their
  matmuls); the fused ops and ``merged_linear`` are inlined, so a fused or merged variant shows 0;
* **graphs**: Dynamo graphs compiled (graph breaks show here), **recompiles**: graphs compiled after the first
  step, **fused / merged / mat.**: the lsrfx pass's decisions;
* **peak MB** (``--memory``): the peak of the running sum of the allocator's allocation and free events in one
  more step (``profile_memory=True``), as ``bench/train_step.py`` measures it on CPU.

    python bench/kernel_count.py                                   # hidden 384, 1 layer, every variant
    python bench/kernel_count.py --hidden 1024 --layers 4 lora genlora --fuse auto always merged never
    python bench/kernel_count.py lsr --names                       # also list the generated kernels by name
    python bench/kernel_count.py --layers 6 --memory               # the benchmark's depth, with peak memory
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn
from torch._dynamo.utils import counters

import lsrfx
from lsrfx.settings import FUSE_POLICIES

from common import METHODS, PEFT_LORA, profiled_peak_mb  # bench/ is on sys.path when run as a script

EXTERN = ("aten::mm", "aten::addmm", "aten::bmm")


def bert(hidden: int, layers: int) -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                     intermediate_size=4 * hidden, vocab_size=30522, max_position_embeddings=512)
    cfg.attn_implementation = "sdpa"
    return BertModel(cfg, add_pooling_layer=False).train()


def build(variant: str, hidden: int, layers: int, embeds: torch.Tensor) -> Callable[[], None]:
    """One compiled training step of ``variant`` (``floor``, ``peft`` or an lsrfx method)."""
    model = bert(hidden, layers)
    extra: list[torch.Tensor] = []
    if variant == "floor":
        model.requires_grad_(False)
        embeds = embeds.clone().requires_grad_()
        extra = [embeds]
    elif variant == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(**PEFT_LORA))
    else:
        lsrfx.adapt(model, method=variant, targets=["query", "value"], **METHODS[variant])
    compiled = torch.compile(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad] + extra, lr=1e-4)

    def step() -> None:
        compiled(inputs_embeds=embeds).last_hidden_state.pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def count(variant: str, fuse: str, args: argparse.Namespace) -> tuple[dict, Counter]:
    """Per-step counts of one variant compiled under ``LSRFX_FUSE=fuse``, and its generated kernels by name."""
    torch._dynamo.reset()
    counters.clear()
    embeds = torch.randn(args.batch, args.seq, args.hidden)
    old = os.environ.get("LSRFX_FUSE")
    os.environ["LSRFX_FUSE"] = fuse
    try:
        step = build(variant, args.hidden, args.layers, embeds)
        step()  # compiles (the pass reads LSRFX_FUSE now)
    finally:
        if old is None:
            os.environ.pop("LSRFX_FUSE")
        else:
            os.environ["LSRFX_FUSE"] = old
    step()
    graphs = counters["stats"]["unique_graphs"]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    names = Counter(e.name for e in prof.events())
    generated = Counter({n: c for n, c in names.items() if "cpp_fused" in n})
    row = {"generated": sum(generated.values()), **{op: names[op] for op in EXTERN}}
    row["total"] = row["generated"] + sum(names[op] for op in EXTERN)
    row["lsrfx ops"] = sum(c for n, c in names.items() if n.startswith("lsrfx::"))
    row["graphs"] = graphs
    row["recompiles"] = counters["stats"]["unique_graphs"] - graphs
    row["fused"], row["merged"], row["mat."] = (counters["lsrfx"][a] for a in ("fused", "merged", "materialised"))
    if args.memory:
        row["peak MB"] = f"{profiled_peak_mb(step):.1f}"
    return row, generated


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="*", default=["floor", "peft", *METHODS],
                    help=f"floor, peft and/or lsrfx methods ({', '.join(METHODS)}); default: all")
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--fuse", nargs="+", default=["auto"], choices=FUSE_POLICIES,
                    help="LSRFX_FUSE values to compile each lsrfx method with (default: auto)")
    ap.add_argument("--names", action="store_true", help="list each variant's generated kernels by name")
    ap.add_argument("--memory", action="store_true", help="add each variant's peak memory of one step")
    args = ap.parse_args()
    torch._inductor.config.cpp.enable_kernel_profile = True  # before compiling: kernels become profiler events
    torch._inductor.config.fx_graph_cache = False  # compile for real, so the lsrfx pass runs and its decisions count
    torch._functorch.config.enable_autograd_cache = False
    torch._dynamo.config.recompile_limit = 64

    cols = ["generated", "mm", "addmm", "bmm", "total", "lsrfx ops", "graphs", "recompiles", "fused", "merged", "mat."]
    cols += ["peak MB"] if args.memory else []
    print(f"hidden {args.hidden}, {args.layers} layer(s), {args.batch} x {args.seq} tokens, query + value adapted; "
          f"per compiled training step (forward + backward + AdamW)\n")
    print("| variant | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    listings = []
    for variant in args.variants:
        for fuse in (args.fuse if variant in METHODS else ["auto"]):
            label = variant if variant not in METHODS or args.fuse == ["auto"] else f"{variant} ({fuse})"
            row, generated = count(variant, fuse, args)
            row = {k.removeprefix("aten::"): v for k, v in row.items()}
            print(f"| {label} | " + " | ".join(str(row[c]) for c in cols) + " |", flush=True)
            listings.append((label, generated))
    if args.names:
        for label, generated in listings:
            print(f"\n{label}:")
            for name, n in sorted(generated.items()):
                print(f"  {n:3d} {name}")


if __name__ == "__main__":
    main()
