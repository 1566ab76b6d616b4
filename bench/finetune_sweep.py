"""Validation-split sweep for ``lsrfx finetune``: learning rate, scale (alpha) and init per method.

Each spec is ``METHOD:LR[:HEAD_LR][:key=value,...]``; every spec runs for every seed (eager, no export, one thread
unless --threads) and the script prints and appends to ``--results`` (JSON lines) the final validation accuracy,
mean +- std over seeds. Test accuracy is never read here: choices are made on validation only.

    python bench/finetune_sweep.py --seeds 0 1 --epochs 8 lora:1e-3 lora:3e-3 lsr:3e-3::alpha=16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lsrfx.cli import parse_value
from lsrfx.finetune.defaults import HEAD_LR
from lsrfx.finetune.run import FinetuneSettings, run_finetune


def parse_spec(spec: str) -> tuple[str, float, float, dict]:
    parts = spec.split(":")
    method, lr = parts[0], float(parts[1])
    head_lr = float(parts[2]) if len(parts) > 2 and parts[2] else HEAD_LR
    options = {}
    if len(parts) > 3 and parts[3]:
        for item in parts[3].split(","):
            key, _, value = item.partition("=")
            options[key] = parse_value(value)
    return method, lr, head_lr, options


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", type=Path, default=Path("bench/results/finetune_sweep.jsonl"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for spec in args.specs:
        method, lr, head_lr, options = parse_spec(spec)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            report = run_finetune(FinetuneSettings(
                out=Path(tmp) / "out", methods=[method], seeds=args.seeds, options={method: options},
                epochs=args.epochs, lr=lr, head_lr=head_lr, compile=False, export=False), log=lambda *a: None)
        runs = report["runs"]
        val = [r["best_validation"]["accuracy"] for r in runs]  # the kept (best) epoch's
        row = {
            "spec": spec, "method": method, "lr": lr, "head_lr": head_lr, "options": options,
            "epochs": args.epochs, "seeds": args.seeds, "adapter_params": runs[0]["adapter_params"],
            "val_acc_mean": statistics.fmean(val), "val_acc_std": statistics.stdev(val) if len(val) > 1 else 0.0,
            "val_acc_by_epoch": [statistics.fmean(r["validation"][e]["accuracy"] for r in runs)
                                 for e in range(min(len(r["validation"]) for r in runs))],  # early stops
            "step_ms": 1000 * statistics.median(r["step_time_s"] for r in runs),
            "seconds": time.perf_counter() - t0,
        }
        with args.results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{spec:40s} params {row['adapter_params']:>7,}  val {100 * row['val_acc_mean']:.2f} +- "
              f"{100 * row['val_acc_std']:.2f}  by epoch {[round(100 * v, 1) for v in row['val_acc_by_epoch']]}  "
              f"{row['seconds']:.0f}s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
