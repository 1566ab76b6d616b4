"""One CondLoRA layer's training step, stacked against separate factor products, by token count.

CondLoRA's factors are products of the frozen ``W0`` with a shared pair (``A = C_A W0``, ``B = W0 C_B'``). The
stacked form (``kernels/condlora_linear.py``: ``CondLoRALinear`` eagerly, ``lsrfx::condlora_linear`` compiled) puts
those products onto the base matmul's pass over ``W0``, at the price of copying the activations; the separate form
(the generic low-rank path) runs them as skinny matmuls of their own. Per layer shape of the Llama setup of
``bench/eager.py`` (hidden 1024) and per ``--tokens``, fp32, forward and backward, r = 8:

* ``peft``: peft's form, ``x @ W0.T + (x @ A.T) @ B.T`` with trainable ``A``, ``B`` (the reference);
* ``stacked``: the stacked form's bodies (``condlora_forward``, ``condlora_backward``);
* ``separate``: ``A`` and ``B`` formed from the pair by their own products, then peft's form, autograd throughout.

Medians of interleaved rounds, x ``peft``. Load average printed before and after; above 1.5 the figures mean
nothing.

    python bench/condlora_layer.py --tokens 256 1024 4096
    python bench/condlora_layer.py --tokens 64 --rounds 3      # smoke run
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import lsrfx.kernels.condlora_linear  # noqa: F401  (the module; the package attribute of that name is the op)

from common import interleaved_medians  # bench/ is on sys.path when run as a script

SHAPES = {"gate/up": (2816, 1024), "down": (1024, 2816), "q/o": (1024, 1024), "k/v": (256, 1024)}
RANK = 8


def runs_for(d_out: int, d_in: int, tokens: int) -> dict:
    """One callable per variant, each a whole forward and backward of one layer."""
    kernels = sys.modules["lsrfx.kernels.condlora_linear"]
    torch.manual_seed(0)
    square = d_out == d_in
    x = torch.randn(tokens, d_in, requires_grad=True)
    w0 = torch.randn(d_out, d_in) * d_in**-0.5
    grad = torch.randn(tokens, d_out)
    c_a = torch.randn(RANK, d_in if square else d_out, requires_grad=True)
    c_b = torch.randn(RANK, d_in, requires_grad=True)
    a = torch.randn(RANK, d_in, requires_grad=True)
    b = torch.randn(d_out, RANK, requires_grad=True)

    def peft() -> None:
        (x @ w0.t() + (x @ a.t()) @ b.t()).backward(grad)

    @torch.no_grad()  # as inside the layer's autograd.Function
    def stacked() -> None:
        out, a_, bt, u = kernels.condlora_forward(x, w0, None, c_a, c_b, 1.0, square)
        kernels.condlora_backward(grad, x, w0, a_, bt, u, c_a, 1.0, square, False)

    def separate() -> None:
        a_ = c_a @ (w0.t() if square else w0)  # (r, d_in)
        b_ = w0 @ c_b.t()  # (d_out, r)
        (x @ w0.t() + (x @ a_.t()) @ b_.t()).backward(grad)

    return {"peft": peft, "stacked": stacked, "separate": separate}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    print(f"load before {os.getloadavg()[0]:.2f}, {torch.get_num_threads()} threads, r = {RANK}")
    print(f"{'tokens':>6s} {'layer':8s} {'peft ms':>8s} {'stacked':>8s} {'separate':>8s}   (x peft)")
    for tokens in args.tokens:
        for name, (d_out, d_in) in SHAPES.items():
            med = interleaved_medians(runs_for(d_out, d_in, tokens), args.rounds, args.warmup)
            print(f"{tokens:6d} {name:8s} {med['peft'] * 1e3:8.2f} {med['stacked'] / med['peft']:8.3f} "
                  f"{med['separate'] / med['peft']:8.3f}")
    print(f"load after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
