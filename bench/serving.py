"""Serving adapters: a mixed batch against its sets run one after another, and a load test with hot-swaps.

A Llama from a config (``--hidden`` 256, ``--layers`` 4, ``q_proj``/``v_proj``/``down_proj`` adapted) serving four
sets: its own LoRA adapter (``default``) and named LoRA, LSR-Adapt and GenLoRA sets (rank 8).

``--part mixed``: one forward of ``--rows`` rows (prompt ``--seq`` tokens) whose rows use the four sets and the
base in turn, against the same rows grouped by set and run one call per set; interleaved rounds, medians, eager and
(``--compiled``) compiled.

``--part swap``: the operator's work of one swap period below (replace the named LSR-Adapt set, hot-swap the
model's own adapter), alone, median over ``--rounds`` periods.

``--part load``: ``N`` client threads (``--clients 1 2 4``) send requests (one prompt, ``adapter_names`` a random
set) for ``--seconds``, without swaps and with an operator thread that every ``--swap-ms`` milliseconds replaces
the named LSR-Adapt set with another version and hot-swaps the model's own adapter between two versions; the two
runs alternate over ``--rounds`` rounds (the first alternating). Every output is compared with the output of the set
it asked for (either version during the swap run): the count of outputs that match no version must be 0. Reported
per N: the median requests per second over the rounds, p50 and p99 latency over all requests, wrong outputs, and
the ratio of the medians. ``--swap-into copy`` makes the operator load into a copy of the model instead: the same
work beside the clients without the swap lock, to tell the two costs apart.

    python bench/serving.py --part mixed --rounds 7
    python bench/serving.py --part mixed --rounds 7 --compiled
    python bench/serving.py --part swap --rounds 40
    python bench/serving.py --part load --clients 1 2 4 --seconds 5 --rounds 4
    python bench/serving.py --part load --clients 1 2 4 --seconds 5 --rounds 4 --swap-into copy
    python bench/serving.py --part load --clients 2 --seconds 1 --hidden 64 --layers 1     # smoke run
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import tempfile
import threading
import time

import torch
from torch import nn

import lsrfx

from common import add_size_arguments  # bench/ is on sys.path when run as a script

TARGETS = ["q_proj", "v_proj", "down_proj"]
SETS = {"lora": ("lora", dict(r=8)), "lsr": ("lsr", dict(r1=2, r2=4)), "genlora": ("genlora", dict(r=8))}


def base(args: argparse.Namespace) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    h = args.hidden
    cfg = LlamaConfig(vocab_size=1024, hidden_size=h, intermediate_size=int(2.75 * h) // 8 * 8,
                      num_hidden_layers=args.layers, num_attention_heads=max(1, h // 64),
                      num_key_value_heads=max(1, h // 128), pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def save(args: argparse.Namespace, directory: str, method: str, options: dict, seed: int) -> str:
    model = lsrfx.adapt(base(args), method=method, targets=TARGETS, **options)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return str(lsrfx.save_adapters(model, directory))


def served_model(args: argparse.Namespace, workdir: str) -> tuple[nn.Module, dict[str, list[str]]]:
    """The model with its own adapter and the named sets; ``versions[name]``: the directories a name may hold."""
    versions = {"default": [save(args, f"{workdir}/default-{v}", "lora", dict(r=8), 10 + v) for v in (1, 2)]}
    for i, (name, (method, options)) in enumerate(SETS.items()):
        versions[name] = [save(args, f"{workdir}/{name}-{v}", method, options, 20 + 10 * i + v) for v in (1, 2)]
    model = lsrfx.load_adapters(base(args), versions["default"][0])
    for name in SETS:
        lsrfx.load_adapters(model, versions[name][0], name=name)
    return model, versions


def mixed(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        model, _ = served_model(args, workdir)
        if args.compiled:
            model = torch.compile(model)
        names = ["default", *SETS, None]
        rows = [names[i % len(names)] for i in range(args.rows)]
        ids = torch.randint(3, 1024, (args.rows, args.seq), generator=torch.Generator().manual_seed(1))
        groups = {n: [i for i, r in enumerate(rows) if r == n] for n in names}

        def one_call() -> None:
            with torch.no_grad():
                model(ids, adapter_names=rows)

        def per_set() -> None:
            with torch.no_grad():
                for name, idx in groups.items():
                    model(ids[idx], adapter_names=[name] * len(idx))

        variants = {"mixed batch (1 call)": one_call, "per set (one call each)": per_set}
        for fn in variants.values():
            for _ in range(args.warmup):
                fn()
        times: dict[str, list[float]] = {k: [] for k in variants}
        keys = list(variants)
        for r in range(args.rounds):
            for k in keys[r % 2:] + keys[: r % 2]:
                t0 = time.perf_counter()
                variants[k]()
                times[k].append((time.perf_counter() - t0) * 1000)
        ref = statistics.median(times[keys[1]])
        for k in keys:
            med = statistics.median(times[k])
            print(f"{k:26s} {med:8.2f} ms  x per-set {med / ref:.2f}")


def swap(args: argparse.Namespace) -> None:
    """The operator's work in one swap period of the load test, alone: replace the named LSR-Adapt set and
    hot-swap the model's own adapter, median over ``--rounds`` periods after ``--warmup``."""
    with tempfile.TemporaryDirectory() as workdir:
        model, versions = served_model(args, workdir)

        def period(v: int) -> None:
            lsrfx.load_adapters(model, versions["lsr"][v], name="lsr")
            lsrfx.load_adapters(model, versions["default"][v])

        for r in range(args.warmup):
            period(r % 2)
        times = []
        for r in range(args.rounds):
            t0 = time.perf_counter()
            period(r % 2)
            times.append((time.perf_counter() - t0) * 1000)
        print(f"one swap period (two loads)  {statistics.median(times):8.2f} ms  (median of {args.rounds})")


