"""Cold compile time: the first compiled training step of every variant, whole-model and per-block, by depth.

The model is bench/eager.py's Llama (from a config: hidden ``--hidden``, default 1024; intermediate 2.75 x hidden;
``hidden / 64`` heads, ``hidden / 256`` key/value heads; vocabulary 1024) with every linear layer of every block
adapted (``q k v o gate up down``), a batch of ``--batch x --seq`` (default 2 x 128) token ids, the causal-LM loss,
``use_cache=False`` (a KV cache's per-layer state would make each block's call differ). Variants (``--methods``):
``floor`` (no adapter, frozen base, the embeddings trained so that the input gradient flows through every layer),
``peft`` (peft LoRA r = 8, alpha 8) and every lsrfx method at its defaults (bench/common.py). Modes (``--modes``):
``whole`` is ``torch.compile(model)``; ``blocks`` is ``lsrfx.compile_blocks(model)`` (each decoder layer compiled
in place, one compiled block code for all of them; the embeddings, head and loss run eagerly).

Each (variant, mode, depth) runs in a fresh process with an empty Inductor cache directory (``TORCHINDUCTOR_CACHE_DIR``,
so nothing is reused from an earlier run: FX graph, AOTAutograd and C++ kernel caches all start empty). In it:

* **cold s**: wall time of the first training step (forward, backward, eager AdamW step), which includes Dynamo's
  trace, the lsrfx pass, AOTAutograd, Inductor's lowering and code generation and the C++ compilation;
* **cpu s**: CPU time of that step summed over the process and its children (Inductor's compile workers and the
  compilers they run, read from ``/proc``): less sensitive than wall time to other processes on the machine;
* **step ms**: median of ``--steps`` compiled steps after it (indicative only: one process per variant, not
  interleaved; bench/train_step.py and bench/eager.py measure step time properly);
* **graphs**, **breaks**: Dynamo graphs compiled and graph breaks; ``fused`` the adapted nodes the lsrfx pass fused
  or merged (``counters["lsrfx"]``);
* with ``--phases``, the seconds of the cold step spent in each compile phase (:data:`PHASES`, from
  ``torch._dynamo.utils.compile_times``; phases nest, so they do not add up to the cold time), per variant and as the
  difference from peft's: where a method's extra compile time goes.

Then a second fresh process on the same, now warm, cache directory times its first step again: **warm s**. **x peft**
is a variant's cold time over peft's whole-model cold time at the same depth in the same repetition (the issue's
targets: every lsrfx method <= 1.10 whole-model at 4, 8 and 16 layers; per-block at 16 layers below peft
whole-model). ``--repeat N`` runs every (depth, mode, variant) N times, the variants in turn within each
repetition (a single cold time moves by 10-20 % between processes here), and judges the targets on the median of
each variant's per-repetition ratios. Run nothing else beside it: compile time is CPU-bound and other processes
inflate it.

    python bench/compile_time.py --out bench/results/compile_time_1024.txt       # every variant, 4/8/16, both modes
    python bench/compile_time.py --layers 16 --modes blocks --methods peft lsr genlora
    python bench/compile_time.py --layers 16 --modes whole --methods peft lora genlora --no-warm --phases
    python bench/compile_time.py --layers 16 --modes whole --methods peft genlora --no-warm --repeat 3
    python bench/compile_time.py --hidden 64 --layers 1 2 --seq 16 --steps 1      # smoke run
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS_BEFORE = ["floor", "peft"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WHOLE_TARGET = 1.10  # every lsrfx method's cold whole-model first step <= this x peft's, at every depth
BLOCKS_DEPTH = 16  # per-block: the cold first step at this depth below peft's whole-model one
# Compile phases reported by --phases (names of torch._dynamo.utils.compile_times): Dynamo's tracing of the Python
# (and the variables it builds for each parameter), AOTAutograd's joint trace and partition, Inductor's lowering,
# scheduling and C++ compilation, and the forward and backward compilers around them.
PHASES = ["bytecode_tracing", "variable_builder_call", "aot_trace_joint_graph", "min_cut_rematerialization_partition",
          "GraphLowering.run", "Scheduler.codegen", "compile_file", "compile_fx.<locals>.fw_compiler_base",
          "compile_fx.<locals>.bw_compiler"]


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        todo += [int(c) for c in children]
    return out


def cpu_seconds() -> float:
    """CPU time (user + system) of this process, its live descendants and their reaped children."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in _descendants(os.getpid()):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return total / ticks


