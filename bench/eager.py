"""Training-step time and memory kept for backward: every lsrfx method against the frozen base and peft's LoRA.

Setups (``--setup``):

* ``llama``: a Llama from a config (hidden ``--hidden``, default 1024; intermediate 2.75 x hidden; ``--layers``,
  default 4; 16 heads, 4 key/value heads), every linear layer of every block adapted (``q k v o gate up down``),
  batch ``--batch x --seq`` (default 2 x 128) of token ids, causal-LM loss: the standard LLM recipe;
* ``bert``: MiniLM-size BERT (hidden 384, 6 layers, intermediate 1536, 12 heads), ``query`` and ``value`` adapted,
  a classification head trained, batch 16 x 128.

Variants: ``floor`` (no adapter: the frozen base with the input gradient still computed, the least any adapter can
cost), ``peft`` (peft LoRA r = 8, alpha 8), and ``lora``, ``lsr``, ``condlora``, ``genlora`` (lsrfx's defaults but
LoRA r = 8, alpha 8). ``--mode eager`` runs them eagerly (lsrfx's low-rank path); ``--formed`` adds each method
through the formed weight ``linear(x, W0 + dW)`` (``lsrfx.adapted_layer.formed_weight_path``: what lsrfx ran
before the low-rank path); ``--before`` adds ``condlora-separate`` (CondLoRA's factor products of their own, as
before its stacked form, eager or compiled), ``condlora-unblocked`` (stacked, but a non-square layer's two products
of ``W0`` each a whole pass over it, as before ``products_sharing_w``: the same model as ``condlora``, switched
per step) and, eagerly, ``genlora-op`` (GenLoRA's generic low-rank path with the
RBF banks through the custom op, as before ``GenLoRALinear``);
``--mode compiled`` runs every variant under ``torch.compile`` in this one process (Dynamo's recompile limit
raised, or variants past the eighth would silently run eager).

What is measured:

* **median ms**: one step (forward, backward, AdamW), ``perf_counter``, median over ``--rounds`` rounds; each
  round runs every variant once, the first variant rotating; ``--warmup`` untimed steps per variant first.
  torch's default thread count (what users get) unless ``--threads``.
* **x peft**, **x floor**: that median over peft's / the floor's from the same run.
* **kept MB**: bytes of the distinct tensor storages autograd saves for the backward, the model's parameters
  excluded (``torch.autograd.graph.saved_tensors_hooks``, one step, eager mode only).
* **peak RSS MB** (``--peak``): each variant in a fresh process (``--only KEY``), ``ru_maxrss`` after the warm-up
  and timed steps; the same process's RSS before the first step is subtracted.

Load average is printed before and after; above 1.5 the timings mean nothing (run nothing else beside it).

    python bench/eager.py --setup llama --rounds 5 --warmup 2                 # eager, Llama all-seven at 1024
    python bench/eager.py --setup llama --rounds 5 --formed                   # plus the old formed-weight path
    python bench/eager.py --setup llama --rounds 11 --warmup 2 --repeat 3     # three processes (each once the load
                                                                              # has settled), medians of ratios
    python bench/eager.py --setup llama --rounds 9 --methods condlora genlora --before   # A/B of the eager forms
    python bench/eager.py --setup llama --mode compiled --methods lora condlora --before  # and of the compiled ones
    python bench/eager.py --setup bert --rounds 5
    python bench/eager.py --setup llama --mode compiled --rounds 5
    python bench/eager.py --setup llama --mode compiled --methods condlora --product-bound 16777216   # the old bound
    python bench/eager.py --setup llama --peak                                # peak RSS, one process per variant
    python bench/eager.py --setup llama --hidden 64 --layers 1 --seq 8 --rounds 1 --warmup 1   # smoke run
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

import lsrfx
from lsrfx.adapted_layer import formed_weight_path

# bench/ is on sys.path when run as a script
from common import METHODS, add_size_arguments, interleaved_medians, settle_load

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_TARGETS = ["query", "value"]
LOAD_LIMIT = 1.5


def build(setup: str, args: argparse.Namespace) -> tuple[nn.Module, dict, list[str]]:
    torch.manual_seed(0)
    if setup == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        h = args.hidden
        cfg = LlamaConfig(vocab_size=1024, hidden_size=h, intermediate_size=int(2.75 * h) // 8 * 8,
                          num_hidden_layers=args.layers, num_attention_heads=max(1, h // 64),
                          num_key_value_heads=max(1, h // 256), max_position_embeddings=4096,
                          attn_implementation="sdpa")
        model = LlamaForCausalLM(cfg)
        ids = torch.randint(0, 1024, (args.batch, args.seq))
        return model, {"input_ids": ids, "labels": ids}, LLAMA_TARGETS
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                     num_labels=8, problem_type="single_label_classification")
    model = BertForSequenceClassification(cfg)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    return model, {"input_ids": ids, "labels": torch.randint(0, 8, (args.batch,))}, BERT_TARGETS


def make_variant(key: str, setup: str, args: argparse.Namespace) -> tuple[nn.Module, dict, Callable]:
    """``(model, batch, context)``: the variant's model ready to train and the context each step runs in."""
    model, batch, targets = build(setup, args)
    head = ["classifier"] if setup == "bert" else []
    method, _, form = key.partition("-")  # e.g. "condlora-separate": the method and an earlier eager form
    if key == "floor":
        for name, p in model.named_parameters():
            p.requires_grad_(any(name.startswith(h) for h in head))
        embeddings = model.get_input_embeddings()
        embeddings.weight.requires_grad_(True)  # the input gradient flows through every layer, as with adapters
    elif key == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                                                 modules_to_save=head or None))
    else:
        model = lsrfx.adapt(model, method=method, targets=targets, trainable=head, **METHODS[method])
    model.train()
    if args.mode == "compiled":
        model = torch.compile(model)
    context = {"formed": formed_weight_path, "separate": separate_products, "unblocked": unblocked_products,
               "op": banks_through_the_op}.get(form, nullcontext)
    return model, batch, context


