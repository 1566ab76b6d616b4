"""Full training step (forward, backward, AdamW) on a BERT encoder: lsrfx vs the base floor vs peft, quiet and busy.

One command compiles every variant once, then runs two scenarios with the same compiled models:

* ``quiet``: nothing else should run on the machine. The load average is printed before the scenario's warm-up and
  after its last round, split into this benchmark's share and everyone else's (below); the timing verdict is
  refused when the others' 1-minute load exceeds 1.5 at either reading.
* ``busy``: one core busy. The script starts ``bench/busy.py``, a separate process running a pure-Python busy loop
  pinned with ``os.sched_setaffinity`` to the last core, before the scenario's warm-up, and terminates and joins it
  after the last round (``try``/``finally``). The loop has a hard deadline (three times the scenario's estimated
  length plus 120 s) and exits by itself at that deadline or as soon as this process dies; if it exits before the
  scenario ends, the busy verdict is refused. The same load rule applies (the busy loop counts as this benchmark's).

Variants (``--variants`` picks a subset by key; the floor and peft compiled are always kept, every ratio needs them):

* ``floor``: ``base floor (compiled)``: no adapter, frozen base, but the full input-gradient backward (the
  embeddings' output requires grad, AdamW steps it), i.e. the least any adapter can cost;
* ``peft-eager``, ``peft``: ``peft`` LoRA r = 8 (alpha 8) eager and ``torch.compile``d;
* ``peft-r32`` (not in the default set): ``peft`` LoRA r = 32 (alpha 32) compiled, GenLoRA's rank: what any
  rank-32 adapter's products cost, for reference (the targets stay against r = 8);
* ``lora``, ``lsr``, ``condlora``, ``genlora``: ``torch.compile(lsrfx.adapt(model, method))``, default Inductor
  backend, the lsrfx pass deciding per node by its cost model (``LSRFX_FUSE=auto``; "compiled" rows);
* ``lora-fused``, ... (not in the default set): the same compiled with ``LSRFX_FUSE=always`` (every node fused:
  the rank-``r`` products beside the base matmul), to compare with what the rule chose;
* ``lora-materialised``, ... : the same compiled with ``LSRFX_FUSE=never`` ("materialised" rows: ``W0 + dW`` is
  formed and a plain matmul runs, its backward forms the dense weight gradient). The pass reads ``LSRFX_FUSE``
  when Inductor compiles (it is part of the pass's uuid), so the variable is set around each variant's first step
  only; the decisions the pass recorded in ``torch._dynamo.utils.counters["lsrfx"]`` during that compilation are
  printed per variant, a forced variant (fused, materialised) with any node of another choice is an error, and a
  compiled / forced pair with different decisions that ran the same Inductor wrapper code is an error;
* ``lora-eager``, ``lsr-eager``, ``condlora-eager``, ``genlora-eager`` (not in the default set): lsrfx unfused.

Every adapter targets ``query`` and ``value``; methods use ``METHODS`` below, each method's default (LoRA r = 8,
alpha 8, as peft's; LSR-Adapt rank 8: r1 = 2, r2 = 4, S = 11; CondLoRA r = 8; GenLoRA r = 32, g = 2). Inputs are
random ``inputs_embeds`` of ``--batch x --seq``; the model is in train mode (dropout on, as in fine-tuning).

What each column measures:

* **median ms**: wall time of one step (``perf_counter``; CUDA synchronised), median over ``--rounds`` rounds.
  Each round runs every variant once, the starting variant rotating round to round; each scenario first runs
  ``--warmup`` untimed steps per variant. torch's default thread count unless ``--threads`` is given.
* **x floor**, **x peft compiled**: that median over the floor's / peft compiled's median in the same scenario.
* **kernels/step**, **extern/step**: measured once, before the scenarios, over one extra untimed step with
  ``sys.setprofile``: every call made by Inductor's generated Python wrapper code (the ``call`` functions of the
  forward and backward graphs, files under Inductor's cache directory). *kernels* counts launches of kernels
  Inductor generated (calls into the compiled C++ extension modules of that cache directory on CPU; calls to
  Triton kernels' ``run`` on CUDA, untested here); *extern* counts calls the wrapper makes to library ops instead
  (``extern_kernels.mm`` / ``addmm`` / ``bmm``, ``torch.ops`` calls such as SDPA or an RNG seed op); buffer
  allocation, reinterpretation and size asserts are not counted. These are launches per step, forward plus
  backward, each call once; the eager AdamW step and any eager code between graphs are not counted ("-" for
  eager variants). ``torch.profiler`` does not show Inductor's CPU kernels in torch 2.13 unless they were compiled
  with ``torch._inductor.config.cpp.enable_kernel_profile`` (which changes the generated code), and
  ``torch._inductor.metrics.generated_kernel_count`` counts kernels generated at compile time (zero on a cache
  hit), not kernels launched per step, hence this method.
* **peak MB**: memory one step adds at its peak, measured once before the scenarios over one extra untimed step:
  on CUDA ``max_memory_allocated`` minus what was allocated before the step; on CPU the peak of the running sum of
  the allocator's allocation and free events recorded by ``torch.profiler`` (``profile_memory=True``; Inductor's
  buffers go through the same allocator). Checked on toy cases: one 100 MB tensor allocated and freed reads
  100 MB; four 25 MB tensors plus a 50 MB one alive together read 150 MB.

Load average: ``os.getloadavg()`` counts this benchmark too (two busy threads on two cores read about 2). Its
share is estimated from the time every thread of this process and of its child processes (Inductor's compile
workers, the busy loop) spent running or waiting to run (``/proc/<pid>/task/<tid>/schedstat``), averaged with the
kernel's 1-minute decay since the process started; "others" is the 1-minute load average minus that share.

Verdict (for the size run): quiet: every lsrfx method compiled <= 1.03 x floor and <= 1.00 x peft compiled; busy:
<= 1.10 x floor and <= 1.00 x peft compiled; in both: kernels per step <= peft compiled's + 10 %, peak memory <=
peft compiled's, no graph break beyond the floor's, no recompilation after the first step. "met" or "missed by"
the relative excess.

    python bench/train_step.py --hidden 384 --layers 6 --batch 16 --seq 128 --rounds 7 --warmup 2 \\
        --out bench/results/train_step_384.txt
    python bench/train_step.py --hidden 1024 --layers 4 --batch 16 --seq 128 --rounds 5 --warmup 1 \\
        --out bench/results/train_step_1024.txt
    python bench/train_step.py --hidden 64 --layers 1 --batch 2 --seq 16 --rounds 1 --warmup 1   # smoke run
    python bench/train_step.py --scenarios quiet --variants lora lsr     # floor, peft and two methods, quiet only
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import select
import statistics
import subprocess
import sys
import time
import types
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch._dynamo.utils import counters

import lsrfx

from common import METHODS, PEFT_LORA, bert, fuse_policy, make_step, peak_memory_mb  # bench/ on sys.path

TARGETS = {"quiet": (1.03, 1.00), "busy": (1.10, 1.00)}  # (x floor, x peft compiled) for every lsrfx compiled
KERNEL_SLACK = 1.10  # kernels per step <= peft compiled's x this
LOAD_LIMIT = 1.5  # others' 1-minute load average above which a timing verdict is refused
BUSY_SCRIPT = Path(__file__).with_name("busy.py")
DEFAULT_KEYS = ["floor", "peft-eager", "peft"] + [k for m in METHODS for k in (m, f"{m}-materialised")]
ALL_KEYS = DEFAULT_KEYS + ["peft-r32"] + [f"{m}-{kind}" for kind in ("fused", "eager") for m in METHODS]


# ---------------------------------------------------------------------------------------------------- models


@dataclass
class Variant:
    key: str
    label: str
    build: Callable[[], Callable[[], None]]
    compiled: bool
    method: str | None = None  # lsrfx method, None for the floor and peft
    fuse: str | None = None  # LSRFX_FUSE while the first step compiles (None: leave the environment alone)
    step: Callable[[], None] | None = None
    compile_s: float = 0.0
    estimate_s: float = 0.0  # one untimed step after compilation (sizes the busy loop's deadline)
    decisions: Counter = field(default_factory=Counter)  # lsrfx pass decisions recorded while compiling
    graphs: int = 0  # Dynamo graphs compiled by the first step
    graph_breaks: int = 0
    recompiles: int = 0  # Dynamo graphs compiled after the first step (should stay 0)
    peak_mb: float = 0.0
    kernels: int | None = None
    extern: Counter = field(default_factory=Counter)
    other: Counter = field(default_factory=Counter)
    wrappers: frozenset[str] = frozenset()
    times: list[float] = field(default_factory=list)  # the last scenario's timed steps (s)

    @property
    def targeted(self) -> bool:  # the rows the targets are about: lsrfx methods compiled with the pass's own rule
        return self.method is not None and self.compiled and self.fuse == "auto"


def catalogue(hidden: int, layers: int, embeds: torch.Tensor, device: str) -> dict[str, Variant]:
    def floor() -> Callable[[], None]:
        leaf = embeds.clone().requires_grad_()
        return make_step(torch.compile(bert(hidden, layers, device).requires_grad_(False)), leaf, [leaf])

    def peft(compiled: bool, r: int = 8) -> Callable[[], Callable[[], None]]:
        def build() -> Callable[[], None]:
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(**{**PEFT_LORA, "r": r, "lora_alpha": r})
            m = get_peft_model(bert(hidden, layers, device), config)
            return make_step(torch.compile(m) if compiled else m, embeds, [])
        return build

    def lsrfx_step(method: str, compiled: bool) -> Callable[[], Callable[[], None]]:
        def build() -> Callable[[], None]:
            m = lsrfx.adapt(bert(hidden, layers, device), method=method, targets=["query", "value"],
                            **METHODS[method])
            return make_step(torch.compile(m) if compiled else m, embeds, [])
        return build

    out = {"floor": Variant("floor", "base floor (compiled)", floor, True),
           "peft-eager": Variant("peft-eager", "peft lora eager", peft(False), False),
           "peft": Variant("peft", "peft lora compiled", peft(True), True),
           "peft-r32": Variant("peft-r32", "peft lora r=32 compiled", peft(True, 32), True)}
    for m in METHODS:
        out[m] = Variant(m, f"lsrfx {m} compiled", lsrfx_step(m, True), True, m, "auto")
        out[f"{m}-fused"] = Variant(f"{m}-fused", f"lsrfx {m} fused", lsrfx_step(m, True), True, m, "always")
        out[f"{m}-materialised"] = Variant(f"{m}-materialised", f"lsrfx {m} materialised", lsrfx_step(m, True),
                                           True, m, "never")
        out[f"{m}-eager"] = Variant(f"{m}-eager", f"lsrfx {m} eager", lsrfx_step(m, False), False, m)
    return out


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


# ---------------------------------------------------------------------------------------------------- measurements


def count_launches(step: Callable[[], None]) -> tuple[int, Counter, Counter, frozenset[str]]:
    """Run ``step`` under ``sys.setprofile`` and classify every call made from Inductor's generated wrapper code.

    Returns (generated kernel launches, extern calls by name, other calls by name, wrapper files that ran)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    root = os.path.realpath(cache_dir())
    ops_file = os.path.join("torch", "_ops.py")
    kernels = 0
    extern: Counter = Counter()
    other: Counter = Counter()
    wrappers: set[str] = set()

    def generated(fn: object) -> bool:
        owner = getattr(fn, "__self__", None)
        return isinstance(owner, types.ModuleType) and str(getattr(owner, "__file__", "")).startswith(root)

    def hook(frame: types.FrameType, event: str, arg: object) -> None:
        nonlocal kernels
        if event == "c_call":
            if not frame.f_code.co_filename.startswith(root):
                return
            wrappers.add(frame.f_code.co_filename)
            name = getattr(arg, "__name__", repr(arg))
            module = getattr(arg, "__module__", None) or ""
            if generated(arg):
                kernels += 1
            elif module.startswith("torch._C._dynamo") or module in ("builtins", ""):
                pass  # buffer allocation / reinterpretation, size asserts, list.clear: bookkeeping
            elif module.startswith("torch"):
                extern[name] += 1
            else:
                other[f"{module}.{name}"] += 1
        elif event == "call":
            caller = frame.f_back
            code = frame.f_code
            if caller is None or not caller.f_code.co_filename.startswith(root) or code.co_filename.startswith(root):
                return
            wrappers.add(caller.f_code.co_filename)
            if code.co_name == "__call__" and code.co_filename.endswith(ops_file):
                extern[str(frame.f_locals.get("self"))] += 1  # torch.ops.<ns>.<op>.<overload>(...)
            elif code.co_name == "run" and code.co_filename.endswith("triton_heuristics.py"):
                kernels += 1  # a Triton kernel launch (CUDA wrappers)
            else:
                other[getattr(code, "co_qualname", code.co_name)] += 1

    sys.setprofile(hook)
    try:
        step()
    finally:
        sys.setprofile(None)
    return kernels, extern, other, frozenset(wrappers)