def load(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        model, versions = served_model(args, workdir)
        prompts = [torch.randint(3, 1024, (1, args.seq), generator=torch.Generator().manual_seed(s)) for s in range(8)]
        want = {}  # (prompt, name) -> outputs of each version of that name
        for name, dirs in versions.items():
            for d in dirs:
                ref = lsrfx.load_adapters(base(args), d)
                with torch.no_grad():
                    for i, p in enumerate(prompts):
                        want.setdefault((i, name), []).append(ref(p).logits)
        names = list(versions)
        swap_target = copy.deepcopy(model) if args.swap_into == "copy" else model
        for n_clients in args.clients:
            rates: dict[bool, list[float]] = {False: [], True: []}
            latencies: dict[bool, list[float]] = {False: [], True: []}
            wrong = {False: 0, True: 0}
            for r in range(args.rounds):  # the two runs interleaved, the first alternating
                for swaps in ((False, True) if r % 2 == 0 else (True, False)):
                    lat, bad = run_load(model, swap_target, versions, prompts, want, names, n_clients, swaps, args)
                    rates[swaps].append(len(lat) / args.seconds)
                    latencies[swaps] += lat
                    wrong[swaps] += bad
            for swaps in (False, True):
                lat = sorted(latencies[swaps])
                rps = statistics.median(rates[swaps])
                p50 = lat[len(lat) // 2] * 1000
                p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000
                label = "with swaps" if swaps else "no swaps"
                ratio = f"  x no swaps {rps / statistics.median(rates[False]):.2f}" if swaps else ""
                print(f"N={n_clients} {label:11s} {rps:8.1f} req/s  p50 {p50:7.2f} ms  p99 {p99:7.2f} ms  "
                      f"wrong outputs {wrong[swaps]}{ratio}", flush=True)


def run_load(model, swap_target, versions, prompts, want, names, n_clients, swaps, args) -> tuple[list[float], int]:
    stop = threading.Event()
    latencies: list[float] = []
    wrong = [0]
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            i, name = rng.randrange(len(prompts)), rng.choice(names)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model(prompts[i], adapter_names=[name]).logits
            dt = time.perf_counter() - t0
            ok = any(torch.equal(out, w) or (out - w).abs().max() <= 1e-5 for w in want[(i, name)])
            with lock:
                latencies.append(dt)
                wrong[0] += not ok

    def operator() -> None:
        v = 0
        while not stop.wait(args.swap_ms / 1000):
            v = 1 - v
            lsrfx.load_adapters(swap_target, versions["lsr"][v], name="lsr")
            lsrfx.load_adapters(swap_target, versions["default"][v])

    threads = [threading.Thread(target=client, args=(s,)) for s in range(n_clients)]
    if swaps:
        threads.append(threading.Thread(target=operator))
    for t in threads:
        t.start()
    time.sleep(args.seconds)
    stop.set()
    for t in threads:
        t.join()
    for name, v in (("lsr", 0), ("default", 0)):  # back to the first versions for the next run
        lsrfx.load_adapters(swap_target, versions[name][v], **({"name": name} if name != "default" else {}))
    return latencies, wrong[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["mixed", "load", "swap"], default="mixed")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--seq", type=int, default=32)
    add_size_arguments(p, hidden=256, layers=4, rounds=7)
    p.add_argument("--compiled", action="store_true")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--swap-ms", type=float, default=300.0)
    p.add_argument("--swap-into", choices=["served", "copy"], default="served",
                   help="copy: the operator loads into a copy of the model (its CPU cost without the swap lock)")
    args = p.parse_args()
    print(f"serving ({args.part}{', compiled' if args.compiled else ''}): Llama hidden {args.hidden}, {args.layers} "
          f"layers, torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.2f} before")
    {"mixed": mixed, "load": load, "swap": swap}[args.part](args)
    after = os.getloadavg()[0]
    print(f"load average {after:.2f} after" + ("  (above 1.5: these timings mean nothing)" if after > 1.5 else ""))


if __name__ == "__main__":
    main()
