"""Full training step (forward, backward, optimizer) on a BERT encoder: lsrfx vs the base floor vs peft.

Variants, timed interleaved over rounds (this machine is noisy) and reported as medians with ratios to the
"base floor" measured in the same run, plus the peak memory one step adds:

* ``base floor``: no adapter, frozen base, but the full input-gradient backward (the embeddings' output requires
  grad), i.e. the least any adapter can cost;
* ``lsrfx <method> compiled``: ``torch.compile(lsrfx.adapt(model, method))`` with the default Inductor backend;
* ``lsrfx lora/lsr eager``: the debugging path; ``peft LoRA r=8`` eager and compiled.

Every adapter targets ``query`` and ``value``. Peak memory, over one extra untimed step per variant: on CUDA
``max_memory_allocated`` minus what was allocated before the step; on CPU the peak of the running sum of the
allocator's allocation and free events recorded by ``torch.profiler`` (``profile_memory=True``; Inductor's buffers
go through the same allocator), i.e. the most memory the step held at once beyond what it started with (RSS growth
is meaningless there: the allocator reuses freed pages). Checked on toy cases: one 100 MB tensor allocated and
freed reads 100 MB; four 25 MB tensors plus a 50 MB one alive together read 150 MB.

    python bench/train_step.py                            # MiniLM-L6 size (384) and a wide one (1024), 16 x 128
    python bench/train_step.py --layers 2 --rounds 3      # quicker
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import lsrfx

METHODS = {"lora": dict(r=8, alpha=8.0), "lsr": dict(r1=2, r2=2, separation_rank=16), "condlora": dict(r=8),
           "genlora": dict(r=32)}


def bert(hidden: int, layers: int, device: str) -> nn.Module:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                     intermediate_size=4 * hidden, vocab_size=30522, max_position_embeddings=512)
    cfg.attn_implementation = "sdpa"
    return BertModel(cfg, add_pooling_layer=False).to(device).train()


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_step(model: nn.Module, embeds: torch.Tensor, extra: list[torch.Tensor]) -> Callable[[], None]:
    params = trainable(model) + extra
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step() -> None:
        out = model(inputs_embeds=embeds).last_hidden_state
        out.float().pow(2).mean().backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def variants(hidden: int, layers: int, embeds: torch.Tensor, device: str) -> dict[str, Callable[[], None]]:
    from peft import LoraConfig, get_peft_model

    out: dict[str, Callable[[], None]] = {}
    base = bert(hidden, layers, device).requires_grad_(False)
    leaf = embeds.clone().requires_grad_()
    out["base floor (compiled)"] = make_step(torch.compile(base), leaf, [leaf])
    for method, opts in METHODS.items():
        m = lsrfx.adapt(bert(hidden, layers, device), method=method, targets=["query", "value"], **opts)
        out[f"lsrfx {method} compiled"] = make_step(torch.compile(m), embeds, [])
    for method in ("lora", "lsr"):
        m = lsrfx.adapt(bert(hidden, layers, device), method=method, targets=["query", "value"], **METHODS[method])
        out[f"lsrfx {method} eager"] = make_step(m, embeds, [])
    cfg = dict(r=8, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.0)
    out["peft lora eager"] = make_step(get_peft_model(bert(hidden, layers, device), LoraConfig(**cfg)), embeds, [])
    peft_c = torch.compile(get_peft_model(bert(hidden, layers, device), LoraConfig(**cfg)))
    out["peft lora compiled"] = make_step(peft_c, embeds, [])
    return out


def _profiled_peak_mb(step: Callable[[], None]) -> float:
    """Peak of the running sum of CPU allocations (+) and frees (-) during ``step``, in MB."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events: list[tuple[int, int]] = []
    todo = list(prof.profiler.kineto_results.experimental_event_tree())
    while todo:
        e = todo.pop()
        todo.extend(e.children)
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
    running = peak = 0
    for _, size in sorted(events):
        running += size
        peak = max(peak, running)
    return peak / 2**20


def peak_memory_mb(step: Callable[[], None], device: str) -> float:
    """Memory one step adds at its peak (CUDA: allocator peak; CPU: profiler allocation events)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - start) / 2**20
    return _profiled_peak_mb(step)


def run(hidden: int, layers: int, batch: int, seq: int, rounds: int, warmup: int, device: str,
        progress: bool = False) -> list[str]:
    torch.manual_seed(0)
    embeds = torch.randn(batch, seq, hidden, device=device)
    steps = variants(hidden, layers, embeds, device)
    for name, step in steps.items():  # compile and warm up
        t0 = time.perf_counter()
        for _ in range(warmup):
            step()
        print(f"  warmed up {name} in {time.perf_counter() - t0:.1f} s", flush=True)
    mem = {name: peak_memory_mb(step, device) for name, step in steps.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(rounds):
        print(f"  round {i + 1}/{rounds}", flush=True)
        for name, step in steps.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
        if progress and i + 1 < rounds:  # interim table, in case a long run has to be stopped
            print("\n".join(table(hidden, layers, batch, seq, i + 1, device, times, mem)), flush=True)
    return table(hidden, layers, batch, seq, rounds, device, times, mem)


def table(hidden: int, layers: int, batch: int, seq: int, rounds: int, device: str, times: dict[str, list[float]],
          mem: dict[str, float]) -> list[str]:
    med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
    floor, peft_c = med["base floor (compiled)"], med["peft lora compiled"]
    rows = [f"\nhidden {hidden}, {layers} layers, batch {batch} x {seq}, {rounds} rounds, {device}",
            "| variant | median step (ms) | x base floor | x peft compiled | peak mem (MB) |",
            "|---|---:|---:|---:|---:|"]
    rows += [f"| {n} | {med[n]:.1f} | {med[n] / floor:.2f} | {med[n] / peft_c:.2f} | {mem[n]:.1f} |" for n in times]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, nargs="+", default=[384, 1024])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--progress", action="store_true", help="print the table so far after every round")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch._dynamo.config.recompile_limit = 64
    for hidden in args.hidden:
        rows = run(hidden, args.layers, args.batch, args.seq, args.rounds, args.warmup, args.device, args.progress)
        print("\n".join(rows), flush=True)


if __name__ == "__main__":
    main()
