"""Same-model A/B of lsrfx's kernel bodies: a git revision's against the working tree's, switched step by step.

Between processes the training-step ratios to peft move by up to 0.1 on this machine (model placement, the machine's
speed drifting), more than a change to one op's body is worth. This script builds the Llama setup of
``bench/eager.py`` once per variant it needs (``floor`` is left out), loads the kernel modules of ``--method`` as they
were at ``--rev`` (``git show``, their custom ops renamed so they register beside today's), and times the one adapted
model with today's bodies and with the revision's, swapped in for each step, interleaved with peft:

* ``peft``: peft LoRA r = 8, the reference;
* ``METHOD``: the working tree's bodies;
* ``METHOD@REV``: the same model and (compiled) code with the revision's bodies.

A revision's function is called with the arguments its own signature names (today's caller may pass more). Under
``--mode compiled`` the graph is traced once with today's fake functions, so the A/B is valid only where the ops'
outputs kept their shapes between the two revisions (true of ``rbf_bank``; not of ``condlora_linear`` before it
stopped returning ``A`` for non-square layers: compare that one eagerly).

    python bench/ab_bodies.py --method genlora --rev 0575dc6 --rounds 15                   # eager
    python bench/ab_bodies.py --method genlora --rev 0575dc6 --rounds 11 --mode compiled
    python bench/ab_bodies.py --method condlora --rev 2996a6b --rounds 15
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path

import torch

from common import interleaved_medians  # bench/ is on sys.path when run as a script
from eager import LOAD_LIMIT, make_variant, step_fn  # the Llama setup and its training step

ROOT = Path(__file__).resolve().parents[1]
# The modules whose functions make each method's eager layer and compiled op.
BODIES = {
    "genlora": ("lsrfx.kernels.rbf_bank", "lsrfx.kernels.genlora_linear"),
    "condlora": ("lsrfx.kernels.condlora_linear",),
    "lsr": ("lsrfx.kernels.kron_sum",),
}


def module_at(rev: str, name: str) -> types.ModuleType:
    """``name`` as it was at ``rev``, its ``lsrfx::`` ops renamed ``lsrfx_ab::`` (a namespace of its own)."""
    path = name.replace(".", "/") + ".py"
    source = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    source = source.replace('"lsrfx::', '"lsrfx_ab::').replace("torch.ops.lsrfx.", "torch.ops.lsrfx_ab.")
    module = types.ModuleType(f"{name}@{rev}")
    module.__file__ = f"{rev}:{path}"
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def called_as_today(old: Callable, new: Callable) -> Callable:
    """``old`` behind ``new``'s signature: today's arguments bound by name, those ``old`` does not take dropped
    (``old`` itself where the signatures agree: the binding costs microseconds a call)."""
    signature, takes = inspect.signature(new), inspect.signature(old).parameters
    if list(signature.parameters) == list(takes):
        return old

    def call(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return old(**{k: v for k, v in bound.arguments.items() if k in takes})

    return call


def swaps(method: str, rev: str) -> list[tuple[types.ModuleType, str, Callable, Callable]]:
    """``(module, name, today's, the revision's)`` for every public function of the method's modules that both
    revisions define, in every ``lsrfx`` module that holds today's function under that name (``from ... import``
    copies). Private helpers stay: each revision's public functions call their own."""
    out = []
    for name in BODIES[method]:
        importlib.import_module(name)
        live, old = sys.modules[name], module_at(rev, name)  # (the package's attribute of the name may be the op)
        for attr, new in vars(live).items():
            if attr.startswith("_") or not (inspect.isfunction(new) and new.__module__ == name
                                            and inspect.isfunction(getattr(old, attr, None))):
                continue
            replacement = called_as_today(getattr(old, attr), new)
            for module in [m for k, m in list(sys.modules.items()) if k.startswith("lsrfx") and m is not None]:
                if getattr(module, attr, None) is new:
                    out.append((module, attr, new, replacement))
    return out


def switched(step: Callable[[], None], table: list, use_old: bool) -> Callable[[], None]:
    """``step`` with the revision's functions in place (``use_old``) or today's."""
    def run() -> None:
        for module, attr, new, old in table:
            setattr(module, attr, old if use_old else new)
        try:
            step()
        finally:
            for module, attr, new, _ in table:
                setattr(module, attr, new)

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=sorted(BODIES), required=True)
    p.add_argument("--rev", required=True, help="the git revision whose bodies to compare with the working tree's")
    p.add_argument("--mode", choices=["eager", "compiled"], default="eager")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    if args.mode == "compiled":
        torch._dynamo.config.recompile_limit = 64
    table = swaps(args.method, args.rev)
    print(f"{args.method} ({args.mode}), batch {args.batch} x {args.seq}, {torch.get_num_threads()} threads, "
          f"{len(table)} functions swapped, load average {os.getloadavg()[0]:.2f} before")
    peft = step_fn(*make_variant("peft", "llama", args))
    model = make_variant(args.method, "llama", args)
    steps = {"peft": peft, args.method: switched(step_fn(*model), table, False),
             f"{args.method}@{args.rev}": switched(step_fn(*model), table, True)}
    med = interleaved_medians(steps, args.rounds, args.warmup)
    for key, seconds in med.items():
        print(f"{key:24s} {seconds * 1e3:9.1f} ms  x peft {seconds / med['peft']:.3f}")
    after = os.getloadavg()[0]
    print(f"load average {after:.2f} after" + ("  (above 1.5: these timings mean nothing)" if after > LOAD_LIMIT
                                                else ""))


if __name__ == "__main__":
    main()
