"""Generation cost: milliseconds per new token of greedy decoding, every lsrfx method unmerged against the base model,
the merged model and peft's LoRA.

A Llama from a config (``--hidden``, default 256; ``--layers``, default 4; all seven projections adapted), batch
``--batch`` (2) with an 8-token prompt, ``--new`` (20) new tokens, greedy, ``transformers``' dynamic cache (or
``--cache static``). Variants: ``base`` (no adapter), ``merged`` (lsrfx LoRA folded in with ``lsrfx.merge``: the
base's cost by construction), ``peft`` (peft LoRA r = 8), and ``lora``, ``lsr``, ``condlora``, ``genlora``
(lsrfx's defaults, LoRA r = 8).

``--mode eager``: every variant in one process, interleaved in rounds (the first variant rotating), medians.
``--mode compiled``: each model's ``forward`` wrapped in ``torch.compile`` (what ``generate`` calls); one process
per variant (Dynamo's per-frame recompile limit makes several compiled models in one process fall back to eager
silently), each timing its variant interleaved with a compiled base in the same process; the ratio is per process.

Reported: ms per new token (the whole ``generate`` call over ``--new``, median of ``--rounds``), and the ratio to
the base in the same process. Load average before and after (above 1.5 the timings mean nothing).

    python bench/decode.py --mode eager --rounds 7
    python bench/decode.py --mode compiled --rounds 7
    python bench/decode.py --mode eager --hidden 64 --layers 1 --new 4 --rounds 1      # smoke run
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch
from torch import nn

import lsrfx

from common import METHODS, add_size_arguments, interleaved_medians  # bench/ is on sys.path when run as a script

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ["base", "merged", "peft", *METHODS]


def llama(args: argparse.Namespace) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    h = args.hidden
    cfg = LlamaConfig(vocab_size=1024, hidden_size=h, intermediate_size=int(2.75 * h) // 8 * 8,
                      num_hidden_layers=args.layers, num_attention_heads=max(1, h // 64),
                      num_key_value_heads=max(1, h // 128), max_position_embeddings=512, pad_token_id=0,
                      eos_token_id=2, bos_token_id=1)
    return LlamaForCausalLM(cfg).eval()


def perturb(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)


def make(key: str, args: argparse.Namespace) -> nn.Module:
    model = llama(args)
    if key == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
        perturb(model)
    elif key in METHODS or key == "merged":
        method = "lora" if key == "merged" else key
        model = lsrfx.adapt(model, method=method, targets=TARGETS, **METHODS[method])
        perturb(model)
        if key == "merged":
            model = lsrfx.merge(model)
    model.eval()
    if args.mode == "compiled":
        model.forward = torch.compile(model.forward)
    return model


def timer(model: nn.Module, args: argparse.Namespace):
    ids = torch.randint(3, 1024, (args.batch, 8), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                  cache_implementation=args.cache if args.cache != "dynamic" else None)

    def once() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, **kwargs)
        return (time.perf_counter() - t0) * 1000 / args.new

    return once


def interleave(keys: list[str], args: argparse.Namespace) -> dict[str, float]:
    return interleaved_medians({k: timer(make(k, args), args) for k in keys}, args.rounds, args.warmup)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["eager", "compiled"], default="eager")
    p.add_argument("--cache", choices=["dynamic", "static"], default="dynamic")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--new", type=int, default=20)
    add_size_arguments(p, hidden=256, layers=4, rounds=7)
    p.add_argument("--variants", nargs="+", default=VARIANTS)
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.only:  # child of --mode compiled: one variant against a compiled base
        med = interleave(["base", args.only] if args.only != "base" else ["base"], args)
        print(f"RESULT {args.only} {med[args.only]:.4f} {med['base']:.4f}")
        return
    print(f"decode ({args.mode}, {args.cache} cache): Llama hidden {args.hidden}, {args.layers} layers, batch "
          f"{args.batch}, {args.new} new tokens, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f} before")
    rows = []
    if args.mode == "eager":
        med = interleave(args.variants if "base" in args.variants else ["base", *args.variants], args)
        rows = [(k, med[k], med["base"]) for k in med]
    else:
        for key in args.variants:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--only", key]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            _, name, ms, base = out.strip().splitlines()[-1].split()
            rows.append((name, float(ms), float(base)))
    print(f"{'variant':10s} {'ms/token':>9s} {'x base':>7s}")
    for name, ms, base in rows:
        print(f"{name:10s} {ms:9.3f} {ms / base:7.2f}")
    after = os.getloadavg()[0]
    print(f"load average {after:.2f} after" + ("  (above 1.5: these timings mean nothing)" if after > 1.5 else ""))


if __name__ == "__main__":
    main()