@contextmanager
def separate_products() -> Iterator[None]:
    """CondLoRA's factors as products of their own, as before its stacked form (``--before``): eagerly the generic
    low-rank path, compiled the fused pass's separate matmuls (the pass decides at the first step, which runs inside
    this too)."""
    from lsrfx.adapters.condlora import CondLoRAAdapter
    from lsrfx.passes import fuse

    layer, CondLoRAAdapter.eager_linear = CondLoRAAdapter.eager_linear, lambda self, *args: None
    stacked, fuse._stacked_condlora = fuse._stacked_condlora, lambda *args: None
    try:
        yield
    finally:
        CondLoRAAdapter.eager_linear = layer
        fuse._stacked_condlora = stacked


@contextmanager
def unblocked_products() -> Iterator[None]:
    """A stacked non-square CondLoRA layer's two products of ``W0`` each a whole pass over it, as before
    ``products_sharing_w`` took ``W0`` in cache blocks (``--before``; the op's body reads the bound at run time, so
    compiled steps follow it too)."""
    from lsrfx.kernels import condlora_linear

    bound, condlora_linear.CACHE_BLOCK_BYTES = condlora_linear.CACHE_BLOCK_BYTES, 1 << 62
    try:
        yield
    finally:
        condlora_linear.CACHE_BLOCK_BYTES = bound


@contextmanager
def banks_through_the_op() -> Iterator[None]:
    """GenLoRA as before ``GenLoRALinear`` and ``RbfBank`` (``--before``): the generic low-rank path, which keeps the
    synthesised factors for the backward, with the banks called through the ``rbf_bank`` custom op."""
    from lsrfx.adapters import genlora

    class Op:
        apply = staticmethod(torch.ops.lsrfx.rbf_bank)

    function, genlora.RbfBank = genlora.RbfBank, Op
    layer, genlora.GenLoRAAdapter.eager_linear = genlora.GenLoRAAdapter.eager_linear, lambda self, *args: None
    try:
        yield
    finally:
        genlora.RbfBank = function
        genlora.GenLoRAAdapter.eager_linear = layer