# ---------------------------------------------------------------------------------------------------- child


def child(args: argparse.Namespace) -> dict:
    """One (variant, mode, depth) in this process: build, first step (timed), ``--steps`` more; a JSON row."""
    import torch
    from torch._dynamo.utils import counters
    from transformers import LlamaConfig, LlamaForCausalLM

    import lsrfx

    sys.path.insert(0, str(Path(__file__).parent))
    from common import METHODS

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    h = args.hidden
    cfg = LlamaConfig(vocab_size=1024, hidden_size=h, intermediate_size=int(2.75 * h) // 8 * 8,
                      num_hidden_layers=args.layers[0], num_attention_heads=max(1, h // 64),
                      num_key_value_heads=max(1, h // 256), max_position_embeddings=4096, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg)
    variant = args.child
    if variant == "floor":
        model.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)
    elif variant == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    else:
        model = lsrfx.adapt(model, method=variant, targets=TARGETS, **METHODS[variant])
    model.train()
    compiled = torch.compile(model) if args.modes[0] == "whole" else lsrfx.compile_blocks(model)
    ids = torch.randint(0, 1024, (args.batch, args.seq))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        loss = compiled(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    counters.clear()
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    step()
    cold, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    graphs = counters["stats"]["unique_graphs"]
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    from torch._dynamo.utils import compile_times

    names, seconds = compile_times(repr="csv", aggregate=True)
    phases = {n: float(v) for n, v in zip(names, seconds, strict=True) if n in PHASES}
    return {"variant": variant, "mode": args.modes[0], "layers": args.layers[0], "first_s": cold, "cpu_s": cpu,
            "phases": phases,
            "step_ms": 1e3 * statistics.median(times) if times else float("nan"), "graphs": graphs,
            "later_graphs": counters["stats"]["unique_graphs"] - graphs,
            "breaks": sum(counters["graph_break"].values()),
            "fused": counters["lsrfx"]["fused"] + counters["lsrfx"]["merged"]}


# ---------------------------------------------------------------------------------------------------- parent


def run_child(args: argparse.Namespace, variant: str, mode: str, layers: int, cache: str) -> dict | None:
    cmd = [sys.executable, __file__, "--child", variant, "--modes", mode, "--layers", str(layers),
           "--hidden", str(args.hidden), "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": os.path.join(cache, "triton")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    rows = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not rows:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        print(f"  {variant} {mode} {layers} layers failed (exit {proc.returncode}):\n{tail}", flush=True)
        return None
    return json.loads(rows[-1])


def peft_ratio(row: dict, rows: list[dict]) -> float | None:
    """``row``'s cold time over peft's whole-model one at the same depth in the same repetition."""
    peft = [r["first_s"] for r in rows if r["variant"] == "peft" and r["mode"] == "whole"
            and r["layers"] == row["layers"] and r["run"] == row["run"]]
    return row["first_s"] / peft[0] if peft else None


def table(rows: list[dict]) -> list[str]:
    lines = ["| run | variant | mode | layers | cold s | x peft | cpu s | warm s | step ms | graphs | breaks | fused |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = peft_ratio(r, rows)
        ratio = "-" if ratio is None else f"{ratio:.2f}"
        warm = f"{r['warm_s']:.1f}" if r.get("warm_s") is not None else "-"
        lines.append(f"| {r['run'] + 1} | {r['variant']} | {r['mode']} | {r['layers']} | {r['first_s']:.1f} | {ratio} | "
                     f"{r['cpu_s']:.1f} | {warm} | {r['step_ms']:.0f} | {r['graphs']}"
                     f"{'+' + str(r['later_graphs']) if r['later_graphs'] else ''} | {r['breaks']} | {r['fused']} |")
    return lines


def phase_table(rows: list[dict]) -> list[str]:
    """Seconds per compile phase of each cold step, and the difference from peft's in the same mode and depth."""
    peft = {(r["run"], r["mode"], r["layers"]): r["phases"] for r in rows if r["variant"] == "peft"}
    lines = ["| run | variant | mode | layers | " + " | ".join(p.replace("compile_fx.<locals>.", "") for p in PHASES)
             + " |", "|---|---|---|---|" + "---:|" * len(PHASES)]
    for r in rows:
        base = peft.get((r["run"], r["mode"], r["layers"]), {})
        cells = [f"{r['phases'].get(p, 0.0):.1f}" + (f" ({r['phases'].get(p, 0.0) - base.get(p, 0.0):+.1f})"
                                                     if base and r["variant"] != "peft" else "") for p in PHASES]
        lines.append(f"| {r['run'] + 1} | {r['variant']} | {r['mode']} | {r['layers']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def verdicts(rows: list[dict]) -> list[str]:
    """Each lsrfx variant's target, judged on the median of its per-repetition ratios to peft's whole-model time."""
    ratios: dict[tuple, list[float]] = {}
    for r in rows:
        ratio = peft_ratio(r, rows)
        if ratio is not None and r["variant"] not in VARIANTS_BEFORE:
            ratios.setdefault((r["variant"], r["mode"], r["layers"]), []).append(ratio)
    out = []
    for (variant, mode, layers), values in ratios.items():
        ratio = statistics.median(values)
        runs = f" (median of {', '.join(f'{v:.2f}' for v in values)})" if len(values) > 1 else ""
        said = f"{variant} {mode}, {layers} layers: x{ratio:.2f} of peft whole{runs}"
        if mode == "whole":
            out.append(f"{said} (target <= {WHOLE_TARGET}): {'met' if ratio <= WHOLE_TARGET else 'missed'}")
        elif layers == BLOCKS_DEPTH:
            out.append(f"{said} (target < 1.00): {'met' if ratio < 1.0 else 'missed'}")
        else:
            out.append(f"{said} (the target is at {BLOCKS_DEPTH} layers)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--methods", nargs="+", default=None,
                        help="variants: floor, peft and lsrfx methods (default: all; peft is always run)")
    parser.add_argument("--modes", nargs="+", default=["whole", "blocks"], choices=["whole", "blocks"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="compiled steps timed after the first (median)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--no-warm", action="store_true", help="skip the warm-cache run")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per process")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    parser.add_argument("--phases", action="store_true", help="also report seconds per compile phase")
    parser.add_argument("--repeat", type=int, default=1, help="run every variant this many times, in turn")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return

    import lsrfx

    variants = args.methods or [*VARIANTS_BEFORE, *lsrfx.METHODS]
    if "peft" not in variants:
        variants = ["peft", *variants]
    header = (f"compile_time: Llama hidden {args.hidden}, all seven projections, batch {args.batch} x {args.seq}; "
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus; load average "
              f"{os.getloadavg()[0]:.2f} at start")
    print(header, flush=True)
    rows = []
    for run, layers, mode, variant in itertools.product(range(args.repeat), args.layers, args.modes, variants):
        with tempfile.TemporaryDirectory(prefix="lsrfx-compile-time-") as cache:
            row = run_child(args, variant, mode, layers, cache)
            if row is None:
                continue
            row["run"], row["warm_s"] = run, None
            if not args.no_warm:
                warm = run_child(args, variant, mode, layers, cache)
                row["warm_s"] = warm["first_s"] if warm else None
        print(f"  run {run + 1}: {variant} {mode} {layers} layers: cold {row['first_s']:.1f} s (cpu {row['cpu_s']:.1f}"
              f" s), warm {row['warm_s'] if row['warm_s'] is None else round(row['warm_s'], 1)} s, "
              f"step {row['step_ms']:.0f} ms, graphs {row['graphs']}, breaks {row['breaks']}", flush=True)
        rows.append(row)
    report = [header, "", *table(rows), "", *(phase_table(rows) if args.phases else []), *verdicts(rows),
              f"load average {os.getloadavg()[0]:.2f} at end (above ~1.5 beside this run the times mean little)"]
    print("\n".join(report))
    if args.out:
        args.out.write_text("\n".join(report) + "\n")


if __name__ == "__main__":
    main()
