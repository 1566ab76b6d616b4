"""Where a GenLoRA layer's eager training time goes: one layer's forward and backward, split into its parts.

Per layer shape of the Llama setup of ``bench/eager.py`` (hidden 1024: ``q``/``o`` 1024 x 1024, ``k``/``v`` 256 x
1024, ``gate``/``up`` 2816 x 1024, ``down`` 1024 x 2816), ``--tokens`` rows (default 256 = 2 x 128), fp32:

* ``frozen``: ``x @ W0.T`` with the input gradient only (the floor of any adapter);
* ``lora8``, ``lora32``: peft's form, ``x @ W0.T + s * (x @ A.T) @ B.T``, at r = 8 and at GenLoRA's default r = 32,
  with the factors' gradients: what the rank-``r`` matmuls cost;
* ``genlora``: lsrfx's eager GenLoRA layer (``GenLoRALinear``, r = 32, its default basis), synthesis included;
* ``banks``: the synthesis alone, both banks forward and backward as the layer runs them;
* ``banks@REV`` (with ``--rev REV``): the same with the bank bodies of git revision ``REV`` (loaded as
  ``bench/ab_bodies.py`` does). Timed in rounds of their own, the two bank variants alternating, so each runs
  after the other: among the layer variants whichever bank ran second would find its data in cache;
* ``banks@inductor`` (with ``--inductor``): the same arithmetic as one fused kernel per body, the plain statement of
  the bank (``rbf_bank_reference`` and ``rbf_bank_grads``) compiled by Inductor (``torch.compile``, dynamic shapes;
  compiled before timing): what fusing the synthesis saves with each call's own guards and dispatch, in rounds with
  ``banks`` as above.

Medians of interleaved rounds (``bench/common.py``), ms per layer step, and the excess over ``lora8``. Load average
printed before and after; above 1.5 the figures mean nothing.

    python bench/genlora_layer.py                 # every shape, 200 rounds
    python bench/genlora_layer.py --rounds 5      # smoke run
    python bench/genlora_layer.py --rev a2fd086   # today's banks against a revision's
    python bench/genlora_layer.py --inductor      # today's banks against an Inductor-fused bank
"""

from __future__ import annotations

import argparse
import os
import sys
import types

import torch

import lsrfx
from lsrfx.kernels.genlora_linear import GenLoRALinear

from ab_bodies import module_at  # bench/ is on sys.path when run as a script
from common import interleaved_medians

SHAPES = {"q/o": (1024, 1024), "k/v": (256, 1024), "gate/up": (2816, 1024), "down": (1024, 2816)}


def fused_bank(basis: str):
    """A bank run whose forward and gradients are Inductor's fused code for the reference statement: the factor
    once (the layer's forward) and the gradients once (which form the features themselves; the factor the layer's
    backward also needs is left out, so this is a lower bound on a fused bank's cost)."""
    reference = sys.modules["lsrfx.kernels.rbf_bank"]
    forward = torch.compile(lambda z, c, lg, w: reference.rbf_bank_reference(z, c, lg, w, basis), dynamic=True)
    grads = torch.compile(lambda g, z, c, lg, w: reference.rbf_bank_grads(g, z, c, lg, w, basis), dynamic=True)

    def run(bank: list, n: int, rank: int) -> None:
        forward(*bank)
        grads(torch.ones(rank, n), *bank)
    return run


def runs_for(d_out: int, d_in: int, tokens: int, rev: str | None = None, inductor: bool = False) -> dict:
    """One callable per variant, each a whole forward and backward of one layer."""
    torch.manual_seed(0)
    x = torch.randn(tokens, d_in, requires_grad=True)
    w0 = torch.randn(d_out, d_in) * d_in**-0.5
    grad = torch.randn(tokens, d_out)
    linear = torch.nn.Linear(d_in, d_out, bias=False)
    adapter = lsrfx.adapt(torch.nn.Sequential(linear), method="genlora", targets=["0"])
    module = next(m for m in adapter.modules() if hasattr(m, "banks"))
    bank_a, bank_b = module.banks()
    scale, basis = module.scale, module.basis

    def lora(r: int):
        a = torch.randn(r, d_in, requires_grad=True)
        b = torch.randn(d_out, r, requires_grad=True)
        return lambda: (x @ w0.t() + (x @ a.t()) @ b.t() * scale).backward(grad)

    def banks(kernels: types.ModuleType):
        @torch.no_grad()  # as inside the layer's autograd.Function
        def run() -> None:
            for bank, n in ((bank_a, d_in), (bank_b, d_out)):
                kernels.rbf_bank_forward(*bank, basis)
                features = kernels.rbf_bank_features(*bank[:3])
                kernels.weigh_features(features[2], bank[3], basis)
                kernels.rbf_bank_backward_values(torch.ones(module.rank, n), *bank, basis, features)
        return run

    runs = {
        "frozen": lambda: (x @ w0.t()).backward(grad),
        "lora8": lora(8),
        "lora32": lora(32),
        "genlora": lambda: GenLoRALinear.apply(x, w0, None, scale, basis, *bank_a, *bank_b).backward(grad),
        "banks": banks(sys.modules["lsrfx.kernels.rbf_bank"]),  # the module; the package attribute is the op
    }
    if rev is not None:
        runs[f"banks@{rev}"] = banks(module_at(rev, "lsrfx.kernels.rbf_bank"))
    if inductor:
        fused = fused_bank(basis)

        @torch.no_grad()
        def banks_fused() -> None:
            for bank, n in ((bank_a, d_in), (bank_b, d_out)):
                fused(bank, n, module.rank)

        banks_fused()  # compiled here, not in the timed rounds
        runs["banks@inductor"] = banks_fused
    return runs


def medians_ms(runs: dict, rounds: int, warmup: int) -> dict:
    """Every variant's median in ms; the bank variants (``banks*``) in rounds apart from the layers'."""
    bank_runs = {k: v for k, v in runs.items() if k.startswith("banks@")}
    if bank_runs:
        bank_runs = {"banks": runs.pop("banks"), **{k: runs.pop(k) for k in bank_runs}}
    out = {**interleaved_medians(runs, rounds, warmup), **interleaved_medians(bank_runs, rounds, warmup)}
    return {k: v * 1e3 for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rev", help="also time the bank bodies of this git revision")
    p.add_argument("--inductor", action="store_true", help="also time the bank as Inductor's fused code")
    args = p.parse_args()
    print(f"load before {os.getloadavg()[0]:.2f}, {torch.get_num_threads()} threads, {args.tokens} tokens")
    others = ([f"banks@{args.rev}"] if args.rev else []) + (["banks@inductor"] if args.inductor else [])
    names = ["frozen", "lora8", "lora32", "genlora", "banks", *others]
    print(f"{'layer':8s} " + " ".join(f"{k:>14s}" for k in names) + "   genlora - lora8"
          + "".join(f"   banks / {k}" for k in others))
    for name, (d_out, d_in) in SHAPES.items():
        ms = medians_ms(runs_for(d_out, d_in, args.tokens, args.rev, args.inductor), args.rounds, args.warmup)
        line = f"{name:8s} " + " ".join(f"{ms[k]:14.3f}" for k in names) + f"   {ms['genlora'] - ms['lora8']:+.2f} ms"
        print(line + "".join(f"   {ms['banks'] / ms[k]:.3f}" for k in others))
    print(f"load after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
