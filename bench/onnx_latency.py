"""Merged ONNX export vs the exported base model: file sizes, max differences and onnxruntime latency.

For a BERT and a GPT-2 config (random weights, no downloads) this builds the base model, an LSR-adapted copy with
non-zero adapters (standing in for a fine-tune), and exports the base, the merged model and the unmerged model
(``merge=False``) with ``lsrfx.merge_and_export``. It reports each file's size, the adapter files' size, the max
abs difference onnxruntime vs PyTorch (measured here on fresh inputs, not taken from the report), and onnxruntime
CPU latency, timed interleaved in rounds (the machine is shared and noisy) with medians and the merged/base ratio.

    /work/venv/bin/python bench/onnx_latency.py [--rounds 15] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
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


def models() -> dict[str, tuple[torch.nn.Module, dict[str, torch.Tensor]]]:
    torch.manual_seed(0)
    bert = tf.BertModel(tf.BertConfig(vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                      intermediate_size=1024, max_position_embeddings=256))
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=8000, n_embd=256, n_layer=4, n_head=4, n_positions=256,
                                            use_cache=False))
    ids = torch.randint(0, 8000, (4, 128))
    return {
        "bert (L4 H256, LSR on query/value)": (bert.eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}),
        "gpt2 (L4 H256, LSR on c_attn)": (gpt2.eval(), {"input_ids": ids}),
    }


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def torch_out(model: torch.nn.Module, feeds: dict) -> np.ndarray:
    with torch.no_grad():
        out = model(**feeds)
    return next(iter(out.values())).numpy()


def latency(sessions: dict[str, ort.InferenceSession], feeds: dict, rounds: int, reps: int) -> dict[str, float]:
    """Median milliseconds per run; variants interleaved within every round."""
    np_feeds = {k: v.numpy() for k, v in feeds.items()}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        for _ in range(3):
            s.run(None, np_feeds)
    for r in range(rounds):
        order = list(sessions) if r % 2 == 0 else list(reversed(sessions))
        for name in order:
            start = time.perf_counter()
            for _ in range(reps):
                sessions[name].run(None, np_feeds)
            times[name].append((time.perf_counter() - start) * 1e3 / reps)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i, (name, (base, feeds)) in enumerate(models().items()):
            adapted = lsrfx.adapt(copy.deepcopy(base), method="lsr")
            with torch.no_grad():
                for p in adapter_parameters(adapted).values():
                    p.normal_(0.0, 0.05)
            files = {"base": tmp / f"{i}-base.onnx", "merged": tmp / f"{i}-merged.onnx",
                     "unmerged": tmp / f"{i}-unmerged.onnx"}
            reports = {
                "base": lsrfx.merge_and_export(base, files["base"], feeds),
                "merged": lsrfx.merge_and_export(adapted, files["merged"], feeds),
                "unmerged": lsrfx.merge_and_export(adapted, files["unmerged"], feeds, merge=False),
            }
            lsrfx.save_adapters(adapted, tmp / f"{i}-adapters")
            fresh = torch.randint(0, 8000, (3, 100))
            fresh_feeds = {k: (fresh if k == "input_ids" else torch.ones_like(fresh)) for k in feeds}
            sessions = {k: session(f, args.threads) for k, f in files.items()}
            ref = {"base": torch_out(base, fresh_feeds), "merged": torch_out(adapted, fresh_feeds)}
            ref["unmerged"] = ref["merged"]
            diffs = {k: float(np.abs(sessions[k].run(None, {n: v.numpy() for n, v in fresh_feeds.items()})[0]
                                     - ref[k]).max()) for k in files}
            ms = latency(sessions, feeds, args.rounds, args.reps)
            results[name] = {
                "size_bytes": {k: r.size for k, r in reports.items()}
                | {"adapters.safetensors": (tmp / f"{i}-adapters" / "adapters.safetensors").stat().st_size},
                "node_count": {k: r.node_count for k, r in reports.items()},
                "report_max_diff": {k: r.max_diff for k, r in reports.items()},
                "max_abs_diff_fresh_inputs": diffs,
                "latency_ms_median": ms,
                "ratio_merged_over_base": ms["merged"] / ms["base"],
                "ratio_unmerged_over_base": ms["unmerged"] / ms["base"],
            }
            print(f"\n== {name}; inputs {tuple(feeds['input_ids'].shape)}, {args.threads} thread(s), "
                  f"{args.rounds} rounds x {args.reps} runs")
            for k in files:
                print(f"  {k:9s} {reports[k].size / 1e6:7.2f} MB  {reports[k].node_count:4d} nodes  "
                      f"max diff (report) {reports[k].max_diff:.1e}  (fresh inputs) {diffs[k]:.1e}  "
                      f"latency {ms[k]:7.2f} ms")
            print(f"  adapters.safetensors {results[name]['size_bytes']['adapters.safetensors'] / 1e3:.1f} kB; "
                  f"merged/base latency {ms['merged'] / ms['base']:.3f}, unmerged/base {ms['unmerged'] / ms['base']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