def step_fn(model: nn.Module, batch: dict, context: Callable) -> Callable[[], None]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        with context():
            loss = model(**batch).loss
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def kept_bytes(model: nn.Module, batch: dict, context: Callable) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters() if type(p) in (torch.Tensor, nn.Parameter)}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if type(t) is torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
        return t

    with context(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_one(key: str, args: argparse.Namespace) -> None:
    """Child mode: one variant, warm-up and timed steps, then print its peak RSS growth."""
    model, batch, context = make_variant(key, args.setup, args)
    before = rss_mb()
    step = step_fn(model, batch, context)
    for _ in range(args.warmup + args.rounds):
        step()
    print(f"PEAK {key} {rss_mb() - before:.1f}")


def repeated(times: int) -> None:
    """``--repeat``: this benchmark ``times`` times, each in a fresh process (its own output shown) once the load
    average has settled (:func:`common.settle_load`), then every variant's ``x peft`` per run and their median."""
    argv = [*sys.argv[1:], "--repeat", "1"]  # argparse keeps the last value given
    ratios: dict[str, list[float]] = {}
    for run in range(times):
        settle_load()
        out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, check=True).stdout
        print(f"# run {run + 1} of {times}\n{out}", flush=True)
        table = out.split("x floor", 1)[1].splitlines()[1:]
        for line in table:
            words = line.split()
            if len(words) >= 3 and not line.startswith("load"):
                ratios.setdefault(words[0], []).append(float(words[2]))
    print(f"x peft over {times} runs, each run's and the median:")
    for key, values in ratios.items():
        print(f"{key:18s} " + " ".join(f"{v:5.2f}" for v in values) + f"   median {statistics.median(values):.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setup", choices=["llama", "bert"], default="llama")
    p.add_argument("--mode", choices=["eager", "compiled"], default="eager")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=128)
    add_size_arguments(p, hidden=1024, layers=4, rounds=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--formed", action="store_true", help="add each method through the formed weight")
    p.add_argument("--before", action="store_true",
                   help="add condlora-separate (factor products of their own, eager or compiled), "
                        "condlora-unblocked (W0 not taken in cache blocks) and, eagerly, genlora-op (the generic "
                        "path, banks through the custom op): the forms before CondLoRALinear / condlora_linear, "
                        "products_sharing_w and GenLoRALinear")
    p.add_argument("--peak", action="store_true", help="peak RSS per variant, one fresh process each")
    p.add_argument("--product-bound", type=int, default=None,
                   help="compiled mode: the cost model's SMALL_PRODUCT_FLOPS for this run (CondLoRA's small factor "
                        "products generated as reductions up to it; 0: always BLAS calls)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the whole benchmark this many times, each in a fresh process, and report every run's "
                        "ratios and their median (a single process's ratios move by up to 0.1 between processes)")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.repeat > 1 and not (args.only or args.peak):
        repeated(args.repeat)
        return
    if args.product_bound is not None:
        from lsrfx.passes import cost_model

        cost_model.SMALL_PRODUCT_FLOPS = args.product_bound
    args.batch = args.batch or (2 if args.setup == "llama" else 16)
    if args.threads:
        torch.set_num_threads(args.threads)
    keys = ["floor", "peft", *args.methods] + ([f"{m}-formed" for m in args.methods] if args.formed else [])
    if args.before:  # compiled, GenLoRA's banks are the op either way
        before = [("condlora", "condlora-separate"), ("condlora", "condlora-unblocked")] + (
            [("genlora", "genlora-op")] if args.mode == "eager" else [])
        keys += [k for m, k in before if m in args.methods]
    if args.only:
        peak_one(args.only, args)
        return
    print(f"{args.setup} ({args.mode}), batch {args.batch} x {args.seq}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f} before")
    if args.peak:
        rows = []
        for key in keys:
            cmd = [sys.executable, __file__, "--only", key, *sys.argv[1:]]
            out = subprocess.run([c for c in cmd if c != "--peak"], capture_output=True, text=True, check=True)
            rows.append((key, float(out.stdout.split("PEAK")[-1].split()[1])))
        base = dict(rows)["peft"]
        for key, mb in rows:
            print(f"{key:18s} peak RSS +{mb:8.1f} MB  x peft {mb / base:.2f}")
        print(f"load average {os.getloadavg()[0]:.2f} after")
        return
    if args.mode == "compiled":
        torch._dynamo.config.recompile_limit = 64
        torch._dynamo.config.cache_size_limit = 64
        if args.before:  # condlora-separate's form is chosen at compile time: no cached graph may stand in for it
            torch._inductor.config.fx_graph_cache = False
            torch._functorch.config.enable_autograd_cache = False
    variants = {k: make_variant(k, args.setup, args) for k in keys if not k.endswith("-unblocked")}
    for k in keys:  # a run-time switch only: the same model (and compiled code) as its method, switched per step
        if k.endswith("-unblocked"):
            variants[k] = (*variants[k.partition("-")[0]][:2], unblocked_products)
    kept = {k: kept_bytes(*v) / 2**20 for k, v in variants.items()} if args.mode == "eager" else {}
    steps = {k: step_fn(*v) for k, v in variants.items()}
    med = {k: s * 1000 for k, s in interleaved_medians(steps, args.rounds, args.warmup).items()}
    print(f"{'variant':18s} {'median ms':>10s} {'x peft':>7s} {'x floor':>8s} {'kept MB':>8s} {'x peft':>7s}")
    for k in keys:
        mem = (f"{kept[k]:8.1f} {kept[k] / kept['peft']:7.2f}" if kept else "")
        print(f"{k:18s} {med[k]:10.1f} {med[k] / med['peft']:7.2f} {med[k] / med['floor']:8.2f} {mem}")
    after = os.getloadavg()[0]
    print(f"load average {after:.2f} after" + ("  (above 1.5: these timings mean nothing)" if after > LOAD_LIMIT
                                                else ""))


if __name__ == "__main__":
    main()
