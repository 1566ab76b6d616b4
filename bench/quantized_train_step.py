"""Train step over an int8 quantized base (torchao) against the fp32 base: time, peak memory, model size.

Every linear layer of a BERT encoder built from a config (random weights, ``--hidden x --layers``) is quantized with
``torchao.quantization.quantize_(model, Int8WeightOnlyConfig())`` for the ``int8`` rows and left fp32 for the ``fp32``
rows; adapters go on the query/value projections (each method's defaults, as in ``bench/train_step.py``), peft's
LoRA r = 8 (which wraps torchao weights in its ``TorchaoLoraLinear``) beside them. Every variant is compiled
(``torch.compile``) and steps ``AdamW`` on random ``inputs_embeds`` of ``--batch x --seq``; variants run
interleaved over ``--rounds`` rounds at torch's default thread count and the table reports median step times as
ratios against the fp32 peft row of the same run, the int8/fp32 ratio per method, the step's peak memory (profiler
allocation events) and the model's storage (quantized tensors by their int8 data and scales).

    python bench/quantized_train_step.py --hidden 384 --layers 6 --batch 16 --seq 128 --rounds 5

Run it with nothing else on the machine (the load average is printed before and after).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import lsrfx
from lsrfx.quantized_base import storage_bytes

from common import METHODS, PEFT_LORA, make_step, profiled_peak_mb  # bench/ is on sys.path when run as a script


def bert(hidden: int, layers: int, base: str) -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                     intermediate_size=4 * hidden, vocab_size=30522, max_position_embeddings=512)
    cfg.attn_implementation = "sdpa"
    model = BertModel(cfg, add_pooling_layer=False).train()
    if base == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig())
    return model


def linear_bytes(model: nn.Module) -> int:
    """Storage of the encoder's linear layers (weights and biases), the part quantization shrinks."""
    return sum(storage_bytes(m) for m in model.modules() if isinstance(m, nn.Linear))


def build(variant: str, base: str, args: argparse.Namespace, embeds: torch.Tensor
          ) -> tuple[Callable[[], None], nn.Module]:
    model = bert(args.hidden, args.layers, base)
    if variant == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(**PEFT_LORA))
    else:
        model = lsrfx.adapt(model, method=variant, targets=["query", "value"], **METHODS[variant])
    return make_step(torch.compile(model), embeds, []), model


def load_line(when: str) -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {when}: 1-min {one:.2f}, 5-min {five:.2f}, 15-min {fifteen:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--variants", nargs="+", default=["peft", *METHODS])
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; BERT hidden {args.hidden} x {args.layers} "
          f"layers, batch {args.batch} x {args.seq}; {load_line('before')}", flush=True)
    embeds = torch.randn(args.batch, args.seq, args.hidden)
    keys = [(v, base) for v in args.variants for base in ("fp32", "int8")]
    steps, info = {}, {}
    for key in keys:
        t0 = time.perf_counter()
        step, model = build(*key, args, embeds)
        step()
        compile_s = time.perf_counter() - t0
        step()
        info[key] = {"compile_s": compile_s, "peak_mb": profiled_peak_mb(step),
                     "model_mb": storage_bytes(model) / 2**20, "linear_mb": linear_bytes(model) / 2**20}
        steps[key] = step
        print(f"  {key[0]} {key[1]}: first step {compile_s:.1f} s, peak {info[key]['peak_mb']:.1f} MB, model "
              f"{info[key]['model_mb']:.1f} MB (linears {info[key]['linear_mb']:.1f} MB)", flush=True)
    times: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    for r in range(args.rounds):
        for key in keys if r % 2 == 0 else reversed(keys):
            t0 = time.perf_counter()
            steps[key]()
            times[key].append(time.perf_counter() - t0)
    median = {k: statistics.median(v) for k, v in times.items()}
    ref = median[("peft", "fp32")] if ("peft", "fp32") in median else median[keys[0]]
    print(f"\n{load_line('after')}\n")
    print("| variant | base | step ms (median) | x fp32 peft | int8 / fp32 | step peak MB | model MB | linears MB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for v, base in keys:
        k = (v, base)
        ratio = median[k] / median[(v, "fp32")]
        print(f"| {'peft lora' if v == 'peft' else 'lsrfx ' + v} | {base} | {1e3 * median[k]:,.0f} | "
              f"{median[k] / ref:.3f} | {ratio:.3f} | {info[k]['peak_mb']:.1f} | {info[k]['model_mb']:.1f} | "
              f"{info[k]['linear_mb']:.1f} |")


if __name__ == "__main__":
    main()