# ---------------------------------------------------------------------------------------------------- load average


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (from ``/proc/<pid>/stat``)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (text := _read(f"/proc/{entry.name}/stat")):
            ppid = int(text[text.rindex(")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _runnable_ns(pids: list[int]) -> dict[int, int]:
    """Per thread id: nanoseconds spent on a CPU plus waiting on a run queue (the states the load average counts)."""
    out: dict[int, int] = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            if text := _read(f"/proc/{pid}/task/{tid}/schedstat"):
                cpu, wait = text.split()[:2]
                out[int(tid)] = int(cpu) + int(wait)
    return out


class LoadShare:
    """This process tree's share of the kernel's 1-minute load average, as an exponentially decayed average of its
    runnable thread count (same 60 s time constant), started at process start-up."""

    def __init__(self) -> None:
        self.available = sys.platform == "linux" and os.path.exists("/proc/self/task")
        self.share = 0.0
        self.t = time.monotonic()
        self.last: dict[int, int] = {}
        if not self.available:
            return
        self.last = _runnable_ns(_process_tree(os.getpid()))
        stat, uptime = _read("/proc/self/stat") or "", _read("/proc/uptime") or "0"
        started = int(stat[stat.rindex(")") + 2:].split()[19]) / os.sysconf("SC_CLK_TCK")
        elapsed = max(float(uptime.split()[0]) - started, 1e-3)
        self.share = sum(self.last.values()) / 1e9 / elapsed * (1 - math.exp(-elapsed / 60))

    def update(self) -> None:
        if not self.available:
            return
        now = time.monotonic()
        dt = now - self.t
        if dt <= 0:
            return
        current = _runnable_ns(_process_tree(os.getpid()))
        busy_s = sum(max(0, v - self.last.get(tid, 0)) for tid, v in current.items()) / 1e9
        decay = math.exp(-dt / 60)
        self.share = self.share * decay + busy_s / dt * (1 - decay)
        self.last, self.t = current, now

    def reading(self, when: str) -> tuple[str, float]:
        """A printable line and the others' 1-minute load."""
        self.update()
        load = os.getloadavg()
        others = max(0.0, load[0] - self.share) if self.available else load[0]
        share = (f"this benchmark ~{self.share:.2f}, others ~{others:.2f}" if self.available
                 else "this benchmark's share unknown (no /proc): others taken as the whole")
        return (f"load average {when}: 1-min {load[0]:.2f} ({share}), 5-min {load[1]:.2f}, "
                f"15-min {load[2]:.2f}"), others


# ---------------------------------------------------------------------------------------------------- busy loop


class BusyLoop:
    """``bench/busy.py`` in a child process, pinned to the last core, with a hard deadline."""

    def __init__(self, seconds: float) -> None:
        self.core = max(os.sched_getaffinity(0))
        self.seconds = seconds
        self.proc: subprocess.Popen | None = None

    def start(self) -> str:
        self.proc = subprocess.Popen([sys.executable, str(BUSY_SCRIPT), "--core", str(self.core),
                                      "--seconds", f"{self.seconds:.0f}"], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline().strip() if ready else ""
        if not line.startswith("ready"):
            self.stop()
            raise RuntimeError(f"busy loop did not start (got {line!r})")
        pinned = os.sched_getaffinity(self.proc.pid)
        if pinned != {self.core}:
            self.stop()
            raise RuntimeError(f"busy loop pinned to {sorted(pinned)}, expected [{self.core}]")
        return f"busy loop: pid {self.proc.pid}, pinned to core {self.core}, hard deadline {self.seconds:.0f} s"

    def stop(self) -> bool:
        """Terminate and join; True if it was still spinning (it did not hit its deadline early)."""
        if self.proc is None:
            return False
        alive = self.proc.poll() is None
        if alive:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None
        return alive


# ---------------------------------------------------------------------------------------------------- the run


class Tee:
    """Everything printed goes to the console and to ``--out``."""

    def __init__(self, stream, path: Path) -> None:
        self.stream, self.file = stream, open(path, "w", buffering=1)

    def write(self, s: str) -> int:
        self.stream.write(s)
        self.file.write(s)
        return len(s)

    def flush(self) -> None:
        self.stream.flush()
        self.file.flush()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def _timed(v: Variant, device: str, load: LoadShare) -> float:
    before = _graphs()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    v.step()
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    v.recompiles += _graphs() - before
    load.update()
    return elapsed


def prepare(vs: list[Variant], device: str, load: LoadShare) -> None:
    """Build and compile each variant (first step), then measure its step estimate, peak memory and launches."""
    for v in vs:
        before = (Counter(counters["lsrfx"]), _graphs(), sum(counters["graph_break"].values()))
        t0 = time.perf_counter()
        v.step = v.build()
        with fuse_policy(v.fuse):
            v.step()
        v.compile_s = time.perf_counter() - t0
        v.decisions = Counter(counters["lsrfx"]) - before[0]
        v.graphs = _graphs() - before[1]
        v.graph_breaks = sum(counters["graph_break"].values()) - before[2]
        load.update()
        v.estimate_s = _timed(v, device, load)
        before_graphs = _graphs()
        v.peak_mb = peak_memory_mb(v.step, device)
        if v.compiled:
            v.kernels, v.extern, v.other, v.wrappers = count_launches(v.step)
        v.recompiles += _graphs() - before_graphs
        load.update()
        print(f"  {v.label}: first step {v.compile_s:.1f} s, next {v.estimate_s * 1e3:.0f} ms; " + describe(v),
              flush=True)
        forced = {"never": "materialised", "always": "fused"}.get(v.fuse or "")
        if forced and (not v.decisions[forced] or sum(v.decisions.values()) != v.decisions[forced]):
            raise SystemExit(f"{v.label}: LSRFX_FUSE={v.fuse} but the pass recorded {dict(v.decisions)}")
        if v.fuse == "auto" and not sum(v.decisions.values()):
            raise SystemExit(f"{v.label}: the lsrfx pass recorded no decision while compiling (reused code?)")
    by_key = {v.key: v for v in vs}
    for v in vs:
        for other in ("fused", "materialised"):
            pair = by_key.get(f"{v.key}-{other}")
            if v.fuse == "auto" and pair is not None and v.decisions != pair.decisions and v.wrappers & pair.wrappers:
                raise SystemExit(f"{v.label} and {pair.label} ran the same Inductor wrapper code")


def describe(v: Variant) -> str:
    parts = [f"{v.graphs} graph(s), {v.graph_breaks} graph break(s)"]
    if v.method is not None and v.compiled:
        parts.append("lsrfx decisions " + ", ".join(f"{a} {v.decisions[a]}" for a in ("fused", "merged", "materialised",
                                                                                    "skipped") if v.decisions[a]))
    if v.kernels is not None:
        ext = ", ".join(f"{n} {c}" for n, c in sorted(v.extern.items(), key=lambda kv: (-kv[1], kv[0])))
        parts.append(f"{v.kernels} kernel launches + {sum(v.extern.values())} extern ({ext}) per step")
        if v.other:
            parts.append("uncounted wrapper calls: " + ", ".join(f"{n} {c}" for n, c in sorted(v.other.items())))
    parts.append(f"peak {mb(v.peak_mb)} MB")
    return "; ".join(parts)


def mb(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.3f}"


def judge(value: float, limit: float) -> str:
    return "met" if value <= limit else f"missed by {100 * (value / limit - 1):.1f} %"


def scenario(name: str, vs: list[Variant], rounds: int, warmup: int, device: str, load: LoadShare,
             progress: bool) -> list[str]:
    lines: list[str] = []

    def say(s: str) -> None:
        lines.append(s)
        print(s, flush=True)

    print(f"\n== scenario: {name} ==", flush=True)
    refusal: list[str] = []
    text, others = load.reading(f"before the {name} scenario")
    say(text)
    if others > LOAD_LIMIT:
        refusal.append(f"others' load {others:.2f} > {LOAD_LIMIT} before")
    busy = None
    if name == "busy":
        expected = sum(max([v.estimate_s, *v.times]) for v in vs)  # per round; v.times: the quiet scenario's
        busy = BusyLoop(120 + 3 * 2 * (warmup + rounds) * expected)  # x2: a core is taken away
    times: dict[str, list[float]] = {v.key: [] for v in vs}
    graphs_before = _graphs()
    try:
        if busy is not None:
            say(busy.start())
        for _ in range(warmup):
            for v in vs:
                _timed(v, device, load)
        for i in range(rounds):
            print(f"  round {i + 1}/{rounds}", flush=True)
            k = i % len(vs)
            for v in vs[k:] + vs[:k]:
                times[v.key].append(_timed(v, device, load))
            if progress and i + 1 < rounds:
                print("\n".join(table(vs, times)), flush=True)
        text, others = load.reading(f"after the {name} scenario")
        say(text)
        if others > LOAD_LIMIT:
            refusal.append(f"others' load {others:.2f} > {LOAD_LIMIT} after")
    finally:
        if busy is not None and not busy.stop():
            refusal.append("the busy loop hit its deadline before the scenario ended")
    for v in vs:
        v.times = times[v.key]
    say(f"recompilations during the scenario: {_graphs() - graphs_before}")
    say("")
    for row in table(vs, times):
        say(row)
    say("")
    for row in verdict(name, vs, times, refusal):
        say(row)
    return lines


def table(vs: list[Variant], times: dict[str, list[float]]) -> list[str]:
    med = {k: statistics.median(t) * 1e3 for k, t in times.items() if t}
    floor, peft = med.get("floor"), med.get("peft")
    rows = ["| variant | median ms | x floor | x peft compiled | kernels/step | extern/step | peak MB |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for v in vs:
        if v.key not in med:
            continue
        m = med[v.key]
        kern = "-" if v.kernels is None else str(v.kernels)
        ext = "-" if v.kernels is None else str(sum(v.extern.values()))
        rows.append(f"| {v.label} | {m:.1f} | {m / floor:.3f} | {m / peft:.3f} | {kern} | {ext} | {mb(v.peak_mb)} |")
    return rows


def verdict(name: str, vs: list[Variant], times: dict[str, list[float]], refusal: list[str]) -> list[str]:
    lim_floor, lim_peft = TARGETS[name]
    med = {k: statistics.median(t) for k, t in times.items()}
    by_key = {v.key: v for v in vs}
    floor, peft = by_key["floor"], by_key["peft"]
    targeted = [v for v in vs if v.targeted]
    rows = [f"Verdict ({name}): every lsrfx method compiled <= {lim_floor:.2f} x floor and <= {lim_peft:.2f} x peft "
            f"compiled; kernels per step <= peft compiled's + {100 * (KERNEL_SLACK - 1):.0f} %; peak memory <= "
            "peft compiled's; no graph break beyond the floor's; no recompilation after the first step."]
    if not targeted:
        rows.append("- no lsrfx compiled variant in this run: nothing to judge")
        return rows
    if refusal:
        rows.append(f"- wall time: VERDICT REFUSED ({'; '.join(refusal)}): the {name} scenario's conditions were "
                    "not met, its times are not evidence either way")
    else:
        for v in targeted:
            rf, rp = med[v.key] / med["floor"], med[v.key] / med["peft"]
            rows.append(f"- {v.label}: {rf:.3f} x floor: {judge(rf, lim_floor)}; {rp:.3f} x peft compiled: "
                        f"{judge(rp, lim_peft)}")
    bound = peft.kernels * KERNEL_SLACK
    rows.append(f"- kernels per step (<= {bound:.1f} = peft compiled's {peft.kernels} + 10 %): "
                + "; ".join(f"{v.key} {v.kernels}: {judge(v.kernels, bound)}" for v in targeted))
    rows.append(f"- peak memory (<= peft compiled's {mb(peft.peak_mb)} MB): "
                + "; ".join(f"{v.key} {mb(v.peak_mb)}: {judge(v.peak_mb, peft.peak_mb)}" for v in targeted))
    rows.append(f"- graph breaks (floor: {floor.graph_breaks}): "
                + "; ".join(f"{v.key} {v.graph_breaks}: {'met' if v.graph_breaks <= floor.graph_breaks else 'missed'}"
                            for v in targeted))
    rows.append("- recompilations after the first step (all steps so far): "
                + "; ".join(f"{v.key} {v.recompiles}: {'met' if not v.recompiles else 'missed'}" for v in targeted))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant at the start of each scenario")
    ap.add_argument("--scenarios", nargs="*", choices=["quiet", "busy"], default=["quiet", "busy"],
                    help="run in this order whatever the order given: quiet, then busy; none (a bare --scenarios): "
                    "only kernel counts and peak memory, which do not depend on the machine's load")
    ap.add_argument("--variants", nargs="+", choices=ALL_KEYS, metavar="KEY", default=DEFAULT_KEYS,
                    help=f"subset to run (floor and peft are always added); keys: {' '.join(ALL_KEYS)}")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: leave torch's default)")
    ap.add_argument("--out", type=Path, help="also write the full output to this file")
    ap.add_argument("--progress", action="store_true", help="print the table so far after every round")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    load = LoadShare()
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout = Tee(sys.stdout, args.out)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64
    keys = [k for k in ALL_KEYS if k in set(args.variants) | {"floor", "peft"}]
    scenarios = [s for s in ("quiet", "busy") if s in args.scenarios]

    print(f"$ python {' '.join(sys.argv)}")
    print(f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads ({'--threads' if args.threads else 'default'}), "
          f"device {args.device}, {time.strftime('%Y-%m-%d %H:%M:%S')}")
    print(f"hidden {args.hidden}, {args.layers} layers, batch {args.batch} x {args.seq}, {args.rounds} rounds, "
          f"{args.warmup} warm-up steps per variant and scenario; scenarios: {', '.join(scenarios)}")
    print("columns: median ms = median wall time of a full step (forward + backward + AdamW); x floor / x peft "
          "compiled = ratio of medians in the same scenario; kernels/step = launches of Inductor-generated kernels "
          "and extern/step = library calls (mm, addmm, bmm, torch.ops) made by the compiled graphs' wrapper code "
          "in one step, forward + backward, counted with sys.setprofile (eager AdamW and eager code not counted, "
          "'-' for eager variants); peak MB = memory one step adds at its peak. Kernel counts and peak memory are "
          "measured once, before the scenarios.")
    print(load.reading("at start-up")[0])

    torch.manual_seed(0)
    embeds = torch.randn(args.batch, args.seq, args.hidden, device=args.device)
    cat = catalogue(args.hidden, args.layers, embeds, args.device)
    vs = [cat[k] for k in keys]
    print(f"\n== compiling {len(vs)} variants (first step each; each is reused by every scenario) ==", flush=True)
    prepare(vs, args.device, load)
    for name in scenarios:
        scenario(name, vs, args.rounds, args.warmup, args.device, load, args.progress)
    print(f"\n{load.reading('at the end')[0]}", flush=True)


if __name__ == "__main__":
    main()
