"""What the bench/ timing scripts share: the adapter options they run (every registered method at its defaults,
derived from ``lsrfx.METHODS``, so a new method is benchmarked without touching bench/), peft's LoRA as the
reference, the BERT encoder the train-step scripts build, one training step, the fusion-policy switch and the CPU
peak-memory count. Each script imports it as ``common`` (``bench/`` is on ``sys.path`` when a script runs)."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

import lsrfx

# Every registered method at its defaults (LoRA r = alpha = 8, as peft's reference below; LSR-Adapt rank 8:
# r1 = 2, r2 = 4, S = 11; CondLoRA r = 8; GenLoRA r = 32, g = 2).
METHODS: dict[str, dict] = {method: {} for method in lsrfx.METHODS}
PEFT_LORA = dict(r=8, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.0)
# One colour per method in the plots, in registry order.
COLOURS = dict(zip(lsrfx.METHODS, ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
                                    "tab:pink", "tab:olive"], strict=False))


def bert(hidden: int, layers: int, device: str) -> nn.Module:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                     intermediate_size=4 * hidden, vocab_size=30522, max_position_embeddings=512)
    cfg.attn_implementation = "sdpa"
    return BertModel(cfg, add_pooling_layer=False).to(device).train()


def make_step(model: nn.Module, embeds: torch.Tensor, extra: list[torch.Tensor]) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad] + extra
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step() -> None:
        out = model(inputs_embeds=embeds).last_hidden_state
        out.float().pow(2).mean().backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


@contextmanager
def fuse_policy(value: str | None) -> Iterator[None]:
    """``LSRFX_FUSE=value`` for the duration (unchanged when ``value`` is None), restored after."""
    old = os.environ.get("LSRFX_FUSE")
    if value is not None:
        os.environ["LSRFX_FUSE"] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                os.environ.pop("LSRFX_FUSE", None)
            else:
                os.environ["LSRFX_FUSE"] = old


def profiled_peak_mb(step: Callable[[], None]) -> float:
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
    return profiled_peak_mb(step)


def add_size_arguments(parser, *, hidden: int, layers: int, rounds: int, warmup: int = 2) -> None:
    """The model size and timing flags every interleaved benchmark takes."""
    parser.add_argument("--hidden", type=int, default=hidden)
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--warmup", type=int, default=warmup)


def settle_load(below: float = 0.5, timeout: float = 240.0) -> float:
    """Wait until the one-minute load average is under ``below`` (at most ``timeout`` seconds) and return it: between
    repeated runs the previous run's own threads keep the average up for a minute or two after it ends, and a run
    started then reads a load that says nothing about other processes on the machine."""
    end = time.monotonic() + timeout
    while os.getloadavg()[0] >= below and time.monotonic() < end:
        time.sleep(5)
    return os.getloadavg()[0]


def interleaved_medians(runs: dict, rounds: int, warmup: int = 0) -> dict:
    """Median per run over ``rounds``, the runs interleaved with a start rotating each round (so drift on a noisy
    machine spreads over all of them), after ``warmup`` untimed calls each. A run returning a number reports its
    own measure (ms per token, say); otherwise its wall time in seconds is taken."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    keys = list(runs)
    times: dict = {k: [] for k in keys}
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[: r % len(keys)]:
            start = time.perf_counter()
            measured = runs[k]()
            times[k].append(time.perf_counter() - start if measured is None else measured)
    return {k: statistics.median(v) for k, v in times.items()}
