"""Per-token onnxruntime latency of a decoder with its key/value cache vs re-running the whole sequence without it.

A Llama config (random weights, no downloads; default hidden 256, 4 layers, 8 heads with 4 key/value heads) is
adapted with LoRA (non-zero adapters standing in for a fine-tune) and exported twice with ``lsrfx.merge_and_export``:
``with_past=True`` (the cache graph, verified by greedy generation) and without (a single-pass graph over
``input_ids`` and ``attention_mask``). One new token after ``--past`` tokens costs, in onnxruntime on CPU:

* cached: one call of the cache graph with a 1-token input and the present of a ``--past``-token prompt as past;
* uncached: one call of the single-pass graph over all ``--past + 1`` tokens (what a deployed decoder without the
  cache recomputes for every token).

Both outputs are checked against each other first (the last position's logits agree). The two are timed
interleaved in rounds (the machine is shared and noisy; the order alternates), each round the mean of ``--reps``
runs; medians over rounds and the uncached/cached ratio are printed (and written with ``--json``).

    .venv/bin/python bench/onnx_decode.py [--hidden 256] [--layers 4] [--heads 8] [--kv-heads 4] [--vocab 8000]
        [--past 128] [--batch 1] [--rounds 20] [--reps 10] [--threads 1] [--json out.json]

A smoke run (not a measurement): ``--hidden 32 --layers 1 --heads 4 --kv-heads 2 --vocab 100 --past 16 --rounds 2
--reps 1``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import transformers as tf

import lsrfx
from lsrfx.parametrization import adapter_parameters


def build(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                            num_hidden_layers=args.layers, num_attention_heads=args.heads,
                            num_key_value_heads=args.kv_heads, max_position_embeddings=max(256, 2 * args.past),
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = lsrfx.adapt(tf.LlamaForCausalLM(config).eval(), method="lora", r=8, alpha=16.0)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.normal_(0.0, 0.05)
    return model


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def feeds(cached: ort.InferenceSession, args: argparse.Namespace) -> tuple[dict, dict]:
    """The inputs of one new token after ``args.past`` tokens: (cache graph's, single-pass graph's)."""
    g = np.random.default_rng(0)
    ids = g.integers(3, args.vocab, (args.batch, args.past + 1), dtype=np.int64)
    mask = np.ones_like(ids)
    positions = np.tile(np.arange(args.past + 1, dtype=np.int64), (args.batch, 1))
    inputs = {i.name: i for i in cached.get_inputs()}
    prompt = {"input_ids": ids[:, :-1], "attention_mask": mask[:, :-1], "position_ids": positions[:, :-1]}
    prompt |= {n: np.zeros((args.batch, i.shape[1], 0, i.shape[3]), np.float32)
               for n, i in inputs.items() if n.startswith("past_key_values.")}
    names = [o.name for o in cached.get_outputs()]
    present = dict(zip(names, cached.run(None, prompt), strict=True))
    step = {"input_ids": ids[:, -1:], "attention_mask": mask, "position_ids": positions[:, -1:]}
    step |= {n: present[n.replace("past_key_values.", "present.")] for n in inputs if n.startswith("past_key_values.")}
    return step, {"input_ids": ids, "attention_mask": mask}


def latency(runs: dict[str, tuple[ort.InferenceSession, dict]], rounds: int, reps: int) -> dict[str, float]:
    """Median milliseconds per call; the variants interleaved in every round, order alternating."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    for sess, feed in runs.values():
        for _ in range(3):
            sess.run(None, feed)
    for r in range(rounds):
        for name in (list(runs) if r % 2 == 0 else list(reversed(runs))):
            sess, feed = runs[name]
            start = time.perf_counter()
            for _ in range(reps):
                sess.run(None, feed)
            times[name].append((time.perf_counter() - start) * 1e3 / reps)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in [("hidden", 256), ("layers", 4), ("heads", 8), ("kv-heads", 4), ("vocab", 8000),
                          ("past", 128), ("batch", 1), ("rounds", 20), ("reps", 10), ("threads", 1)]:
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model = build(args)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ids = torch.randint(3, args.vocab, (2, 16))
        with_past = lsrfx.merge_and_export(model, tmp / "cached.onnx", {"input_ids": ids}, with_past=True)
        plain = lsrfx.merge_and_export(model, tmp / "plain.onnx",
                                       {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        cached, uncached = session(tmp / "cached.onnx", args.threads), session(tmp / "plain.onnx", args.threads)
        step, whole = feeds(cached, args)
        agree = float(np.abs(cached.run(["logits"], step)[0][:, -1] - uncached.run(["logits"], whole)[0][:, -1]).max())
        if agree > 1e-3:
            raise SystemExit(f"the two graphs disagree on the new token's logits by {agree:.3g}")
        ms = latency({"cached": (cached, step), "uncached": (uncached, whole)}, args.rounds, args.reps)
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "max_abs_diff_cached_vs_uncached": agree,
        "ms_per_token_median": ms,
        "ratio_uncached_over_cached": ms["uncached"] / ms["cached"],
        "sizes_bytes": {"cached": with_past.size, "uncached": plain.size},
    }
    print(f"Llama hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} kv heads, batch "
          f"{args.batch}; one new token after {args.past} tokens; {args.threads} thread(s), {args.rounds} rounds x "
          f"{args.reps} runs")
    print(f"  with the cache     {ms['cached']:8.3f} ms/token")
    print(f"  without (re-run)   {ms['uncached']:8.3f} ms/token")
    print(f"  ratio {ms['uncached'] / ms['cached']:.2f}x; last-token logits agree to {agree:.1e}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
